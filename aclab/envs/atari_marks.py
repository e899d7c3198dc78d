"""DNA's frame annotations for Atari (DNA paper, Appendix A, "Integrating time and action information").

Two optional marks drawn into EnvPool's stacked grayscale frames ``obs: uint8 [B, S, H, W]``
(S = frame stack, index 0 the oldest frame):

* ``action_marker``: every frame in the stack carries a ``block x block`` white square at rows
  ``[a * block, (a + 1) * block)``, columns ``[0, block)``, where ``a`` is the action that led to that
  frame (no mark for a reset frame or for the autoreset dummy step, whose action is ignored).
* ``progress_bar``: the oldest frame's bottom 4 rows are cleared; rows ``H-3, H-2`` hold a grey (64)
  bar over columns ``[3, W-3)`` filled white (255) up to ``3 + (W-6) * t / T`` (t = agent steps elapsed in
  the game, T = the step cap), with the partial pixel shaded in between.

This is our reading of the paper's description and of the authors' public wrappers; the exact
geometry (block size 4, bar in the last rows) follows the latter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["AtariFrameMarks"]


class AtariFrameMarks:
    """Stateful painter for DNA's action markers and progress bar (see module docstring)."""

    def __init__(
        self,
        num_envs: int,
        stack: int,
        num_actions: int,
        max_episode_steps: int,
        action_marker: bool,
        progress_bar: bool,
        block: int = 4,
    ) -> None:
        self.num_envs = num_envs
        self.stack = stack
        self.num_actions = num_actions
        self.max_episode_steps = max(1, int(max_episode_steps))
        self.action_marker = action_marker
        self.progress_bar = progress_bar
        self.block = block
        # history[b, k]: the action that produced stack frame k of env b (-1: none).
        self.history = np.full((num_envs, stack), -1, dtype=np.int64)

    def check_frame_shape(self, height: int, width: int) -> None:
        if self.action_marker and self.num_actions * self.block > height:
            raise ValueError(f"action markers need {self.num_actions * self.block} rows, frames have {height}")
        if self.progress_bar and (height < 4 or width < 8):
            raise ValueError(f"progress bar needs frames of at least 4x8, got {height}x{width}")

    def on_reset(self, obs: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        self.history.fill(-1)
        return self.paint(obs, elapsed)

    def on_step(self, obs: np.ndarray, actions: np.ndarray, dummy: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        """``actions`` [B] taken this step, ``dummy`` [B] True where the step was an autoreset dummy."""
        # EnvPool shifts its frame stack by one on every step, including the dummy step after a life
        # loss (whose new frame no action produced); a real game reset refills the whole stack.
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = np.where(dummy, -1, actions)
        self.history[elapsed == 0] = -1
        return self.paint(obs, elapsed)

    def paint(self, obs: np.ndarray, elapsed: np.ndarray) -> np.ndarray:
        if self.action_marker:
            env_idx, frame_idx = np.nonzero(self.history >= 0)
            if env_idx.size:
                rows = self.history[env_idx, frame_idx][:, None] * self.block + np.arange(self.block)
                obs[
                    env_idx[:, None, None],
                    frame_idx[:, None, None],
                    rows[:, :, None],
                    np.arange(self.block)[None, None, :],
                ] = 255
        if self.progress_bar:
            obs[:, 0, -3:-1, :] = self._bar_rows(np.asarray(elapsed), obs.shape[-1])[:, None, :]
            obs[:, 0, -4, :] = 0
            obs[:, 0, -1, :] = 0
        return obs

    def _bar_rows(self, elapsed: np.ndarray, width: int) -> np.ndarray:
        """One bar row per env: uint8 [B, W]."""
        frac = np.clip(elapsed / self.max_episode_steps, 0.0, 1.0)
        x = 3.0 + (width - 6) * frac  # [B]
        full = np.floor(x).astype(np.int64)
        cols = np.arange(width)[None, :]
        row = np.where((cols >= 3) & (cols < width - 3), 64, 0)
        row = np.where((cols >= 3) & (cols < full[:, None]), 255, row)
        partial = (64 + (x - full) * (255 - 64)).astype(np.int64)
        inside = full < width - 3
        row[inside, full[inside]] = partial[inside]
        return row.astype(np.uint8)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = np.array(state["history"], dtype=np.int64, copy=True)
