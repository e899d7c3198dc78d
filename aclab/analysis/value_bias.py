"""Value bias at episode starts (DCPG paper, Appendix C, Figures 2-4).

For the initial state ``s_0`` of each of K training episodes, compare the value prediction ``V(s_0)`` with
the discounted Monte-Carlo return of that episode ``G_0 = sum_t gamma^t r_t`` (the paper's "true value");
``bias = mean_k (V(s_0^k) - G_0^k)``, negative when the critic underestimates. The paper uses K = 100
episodes per measurement, collected throughout training, and plots both means over training.

Units: ``V`` and ``G_0`` must be in the same units, so feed the rewards the value function is trained on
(after reward normalisation/scaling, if any) and the training ``gamma``.

Truncated episodes (time limit, or still running when the data ends) have no full return: their
``G_0`` is a partial sum that underestimates the true value. They are **excluded** from the bias by
default and reported separately (``include_truncated=True`` keeps them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


@dataclass(frozen=True)
class EpisodeStart:
    """A finished episode: the value predicted at its first state and its discounted return.

    value: ``V(s_0)`` at the time the episode started. discounted_return: ``G_0``. length: number of
    (valid) steps. truncated: the episode ended by truncation, so ``G_0`` is partial. env_index: its env.
    """

    value: float
    discounted_return: float
    length: int
    truncated: bool
    env_index: int = -1


@dataclass(frozen=True)
class ValueBiasResult:
    """bias = mean(values - returns) over the ``num_episodes`` episodes used; per-episode pairs kept.

    values, returns: ``[K]`` float64 arrays of the episodes used. num_truncated_excluded: truncated
    episodes left out. ``bias``, ``mean_value``, ``mean_return`` are ``nan`` when no episode is used.
    """

    bias: float
    mean_value: float
    mean_return: float
    num_episodes: int
    num_truncated_excluded: int
    values: np.ndarray
    returns: np.ndarray

    def as_metrics(self, prefix: str = "value_bias/") -> dict[str, float]:
        return {
            f"{prefix}bias": self.bias,
            f"{prefix}predicted": self.mean_value,
            f"{prefix}true": self.mean_return,
            f"{prefix}episodes": float(self.num_episodes),
        }


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def discounted_return(rewards: ArrayLike, gamma: float) -> float:
    """``G_0 = sum_t gamma^t r_t`` of one episode's rewards ``[L]`` (float64, Horner's scheme)."""
    total = 0.0
    for reward in _to_numpy(rewards).astype(np.float64)[::-1]:
        total = float(reward) + gamma * total
    return total


def value_bias(
    initial_values: ArrayLike,
    returns: ArrayLike,
    truncated: ArrayLike | None = None,
    include_truncated: bool = False,
) -> ValueBiasResult:
    """Bias from paired ``V(s_0) [K]`` and ``G_0 [K]``; ``truncated [K]`` bools drop partial returns."""
    values = _to_numpy(initial_values).astype(np.float64).reshape(-1)
    rets = _to_numpy(returns).astype(np.float64).reshape(-1)
    if values.shape != rets.shape:
        raise ValueError(f"initial_values {values.shape} and returns {rets.shape} must match")
    keep = np.ones(values.shape, dtype=bool)
    if truncated is not None and not include_truncated:
        keep = ~_to_numpy(truncated).astype(bool).reshape(-1)
        if keep.shape != values.shape:
            raise ValueError(f"truncated {keep.shape} must match initial_values {values.shape}")
    values, rets = values[keep], rets[keep]
    empty = values.size == 0
    return ValueBiasResult(
        bias=float("nan") if empty else float(np.mean(values - rets)),
        mean_value=float("nan") if empty else float(values.mean()),
        mean_return=float("nan") if empty else float(rets.mean()),
        num_episodes=int(values.size),
        num_truncated_excluded=int((~keep).sum()),
        values=values,
        returns=rets,
    )


def value_bias_from_episodes(
    episode_rewards: Sequence[ArrayLike],
    initial_values: ArrayLike,
    gamma: float,
    truncated: ArrayLike | None = None,
    include_truncated: bool = False,
) -> ValueBiasResult:
    """Bias from recorded episodes: one reward array ``[L_k]`` and one ``V(s_0)`` per episode."""
    returns = np.array([discounted_return(rewards, gamma) for rewards in episode_rewards], dtype=np.float64)
    return value_bias(initial_values, returns, truncated, include_truncated)


def value_bias_from_starts(
    starts: Sequence[EpisodeStart], last: int | None = None, include_truncated: bool = False
) -> ValueBiasResult:
    """Bias over tracked episodes (optionally only the ``last`` ones, e.g. 100 as in the paper).

    ``last`` counts the episodes that are used, so truncated ones (when excluded) do not take places;
    ``num_truncated_excluded`` counts every truncated episode in ``starts``.
    """
    usable = [s for s in starts if include_truncated or not s.truncated]
    if last is not None:
        usable = usable[len(usable) - last :] if last > 0 else []
    num_excluded = 0 if include_truncated else sum(s.truncated for s in starts)
    result = value_bias([s.value for s in usable], [s.discounted_return for s in usable])
    return ValueBiasResult(
        bias=result.bias,
        mean_value=result.mean_value,
        mean_return=result.mean_return,
        num_episodes=result.num_episodes,
        num_truncated_excluded=num_excluded,
        values=result.values,
        returns=result.returns,
    )


class EpisodeStartTracker:
    """Follows episodes through a rollout collector's per-step arrays and emits ``(V(s_0), G_0)`` pairs.

    Feed it, for every step ``t`` and all ``B`` envs, the arrays the collector stores (see
    ``aclab.data.rollout``): ``values [B]`` (the predictions for the observations of step ``t``),
    ``rewards [B]``, ``ends [B]`` (terminated | truncated), ``valid [B]`` (False for next-step-autoreset
    dummy steps, which are skipped entirely) and optionally ``terminated [B]`` (without it every end counts
    as a termination). The first valid step after an episode end is the next episode's ``s_0``; its value
    is kept until that episode ends. With ``fresh_envs=True`` the first valid step of each env is also an
    episode start (the envs were just reset); with ``False`` the tracker waits for the first end, so it
    never reports an episode whose start it did not see. Works with same-step autoreset too (no dummies:
    ``valid`` all True). Returns are accumulated in float64.
    """

    def __init__(self, num_envs: int, gamma: float, *, fresh_envs: bool = True) -> None:
        self.num_envs = num_envs
        self.gamma = gamma
        self._awaiting_start = np.full(num_envs, fresh_envs, dtype=bool)
        self._active = np.zeros(num_envs, dtype=bool)
        self._start_value = np.zeros(num_envs, dtype=np.float64)
        self._return = np.zeros(num_envs, dtype=np.float64)
        self._discount = np.ones(num_envs, dtype=np.float64)
        self._length = np.zeros(num_envs, dtype=np.int64)

    def step(
        self,
        values: ArrayLike,
        rewards: ArrayLike,
        ends: ArrayLike,
        valid: ArrayLike | None = None,
        terminated: ArrayLike | None = None,
    ) -> list[EpisodeStart]:
        """Advance one step of all envs; return the episodes that ended at this step."""
        values_np = _to_numpy(values).astype(np.float64).reshape(-1)
        rewards_np = _to_numpy(rewards).astype(np.float64).reshape(-1)
        ends_np = _to_numpy(ends).astype(bool).reshape(-1)
        valid_np = np.ones(self.num_envs, bool) if valid is None else _to_numpy(valid).astype(bool).reshape(-1)
        terminated_np = ends_np if terminated is None else _to_numpy(terminated).astype(bool).reshape(-1)
        for name, array in (("values", values_np), ("rewards", rewards_np), ("ends", ends_np), ("valid", valid_np)):
            if array.shape != (self.num_envs,):
                raise ValueError(f"{name} must be [{self.num_envs}], got {array.shape}")

        starting = valid_np & self._awaiting_start
        self._start_value[starting] = values_np[starting]
        self._return[starting] = 0.0
        self._discount[starting] = 1.0
        self._length[starting] = 0
        self._active |= starting
        self._awaiting_start &= ~starting

        counting = valid_np & self._active
        self._return[counting] += self._discount[counting] * rewards_np[counting]
        self._discount[counting] *= self.gamma
        self._length[counting] += 1

        ending = valid_np & ends_np
        finished = [
            EpisodeStart(
                value=float(self._start_value[b]),
                discounted_return=float(self._return[b]),
                length=int(self._length[b]),
                truncated=not bool(terminated_np[b]),
                env_index=int(b),
            )
            for b in np.flatnonzero(ending & self._active)
        ]
        self._active &= ~ending
        self._awaiting_start |= ending
        return finished

    def feed_rollout(
        self,
        values: ArrayLike,
        rewards: ArrayLike,
        ends: ArrayLike,
        valid: ArrayLike | None = None,
        terminated: ArrayLike | None = None,
    ) -> list[EpisodeStart]:
        """:meth:`step` over time-major arrays ``[T, B]`` (``values`` may be ``[T + 1, B]``; row T is unused)."""
        rewards_np = _to_numpy(rewards)
        values_np = _to_numpy(values)
        ends_np = _to_numpy(ends)
        valid_np = None if valid is None else _to_numpy(valid)
        terminated_np = None if terminated is None else _to_numpy(terminated)
        finished: list[EpisodeStart] = []
        for t in range(rewards_np.shape[0]):
            finished += self.step(
                values_np[t],
                rewards_np[t],
                ends_np[t],
                None if valid_np is None else valid_np[t],
                None if terminated_np is None else terminated_np[t],
            )
        return finished

    def open_episodes(self) -> list[EpisodeStart]:
        """Episodes still running, as truncated records (partial returns), e.g. at the end of training."""
        return [
            EpisodeStart(
                value=float(self._start_value[b]),
                discounted_return=float(self._return[b]),
                length=int(self._length[b]),
                truncated=True,
                env_index=int(b),
            )
            for b in np.flatnonzero(self._active)
        ]
