"""Tests for aclab.envs.normalize against slow, independent references."""

from __future__ import annotations

import numpy as np
import pytest

from aclab.envs.normalize import ObsNormalizer, RewardScaler, RunningMeanStd


@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
def test_running_mean_std_matches_numpy_on_concatenated_data(shape):
    rng = np.random.default_rng(0)
    rms = RunningMeanStd(shape)
    batches = []
    for size in [1, 5, 1, 17, 3, 64, 2]:
        batch = rng.normal(3.0, 2.0, size=(size, *shape)) * rng.uniform(0.5, 5.0)
        batches.append(batch)
        rms.update(batch)
        data = np.concatenate(batches)
        np.testing.assert_allclose(rms.mean, data.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rms.var, data.var(axis=0), rtol=1e-10, atol=1e-12)
        assert rms.count == len(data)


def test_running_mean_std_large_offset_is_stable():
    # Chan's merge keeps precision where the naive E[x^2] - E[x]^2 would cancel catastrophically.
    rng = np.random.default_rng(1)
    rms = RunningMeanStd(())
    data = 1e8 + rng.normal(size=(50, 8))
    for batch in data:
        rms.update(batch)
    np.testing.assert_allclose(rms.var, data.reshape(-1).var(), rtol=1e-6)


def test_running_mean_std_initial_and_state_dict():
    rms = RunningMeanStd((2,))
    np.testing.assert_array_equal(rms.mean, 0.0)
    np.testing.assert_array_equal(rms.var, 1.0)
    rms.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
    other = RunningMeanStd((2,))
    other.load_state_dict(rms.state_dict())
    np.testing.assert_array_equal(other.mean, rms.mean)
    np.testing.assert_array_equal(other.var, rms.var)
    assert other.count == rms.count == 2
    with pytest.raises(ValueError, match="shape"):
        RunningMeanStd((3,)).load_state_dict(rms.state_dict())


def test_obs_normalizer_uses_statistics_including_current_batch_and_clips():
    rng = np.random.default_rng(2)
    norm = ObsNormalizer((3,), clip=2.0)
    seen = []
    for t in range(20):
        obs = rng.normal(size=(4, 3)).astype(np.float32) * np.array([1.0, 10.0, 0.1], dtype=np.float32)
        if t == 10:
            obs[0] = 1e3  # an outlier: must be clipped
        seen.append(obs.astype(np.float64))
        out = norm(obs)
        data = np.concatenate(seen)
        expected = np.clip((obs - data.mean(0)) / np.sqrt(data.var(0) + 1e-8), -2.0, 2.0)
        assert out.dtype == np.float32 and out.shape == (4, 3)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        if t == 10:
            assert np.abs(out).max() == pytest.approx(2.0)
    assert np.abs(norm.normalize(np.full((1, 3), 1e6, dtype=np.float32))).max() == pytest.approx(2.0)


def test_obs_normalizer_frozen_and_copy_from():
    train = ObsNormalizer((2,))
    for _ in range(5):
        train(np.random.default_rng(3).normal(5.0, 3.0, size=(8, 2)).astype(np.float32))
    evaluation = ObsNormalizer((2,))
    evaluation.copy_from(train)
    evaluation.update = False
    before = evaluation.state_dict()
    x = np.full((3, 2), 100.0, dtype=np.float32)
    out = evaluation(x)
    after = evaluation.state_dict()
    np.testing.assert_array_equal(before["rms"]["mean"], after["rms"]["mean"])
    assert before["rms"]["count"] == after["rms"]["count"] == train.rms.count
    np.testing.assert_allclose(out, train.normalize(x))
    with pytest.raises(ValueError):
        ObsNormalizer((2,), clip=0.0)


def _reference_reward_scaling(rewards, dones, valids, gamma, clip, eps=1e-8):
    """Slow reference: python loops, variance of every valid discounted return seen so far (np.var)."""
    steps, num_envs = rewards.shape
    returns = [0.0] * num_envs
    history: list[float] = []
    out = np.zeros_like(rewards, dtype=np.float64)
    for t in range(steps):
        for b in range(num_envs):
            if valids[t, b]:
                returns[b] = rewards[t, b] + gamma * returns[b]
                history.append(returns[b])
        var = np.var(history) if history else 1.0
        for b in range(num_envs):
            out[t, b] = np.clip(rewards[t, b] / np.sqrt(var + eps), -clip, clip) if valids[t, b] else 0.0
            if dones[t, b]:
                returns[b] = 0.0
    return out


def _random_episode_flags(rng, steps, num_envs, p_done=0.1):
    """Dones at random; the step after a done is an autoreset dummy (reward 0, not valid)."""
    dones = np.zeros((steps, num_envs), dtype=bool)
    valids = np.ones((steps, num_envs), dtype=bool)
    for t in range(steps):
        if t > 0:
            valids[t] = ~dones[t - 1]
        dones[t] = valids[t] & (rng.random(num_envs) < p_done)
    return dones, valids


@pytest.mark.parametrize("gamma,clip", [(0.99, 10.0), (0.9, 1.5)])
def test_reward_scaler_matches_slow_reference(gamma, clip):
    rng = np.random.default_rng(4)
    steps, num_envs = 120, 5
    dones, valids = _random_episode_flags(rng, steps, num_envs)
    rewards = rng.normal(1.0, 3.0, size=(steps, num_envs)).astype(np.float32)
    rewards[~valids] = 0.0
    expected = _reference_reward_scaling(rewards.astype(np.float64), dones, valids, gamma, clip)
    scaler = RewardScaler(num_envs, gamma=gamma, clip=clip)
    got = np.stack([scaler(rewards[t], dones[t], None if valids[t].all() else valids[t]) for t in range(steps)])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert scaler.rms.count == valids.sum()  # dummy steps never enter the statistics
    if clip < 2:
        assert np.abs(got).max() == pytest.approx(clip)  # clipping was exercised


def test_reward_scaler_no_mean_subtraction_and_frozen():
    scaler = RewardScaler(2, gamma=0.0)
    for _ in range(50):
        scaler(np.array([5.0, 7.0], dtype=np.float32), np.zeros(2, bool))
    # gamma=0: c = r, var(c) = 1 -> scaled reward is r / 1, not (r - 6) / 1
    np.testing.assert_allclose(scaler.scale(np.array([5.0, 7.0])), [5.0, 7.0], rtol=1e-6)
    scaler.update = False
    count = scaler.rms.count
    scaler(np.array([100.0, -100.0], dtype=np.float32), np.zeros(2, bool))
    assert scaler.rms.count == count
    other = RewardScaler(2)
    other.copy_from(scaler)
    assert other.rms.var == scaler.rms.var and other.gamma == 0.0


def test_reward_scaler_state_dict_round_trip():
    scaler = RewardScaler(3, gamma=0.95, clip=4.0)
    rng = np.random.default_rng(5)
    for _ in range(10):
        scaler(rng.normal(size=3).astype(np.float32), rng.random(3) < 0.2)
    clone = RewardScaler(3)
    clone.load_state_dict(scaler.state_dict())
    r, d = rng.normal(size=3).astype(np.float32), np.zeros(3, bool)
    np.testing.assert_array_equal(clone(r, d), scaler(r, d))
    fresh = RewardScaler(3)
    fresh.load_state_dict(scaler.state_dict(), restore_returns=False)
    np.testing.assert_array_equal(fresh.returns, 0.0)
    with pytest.raises(ValueError, match="num_envs"):
        RewardScaler(4).load_state_dict(scaler.state_dict())
