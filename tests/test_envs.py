"""Tests for aclab.envs: ids, make_env per family, next-step autoreset, statistics, seeding, state."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import aclab.envs.make as make_module
from aclab.envs import (
    ENV_FAMILIES,
    PROCGEN_GAMES,
    EnvIdError,
    StepResult,
    VecEnv,
    copy_normalization,
    make_env,
    parse_env_id,
)
from aclab.envs.backends import derive_env_seeds

warnings.filterwarnings("ignore", message=".*precision lowered.*")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


class CountingEnv(gym.Env):
    """Deterministic test env: obs = [t, horizon]; reward = (action + 1) / 2; terminates at t == horizon.

    The horizon (3..6) is drawn from the env's RNG at reset, so seeding is observable. Wrapped in a
    TimeLimit of 5 by the factory, horizons of 6 end by truncation.
    """

    observation_space = spaces.Box(0.0, 100.0, (2,), np.float32)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.horizon = int(self.np_random.integers(3, 7))
        return np.array([0.0, self.horizon], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.t, self.horizon], dtype=np.float32)
        return obs, (int(action) + 1) / 2.0, self.t >= self.horizon, False, {}


def counting_factory():
    return gym.wrappers.TimeLimit(CountingEnv(), max_episode_steps=5)


def random_actions(env: VecEnv, rng: np.random.Generator) -> np.ndarray:
    space = env.spec.action_space
    if env.spec.discrete:
        return rng.integers(0, space.n, size=env.num_envs)
    return rng.uniform(space.low, space.high, size=(env.num_envs, *space.shape)).astype(np.float32)


def rollout(env: VecEnv, steps: int, seed: int = 0):
    """Random-action rollout: returns the reset obs, the actions, the StepResults and valid masks [T, B]."""
    rng = np.random.default_rng(seed)
    first = env.reset()
    actions, results, valids = [], [], []
    for _ in range(steps):
        valids.append(~env.next_is_dummy)
        actions.append(random_actions(env, rng))
        results.append(env.step(actions[-1]))
    return first, actions, results, np.array(valids)


def check_episode_statistics(results: list[StepResult], valids: np.ndarray) -> int:
    """Compare episode_return / episode_length with manual sums of raw rewards over valid steps."""
    num_envs = valids.shape[1]
    manual_return = np.zeros(num_envs)
    manual_length = np.zeros(num_envs, dtype=np.int64)
    ended = 0
    for valid, res in zip(valids, results):
        manual_return += np.where(valid, res.raw_reward, 0.0)
        manual_length += valid
        end = ~np.isnan(res.episode_return)
        np.testing.assert_allclose(res.episode_return[end], manual_return[end], rtol=1e-6)
        np.testing.assert_array_equal(res.episode_length[end], manual_length[end])
        np.testing.assert_array_equal(res.episode_length[~end], 0)
        manual_return[end] = 0.0
        manual_length[end] = 0
        ended += int(end.sum())
    return ended


def cartpole_next_obs(obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Reference CartPole dynamics (Barto et al. 1983, Gymnasium's constants, explicit Euler)."""
    x, x_dot, theta, theta_dot = np.asarray(obs, dtype=np.float64).T
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass, polemass_length = masscart + masspole, masspole * length
    force = np.where(action == 1, force_mag, -force_mag)
    cos, sin = np.cos(theta), np.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
    thetaacc = (gravity * sin - cos * temp) / (length * (4.0 / 3.0 - masspole * cos**2 / total_mass))
    xacc = temp - polemass_length * thetaacc * cos / total_mass
    return np.stack([x + tau * x_dot, x_dot + tau * xacc, theta + tau * theta_dot, theta_dot + tau * thetaacc], 1)


# ---------------------------------------------------------------------------------------------------
# ids and errors
# ---------------------------------------------------------------------------------------------------


def test_parse_env_id_families():
    assert parse_env_id("CartPole-v1") == ("classic", "CartPole-v1")
    assert parse_env_id("classic:Pendulum-v1") == ("classic", "Pendulum-v1")
    assert parse_env_id("procgen:BigFish") == ("procgen", "bigfish")
    assert parse_env_id("atari:breakout") == ("atari", "Breakout-v5")
    assert parse_env_id("mujoco:HalfCheetah-v4") == ("mujoco", "HalfCheetah-v4")
    assert parse_env_id("HalfCheetah-v4") == ("mujoco", "HalfCheetah-v4")
    assert parse_env_id("dmc:cheetah-run") == ("dmc", "CheetahRun-v1")
    assert parse_env_id("dmc:ball_in_cup-catch") == ("dmc", "BallInCupCatch-v1")
    assert parse_env_id("metaworld:reach-v3") == ("metaworld", "MetaWorld/Reach-v3")
    assert parse_env_id("gym:CartPole-v1") == ("gym", "CartPole-v1")
    assert parse_env_id("Taxi-v4") == ("gym", "Taxi-v4")
    assert len(PROCGEN_GAMES) == 16 and len(ENV_FAMILIES) == 8


@pytest.mark.parametrize(
    "env_id,expected_in_message",
    [
        ("procgen:bigfsh", ["bigfsh", "bigfish", "starpilot", "coinrun"]),
        ("atari:Brekout", ["Brekout", "Breakout", "Pong"]),
        ("nope:CartPole-v1", ["nope", "procgen", "metaworld"]),
        ("CartPol-v1", ["CartPol-v1", "CartPole-v1", "Pendulum-v1"]),
        ("dmc:cheetah-fly", ["cheetah-fly", "CheetahRun"]),
        ("metaworld:reech-v3", ["reech-v3", "Reach-v3"]),
        ("gym:NoSuchEnv-v0", ["NoSuchEnv-v0"]),
    ],
)
def test_bad_ids_list_valid_choices(env_id, expected_in_message):
    with pytest.raises(EnvIdError) as info:
        parse_env_id(env_id)
    for text in expected_in_message:
        assert text in str(info.value)
    with pytest.raises(ValueError):  # EnvIdError is a ValueError
        make_env(env_id, 2, 0)


@pytest.mark.parametrize(
    "env_id,options,expected_in_message",
    [
        ("procgen:bigfish", {"num_level": 10}, ["num_level", "num_levels", "levels", "distribution_mode"]),
        ("procgen:bigfish", {"distribution_mode": "extreme"}, ["extreme", "easy, hard"]),
        ("procgen:chaser", {"distribution_mode": "impossible"}, ["impossible", "extreme"]),
        ("procgen:bigfish", {"levels": "validation"}, ["validation", "train, test, test-unseen"]),
        ("procgen:bigfish", {"max_episode_steps": 10}, ["max_episode_steps", "levels"]),
        ("atari:Breakout", {"setting": "medium"}, ["medium", "easy, hard, envpool"]),
        ("atari:Breakout", {"sticky": 0.25}, ["sticky", "repeat_action_probability", "episodic_life"]),
        ("atari:Breakout", {"frame_skip": "four"}, ["frame_skip", "int"]),
        ("mujoco:HalfCheetah-v4", {"ctrl_cost": 0.1}, ["ctrl_cost", "ctrl_cost_weight"]),
        ("CartPole-v1", {"max_steps": 5}, ["max_steps", "max_episode_steps"]),
        ("CartPole-v1", {"reward_threshold": 5.0}, ["reward_threshold"]),
    ],
)
def test_bad_options_list_allowed_keys(env_id, options, expected_in_message):
    with pytest.raises(EnvIdError) as info:
        make_env(env_id, 2, 0, options=options)
    for text in expected_in_message:
        assert text in str(info.value)


def test_bad_arguments_fail_before_any_env_is_built(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an env was built before the arguments were validated")

    monkeypatch.setattr(make_module, "EnvPoolBackend", forbidden)
    monkeypatch.setattr(make_module, "GymnasiumBackend", forbidden)
    for kwargs in [
        dict(env_id="procgen:bigfsh", num_envs=2, seed=0),
        dict(env_id="atari:Breakout", num_envs=2, seed=0, options={"setting": "x"}),
        dict(env_id="procgen:bigfish", num_envs=2, seed=0, backend="gymnasium"),
        dict(env_id="dmc:cheetah-run", num_envs=2, seed=0, backend="gymnasium"),
        dict(env_id="gym:CartPole-v1", num_envs=2, seed=0, backend="envpool"),
        dict(env_id=counting_factory, num_envs=2, seed=0, options={"max_episode_steps": 3}),
    ]:
        with pytest.raises(EnvIdError):
            make_env(**kwargs)
    with pytest.raises(EnvIdError, match="auto, envpool, gymnasium"):
        make_env("CartPole-v1", 2, 0, backend="jax")
    with pytest.raises(ValueError, match="num_envs"):
        make_env("CartPole-v1", 0, 0)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("CartPole-v1", 2.5, 0)
    with pytest.raises(ValueError, match="seed"):
        make_env("CartPole-v1", 2, -1)
    with pytest.raises(ValueError, match="seed"):
        make_env("CartPole-v1", 2, "0")


# ---------------------------------------------------------------------------------------------------
# classic control, both backends
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_classic_shapes_and_dtypes(backend):
    env = make_env("CartPole-v1", 3, 0, backend=backend)
    assert env.backend_name == backend and env.spec.family == "classic"
    assert env.spec.obs_shape == (4,) and env.spec.obs_dtype == np.float32
    assert env.spec.discrete and env.spec.num_actions == 2 and env.spec.max_episode_steps == 500
    with pytest.raises(AttributeError):
        _ = env.spec.action_dim
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3, dtype=np.int64))
    obs = env.reset()
    assert obs.shape == (3, 4) and obs.dtype == np.float32 and env.obs is obs
    res = env.step(np.array([0, 1, 0]))
    assert res.obs.shape == (3, 4) and res.obs.dtype == np.float32
    assert res.reward.dtype == np.float32 and res.raw_reward.dtype == np.float32
    assert res.terminated.dtype == bool and res.truncated.dtype == bool
    assert res.episode_return.dtype == np.float64 and res.episode_length.dtype == np.int64
    assert np.isnan(res.episode_return).all() and (res.episode_length == 0).all()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(2, dtype=np.int64))
    env.close()

    pend = make_env("Pendulum-v1", 2, 0, backend=backend)
    assert not pend.spec.discrete and pend.spec.action_dim == 1
    assert pend.spec.action_space.dtype == np.float32
    pend.reset()
    assert pend.step(np.zeros((2, 1), np.float32)).obs.shape == (2, 3)
    pend.close()


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_next_step_autoreset_and_truncation_final_obs(backend):
    env = make_env("CartPole-v1", 3, 1, backend=backend, options={"max_episode_steps": 5})
    assert env.spec.max_episode_steps == 5
    obs = env.reset()
    actions = np.array([1, 0, 1])
    for _ in range(5):
        assert not env.next_is_dummy.any()
        res = env.step(actions)
        predicted = cartpole_next_obs(obs, actions)
        np.testing.assert_allclose(res.obs, predicted, atol=1e-5)  # includes the final obs at t = 4
        obs = res.obs
    assert res.truncated.all() and not res.terminated.any()
    assert env.next_is_dummy.all()
    np.testing.assert_array_equal(res.episode_return, 5.0)
    np.testing.assert_array_equal(res.episode_length, 5)
    final = res.obs
    dummy = env.step(np.array([0, 0, 0]))
    assert (dummy.reward == 0).all() and (dummy.raw_reward == 0).all()
    assert not dummy.terminated.any() and not dummy.truncated.any()
    assert np.isnan(dummy.episode_return).all()
    assert (np.abs(dummy.obs) <= 0.05).all()  # CartPole's reset distribution U(-0.05, 0.05)
    assert not np.allclose(dummy.obs, cartpole_next_obs(final, np.zeros(3, np.int64)), atol=1e-3)
    assert not env.next_is_dummy.any()
    after = env.step(actions)  # the first real step of the new episode
    np.testing.assert_allclose(after.obs, cartpole_next_obs(dummy.obs, actions), atol=1e-5)
    assert (after.raw_reward == 1).all()


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_cartpole_truncates_at_500(backend):
    env = make_env("CartPole-v1", 2, 0, backend=backend)
    obs = env.reset()
    for _ in range(500):
        res = env.step((obs[:, 2] + 0.5 * obs[:, 3] + 0.01 * obs[:, 0] + 0.1 * obs[:, 1] > 0).astype(np.int64))
        obs = res.obs
    assert res.truncated.all() and not res.terminated.any()
    np.testing.assert_array_equal(res.episode_length, 500)
    np.testing.assert_array_equal(res.episode_return, 500.0)


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_episode_statistics_with_reward_normalisation(backend):
    env = make_env("CartPole-v1", 4, 3, backend=backend, normalize_reward=True, reward_gamma=0.9)
    _, _, results, valids = rollout(env, 300)
    assert check_episode_statistics(results, valids) >= 10
    rewards = np.array([r.reward for r in results])
    raw = np.array([r.raw_reward for r in results])
    assert not np.allclose(rewards[valids], raw[valids])  # the normaliser is really on
    np.testing.assert_array_equal(rewards[~valids], 0.0)
    np.testing.assert_array_equal(raw[~valids], 0.0)
    assert env.reward_scaler.rms.count == valids.sum()  # dummy steps never enter the statistics


def test_obs_normalisation_in_env_updates_on_every_observation():
    env = make_env("Pendulum-v1", 3, 0, normalize_obs=True, obs_clip=5.0)
    assert env.spec.obs_dtype == np.float32 and env.spec.observation_space.high.max() == 5.0
    _, _, results, _ = rollout(env, 40)
    assert env.obs_normalizer.rms.count == 3 * 41  # reset obs + every step's obs
    assert all(np.abs(r.obs).max() <= 5.0 for r in results)


@pytest.mark.parametrize("env_id,backend", [("CartPole-v1", "gymnasium"), ("Pendulum-v1", "envpool")])
def test_same_seed_same_trajectory_different_seed_differs(env_id, backend):
    def trajectory(seed):
        env = make_env(env_id, 3, seed, backend=backend)
        first, _, results, _ = rollout(env, 60, seed=123)
        env.close()
        return np.concatenate([first[None]] + [r.obs[None] for r in results]), np.array([r.raw_reward for r in results])

    obs_a, rew_a = trajectory(5)
    obs_b, rew_b = trajectory(5)
    obs_c, _ = trajectory(6)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    assert not np.allclose(obs_a[0], obs_c[0])
    assert not np.allclose(obs_a[0, 0], obs_a[0, 1])  # envs of one run start differently
    # reset(seed=s) reseeds exactly like make_env(seed=s)
    env = make_env(env_id, 3, 99, backend=backend)
    np.testing.assert_array_equal(env.reset(seed=5), obs_a[0])
    env.close()


def test_derived_env_seeds_do_not_overlap_between_master_seeds():
    assert len(set(derive_env_seeds(0, 8)) | set(derive_env_seeds(1, 8))) == 16
    assert derive_env_seeds(3, 4) == derive_env_seeds(3, 4)


# ---------------------------------------------------------------------------------------------------
# user factory (Gymnasium SyncVectorEnv): exact autoreset semantics on a deterministic env
# ---------------------------------------------------------------------------------------------------


def test_factory_autoreset_semantics_and_statistics():
    env = make_env(counting_factory, 4, 0, normalize_reward=True)
    assert env.spec.env_id == "callable:counting_factory" and env.spec.max_episode_steps == 5
    obs = env.reset()
    np.testing.assert_array_equal(obs[:, 0], 0)
    rng = np.random.default_rng(0)
    returns = np.zeros(4)
    lengths = np.zeros(4, dtype=np.int64)
    saw_truncation = saw_termination = False
    for _ in range(80):
        dummy = env.next_is_dummy.copy()
        actions = rng.integers(0, 3, size=4)
        res = env.step(actions)
        # dummy: action ignored, reward 0, flags False, obs is a reset obs [0, horizon]
        np.testing.assert_array_equal(res.raw_reward[dummy], 0.0)
        np.testing.assert_array_equal(res.reward[dummy], 0.0)
        assert not (res.terminated[dummy] | res.truncated[dummy]).any()
        np.testing.assert_array_equal(res.obs[dummy, 0], 0)
        # real step: the time counter advances and the reward depends on the action
        np.testing.assert_array_equal(res.obs[~dummy, 0], obs[~dummy, 0] + 1)
        np.testing.assert_array_equal(res.raw_reward[~dummy], (actions[~dummy] + 1) / 2.0)
        np.testing.assert_array_equal(res.terminated, ~dummy & (res.obs[:, 0] == res.obs[:, 1]))
        # TimeLimit(5) sets truncated at t = 5 (together with terminated when the horizon is also 5)
        np.testing.assert_array_equal(res.truncated, ~dummy & (res.obs[:, 0] == 5))
        saw_truncation |= bool((res.truncated & ~res.terminated).any())
        saw_termination |= bool(res.terminated.any())
        np.testing.assert_array_equal(env.next_is_dummy, res.terminated | res.truncated)
        returns += np.where(dummy, 0.0, res.raw_reward)
        lengths += ~dummy
        end = res.terminated | res.truncated
        np.testing.assert_array_equal(np.isnan(res.episode_return), ~end)
        np.testing.assert_allclose(res.episode_return[end], returns[end])
        np.testing.assert_array_equal(res.episode_length[end], res.obs[end, 0])  # final t = length
        np.testing.assert_array_equal(res.episode_length[end], lengths[end])
        returns[end] = 0.0
        lengths[end] = 0
        obs = res.obs
    assert saw_truncation and saw_termination


def test_factory_dict_and_discrete_observations():
    class DictEnv(gym.Env):
        observation_space = spaces.Dict(
            {"velocity": spaces.Box(-1, 1, (2,), np.float64), "angle": spaces.Box(-1, 1, (), np.float64)}
        )
        action_space = spaces.Box(-1.0, 1.0, (2,), np.float64)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self._obs(), {}

        def _obs(self):
            return {"velocity": np.array([0.25, -0.5]), "angle": np.array(0.75)}

        def step(self, action):
            self.last_action = np.array(action)
            return self._obs(), float(np.sum(action)), False, False, {}

    env = make_env(lambda: DictEnv(), 2, 0)
    keys = tuple(DictEnv.observation_space.spaces)  # the space's key order (Gymnasium sorts dict keys)
    expected = np.concatenate([np.atleast_1d(DictEnv()._obs()[k]) for k in keys]).astype(np.float32)
    obs = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (2, 3)
    np.testing.assert_array_equal(obs, np.stack([expected] * 2))
    res = env.step(np.array([[5.0, 0.5], [-5.0, -0.25]], dtype=np.float32))  # clipped to [-1, 1]
    np.testing.assert_allclose(res.raw_reward, [1.5, -1.25])

    discrete_env = make_env(lambda: gym.make("FrozenLake-v1"), 2, 0)
    obs = discrete_env.reset()
    assert obs.shape == (2, 16) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs.sum(1), 1.0)
    np.testing.assert_array_equal(obs[:, 0], 1.0)  # FrozenLake starts in state 0


# ---------------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id,backend",
    [("CartPole-v1", "gymnasium"), (counting_factory, "gymnasium"), ("Acrobot-v1", "gymnasium"),
     # MuJoCo envs pickle by constructor arguments: saved layer by layer (aclab.envs.sim_state). Hopper
     # terminates often under random actions (resets use the env's np_random); Ant reads a body position
     # (a derived quantity) before each step for its reward.
     ("mujoco:Hopper-v4", "gymnasium"), ("mujoco:Ant-v4", "gymnasium")],
)
def test_state_dict_exact_continuation_for_gymnasium(env_id, backend):
    kwargs = dict(backend=backend, normalize_obs=True, normalize_reward=True)
    env = make_env(env_id, 3, 4, **kwargs)
    rng = np.random.default_rng(0)
    env.reset()
    for _ in range(37):
        env.step(random_actions(env, rng))
    blob = pickle.dumps(env.state_dict())  # as a checkpoint would store it
    actions = [random_actions(env, rng) for _ in range(60)]
    reference = [env.step(a) for a in actions]

    fresh = make_env(env_id, 3, 4, **kwargs)
    assert fresh.load_state_dict(pickle.loads(blob)) is True
    for a, ref in zip(actions, reference):
        got = fresh.step(a)
        for name in StepResult.__slots__:
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
    np.testing.assert_array_equal(fresh.obs, env.obs)
    np.testing.assert_array_equal(fresh.next_is_dummy, env.next_is_dummy)


def test_state_dict_envpool_restores_statistics_only():
    env = make_env("Pendulum-v1", 3, 0, normalize_obs=True, normalize_reward=True)
    rollout(env, 50)
    state = pickle.loads(pickle.dumps(env.state_dict()))
    assert state["backend"] is None
    fresh = make_env("Pendulum-v1", 3, 0, normalize_obs=True, normalize_reward=True)
    assert fresh.load_state_dict(state) is False
    # statistics restored (the reset that follows adds the 3 reset observations)
    assert fresh.obs_normalizer.rms.count == env.obs_normalizer.rms.count + 3
    assert fresh.reward_scaler.rms.count == env.reward_scaler.rms.count
    assert fresh.reward_scaler.rms.var == env.reward_scaler.rms.var
    np.testing.assert_array_equal(fresh.reward_scaler.returns, 0.0)
    assert not fresh.next_is_dummy.any() and fresh.obs.shape == (3, 3)
    assert (fresh.state_dict()["episode_length_acc"] == 0).all()
    with pytest.raises(ValueError, match="Pendulum"):
        make_env("CartPole-v1", 3, 0, normalize_obs=True, normalize_reward=True).load_state_dict(state)


def test_copy_normalization_train_to_eval():
    train = make_env("Pendulum-v1", 2, 0, normalize_obs=True, normalize_reward=True)
    rollout(train, 20)
    evaluation = make_env("Pendulum-v1", 2, 1, normalize_obs=True, normalize_reward=True)
    copy_normalization(train, evaluation)
    count = evaluation.obs_normalizer.rms.count
    assert count == train.obs_normalizer.rms.count
    rollout(evaluation, 10)
    assert evaluation.obs_normalizer.rms.count == count  # frozen
    np.testing.assert_array_equal(evaluation.obs_normalizer.rms.mean, train.obs_normalizer.rms.mean)


# ---------------------------------------------------------------------------------------------------
# Procgen
# ---------------------------------------------------------------------------------------------------


def _procgen_level_seeds(levels: str, reseeds: int = 3) -> np.ndarray:
    env = make_env("procgen:bigfish", 8, 0, options={"levels": levels})
    seeds = []
    for s in range(reseeds):
        env.reset(seed=s)
        seeds.append(np.array(env.info["level_seed"]))
    env.close()
    return np.concatenate(seeds)


def test_procgen_shapes_and_modes():
    env = make_env("procgen:bigfish", 2, 0)
    assert env.spec.obs_shape == (3, 64, 64) and env.spec.obs_dtype == np.uint8 and env.spec.num_actions == 15
    assert env._backend.task_id == "BigfishEasy-v0"
    assert env._backend.config["num_levels"] == 200 and env._backend.config["start_level"] == 0
    obs = env.reset()
    assert obs.shape == (2, 3, 64, 64) and obs.dtype == np.uint8
    res = env.step(np.array([0, 14]))
    assert res.obs.dtype == np.uint8 and res.reward.dtype == np.float32
    env.close()
    hard = make_env("procgen:coinrun", 2, 0, options={"distribution_mode": "hard", "levels": "test"})
    assert hard._backend.task_id == "CoinrunHard-v0" and hard._backend.config["num_levels"] == 0
    hard.close()


def test_procgen_level_sets():
    train = _procgen_level_seeds("train")
    assert (train >= 0).all() and (train < 200).all()
    unseen = _procgen_level_seeds("test-unseen")
    assert (unseen >= 200).all()
    full = _procgen_level_seeds("test")
    assert (full >= 200).any()
    assert len(np.unique(unseen)) > len(unseen) // 2


# ---------------------------------------------------------------------------------------------------
# Atari
# ---------------------------------------------------------------------------------------------------


def test_atari_settings_follow_dna_table3():
    from aclab.envs import ATARI_SETTING_CONFIGS

    easy, hard = ATARI_SETTING_CONFIGS["easy"], ATARI_SETTING_CONFIGS["hard"]
    assert (easy["episodic_life"], easy["full_action_space"], easy["repeat_action_probability"]) == (True, False, 0.0)
    assert (hard["episodic_life"], hard["full_action_space"], hard["repeat_action_probability"]) == (False, True, 0.25)
    for cfg in (easy, hard):
        assert cfg["gray_scale"] and (cfg["img_height"], cfg["img_width"], cfg["stack_num"]) == (84, 84, 4)
        assert cfg["frame_skip"] == 4 and cfg["reward_clip"] is False and cfg["noop_max"] == 30
    env = make_env("atari:Breakout", 2, 0)  # default: hard
    assert env.spec.num_actions == 18 and env.spec.max_episode_steps == 108_000 // 4
    assert env._backend.config["repeat_action_probability"] == 0.25
    obs = env.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    env.close()
    custom = make_env("atari:Breakout", 2, 0, options={"setting": "easy", "frame_skip": 2, "noop_max": 1})
    assert custom.spec.num_actions == 4 and custom.spec.max_episode_steps == 108_000 // 2
    custom.close()


def test_atari_life_loss_is_terminal_but_statistics_cover_the_whole_game():
    env = make_env("atari:Breakout", 2, 0, options={"setting": "easy"})
    rng = np.random.default_rng(0)
    env.reset()
    valids, results, lives = [], [], []
    while len(results) < 3000:
        valids.append(~env.next_is_dummy)
        results.append(env.step(rng.integers(0, 4, size=2)))
        lives.append(env.info["lives"].copy())
        if (~np.isnan(np.array([r.episode_return for r in results]))).any(axis=0).all():
            break
    valids = np.array(valids)
    ended = check_episode_statistics(results, valids)
    assert ended >= 2
    terminated = np.array([r.terminated for r in results])
    game_over = ~np.isnan(np.array([r.episode_return for r in results]))
    lives = np.array(lives)
    assert (terminated & ~game_over).sum() >= 4  # life losses terminate the training episode ...
    assert (lives[game_over] == 0).all()  # ... but statistics are reported at the real game over
    assert (lives[terminated & ~game_over] > 0).all()
    for b in range(2):  # every termination is followed by a dummy step
        idx = np.nonzero(terminated[:-1, b])[0]
        assert not valids[idx + 1, b].any()


def test_atari_frame_marks():
    env = make_env("atari:Breakout", 2, 0, options={"action_marker": True, "progress_bar": True})
    obs = env.reset()
    assert (obs[:, 0, -3:-1, 3:-3] == 64).all()  # empty progress bar at t = 0
    actions = np.array([5, 17])
    res = env.step(actions)
    for b, a in enumerate(actions):
        assert (res.obs[b, -1, 4 * a : 4 * a + 4, 0:4] == 255).all()
    for _ in range(3):
        res = env.step(actions)
    # after 4 steps the oldest frame of the stack carries the mark of the action that produced it
    assert (res.obs[0, 0, 20:24, 0:4] == 255).all() and (res.obs[1, 0, 68:72, 0:4] == 255).all()
    assert (res.obs[0, :, 68:72, 0:4] != 255).any()  # no stray mark of the other env's action
    assert (res.obs[:, 0, -3:-1, 3] == 64 + int(4 / 27000 * 78 * 191)).all()  # partial first pixel
    env.close()


def test_atari_action_marks_across_a_life_loss():
    env = make_env("atari:Breakout", 1, 0, options={"setting": "easy", "action_marker": True})
    env.reset()
    for t in range(2000):
        action = 1 + t % 2  # FIRE, RIGHT, FIRE, ...
        res = env.step(np.array([action]))
        if res.terminated[0]:
            break
    assert res.terminated[0] and env.info["lives"][0] > 0  # a life loss, not the game over
    assert (res.obs[0, -1, 4 * action : 4 * action + 4, 0:4] == 255).all()
    dummy = env.step(np.array([3]))  # ignored action: not drawn; EnvPool's stack shifts by one
    assert not (dummy.obs[0, -1, 12:16, 0:4] == 255).all()
    assert (dummy.obs[0, -2, 4 * action : 4 * action + 4, 0:4] == 255).all()
    previous = 3 - action  # the action before, two slots back after the shift
    assert (dummy.obs[0, -3, 4 * previous : 4 * previous + 4, 0:4] == 255).all()
    env.close()


# ---------------------------------------------------------------------------------------------------
# MuJoCo, DM Control, Meta-World
# ---------------------------------------------------------------------------------------------------


def test_mujoco_shapes_and_action_clipping():
    def first_reward(action_value):
        env = make_env("mujoco:HalfCheetah-v4", 2, 0)
        env.reset()
        out = env.step(np.full((2, 6), action_value, dtype=np.float32))
        env.close()
        return out

    inside, outside = first_reward(1.0), first_reward(5.0)
    assert inside.obs.shape == (2, 17) and inside.obs.dtype == np.float32
    np.testing.assert_array_equal(outside.raw_reward, inside.raw_reward)  # 5.0 was clipped to 1.0
    np.testing.assert_array_equal(outside.obs, inside.obs)
    env = make_env("mujoco:HalfCheetah-v4", 2, 0, options={"max_episode_steps": 3})
    _, _, results, valids = rollout(env, 8)
    assert results[2].truncated.all() and check_episode_statistics(results, valids) == 4


def test_dmc_flattens_dict_observation_in_key_order():
    import envpool

    env = make_env("dmc:cheetah-run", 2, 7)
    assert env.spec.obs_shape == (17,) and env.spec.action_dim == 6
    obs = env.reset()
    raw = envpool.make("CheetahRun-v1", env_type="gymnasium", num_envs=2, seed=0, env_seed=derive_env_seeds(7, 2))
    raw_obs, _ = raw.reset()
    expected = np.concatenate([raw_obs["position"], raw_obs["velocity"]], axis=1).astype(np.float32)
    np.testing.assert_array_equal(obs, expected)
    assert obs.dtype == np.float32
    env.close()


def test_metaworld_shapes():
    env = make_env("metaworld:reach-v3", 2, 0)
    assert env.spec.obs_shape == (39,) and env.spec.action_dim == 4 and env.spec.max_episode_steps == 500
    env.reset()
    res = env.step(np.zeros((2, 4), np.float32))
    assert res.obs.shape == (2, 39) and res.obs.dtype == np.float32
    assert "success" in env.info
    env.close()


def test_a_mujoco_run_of_few_envs_never_imports_envpool():
    """Memory (docs/performance.md): an exact Gymnasium MuJoCo id with <= 2 envs is parsed, validated
    and built without importing EnvPool (~115 MB of resident memory with its other families)."""
    import subprocess
    import sys

    code = ("import sys; from aclab.config import Config; from aclab.envs import build_envs; "
            "c = Config(algo='ppo'); c.env.id = 'mujoco:HalfCheetah-v4'; c.env.num_envs = 1; "
            "envs = build_envs(c); envs.reset(); print(envs.spec.obs_shape, 'envpool' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False", out


def test_evaluation_envs_keep_the_training_envs_backend():
    """build_envs with another num_envs (evaluation: 5 envs; the analyses) builds on the backend that
    'auto' picked for the training envs: a 1-env MuJoCo run evaluates on Gymnasium (no EnvPool import,
    ~120 MB), an 8-env one on EnvPool even with 1 env; an explicit backend and rendering are left alone."""
    import subprocess
    import sys

    code = ("import sys; from aclab.config import Config; from aclab.envs import build_envs; "
            "c = Config(algo='ppo'); c.env.id = 'mujoco:HalfCheetah-v4'; c.env.num_envs = 1; "
            "envs = build_envs(c, num_envs=5, seed=3); envs.reset(); "
            "print(envs.num_envs, type(envs._backend).__name__, 'envpool' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["5", "GymnasiumBackend", "False"], out

    from aclab.config import Config
    from aclab.envs import build_envs
    from aclab.envs.make import resolve_backend

    config = Config(algo="ppo")
    config.env.id, config.env.num_envs = "mujoco:HalfCheetah-v4", 8
    assert resolve_backend(config.env.id, 8) == "envpool" and resolve_backend(config.env.id, 1) == "gymnasium"
    assert type(build_envs(config, num_envs=1)._backend).__name__ == "EnvPoolBackend"
    config.env.num_envs, config.env.backend = 1, "envpool"
    assert type(build_envs(config, num_envs=1)._backend).__name__ == "EnvPoolBackend"
