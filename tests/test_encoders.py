"""Tests of aclab.nets.encoders: shapes, parameter counts, uint8 scaling, init, gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aclab.nets.encoders import MLP, ImpalaResNet, NatureCNN, init_linear, make_encoder


def conv_params(c_in: int, c_out: int, kernel: int) -> int:
    return c_out * c_in * kernel * kernel + c_out


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_orthogonal(weight: torch.Tensor, gain: float) -> None:
    """Rows orthonormal (times gain) when out <= in, columns otherwise."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    torch.testing.assert_close(
        gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0
    )


def random_images(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# MLP and init
# ----------------------------------------------------------------------------------------------
def test_mlp_shapes_and_out_dim():
    torso = MLP(8, (64, 32), activation="relu")
    assert torso.out_dim == 32
    assert torso(torch.randn(5, 8)).shape == (5, 32)
    with_head = MLP(8, (64, 64), activation="tanh", out_dim=3)
    assert with_head.out_dim == 3 and with_head(torch.randn(2, 7, 8)).shape == (2, 7, 3)
    assert isinstance(with_head.layers[-1], nn.Linear)  # no activation after the output layer
    assert n_params(with_head) == linear_params(8, 64) + linear_params(64, 64) + linear_params(64, 3)
    assert MLP(8, ()).out_dim == 8


def test_mlp_orthogonal_init_in_both_orientations():
    torso = MLP(8, (64, 4), out_dim=2, gain=math.sqrt(2), out_gain=0.01)
    first, second, output = [m for m in torso.modules() if isinstance(m, nn.Linear)]
    assert_orthogonal(first.weight, math.sqrt(2))  # 64 x 8: orthonormal columns
    assert_orthogonal(second.weight, math.sqrt(2))  # 4 x 64: orthonormal rows
    assert_orthogonal(output.weight, 0.01)
    assert all((m.bias == 0).all() for m in (first, second, output))


def test_default_init_is_not_orthogonal():
    layer = [m for m in MLP(64, (64,), init="default").modules() if isinstance(m, nn.Linear)][0]
    with pytest.raises(AssertionError):
        assert_orthogonal(layer.weight, math.sqrt(2))


def test_init_linear_sets_gain_and_bias():
    layer = init_linear(nn.Linear(16, 5), gain=1.0, bias=0.5)
    assert_orthogonal(layer.weight, 1.0)
    assert (layer.bias == 0.5).all()
    conv = init_linear(nn.Conv2d(3, 8, 3), gain=math.sqrt(2))
    assert_orthogonal(conv.weight, math.sqrt(2))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="activation"):
        MLP(4, (8,), activation="gelu")
    with pytest.raises(ValueError, match="init"):
        NatureCNN(4, init="kaiming")
    with pytest.raises(ValueError, match="init"):
        MLP(4, (8,), init="xavier")  # MLP torsos: orthogonal or default only


# ----------------------------------------------------------------------------------------------
# Nature CNN
# ----------------------------------------------------------------------------------------------
def test_nature_cnn_shape_and_parameter_count():
    net = NatureCNN(4)
    assert net(random_images(3, 4, 84)).shape == (3, 512) and net.out_dim == 512
    expected = (
        conv_params(4, 32, 8)
        + conv_params(32, 64, 4)
        + conv_params(64, 64, 3)
        + linear_params(64 * 7 * 7, 512)
    )
    assert n_params(net) == expected == 1_684_128
    for layer in net.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            assert_orthogonal(layer.weight, math.sqrt(2))


# ----------------------------------------------------------------------------------------------
# IMPALA ResNet
# ----------------------------------------------------------------------------------------------
def impala_reference_forward(net: ImpalaResNet, x: torch.Tensor) -> torch.Tensor:
    """The architecture of shared/specs/phasic.md written out with functional ops and net's weights."""
    for stage in net.stages:
        x = F.conv2d(x, stage.conv.weight, stage.conv.bias, padding=1)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for block in stage.blocks:
            inner = F.conv2d(F.relu(x), block.conv0.weight, block.conv0.bias, padding=1)
            x = x + F.conv2d(F.relu(inner), block.conv1.weight, block.conv1.bias, padding=1)
    assert x.flatten(1).shape[1] == 2048
    return F.relu(F.linear(F.relu(x.flatten(1)), net.linear.weight, net.linear.bias))


def test_impala_resnet_shape_parameter_count_and_reference():
    net = ImpalaResNet(3)
    images = random_images(2, 3, 64)
    out = net(images)
    assert out.shape == (2, 256) and net.out_dim == 256
    # the reference in float64 (the module runs channels-last on CPU: same sums, other rounding order)
    reference = impala_reference_forward(copy.deepcopy(net).double(), images.double() / 255.0)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)

    expected, width = 0, 3
    for channels in (16, 32, 32):  # stage conv + two residual blocks of two convs each
        expected += conv_params(width, channels, 3) + 4 * conv_params(channels, channels, 3)
        width = channels
    expected += linear_params(32 * 8 * 8, 256)
    assert n_params(net) == expected == 622_144


def test_impala_resnet_other_sizes():
    net = ImpalaResNet(4, channels=(8, 16), out_dim=32, image_size=84)
    assert net(torch.rand(2, 4, 84, 84)).shape == (2, 32)
    assert net.linear.in_features == 16 * 21 * 21


@pytest.mark.parametrize("make", [lambda: NatureCNN(4), lambda: ImpalaResNet(3)])
def test_uint8_input_equals_scaled_float_input(make):
    net = make()
    side = 84 if isinstance(net, NatureCNN) else 64
    images = random_images(2, net_channels(net), side, seed=1)
    torch.testing.assert_close(net(images), net(images.float() / 255.0))


def net_channels(net: nn.Module) -> int:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: NatureCNN(4), (2, 4, 84, 84)),
        (lambda: ImpalaResNet(3), (2, 3, 64, 64)),
        (lambda: MLP(6, (16, 16), out_dim=2), (2, 6)),
    ],
)
def test_gradients_reach_every_parameter(make, shape):
    net = make()
    net(torch.rand(*shape)).square().sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------
# make_encoder
# ----------------------------------------------------------------------------------------------
def test_make_encoder_auto():
    mlp = make_encoder((11,))
    assert isinstance(mlp, MLP) and mlp.out_dim == 64
    assert isinstance(make_encoder((3, 64, 64)), ImpalaResNet)
    assert isinstance(make_encoder((4, 84, 84)), NatureCNN)
    assert make_encoder((11,), hidden_sizes=(32,), activation="relu").out_dim == 32
    assert isinstance(make_encoder((3, 64, 64), kind="nature_cnn"), NatureCNN)


@pytest.mark.parametrize(
    "shape,kind,message",
    [
        ((3, 32, 32), "auto", "cannot choose"),
        ((11, 2), "auto", "cannot choose"),
        ((3, 64, 64), "mlp", "1-D"),
        ((11,), "impala", "channel-first"),
        ((11,), "transformer", "unknown"),
    ],
)
def test_make_encoder_errors(shape, kind, message):
    with pytest.raises(ValueError, match=message):
        make_encoder(shape, kind)


def test_uint8_input_follows_the_module_dtype():
    net = ImpalaResNet(3).double()
    images = random_images(1, 3, 64)
    out = net(images)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, net(images.double() / 255.0))


def test_xavier_torso_init_matches_its_definition():
    torch.manual_seed(0)
    net = ImpalaResNet(3, init="xavier")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 15
    for conv in convs:  # U(-a, a), a = sqrt(6 / (fan_in + fan_out)), fans include the 3x3 kernel
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = conv.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.2)
        assert torch.all(conv.bias == 0)
    assert_orthogonal(net.linear.weight, math.sqrt(2))  # the dense layer stays orthogonal sqrt(2)
    assert torch.all(net.linear.bias == 0)
    cnn = NatureCNN(4, init="xavier")
    assert_orthogonal(cnn.linear[0].weight, math.sqrt(2))
    with pytest.raises(ValueError, match="unknown init"):
        ImpalaResNet(3, init="he")


def test_initial_feature_scale_on_real_procgen_frames():
    """DCPG authors' torso (xavier): features of L2 norm ~7 on real frames and a small initial |V|; the
    all-orthogonal torso gives ~25x larger features (a value scale that DCPG's delayed critic keeps)."""
    import numpy as np

    from aclab.envs import make_env
    from aclab.train import make_config

    frames = []
    for game in ("bigfish", "coinrun"):
        env = make_env(f"procgen:{game}", 8, 0)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(4):
            for _ in range(5):
                env.step(rng.integers(0, 15, 8))
            frames.append(env.obs.copy())
        env.close()
    obs = torch.as_tensor(np.concatenate(frames))  # 64 real uint8 frames
    scale = {}
    for init in ("xavier", "orthogonal"):
        norms = []
        for seed in range(3):
            torch.manual_seed(seed)
            with torch.no_grad():
                norms.append(ImpalaResNet(3, init=init)(obs).norm(dim=1).mean().item())
        scale[init] = norms
    assert all(2.0 < n < 20.0 for n in scale["xavier"]), scale
    assert all(n > 80.0 for n in scale["orthogonal"]), scale
    # the Procgen presets build the authors' torso
    config = make_config("dcpg", "procgen:bigfish")
    assert config.params.encoder_init == "xavier"
    assert make_config("ppo", "procgen:bigfish").params.encoder_init == "xavier"
    from aclab import registry
    from aclab.algos.common import resolve_device
    from aclab.envs import build_envs

    envs = build_envs(config, num_envs=1)
    torch.manual_seed(0)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    envs.close()
    with torch.no_grad():
        features = algo.net.policy_encoder(obs).norm(dim=1).mean().item()
        values = algo.net.value(obs).abs().mean().item()
    assert 2.0 < features < 20.0 and values < 2.0

@pytest.mark.parametrize("make,side", [(lambda: NatureCNN(4), 84), (lambda: ImpalaResNet(3), 64)])
def test_image_encoders_run_channels_last_on_cpu(make, side):
    """The convolutions see channels-last (NHWC-strided) inputs on CPU: oneDNN's fast path (about 2x
    on the IMPALA torso here, docs/performance.md); the logical shape and the values are unchanged."""
    net = make()
    seen = []
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = random_images(2, net_channels(net), side, seed=3)
    net(images)
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(x.shape[1] == c.in_channels for x, c in zip(seen, convs))


@pytest.mark.parametrize("make,side", [(lambda: NatureCNN(4, out_dim=32), 84),
                                       (lambda: ImpalaResNet(3, channels=(4, 8), out_dim=16), 64)])
def test_image_encoders_run_large_batches_in_chunks_with_the_same_features_and_gradients(make, side):
    """On CPU a batch above CPU_CHUNK_FRAMES goes through the convolutions chunk by chunk (cache
    locality, docs/performance.md); features and weight gradients equal those of one float64 call."""
    from aclab.nets import encoders

    torch.manual_seed(4)
    net = make()
    n = encoders.CPU_CHUNK_FRAMES * 2 + 3
    images = random_images(n, net_channels(net), side, seed=5)
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    batch_sizes = []
    first_conv.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    out = net(images)
    assert batch_sizes == [encoders.CPU_CHUNK_FRAMES, encoders.CPU_CHUNK_FRAMES, 3]
    (out.square().sum() / n).backward()

    reference = copy.deepcopy(net).double()
    reference.zero_grad(set_to_none=True)
    ref_out = reference._forward(images.double() / 255.0)
    (ref_out.square().sum() / n).backward()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for p, q in zip(net.parameters(), reference.parameters()):  # fp32 sums of ~10^5 terms: 1e-4 of the scale
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=0, atol=1e-4 * q.grad.abs().max().item())
