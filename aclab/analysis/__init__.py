"""Analysis tools, algorithm-agnostic: stiffness (DCPG), gradient noise scale (DNA), value bias (DCPG).

Each takes plain modules, tensors, arrays or loss callables; none knows about an algorithm. See
``docs/analysis.md``.
"""

from aclab.analysis.noise_scale import (
    GradientNoiseScale,
    NoiseScaleEstimate,
    batch_gradient,
    measure_noise_scale,
    trace_covariance_estimate,
    true_gradient_sq_estimate,
)
from aclab.analysis.stiffness import (
    StiffnessResult,
    cosine_stiffness_from_gradients,
    half_squared_error,
    per_sample_gradient_fn,
    per_sample_value_gradient_fn,
    sign_stiffness_from_gradients,
    value_stiffness,
)
from aclab.analysis.value_bias import (
    EpisodeStart,
    EpisodeStartTracker,
    ValueBiasResult,
    discounted_return,
    value_bias,
    value_bias_from_episodes,
    value_bias_from_starts,
)

__all__ = [
    "EpisodeStart",
    "EpisodeStartTracker",
    "GradientNoiseScale",
    "NoiseScaleEstimate",
    "StiffnessResult",
    "ValueBiasResult",
    "batch_gradient",
    "cosine_stiffness_from_gradients",
    "discounted_return",
    "half_squared_error",
    "measure_noise_scale",
    "per_sample_gradient_fn",
    "per_sample_value_gradient_fn",
    "sign_stiffness_from_gradients",
    "trace_covariance_estimate",
    "true_gradient_sq_estimate",
    "value_bias",
    "value_bias_from_episodes",
    "value_bias_from_starts",
    "value_stiffness",
]
