"""Hypernetworks: shapes, per-sample weights against an explicit loop, initialisation statistics
(measured), ensemble layers, and the hypernetwork policy."""

import math

import pytest
import torch

from aclab.nets.hyper import (
    AUTHORS_HIDDEN_HEAD_BOUND,
    AUTHORS_OUTPUT_HEAD_BOUND,
    EnsembleLinear,
    EnsembleResidualBlock,
    HyperNetwork,
    HyperPolicy,
    InputSplit,
    PrimaryResNet,
)

SMALL = {"primary_widths": (16, 32), "dynamic_hidden": (8,), "probe_size": 256}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _reference_primary(primary: PrimaryResNet, member: int, z: torch.Tensor) -> torch.Tensor:
    """The primary trunk for one sample ``z`` [meta], written out layer by layer."""
    h = z.double()
    for layer in primary.layers:
        if isinstance(layer, EnsembleLinear):
            h = h @ layer.weight[member].double() + layer.bias[member, 0].double()
        else:
            assert isinstance(layer, EnsembleResidualBlock)
            inner = torch.relu(h) @ layer.fc1.weight[member].double() + layer.fc1.bias[member, 0].double()
            h = h + torch.relu(inner) @ layer.fc2.weight[member].double() + layer.fc2.bias[member, 0].double()
    return h


def _reference_hyper(net: HyperNetwork, member: int, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1 for one sample: generate this sample's weights, then run the dynamic MLP with them."""
    e = _reference_primary(net.primary, member, z)
    flat = e @ net.heads.weight[member].double() + net.heads.bias[member, 0].double()
    h = x.double()
    offset = 0
    for index, (fan_in, fan_out) in enumerate(net.layer_dims):
        w = flat[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += fan_in * fan_out
        b = flat[offset : offset + fan_out]
        offset += fan_out
        g = flat[offset : offset + fan_out]
        offset += fan_out
        h = (1.0 + g) * (h @ w) + b
        if index < len(net.layer_dims) - 1:
            h = torch.relu(h)
    return h


@pytest.mark.parametrize("init", ["kaiming", "authors"])
def test_per_sample_weights_match_an_explicit_loop(init):
    torch.manual_seed(0)
    net = HyperNetwork(5, 3, 2, ensemble_size=2, init=init, dynamic_hidden=(8, 6), primary_widths=(16, 32),
                       probe_size=256)
    with torch.no_grad():  # non-trivial gains and head biases so every term of Eq. 1 matters
        net.heads.weight.add_(0.05 * torch.randn_like(net.heads.weight))
        net.heads.bias.normal_(0.0, 0.1)
    z, x = torch.randn(7, 5), torch.randn(7, 3)
    out = net(z, x)
    assert out.shape == (2, 7, 2)
    for member in range(2):
        for i in range(7):
            expected = _reference_hyper(net, member, z[i], x[i])
            torch.testing.assert_close(out[member, i].double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(z, x, member=1), out[1:2])
    # per-member inputs [E, N, ...] are accepted too
    x_e = torch.randn(2, 7, 3)
    out_e = net(z, x_e)
    torch.testing.assert_close(out_e[1, 4].double(), _reference_hyper(net, 1, z[4], x_e[1, 4]), rtol=1e-5, atol=1e-5)


def test_shapes_without_ensemble_and_dynamic_layer_shapes():
    net = HyperNetwork(4, 6, 3, **SMALL)
    z, x = torch.randn(10, 4), torch.randn(10, 6)
    assert net(z, x).shape == (10, 3)
    layers = net.dynamic_layers(z)
    assert [tuple(layer.weight.shape) for layer in layers] == [(1, 10, 6, 8), (1, 10, 8, 3)]
    assert [tuple(layer.bias.shape) for layer in layers] == [(1, 10, 8), (1, 10, 3)]
    assert net.latent(z).shape == (1, 10, 32)
    # per-sample weights really differ between samples
    assert not torch.allclose(layers[0].weight[0, 0], layers[0].weight[0, 1])


def test_paper_architecture_sizes():
    """Primary 256 -> 512 -> 1024 with 2 blocks each, one dynamic hidden layer of 256: ~8.5M weights per
    SA-Hyper network on HalfCheetah (hypernetwork paper, Section 5.2: "9M weights")."""
    net = HyperNetwork(17, 6, 1, probe_size=64)
    assert net.primary.out_dim == 1024 and net.layer_dims == [(6, 256), (256, 1)]
    assert net.heads.weight.shape == (1, 1024, 6 * 256 + 2 * 256 + 256 + 2)
    blocks = [m for m in net.primary.layers if isinstance(m, EnsembleResidualBlock)]
    assert [b.fc1.in_features for b in blocks] == [256, 256, 512, 512, 1024, 1024]
    params = sum(p.numel() for p in net.parameters())
    assert 8.0e6 < params < 9.5e6


def _generated_std(net: HyperNetwork, z: torch.Tensor) -> list[tuple[float, float, float]]:
    with torch.no_grad():
        return [(layer.weight.std().item(), layer.bias.std().item(), (layer.gain - 1).abs().max().item())
                for layer in net.dynamic_layers(z)]


def test_kaiming_init_matches_torch_linear_statistics_measured():
    """Generated weights and biases have nn.Linear's default std 1/sqrt(3 fan_in) on fresh inputs;
    gains are exactly 1 (hypernetwork paper, Section 5.2: 'resembles the Kaiming-uniform initialization')."""
    torch.manual_seed(1)
    net = HyperNetwork(17, 6, 1, ensemble_size=2, primary_widths=(64, 128, 256), probe_size=2048)
    stats = _generated_std(net, torch.randn(3000, 17))
    for (fan_in, fan_out), (w_std, b_std, gain_dev) in zip(net.layer_dims, stats):
        target = 1.0 / math.sqrt(3.0 * fan_in)
        assert abs(w_std / target - 1.0) < 0.1, (fan_in, w_std, target)
        if fan_out > 1:  # one bias column (the output layer) is one random direction: too noisy to check
            assert abs(b_std / target - 1.0) < 0.15
        assert gain_dev == 0.0
    # the same holds for nn.Linear itself (the reference statistics)
    linear = torch.nn.Linear(6, 256)
    assert abs(linear.weight.std().item() * math.sqrt(18) - 1.0) < 0.1


def test_authors_init_constants_and_their_smaller_weights():
    torch.manual_seed(2)
    net = HyperNetwork(17, 6, 1, init="authors", primary_widths=(64, 128, 256))
    slices = net._chunk_slices()
    head = net.heads.weight[0]
    for index, (w, b, g) in enumerate(slices):
        bound = AUTHORS_OUTPUT_HEAD_BOUND if index == len(slices) - 1 else AUTHORS_HIDDEN_HEAD_BOUND
        for cols in (w, b, g):
            block = head[:, cols]
            assert block.abs().max() <= bound and block.abs().max() > 0.9 * bound
    assert torch.count_nonzero(net.heads.bias) == 0
    primary_first = net.primary.layers[0].weight
    assert primary_first.abs().max() <= 1 / (2 * math.sqrt(17))
    stats = _generated_std(net, torch.randn(2000, 17))
    ratio = [1.0 / math.sqrt(3 * fan_in) / w_std for (fan_in, _), (w_std, _, _) in zip(net.layer_dims, stats)]
    assert all(2.0 < r < 10.0 for r in ratio), ratio  # several times smaller than torch's default
    assert stats[0][2] > 0  # random gains


def test_calibrate_heads_on_given_inputs():
    torch.manual_seed(3)
    net = HyperNetwork(5, 4, 1, primary_widths=(32, 64), dynamic_hidden=(16,))
    data = 5.0 * torch.randn(2000, 5) + 3.0  # far from the standard-normal probe
    before = _generated_std(net, data)[0][0]
    net.calibrate_heads(data)
    after = _generated_std(net, data)[0][0]
    target = 1.0 / math.sqrt(12.0)
    assert abs(after / target - 1.0) < 0.1 and abs(before / target - 1.0) > 0.5


def test_ensemble_linear_matches_nn_linear_per_member():
    layer = EnsembleLinear(5, 3, ensemble_size=4)
    x = torch.randn(6, 5)
    out = layer(x)
    assert out.shape == (4, 6, 3)
    for k in range(4):
        reference = torch.nn.functional.linear(x, layer.weight[k].T, layer.bias[k, 0])
        torch.testing.assert_close(out[k], reference)
    torch.testing.assert_close(layer(x, member=2), out[2:3])
    bound = 1 / math.sqrt(5)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


def test_hyper_policy_outputs_and_split():
    torch.manual_seed(4)
    split = InputSplit.tail(total_dim=7, meta_dim=2)
    assert split.meta_index == (5, 6) and split.base_index == (0, 1, 2, 3, 4)
    policy = HyperPolicy(2, 5, 3, split=split, log_std_init=-0.5, **SMALL)
    x = torch.randn(9, 7)
    params = policy.forward_flat(x)
    assert params.shape == (9, 6)
    torch.testing.assert_close(params, policy(x[:, 5:], x[:, :5]))
    assert torch.all(params[:, 3:] == -0.5)
    params.sum().backward()  # gradients reach the primary through the generated weights
    assert policy.net.primary.layers[0].weight.grad.abs().sum() > 0
    deterministic = HyperPolicy(2, 5, 3, output="deterministic", **SMALL)
    assert deterministic(x[:, 5:], x[:, :5]).abs().max() <= 1.0
    dependent = HyperPolicy(2, 5, 3, state_dependent_std=True, **SMALL)
    assert dependent(x[:, 5:], x[:, :5]).shape == (9, 6) and not hasattr(dependent, "log_std")
    # any split, e.g. overlapping inputs
    overlap = InputSplit((0, 1), (1, 2, 3))
    meta, base = overlap(x)
    assert meta.shape == (9, 2) and base.shape == (9, 3) and torch.equal(meta[:, 1], base[:, 0])
    with pytest.raises(ValueError, match="forward_flat"):
        HyperPolicy(2, 5, 3, **SMALL).forward_flat(x)
    with pytest.raises(ValueError, match="unknown hypernetwork init"):
        HyperNetwork(2, 2, 1, init="xavier")
