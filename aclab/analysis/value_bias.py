"""Value bias at episode starts (DCPG paper, Appendix C, Figures 2-4).

For the initial state ``s_0`` of each of K training episodes, compare the value prediction ``V(s_0)`` with
the discounted Monte-Carlo return of that episode ``G_0 = sum_t gamma^t r_t`` (the paper's "true value");
``bias = mean_k (V(s_0^k) - G_0^k)``, negative when the critic underestimates. The paper uses K = 100
episodes per measurement, collected throughout training, and plots both means over training.

Units: ``V`` and ``G_0`` must be in the same units, so feed the rewards the value function is trained on
(after reward normalisation/scaling, if any) and the training ``gamma``.

Truncated episodes (a time limit: Procgen's time-outs are truncations) have no full return. ``truncation``
says what to do with them:

* ``"bootstrap"`` (default): keep them with the bootstrapped value at the cut,
  ``G_0 = sum_{t<L} gamma^t r_t + gamma^L V(s_L)`` (``s_L`` the true final observation), as the
  training targets treat a truncation; the paper takes every one of its 100 episodes;
* ``"partial"``: keep them with the partial sum (what the DCPG authors' code logs: its envs report a
  time-out as an ordinary episode end);
* ``"exclude"``: leave them out (reported in ``num_truncated_excluded``). A long-lived critic then
  measures only early, short episodes: on CartPole-v1 every episode of a good policy is truncated at 500.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]
TRUNCATION_MODES = ("bootstrap", "partial", "exclude")


@dataclass(frozen=True)
class EpisodeStart:
    """A finished episode: the value predicted at its first state and its discounted return.

    value: ``V(s_0)`` at the time the episode started. discounted_return: ``G_0`` over the episode's own
    rewards (partial for a truncated episode). length: number of (valid) steps. truncated: the episode
    ended by truncation. env_index: its env. bootstrap: ``gamma^L V(s_L)`` at a truncation's final
    observation (0 for a termination; ``nan`` when unknown).
    """

    value: float
    discounted_return: float
    length: int
    truncated: bool
    env_index: int = -1
    bootstrap: float = 0.0


@dataclass(frozen=True)
class ValueBiasResult:
    """bias = mean(values - returns) over the ``num_episodes`` episodes used; per-episode pairs kept.

    values, returns: ``[K]`` float64 arrays of the episodes used (returns after the truncation rule).
    num_truncated: truncated episodes among those used; num_truncated_excluded: truncated episodes left
    out (``truncation = "exclude"``); truncation: the rule applied. ``bias``, ``mean_value``,
    ``mean_return`` are ``nan`` when no episode is used.
    """

    bias: float
    mean_value: float
    mean_return: float
    num_episodes: int
    num_truncated_excluded: int
    values: np.ndarray
    returns: np.ndarray
    num_truncated: int = 0
    truncation: str = "bootstrap"

    def as_metrics(self, prefix: str = "value_bias/") -> dict[str, float]:
        return {
            f"{prefix}bias": self.bias,
            f"{prefix}predicted": self.mean_value,
            f"{prefix}true": self.mean_return,
            f"{prefix}episodes": float(self.num_episodes),
            f"{prefix}truncated": float(self.num_truncated),
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
    bootstrap: ArrayLike | None = None,
    truncation: str = "bootstrap",
) -> ValueBiasResult:
    """Bias from paired ``V(s_0) [K]`` and ``G_0 [K]`` (partial sums for truncated episodes).

    ``truncated [K]`` marks truncated episodes, ``bootstrap [K]`` their ``gamma^L V(s_L)`` (needed with
    ``truncation = "bootstrap"`` when an episode is truncated); ``truncation`` per the module docstring.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation rule {truncation!r}; expected one of {TRUNCATION_MODES}")
    values = _to_numpy(initial_values).astype(np.float64).reshape(-1)
    rets = _to_numpy(returns).astype(np.float64).reshape(-1)
    if values.shape != rets.shape:
        raise ValueError(f"initial_values {values.shape} and returns {rets.shape} must match")
    cut = np.zeros(values.shape, dtype=bool)
    if truncated is not None:
        cut = _to_numpy(truncated).astype(bool).reshape(-1)
        if cut.shape != values.shape:
            raise ValueError(f"truncated {cut.shape} must match initial_values {values.shape}")
    keep = np.ones(values.shape, dtype=bool)
    if truncation == "exclude":
        keep = ~cut
    elif truncation == "bootstrap" and cut.any():
        if bootstrap is None:
            raise ValueError("truncated episodes need their bootstrap values gamma^L V(s_L) (or truncation="
                             "'partial' / 'exclude')")
        boot = _to_numpy(bootstrap).astype(np.float64).reshape(-1)
        if boot.shape != values.shape:
            raise ValueError(f"bootstrap {boot.shape} must match initial_values {values.shape}")
        if not np.isfinite(boot[cut]).all():
            raise ValueError("a truncated episode has no bootstrap value (nan)")
        rets = np.where(cut, rets + boot, rets)
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
        num_truncated=int(cut[keep].sum()),
        truncation=truncation,
    )


def value_bias_from_episodes(
    episode_rewards: Sequence[ArrayLike],
    initial_values: ArrayLike,
    gamma: float,
    truncated: ArrayLike | None = None,
    bootstrap: ArrayLike | None = None,
    truncation: str = "bootstrap",
) -> ValueBiasResult:
    """Bias from recorded episodes: one reward array ``[L_k]`` and one ``V(s_0)`` per episode."""
    returns = np.array([discounted_return(rewards, gamma) for rewards in episode_rewards], dtype=np.float64)
    return value_bias(initial_values, returns, truncated, bootstrap, truncation)


def value_bias_from_starts(
    starts: Sequence[EpisodeStart], last: int | None = None, truncation: str = "bootstrap"
) -> ValueBiasResult:
    """Bias over tracked episodes (optionally only the ``last`` ones, e.g. 100 as in the paper).

    ``last`` counts the episodes that are used, so truncated ones (when excluded) do not take places;
    ``num_truncated_excluded`` counts every truncated episode in ``starts`` under ``"exclude"``.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation rule {truncation!r}; expected one of {TRUNCATION_MODES}")
    usable = [s for s in starts if truncation != "exclude" or not s.truncated]
    if last is not None:
        usable = usable[len(usable) - last :] if last > 0 else []
    num_excluded = sum(s.truncated for s in starts) if truncation == "exclude" else 0
    result = value_bias([s.value for s in usable], [s.discounted_return for s in usable],
                        [s.truncated for s in usable], [s.bootstrap for s in usable], truncation)
    return ValueBiasResult(
        bias=result.bias,
        mean_value=result.mean_value,
        mean_return=result.mean_return,
        num_episodes=result.num_episodes,
        num_truncated_excluded=num_excluded,
        values=result.values,
        returns=result.returns,
        num_truncated=result.num_truncated,
        truncation=truncation,
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
        next_values: ArrayLike | None = None,
    ) -> list[EpisodeStart]:
        """Advance one step of all envs; return the episodes that ended at this step.

        ``next_values [B]``: the predictions for the observations after this step (with next-step
        autoreset, a truncated episode's true final observation), giving a truncated episode its
        ``bootstrap = gamma^L V(s_L)``; without them the bootstrap of a truncated episode is ``nan``.
        """
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
        next_np = None if next_values is None else _to_numpy(next_values).astype(np.float64).reshape(-1)
        finished = []
        for b in np.flatnonzero(ending & self._active):
            truncated = not bool(terminated_np[b])
            bootstrap = 0.0
            if truncated:
                bootstrap = math.nan if next_np is None else float(self._discount[b] * next_np[b])
            finished.append(EpisodeStart(
                value=float(self._start_value[b]),
                discounted_return=float(self._return[b]),
                length=int(self._length[b]),
                truncated=truncated,
                env_index=int(b),
                bootstrap=bootstrap,
            ))
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
        """:meth:`step` over time-major arrays ``[T, B]``. With ``values [T + 1, B]`` (a collector's rows,
        row ``t + 1`` = the observation after step ``t``) truncated episodes get their bootstrap."""
        rewards_np = _to_numpy(rewards)
        values_np = _to_numpy(values)
        ends_np = _to_numpy(ends)
        valid_np = None if valid is None else _to_numpy(valid)
        terminated_np = None if terminated is None else _to_numpy(terminated)
        finished: list[EpisodeStart] = []
        has_next = values_np.shape[0] > rewards_np.shape[0]
        for t in range(rewards_np.shape[0]):
            finished += self.step(
                values_np[t],
                rewards_np[t],
                ends_np[t],
                None if valid_np is None else valid_np[t],
                None if terminated_np is None else terminated_np[t],
                values_np[t + 1] if has_next else None,
            )
        return finished

    def open_episodes(self) -> list[EpisodeStart]:
        """Episodes still running, as truncated records (partial returns, bootstrap ``nan``), e.g. at the end
        of training."""
        return [
            EpisodeStart(
                value=float(self._start_value[b]),
                discounted_return=float(self._return[b]),
                length=int(self._length[b]),
                truncated=True,
                env_index=int(b),
                bootstrap=math.nan,
            )
            for b in np.flatnonzero(self._active)
        ]
