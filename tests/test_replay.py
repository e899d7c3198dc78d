"""Replay buffer: ring order, dummy-step masking, termination vs truncation, sampling, checkpoints."""

import io

import numpy as np
import pytest
import torch

from aclab.data.replay import ReplayBuffer, replay_nbytes


def _rows(start: int, n: int, obs_dim: int = 3, action_dim: int = 2):
    """Transitions whose every field encodes its index ``i`` (so order can be checked)."""
    idx = np.arange(start, start + n, dtype=np.float32)
    obs = np.repeat(idx[:, None], obs_dim, axis=1)
    actions = np.repeat(-idx[:, None], action_dim, axis=1)
    return obs, actions, idx * 10.0, obs + 0.5, (idx % 2 == 0)


def test_add_wraps_around_in_order_and_keeps_the_newest():
    buf = ReplayBuffer(5, (3,), np.float32, 2)
    for start in range(0, 12, 3):
        buf.add(*_rows(start, 3))
    assert len(buf) == 5 and buf.pos == 12 % 5 and buf.added == 12
    # rows hold transitions 7..11 at positions (7..11) % 5
    for i in range(7, 12):
        row = i % 5
        assert buf.obs[row, 0] == i and buf.next_obs[row, 0] == i + 0.5
        assert buf.actions[row, 0] == -i and buf.rewards[row] == 10 * i
        assert buf.terminated[row] == float(i % 2 == 0)


def test_add_larger_than_capacity_keeps_last_rows():
    buf = ReplayBuffer(4, (3,), np.float32, 2)
    buf.add(*_rows(0, 10))
    assert buf.obs[:, 0].tolist() == [8, 9, 6, 7] and len(buf) == 4 and buf.added == 10 and buf.pos == 2


def test_invalid_rows_are_skipped():
    buf = ReplayBuffer(10, (3,), np.float32, 2)
    valid = np.array([True, False, True, False])
    stored = buf.add(*_rows(0, 4), valid=valid)
    assert stored == 2 and len(buf) == 2
    assert buf.obs[:2, 0].tolist() == [0.0, 2.0]
    assert buf.add(*_rows(4, 2), valid=np.array([False, False])) == 0 and len(buf) == 2


def test_autoreset_dummies_never_stored_and_truncation_not_terminal():
    """Drive a real env through episode ends: every stored transition is a real step, a time-limit end
    is stored with terminated=0 and next_obs = the true final observation."""
    from aclab.envs import make_env

    envs = make_env("Pendulum-v1", 2, 0, backend="gymnasium", options={"max_episode_steps": 5})
    buf = ReplayBuffer(100, envs.spec.obs_shape, envs.spec.obs_dtype, 1)
    envs.reset(seed=0)
    finals = []
    for _ in range(12):
        obs, valid = envs.obs, ~envs.next_is_dummy
        result = envs.step(np.zeros((2, 1), np.float32))
        buf.add(obs, np.zeros((2, 1), np.float32), result.reward, result.obs, result.terminated, valid)
        finals += [result.obs[b].copy() for b in np.flatnonzero(result.truncated)]
    envs.close()
    # 12 steps x 2 envs, two episode ends per env (steps 5 and 11): 2 dummies each
    assert len(buf) == 24 - 4
    assert buf.terminated[: len(buf)].sum() == 0  # Pendulum only truncates: every row bootstraps
    assert len(finals) == 4
    for final in finals:  # the true final observation is stored as next_obs
        assert (np.abs(buf.next_obs[: len(buf)] - final).sum(1) == 0).any()
    # Pendulum's reward is strictly negative; a dummy step's reward is 0, so none was stored
    assert (buf.rewards[: len(buf)] < 0).all()


def test_sample_is_uniform_over_filled_rows_and_returns_tensors():
    buf = ReplayBuffer(100, (3,), np.float32, 2)
    buf.add(*_rows(0, 20))
    rng = np.random.default_rng(0)
    batch = buf.sample(20_000, rng)
    assert isinstance(batch.obs, torch.Tensor) and batch.obs.shape == (20_000, 3) and batch.actions.shape == (20_000, 2)
    assert batch.rewards.dtype == torch.float32 and batch.terminated.dtype == torch.float32
    counts = np.bincount(batch.obs[:, 0].numpy().astype(int), minlength=20)
    assert counts.min() > 800 and counts.max() < 1200  # ~1000 each
    assert torch.equal(batch.rewards, batch.obs[:, 0] * 10) and torch.equal(batch.next_obs, batch.obs + 0.5)
    with pytest.raises(RuntimeError, match="empty"):
        ReplayBuffer(3, (3,), np.float32, 2).sample(1, rng)


def test_state_dict_round_trip_exact_and_only_filled_rows_saved():
    buf = ReplayBuffer(1000, (3,), np.float32, 2)
    buf.add(*_rows(0, 37))
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    assert len(blob.getvalue()) < 37 * (3 + 3 + 2 + 1 + 1) * 4 + 5000  # not the 1000-row arrays
    blob.seek(0)
    fresh = ReplayBuffer(1000, (3,), np.float32, 2)
    fresh.load_state_dict(torch.load(blob, weights_only=True))
    for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
        assert np.array_equal(getattr(fresh, name), getattr(buf, name)), name
    assert (fresh.pos, fresh.size, fresh.added) == (buf.pos, buf.size, buf.added)
    # and both continue identically
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    buf.add(*_rows(37, 5))
    fresh.add(*_rows(37, 5))
    assert torch.equal(buf.sample(64, rng_a).obs, fresh.sample(64, rng_b).obs)


def test_state_dict_round_trip_after_wrap():
    buf = ReplayBuffer(8, (3,), np.float32, 2)
    buf.add(*_rows(0, 13))
    fresh = ReplayBuffer(8, (3,), np.float32, 2)
    fresh.load_state_dict(buf.state_dict())
    assert np.array_equal(fresh.obs, buf.obs) and fresh.pos == buf.pos == 13 % 8
    assert [buf.obs[i % 8, 0] for i in range(5, 13)] == list(range(5, 13))


def test_load_refuses_mismatched_buffer():
    buf = ReplayBuffer(8, (3,), np.float32, 2)
    buf.add(*_rows(0, 3))
    with pytest.raises(ValueError, match="does not match"):
        ReplayBuffer(16, (3,), np.float32, 2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        ReplayBuffer(8, (4,), np.float32, 2).load_state_dict(buf.state_dict())


def test_memory_is_preallocated_and_predictable():
    buf = ReplayBuffer(1000, (17,), np.float32, 6)
    assert buf.nbytes == replay_nbytes(1000, (17,), np.float32, 6) == 1000 * (2 * 17 * 4 + 6 * 4 + 8)
    before = buf.nbytes
    buf.add(*_rows(0, 500, obs_dim=17, action_dim=6))
    assert buf.nbytes == before
    # HalfCheetah at 1e6 transitions: 168 MB
    assert replay_nbytes(1_000_000, (17,), np.float32, 6) == 168_000_000
    # uint8 images are stored as uint8
    assert ReplayBuffer(4, (3, 8, 8), np.uint8, 2).obs.dtype == np.uint8
