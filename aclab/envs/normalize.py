"""Running statistics and the two normalisers used by the environment layer.

* :class:`RunningMeanStd` -- per-element running mean / variance in float64, merged batch by batch with
  the parallel algorithm of Chan, Golub & LeVeque (1979). ``count`` starts at 0 (no pseudo-count), so
  after any sequence of updates ``mean``/``var`` equal ``np.mean``/``np.var`` (population variance,
  ddof=0) of all the data seen, up to rounding. Before the first update ``var`` is 1.
* :class:`ObsNormalizer` -- ``scale * clip((obs - mean) / sqrt(var + eps), -clip, clip)`` per element
  (``scale`` 1 by default; the DNA authors' code clips at 5 and multiplies by 3), statistics updated with
  every real observation before normalising it (the DNA / FixPO / PPO-continuous convention).
* :class:`RewardScaler` -- divides rewards by the running std of a per-env discounted return, with no mean
  subtraction (DNA paper, Appendix A, phasic.md "Reward normalisation"):
  ``c_t = r_t + gamma * c_{t-1} * (1 - done_{t-1})``; the statistics are updated with ``c_t``, then
  ``r_t / sqrt(var(c) + eps)`` is clipped to ``[-clip, clip]``. ``done`` is the *training* episode end
  (terminated or truncated, including Atari's life loss when ``episodic_life`` is on); ``c`` is zeroed
  after the step that ends an episode. Autoreset dummy steps (see :mod:`aclab.envs.vec`) neither
  advance ``c`` nor enter the statistics, and their scaled reward is 0.

Both normalisers have ``update`` (set it to False to freeze the statistics, e.g. for an evaluation env
that should use the training env's statistics: ``eval_norm.copy_from(train_norm); eval_norm.update =
False``) and ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["RunningMeanStd", "ObsNormalizer", "RewardScaler"]


class RunningMeanStd:
    """Running per-element mean and variance of batches ``x: [N, *shape]`` (float64, Chan et al.).

    ``reducer``: None, or ``(batch_mean, batch_var, n) -> (mean, var, n)`` that merges the batch with
    the batches other processes see at the same step (a data-parallel run's ranks, see
    :meth:`aclab.distributed.DataParallel.merge_moments`); it is called at every update, also with an
    empty batch, so that every process takes part.
    """

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.shape = tuple(shape)
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.var = np.ones(self.shape, dtype=np.float64)
        self.count = 0.0
        self.reducer = None

    def update(self, x: np.ndarray) -> None:
        """Merge a batch ``x`` of shape ``[N, *shape]`` into the statistics (N = 0: nothing changes)."""
        x = np.asarray(x, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            if self.reducer is None:
                return
            batch_mean, batch_var = np.zeros(self.shape), np.zeros(self.shape)
        else:
            # ufunc reductions: np.mean / np.var cost several microseconds of Python overhead per call.
            batch_mean = np.add.reduce(x, axis=0) / n
            diff = x - batch_mean
            batch_var = np.add.reduce(diff * diff, axis=0) / n
        if self.reducer is not None:
            batch_mean, batch_var, n = self.reducer(batch_mean, batch_var, n)
            if n == 0:
                return
        self.update_from_moments(batch_mean, batch_var, n)

    def update_from_moments(self, batch_mean: np.ndarray, batch_var: np.ndarray, batch_count: float) -> None:
        """Chan et al.'s pairwise merge of (mean, population var, count) with the stored moments."""
        if self.count == 0:
            self.mean = np.array(batch_mean, dtype=np.float64).reshape(self.shape)
            self.var = np.array(batch_var, dtype=np.float64).reshape(self.shape)
            self.count = float(batch_count)
            return
        total = self.count + batch_count
        w = batch_count / total  # weight of the new batch
        delta = batch_mean - self.mean
        # M2 / total = var (1 - w) + batch_var w + delta^2 w (1 - w)   (Chan et al. 1979, divided by total)
        self.var = self.var * (1.0 - w) + batch_var * w + delta * delta * (w * (1.0 - w))
        self.mean = self.mean + delta * w
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = np.asarray(state["mean"], dtype=np.float64)
        if mean.shape != self.shape:
            raise ValueError(f"RunningMeanStd shape mismatch: stored {mean.shape}, expected {self.shape}")
        self.mean = mean.copy()
        self.var = np.asarray(state["var"], dtype=np.float64).copy()
        self.count = float(state["count"])


class ObsNormalizer:
    """Per-element observation normalisation ``scale * clip((obs - mean) / sqrt(var + eps), +-clip)``.

    ``__call__(obs)`` takes a batch ``[B, *shape]`` of real observations, updates the statistics with it
    (unless ``update`` is False) and returns the normalised batch as float32.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8, update: bool = True,
                 scale: float = 1.0) -> None:
        if clip <= 0:
            raise ValueError(f"obs_clip must be > 0, got {clip}")
        if scale <= 0:
            raise ValueError(f"obs_scale must be > 0, got {scale}")
        self.rms = RunningMeanStd(shape)
        self.clip = float(clip)
        self.scale = float(scale)
        self.eps = float(eps)
        self.update = bool(update)
        self._refresh()

    def _refresh(self) -> None:
        # float32 copies used on the hot path; recomputed after each statistics change.
        self._mean32 = self.rms.mean.astype(np.float32)
        self._inv_std32 = (1.0 / np.sqrt(self.rms.var + self.eps)).astype(np.float32)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.update:
            self.rms.update(obs)
            self._refresh()
        return self.normalize(obs)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Normalise without touching the statistics. ``obs: [B, *shape]`` -> float32 ``[B, *shape]``."""
        out = np.subtract(obs, self._mean32, dtype=np.float32)
        out *= self._inv_std32
        # minimum/maximum: np.clip has ~1 us more Python overhead on small arrays.
        np.maximum(out, -self.clip, out=out)
        np.minimum(out, self.clip, out=out)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out

    def copy_from(self, other: ObsNormalizer) -> None:
        """Copy the statistics of ``other`` (e.g. training env -> evaluation env)."""
        self.load_state_dict(other.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"rms": self.rms.state_dict(), "clip": self.clip, "eps": self.eps, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rms.load_state_dict(state["rms"])
        self.clip = float(state["clip"])
        self.eps = float(state["eps"])
        self.scale = float(state.get("scale", 1.0))
        self._refresh()


class RewardScaler:
    """Reward scaling by the running std of the per-env discounted return (no mean subtraction).

    ``__call__(reward, done, valid)`` with all arrays ``[B]``: ``reward`` raw rewards of this step,
    ``done`` the training episode end at this step, ``valid`` False on autoreset dummy steps (or None
    when every entry is valid). Returns the scaled float32 rewards.
    """

    def __init__(
        self, num_envs: int, gamma: float = 0.99, clip: float = 10.0, eps: float = 1e-8, update: bool = True
    ) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"reward_gamma must be in [0, 1], got {gamma}")
        if clip <= 0:
            raise ValueError(f"reward_clip must be > 0, got {clip}")
        self.rms = RunningMeanStd(())
        self.gamma = float(gamma)
        self.clip = float(clip)
        self.eps = float(eps)
        self.update = bool(update)
        self.returns = np.zeros(num_envs, dtype=np.float64)

    def __call__(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        # A dummy step follows a done step, so its c is already 0 and its reward is 0: c stays 0 there.
        self.returns *= self.gamma
        self.returns += reward
        if self.update:
            self.rms.update(self.returns if valid is None else self.returns[valid])
        scaled = np.multiply(reward, 1.0 / np.sqrt(float(self.rms.var) + self.eps), dtype=np.float32)
        np.maximum(scaled, -self.clip, out=scaled)
        np.minimum(scaled, self.clip, out=scaled)
        if valid is not None:
            scaled[~valid] = 0.0
        if np.count_nonzero(done):
            self.returns[done] = 0.0
        return scaled

    def scale(self, reward: np.ndarray) -> np.ndarray:
        """Scale (and clip) rewards with the current statistics, touching no state."""
        scaled = (np.asarray(reward, dtype=np.float64) / np.sqrt(self.rms.var + self.eps)).astype(np.float32)
        return np.clip(scaled, -self.clip, self.clip)

    def reset_returns(self, mask: np.ndarray | None = None) -> None:
        """Zero the running discounted returns (all envs, or where ``mask``)."""
        if mask is None:
            self.returns[:] = 0.0
        else:
            self.returns[mask] = 0.0

    def copy_from(self, other: RewardScaler) -> None:
        """Copy the return statistics of ``other`` (not its per-env running returns)."""
        self.rms.load_state_dict(other.rms.state_dict())
        self.gamma, self.clip, self.eps = other.gamma, other.clip, other.eps

    def state_dict(self) -> dict[str, Any]:
        return {
            "rms": self.rms.state_dict(),
            "returns": self.returns.copy(),
            "gamma": self.gamma,
            "clip": self.clip,
            "eps": self.eps,
        }

    def load_state_dict(self, state: dict[str, Any], restore_returns: bool = True) -> None:
        self.rms.load_state_dict(state["rms"])
        self.gamma = float(state["gamma"])
        self.clip = float(state["clip"])
        self.eps = float(state["eps"])
        if restore_returns:
            returns = np.asarray(state["returns"], dtype=np.float64)
            if returns.shape != self.returns.shape:
                raise ValueError(
                    f"RewardScaler num_envs mismatch: stored {returns.shape}, expected {self.returns.shape}"
                )
            self.returns = returns.copy()
        else:
            self.returns[:] = 0.0
