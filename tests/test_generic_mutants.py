"""Tests written to kill the generic mutation tool's survivors in aclab/core and the env layer's autoreset
/ truncation code (docs/testing.md, `make mutation-generic`); each names the behaviour it pins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from aclab.core.distributions import tanh_normal_entropy_estimate
from aclab.core.distributions_extra import Beta, gamma_sample
from aclab.core.losses import normalize
from aclab.core.returns import leaky_vtrace, n_step_returns, vtrace
from aclab.envs import make_env


@pytest.mark.parametrize("k", [0.4, 1.0, 3.0, 9.0])
def test_gamma_sampler_follows_the_gamma_distribution(k):
    """Marsaglia-Tsang (and the k < 1 boost): 20000 draws pass a Kolmogorov-Smirnov test against
    scipy's Gamma(k, 1) and match its mean and variance."""
    generator = torch.Generator().manual_seed(int(10 * k))
    draws = gamma_sample(torch.full((20000,), k, dtype=torch.float64), generator).numpy()
    assert stats.kstest(draws, stats.gamma(k).cdf).pvalue > 1e-3
    assert draws.mean() == pytest.approx(k, rel=0.03) and draws.var() == pytest.approx(k, rel=0.06)


def test_beta_defaults_bounds_and_validation():
    """Defaults: the box [-1, 1] and concentrations >= 1; bounds must be finite with high > low; the mode
    is low + scale (a - 1) / (a + b - 2)."""
    beta = Beta(1)
    params = torch.tensor([[3.0, 3.0], [-30.0, -30.0]], dtype=torch.float64)
    torch.testing.assert_close(beta.mode(params[:1]), torch.zeros(1, 1, dtype=torch.float64))
    a, b = beta.concentrations(params[1:])
    assert float(a) == pytest.approx(1.0) and float(b) == pytest.approx(1.0)
    for low, high in ((0.0, 0.0), (0.0, np.nan), (np.inf, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="finite bounds"):
            Beta(1, low=low, high=high)
    box = Beta(1, low=0.1, high=0.7)
    mode = box.mode(params[:1])
    ca, cb = box.concentrations(params[:1])
    low, scale = float(np.float32(0.1)), float(np.float32(np.float64(0.7) - np.float64(0.1)))  # kept as float32
    expected = low + scale * (ca - 1) / (ca + cb - 2)
    torch.testing.assert_close(mode, expected, rtol=1e-12, atol=1e-14)


def test_normalize_gives_zero_mean_unit_unbiased_std():
    x = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    out = normalize(x)
    torch.testing.assert_close(out, (x - 4.0) / float(np.std([1, 2, 4, 9], ddof=1)), rtol=1e-7, atol=1e-9)


def test_leaky_vtrace_defaults_are_vtrace_and_shapes_are_checked():
    gen = torch.Generator().manual_seed(0)
    T, B = 5, 3
    log_rhos = 0.8 * torch.randn(T, B, generator=gen, dtype=torch.float64)
    rewards = torch.randn(T, B, generator=gen, dtype=torch.float64)
    values = torch.randn(T + 1, B, generator=gen, dtype=torch.float64)
    discounts = torch.full((T, B), 0.9, dtype=torch.float64)
    a = leaky_vtrace(log_rhos, rewards, values, discounts)
    b = vtrace(log_rhos, rewards, values, discounts, rho_bar=1.0, c_bar=1.0, rho_bar_pg=1.0)
    torch.testing.assert_close(a.vs, b.vs)
    torch.testing.assert_close(a.pg_advantages, b.pg_advantages)
    with pytest.raises(ValueError, match=r"log_rhos \(4, 3\) must match rewards \(5, 3\)"):
        leaky_vtrace(log_rhos[:4], rewards, values, discounts)
    with pytest.raises(ValueError):
        leaky_vtrace(log_rhos, rewards, values[:3], discounts)
    with pytest.raises(ValueError):
        n_step_returns(rewards, discounts, values[:3], 2)


def test_tanh_entropy_estimate_is_per_row_and_checks_its_sample_count():
    params = torch.tensor([[0.5, -2.0, 0.0, 0.3], [0.0, 1.0, -1.0, -0.5]])
    out = tanh_normal_entropy_estimate(params, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2,)
    again = tanh_normal_entropy_estimate(params, 1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, again)
    with pytest.raises(ValueError, match="n_samples must be >= 1, got 0"):
        tanh_normal_entropy_estimate(params, 0)


def test_vec_env_state_after_step_and_reset():
    """obs follows every step; reset() without a seed continues the streams; stepping first is an error;
    the reward scaler's discounted return restarts at an episode end seen through the VecEnv."""
    env = make_env("CartPole-v1", 2, seed=1, backend="gymnasium", options={"max_episode_steps": 5},
                   normalize_reward=True)
    with pytest.raises(RuntimeError, match=r"^call reset\(\) before step\(\)$"):
        env.step(np.zeros(2, dtype=np.int64))
    env.reset()
    for _ in range(5):
        result = env.step(np.zeros(2, dtype=np.int64))
        np.testing.assert_array_equal(env.obs, result.obs)
        if (result.terminated | result.truncated).any():
            ended = result.terminated | result.truncated
            assert (env.reward_scaler.returns[ended] == 0).all()
    first = env.reset()
    second = env.reset()
    assert not np.array_equal(first, second)  # the envs' random streams continue
    env.close()


def test_losses_on_inputs_where_signs_and_scales_matter():
    """PPO's clipped surrogate and the (clipped) value loss by hand with nonzero old log-probs, advantages
    away from +-1 and nonzero returns (inputs on which a swapped sign or a division would show)."""
    from aclab.core.losses import clipped_surrogate_loss, value_loss

    old = torch.tensor([-1.0, -0.5, -2.0], dtype=torch.float64)
    log_probs = old + torch.log(torch.tensor([1.3, 0.7, 1.05], dtype=torch.float64))  # ratios 1.3, 0.7, 1.05
    adv = torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)
    loss, _, clip_fraction = clipped_surrogate_loss(log_probs, old, adv, 0.2)
    # min(r A, clip(r) A): 1.2 * 2 = 2.4; min(-2.1, -2.4) = -2.4; 1.05 * 0.5 = 0.525
    assert float(loss) == pytest.approx(-(2.4 - 2.4 + 0.525) / 3)
    edge = clipped_surrogate_loss(torch.log(torch.tensor([1.2], dtype=torch.float64)), torch.zeros(1,
                                  dtype=torch.float64), torch.ones(1, dtype=torch.float64), 0.2 + 1e-12)[2]
    assert float(clip_fraction) == pytest.approx(2 / 3) and float(edge) == 0.0  # |r - 1| = eps is not clipped
    values = torch.tensor([1.0, 3.0], dtype=torch.float64)
    returns = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert float(value_loss(values, returns)) == pytest.approx(0.5 * (1 + 4) / 2)
    old_values = torch.tensor([0.0, 3.5], dtype=torch.float64)
    # V_clip = (0.2, 3.3): max((1-2)^2, (0.2-2)^2) = 3.24; max((3-1)^2, (3.3-1)^2) = 5.29
    assert float(value_loss(values, returns, old_values, 0.2)) == pytest.approx(0.5 * (3.24 + 5.29) / 2)
    up = value_loss(torch.tensor([5.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                    torch.tensor([0.0], dtype=torch.float64), 0.2)
    assert float(up) == pytest.approx(0.5 * 25.0)  # V_clip = 0.2: max(25, 0.04); clipped above as well as below
    far = value_loss(torch.tensor([5.0], dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64),
                     torch.tensor([0.0], dtype=torch.float64), 0.2)
    assert float(far) == pytest.approx(0.5 * 9.8 ** 2)  # V_clip = 0.2 (clipped at +0.2): (0.2 - 10)^2


def test_return_estimators_check_the_value_shape():
    from aclab.core.returns import gae, td_lambda_returns

    rewards = torch.zeros(4, 2)
    discounts = torch.full((4, 2), 0.9)
    for bad in (torch.zeros(4, 2), torch.zeros(6, 2), torch.zeros(5, 3)):
        for fn in (lambda v: gae(rewards, v, discounts, 0.9), lambda v: td_lambda_returns(rewards, v, discounts, 0.9),
                   lambda v: n_step_returns(rewards, discounts, v, 2),
                   lambda v: vtrace(torch.zeros(4, 2), rewards, v, discounts)):
            with pytest.raises(ValueError):
                fn(bad)
    with pytest.raises(ValueError, match=r"time-major \[T, B\], got shape \(4,\)"):
        gae(torch.zeros(4), torch.zeros(5), torch.zeros(4), 0.9)
    gen = torch.Generator().manual_seed(1)
    log_rhos, values = torch.randn(4, 2, generator=gen), torch.randn(5, 2, generator=gen)
    r = torch.randn(4, 2, generator=gen)
    torch.testing.assert_close(vtrace(log_rhos, r, values, discounts).vs,
                               vtrace(log_rhos, r, values, discounts, lambda_=1.0).vs)  # lambda defaults to 1


def test_beta_works_on_time_major_batches():
    """Batches [T, B, 2D] (time-major rollouts) reduce over the action dimension only."""
    beta = Beta(2)
    params = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat = params.reshape(12, 4)
    actions = beta.sample(params, torch.Generator().manual_seed(3))
    assert actions.shape == (3, 4, 2)
    torch.testing.assert_close(beta.log_prob(params, actions).reshape(12), beta.log_prob(flat, actions.reshape(12, 2)))
    torch.testing.assert_close(beta.entropy(params).reshape(12), beta.entropy(flat))
    other = params.flip(0)
    torch.testing.assert_close(beta.kl(params, other).reshape(12), beta.kl(flat, other.reshape(12, 4)))
    a, _ = beta.concentrations(params)
    assert a.shape == (3, 4, 2)


def test_make_distribution_accepts_categorical_for_discrete_and_rejects_it_for_box():
    import gymnasium

    from aclab.core.distributions import Categorical, make_distribution

    assert isinstance(make_distribution(gymnasium.spaces.Discrete(3), "categorical"), Categorical)
    with pytest.raises(ValueError, match="kind 'categorical' does not apply to a Box action space"):
        make_distribution(gymnasium.spaces.Box(-1, 1, (2,)), "categorical")
    with pytest.raises(ValueError, match=r"supported are gymnasium.spaces.Discrete \(Categorical\)"):
        make_distribution(gymnasium.spaces.MultiBinary(2))
