"""aclab's environment layer: ids, vectorised envs with next-step autoreset, normalisation.

Quick start::

    from aclab.envs import make_env
    env = make_env("CartPole-v1", num_envs=4, seed=0)
    obs = env.reset()                       # [4, 4] float32
    valid = ~env.next_is_dummy              # store before stepping
    out = env.step(actions)                 # StepResult, all fields [4]

See :mod:`aclab.envs.vec` for the autoreset / statistics conventions and :mod:`aclab.envs.make` for
the families, options and default backends.
"""

from aclab.envs.build import build_envs
from aclab.envs.make import ATARI_SETTING_CONFIGS, BACKENDS, make_env
from aclab.envs.normalize import ObsNormalizer, RewardScaler, RunningMeanStd
from aclab.envs.registry import (
    CLASSIC_IDS,
    ENV_FAMILIES,
    PROCGEN_GAMES,
    EnvIdError,
    import_env_modules,
    parse_env_id,
    register_env_factory,
)
from aclab.envs.spec import EnvSpec
from aclab.envs.vec import StepResult, VecEnv, copy_normalization

__all__ = [
    "ATARI_SETTING_CONFIGS",
    "BACKENDS",
    "CLASSIC_IDS",
    "ENV_FAMILIES",
    "PROCGEN_GAMES",
    "EnvIdError",
    "EnvSpec",
    "ObsNormalizer",
    "RewardScaler",
    "RunningMeanStd",
    "StepResult",
    "VecEnv",
    "build_envs",
    "copy_normalization",
    "import_env_modules",
    "make_env",
    "parse_env_id",
    "register_env_factory",
]
