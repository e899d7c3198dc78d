"""Tests of aclab.analysis.noise_scale on problems whose gradient mean and covariance are known.

Synthetic problem: per-sample loss ``0.5 |w - x_i|^2`` with ``x_i ~ N(mu, Sigma)``, so the per-sample
gradient is ``w - x_i``: true gradient ``G = w - mu``, gradient covariance ``Sigma``, and
``B_simple = tr(Sigma) / |w - mu|^2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aclab.analysis.noise_scale import (
    GradientNoiseScale,
    batch_gradient,
    measure_noise_scale,
    trace_covariance_estimate,
    true_gradient_sq_estimate,
)
from aclab.nets.encoders import MLP

DIM = 4
MU = np.array([1.0, -0.5, 0.25, 2.0])
W = np.array([1.5, -0.5, -0.25, 2.0])  # G = w - mu = (0.5, 0, -0.5, 0): |G|^2 = 0.5
SIGMA = np.diag([1.0, 2.0, 0.5, 0.5]) + 0.3 * (np.ones((DIM, DIM)) - np.eye(DIM))  # tr = 4
TRUE_G2 = float(np.sum((W - MU) ** 2))
TRUE_TRACE = float(np.trace(SIGMA))


def test_formulas_on_hand_computed_numbers() -> None:
    # b_small = 2, b_big = 10, |G_small|^2 = 5, |G_big|^2 = 3:
    # |G|^2 = (10*3 - 2*5) / 8 = 2.5; S = (5 - 3) / (1/2 - 1/10) = 5
    assert true_gradient_sq_estimate(5.0, 3.0, 2, 10) == pytest.approx(2.5)
    assert trace_covariance_estimate(5.0, 3.0, 2, 10) == pytest.approx(5.0)
    estimate = GradientNoiseScale(b_small=2, b_big=10, g2_smoothing=0.0).update([4.0, 6.0], 3.0)
    assert (estimate.g_small_sq, estimate.g2, estimate.s) == pytest.approx((5.0, 2.5, 5.0))
    assert estimate.b_simple == pytest.approx(2.0)
    assert estimate.sigma == pytest.approx(math.sqrt(2.0))
    with pytest.raises(ValueError):
        true_gradient_sq_estimate(1.0, 1.0, 10, 10)


def test_expected_norms_give_the_true_values_exactly() -> None:
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B and both estimators are linear in the squared norms
    for b_small, b_big in [(32, 16384), (1, 2), (7, 100)]:
        small = TRUE_G2 + TRUE_TRACE / b_small
        big = TRUE_G2 + TRUE_TRACE / b_big
        estimate = GradientNoiseScale(b_small, b_big).update([small] * 3, big)
        assert estimate.g2 == pytest.approx(TRUE_G2, rel=1e-9)
        assert estimate.s == pytest.approx(TRUE_TRACE, rel=1e-9)
        assert estimate.b_simple == pytest.approx(TRUE_TRACE / TRUE_G2, rel=1e-9)


def test_estimators_are_unbiased_on_fresh_gaussian_samples() -> None:
    rng = np.random.default_rng(0)
    trials, b_small, b_big, num_small = 4000, 4, 64, 3
    chol = np.linalg.cholesky(SIGMA)

    def mean_gradients(batch: int, count: int) -> np.ndarray:
        x = MU + rng.standard_normal((trials, count, batch, DIM)) @ chol.T
        return (W - x).mean(axis=2)  # [trials, count, DIM]

    g_big_sq = np.sum(mean_gradients(b_big, 1)[:, 0] ** 2, axis=-1)
    g_small_sq = np.sum(mean_gradients(b_small, num_small) ** 2, axis=-1)  # [trials, num_small]
    estimator = GradientNoiseScale(b_small, b_big, g2_smoothing=0.0)
    estimates = [estimator.update(g_small_sq[i], g_big_sq[i]) for i in range(trials)]
    g2 = np.array([e.g2 for e in estimates])
    s = np.array([e.s for e in estimates])
    for values, truth in [(g2, TRUE_G2), (s, TRUE_TRACE)]:
        standard_error = values.std() / math.sqrt(trials)
        assert abs(values.mean() - truth) < 4 * standard_error
    # the naive estimates are visibly biased at this sample size, so the check above can fail
    assert g_small_sq.mean() - TRUE_G2 > 10 * (g_small_sq.std() / math.sqrt(g_small_sq.size))
    assert g_big_sq.mean() - TRUE_G2 > 5 * (g_big_sq.std() / math.sqrt(g_big_sq.size))


def test_smoothing_follows_the_recursion() -> None:
    estimator = GradientNoiseScale(b_small=2, b_big=10, g2_smoothing=0.5, s_smoothing=0.0)
    first = estimator.update([5.0], 3.0)  # g2 = 2.5, s = 5
    assert (first.g2_smoothed, first.s_smoothed) == pytest.approx((2.5, 5.0))  # first call initialises
    second = estimator.update([9.0], 1.0)  # g2 = (10 - 18) / 8 = -1, s = 8 / 0.4 = 20
    assert (second.g2, second.s) == pytest.approx((-1.0, 20.0))
    assert second.g2_smoothed == pytest.approx(0.5 * 2.5 + 0.5 * -1.0)
    assert second.s_smoothed == pytest.approx(20.0)  # S is not smoothed by default (Algorithm 2)
    assert second.b_simple == pytest.approx(20.0 / 0.75)
    third = estimator.update([9.0], 1.0)
    assert third.g2_smoothed == pytest.approx(0.5 * 0.75 - 0.5)
    assert third.b_simple == math.inf and third.sigma == math.inf  # smoothed |G|^2 <= 0

    both = GradientNoiseScale(b_small=2, b_big=10, g2_smoothing=0.5, s_smoothing=0.25)
    both.update([5.0], 3.0)
    assert both.update([9.0], 1.0).s_smoothed == pytest.approx(0.25 * 5.0 + 0.75 * 20.0)
    negative = GradientNoiseScale(b_small=2, b_big=10, g2_smoothing=0.0).update([1.0], 3.0)  # s < 0
    assert negative.b_simple < 0 and negative.sigma == 0.0

    restored = GradientNoiseScale(b_small=2, b_big=10, g2_smoothing=0.5)
    restored.load_state_dict(estimator.state_dict())
    assert restored.update([5.0], 3.0) == estimator.update([5.0], 3.0)
    with pytest.raises(ValueError):
        GradientNoiseScale(g2_smoothing=1.0)


# ---------------------------------------------------------------------------------------------------------
# The helper on a finite data set
# ---------------------------------------------------------------------------------------------------------
def make_dataset(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = MU + rng.standard_normal((size, DIM)) @ np.linalg.cholesky(SIGMA).T
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    return torch.tensor(x), w


def quadratic_loss(x: torch.Tensor, w: torch.Tensor):
    return lambda indices: 0.5 * ((w - x[indices]) ** 2).sum(dim=1).mean()


def population_values(x: torch.Tensor) -> tuple[float, float]:
    """|G_D|^2 and the Bessel-corrected trace s^2 of the per-sample gradient covariance over the data."""
    grads = torch.tensor(W) - x
    return float(grads.mean(0).pow(2).sum()), float(grads.var(0, unbiased=True).sum())


def test_batch_gradient_chunks_and_leaves_grad_untouched() -> None:
    x, w = make_dataset(100)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([3, 17, 42, 5, 99, 0, 64])
    expected = (w - x[indices]).mean(0).detach()
    for chunk in [None, 1, 3, 7, 50]:
        grad_w, grad_unused = batch_gradient(quadratic_loss(x, w), [w, unused], indices, chunk)
        torch.testing.assert_close(grad_w, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(grad_unused, torch.zeros(3, dtype=torch.float64))
    assert w.grad is None and unused.grad is None


@pytest.mark.parametrize("small_batches", ["independent", "partition"])
def test_helper_is_unbiased_for_the_finite_data_set(small_batches: str) -> None:
    size, b_small, b_big = 512, 8, 128
    x, w = make_dataset(size, seed=1)
    g_data, s2 = population_values(x)
    estimator = GradientNoiseScale(b_small, b_big, g2_smoothing=0.0)
    generator = torch.Generator().manual_seed(0)
    loss = quadratic_loss(x, w)
    estimates = [
        measure_noise_scale(
            estimator, loss, [w], size, num_small_batches=4, small_batches=small_batches, generator=generator
        )
        for _ in range(400)
    ]
    assert estimates[0].num_small_batches == (4 if small_batches == "independent" else b_big // b_small)
    g2 = np.array([e.g2 for e in estimates])
    s = np.array([e.s for e in estimates])
    # sampling without replacement from M samples: E[S] = s^2, E[|G|^2_est] = |G_D|^2 - s^2 / M
    assert abs(s.mean() - s2) < 4 * s.std() / math.sqrt(len(s))
    assert abs(g2.mean() - (g_data - s2 / size)) < 4 * g2.std() / math.sqrt(len(g2))


def test_big_batch_is_drawn_without_replacement() -> None:
    # with b_big = the data set size, sampling without replacement takes every sample exactly once
    x, w = make_dataset(300, seed=4)
    g_data, _ = population_values(x)
    estimator = GradientNoiseScale(b_small=4, b_big=None)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        estimate = measure_noise_scale(estimator, quadratic_loss(x, w), [w], 300, generator=generator)
        assert estimate.g_big_sq == pytest.approx(g_data, rel=1e-12)


def test_helper_converges_to_the_true_noise_scale() -> None:
    size = 16384
    x, w = make_dataset(size, seed=2)
    estimator = GradientNoiseScale(b_small=16, b_big=4096, g2_smoothing=0.95, s_smoothing=0.95)
    generator = torch.Generator().manual_seed(1)
    loss = quadratic_loss(x, w)
    for _ in range(150):
        estimate = measure_noise_scale(estimator, loss, [w], size, num_small_batches=16, generator=generator)
    truth = TRUE_TRACE / TRUE_G2  # 8: sigma = 2.83
    assert estimate.b_simple == pytest.approx(truth, rel=0.12)
    assert estimate.sigma == pytest.approx(math.sqrt(truth), rel=0.06)
    assert estimate.g2_smoothed == pytest.approx(TRUE_G2, rel=0.05)
    assert estimate.s_smoothed == pytest.approx(TRUE_TRACE, rel=0.08)
    assert set(estimate.as_metrics("value/")) >= {"value/sigma", "value/b_simple"}


def test_helper_on_a_network_loss_and_argument_checks() -> None:
    torch.manual_seed(0)
    net = MLP(3, [16], out_dim=1)
    states, targets = torch.randn(600, 3), torch.randn(600)

    def value_loss(indices: torch.Tensor) -> torch.Tensor:
        return 0.5 * (net(states[indices]).squeeze(-1) - targets[indices]).pow(2).mean()

    before = [p.detach().clone() for p in net.parameters()]
    estimator = GradientNoiseScale(b_small=8, b_big=None)  # None: the whole data set is the big batch
    with torch.no_grad():  # gradients are still taken inside
        estimate = measure_noise_scale(estimator, value_loss, net.parameters(), 600, max_chunk_size=128)
    assert estimate.b_big == 600 and math.isfinite(estimate.s) and estimate.s > 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="exceeds"):
        measure_noise_scale(GradientNoiseScale(8, 1024), value_loss, net.parameters(), 600)
    with pytest.raises(ValueError, match="divide"):
        measure_noise_scale(GradientNoiseScale(7, 64), value_loss, net.parameters(), 600, small_batches="partition")
