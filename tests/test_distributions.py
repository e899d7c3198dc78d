"""Tests of aclab.core.distributions against torch.distributions, sampling statistics and
change-of-variables references."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch
from torch import distributions as td

from aclab.core.distributions import (
    Categorical,
    DiagGaussian,
    TanhGaussian,
    categorical_entropy,
    categorical_kl,
    categorical_log_prob,
    categorical_mode,
    categorical_sample,
    make_distribution,
    normal_entropy,
    normal_kl,
    normal_log_prob,
    normal_mode,
    normal_sample,
    tanh_log_abs_det_jacobian,
    tanh_normal_entropy_estimate,
    tanh_normal_kl,
    tanh_normal_log_prob,
    tanh_normal_sample,
    tanh_normal_sample_and_log_prob,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64) * 2.0


def random_gaussian_params(*shape: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = generator(seed)
    mean = torch.randn(*shape, dim, generator=g, dtype=torch.float64)
    log_std = torch.rand(*shape, dim, generator=g, dtype=torch.float64) * 2.0 - 1.5
    return torch.cat([mean, log_std], dim=-1)


def torch_normal(params: torch.Tensor) -> td.Independent:
    mean, log_std = params.chunk(2, dim=-1)
    return td.Independent(td.Normal(mean, log_std.exp()), 1)


# ----------------------------------------------------------------------------------------------
# Categorical
# ----------------------------------------------------------------------------------------------
def test_categorical_matches_torch_distributions():
    logits, other = random_logits(5, 4, 6, seed=1), random_logits(5, 4, 6, seed=2)
    actions = torch.randint(0, 6, (5, 4), generator=generator(3))
    reference, reference_other = td.Categorical(logits=logits), td.Categorical(logits=other)
    torch.testing.assert_close(categorical_log_prob(logits, actions), reference.log_prob(actions))
    torch.testing.assert_close(categorical_entropy(logits), reference.entropy())
    torch.testing.assert_close(categorical_kl(logits, other), td.kl_divergence(reference, reference_other))
    torch.testing.assert_close(categorical_mode(logits), reference.probs.argmax(-1))


def test_categorical_with_masked_actions():
    logits = random_logits(3, 5, seed=4)
    logits[:, 1] = -math.inf
    entropy = categorical_entropy(logits)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy, categorical_entropy(logits[:, [0, 2, 3, 4]]))
    assert torch.isfinite(categorical_kl(logits, random_logits(3, 5, seed=5))).all()
    samples = categorical_sample(logits.expand(2000, 3, 5), generator(0))
    assert not (samples == 1).any()


def test_categorical_kl_matches_its_definition_in_each_direction():
    """KL(p || q) = sum_a p(a) (log p(a) - log q(a)), per row; it is asymmetric and 0 on itself."""
    p, q = random_logits(200, 7, seed=6), random_logits(200, 7, seed=7)
    log_p, log_q = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    torch.testing.assert_close(categorical_kl(p, q), (log_p.exp() * (log_p - log_q)).sum(-1))
    torch.testing.assert_close(categorical_kl(q, p), (log_q.exp() * (log_q - log_p)).sum(-1))
    assert (categorical_kl(p, q) - categorical_kl(q, p)).abs().max() > 1e-2
    torch.testing.assert_close(categorical_kl(p, p), torch.zeros(200, dtype=torch.float64))


def test_categorical_sample_frequencies_match_probabilities():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0], dtype=torch.float64)
    n = 40_000
    samples = categorical_sample(logits.expand(n, 5), generator(11))
    assert samples.dtype == torch.int64 and samples.shape == (n,)
    frequencies = torch.bincount(samples, minlength=5).double() / n
    probs = torch.softmax(logits, -1)
    standard_error = torch.sqrt(probs * (1 - probs) / n)
    assert ((frequencies - probs).abs() < 5 * standard_error + 1e-12).all(), (frequencies, probs)


def test_same_seed_same_samples():
    logits = random_logits(64, 6, seed=8)
    params = random_gaussian_params(64, dim=3, seed=8)
    for sample in (categorical_sample, normal_sample, tanh_normal_sample):
        x = logits if sample is categorical_sample else params
        torch.testing.assert_close(sample(x, generator(5)), sample(x, generator(5)))
        assert not torch.equal(sample(x, generator(5)), sample(x, generator(6)))


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussian
# ----------------------------------------------------------------------------------------------
def test_normal_matches_torch_distributions():
    p, q = random_gaussian_params(5, 4, dim=3, seed=1), random_gaussian_params(5, 4, dim=3, seed=2)
    actions = torch.randn(5, 4, 3, generator=generator(3), dtype=torch.float64)
    torch.testing.assert_close(normal_log_prob(p, actions), torch_normal(p).log_prob(actions))
    torch.testing.assert_close(normal_entropy(p), torch_normal(p).entropy())
    torch.testing.assert_close(normal_kl(p, q), td.kl_divergence(torch_normal(p), torch_normal(q)))
    torch.testing.assert_close(normal_mode(p), p[..., :3])
    assert (normal_kl(p, q) > 0).all()
    torch.testing.assert_close(normal_kl(p, p), torch.zeros(5, 4, dtype=torch.float64))


def test_normal_sample_moments_and_reparameterisation():
    params = torch.tensor([0.7, -2.0, math.log(0.5), math.log(3.0)], dtype=torch.float64)
    n = 50_000
    samples = normal_sample(params.expand(n, 4), generator(12))
    mean, std = torch.tensor([0.7, -2.0]), torch.tensor([0.5, 3.0])
    sample_mean, sample_std = samples.mean(0).float(), samples.std(0).float()
    assert ((sample_mean - mean).abs() < 5 * std / math.sqrt(n)).all()
    assert ((sample_std - std).abs() < 5 * std / math.sqrt(2 * n)).all()
    leaf = params.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(normal_sample(leaf, generator(0)).sum(), leaf)
    torch.testing.assert_close(grad[:2], torch.ones(2, dtype=torch.float64))


def test_odd_gaussian_params_raise():
    with pytest.raises(ValueError, match="even"):
        normal_entropy(torch.zeros(3, 5))


# ----------------------------------------------------------------------------------------------
# Tanh-squashed Gaussian
# ----------------------------------------------------------------------------------------------
def _change_of_variables_log_density(params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Reference: log p_A(a) = log N(atanh a) + log |d atanh(a) / da| = log N(atanh a) - log(1 - a^2)."""
    pre_tanh = torch.atanh(actions)
    return torch_normal(params).log_prob(pre_tanh) - torch.log1p(-actions.square()).sum(-1)


def test_tanh_log_prob_matches_change_of_variables_reference():
    params = random_gaussian_params(6, 5, dim=2, seed=3)
    actions = tanh_normal_sample(params, generator(4))
    pre_tanh = torch.atanh(actions)
    expected = _change_of_variables_log_density(params, actions)
    torch.testing.assert_close(tanh_normal_log_prob(params, actions), expected)
    torch.testing.assert_close(tanh_normal_log_prob(params, actions, pre_tanh=pre_tanh), expected)
    sampled, log_prob = tanh_normal_sample_and_log_prob(params, generator(4))
    torch.testing.assert_close(sampled, actions)
    torch.testing.assert_close(log_prob, expected)


def test_tanh_log_prob_integrates_to_one_in_1d():
    params = torch.tensor([0.4, math.log(0.8)], dtype=torch.float64)
    grid = torch.linspace(-1 + 1e-9, 1 - 1e-9, 400_001, dtype=torch.float64)
    density = tanh_normal_log_prob(params.expand(len(grid), 2), grid.unsqueeze(-1)).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)


def test_tanh_jacobian_is_stable_for_large_pre_tanh_values():
    pre_tanh = torch.tensor([-40.0, -20.0, 0.0, 3.0, 20.0, 40.0])
    stable = tanh_log_abs_det_jacobian(pre_tanh)
    assert torch.isfinite(stable).all()
    exact = 2 * (
        math.log(2.0) - pre_tanh.double().abs() - torch.nn.functional.softplus(-2 * pre_tanh.double().abs())
    )
    torch.testing.assert_close(stable.double(), exact, rtol=1e-6, atol=1e-5)
    params = torch.tensor([[0.0, 0.0]]).expand(6, 2)
    log_prob = tanh_normal_log_prob(params, torch.tanh(pre_tanh).unsqueeze(-1), pre_tanh.unsqueeze(-1))
    assert torch.isfinite(log_prob).all()
    assert torch.isfinite(tanh_normal_log_prob(params, torch.tensor([[1.0]] * 6))).all()


def test_tanh_kl_equals_gaussian_kl_and_monte_carlo():
    p = torch.tensor([0.3, -0.2, math.log(0.4), math.log(0.3)], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, math.log(0.5), math.log(0.25)], dtype=torch.float64)
    torch.testing.assert_close(tanh_normal_kl(p, q), normal_kl(p, q))
    n = 200_000
    actions, log_p = tanh_normal_sample_and_log_prob(p.expand(n, 4), generator(21))
    log_q = tanh_normal_log_prob(q.expand(n, 4), actions)  # through atanh: a genuine density on (-1, 1)^2
    log_ratio = log_p - log_q
    estimate, standard_error = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    assert abs(estimate - tanh_normal_kl(p, q)) < 5 * standard_error


def test_tanh_entropy_estimate_matches_numerical_integration():
    params = torch.tensor([0.4, math.log(0.8)], dtype=torch.float64)
    grid = torch.linspace(-1 + 1e-9, 1 - 1e-9, 400_001, dtype=torch.float64)
    log_density = tanh_normal_log_prob(params.expand(len(grid), 2), grid.unsqueeze(-1))
    entropy = -torch.trapezoid(log_density.exp() * log_density, grid)
    n = 100_000
    estimate = tanh_normal_entropy_estimate(params, n_samples=n, generator=generator(2))
    samples = torch.randn(n, generator=generator(2), dtype=torch.float64) * 0.8 + 0.4
    standard_error = tanh_log_abs_det_jacobian(samples).std() / math.sqrt(n)
    assert abs(estimate - entropy) < 5 * standard_error
    assert estimate < normal_entropy(params)  # squashing into (-1, 1) lowers the entropy


def test_tanh_samples_are_inside_the_open_interval():
    params = random_gaussian_params(1000, dim=3, seed=9)
    actions = tanh_normal_sample(params, generator(1))
    assert actions.abs().max() < 1
    torch.testing.assert_close(TanhGaussian(3).mode(params), torch.tanh(params[..., :3]))


# ----------------------------------------------------------------------------------------------
# Adapters and make_distribution
# ----------------------------------------------------------------------------------------------
def test_make_distribution_picks_the_adapter():
    assert isinstance(make_distribution(gymnasium.spaces.Discrete(4)), Categorical)
    box = gymnasium.spaces.Box(-1.0, 1.0, shape=(3,))
    assert isinstance(make_distribution(box), DiagGaussian)
    assert isinstance(make_distribution(box, kind="diag_gaussian"), DiagGaussian)
    assert isinstance(make_distribution(box, kind="tanh_gaussian"), TanhGaussian)
    assert make_distribution(gymnasium.spaces.Discrete(4)).param_dim == 4
    assert make_distribution(box).param_dim == 6


@pytest.mark.parametrize(
    "space,kind,message",
    [
        (gymnasium.spaces.MultiDiscrete([2, 3]), "auto", "Discrete.*Box"),
        (gymnasium.spaces.Dict({"a": gymnasium.spaces.Discrete(2)}), "auto", "supported"),
        (gymnasium.spaces.Box(-1, 1, shape=(2, 2)), "auto", "1-D"),
        (gymnasium.spaces.Discrete(3, start=1), "auto", "start"),
        (gymnasium.spaces.Discrete(3), "tanh_gaussian", "categorical"),
        (gymnasium.spaces.Box(-1, 1, shape=(2,)), "categorical", "Box"),
        (gymnasium.spaces.Box(-1, 1, shape=(2,)), "beta", "unknown"),
    ],
)
def test_make_distribution_rejects_bad_input(space, kind, message):
    with pytest.raises(ValueError, match=message):
        make_distribution(space, kind)


@pytest.mark.parametrize("dist", [Categorical(5), DiagGaussian(3), TanhGaussian(3)])
def test_adapters_have_consistent_shapes(dist):
    params = torch.randn(7, 2, dist.param_dim, generator=generator(0))
    actions = dist.sample(params, generator(1))
    assert actions.shape == (7, 2, *dist.action_shape)
    assert dist.log_prob(params, actions).shape == (7, 2)
    assert dist.entropy(params).shape == (7, 2)
    assert dist.kl(params, params.flip(0)).shape == (7, 2)
    torch.testing.assert_close(dist.kl(params, params), torch.zeros(7, 2))
    assert dist.mode(params).shape == (7, 2, *dist.action_shape)
    torch.testing.assert_close(dist.sample(params, generator(1)), actions)


def test_adapters_delegate_to_the_functions():
    logits = random_logits(4, 5, seed=1)
    actions = categorical_sample(logits, generator(0))
    torch.testing.assert_close(
        Categorical(5).log_prob(logits, actions), categorical_log_prob(logits, actions)
    )
    params = random_gaussian_params(4, dim=2, seed=2)
    torch.testing.assert_close(DiagGaussian(2).entropy(params), normal_entropy(params))
    squashed = TanhGaussian(2)
    sampled, log_prob = squashed.sample_and_log_prob(params, generator(3))
    torch.testing.assert_close(squashed.log_prob(params, sampled), log_prob)
    np.testing.assert_allclose(
        squashed.entropy(params, n_samples=1, generator=generator(4)).numpy(),
        tanh_normal_entropy_estimate(params, 1, generator(4)).numpy(),
    )
