"""Observation encoders: MLP, Nature CNN (Mnih et al. 2015) and IMPALA ResNet (Espeholt et al. 2018).

Initialisation schemes used by the papers' code (PPO family, DNA, DCPG): orthogonal weights with
zero biases; hidden layers use gain ``sqrt(2)`` (ReLU/tanh torsos), the policy head gain ``0.01``
(near-uniform initial policy) and the value head gain ``1``. :func:`init_linear` applies one such
layer initialisation; heads are built elsewhere (``aclab.nets.agents``) with it. Image torsos take
``init`` (:func:`init_torso`): ``"orthogonal"`` (every conv and linear layer, gain ``sqrt(2)``),
``"xavier"`` (Xavier-uniform convolutions and an orthogonal ``sqrt(2)`` dense layer: the IMPALA torso
of the DCPG authors' code and of the Procgen baselines it follows) or ``"default"`` (torch's).

Image encoders take channel-first ``[N, C, H, W]`` inputs; uint8 images are scaled by 1/255 inside
the module (so buffers can store uint8), float inputs are used as given. On CPU the scaled image is
laid out channels-last (NHWC strides, the same logical ``[N, C, H, W]`` tensor) before the first
convolution, so every convolution, pooling and residual sum runs on oneDNN's channels-last kernels:
on the 2-core CPU the IMPALA torso's forward+backward on 2048 Procgen frames is 1.5x faster than in
the contiguous (NCHW) layout and its acting forward on 64 frames 2.1-2.3x (``benchmarks/cpu_layout_threads.py``,
docs/performance.md). Only the layout changes; the convolution sums are the same up to float reassociation.

Also on CPU, a batch larger than :data:`CPU_CHUNK_FRAMES` runs through the convolutions in chunks of
that many frames whose features are concatenated (:func:`chunked_forward`): each chunk's activations
stay in the processor's caches while the next layer reads them, and autograd's backward pass visits
the chunks one after another with the same locality. Frames are independent (no batch statistics),
so the features are those of one call; the weight gradients are sums over the chunks (float
reassociation only). Forward+backward of the IMPALA torso on a 2048-frame minibatch: 1.34-1.43x faster
in chunks of 64 than in one call (one thread, channels-last both; same benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
_INITS = ("orthogonal", "default")  # MLP torsos
TORSO_INITS = ("orthogonal", "xavier", "default")  # image torsos (IMPALA ResNet, Nature CNN)


def init_linear(layer: nn.Linear | nn.Conv2d, gain: float, bias: float = 0.0) -> nn.Linear | nn.Conv2d:
    """Orthogonal weight init with ``gain`` and constant ``bias``, in place; returns the layer.

    For a Linear ``[out, in]`` weight the rows (out <= in) or columns (out > in) are orthonormal times
    ``gain``; conv weights are flattened to ``[out, in * k * k]`` first. Typical gains: hidden layers
    ``sqrt(2)``, policy head ``0.01``, value head ``1``.
    """
    nn.init.orthogonal_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


def _check_init(init: str, allowed: tuple[str, ...] = _INITS) -> None:
    if init not in allowed:
        raise ValueError(f"unknown init {init!r}; expected one of {allowed}")


def init_torso(module: nn.Module, init: str, gain: float = math.sqrt(2)) -> None:
    """Initialise the conv and linear layers of an image torso in place (biases 0 unless ``"default"``).

    ``"orthogonal"``: every layer orthogonal with ``gain``. ``"xavier"``: convolutions Xavier-uniform
    (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, fans counting the kernel area), linear layers
    orthogonal with ``gain`` (DCPG authors' code; on real Procgen frames the IMPALA torso's initial
    features are about 25x smaller in L2 norm than with ``"orthogonal"``). ``"default"``: torch's own.
    """
    _check_init(init, TORSO_INITS)
    if init == "default":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and init == "xavier":
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear | nn.Conv2d):
            init_linear(layer, gain)


def _to_float_image(observations: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 images ``[N, C, H, W]`` -> ``dtype`` in [0, 1]; float images unchanged in value.

    On CPU the result is channels-last (see the module docstring); elsewhere it keeps its layout.
    """
    if (observations.device.type == "cpu" and observations.dim() == 4
            and not torch._C._functorch.is_functorch_wrapped_tensor(observations)):  # vmap: no layouts
        observations = observations.contiguous(memory_format=torch.channels_last)  # uint8: 4x cheaper
    if observations.dtype == torch.uint8:
        return observations.to(dtype) / 255.0  # both keep the memory format
    return observations


CPU_CHUNK_FRAMES = 64


def chunked_forward(forward, observations: Tensor, chunk: int | None = None) -> Tensor:
    """``forward(observations)`` for a per-frame image torso, in chunks of ``chunk`` frames on CPU.

    ``forward`` maps ``[n, C, H, W]`` to ``[n, F]`` frame by frame (no batch statistics), so
    ``cat([forward(part) for part in split(chunk)])`` equals one call; on CPU the chunks keep each
    layer's activations in cache (see the module docstring). ``chunk`` defaults to
    :data:`CPU_CHUNK_FRAMES`; other devices, small batches and ``torch.func`` transforms use one call.
    """
    chunk = CPU_CHUNK_FRAMES if chunk is None else chunk
    if (observations.device.type != "cpu" or observations.shape[0] <= chunk
            or torch._C._functorch.is_functorch_wrapped_tensor(observations)):
        return forward(observations)
    return torch.cat([forward(part) for part in observations.split(chunk)])


class MLP(nn.Module):
    """``Linear -> activation`` per hidden size, then an optional output Linear (no activation).

    Input ``[N, in_dim]`` (any leading dims), output ``[N, out_dim]``; ``self.out_dim`` is the output
    width (the last hidden size, or ``in_dim`` when there are no layers). ``init="orthogonal"`` uses
    gain ``gain`` for hidden layers and ``out_gain`` for the output layer; ``"default"`` keeps torch's.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_sizes: Sequence[int],
        activation: str = "tanh",
        out_dim: int | None = None,
        init: str = "orthogonal",
        gain: float = math.sqrt(2),
        out_gain: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(_ACTIVATIONS)}")
        _check_init(init)
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_sizes:
            linear = nn.Linear(width, hidden)
            if init == "orthogonal":
                init_linear(linear, gain)
            layers += [linear, _ACTIVATIONS[activation]()]
            width = hidden
        if out_dim is not None:
            output = nn.Linear(width, out_dim)
            if init == "orthogonal":
                init_linear(output, out_gain)
            layers.append(output)
            width = out_dim
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class NatureCNN(nn.Module):
    """Nature DQN torso (Mnih et al. 2015): conv 32 8x8 s4, 64 4x4 s2, 64 3x3 s1, Linear ``out_dim``.

    ReLU after every layer. Input ``[N, in_channels, image_size, image_size]`` uint8 (scaled by 1/255
    here) or float; output ``[N, out_dim]``. For 84x84 input the flattened conv output is 64*7*7.
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int = 512,
        image_size: int = 84,
        init: str = "orthogonal",
        gain: float = math.sqrt(2),
    ) -> None:
        super().__init__()
        _check_init(init, TORSO_INITS)
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        side = image_size
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            side = (side - kernel) // stride + 1
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the Nature CNN")
        self.linear = nn.Sequential(nn.Linear(64 * side * side, out_dim), nn.ReLU())
        init_torso(self, init, gain)
        self.out_dim = out_dim

    def forward(self, observations: Tensor) -> Tensor:
        return chunked_forward(self._forward, observations)

    def _forward(self, observations: Tensor) -> Tensor:
        return self.linear(self.convs(_to_float_image(observations, self.linear[0].weight.dtype)))


class ImpalaResidualBlock(nn.Module):
    """``x + conv(relu(conv(relu(x))))`` with 3x3 same-padding convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class ImpalaStage(nn.Module):
    """conv3x3 (same) -> maxpool 3x3 stride 2 padding 1 -> two residual blocks."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.blocks = nn.Sequential(ImpalaResidualBlock(channels), ImpalaResidualBlock(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(self.conv(x)))


class ImpalaResNet(nn.Module):
    """IMPALA ResNet torso as used on Procgen (``shared/specs/phasic.md``).

    One :class:`ImpalaStage` per entry of ``channels`` (each halves the side, rounding up), then
    flatten -> ReLU -> Linear ``out_dim`` -> ReLU. With 64x64 input and channels (16, 32, 32) the
    flattened size is 32*8*8 = 2048. Input ``[N, in_channels, image_size, image_size]`` uint8 (scaled
    by 1/255 here) or float; output ``[N, out_dim]``. ``init``: see :func:`init_torso` (the DCPG authors'
    code uses ``"xavier"``; the papers do not state the torso init).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 32),
        out_dim: int = 256,
        image_size: int = 64,
        init: str = "orthogonal",
        gain: float = math.sqrt(2),
    ) -> None:
        super().__init__()
        _check_init(init, TORSO_INITS)
        stages = []
        width, side = in_channels, image_size
        for stage_channels in channels:
            stages.append(ImpalaStage(width, stage_channels))
            width, side = stage_channels, (side + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.linear = nn.Linear(width * side * side, out_dim)
        init_torso(self, init, gain)
        self.out_dim = out_dim

    def forward(self, observations: Tensor) -> Tensor:
        return chunked_forward(self._forward, observations)

    def _forward(self, observations: Tensor) -> Tensor:
        features = self.stages(_to_float_image(observations, self.linear.weight.dtype)).flatten(1)
        return torch.relu(self.linear(torch.relu(features)))


_ENCODER_KINDS = ("auto", "mlp", "nature_cnn", "impala")


def make_encoder(obs_shape: Sequence[int], kind: str = "auto", **kwargs) -> MLP | NatureCNN | ImpalaResNet:
    """Build an encoder for observations of shape ``obs_shape`` (without the batch dimension).

    ``auto``: 1-D obs -> :class:`MLP` (``hidden_sizes`` defaults to (64, 64)); 3-D channel-first
    64x64 -> :class:`ImpalaResNet`; 3-D 84x84 -> :class:`NatureCNN`. ``kwargs`` go to the constructor.
    """
    if kind not in _ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {_ENCODER_KINDS}")
    obs_shape = tuple(int(d) for d in obs_shape)
    if kind == "auto":
        if len(obs_shape) == 1:
            kind = "mlp"
        elif len(obs_shape) == 3 and obs_shape[1:] == (64, 64):
            kind = "impala"
        elif len(obs_shape) == 3 and obs_shape[1:] == (84, 84):
            kind = "nature_cnn"
        else:
            raise ValueError(
                f"cannot choose an encoder for obs shape {obs_shape}: auto supports 1-D vectors and "
                "channel-first [C, 64, 64] (impala) or [C, 84, 84] (nature_cnn) images; pass kind="
            )
    if kind == "mlp":
        if len(obs_shape) != 1:
            raise ValueError(f"the MLP encoder needs 1-D observations, got shape {obs_shape}")
        kwargs.setdefault("hidden_sizes", (64, 64))
        return MLP(obs_shape[0], **kwargs)
    if len(obs_shape) != 3 or obs_shape[1] != obs_shape[2]:
        raise ValueError(f"image encoders need channel-first square [C, H, H] observations, got {obs_shape}")
    if kind == "impala":
        return ImpalaResNet(obs_shape[0], image_size=obs_shape[1], **kwargs)
    return NatureCNN(obs_shape[0], image_size=obs_shape[1], **kwargs)
