"""Tests of aclab.analysis.value_bias against hand-computed returns and an independent episode simulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aclab.analysis.value_bias import (
    EpisodeStart,
    EpisodeStartTracker,
    discounted_return,
    value_bias,
    value_bias_from_episodes,
    value_bias_from_starts,
)


def test_discounted_return_and_bias_by_hand() -> None:
    assert discounted_return([1.0, 2.0, 3.0], 0.5) == pytest.approx(1.0 + 0.5 * 2.0 + 0.25 * 3.0)  # 2.75
    assert discounted_return([], 0.9) == 0.0
    assert discounted_return(torch.tensor([0.0, 0.0, 10.0]), 0.9) == pytest.approx(8.1)
    result = value_bias_from_episodes([[1.0, 2.0, 3.0], [2.0]], [3.0, 1.0], gamma=0.5)
    # pairs (3, 2.75) and (1, 2): bias = (0.25 - 1) / 2
    assert result.bias == pytest.approx(-0.375)
    assert (result.mean_value, result.mean_return) == pytest.approx((2.0, 2.375))
    np.testing.assert_allclose(result.returns, [2.75, 2.0])
    assert result.num_episodes == 2 and result.num_truncated_excluded == 0


def test_truncation_rules() -> None:
    values, returns, truncated, boot = [1.0, 5.0, 2.0], [0.0, 1.0, 4.0], [False, True, False], [9.0, 0.5, 9.0]
    # default: the truncated episode stays, with gamma^L V(s_L) added to its partial return (1 + 0.5)
    result = value_bias(values, returns, truncated=truncated, bootstrap=boot)
    assert result.bias == pytest.approx(((1.0 - 0.0) + (5.0 - 1.5) + (2.0 - 4.0)) / 3)
    assert result.num_episodes == 3 and result.num_truncated == 1 and result.num_truncated_excluded == 0
    np.testing.assert_allclose(result.returns, [0.0, 1.5, 4.0])  # bootstraps of complete episodes unused
    excluded = value_bias(values, returns, truncated=truncated, truncation="exclude")
    assert excluded.bias == pytest.approx(((1.0 - 0.0) + (2.0 - 4.0)) / 2)
    assert excluded.num_episodes == 2 and excluded.num_truncated_excluded == 1 and excluded.num_truncated == 0
    partial = value_bias(values, returns, truncated=truncated, truncation="partial")
    assert partial.bias == pytest.approx((1.0 + 4.0 - 2.0) / 3) and partial.num_truncated == 1
    empty = value_bias([1.0], [2.0], truncated=[True], truncation="exclude")
    assert math.isnan(empty.bias) and empty.num_episodes == 0
    with pytest.raises(ValueError, match="bootstrap"):
        value_bias(values, returns, truncated=truncated)
    with pytest.raises(ValueError, match="nan"):
        value_bias(values, returns, truncated=truncated, bootstrap=[0.0, math.nan, 0.0])
    with pytest.raises(ValueError, match="unknown truncation rule"):
        value_bias(values, returns, truncation="drop")


def test_tracker_on_a_hand_written_rollout_with_autoreset_dummies() -> None:
    # env 0: episode A = steps 0-2 (rewards 1, 1, 1, terminated), dummy at 3, episode B starts at 4
    #        (rewards 2, 0, truncated at 5), dummy at 6, episode C starts at 7 and is still running.
    # env 1: episode D = step 0 only (reward 5, terminated), dummy at 1, episode E = steps 2-6
    #        (rewards 0, 0, 0, 0, 1, terminated), dummy at 7.
    gamma = 0.5
    # 9 value rows: row t + 1 is the observation after step t (row 6 = B's final observation, a dummy row)
    values = np.array([[10, 20], [11, 21], [12, 22], [13, 23], [14, 24], [15, 25], [16, 26], [17, 27],
                       [18, 28]], float)
    rewards = np.array([[1, 5], [1, 0], [1, 0], [0, 0], [2, 0], [0, 0], [0, 1], [3, 0]], float)
    ends = np.array([[0, 1], [0, 0], [1, 0], [0, 0], [0, 0], [1, 0], [0, 1], [0, 0]], bool)
    terminated = np.array([[0, 1], [0, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 1], [0, 0]], bool)
    valid = np.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1], [0, 1], [1, 0]], bool)
    tracker = EpisodeStartTracker(num_envs=2, gamma=gamma)
    finished = tracker.feed_rollout(values, rewards, ends, valid, terminated)
    assert finished == [
        EpisodeStart(value=20.0, discounted_return=5.0, length=1, truncated=False, env_index=1),  # D
        EpisodeStart(value=10.0, discounted_return=1 + 0.5 + 0.25, length=3, truncated=False, env_index=0),  # A
        EpisodeStart(value=14.0, discounted_return=2.0, length=2, truncated=True, env_index=0,
                     bootstrap=0.5**2 * 16.0),  # B, cut after 2 steps: gamma^2 V(final obs)
        EpisodeStart(value=22.0, discounted_return=0.5**4, length=5, truncated=False, env_index=1),  # E
    ]
    (still_open,) = tracker.open_episodes()  # C
    assert (still_open.value, still_open.discounted_return, still_open.truncated) == (17.0, 3.0, True)
    assert math.isnan(still_open.bootstrap)
    result = value_bias_from_starts(finished, truncation="exclude")
    assert result.num_episodes == 3 and result.num_truncated_excluded == 1
    assert result.bias == pytest.approx(((20 - 5) + (10 - 1.75) + (22 - 0.5**4)) / 3)
    assert value_bias_from_starts(finished, last=1).bias == pytest.approx(22 - 0.5**4)
    boot = value_bias_from_starts(finished)  # default: B kept with 2 + 0.25 * 16
    assert boot.num_episodes == 4 and boot.num_truncated == 1
    assert boot.bias == pytest.approx(((20 - 5) + (10 - 1.75) + (14 - 6.0) + (22 - 0.5**4)) / 4)
    assert value_bias_from_starts(finished, truncation="partial").bias == pytest.approx(
        ((20 - 5) + (10 - 1.75) + (14 - 2.0) + (22 - 0.5**4)) / 4)

    # without `terminated` every end counts as a termination; torch inputs work as well
    plain = EpisodeStartTracker(2, gamma).feed_rollout(
        torch.tensor(values), torch.tensor(rewards), torch.tensor(ends), torch.tensor(valid)
    )
    assert [s.truncated for s in plain] == [False] * 4
    assert [s.discounted_return for s in plain] == [s.discounted_return for s in finished]


def test_tracker_waits_for_a_seen_start_when_envs_are_not_fresh() -> None:
    tracker = EpisodeStartTracker(num_envs=1, gamma=1.0, fresh_envs=False)
    values = np.array([[1.0], [2.0], [3.0], [4.0]])
    rewards = np.array([[1.0], [1.0], [1.0], [1.0]])
    ends = np.array([[True], [False], [True], [False]])
    finished = tracker.feed_rollout(values, rewards, ends)  # same-step autoreset: no dummies
    assert finished == [EpisodeStart(value=2.0, discounted_return=2.0, length=2, truncated=False, env_index=0)]


def simulate(num_envs: int, num_steps: int, gamma: float, seed: int):
    """Lay random episodes out as a next-step-autoreset collector would; keep the ground truth.

    Returns the per-step arrays and, per env, the list of (V(s_0), G_0, length, truncated) of every
    episode that ended inside the rollout, computed from the episodes' own reward lists, and the bootstrap
    gamma^L V(s_L) of a truncated one (``values`` has T + 1 rows: row t + 1 follows step t).
    """
    rng = np.random.default_rng(seed)
    shape = (num_steps, num_envs)
    values, rewards = rng.normal(size=(num_steps + 1, num_envs)), np.zeros(shape)
    ends, terminated, valid = np.zeros(shape, bool), np.zeros(shape, bool), np.ones(shape, bool)
    truth = []
    for b in range(num_envs):
        t = 0
        while t < num_steps:
            length = int(rng.integers(1, 12))
            episode_rewards = rng.normal(size=length)
            is_truncated = bool(rng.random() < 0.3)
            start_value = values[t, b]
            steps = range(t, min(t + length, num_steps))
            rewards[list(steps), b] = episode_rewards[: len(steps)]
            if t + length <= num_steps:
                last = t + length - 1
                ends[last, b] = True
                terminated[last, b] = not is_truncated
                bootstrap = gamma**length * values[last + 1, b] if is_truncated else 0.0
                truth.append((b, last, start_value, discounted_return(episode_rewards, gamma), length, is_truncated,
                              bootstrap))
                if last + 1 < num_steps:
                    valid[last + 1, b] = False  # the autoreset dummy step
                    rewards[last + 1, b] = rng.normal()  # garbage that must be ignored
            t += length + 1
    truth.sort(key=lambda item: (item[1], item[0]))  # by end step, then env (the tracker's order)
    return values, rewards, ends, terminated, valid, [item[2:] for item in truth]


@pytest.mark.parametrize("split", [None, 7, 30])
def test_tracker_matches_the_simulated_episodes(split: int | None) -> None:
    gamma = 0.9
    values, rewards, ends, terminated, valid, truth = simulate(num_envs=5, num_steps=60, gamma=gamma, seed=3)
    assert len(truth) > 20
    tracker = EpisodeStartTracker(5, gamma)
    if split is None:
        finished = tracker.feed_rollout(values, rewards, ends, valid, terminated)
    else:  # episodes crossing a rollout boundary are carried over
        finished = tracker.feed_rollout(
            values[:split + 1], rewards[:split], ends[:split], valid[:split], terminated[:split]
        )
        finished += tracker.feed_rollout(
            values[split:], rewards[split:], ends[split:], valid[split:], terminated[split:]
        )
    got = [(s.value, s.discounted_return, s.length, s.truncated, s.bootstrap) for s in finished]
    assert len(got) == len(truth)
    for (value, ret, length, truncated, boot), (t_value, t_ret, t_length, t_truncated, t_boot) in zip(got, truth):
        assert value == t_value and length == t_length and truncated == t_truncated
        assert ret == pytest.approx(t_ret, abs=1e-12) and boot == pytest.approx(t_boot, abs=1e-12)
    bias = value_bias_from_starts(finished, truncation="exclude")
    expected = [v - g for v, g, _, truncated, _ in truth if not truncated]
    assert bias.bias == pytest.approx(float(np.mean(expected)), abs=1e-12)
    boot_bias = value_bias_from_starts(finished)
    assert boot_bias.bias == pytest.approx(float(np.mean([v - g - b for v, g, _, _, b in truth])), abs=1e-12)


def test_tracker_rejects_wrong_shapes() -> None:
    tracker = EpisodeStartTracker(3, 0.99)
    with pytest.raises(ValueError, match="must be"):
        tracker.step(np.zeros(2), np.zeros(3), np.zeros(3, bool), np.ones(3, bool))
