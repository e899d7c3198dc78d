"""Tests of aclab.analysis.stiffness against brute-force per-sample autograd and pairwise python loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from aclab.analysis.stiffness import (
    cosine_stiffness_from_gradients,
    per_sample_gradient_fn,
    sign_stiffness_from_gradients,
    value_stiffness,
)
from aclab.nets.encoders import MLP, ImpalaResNet

N_STATES = 23  # not a multiple of the chunk/block sizes below


class ValueNet(nn.Module):
    """encoder -> linear value head, ``[N, ...] -> [N]`` (or ``[N, 1]`` with ``keep_dim``)."""

    def __init__(self, encoder: nn.Module, width: int, keep_dim: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, 1)
        self.keep_dim = keep_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.encoder(x))
        return out if self.keep_dim else out.squeeze(-1)


def make_problem(seed: int = 0, keep_dim: bool = False) -> tuple[ValueNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = ValueNet(MLP(5, [8, 8], activation="tanh"), 8, keep_dim).double()
    states = torch.randn(N_STATES, 5, dtype=torch.float64)
    targets = torch.randn(N_STATES, dtype=torch.float64)
    return net, states, targets


def brute_force_gradients(net: nn.Module, states, targets, names: list[str] | None = None) -> torch.Tensor:
    """One backward pass per state through the ordinary module; rows are flattened gradients."""
    named = dict(net.named_parameters())
    names = list(named) if names is None else names
    rows = []
    for i in range(states.shape[0]):
        loss = 0.5 * (net(states[i : i + 1]).reshape(()) - targets[i]) ** 2
        grads = torch.autograd.grad(loss, [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def brute_force_stiffness(grads: torch.Tensor) -> tuple[float, float, int]:
    """Pairwise loops over i != j: mean cosine (non-zero rows only), mean sign, number of zero rows."""
    rows = [g for g in grads]
    nonzero = [g for g in rows if float(g.norm()) > 0]
    cosines = [float(a @ b) / (float(a.norm()) * float(b.norm())) for a, b in itertools.permutations(nonzero, 2)]
    signs = [math.copysign(1.0, float(a @ b)) if float(a @ b) != 0 else 0.0 for a, b in itertools.permutations(rows, 2)]
    return sum(cosines) / len(cosines), sum(signs) / len(signs), len(rows) - len(nonzero)


def test_per_sample_gradients_match_autograd_loop() -> None:
    net, states, targets = make_problem()
    flat = per_sample_gradient_fn(net)(states, targets)
    torch.testing.assert_close(flat, brute_force_gradients(net, states, targets), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size, block_size", [(1, 1), (4, 5), (7, 23), (256, 1024), (5, 100)])
def test_exact_stiffness_matches_brute_force(chunk_size: int, block_size: int) -> None:
    net, states, targets = make_problem(seed=1)
    cosine, sign, zeros = brute_force_stiffness(brute_force_gradients(net, states, targets))
    result = value_stiffness(net, states, targets, chunk_size=chunk_size, sign_block_size=block_size)
    assert result.cosine == pytest.approx(cosine, abs=1e-12)
    assert result.sign == pytest.approx(sign, abs=1e-12)
    assert result.num_states == N_STATES
    assert result.num_sign_pairs == N_STATES * (N_STATES - 1) // 2
    assert result.num_zero_gradients == zeros == 0
    assert result.sign_method == "exact"
    # the problem is not degenerate: both measures are strictly inside (-1, 1)
    assert -1 < result.cosine < 1 and -1 < result.sign < 1


def test_column_output_is_accepted_and_multi_output_rejected() -> None:
    net, states, targets = make_problem(seed=2, keep_dim=True)
    flat_net, _, _ = make_problem(seed=2)
    column = value_stiffness(net, states, targets, chunk_size=6)
    flat = value_stiffness(flat_net, states, targets, chunk_size=6)
    assert column.cosine == pytest.approx(flat.cosine, abs=1e-12)
    wide = nn.Linear(5, 2).double()
    with pytest.raises(ValueError, match="one value per state"):
        value_stiffness(wide, states, targets)


def test_parameter_subset_by_names_and_by_values() -> None:
    net, states, targets = make_problem(seed=3)
    names = ["head.weight", "head.bias", "encoder.layers.2.weight"]
    expected = brute_force_stiffness(brute_force_gradients(net, states, targets, names))
    by_names = value_stiffness(net, states, targets, params=names, chunk_size=4)
    assert by_names.cosine == pytest.approx(expected[0], abs=1e-12)
    assert by_names.sign == pytest.approx(expected[1], abs=1e-12)
    everything = value_stiffness(net, states, targets, chunk_size=4)
    assert abs(everything.cosine - by_names.cosine) > 1e-6  # the subset really changes the measure

    # a mapping evaluates at the given values (here: a perturbed head), other parameters stay fixed
    torch.manual_seed(4)
    new_values = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in net.named_parameters() if n.startswith("head")}
    by_values = value_stiffness(net, states, targets, params=new_values, chunk_size=4)
    with torch.no_grad():
        for name, value in new_values.items():
            dict(net.named_parameters())[name].copy_(value)
    expected = brute_force_stiffness(brute_force_gradients(net, states, targets, list(new_values)))
    assert by_values.cosine == pytest.approx(expected[0], abs=1e-12)
    assert by_values.sign == pytest.approx(expected[1], abs=1e-12)
    with pytest.raises(KeyError, match="unknown parameter"):
        value_stiffness(net, states, targets, params=["nope"])


def test_zero_gradients_are_left_out_of_the_cosine() -> None:
    net, states, targets = make_problem(seed=5)
    # zero biases and zero states give V(s) = 0 exactly; with target 0 the gradient is exactly zero
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    states, targets = states.clone(), targets.clone()
    states[[0, 7, 11]] = 0.0
    targets[[0, 7, 11]] = 0.0
    grads = brute_force_gradients(net, states, targets)
    cosine, sign, zeros = brute_force_stiffness(grads)
    result = value_stiffness(net, states, targets, chunk_size=5, sign_block_size=6)
    assert zeros == 3 and result.num_zero_gradients == 3
    assert result.cosine == pytest.approx(cosine, abs=1e-12)
    assert result.sign == pytest.approx(sign, abs=1e-12)


def test_subset_sign_estimate() -> None:
    net, states, targets = make_problem(seed=6)
    exact = value_stiffness(net, states, targets, chunk_size=8)
    full_subset = value_stiffness(net, states, targets, sign="subset", sign_subset_size=10_000)
    assert full_subset.sign == pytest.approx(exact.sign, abs=1e-12)
    assert full_subset.cosine == pytest.approx(exact.cosine, abs=1e-12)  # cosine is always over all states
    # the subset is a uniform draw without replacement (torch.randperm with the given generator) and the
    # estimate is the exact mean over all pairs inside it
    grads = brute_force_gradients(net, states, targets)
    for seed in range(3):
        subset = torch.randperm(N_STATES, generator=torch.Generator().manual_seed(seed))[:6]
        result = value_stiffness(
            net, states, targets, sign="subset", sign_subset_size=6, generator=torch.Generator().manual_seed(seed)
        )
        assert result.num_sign_pairs == 15
        assert result.sign == pytest.approx(brute_force_stiffness(grads[subset])[1], abs=1e-12)
    # ... hence unbiased for the exact mean over all pairs
    generator = torch.Generator().manual_seed(0)
    estimates = torch.tensor(
        [
            value_stiffness(net, states, targets, sign="subset", sign_subset_size=6, generator=generator).sign
            for _ in range(40)
        ],
        dtype=torch.float64,
    )
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    assert float(estimates.std()) > 0.05  # a single subset is noisy...
    assert float(estimates.mean()) == pytest.approx(exact.sign, abs=4 * standard_error)  # ...its mean is not
    off = value_stiffness(net, states, targets, sign="off")
    assert math.isnan(off.sign) and off.num_sign_pairs == 0 and off.cosine == pytest.approx(exact.cosine)


def test_pure_functions_on_known_configurations() -> None:
    torch.manual_seed(7)
    direction = torch.randn(9, dtype=torch.float64)
    scales = torch.rand(6, 1, dtype=torch.float64) + 0.1
    same = scales * direction
    assert cosine_stiffness_from_gradients(same) == pytest.approx(1.0)
    assert sign_stiffness_from_gradients(same) == pytest.approx(1.0)
    k = 4  # k vectors along +v and k along -v: mean cosine = (k(k-1) - k^2) / (k(2k-1)) = -1/(2k-1)
    opposed = torch.cat([same[:k], -same[:k]])
    assert cosine_stiffness_from_gradients(opposed) == pytest.approx(-1 / (2 * k - 1))
    assert sign_stiffness_from_gradients(opposed) == pytest.approx(-1 / (2 * k - 1))
    orthogonal = torch.eye(5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
    assert cosine_stiffness_from_gradients(orthogonal) == pytest.approx(0.0, abs=1e-15)
    assert sign_stiffness_from_gradients(orthogonal) == 0.0
    random = torch.randn(30, 4, dtype=torch.float64)
    assert cosine_stiffness_from_gradients(random) == pytest.approx(brute_force_stiffness(random)[0], abs=1e-12)
    assert sign_stiffness_from_gradients(random) == pytest.approx(brute_force_stiffness(random)[1], abs=1e-12)


def test_impala_resnet_with_uint8_frames() -> None:
    torch.manual_seed(8)
    net = ValueNet(ImpalaResNet(3, channels=(4, 8), out_dim=16, image_size=16), 16)
    states = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    targets = torch.randn(5)
    cosine, sign, _ = brute_force_stiffness(brute_force_gradients(net, states, targets).double())
    result = value_stiffness(net, states, targets, chunk_size=2, sign_block_size=3)
    assert result.cosine == pytest.approx(cosine, abs=1e-5)
    assert result.sign == pytest.approx(sign, abs=1e-12)


def test_shared_module_keeps_its_parameter_objects():
    """A torso registered under two names must keep the caller's Parameter objects (optimiser state)."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(3, 4)
            self.value_enc = self.enc
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.value_enc(x))).squeeze(-1)

    net = Shared()
    before = [id(p) for p in net.parameters()]
    value_stiffness(net, torch.randn(6, 3), torch.randn(6), sign="off")
    assert [id(p) for p in net.parameters()] == before
    assert net.enc.weight is net.value_enc.weight


def brute_force_value_gradients(net: nn.Module, states) -> torch.Tensor:
    """grad V(s_i) per state, one backward pass each."""
    params = list(net.parameters())
    rows = []
    for i in range(states.shape[0]):
        grads = torch.autograd.grad(net(states[i : i + 1]).reshape(()), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("sign", ["exact", "subset"])
def test_sign_free_variant_is_the_stiffness_of_grad_v(sign: str) -> None:
    net, states, targets = make_problem(seed=6)
    cosine_v, sign_v, zeros_v = brute_force_stiffness(brute_force_value_gradients(net, states))
    result = value_stiffness(net, states, targets, chunk_size=5, sign_block_size=7, sign=sign,
                             sign_subset_size=N_STATES)
    assert result.cosine_grad_v == pytest.approx(cosine_v, abs=1e-12)
    assert result.sign_grad_v == pytest.approx(sign_v, abs=1e-12)
    assert result.num_zero_grad_v == zeros_v == 0
    loss_cosine, loss_sign, _ = brute_force_stiffness(brute_force_gradients(net, states, targets))
    assert result.cosine == pytest.approx(loss_cosine, abs=1e-12) and result.sign == pytest.approx(loss_sign, abs=1e-12)


def test_residual_signs_move_the_papers_stiffness_but_not_the_sign_free_variant() -> None:
    """g_i = (V_i - y_i) grad V_i: with every residual of one sign (a critic lagging behind all its targets)
    the paper's stiffness equals the grad-V one; flipping half of the residuals changes it, not grad V's."""
    net, states, _ = make_problem(seed=7)
    with torch.no_grad():
        values = net(states)
    lagging = value_stiffness(net, states, values + 1.0, chunk_size=6)  # all residuals -1
    assert lagging.cosine == pytest.approx(lagging.cosine_grad_v, abs=1e-12)
    assert lagging.sign == pytest.approx(lagging.sign_grad_v, abs=1e-12)
    flip = torch.where(torch.arange(N_STATES) % 2 == 0, 1.0, -1.0).double()
    mixed = value_stiffness(net, states, values + flip, chunk_size=6)
    assert mixed.cosine_grad_v == pytest.approx(lagging.cosine_grad_v, abs=1e-12)
    assert abs(mixed.cosine - lagging.cosine) > 0.1
    # pairwise: cos(g_i, g_j) = sign(r_i r_j) cos(grad V_i, grad V_j)
    gv = brute_force_value_gradients(net, states)
    g = brute_force_gradients(net, states, values + flip)
    i, j = 0, 1
    cos_g = float(g[i] @ g[j]) / float(g[i].norm() * g[j].norm())
    cos_v = float(gv[i] @ gv[j]) / float(gv[i].norm() * gv[j].norm())
    assert cos_g == pytest.approx(-cos_v, abs=1e-12)  # residuals -1 and +1
