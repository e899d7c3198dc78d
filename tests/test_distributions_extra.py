"""The Beta policy of aclab.core.distributions_extra against torch.distributions and scipy."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch
from scipy import stats
from torch import distributions as td

from aclab.core.distributions_extra import (
    Beta,
    beta_concentrations,
    beta_entropy,
    beta_kl,
    beta_log_prob,
    beta_mode,
    gamma_sample,
    make_extra_distribution,
)


def _random_params(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0


def test_concentrations_are_one_plus_softplus():
    params = torch.tensor([[0.0, 3.0, -2.0, 10.0]], dtype=torch.float64)
    alpha, beta = beta_concentrations(params)
    assert torch.allclose(alpha, torch.tensor([[1 + math.log(2), 1 + math.log1p(math.exp(3.0))]], dtype=torch.float64))
    assert torch.allclose(beta, torch.tensor([[1 + math.log1p(math.exp(-2.0)), 1 + math.log1p(math.exp(10.0))]],
                                             dtype=torch.float64))
    alpha0, _ = beta_concentrations(params, min_concentration=0.0)
    assert torch.allclose(alpha0, alpha - 1.0)
    with pytest.raises(ValueError, match="even"):
        beta_concentrations(torch.zeros(3))


def test_log_prob_entropy_kl_match_torch_distributions():
    p, q = _random_params((50, 6), 1), _random_params((50, 6), 2)
    pa, pb = beta_concentrations(p, 0.3)
    qa, qb = beta_concentrations(q, 0.3)
    ref_p = td.Independent(td.Beta(pa, pb), 1)
    ref_q = td.Independent(td.Beta(qa, qb), 1)
    x = ref_p.sample(torch.Size()).clamp(1e-6, 1 - 1e-6)
    assert torch.allclose(beta_log_prob(pa, pb, x), ref_p.log_prob(x), atol=1e-9)
    assert torch.allclose(beta_entropy(pa, pb), ref_p.entropy(), atol=1e-9)
    assert torch.allclose(beta_kl(pa, pb, qa, qb), td.kl_divergence(ref_p, ref_q), atol=1e-9)
    assert torch.allclose(beta_kl(pa, pb, pa, pb), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    assert (beta_kl(pa, pb, qa, qb) > 0).all()


def test_scaled_adapter_on_a_box_matches_affine_change_of_variables():
    low, high = np.array([-2.0, 0.0, 1.0]), np.array([2.0, 0.5, 4.0])
    dist = Beta(3, low, high)
    params = _random_params((20, 6), 3).float()
    alpha, beta = dist.concentrations(params)
    scale = torch.as_tensor(high - low, dtype=torch.float32)
    low_t = torch.as_tensor(low, dtype=torch.float32)
    ref = td.Independent(td.TransformedDistribution(td.Beta(alpha, beta), td.AffineTransform(low_t, scale)), 1)
    actions = dist.sample(params, torch.Generator().manual_seed(0))
    assert actions.shape == (20, 3) and (actions > low_t).all() and (actions < low_t + scale).all()
    assert torch.allclose(dist.log_prob(params, actions), ref.log_prob(actions), atol=1e-4)
    expected_entropy = td.Independent(td.Beta(alpha, beta), 1).entropy() + float(np.log(high - low).sum())
    assert torch.allclose(dist.entropy(params), expected_entropy, atol=1e-5)
    other = _random_params((20, 6), 4).float()
    oa, ob = dist.concentrations(other)
    # KL is invariant under the shared affine map
    expected_kl = td.kl_divergence(td.Independent(td.Beta(alpha, beta), 1), td.Independent(td.Beta(oa, ob), 1))
    assert torch.allclose(dist.kl(params, other), expected_kl, atol=1e-5)
    assert dist.param_dim == 6 and dist.action_shape == (3,)


def test_mode_is_the_density_maximum():
    alpha = torch.tensor([2.0, 5.0, 1.5], dtype=torch.float64)
    beta = torch.tensor([3.0, 1.2, 1.5], dtype=torch.float64)
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    densities = td.Beta(alpha, beta).log_prob(grid[:, None])
    assert torch.allclose(beta_mode(alpha, beta), grid[densities.argmax(0)], atol=1e-4)
    # below 1 the density is unbounded at an edge: the mean is returned instead
    assert torch.allclose(beta_mode(torch.tensor([0.5]), torch.tensor([2.0])), torch.tensor([0.2]))


@pytest.mark.parametrize("k", [0.3, 1.0, 2.5, 40.0])
def test_gamma_sampler_matches_the_gamma_law(k):
    samples = gamma_sample(torch.full((20000,), k, dtype=torch.float64), torch.Generator().manual_seed(1))
    result = stats.kstest(samples.numpy(), stats.gamma(k).cdf)
    assert result.pvalue > 1e-3
    assert abs(float(samples.mean()) - k) < 5 * math.sqrt(k / 20000)


def test_beta_samples_match_the_beta_law_and_are_reproducible():
    dist = Beta(1, 0.0, 1.0, min_concentration=0.0)
    raw = torch.tensor([[math.log(math.expm1(0.7)), math.log(math.expm1(3.0))]]).expand(30000, 2)
    a = dist.sample(raw, torch.Generator().manual_seed(5))
    b = dist.sample(raw, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    result = stats.kstest(a.squeeze(1).double().numpy(), stats.beta(0.7, 3.0).cdf)
    assert result.pvalue > 1e-3
    assert torch.isfinite(dist.log_prob(raw, a)).all()


def test_make_extra_distribution_checks_the_space():
    box = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    assert isinstance(make_extra_distribution(box, "beta"), Beta)
    with pytest.raises(ValueError, match="1-D Box"):
        make_extra_distribution(gymnasium.spaces.Discrete(3), "beta")
    with pytest.raises(ValueError, match="finite bounds"):
        make_extra_distribution(gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32), "beta")
    with pytest.raises(ValueError, match="unknown"):
        make_extra_distribution(box, "dirichlet")
