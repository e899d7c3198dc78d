"""A tiny image environment for tests (registered as ``AclabQuadrant-v0``, use ``gym:AclabQuadrant-v0``).

Observations are 3x64x64 uint8 frames with one coloured square in one of four quadrants; the reward is 1
when the action names that quadrant. Episodes last ``length`` steps. The level (reset seed) fixes the
sequence of squares, so two levels differ. Pure NumPy, exactly picklable (exact resume on the Gymnasium
backend), fast enough for CPU tests of image algorithms (DrAC, DAAC on images).
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

ENV_ID = "AclabQuadrant-v0"


class QuadrantEnv(gymnasium.Env):
    def __init__(self, length: int = 20):
        self.length = length
        self.observation_space = spaces.Box(0, 255, (3, 64, 64), np.uint8)
        self.action_space = spaces.Discrete(4)
        self._t = 0
        self._quadrant = 0

    def _frame(self) -> np.ndarray:
        frame = np.zeros((3, 64, 64), np.uint8)
        row, col = divmod(self._quadrant, 2)
        frame[self._quadrant % 3, 8 + 32 * row:24 + 32 * row, 8 + 32 * col:24 + 32 * col] = 200
        return frame

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._quadrant = int(self.np_random.integers(4))
        return self._frame(), {}

    def step(self, action):
        reward = float(int(action) == self._quadrant)
        self._t += 1
        self._quadrant = int(self.np_random.integers(4))
        return self._frame(), reward, False, self._t >= self.length, {}


if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point=QuadrantEnv)
