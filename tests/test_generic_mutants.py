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
    with pytest.raises(RuntimeError, match="call reset"):
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
