"""Meta-RL task families (aclab.envs.meta): rewards against the formulas, task ranges, oracle contexts,
rollout masking and the registered Gymnasium ids."""

import gymnasium
import numpy as np
import pytest

from aclab.envs import make_env
from aclab.envs.meta import (
    FAMILIES,
    GYM_IDS,
    Trajectories,
    family_from_env_id,
    make_task_family,
    point_nav_reward,
    rollout,
)


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory


def _step_and_measure(batch, action, body: str | None = None):
    """One step of env 0; returns (reward, x velocity measured from the simulator, data after)."""
    env = batch.envs[0]
    x_before = env.data.qpos[0] if body is None else env.data.body(body).xpos[0].copy()
    _, reward, terminated = batch.step(action[None], np.ones(1, bool))
    x_after = env.data.qpos[0] if body is None else env.data.body(body).xpos[0].copy()
    return float(reward[0]), (x_after - x_before) / env.dt, env.data, bool(terminated[0])


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_halfcheetah_fwd_back_reward_is_direction_times_velocity_minus_control(direction):
    family = make_task_family("halfcheetah-fwd-back")
    batch = family.make_batch_env(1)
    batch.reset(np.array([[direction]]), [3])
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-1.5, 1.5, family.action_dim)  # out of bounds on purpose: clipped to [-1, 1]
        reward, velocity, _, _ = _step_and_measure(batch, action)
        clipped = np.clip(action, -1.0, 1.0)
        assert reward == pytest.approx(direction * velocity - 0.05 * np.sum(clipped**2), rel=1e-5, abs=1e-5)


def test_halfcheetah_vel_reward_is_minus_velocity_error_minus_control():
    family = make_task_family("halfcheetah-vel")
    batch = family.make_batch_env(1)
    batch.reset(np.array([[1.7]]), [5])
    rng = np.random.default_rng(1)
    for _ in range(5):
        action = rng.uniform(-1.0, 1.0, family.action_dim)
        reward, velocity, _, _ = _step_and_measure(batch, action)
        assert reward == pytest.approx(-abs(velocity - 1.7) - 0.05 * np.sum(action**2), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name,task", [("ant-fwd-back", -1.0), ("ant-vel", 2.2)])
def test_ant_reward_adds_contact_cost_and_survive_bonus(name, task):
    family = make_task_family(name)
    assert family.obs_dim == 27  # qpos[2:], qvel (PEARL's Ant observation)
    batch = family.make_batch_env(1)
    batch.reset(np.array([[task]]), [7])
    rng = np.random.default_rng(2)
    for _ in range(5):
        action = rng.uniform(-1.0, 1.0, family.action_dim)
        reward, vx, data, terminated = _step_and_measure(batch, action, body="torso")
        forward = task * vx if name == "ant-fwd-back" else -abs(vx - task)
        contact = 5e-4 * np.sum(np.square(np.clip(data.cfrc_ext, -1.0, 1.0)))
        healthy = float(0.2 <= data.qpos[2] <= 1.0)
        survive = 1.0 if name == "ant-fwd-back" else 1.05  # PEARL's Ant-Dir; MAML's Ant-Vel (+1 and 0.05)
        expected = forward - 0.005 * np.sum(action**2) - contact + survive * healthy
        assert reward == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert terminated == (not healthy)


def test_point_nav_reward_and_clipped_moves_match_a_loop_reference():
    family = make_task_family("point-nav")
    batch = family.make_batch_env(3)
    goals = np.array([[0.3, -0.2], [-0.5, 0.5], [0.0, 0.1]])
    obs = batch.reset(goals, [0, 1, 2])
    assert np.array_equal(obs, np.zeros((3, 2), np.float32))
    positions = np.zeros((3, 2))
    rng = np.random.default_rng(3)
    for _ in range(4):
        actions = rng.uniform(-0.3, 0.3, (3, 2))
        active = np.array([True, False, True])
        obs, rewards, _ = batch.step(actions, active)
        for i in range(3):
            if active[i]:
                positions[i] += np.clip(actions[i], -0.1, 0.1)
                expected = -np.hypot(*(positions[i] - goals[i]))
            else:
                expected = 0.0
            assert rewards[i] == pytest.approx(expected, abs=1e-6)
        np.testing.assert_allclose(obs, positions, atol=1e-6)
    assert point_nav_reward(np.array([[3.0, 4.0]]), np.zeros((1, 2)))[0] == -5.0


def test_task_ranges_and_oracle_contexts():
    rng = np.random.default_rng(0)
    vel = make_task_family("halfcheetah-vel")
    tasks = vel.sample_tasks(2000, rng, "train")
    assert tasks.min() >= 0.0 and tasks.max() <= 3.0 and tasks.max() > 2.9
    np.testing.assert_allclose(vel.context(tasks), tasks / 3.0, rtol=1e-6)  # (v* - 0) / (3 - 0)

    medium = make_task_family("halfcheetah-vel-medium")
    train, test = medium.sample_tasks(2000, rng, "train"), medium.sample_tasks(2000, rng, "test")
    assert train.max() <= 2.5 and test.min() >= 2.5 and test.max() <= 3.0
    assert medium.context(test).min() >= 1.0 - 1e-6 and medium.context(test).max() > 1.1  # OOD contexts exceed 1

    for name in ("halfcheetah-fwd-back", "ant-fwd-back"):
        family = make_task_family(name)
        d = family.sample_tasks(500, rng, "test")
        assert set(np.unique(d)) == {-1.0, 1.0}
        np.testing.assert_array_equal(family.context(d), d)  # the authors' d in {-1, +1}
        binary = make_task_family(name, direction_context="binary")
        np.testing.assert_array_equal(binary.context(d), (d + 1) / 2)

    nav = make_task_family("point-nav")
    goals = nav.sample_tasks(1000, rng, "train")
    assert np.abs(goals).max() <= 0.5
    np.testing.assert_allclose(nav.context(np.array([[-0.5, 0.5], [0.0, 0.25]])), [[-1, 1], [0, 0.5]], atol=1e-6)
    ood = make_task_family("point-nav", test_low=0.5, test_high=1.0)
    assert ood.sample_tasks(100, rng, "test").min() >= 0.5
    with pytest.raises(ValueError, match="unknown task split"):
        nav.sample_tasks(1, rng, "valid")


def test_unknown_family_or_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: point-nav"):
        make_task_family("point-navigation")
    with pytest.raises(ValueError, match="valid: goal_low"):
        make_task_family("point-nav", goal=1.0)
    with pytest.raises(ValueError, match="gym:aclab/MetaPointNav-v0"):
        family_from_env_id("mujoco:HalfCheetah-v4")
    assert family_from_env_id("gym:aclab/MetaPointNav-v0", {"horizon": 7}).horizon == 7
    assert set(GYM_IDS) == set(FAMILIES)


class _TerminatingEnv:
    """Env 0 terminates at its 3rd step; rewards are 1 per active step."""

    num_envs = 2

    def reset(self, tasks, seeds):
        self.t = 0
        return np.zeros((2, 1), np.float32)

    def step(self, actions, active):
        self.t += 1
        terminated = np.array([self.t == 3, False])
        return np.full((2, 1), self.t, np.float32), active.astype(np.float32), terminated

    def close(self):
        pass


def test_rollout_masks_steps_after_termination():
    seen = []
    traj = rollout(_TerminatingEnv(), np.zeros((2, 1)), lambda obs, t: seen.append(t) or np.zeros((2, 1)), 5,
                   [0, 1], 1)
    assert isinstance(traj, Trajectories) and traj.obs.shape == (5, 2, 1)
    assert traj.valid[:, 0].tolist() == [True, True, True, False, False]
    assert traj.valid[:, 1].all() and traj.terminated[2, 0] and not traj.terminated[:, 1].any()
    assert traj.returns.tolist() == [3.0, 5.0] and traj.lengths.tolist() == [3, 5]
    assert traj.num_steps == 8 and seen == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(traj.next_obs[:, 1, 0], [1, 2, 3, 4, 5])


def test_registered_gym_env_appends_context_and_truncates_at_horizon():
    env = gymnasium.make("aclab/MetaPointNav-v0", horizon=4)
    obs, info = env.reset(seed=0)
    assert obs.shape == (4,) and np.allclose(obs[:2], 0.0)
    family = make_task_family("point-nav")
    np.testing.assert_allclose(obs[2:], family.context(info["task"][None])[0], atol=1e-6)
    flags = []
    for _ in range(4):
        obs, reward, terminated, truncated, _ = env.step(np.array([0.05, 0.05], np.float32))
        flags.append((terminated, truncated))
    assert flags == [(False, False)] * 3 + [(False, True)]
    second = env.reset(seed=1)[1]["task"]
    assert not np.allclose(second, info["task"])  # a new task every reset
    envs = make_env("gym:aclab/MetaHalfCheetahVelMedium-v0", 1, 0)
    try:
        assert envs.spec.obs_shape == (21,) and envs.spec.action_space.shape == (6,)
    finally:
        envs.close()
