"""Static description of a (vectorised) environment: :class:`EnvSpec`."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = ["EnvSpec"]


@dataclass(frozen=True)
class EnvSpec:
    """What an agent needs to know about one env of a :class:`~aclab.envs.vec.VecEnv`.

    ``observation_space`` and ``action_space`` are single-env spaces as the agent sees them: after
    dict flattening and observation normalisation (then float32 in ``[-obs_clip, obs_clip]``), and
    with Box actions as float32. ``levels``: the training levels when each env's level is chosen per episode
    (``make_env(..., level_control=True)``), else None.
    """

    env_id: str
    family: str
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    action_space: gymnasium.spaces.Space
    observation_space: gymnasium.spaces.Space
    max_episode_steps: int | None
    levels: tuple[int, ...] | None = None

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, spaces.Discrete)

    @property
    def num_actions(self) -> int:
        """Number of discrete actions (Discrete action spaces only)."""
        if not isinstance(self.action_space, spaces.Discrete):
            raise AttributeError(f"{self.env_id} has continuous actions {self.action_space}; use action_dim")
        return int(self.action_space.n)

    @property
    def action_dim(self) -> int:
        """Size of the flat continuous action vector (Box action spaces only)."""
        if not isinstance(self.action_space, spaces.Box):
            raise AttributeError(f"{self.env_id} has discrete actions {self.action_space}; use num_actions")
        return int(np.prod(self.action_space.shape))
