"""Action distributions as pure functions of one parameter tensor, plus tiny stateless adapters.

Each distribution is described by a single tensor ``params`` ``[..., P]`` so it can be stored in a
rollout buffer next to the actions (for KL penalties, PPG's ``pi_old``, V-trace's behaviour policy):

* Categorical: ``params = logits`` ``[..., A]``; actions int64 ``[...]``.
* Diagonal Gaussian: ``params = cat([mean, log_std], -1)`` ``[..., 2D]``; actions ``[..., D]``.
* Tanh-squashed Gaussian: parameters as the diagonal Gaussian of the pre-squash variable ``u``;
  actions ``tanh(u)`` in ``(-1, 1)`` (callers rescale to the action bounds).

``torch.distributions`` is deliberately avoided: its object construction and argument validation
cost about 2x per call on small networks (see ``shared/specs/performance.md``). Samplers take an
optional ``torch.Generator`` so that sampling is reproducible independently of the global RNG.
Gaussian samples are reparameterised (differentiable in ``params``); categorical samples are not.
"""

from __future__ import annotations

import math

import gymnasium
import torch
import torch.nn.functional as F
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Categorical
# ----------------------------------------------------------------------------------------------
def categorical_sample(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample actions int64 ``[...]`` from logits ``[..., A]`` with the Gumbel-max trick."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp_min(tiny)))
    return torch.argmax(logits + gumbel, dim=-1)


def categorical_log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    """log pi(a) ``[...]`` for logits ``[..., A]`` and integer actions ``[...]``."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: Tensor) -> Tensor:
    """Entropy ``[...]`` of logits ``[..., A]``; actions with logit -inf contribute 0."""
    log_probs = torch.log_softmax(logits, dim=-1)
    finite_log_probs = log_probs.clamp_min(torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * finite_log_probs).sum(-1)


def categorical_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Exact ``KL(p || q) = sum_a p(a) (log p(a) - log q(a))`` ``[...]`` for logits ``[..., A]``."""
    p_log_probs = torch.log_softmax(p_logits, dim=-1)
    q_log_probs = torch.log_softmax(q_logits, dim=-1)
    p_probs = p_log_probs.exp()
    terms = p_probs * (p_log_probs - q_log_probs)
    return torch.where(p_probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def categorical_mode(logits: Tensor) -> Tensor:
    """Most likely action int64 ``[...]``."""
    return torch.argmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussian
# ----------------------------------------------------------------------------------------------
def normal_split(params: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``[..., 2D]`` params into ``(mean, log_std)``, each ``[..., D]``."""
    if params.shape[-1] % 2:
        raise ValueError(f"Gaussian params need an even last dimension [mean, log_std], got {params.shape}")
    mean, log_std = params.chunk(2, dim=-1)
    return mean, log_std


def normal_sample(params: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised sample ``mean + std * eps`` ``[..., D]``."""
    mean, log_std = normal_split(params)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + log_std.exp() * noise


def normal_log_prob(params: Tensor, actions: Tensor) -> Tensor:
    """log density ``[...]`` of ``actions`` ``[..., D]``, summed over the last dimension."""
    mean, log_std = normal_split(params)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)


def normal_entropy(params: Tensor) -> Tensor:
    """Entropy ``[...]``: ``sum_d log_std_d + 0.5 (1 + log 2 pi)``."""
    _, log_std = normal_split(params)
    return (log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)


def normal_kl(p_params: Tensor, q_params: Tensor) -> Tensor:
    """Exact ``KL(p || q)`` ``[...]`` between diagonal Gaussians, summed over dimensions."""
    p_mean, p_log_std = normal_split(p_params)
    q_mean, q_log_std = normal_split(q_params)
    variance_ratio = torch.exp(2.0 * (p_log_std - q_log_std))
    mean_term = ((p_mean - q_mean) * torch.exp(-q_log_std)).square()
    return 0.5 * (variance_ratio + mean_term - 1.0).sum(-1) + (q_log_std - p_log_std).sum(-1)


def normal_mode(params: Tensor) -> Tensor:
    """The mean ``[..., D]``."""
    return normal_split(params)[0]


# ----------------------------------------------------------------------------------------------
# Tanh-squashed Gaussian
# ----------------------------------------------------------------------------------------------
def tanh_log_abs_det_jacobian(pre_tanh: Tensor) -> Tensor:
    """``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` elementwise, stable for large ``|u|``."""
    return 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))


def tanh_normal_sample(params: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised squashed sample ``tanh(u)``, ``u ~ N(mean, std)``, in ``(-1, 1)`` ``[..., D]``."""
    return torch.tanh(normal_sample(params, generator))


def tanh_normal_sample_and_log_prob(
    params: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Reparameterised squashed sample ``[..., D]`` and its log density ``[...]`` (no atanh needed)."""
    pre_tanh = normal_sample(params, generator)
    log_prob = normal_log_prob(params, pre_tanh) - tanh_log_abs_det_jacobian(pre_tanh).sum(-1)
    return torch.tanh(pre_tanh), log_prob


def tanh_normal_log_prob(params: Tensor, actions: Tensor, pre_tanh: Tensor | None = None) -> Tensor:
    """log density ``[...]`` of squashed actions ``[..., D]`` (change of variables ``a = tanh(u)``).

    ``log p(a) = log N(u; mean, std) - sum_d log(1 - tanh(u_d)^2)``. Pass ``pre_tanh`` (the ``u`` that
    produced ``actions``) when known: recovering it by ``atanh`` loses precision near +-1, so
    ``actions`` are then clamped to ``+-(1 - eps)`` of their dtype before ``atanh``.
    """
    if pre_tanh is None:
        bound = 1.0 - torch.finfo(actions.dtype).eps
        pre_tanh = torch.atanh(actions.clamp(-bound, bound))
    return normal_log_prob(params, pre_tanh) - tanh_log_abs_det_jacobian(pre_tanh).sum(-1)


def tanh_normal_kl(p_params: Tensor, q_params: Tensor) -> Tensor:
    """``KL(p || q)`` ``[...]``: KL is invariant under the bijection tanh, so it equals the Gaussian KL."""
    return normal_kl(p_params, q_params)


def tanh_normal_entropy_estimate(
    params: Tensor, n_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Monte-Carlo estimate ``[...]`` of the squashed Gaussian's entropy (no closed form exists).

    ``H(tanh(u)) = H(u) + E_u[sum_d log(1 - tanh(u_d)^2)]``, the expectation estimated with
    ``n_samples`` reparameterised samples: unbiased and differentiable in ``params``, but noisy.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    mean, log_std = normal_split(params)
    noise = torch.randn((n_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
    pre_tanh = mean + log_std.exp() * noise
    return normal_entropy(params) + tanh_log_abs_det_jacobian(pre_tanh).sum(-1).mean(0)


# ----------------------------------------------------------------------------------------------
# Stateless adapters
# ----------------------------------------------------------------------------------------------
class Categorical:
    """Categorical over ``num_actions`` actions; params are logits ``[..., num_actions]``."""

    def __init__(self, num_actions: int) -> None:
        self.num_actions = int(num_actions)

    @property
    def param_dim(self) -> int:
        return self.num_actions

    @property
    def action_shape(self) -> tuple[int, ...]:
        return ()

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return categorical_sample(params, generator)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        return categorical_log_prob(params, actions)

    def entropy(self, params: Tensor) -> Tensor:
        return categorical_entropy(params)

    def kl(self, p_params: Tensor, q_params: Tensor) -> Tensor:
        return categorical_kl(p_params, q_params)

    def mode(self, params: Tensor) -> Tensor:
        return categorical_mode(params)

    def __repr__(self) -> str:
        return f"Categorical(num_actions={self.num_actions})"


class DiagGaussian:
    """Diagonal Gaussian over ``action_dim`` dimensions; params ``cat([mean, log_std], -1)``."""

    def __init__(self, action_dim: int) -> None:
        self.action_dim = int(action_dim)

    @property
    def param_dim(self) -> int:
        return 2 * self.action_dim

    @property
    def action_shape(self) -> tuple[int, ...]:
        return (self.action_dim,)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return normal_sample(params, generator)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        return normal_log_prob(params, actions)

    def entropy(self, params: Tensor) -> Tensor:
        return normal_entropy(params)

    def kl(self, p_params: Tensor, q_params: Tensor) -> Tensor:
        return normal_kl(p_params, q_params)

    def mode(self, params: Tensor) -> Tensor:
        return normal_mode(params)

    def __repr__(self) -> str:
        return f"DiagGaussian(action_dim={self.action_dim})"


class TanhGaussian:
    """Tanh-squashed diagonal Gaussian; actions in ``(-1, 1)`` (callers rescale to the bounds).

    ``entropy`` is a stochastic estimate (``n_samples`` reparameterised samples, default 1) because the
    squashed entropy has no closed form; use ``kl`` to a fixed Gaussian (as STAC does) or
    ``-log_prob`` of the sampled action (as SAC does) when a deterministic quantity is needed.
    """

    def __init__(self, action_dim: int) -> None:
        self.action_dim = int(action_dim)

    @property
    def param_dim(self) -> int:
        return 2 * self.action_dim

    @property
    def action_shape(self) -> tuple[int, ...]:
        return (self.action_dim,)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return tanh_normal_sample(params, generator)

    def sample_and_log_prob(
        self, params: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return tanh_normal_sample_and_log_prob(params, generator)

    def log_prob(self, params: Tensor, actions: Tensor, pre_tanh: Tensor | None = None) -> Tensor:
        return tanh_normal_log_prob(params, actions, pre_tanh)

    def entropy(self, params: Tensor, n_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        return tanh_normal_entropy_estimate(params, n_samples, generator)

    def kl(self, p_params: Tensor, q_params: Tensor) -> Tensor:
        return tanh_normal_kl(p_params, q_params)

    def mode(self, params: Tensor) -> Tensor:
        """``tanh(mean)``: the squashed median (the density's mode can differ when std is large)."""
        return torch.tanh(normal_mode(params))

    def __repr__(self) -> str:
        return f"TanhGaussian(action_dim={self.action_dim})"


Distribution = Categorical | DiagGaussian | TanhGaussian

_KINDS = ("auto", "categorical", "diag_gaussian", "tanh_gaussian")


def make_distribution(action_space: gymnasium.spaces.Space, kind: str = "auto") -> Distribution:
    """The distribution adapter for ``action_space``.

    Discrete(n) (start 0) -> Categorical; 1-D Box -> DiagGaussian, or TanhGaussian with
    ``kind="tanh_gaussian"``. ``kind`` is one of ``auto``, ``categorical``, ``diag_gaussian``,
    ``tanh_gaussian``; other spaces or mismatched kinds raise ``ValueError``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown distribution kind {kind!r}; expected one of {_KINDS}")
    spaces = gymnasium.spaces
    if isinstance(action_space, spaces.Discrete):
        if kind not in ("auto", "categorical"):
            raise ValueError(f"kind {kind!r} does not apply to a Discrete action space (use 'categorical')")
        if int(action_space.start) != 0:
            raise ValueError(f"Discrete action spaces must start at 0, got start={action_space.start}")
        return Categorical(int(action_space.n))
    if isinstance(action_space, spaces.Box):
        if kind == "categorical":
            raise ValueError("kind 'categorical' does not apply to a Box action space")
        if len(action_space.shape) != 1:
            raise ValueError(f"Box action spaces must be 1-D, got shape {action_space.shape}")
        action_dim = int(action_space.shape[0])
        return TanhGaussian(action_dim) if kind == "tanh_gaussian" else DiagGaussian(action_dim)
    raise ValueError(
        f"unsupported action space {action_space!r}: supported are gymnasium.spaces.Discrete "
        "(Categorical) and 1-D gymnasium.spaces.Box (DiagGaussian or TanhGaussian)"
    )
