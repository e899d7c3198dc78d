"""RLiable wrappers against the spec's test values and slow NumPy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aclab.evaluate import stats

SPEC_X = [[1, 2], [2, 2], [1, 1], [2, 1]]
SPEC_Y = [[1, 1], [2, 2], [3, 3]]


# ----------------------------------------------------------------------------------------------
# Slow references (loops, no scipy / rliable)
# ----------------------------------------------------------------------------------------------
def slow_iqm(scores: np.ndarray) -> float:
    """25%-trimmed mean over all runs x tasks: drop int(0.25 n) values at each end of the sorted list."""
    values = sorted(float(v) for v in np.asarray(scores).ravel())
    cut = int(0.25 * len(values))
    kept = values[cut : len(values) - cut]
    return sum(kept) / len(kept)


def slow_poi(x: np.ndarray, y: np.ndarray) -> float:
    """Average over tasks of (#pairs x > y + 0.5 #ties) / (N_x N_y)."""
    per_task = []
    for m in range(x.shape[1]):
        wins = 0.0
        for a in x[:, m]:
            for b in y[:, m]:
                wins += 1.0 if a > b else (0.5 if a == b else 0.0)
        per_task.append(wins / (x.shape[0] * y.shape[0]))
    return sum(per_task) / len(per_task)


def slow_task_means(scores: np.ndarray) -> list[float]:
    return [sum(scores[:, m]) / scores.shape[0] for m in range(scores.shape[1])]


# ----------------------------------------------------------------------------------------------
# Point estimates
# ----------------------------------------------------------------------------------------------
def test_spec_values():
    agg = stats.aggregate_point_estimates(SPEC_X)
    assert agg["median"] == pytest.approx(1.5)
    assert agg["mean"] == pytest.approx(1.5)
    assert agg["iqm"] == pytest.approx(1.5)
    assert stats.probability_of_improvement(SPEC_X, SPEC_Y) == pytest.approx(1 / 3)
    assert slow_poi(np.array(SPEC_X, float), np.array(SPEC_Y, float)) == pytest.approx(1 / 3)


@pytest.mark.parametrize("shape", [(4, 3), (5, 7), (10, 1), (3, 2)])
def test_aggregates_match_slow_reference(shape):
    rng = np.random.default_rng(sum(shape))
    scores = rng.gamma(2.0, 0.4, size=shape)
    agg = stats.aggregate_point_estimates(scores, gamma=1.0)
    assert agg["iqm"] == pytest.approx(slow_iqm(scores))
    means = slow_task_means(scores)
    assert agg["mean"] == pytest.approx(sum(means) / len(means))
    ordered = sorted(means)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    assert agg["median"] == pytest.approx(median)
    gap = 1.0 - sum(min(v, 1.0) for v in scores.ravel()) / scores.size
    assert agg["optimality_gap"] == pytest.approx(gap)


def test_optimality_gap_threshold():
    scores = np.array([[50.0, 150.0], [100.0, 20.0]])
    agg = stats.aggregate_point_estimates(scores, metrics=["optimality_gap"], gamma=100.0)
    assert agg == {"optimality_gap": pytest.approx(100.0 - (50 + 100 + 100 + 20) / 4)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probability_of_improvement_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=(6, 4)).astype(float)  # small integers: many ties
    y = rng.integers(0, 5, size=(4, 4)).astype(float)
    assert stats.probability_of_improvement(x, y) == pytest.approx(slow_poi(x, y))
    assert stats.probability_of_improvement(x, y) + stats.probability_of_improvement(y, x) == pytest.approx(1.0)
    assert stats.probability_of_improvement(x, x) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vectorised_poi_equals_rliable(seed):
    from rliable import metrics as rly_metrics

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(5, 6)).astype(float)
    y = rng.integers(0, 4, size=(3, 6)).astype(float)
    assert stats.probability_of_improvement_vectorised(x, y) == pytest.approx(
        rly_metrics.probability_of_improvement(x, y)
    )
    assert stats.probability_of_improvement_vectorised(x, x) == pytest.approx(0.5)
    continuous = rng.normal(size=(4, 3))
    assert stats.probability_of_improvement_vectorised(continuous, continuous + 0.1) == pytest.approx(
        rly_metrics.probability_of_improvement(continuous, continuous + 0.1)
    )


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals
# ----------------------------------------------------------------------------------------------
def test_intervals_equal_an_independent_stratified_bootstrap():
    """Resample runs within each task with NumPy's global generator seeded as the wrapper seeds it (the
    draws rliable makes), take the 2.5/97.5 percentiles: the wrapper's CIs must be exactly these."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4))
    reps, seed = 300, 7
    result = stats.aggregate_intervals({"x": x}, metrics=["iqm", "mean"], reps=reps, seed=seed)["x"]
    np.random.seed(seed)
    replicates = []
    for _ in range(reps):
        index = np.random.choice(5, (5, 4), replace=True)
        resampled = x[index, np.arange(4)[None, :]]
        replicates.append([slow_iqm(resampled), float(np.mean(slow_task_means(resampled)))])
    lower, upper = np.percentile(np.array(replicates), [2.5, 97.5], axis=0)
    assert result["iqm"].lower == pytest.approx(lower[0]) and result["iqm"].upper == pytest.approx(upper[0])
    assert result["mean"].lower == pytest.approx(lower[1]) and result["mean"].upper == pytest.approx(upper[1])
    assert result["iqm"].point == pytest.approx(slow_iqm(x))


def test_intervals_reproducible_and_restore_global_state():
    rng = np.random.default_rng(0)
    data = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=(4, 3)) + 1.0}
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = stats.aggregate_intervals(data, reps=200, seed=5)
    assert np.random.rand() == expected_next  # the global generator's state was restored
    second = stats.aggregate_intervals(data, reps=200, seed=5)
    third = stats.aggregate_intervals(data, reps=200, seed=6)
    assert first == second
    assert first != third
    for algo in data:
        for interval in first[algo].values():
            assert interval.lower <= interval.point + 1e-12 <= interval.upper + 2e-12


def test_spec_values_through_the_interval_api():
    result = stats.aggregate_intervals({"x": SPEC_X, "y": SPEC_Y}, reps=100, seed=0)
    for name in ("median", "mean", "iqm"):
        assert result["x"][name].point == pytest.approx(1.5)
    poi = stats.probability_of_improvement_intervals({"x": SPEC_X, "y": SPEC_Y}, reps=100, seed=0)
    assert list(poi) == [("x", "y")]
    assert poi[("x", "y")].point == pytest.approx(1 / 3)
    assert 0.0 <= poi[("x", "y")].lower <= 1 / 3 <= poi[("x", "y")].upper <= 1.0


def test_poi_intervals_equal_an_independent_bootstrap():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(5, 3)) + 0.5, rng.normal(size=(4, 3))
    reps, seed = 150, 2
    got = stats.probability_of_improvement_intervals({"x": x, "y": y}, reps=reps, seed=seed)[("x", "y")]
    np.random.seed(seed)
    replicates = []
    for _ in range(reps):
        xi = x[np.random.choice(5, (5, 3)), np.arange(3)[None, :]]
        yi = y[np.random.choice(4, (4, 3)), np.arange(3)[None, :]]
        replicates.append(slow_poi(xi, yi))
    lower, upper = np.percentile(replicates, [2.5, 97.5])
    assert got.point == pytest.approx(slow_poi(x, y))
    assert got.lower == pytest.approx(lower) and got.upper == pytest.approx(upper)


def test_poi_pairs_default_and_explicit():
    data = {"a": [[1.0], [2.0]], "b": [[0.0], [1.0]], "c": [[3.0], [4.0]]}
    poi = stats.probability_of_improvement_intervals(data, reps=20)
    assert list(poi) == list(itertools.combinations("abc", 2))
    assert poi[("a", "b")].point == pytest.approx(3.5 / 4)  # 1>0, 1=1 (1/2), 2>0, 2>1
    assert poi[("b", "c")].point == pytest.approx(0.0)
    only = stats.probability_of_improvement_intervals(data, [("c", "a")], reps=20)
    assert only[("c", "a")].point == pytest.approx(1.0)
    with pytest.raises(stats.StatsError, match="unknown algorithm 'd'"):
        stats.probability_of_improvement_intervals(data, [("a", "d")], reps=20)
    with pytest.raises(stats.StatsError, match="at least two"):
        stats.probability_of_improvement_intervals({"a": [[1.0]]}, reps=20)


# ----------------------------------------------------------------------------------------------
# Performance profiles
# ----------------------------------------------------------------------------------------------
def test_performance_profiles_match_reference():
    rng = np.random.default_rng(4)
    data = {"a": rng.uniform(size=(5, 3)), "b": rng.uniform(size=(3, 3)) + 0.2}
    taus = np.linspace(0.0, 1.2, 13)
    profiles = stats.performance_profiles(data, taus, reps=50, seed=0)
    for algo, scores in data.items():
        expected = [sum(1 for v in scores.ravel() if v > t) / scores.size for t in taus]
        np.testing.assert_allclose(profiles.profiles[algo], expected)
        assert np.all(np.diff(profiles.profiles[algo]) <= 0)
        assert np.all(profiles.lower[algo] <= profiles.profiles[algo] + 1e-12)
        assert np.all(profiles.upper[algo] >= profiles.profiles[algo] - 1e-12)
    default = stats.performance_profiles(data, reps=20)
    assert default.taus.size == 101


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def test_mismatched_task_counts():
    with pytest.raises(stats.StatsError, match=r"same tasks; task counts differ: \{'a': 2, 'b': 3\}"):
        stats.aggregate_intervals({"a": np.ones((3, 2)), "b": np.ones((3, 3))}, reps=10)
    with pytest.raises(stats.StatsError, match="task counts differ"):
        stats.probability_of_improvement(np.ones((3, 2)), np.ones((3, 3)))


def test_other_bad_inputs():
    with pytest.raises(stats.StatsError, match="empty"):
        stats.aggregate_intervals({}, reps=10)
    with pytest.raises(stats.StatsError, match=r"\[runs, tasks\] matrix"):
        stats.aggregate_point_estimates([1.0, 2.0])
    with pytest.raises(stats.StatsError, match="NaN"):
        stats.aggregate_point_estimates([[1.0, np.nan]])
    with pytest.raises(stats.StatsError, match="unknown aggregate 'mode'"):
        stats.aggregate_point_estimates([[1.0]], metrics=["mode"])
    with pytest.raises(stats.StatsError, match="reps"):
        stats.aggregate_intervals({"a": [[1.0]]}, reps=0)
    assert isinstance(stats.StatsError("x"), ValueError)


def test_one_task_helpers_give_the_mean_and_p_of_improvement_of_plain_run_lists():
    """mean_interval / improvement_interval take [runs] lists (the results scripts' use): the point is the plain
    mean and the Mann-Whitney P(X > Y) counted by hand; the interval holds the point."""
    x, y = [3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 2.0, 0.5, 6.0]
    mean = stats.mean_interval(x)
    assert mean.point == pytest.approx(np.mean(x)) and mean.lower <= mean.point <= mean.upper
    by_hand = np.mean([(a > b) + 0.5 * (a == b) for a in x for b in y])
    poi = stats.improvement_interval(x, y)
    assert poi.point == pytest.approx(by_hand) and poi.lower <= poi.point <= poi.upper
    assert poi.text(".2f") == f"{poi.point:.2f} [{poi.lower:.2f}, {poi.upper:.2f}]" and str(mean).count("[") == 1
