"""The "true gradient" estimator: least squares, cosine / threshold fractions, simulator save/restore,
and the whole procedure on a synthetic task whose gradient is known in closed form."""

import gymnasium
import numpy as np
import pytest

from aclab.analysis.grad_accuracy import (
    GradientProbe,
    LinearQEnv,
    cosine_similarity,
    fit_linear_gradient,
    fraction_above,
    measure_gradient_accuracy,
    restore_env_state,
    rollout_return,
    sample_policy_states,
    save_env_state,
)


def test_least_squares_recovers_an_affine_slope():
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(15, 4))
    slope = np.array([1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(fit_linear_gradient(actions, 7.0 + actions @ slope), slope, atol=1e-10)
    # noisy: close to the slope, and equal to numpy's reference least squares
    noisy = 7.0 + actions @ slope + rng.normal(scale=0.1, size=15)
    reference = np.linalg.pinv(np.c_[np.ones(15), actions]) @ noisy
    np.testing.assert_allclose(fit_linear_gradient(actions, noisy), reference[1:], atol=1e-10)


def test_cosine_and_fractions():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [0.0, 3.0]])
    cos = cosine_similarity(a, b)
    np.testing.assert_allclose(cos[[0, 1, 3]], [1.0, -1.0, 0.0])
    assert np.isnan(cos[2])
    np.testing.assert_allclose(fraction_above(cos, [-0.5, 0.0, 0.5]), [0.5, 0.25, 0.25])


def _probe_for(env: LinearQEnv, sign: float = 1.0, gradient=None) -> GradientProbe:
    policy_matrix = np.random.default_rng(1).normal(size=(env.matrix.shape[0], env.matrix.shape[1])) * 0.1
    return GradientProbe(
        policy=lambda obs: np.tanh(obs @ policy_matrix.T),
        critic_gradient=gradient or (lambda obs, actions: sign * env.action_gradient(obs)),
        bootstrap_value=lambda obs: 100.0 * np.ones(len(obs)),
    )


def test_rollout_on_synthetic_env_is_affine_in_the_action_with_the_closed_form_slope():
    env = LinearQEnv(obs_dim=4, action_dim=2, episode_length=30, seed=3)
    probe = _probe_for(env)
    rng = np.random.default_rng(0)
    (state,) = sample_policy_states(env, probe, 1, rng, max_start_steps=10)
    actions = rng.uniform(-1, 1, size=(6, 2))
    returns = [rollout_return(env, state, a, probe, repeat=3, gamma=0.9) for a in actions]
    slope = env.repeated_action_gradient(state.sim[0], repeat=3, gamma=0.9)
    np.testing.assert_allclose(fit_linear_gradient(actions, returns), slope, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sign, expected", [(1.0, 1.0), (-1.0, -1.0)])
def test_estimator_on_synthetic_env_finds_the_known_gradient(sign, expected):
    """Without rotation, the 3-step repeated-action gradient is (1 + g + g^2) M s, parallel to the one-step
    grad_a Q = M s: a critic with exactly that gradient scores cosine 1, its negative -1."""
    env = LinearQEnv(obs_dim=5, action_dim=3, episode_length=200, rotate=False, seed=4)
    result = measure_gradient_accuracy(env, _probe_for(env, sign), num_states=6, num_actions=8, repeat=3,
                                       horizon=20, max_start_steps=50, rng=np.random.default_rng(2))
    np.testing.assert_allclose(result.cosine, expected, atol=1e-6)
    assert result.actions.shape == (6, 8, 3) and result.returns.shape == (6, 8)
    # the first action of every state is the unperturbed policy mean, the rest within the bounds
    obs = np.stack([result.actions[i, 0] for i in range(6)])
    assert np.abs(result.actions).max() <= 1.0 and not np.allclose(result.actions[:, 1], obs)
    metrics = result.metrics()
    assert metrics["grad_cs/mean"] == pytest.approx(expected, abs=1e-6)
    assert metrics["grad_cs/frac_gt_0.9"] == (1.0 if expected > 0 else 0.0)


def test_estimator_scores_an_orthogonal_critic_near_zero_and_rotation_lowers_cosine():
    env = LinearQEnv(obs_dim=5, action_dim=3, episode_length=200, rotate=False, seed=5)
    ortho = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]

    def orthogonal_gradient(obs, actions):
        g = env.action_gradient(obs)
        # remove the component along g from a random direction
        r = np.tile(ortho[0], (len(g), 1))
        return r - (r * g).sum(1, keepdims=True) / (g * g).sum(1, keepdims=True) * g

    result = measure_gradient_accuracy(env, _probe_for(env, gradient=orthogonal_gradient), num_states=5,
                                       num_actions=6, horizon=10, max_start_steps=30, rng=np.random.default_rng(1))
    np.testing.assert_allclose(result.cosine, 0.0, atol=1e-6)
    # a rotating state: the 3-step repeated-action gradient sum_t g^t M R^t s is what the fit recovers
    rotating = LinearQEnv(obs_dim=5, action_dim=3, episode_length=200, rotate=True, seed=5)
    result = measure_gradient_accuracy(rotating, _probe_for(rotating), num_states=5, num_actions=6, horizon=10,
                                       max_start_steps=30, rng=np.random.default_rng(1))
    for i in range(5):
        expected = rotating.repeated_action_gradient(result.obs[i], repeat=3, gamma=0.99)
        np.testing.assert_allclose(result.true_gradient[i], expected, rtol=1e-5, atol=1e-5)
    assert (result.cosine < 0.9999).any()  # no longer parallel to the one-step gradient M s


def test_truncation_bootstraps_and_termination_does_not():
    env = LinearQEnv(obs_dim=2, action_dim=1, episode_length=4, rotate=False, seed=6)
    probe = GradientProbe(policy=lambda obs: np.zeros((len(obs), 1)), critic_gradient=lambda o, a: a,
                          bootstrap_value=lambda obs: np.full(len(obs), 10.0))
    obs, _ = env.reset(seed=0)
    state = save_env_state(env, obs)
    zero = np.zeros(1)
    # rewards are 0 with a zero action; the episode truncates after 4 steps: only the bootstrap remains
    assert rollout_return(env, state, zero, probe, repeat=1, gamma=0.5) == pytest.approx(10.0 * 0.5**4)
    assert rollout_return(env, state, zero, probe, repeat=1, gamma=0.5, horizon=2) == pytest.approx(10.0 * 0.25)


def test_mujoco_state_restore_is_exact():
    env = gymnasium.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(7):
        obs, *_ = env.step(rng.uniform(-1, 1, 6))
    state = save_env_state(env, obs)
    actions = rng.uniform(-1, 1, (5, 6))
    first = [env.step(a)[:2] for a in actions]
    for _ in range(3):  # wander off, then come back
        env.step(rng.uniform(-1, 1, 6))
    restored = restore_env_state(env, state)
    np.testing.assert_array_equal(restored, obs)
    second = [env.step(a)[:2] for a in actions]
    for (o1, r1), (o2, r2) in zip(first, second):
        np.testing.assert_array_equal(o1, o2)
        assert r1 == r2
    env.close()


def test_measure_on_mujoco_runs_end_to_end():
    env = gymnasium.make("Hopper-v5")
    weights = np.random.default_rng(0).normal(size=(3, 11)) * 0.1
    probe = GradientProbe(policy=lambda obs: np.tanh(obs @ weights.T),
                          critic_gradient=lambda obs, actions: np.ones_like(actions),
                          bootstrap_value=lambda obs: np.zeros(len(obs)))
    result = measure_gradient_accuracy(env, probe, num_states=3, num_actions=5, horizon=8, max_start_steps=20,
                                       rng=np.random.default_rng(0))
    assert result.cosine.shape == (3,) and np.all(np.abs(result.cosine[~np.isnan(result.cosine)]) <= 1 + 1e-9)
    env.close()


def test_envs_without_state_access_are_rejected():
    with pytest.raises(TypeError, match="cannot save its state"):
        save_env_state(gymnasium.make("CartPole-v1"), np.zeros(4))


class LinearDynamicsEnv(gymnasium.Env):
    """``s' = A s + B a``, ``r = c . s + d . a``: here the action *does* change the later states, so the
    return of "``a`` for ``k`` steps, then the linear policy ``a = K s``" depends on ``a`` through the whole
    rollout (a one-step reward gradient is not the answer). It is still affine in ``a``, with the slope
    :meth:`slope` in closed form."""

    def __init__(self, obs_dim=3, action_dim=2, seed=0):
        super().__init__()
        gen = np.random.default_rng(seed)
        q, _ = np.linalg.qr(gen.normal(size=(obs_dim, obs_dim)))
        self.a_matrix, self.b_matrix = 0.9 * q, 0.5 * gen.normal(size=(obs_dim, action_dim))
        self.c, self.d = gen.normal(size=obs_dim), 0.1 * gen.normal(size=action_dim)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (action_dim,), np.float32)
        self.state = np.zeros(obs_dim)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = self.np_random.normal(size=self.state.shape)
        return self.state.astype(np.float32), {}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        reward = float(self.c @ self.state + self.d @ a)
        self.state = self.a_matrix @ self.state + self.b_matrix @ a
        return self.state.astype(np.float32), reward, False, False, {}

    def get_sim_state(self):
        return self.state.copy()

    def set_sim_state(self, sim):
        self.state = np.array(sim, copy=True)

    def slope(self, gain, repeat, gamma, horizon):
        """d return / d a over ``horizon`` steps: x_t = d s_t / d a with x_0 = 0, x_{t+1} = A x_t + B while
        the action is held (t < repeat), then (A + B K) x_t; dr_t/da = c x_t + d, then (c + K^T d) x_t."""
        x = np.zeros_like(self.b_matrix)
        total = np.zeros(self.b_matrix.shape[1])
        for t in range(horizon):
            if t < repeat:
                total += gamma**t * (self.c @ x + self.d)
                x = self.a_matrix @ x + self.b_matrix
            else:
                total += gamma**t * ((self.c + gain.T @ self.d) @ x)
                x = (self.a_matrix + self.b_matrix @ gain) @ x
        return total


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_estimator_finds_the_multi_step_gradient_when_actions_move_the_state(sign):
    """The estimator's 'true gradient' is the slope of the repeated-action return, whose action effects run
    through the dynamics: a critic with exactly that gradient scores cosine +-1, while the one-step reward
    gradient d (what an env whose actions never move the state would reward) scores clearly less."""
    env = LinearDynamicsEnv(seed=5)
    gain = 0.1 * np.random.default_rng(6).normal(size=(2, 3))
    slope = env.slope(gain, repeat=3, gamma=0.9, horizon=25)
    assert abs(cosine_similarity(slope[None], env.d[None])[0]) < 0.9  # the dynamics matter here
    probe = GradientProbe(policy=lambda obs: np.asarray(obs, dtype=np.float64) @ gain.T,
                          critic_gradient=lambda obs, actions: sign * np.tile(slope, (len(obs), 1)),
                          bootstrap_value=lambda obs: np.zeros(len(obs)))
    result = measure_gradient_accuracy(env, probe, num_states=4, num_actions=6, repeat=3, gamma=0.9, horizon=25,
                                       max_start_steps=10, rng=np.random.default_rng(1))
    np.testing.assert_allclose(result.true_gradient, np.tile(slope, (4, 1)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(result.cosine, sign, atol=1e-6)
    one_step = GradientProbe(policy=probe.policy, critic_gradient=lambda obs, actions: np.tile(env.d, (len(obs), 1)),
                             bootstrap_value=probe.bootstrap_value)
    again = measure_gradient_accuracy(env, one_step, num_states=4, num_actions=6, repeat=3, gamma=0.9, horizon=25,
                                      max_start_steps=10, rng=np.random.default_rng(1))
    assert np.all(np.abs(again.cosine) < 0.9)
