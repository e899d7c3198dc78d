"""Prioritised level replay's sampler (Jiang, Grefenstette & Rocktaeschel 2021) and its level scores.

:class:`LevelSampler` keeps, for a finite set of training levels, a score ``S_i``, whether level ``i`` was
seen, and its staleness ``c - C_i`` (episodes sampled since level ``i`` was last sampled). The next level is

* with probability ``P_D = |seen| / |levels|`` (the "proportionate" replay decision; never before a fraction
  ``min_seen_fraction`` of the levels was seen, the authors' code's ``rho``, default 0 here): a replayed level
  drawn from ``P_replay = (1 - rho) P_S + rho P_C`` over the seen levels, with
  ``P_S(i) ∝ h(S_i)^(1/beta)``, ``h(S_i) = 1 / rank(S_i)`` (rank prioritisation, rank 1 = highest score) or
  ``h(S_i) = S_i`` (proportional), and ``P_C(i) ∝ c - C_i`` (staleness);
* otherwise an unseen level, uniformly.

DCPG paper, Appendix D: L1 value loss as score, rank prioritisation, beta = 0.1, rho = 0.1.
:func:`segment_scores` turns a rollout into per-episode-segment scores (mean ``|A_t|`` of the GAE advantages for
``"value_l1"``, mean ``A_t`` for ``"gae"``) in the order the authors' code applies them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCORE_TRANSFORMS = ("rank", "power")
SCORE_FUNCTIONS = ("value_l1", "gae")


def rank_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``(1 / rank)^(1 / temperature)`` with rank 1 for the highest score (ties: the lower index ranks first)."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return (1.0 / ranks) ** (1.0 / temperature)


def power_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``max(S, 0)^(1 / temperature)`` (proportional prioritisation)."""
    return np.maximum(scores, 0.0) ** (1.0 / temperature)


class LevelSampler:
    """PLR's level sampler over ``levels`` (distinct ints). See the module docstring for the distribution."""

    def __init__(self, levels: Sequence[int], score_transform: str = "rank", temperature: float = 0.1,
                 staleness_coef: float = 0.1, min_seen_fraction: float = 0.0, score_ema: float = 1.0, seed: int = 0):
        if score_transform not in SCORE_TRANSFORMS:
            raise ValueError(f"unknown score_transform {score_transform!r}; expected one of {SCORE_TRANSFORMS}")
        self.levels = np.asarray(levels, dtype=np.int64)
        if len(set(self.levels.tolist())) != len(self.levels) or len(self.levels) == 0:
            raise ValueError("levels must be a non-empty sequence of distinct integers")
        self.index = {int(level): i for i, level in enumerate(self.levels)}
        self.score_transform, self.temperature = score_transform, float(temperature)
        self.staleness_coef, self.min_seen_fraction = float(staleness_coef), float(min_seen_fraction)
        self.score_ema = float(score_ema)
        n = len(self.levels)
        self.scores = np.zeros(n)
        self.seen = np.zeros(n, dtype=bool)
        self.staleness = np.zeros(n)
        self.counts = np.zeros(n, dtype=np.int64)  # times each level was sampled (diagnostics)
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ distribution
    def replay_weights(self) -> np.ndarray:
        """``P_replay [num_levels]``: ``(1 - rho) P_S + rho P_C`` over the seen levels (0 for unseen ones); uniform
        over the seen levels when both parts vanish; all zeros before any level was seen."""
        seen = self.seen
        if not seen.any():
            return np.zeros(len(self.levels))
        weights = np.zeros(len(self.levels))
        transform = rank_weights if self.score_transform == "rank" else power_weights
        h = transform(self.scores[seen], self.temperature)
        if h.sum() > 0:
            weights[seen] = (1.0 - self.staleness_coef) * h / h.sum()
        stale = self.staleness[seen]
        if self.staleness_coef > 0 and stale.sum() > 0:
            weights[seen] += self.staleness_coef * stale / stale.sum()
        total = weights.sum()
        if total <= 0:
            weights[seen] = 1.0
            total = weights.sum()
        return weights / total

    def replay_probability(self) -> float:
        """``P_D``: the probability that the next level is a replay (0 until ``min_seen_fraction`` is reached)."""
        fraction = float(self.seen.mean())
        return fraction if fraction > 0 and fraction >= self.min_seen_fraction else 0.0

    def sample(self) -> int:
        """Draw the next level (and age every level's staleness by one, the drawn one's back to 0)."""
        if self.rng.random() < self.replay_probability():
            i = int(self.rng.choice(len(self.levels), p=self.replay_weights()))
        else:
            unseen = np.flatnonzero(~self.seen)
            i = int(unseen[self.rng.integers(len(unseen))])
        self.staleness += 1.0
        self.staleness[i] = 0.0
        self.counts[i] += 1
        return int(self.levels[i])

    def update(self, level: int, score: float) -> None:
        """``S_i <- (1 - alpha) S_i + alpha score`` (alpha = ``score_ema``, 1 in the paper) and mark level i seen."""
        i = self.index[int(level)]
        self.scores[i] = (1.0 - self.score_ema) * self.scores[i] + self.score_ema * float(score)
        self.seen[i] = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"scores": self.scores.copy(), "seen": self.seen.copy(), "staleness": self.staleness.copy(),
                "counts": self.counts.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.scores = np.array(state["scores"], dtype=np.float64)
        self.seen = np.array(state["seen"], dtype=bool)
        self.staleness = np.array(state["staleness"], dtype=np.float64)
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.rng.bit_generator.state = state["rng"]


def segment_scores(advantages: np.ndarray, valid: np.ndarray, ends: np.ndarray, levels: np.ndarray,
                   kind: str = "value_l1") -> list[tuple[int, float, int]]:
    """Scores of the episode segments of one rollout: ``[(level, score, steps), ...]``.

    ``advantages`` float ``[T, B]`` (GAE, before normalisation), ``valid, ends`` bool ``[T, B]``, ``levels`` int
    ``[T, B]`` (the level each step was played on). A segment is a maximal run of valid steps of one env that
    no episode end cuts; its score is ``mean |A_t|`` (``"value_l1"``) or ``mean A_t`` (``"gae"``) over its steps.
    Order (the authors' code): every segment that ends its episode inside the rollout, env by env in time
    order; then the segments still running at the rollout's end, env by env.
    """
    if kind not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown score {kind!r}; expected one of {SCORE_FUNCTIONS}")
    values = np.abs(advantages) if kind == "value_l1" else advantages
    finished, running = [], []
    T, B = valid.shape
    for b in range(B):
        start = None
        for t in range(T):
            if not valid[t, b]:
                start = None
                continue
            if start is None:
                start = t
            if ends[t, b]:
                finished.append((int(levels[start, b]), float(values[start:t + 1, b].mean()), t + 1 - start))
                start = None
        if start is not None:
            running.append((int(levels[start, b]), float(values[start:, b].mean()), T - start))
    return finished + running
