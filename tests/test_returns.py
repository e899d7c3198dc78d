"""Tests of aclab.core.returns against slow numpy float64 references and the papers' identities."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from aclab.core.returns import (
    discounted_returns,
    gae,
    leaky_vtrace,
    n_step_returns,
    td_lambda_returns,
    vtrace,
)

SHAPES = [(1, 1), (1, 3), (5, 1), (5, 3), (17, 1), (17, 3)]
GAMMA = 0.9
ATOL = 1e-10


# ----------------------------------------------------------------------------------------------
# Random trajectories
# ----------------------------------------------------------------------------------------------
def make_batch(horizon: int, batch: int, seed: int, p_end: float = 0.2) -> dict[str, np.ndarray]:
    """Random rewards/values, terminations and truncations, and importance ratios in [0.08, 12]."""
    rng = np.random.default_rng(seed)
    terminated = rng.random((horizon, batch)) < p_end
    truncated = (rng.random((horizon, batch)) < p_end) & ~terminated
    return {
        "rewards": rng.normal(size=(horizon, batch)),
        "values": rng.normal(size=(horizon + 1, batch)),
        "terminated": terminated.astype(np.float64),
        "ends": (terminated | truncated).astype(np.float64),
        "discounts": GAMMA * (1.0 - terminated),
        "log_rhos": rng.uniform(math.log(0.08), math.log(12.0), size=(horizon, batch)),
    }


def as_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in batch.items()}


def ends_or_none(batch: dict, use_ends: bool):
    return batch["ends"] if use_ends else None


# ----------------------------------------------------------------------------------------------
# Slow references (plain loops, numpy float64)
# ----------------------------------------------------------------------------------------------
def ref_discounted(rewards, discounts, bootstrap, ends=None, values=None):
    horizon, batch = rewards.shape
    out = np.zeros((horizon, batch))
    for b in range(batch):
        running = bootstrap[b]
        for t in reversed(range(horizon)):
            if ends is not None and ends[t, b]:
                tail = discounts[t, b] * values[t + 1, b] if values is not None else 0.0
                running = rewards[t, b] + tail
            else:
                running = rewards[t, b] + discounts[t, b] * running
            out[t, b] = running
    return out


def ref_n_step(rewards, values, discounts, n, ends=None):
    horizon, batch = rewards.shape
    out = np.zeros((horizon, batch))
    for b, t in itertools.product(range(batch), range(horizon)):
        total, coefficient = 0.0, 1.0
        for k in range(n):
            i = t + k
            total += coefficient * rewards[i, b]
            coefficient *= discounts[i, b]
            if k == n - 1 or i == horizon - 1 or (ends is not None and ends[i, b]):
                total += coefficient * values[i + 1, b]
                break
        out[t, b] = total
    return out


def ref_lambda_mixture(rewards, values, discounts, lam, ends=None):
    """TD(lambda) as the lambda-weighted mixture of n-step returns (Sutton & Barto Eq. 12.3)."""
    horizon, batch = rewards.shape
    n_step = {n: ref_n_step(rewards, values, discounts, n, ends) for n in range(1, horizon + 1)}
    out = np.zeros((horizon, batch))
    for b, t in itertools.product(range(batch), range(horizon)):
        steps = horizon - t  # n-step returns stop changing beyond the trajectory or episode end
        if ends is not None:
            ended_at = np.nonzero(ends[t:, b])[0]
            if len(ended_at):
                steps = ended_at[0] + 1
        mix = sum((1 - lam) * lam ** (n - 1) * n_step[n][t, b] for n in range(1, steps))
        out[t, b] = mix + lam ** (steps - 1) * n_step[steps][t, b]
    return out


def ref_gae(rewards, values, discounts, lam, ends=None):
    horizon, batch = rewards.shape
    lam = np.broadcast_to(lam, (horizon, batch))
    out = np.zeros((horizon, batch))
    for b in range(batch):
        running = 0.0
        for t in reversed(range(horizon)):
            delta = rewards[t, b] + discounts[t, b] * values[t + 1, b] - values[t, b]
            cut = 0.0 if ends is not None and ends[t, b] else 1.0
            running = delta + discounts[t, b] * lam[t, b] * cut * running
            out[t, b] = running
    return out


def ref_leaky_vtrace(
    log_rhos,
    rewards,
    values,
    discounts,
    lam=1.0,
    alpha_rho=1.0,
    alpha_c=1.0,
    rho_bar=1.0,
    c_bar=1.0,
    rho_bar_pg=1.0,
    ends=None,
    pg_lambda_mix=False,
):
    """Double-loop sum form v_s = V_s + sum_{t>=s} (prod_{s<=i<t} d_i c_i) delta_t (STAC Eq. 5)."""
    horizon, batch = rewards.shape
    lam = np.broadcast_to(lam, (horizon, batch))
    ratio = np.exp(log_rhos)
    rho = alpha_rho * np.minimum(rho_bar, ratio) + (1 - alpha_rho) * ratio
    c = lam * (alpha_c * np.minimum(c_bar, ratio) + (1 - alpha_c) * ratio)
    rho_pg = alpha_rho * np.minimum(rho_bar_pg, ratio) + (1 - alpha_rho) * ratio
    not_end = np.ones((horizon, batch)) if ends is None else 1.0 - ends
    delta = rho * (rewards + discounts * values[1:] - values[:-1])
    vs = np.zeros((horizon, batch))
    for b, s in itertools.product(range(batch), range(horizon)):
        total = values[s, b]
        for t in range(s, horizon):
            product = 1.0
            for i in range(s, t):
                product *= discounts[i, b] * c[i, b] * not_end[i, b]
            total += product * delta[t, b]
        vs[s, b] = total
    advantages = np.zeros((horizon, batch))
    for b, s in itertools.product(range(batch), range(horizon)):
        if s + 1 < horizon and not_end[s, b]:
            next_target = vs[s + 1, b]
        else:
            next_target = values[s + 1, b]
        if pg_lambda_mix:
            next_target = lam[s, b] * next_target + (1 - lam[s, b]) * values[s + 1, b]
        advantages[s, b] = rho_pg[s, b] * (rewards[s, b] + discounts[s, b] * next_target - values[s, b])
    return vs, advantages, rho, c


# ----------------------------------------------------------------------------------------------
# Against the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ends", [False, True])
@pytest.mark.parametrize("with_values", [False, True])
def test_discounted_returns_matches_reference(shape, use_ends, with_values):
    npb = make_batch(*shape, seed=1)
    tb = as_torch(npb)
    values = tb["values"] if with_values else None
    got = discounted_returns(
        tb["rewards"],
        tb["discounts"],
        tb["values"][-1],
        episode_ends=ends_or_none(tb, use_ends),
        values=values,
    )
    expected = ref_discounted(
        npb["rewards"],
        npb["discounts"],
        npb["values"][-1],
        ends_or_none(npb, use_ends),
        npb["values"] if with_values else None,
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 40])
@pytest.mark.parametrize("use_ends", [False, True])
def test_n_step_matches_reference(shape, n, use_ends):
    npb = make_batch(*shape, seed=2)
    tb = as_torch(npb)
    got = n_step_returns(
        tb["rewards"], tb["values"], tb["discounts"], n, episode_ends=ends_or_none(tb, use_ends)
    )
    expected = ref_n_step(npb["rewards"], npb["values"], npb["discounts"], n, ends_or_none(npb, use_ends))
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("use_ends", [False, True])
def test_td_lambda_matches_n_step_mixture(shape, lam, use_ends):
    npb = make_batch(*shape, seed=3)
    tb = as_torch(npb)
    got = td_lambda_returns(
        tb["rewards"], tb["values"], tb["discounts"], lam, episode_ends=ends_or_none(tb, use_ends)
    )
    expected = ref_lambda_mixture(
        npb["rewards"], npb["values"], npb["discounts"], lam, ends_or_none(npb, use_ends)
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ends", [False, True])
def test_gae_matches_reference_and_equals_td_lambda_minus_values(shape, use_ends):
    npb = make_batch(*shape, seed=4)
    tb = as_torch(npb)
    ends_t = ends_or_none(tb, use_ends)
    for lam in (0.0, 0.8, 1.0):
        advantages = gae(tb["rewards"], tb["values"], tb["discounts"], lam, episode_ends=ends_t)
        expected = ref_gae(npb["rewards"], npb["values"], npb["discounts"], lam, ends_or_none(npb, use_ends))
        np.testing.assert_allclose(advantages.numpy(), expected, atol=ATOL)
        returns = td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"], lam, episode_ends=ends_t)
        torch.testing.assert_close(advantages, returns - tb["values"][:-1], atol=ATOL, rtol=0)


def test_per_step_lambda_tensor_matches_reference():
    npb = make_batch(9, 3, seed=5)
    tb = as_torch(npb)
    lam = np.random.default_rng(0).uniform(0, 1, size=(9, 3))
    got = gae(tb["rewards"], tb["values"], tb["discounts"], torch.tensor(lam), episode_ends=tb["ends"])
    expected = ref_gae(npb["rewards"], npb["values"], npb["discounts"], lam, npb["ends"])
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)
    out = vtrace(
        tb["log_rhos"],
        tb["rewards"],
        tb["values"],
        tb["discounts"],
        lambda_=torch.tensor(lam),
        episode_ends=tb["ends"],
        pg_lambda_mix=True,
    )
    ref_vs, ref_adv, _, _ = ref_leaky_vtrace(
        npb["log_rhos"],
        npb["rewards"],
        npb["values"],
        npb["discounts"],
        lam=lam,
        ends=npb["ends"],
        pg_lambda_mix=True,
    )
    np.testing.assert_allclose(out.vs.numpy(), ref_vs, atol=ATOL)
    np.testing.assert_allclose(out.pg_advantages.numpy(), ref_adv, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ends", [False, True])
@pytest.mark.parametrize("pg_lambda_mix", [False, True])
@pytest.mark.parametrize(
    "lam,rho_bar,c_bar,rho_bar_pg", [(1.0, 1.0, 1.0, 1.0), (0.9, 1.0, 1.0, 1.0), (0.7, 2.0, 1.5, 1.2)]
)
def test_vtrace_matches_double_loop_reference(
    shape, use_ends, pg_lambda_mix, lam, rho_bar, c_bar, rho_bar_pg
):
    npb = make_batch(*shape, seed=6)
    tb = as_torch(npb)
    out = vtrace(
        tb["log_rhos"],
        tb["rewards"],
        tb["values"],
        tb["discounts"],
        lambda_=lam,
        rho_bar=rho_bar,
        c_bar=c_bar,
        rho_bar_pg=rho_bar_pg,
        episode_ends=ends_or_none(tb, use_ends),
        pg_lambda_mix=pg_lambda_mix,
    )
    ref = ref_leaky_vtrace(
        npb["log_rhos"],
        npb["rewards"],
        npb["values"],
        npb["discounts"],
        lam=lam,
        rho_bar=rho_bar,
        c_bar=c_bar,
        rho_bar_pg=rho_bar_pg,
        ends=ends_or_none(npb, use_ends),
        pg_lambda_mix=pg_lambda_mix,
    )
    for got, expected in zip(out, ref):
        np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha_rho,alpha_c", [(0.3, 0.3), (0.8, 0.4), (0.2, 0.9)])
@pytest.mark.parametrize("use_ends", [False, True])
def test_leaky_vtrace_matches_double_loop_reference(shape, alpha_rho, alpha_c, use_ends):
    npb = make_batch(*shape, seed=7)
    tb = as_torch(npb)
    out = leaky_vtrace(
        tb["log_rhos"],
        tb["rewards"],
        tb["values"],
        tb["discounts"],
        lambda_=0.95,
        alpha_rho=alpha_rho,
        alpha_c=alpha_c,
        rho_bar=1.5,
        c_bar=1.0,
        rho_bar_pg=1.0,
        episode_ends=ends_or_none(tb, use_ends),
    )
    ref = ref_leaky_vtrace(
        npb["log_rhos"],
        npb["rewards"],
        npb["values"],
        npb["discounts"],
        lam=0.95,
        alpha_rho=alpha_rho,
        alpha_c=alpha_c,
        rho_bar=1.5,
        c_bar=1.0,
        rho_bar_pg=1.0,
        ends=ends_or_none(npb, use_ends),
    )
    for got, expected in zip(out, ref):
        np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_td_lambda_one_is_discounted_return(shape):
    tb = as_torch(make_batch(*shape, seed=8))
    returns = td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"], 1.0)
    monte_carlo = discounted_returns(tb["rewards"], tb["discounts"], tb["values"][-1])
    torch.testing.assert_close(returns, monte_carlo, atol=ATOL, rtol=0)
    # With episode ends, lambda = 1 bootstraps from V(final obs) at each end, like the values= form.
    returns = td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"], 1.0, episode_ends=tb["ends"])
    monte_carlo = discounted_returns(
        tb["rewards"], tb["discounts"], tb["values"][-1], episode_ends=tb["ends"], values=tb["values"]
    )
    torch.testing.assert_close(returns, monte_carlo, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ends", [False, True])
def test_lambda_zero_and_one_step_are_td0(shape, use_ends):
    tb = as_torch(make_batch(*shape, seed=9))
    ends_t = ends_or_none(tb, use_ends)
    td0 = tb["rewards"] + tb["discounts"] * tb["values"][1:]
    torch.testing.assert_close(
        td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"], 0.0, ends_t), td0
    )
    torch.testing.assert_close(n_step_returns(tb["rewards"], tb["values"], tb["discounts"], 1, ends_t), td0)


@pytest.mark.parametrize("shape", SHAPES)
def test_n_step_beyond_horizon_is_monte_carlo_with_bootstrap(shape):
    tb = as_torch(make_batch(*shape, seed=10))
    horizon = shape[0]
    for n in (horizon, horizon + 5):
        got = n_step_returns(tb["rewards"], tb["values"], tb["discounts"], n)
        torch.testing.assert_close(got, discounted_returns(tb["rewards"], tb["discounts"], tb["values"][-1]))
        got = n_step_returns(tb["rewards"], tb["values"], tb["discounts"], n, episode_ends=tb["ends"])
        expected = discounted_returns(
            tb["rewards"], tb["discounts"], tb["values"][-1], tb["ends"], tb["values"]
        )
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_ends", [False, True])
def test_leaky_alpha_one_is_vtrace_and_zero_is_importance_sampling(shape, use_ends):
    npb = make_batch(*shape, seed=11)
    tb = as_torch(npb)
    args = (tb["log_rhos"], tb["rewards"], tb["values"], tb["discounts"])
    kwargs = dict(
        lambda_=0.9, rho_bar=1.0, c_bar=1.0, rho_bar_pg=1.0, episode_ends=ends_or_none(tb, use_ends)
    )
    plain = vtrace(*args, **kwargs)
    leaky_one = leaky_vtrace(*args, alpha_rho=1.0, alpha_c=1.0, **kwargs)
    for a, b in zip(plain, leaky_one):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    leaky_zero = leaky_vtrace(*args, alpha_rho=0.0, alpha_c=0.0, **kwargs)
    ref = ref_leaky_vtrace(
        npb["log_rhos"],
        npb["rewards"],
        npb["values"],
        npb["discounts"],
        lam=0.9,
        rho_bar=np.inf,
        c_bar=np.inf,
        rho_bar_pg=np.inf,
        ends=ends_or_none(npb, use_ends),
    )
    for got, expected in zip(leaky_zero, ref):
        np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)
    np.testing.assert_allclose(leaky_zero.rhos.numpy(), np.exp(npb["log_rhos"]), rtol=1e-12)


def test_clipping_is_exercised():
    npb = make_batch(17, 3, seed=12)
    ratios = np.exp(npb["log_rhos"])
    assert ratios.min() < 0.2 and ratios.max() > 5.0
    tb = as_torch(npb)
    args = (tb["log_rhos"], tb["rewards"], tb["values"], tb["discounts"])
    clipped = vtrace(*args)
    unclipped = leaky_vtrace(*args, alpha_rho=0.0, alpha_c=0.0)
    assert clipped.rhos.max() <= 1.0 and unclipped.rhos.max() > 5.0
    assert not torch.allclose(clipped.vs, unclipped.vs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("use_ends", [False, True])
def test_on_policy_vtrace_is_td_lambda(shape, lam, use_ends):
    tb = as_torch(make_batch(*shape, seed=13))
    ends_t = ends_or_none(tb, use_ends)
    on_policy = torch.zeros_like(tb["rewards"])
    out = vtrace(
        on_policy,
        tb["rewards"],
        tb["values"],
        tb["discounts"],
        lambda_=lam,
        episode_ends=ends_t,
        pg_lambda_mix=True,
    )
    returns = td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"], lam, episode_ends=ends_t)
    torch.testing.assert_close(out.vs, returns, atol=ATOL, rtol=0)
    # With rlax's lambda mix, the on-policy pg advantage is exactly GAE(lambda).
    advantages = gae(tb["rewards"], tb["values"], tb["discounts"], lam, episode_ends=ends_t)
    torch.testing.assert_close(out.pg_advantages, advantages, atol=ATOL, rtol=0)


@pytest.mark.parametrize("truncate", [False, True])
def test_splitting_at_an_episode_boundary_equals_separate_pieces(truncate):
    tb = as_torch(make_batch(11, 3, seed=14, p_end=0.0))
    split = 4
    ends = torch.zeros_like(tb["rewards"])
    if truncate:  # time-limit: discount stays gamma, the trace is cut by episode_ends
        ends[split] = 1.0
    else:  # termination: zero discount cuts the trace by itself (rlax convention, no episode_ends)
        tb["discounts"][split] = 0.0
    ends_t = ends if truncate else None
    for fn, extra in ((vtrace, {"lambda_": 0.8}), (leaky_vtrace, {"alpha_rho": 0.5, "alpha_c": 0.3})):
        full = fn(tb["log_rhos"], tb["rewards"], tb["values"], tb["discounts"], episode_ends=ends_t, **extra)
        pieces = []
        for time, value_rows in (
            (slice(0, split + 1), slice(0, split + 2)),
            (slice(split + 1, 11), slice(split + 1, 12)),
        ):
            piece_ends = None if ends_t is None else ends_t[time]
            pieces.append(
                fn(
                    tb["log_rhos"][time],
                    tb["rewards"][time],
                    tb["values"][value_rows],
                    tb["discounts"][time],
                    episode_ends=piece_ends,
                    **extra,
                )
            )
        for index in range(4):
            torch.testing.assert_close(full[index], torch.cat([pieces[0][index], pieces[1][index]]))
    full_gae = gae(tb["rewards"], tb["values"], tb["discounts"], 0.9, ends_t)
    first = gae(
        tb["rewards"][: split + 1],
        tb["values"][: split + 2],
        tb["discounts"][: split + 1],
        0.9,
        None if ends_t is None else ends_t[: split + 1],
    )
    torch.testing.assert_close(full_gae[: split + 1], first)


def test_truncation_does_not_leak_next_episode_into_pg_advantage():
    tb = as_torch(make_batch(6, 2, seed=15, p_end=0.0))
    ends = torch.zeros_like(tb["rewards"])
    ends[2] = 1.0
    out = vtrace(tb["log_rhos"], tb["rewards"], tb["values"], tb["discounts"], episode_ends=ends)
    changed_rewards = tb["rewards"].clone()
    changed_rewards[3:] += 100.0  # the next episode (row 3 is the reset dummy)
    changed = vtrace(tb["log_rhos"], changed_rewards, tb["values"], tb["discounts"], episode_ends=ends)
    torch.testing.assert_close(out.vs[:3], changed.vs[:3])
    torch.testing.assert_close(out.pg_advantages[:3], changed.pg_advantages[:3])
    assert not torch.allclose(out.vs[3:], changed.vs[3:])


def test_bad_shapes_raise():
    tb = as_torch(make_batch(5, 2, seed=16))
    with pytest.raises(ValueError, match="values"):
        gae(tb["rewards"], tb["values"][:-1], tb["discounts"], 0.9)
    with pytest.raises(ValueError, match="discounts"):
        td_lambda_returns(tb["rewards"], tb["values"], tb["discounts"][:-1], 0.9)
    with pytest.raises(ValueError, match="n must be"):
        n_step_returns(tb["rewards"], tb["values"], tb["discounts"], 0)


# ----------------------------------------------------------------------------------------------
# Gradients into gamma, lambda and alpha (STAC meta-gradients)
# ----------------------------------------------------------------------------------------------
def _central_difference(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[i] = eps
        step = step.view_as(x)
        flat[i] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("which", ["gamma", "lambda", "alpha", "lambda_per_step"])
def test_metaparameter_gradients_match_finite_differences(which):
    npb = make_batch(5, 3, seed=17)
    tb = as_torch(npb)
    rng = np.random.default_rng(1)
    weights = [torch.tensor(rng.normal(size=(5, 3))) for _ in range(8)]
    base = {
        "gamma": torch.tensor(0.95),
        "lambda": torch.tensor(0.8),
        "alpha": torch.tensor(0.6),
        "lambda_per_step": torch.tensor(rng.uniform(0.2, 0.9, size=(5, 3))),
    }
    base = {key: value.double() for key, value in base.items()}

    def objective(x: torch.Tensor) -> torch.Tensor:
        params = dict(base)
        params[which] = x
        lam = params["lambda_per_step"] if which == "lambda_per_step" else params["lambda"]
        discounts = params["gamma"] * (1.0 - tb["terminated"])
        args = (tb["rewards"], tb["values"], discounts)
        out = leaky_vtrace(
            tb["log_rhos"],
            *args,
            lambda_=lam,
            alpha_rho=params["alpha"],
            alpha_c=params["alpha"],
            episode_ends=tb["ends"],
            rho_bar=1.2,
        )
        outputs = [
            out.vs,
            out.pg_advantages,
            out.cs,
            out.rhos,
            gae(*args, lam, tb["ends"]),
            td_lambda_returns(*args, lam, tb["ends"]),
            n_step_returns(*args, 3, tb["ends"]),
            discounted_returns(tb["rewards"], discounts, tb["values"][-1], tb["ends"], tb["values"]),
        ]
        return sum((w * o).sum() for w, o in zip(weights, outputs))

    x = base[which].clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(objective(x), x)
    numeric = _central_difference(lambda v: objective(v).detach(), base[which])
    assert analytic.abs().max() > 1e-3  # the objective really depends on the metaparameter
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# STAC Theorem 1: the expected leaky V-trace operator contracts to V of pi_{rho_bar, alpha_rho}
# ----------------------------------------------------------------------------------------------
def _random_mdp(seed: int, n_states: int = 3, n_actions: int = 2):
    rng = np.random.default_rng(seed)
    transitions = rng.dirichlet(np.ones(n_states), size=(n_states, n_actions))  # P[s, a, s']
    rewards = rng.normal(size=(n_states, n_actions))
    behaviour = rng.dirichlet(np.ones(n_actions), size=n_states)
    target = rng.dirichlet(0.4 * np.ones(n_actions), size=n_states)
    return transitions, rewards, behaviour, target


def _policy_value(transitions, rewards, policy, gamma):
    state_transitions = np.einsum("sa,sat->st", policy, transitions)
    state_rewards = (policy * rewards).sum(1)
    return np.linalg.solve(np.eye(len(state_rewards)) - gamma * state_transitions, state_rewards)


def _expected_leaky_operator(transitions, rewards, behaviour, target, gamma, horizon, **vtrace_kwargs):
    """Exact E_mu of the n-step leaky V-trace target v_0, by enumerating every trajectory.

    Returns a function V [S] -> (R V) [S] that calls aclab's leaky_vtrace on all trajectories at once.
    """
    n_states, n_actions = rewards.shape
    paths = list(itertools.product(range(n_states), *[range(n_actions), range(n_states)] * horizon))
    states = np.array([path[0::2] for path in paths]).T  # [horizon + 1, J]
    actions = np.array([path[1::2] for path in paths]).T  # [horizon, J]
    probability = np.ones(len(paths))
    for t in range(horizon):
        probability *= behaviour[states[t], actions[t]] * transitions[states[t], actions[t], states[t + 1]]
    weights = np.zeros((n_states, len(paths)))
    weights[states[0], np.arange(len(paths))] = probability
    np.testing.assert_allclose(weights.sum(1), 1.0)
    weights = torch.tensor(weights)
    step_rewards = torch.tensor(rewards[states[:-1], actions])
    log_rhos = torch.tensor(np.log(target[states[:-1], actions]) - np.log(behaviour[states[:-1], actions]))
    discounts = torch.full_like(step_rewards, gamma)
    states_t = torch.tensor(states)

    def operator(values: np.ndarray) -> np.ndarray:
        path_values = torch.tensor(values)[states_t]
        out = leaky_vtrace(log_rhos, step_rewards, path_values, discounts, **vtrace_kwargs)
        return (weights @ out.vs[0]).numpy()

    return operator


def _operator_matrix(operator, n_states: int = 3) -> np.ndarray:
    """The expected operator is affine, R V = b + M V; return M (column i = R(e_i) - R(0))."""
    offset = operator(np.zeros(n_states))
    return np.stack([operator(np.eye(n_states)[i]) - offset for i in range(n_states)], axis=1)


# (alpha_rho, alpha_c, rho_bar, c_bar). STAC's own setting is alpha_rho = alpha_c.
CONTRACTING_SETTINGS = [
    (1.0, 1.0, 1.0, 1.0),
    (0.6, 0.6, 1.0, 1.0),
    (0.5, 0.5, 1.5, 1.0),
    (0.3, 0.8, 1.5, 1.0),
    (0.0, 0.0, 1.0, 1.0),
]


@pytest.mark.parametrize("seed", [3, 5])
@pytest.mark.parametrize("horizon", [1, 3])
@pytest.mark.parametrize("alpha_rho,alpha_c,rho_bar,c_bar", CONTRACTING_SETTINGS)
def test_theorem_1_fixed_point_and_contraction(seed, horizon, alpha_rho, alpha_c, rho_bar, c_bar):
    gamma = 0.9
    transitions, rewards, behaviour, target = _random_mdp(seed)
    operator = _expected_leaky_operator(
        transitions,
        rewards,
        behaviour,
        target,
        gamma,
        horizon,
        alpha_rho=alpha_rho,
        alpha_c=alpha_c,
        rho_bar=rho_bar,
        c_bar=c_bar,
    )
    truncated = np.minimum(rho_bar * behaviour, target)
    mixed = alpha_rho * truncated + (1 - alpha_rho) * target
    mixed_policy = mixed / mixed.sum(1, keepdims=True)
    expected_fixed_point = _policy_value(transitions, rewards, mixed_policy, gamma)

    # The check is not vacuous: the V-trace policy's value differs from the target policy's.
    v_target_policy = _policy_value(transitions, rewards, target, gamma)
    v_vtrace_policy = _policy_value(transitions, rewards, truncated / truncated.sum(1, keepdims=True), gamma)
    assert np.abs(v_target_policy - v_vtrace_policy).max() > 0.05

    values = np.zeros(3)
    for _ in range(400):
        values = operator(values)
    np.testing.assert_allclose(values, expected_fixed_point, atol=1e-8)
    np.testing.assert_allclose(operator(expected_fixed_point), expected_fixed_point, atol=1e-12)

    # Contraction in sup-norm (exact Lipschitz constant of the affine operator: max row sum of |M|),
    # non-negative coefficients, and Theorem 2's rate 1 - (1 - gamma)(alpha_rho beta + 1 - alpha_rho).
    matrix = _operator_matrix(operator)
    beta = truncated.sum(1).min()  # min_x E_mu min(rho_bar, IS)
    rate_bound = 1 - (1 - gamma) * (alpha_rho * beta + 1 - alpha_rho)
    assert matrix.min() >= -1e-12
    assert np.abs(matrix).sum(1).max() <= rate_bound + 1e-12 < 1
    if horizon == 1:  # the one-step operator attains the bound exactly
        np.testing.assert_allclose(np.abs(matrix).sum(1).max(), rate_bound, atol=1e-12)


def test_theorem_1_condition_alpha_rho_ge_alpha_c_does_not_ensure_contraction():
    """Discrepancy with the paper: its proof claims leaky rho >= leaky c when alpha_rho >= alpha_c, but
    rho - c = alpha_c (IS - c_bar)^+ - alpha_rho (IS - rho_bar)^+, which needs alpha_rho <= alpha_c (for
    rho_bar >= c_bar). With alpha_rho > alpha_c the n-step operator can have negative coefficients and a
    sup-norm Lipschitz constant above 1 (its fixed point is still V of pi_{rho_bar, alpha_rho})."""
    gamma = 0.9
    transitions, rewards, behaviour, target = _random_mdp(seed=3)
    operator = _expected_leaky_operator(
        transitions, rewards, behaviour, target, gamma, 3, alpha_rho=1.0, alpha_c=0.0, rho_bar=1.0, c_bar=1.0
    )
    matrix = _operator_matrix(operator)
    assert matrix.min() < 0
    assert np.abs(matrix).sum(1).max() > 1.0
    truncated = np.minimum(behaviour, target)
    fixed_point = _policy_value(transitions, rewards, truncated / truncated.sum(1, keepdims=True), gamma)
    np.testing.assert_allclose(operator(fixed_point), fixed_point, atol=1e-12)
