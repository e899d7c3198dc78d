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
    # eps is added to the std (a near-constant batch is not blown up)
    torch.testing.assert_close(normalize(x, eps=0.5), (x - 4.0) / (float(np.std([1, 2, 4, 9], ddof=1)) + 0.5))


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
    from aclab.core.returns import discounted_returns, gae, td_lambda_returns

    rewards = torch.zeros(4, 2)
    discounts = torch.full((4, 2), 0.9)
    for bad in (torch.zeros(4, 2), torch.zeros(6, 2), torch.zeros(5, 3)):
        for fn in (lambda v: gae(rewards, v, discounts, 0.9), lambda v: td_lambda_returns(rewards, v, discounts, 0.9),
                   lambda v: n_step_returns(rewards, discounts, v, 2),
                   lambda v: vtrace(torch.zeros(4, 2), rewards, v, discounts),
                   lambda v: discounted_returns(rewards, discounts, torch.zeros(2), torch.zeros(4, 2), values=v)):
            with pytest.raises(ValueError):
                fn(bad)
    with pytest.raises(ValueError, match=r"^values must be \[T \+ 1, B\] = \(5, 2\), got \(4, 2\)$"):
        gae(rewards, torch.zeros(4, 2), discounts, 0.9)
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
    with pytest.raises(ValueError, match=r"^kind 'categorical' does not apply to a Box action space$"):
        make_distribution(gymnasium.spaces.Box(-1, 1, (2,)), "categorical")
    with pytest.raises(ValueError, match=r"supported are gymnasium.spaces.Discrete \(Categorical\)"):
        make_distribution(gymnasium.spaces.MultiBinary(2))


# --- survivors of the fresh aclab/core run on main fef081e (issue 16) ---------------------------------


def test_tanh_entropy_estimate_equals_the_change_of_variables_formula_per_row():
    """H(tanh u) = H(u) + E[sum_d log(1 - tanh(u_d)^2)], the expectation averaged over the n_samples draws
    of each row (not over the rows too), written out with the same noise."""
    params = torch.tensor([[0.5, -2.0, 0.0, 0.3], [3.0, 1.0, -1.0, -0.5], [0.0, 0.0, 0.2, 0.2]], dtype=torch.float64)
    out = tanh_normal_entropy_estimate(params, 4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((4, 3, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mean, log_std = params[:, :2], params[:, 2:]
    u = mean + log_std.exp() * noise
    gaussian = (log_std + 0.5 * np.log(2 * np.pi * np.e)).sum(-1)
    expected = gaussian + torch.log(1 - torch.tanh(u) ** 2).sum(-1).mean(0)
    torch.testing.assert_close(out, expected)


def test_tanh_gaussian_adapter_passes_every_argument_through():
    """The TanhGaussian adapter: its sizes come from action_dim, its sampler uses the caller's generator,
    log_prob uses the pre-tanh value when given (exact where tanh(u) rounds to 1), and entropy defaults to
    one sample."""
    from aclab.core.distributions import TanhGaussian

    dist = TanhGaussian(3)
    assert dist.action_dim == 3 and dist.param_dim == 6 and dist.action_shape == (3,)
    params = torch.tensor([[0.1, -0.4, 2.0, -1.0, 0.0, -2.0]], dtype=torch.float64)
    mean, log_std = params[:, :3], params[:, 3:]
    actions, log_prob = dist.sample_and_log_prob(params, torch.Generator().manual_seed(11))
    u = mean + log_std.exp() * torch.randn((1, 3), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(actions, torch.tanh(u))
    normal = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(log_prob, (normal.log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1))
    # u = 20: tanh(u) is 1.0 in float64, atanh cannot recover u, the given pre_tanh is exact
    far = torch.tensor([[20.0, 0.3, -0.2]], dtype=torch.float64)
    exact = normal.log_prob(far).sum(-1) - (2 * (np.log(2) - far - torch.nn.functional.softplus(-2 * far))).sum(-1)
    torch.testing.assert_close(dist.log_prob(params, torch.tanh(far), pre_tanh=far), exact)
    # actions exactly at -1 / +1 without pre_tanh: atanh of the action clamped one epsilon inside
    edge = 1 - float(torch.finfo(torch.float64).eps)
    for sign in (-1.0, 1.0):
        at_edge = torch.full((1, 3), sign, dtype=torch.float64)
        inside = torch.full((1, 3), sign * edge, dtype=torch.float64)
        value = dist.log_prob(params, at_edge)
        assert bool(torch.isfinite(value).all())
        torch.testing.assert_close(value, dist.log_prob(params, inside, pre_tanh=torch.atanh(inside)))
    one_draw = tanh_normal_entropy_estimate(params, 1, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dist.entropy(params, generator=torch.Generator().manual_seed(4)), one_draw)


def test_beta_log_prob_is_finite_at_the_box_edges():
    """Actions exactly at low or high (a sampler's clamp, a user's action) are moved strictly inside (0, 1)
    by one machine epsilon of their dtype, so the log density is finite and equals scipy's there."""
    alpha, beta = torch.tensor([[2.5]]), torch.tensor([[3.0]])
    from aclab.core.distributions_extra import beta_log_prob

    eps = float(torch.finfo(torch.float32).eps)
    for x, inside in ((0.0, eps), (1.0, 1.0 - eps), (-0.5, eps), (1.5, 1.0 - eps)):
        value = beta_log_prob(alpha, beta, torch.tensor([[x]]))
        assert float(value) == pytest.approx(stats.beta(2.5, 3.0).logpdf(np.float32(inside)), rel=1e-4), x


def test_beta_samples_are_gamma_ratios_in_float64_returned_in_the_input_dtype():
    """beta_sample_unit = G_a / (G_a + G_b) with both Gamma variates drawn and divided in float64, then cast
    to the input dtype and kept strictly inside (0, 1). Concentrations of 0.02 make many variates smaller
    than float32's tiniest number, where a float32 variate would be 0 and give 0 or 1 instead of the
    ratio."""
    from aclab.core.distributions_extra import beta_sample_unit

    alpha = torch.full((4000,), 0.02)
    out = beta_sample_unit(alpha, alpha, torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    g_a = gamma_sample(alpha.double(), generator)
    g_b = gamma_sample(alpha.double(), generator)
    eps = float(torch.finfo(torch.float32).eps)
    assert bool(((g_a < 1e-45) & (g_b < 1e-45) & (g_a > 0) & (g_b > 0)).any())  # the case that tells float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (g_a / (g_a + g_b)).float().clamp(eps, 1 - eps), rtol=0, atol=0)
    assert float(out.min()) == eps and float(out.max()) == 1 - eps  # both clamps reached


def test_extra_distribution_needs_a_one_dimensional_box_and_keeps_its_bounds():
    import gymnasium

    from aclab.core.distributions_extra import make_extra_distribution

    dist = make_extra_distribution(gymnasium.spaces.Box(np.array([-2.0, 0.0]), np.array([3.0, 0.5])), "beta")
    params = torch.tensor([[2.0, 0.5, 0.0, 1.0]])  # [raw_alpha, raw_beta]
    a, b = 1 + torch.nn.functional.softplus(params[:, :2]), 1 + torch.nn.functional.softplus(params[:, 2:])
    unit_mode = (a - 1) / (a + b - 2)
    torch.testing.assert_close(dist.mode(params), torch.tensor([[-2.0, 0.0]]) + torch.tensor([[5.0, 0.5]]) * unit_mode)
    with pytest.raises(ValueError, match="1-D Box"):
        make_extra_distribution(gymnasium.spaces.Box(-1, 1, (2, 2)), "beta")
    with pytest.raises(ValueError, match="1-D Box"):
        make_extra_distribution(gymnasium.spaces.Discrete(3), "beta")


def _marsaglia_tsang_loop(k: list[float], seed: int) -> list[float]:
    """The documented sampler one element at a time in plain Python floats, drawing from the generator as
    the vectorised code does: every round one float64 normal and one uniform for each element (accepted
    or not), and after the last round one uniform each for the k < 1 boost."""
    import math

    generator = torch.Generator().manual_seed(seed)
    n = len(k)
    k_eff = [x + 1.0 if x < 1.0 else x for x in k]
    result, pending = [0.0] * n, [True] * n
    while any(pending):
        z = torch.randn(n, generator=generator, dtype=torch.float64).tolist()
        u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        for i in range(n):
            d = k_eff[i] - 1.0 / 3.0
            c = 1.0 / math.sqrt(9.0 * d)
            v = (1.0 + c * z[i]) ** 3
            if v > 0 and math.log(u[i]) < 0.5 * z[i] ** 2 + d - d * v + d * math.log(v):
                if pending[i]:
                    result[i] = d * v
                pending[i] = False
    if any(x < 1.0 for x in k):
        u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        result = [r * u[i] ** (1.0 / k[i]) if k[i] < 1.0 else r for i, r in enumerate(result)]
    return result


def test_gamma_sampler_is_marsaglia_tsang_in_float64_draw_for_draw():
    """Marsaglia & Tsang (2000) as the docstring states it (d = k - 1/3, c = 1 / sqrt(9 d), the k < 1 boost
    by u^(1/k), float64 draws), checked draw for draw against a per-element loop on the same seed; a float32
    concentration gives the float64 result cast to float32 (computed in float64)."""
    k = [0.25, 0.75, 1.0, 1.5, 2.0, 4.0, 30.0] * 30  # exact in float32
    out = gamma_sample(torch.tensor(k, dtype=torch.float64), torch.Generator().manual_seed(21))
    torch.testing.assert_close(out, torch.tensor(_marsaglia_tsang_loop(k, 21), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    single = gamma_sample(torch.tensor(k, dtype=torch.float32), torch.Generator().manual_seed(21))
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, out.float(), rtol=0, atol=0)


def test_n_step_returns_keep_the_rewards_dtype_whatever_the_episode_ends_dtype():
    """Episode-end flags given as float64 (or bool) mark where the sum stops; they never change the returns'
    dtype (float32 rewards give float32 returns, equal to the float64 computation)."""
    generator = torch.Generator().manual_seed(4)
    rewards, values = torch.randn(5, 2, generator=generator), torch.randn(6, 2, generator=generator)
    discounts = torch.full((5, 2), 0.9)
    ends = torch.zeros(5, 2, dtype=torch.float64)
    ends[1, 0] = ends[3, 1] = 1.0
    reference = n_step_returns(rewards.double(), values.double(), discounts.double(), 3, ends)
    for flags in (ends, ends.bool()):
        out = n_step_returns(rewards, values, discounts, 3, flags)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference.float())
