"""TRPO pieces (aclab.algos.trpo): conjugate gradient, Fisher-vector products, the trust-region step."""

import pytest
import torch

from aclab.algos.trpo import (
    conjugate_gradient,
    fisher_vector_product_fn,
    flat_grad,
    flatten,
    trpo_step,
    unflatten,
)
from aclab.core.distributions import normal_kl, normal_log_prob


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_solves_spd_systems_and_the_residual_shrinks():
    a = _spd(6)
    b = torch.arange(1.0, 7.0, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6, residual_tol=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    exact = torch.linalg.solve(a, b)
    errors = []  # CG minimises the A-norm of the error over growing Krylov spaces: monotone
    for k in range(1, 7):
        e = conjugate_gradient(lambda v: a @ v, b, iterations=k, residual_tol=0.0) - exact
        errors.append(float(e @ a @ e))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:]))
    assert errors[0] > 1e-3  # one step is not the solution


def test_flatten_unflatten_round_trip():
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = flatten(tensors)
    assert flat.shape == (12,)
    for a, b in zip(unflatten(flat, tensors), tensors):
        assert torch.equal(a, b)


class _LinearGaussian(torch.nn.Module):
    """mean = W s + c, state-independent log std (float64)."""

    def __init__(self, obs_dim=3, act_dim=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.3 * torch.randn(act_dim, obs_dim, generator=g, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.zeros(act_dim, dtype=torch.float64))
        self.log_std = torch.nn.Parameter(torch.full((act_dim,), -0.3, dtype=torch.float64))

    def forward(self, obs):
        mean = obs @ self.w.T + self.c
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


def test_fisher_vector_product_equals_the_kl_hessian_and_the_analytic_fisher():
    policy = _LinearGaussian()
    obs = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    old = policy(obs).detach()
    params = list(policy.parameters())

    def kl():
        return normal_kl(old, policy(obs)).mean()

    fvp = fisher_vector_product_fn(kl, params, damping=0.0)
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def kl_of_flat(flat):
        w, c, log_std = unflatten(flat, params)
        mean = obs @ w.T + c
        return normal_kl(old, torch.cat([mean, log_std.expand_as(mean)], -1)).mean()

    hessian = torch.autograd.functional.hessian(kl_of_flat, flatten([p.detach() for p in params]))
    torch.testing.assert_close(fvp(v), hessian @ v, rtol=1e-9, atol=1e-10)
    # analytic Fisher of a Gaussian: mean block E[J^T diag(1/sigma^2) J], log-std block 2 I, no cross terms
    sigma2 = torch.exp(2 * policy.log_std.detach())
    features = torch.cat([obs, torch.ones(50, 1, dtype=torch.float64)], 1)  # d mean_a / d [w_a, c_a]
    fisher = torch.zeros(n, n, dtype=torch.float64)
    a_dim, o_dim = 2, 3
    for a in range(a_dim):
        idx = [a * o_dim + j for j in range(o_dim)] + [a_dim * o_dim + a]
        block = features.T @ features / 50 / sigma2[a]
        fisher[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = block
    fisher[-a_dim:, -a_dim:] = 2.0 * torch.eye(a_dim, dtype=torch.float64)
    torch.testing.assert_close(hessian, fisher, rtol=1e-9, atol=1e-10)
    assert torch.allclose(fisher_vector_product_fn(kl, params, damping=0.1)(v), hessian @ v + 0.1 * v)


def _bandit(seed=0, max_kl=0.01):
    policy = _LinearGaussian(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    obs = torch.randn(400, 3, generator=g, dtype=torch.float64)
    old = policy(obs).detach()
    actions = old[:, :2] + torch.exp(old[:, 2:]) * torch.randn(400, 2, generator=g, dtype=torch.float64)
    advantages = -(actions - torch.tensor([0.5, -0.5], dtype=torch.float64)).square().sum(-1)
    advantages = (advantages - advantages.mean()) / advantages.std()
    old_log_probs = normal_log_prob(old, actions)

    def loss_and_kl():
        params = policy(obs)
        ratio = torch.exp(normal_log_prob(params, actions) - old_log_probs)
        return -(ratio * advantages).mean(), normal_kl(old, params).mean()

    return policy, loss_and_kl


@pytest.mark.parametrize("max_kl", [0.001, 0.01, 0.05])
def test_trpo_step_improves_the_surrogate_within_the_kl_limit(max_kl):
    policy, loss_and_kl = _bandit(max_kl=max_kl)
    before = [p.detach().clone() for p in policy.parameters()]
    stats = trpo_step(list(policy.parameters()), loss_and_kl, max_kl=max_kl, cg_iterations=10, cg_damping=1e-5)
    with torch.no_grad():
        loss, kl = loss_and_kl()
    assert stats.accepted and float(kl) <= max_kl and float(loss) < stats.loss_before
    assert stats.loss_after == pytest.approx(float(loss)) and stats.kl == pytest.approx(float(kl))
    # the quadratic model puts the full step on the KL boundary: the accepted KL is close to it
    assert float(kl) == pytest.approx(max_kl * stats.step_fraction**2, rel=0.2)
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    # the predicted first-order improvement is positive and matches g . step
    assert stats.expected_improvement > 0


def test_trpo_step_rejects_and_restores_when_no_step_improves():
    policy = _LinearGaussian()
    obs = torch.randn(20, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    old = policy(obs).detach()
    before = [p.detach().clone() for p in policy.parameters()]

    def flat_minimum():  # zero gradient at theta_old: no direction to move in
        kl = normal_kl(old, policy(obs)).mean()
        return kl, kl

    stats = trpo_step(list(policy.parameters()), flat_minimum, max_kl=0.01)
    assert not stats.accepted and stats.loss_after == stats.loss_before

    def curved():  # a small slope and a huge curvature: every backtracked step still increases the loss
        params = policy(obs)
        kl = normal_kl(old, params).mean()
        return 1e6 * kl - 1e-3 * params[:, 0].mean(), kl

    stats = trpo_step(list(policy.parameters()), curved, max_kl=0.01, max_backtracks=5)
    assert not stats.accepted and stats.backtracks == 5 and stats.kl == 0.0
    for a, p in zip(before, policy.parameters()):
        assert torch.equal(a, p)


def test_flat_grad_fills_unused_parameters_with_zeros():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    g = flat_grad((a * 2).sum(), [a, b])
    assert torch.equal(g, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
