"""Aggregate statistics with bootstrap confidence intervals: thin wrappers over ``rliable``.

Conventions (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"):

* A score matrix has shape ``[runs, tasks]``: ``scores[n, m]`` is the (normalised) final score of run
  ``n`` on task ``m``. Row ``n`` of different tasks need not be the same seed; only the task axis is
  paired. A ``score_dict`` maps an algorithm name to its matrix; all matrices must have the same number
  of tasks (in the same order), the run counts may differ.
* Aggregates: ``median`` and ``mean`` of the per-task means; ``iqm`` = 25%-trimmed mean over all
  runs x tasks pooled; ``optimality_gap`` = ``gamma - mean(min(scores, gamma))`` (lower is better).
* Confidence intervals: stratified percentile bootstrap (runs resampled with replacement within each
  task), 95% by default.
* Probability of improvement ``P(X > Y)``: per task the Mann-Whitney U statistic over ``N_x * N_y``
  (ties count 1/2), averaged over tasks.
* Performance profile: fraction of all runs x tasks with score ``> tau``.

Reproducibility: rliable's bootstrap draws its indices from NumPy's *global* generator (not from its
``random_state``), so every function here seeds both (``random_state=RandomState(seed)`` and
``np.random.seed(seed)``) and restores the global generator's previous state afterwards.

Compatibility: rliable 1.2.0 passes ``random_state`` to ``arch``'s bootstrap, which ``arch >= 8`` no
longer accepts, and ``arch < 8`` does not import with ``pandas >= 3``; the working set is
``arch < 8`` with ``pandas < 3`` (:func:`rliable_library` raises :class:`StatsError` saying so).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rliable import metrics as rly_metrics

AGGREGATES: tuple[str, ...] = ("median", "iqm", "mean", "optimality_gap")
RLIABLE_FIX = "pip install 'arch>=6,<8' 'pandas<3'"


class StatsError(ValueError):
    """Invalid input to a statistic (shape, task counts, non-finite values) or an unusable rliable."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval ``[lower, upper]``."""

    point: float
    lower: float
    upper: float

    def __str__(self) -> str:
        return self.text(".3g")

    def text(self, fmt: str) -> str:
        """``"point [lower, upper]"`` with each number formatted by ``fmt`` (e.g. ``".2f"``)."""
        return f"{self.point:{fmt}} [{self.lower:{fmt}}, {self.upper:{fmt}}]"


@dataclass
class PerformanceProfiles:
    """Score distributions: ``profiles[algo][i]`` = fraction of runs x tasks with score > ``taus[i]``."""

    taus: np.ndarray
    profiles: dict[str, np.ndarray]
    lower: dict[str, np.ndarray]
    upper: dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------
def rliable_library():
    """Import ``rliable.library`` (bootstrap machinery); StatsError with the fix if it cannot be used."""
    try:
        from rliable import library
    except Exception as exc:  # noqa: BLE001 - any import failure of its arch/pandas stack
        raise StatsError(
            f"rliable's bootstrap (rliable.library) does not import: {exc!r}. rliable 1.2.0 needs "
            f"arch < 8 with pandas < 3: {RLIABLE_FIX}"
        ) from exc
    return library


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[np.random.RandomState]:
    """Seed NumPy's global generator for the block (restoring its state after); yield a RandomState."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield np.random.RandomState(seed)
    finally:
        np.random.set_state(saved)


def validate_score_dict(score_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check ``{algo: [runs, tasks]}`` and return float64 copies; StatsError naming what is wrong."""
    if not score_dict:
        raise StatsError("no scores: the score dict is empty")
    out: dict[str, np.ndarray] = {}
    for algo, scores in score_dict.items():
        arr = np.array(scores, dtype=np.float64)
        if arr.ndim != 2:
            raise StatsError(f"scores of {algo!r} must be a [runs, tasks] matrix, got shape {arr.shape}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise StatsError(f"scores of {algo!r} are empty (shape {arr.shape})")
        if not np.all(np.isfinite(arr)):
            raise StatsError(f"scores of {algo!r} contain NaN or infinite values")
        out[str(algo)] = arr
    task_counts = {algo: arr.shape[1] for algo, arr in out.items()}
    if len(set(task_counts.values())) > 1:
        raise StatsError(f"all algorithms must be scored on the same tasks; task counts differ: {task_counts}")
    return out


def _aggregate_function(name: str, gamma: float) -> Callable[[np.ndarray], float]:
    if name == "median":
        return rly_metrics.aggregate_median
    if name == "mean":
        return rly_metrics.aggregate_mean
    if name == "iqm":
        return rly_metrics.aggregate_iqm
    if name == "optimality_gap":
        return lambda scores: rly_metrics.aggregate_optimality_gap(scores, gamma=gamma)
    raise StatsError(f"unknown aggregate {name!r}; valid: {', '.join(AGGREGATES)}")


def _interval_estimates(
    score_dict: Mapping[str, Any], func: Callable, *, reps: int, confidence: float, seed: int
) -> tuple[dict, dict]:
    """rliable.library.get_interval_estimates under :func:`seeded_numpy`."""
    library = rliable_library()
    if reps < 1:
        raise StatsError(f"reps must be >= 1, got {reps}")
    if not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must be in (0, 1), got {confidence}")
    with seeded_numpy(seed) as random_state, warnings.catch_warnings():
        # arch 7 warns that its random_state argument (passed by rliable) is deprecated.
        warnings.filterwarnings("ignore", message=".*random_state.*", category=FutureWarning)
        try:
            return library.get_interval_estimates(
                score_dict, func, reps=reps, confidence_interval_size=confidence, random_state=random_state
            )
        except TypeError as exc:
            if "random_state" in str(exc):
                raise StatsError(
                    f"rliable's bootstrap is incompatible with the installed arch ({exc}); {RLIABLE_FIX}"
                ) from exc
            raise


# ----------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------
def aggregate_point_estimates(
    scores: Any, *, metrics: Sequence[str] = AGGREGATES, gamma: float = 1.0
) -> dict[str, float]:
    """Aggregates of one ``[runs, tasks]`` matrix (no bootstrap): ``{metric: value}``."""
    arr = validate_score_dict({"scores": scores})["scores"]
    return {name: float(_aggregate_function(name, gamma)(arr)) for name in metrics}


def aggregate_intervals(
    score_dict: Mapping[str, Any],
    *,
    metrics: Sequence[str] = AGGREGATES,
    gamma: float = 1.0,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Interval]]:
    """Aggregates with stratified-bootstrap CIs: ``{algo: {metric: Interval}}``.

    ``gamma`` is the optimality-gap threshold in the units of the scores (1.0 for min-max normalised
    scores, 100.0 for human-normalised scores in percent). rliable's default is 50000 reps; 2000 keeps
    a report fast with interval ends stable to about 1% of their width.
    """
    data = validate_score_dict(score_dict)
    funcs = [_aggregate_function(name, gamma) for name in metrics]

    def all_aggregates(scores: np.ndarray) -> np.ndarray:
        return np.array([f(scores) for f in funcs])

    points, intervals = _interval_estimates(data, all_aggregates, reps=reps, confidence=confidence, seed=seed)
    return {
        algo: {
            name: Interval(float(points[algo][i]), float(intervals[algo][0, i]), float(intervals[algo][1, i]))
            for i, name in enumerate(metrics)
        }
        for algo in data
    }


def mean_interval(values: Any, *, reps: int = 2000, seed: int = 0) -> Interval:
    """The mean of one set of runs on one task (``values`` [runs]) with its 95% bootstrap CI."""
    return aggregate_intervals({"x": np.asarray(values, float)[:, None]}, metrics=("mean",), reps=reps,
                               seed=seed)["x"]["mean"]


# ----------------------------------------------------------------------------------------------
# Probability of improvement
# ----------------------------------------------------------------------------------------------
def probability_of_improvement(scores_x: Any, scores_y: Any) -> float:
    """``P(X > Y)`` averaged over tasks (rliable's Mann-Whitney estimate; ties count 1/2).

    ``scores_x`` is ``[runs_x, tasks]``, ``scores_y`` is ``[runs_y, tasks]``.
    """
    data = validate_score_dict({"X": scores_x, "Y": scores_y})
    return float(rly_metrics.probability_of_improvement(data["X"], data["Y"]))


def probability_of_improvement_vectorised(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """The estimator of ``rliable.metrics.probability_of_improvement`` in one NumPy expression.

    ``mean_m [ (#{x_i > y_j} + 0.5 #{x_i = y_j}) / (N_x N_y) ]`` over tasks ``m``: the Mann-Whitney U
    statistic rliable gets from scipy, including its identical-columns case (0.5). Used inside the
    bootstrap, where calling scipy per task and replication dominates the run time (about 100x slower).
    """
    x, y = scores_x[:, None, :], scores_y[None, :, :]  # [N_x, 1, tasks], [1, N_y, tasks]
    wins = (x > y).mean(axis=(0, 1)) + 0.5 * (x == y).mean(axis=(0, 1))
    return float(wins.mean())


def probability_of_improvement_intervals(
    score_dict: Mapping[str, Any],
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    reps: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[tuple[str, str], Interval]:
    """``P(X > Y)`` with bootstrap CIs for each pair ``(X, Y)``: ``{(X, Y): Interval}``.

    ``pairs`` defaults to every unordered pair in the dict's order (``(a, b)`` for ``a`` before ``b``).
    Runs of X and Y are resampled independently within each task (rliable's
    StratifiedIndependentBootstrap); each replicate uses :func:`probability_of_improvement_vectorised`.
    """
    data = validate_score_dict(score_dict)
    if pairs is None:
        pairs = list(itertools.combinations(data, 2))
    if not pairs:
        raise StatsError("probability of improvement needs at least two algorithms")
    for x, y in pairs:
        for name in (x, y):
            if name not in data:
                raise StatsError(f"unknown algorithm {name!r} in pair ({x!r}, {y!r}); known: {list(data)}")
    pair_dict = {f"{x}\x00{y}": [data[x], data[y]] for x, y in pairs}

    def poi(scores_x: np.ndarray, scores_y: np.ndarray) -> np.ndarray:
        return np.array([probability_of_improvement_vectorised(scores_x, scores_y)])

    points, intervals = _interval_estimates(pair_dict, poi, reps=reps, confidence=confidence, seed=seed)
    return {
        (x, y): Interval(
            float(points[f"{x}\x00{y}"][0]),
            float(intervals[f"{x}\x00{y}"][0, 0]),
            float(intervals[f"{x}\x00{y}"][1, 0]),
        )
        for x, y in pairs
    }


def improvement_interval(x: Any, y: Any, *, reps: int = 2000, seed: int = 0) -> Interval:
    """``P(X > Y)`` for two sets of runs on one task (``x`` [runs_x], ``y`` [runs_y]) with its 95% bootstrap CI."""
    return probability_of_improvement_intervals(
        {"x": np.asarray(x, float)[:, None], "y": np.asarray(y, float)[:, None]}, reps=reps, seed=seed)[("x", "y")]


# ----------------------------------------------------------------------------------------------
# Performance profiles
# ----------------------------------------------------------------------------------------------
def performance_profiles(
    score_dict: Mapping[str, Any],
    taus: Any = None,
    *,
    num_taus: int = 101,
    reps: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PerformanceProfiles:
    """Score distributions (fraction of runs x tasks with score > tau) with bootstrap CIs.

    ``taus`` defaults to ``num_taus`` points spanning the pooled scores' range.
    """
    data = validate_score_dict(score_dict)
    if taus is None:
        pooled = np.concatenate([a.ravel() for a in data.values()])
        low, high = float(pooled.min()), float(pooled.max())
        taus = np.linspace(low, high if high > low else low + 1.0, num_taus)
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or taus.size < 1:
        raise StatsError(f"taus must be a non-empty 1-D array, got shape {taus.shape}")
    library = rliable_library()
    with seeded_numpy(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random_state.*", category=FutureWarning)
        profiles, cis = library.create_performance_profile(data, taus, reps=reps, confidence_interval_size=confidence)
    return PerformanceProfiles(
        taus=taus,
        profiles={a: np.asarray(profiles[a], dtype=np.float64) for a in data},
        lower={a: np.asarray(cis[a][0], dtype=np.float64) for a in data},
        upper={a: np.asarray(cis[a][1], dtype=np.float64) for a in data},
    )
