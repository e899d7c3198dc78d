"""The critic zoo of the hypernetwork paper (hypernetwork paper, Sections 3 and 5.2): Q(s, a) models for TD3 / SAC.

Every critic is an ensemble of ``E`` independent members (twin critics: ``E = 2``) evaluated in one
batched call (:class:`aclab.nets.hyper.EnsembleLinear`): ``critic(obs [N, D], actions [N, A])`` ->
``Q`` ``[E, N]``; ``member=k`` evaluates member ``k`` only (``[1, N]``).

| kind | model | parameters / member (HalfCheetah) |
| --- | --- | --- |
| ``mlp`` | MLP-Standard: ``[s, a]`` -> 256 -> 256 -> 1 (ReLU) | 72k |
| ``mlp_small`` | MLP-Small: ``[s, a]`` -> 256 -> 1 (the dynamic network's size) | 6k |
| ``mlp_large`` | MLP-Large: ``[s, a]`` -> 2900 -> 2900 -> 1 (~ the hypernetwork's size) | 8.5M |
| ``resnet_features`` | ResNet Features: primary ResNet on ``s`` (1024) ++ ``a`` -> 256 -> 1 | 6.4M |
| ``res35`` | Res35: ``[s, a]`` -> Linear 256 -> 35 pre-activation blocks(256) -> ReLU -> Linear 1 | 4.6M |
| ``d2rl`` | Q-D2RL (Sinha et al. 2020): 4 dense layers of 256, layers 2-4 see ``[h, s, a]`` | 0.2M |
| ``sa_hyper`` | SA-Hyper: ``Q = f_{w(s)}(a)`` (state -> primary, action -> dynamic network) | 8.5M |
| ``as_hyper`` | AS-Hyper: ``Q = f_{w(a)}(s)`` (action -> primary, state -> dynamic network) | 11.4M |

``init="torch"`` (default): MLP layers use ``nn.Linear``'s default initialisation (as the TD3 / SAC
reference code) and ResNet parts the primary network's (``primary_init``, :mod:`aclab.nets.hyper`);
``init="xavier"``: every linear layer of the critic (ResNet parts included) gets Xavier-uniform weights
and zero biases, as the authors' SAC code does for all its baseline critics (``init_weights`` applied
to the whole critic). Hypernetworks see :mod:`aclab.nets.hyper`.

ResNet Features (hypernetwork paper, Section 5.2 and footnote 4): "the same primary and dynamic
architecture, but the output of the primary is a state feature vector which is concatenated to the
action"; footnote 4 says its action-gradient model "is identical to ... MLP-Small (single hidden layer
with 256 neurons)", so the default head is ``[e, a] -> 256 -> 1`` on the 1024 features (Section 5.2's
"MLP-Standard" contradicts the footnote; ``head_hidden=(256, 256)`` gives it). ``feature_dim=10`` adds
the authors' SAC code's bottleneck ``Linear(1024, 10)`` before the concatenation (their TD3 code's
version of this critic cannot be built: its constructor is called with the wrong arguments).

:meth:`q_for_actor` is what the actor loss calls: only ``grad_a Q`` is needed there, so SA-Hyper runs
its primary network without autograd (the action gradient flows only through the dynamic network,
hypernetwork paper, Figure 2c, Eq. 14); for the other critics it equals ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aclab.nets.hyper import EnsembleLinear, HyperNetwork, PrimaryResNet, dynamic_forward

CRITIC_KINDS = ("mlp", "mlp_small", "mlp_large", "resnet_features", "res35", "d2rl", "sa_hyper", "as_hyper")
HYPER_CRITIC_KINDS = ("sa_hyper", "as_hyper")
BASELINE_INITS = ("torch", "xavier")


@torch.no_grad()
def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights ``U(+-sqrt(6 / (in + out)))`` per member and zero biases for every
    :class:`EnsembleLinear` in ``module`` (the authors' SAC code's ``init_weights``); returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, EnsembleLinear):
            bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
            layer.weight.uniform_(-bound, bound)
            layer.bias.zero_()
    return module


@torch.no_grad()
def xavier_init_linear(layer: nn.Linear) -> nn.Linear:
    """Xavier-uniform weights and zero bias on one ``nn.Linear`` (``torch.nn.init.xavier_uniform_``)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _check_baseline_init(init: str) -> None:
    if init not in BASELINE_INITS:
        raise ValueError(f"unknown critic init {init!r}; expected one of {BASELINE_INITS}")


def _mlp_forward(layers: Sequence[EnsembleLinear], x: Tensor, member: int | None) -> Tensor:
    """ReLU MLP over ensemble layers; no activation after the last; returns ``[E, N]`` (out dim 1)."""
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        x = layer(x, member)
        if index < last:
            x = torch.relu(x)
    return x.squeeze(-1)


class MLPCritic(nn.Module):
    """``Q(s, a) = MLP([s, a])`` with ReLU hidden layers (MLP-Standard / -Small / -Large)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256),
                 ensemble_size: int = 2, init: str = "torch") -> None:
        super().__init__()
        _check_baseline_init(init)
        dims = [obs_dim + action_dim, *[int(h) for h in hidden_sizes], 1]
        self.layers = nn.ModuleList(EnsembleLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size
        if init == "xavier":
            xavier_init_(self)

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return _mlp_forward(self.layers, torch.cat([obs, actions], dim=-1), member)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class D2RLCritic(nn.Module):
    """Q-D2RL (Sinha et al. 2020): ``h1 = relu(L1([s, a]))``, ``h_k = relu(L_k([h_{k-1}, s, a]))`` for
    k = 2..num_layers, ``Q = L_out(h_num_layers)``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, num_layers: int = 4,
                 ensemble_size: int = 2, init: str = "torch") -> None:
        super().__init__()
        _check_baseline_init(init)
        in_dim = obs_dim + action_dim
        self.first = EnsembleLinear(in_dim, hidden, ensemble_size)
        self.dense = nn.ModuleList(EnsembleLinear(hidden + in_dim, hidden, ensemble_size)
                                   for _ in range(num_layers - 1))
        self.out = EnsembleLinear(hidden, 1, ensemble_size)
        self.ensemble_size = ensemble_size
        if init == "xavier":
            xavier_init_(self)

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        sa = torch.cat([obs, actions], dim=-1)
        h = torch.relu(self.first(sa, member))
        sa_e = sa.expand(h.shape[0], *sa.shape)
        for layer in self.dense:
            h = torch.relu(layer(torch.cat([h, sa_e], dim=-1), member))
        return self.out(h, member).squeeze(-1)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class ResNetFeaturesCritic(nn.Module):
    """ResNet Features: ``Q = MLP([e(s), a])`` with the hypernetwork's primary ResNet as the state encoder
    (1024 features; ``feature_dim > 0``: then a linear bottleneck to that size, the authors' SAC code uses
    10) and a ReLU MLP head of ``head_hidden`` (default one layer of 256: the dynamic network's size,
    hypernetwork paper, footnote 4; module docstring)."""

    def __init__(self, obs_dim: int, action_dim: int, primary_widths: Sequence[int] = (256, 512, 1024),
                 blocks_per_stage: int = 2, head_hidden: Sequence[int] = (256,), feature_dim: int = 0,
                 ensemble_size: int = 2, init: str = "torch", primary_init: str = "td3") -> None:
        super().__init__()
        _check_baseline_init(init)
        if feature_dim < 0:
            raise ValueError(f"feature_dim must be >= 0 (0: no bottleneck), got {feature_dim}")
        self.encoder = PrimaryResNet(obs_dim, primary_widths, blocks_per_stage, ensemble_size, primary_init)
        self.bottleneck = EnsembleLinear(self.encoder.out_dim, feature_dim, ensemble_size) if feature_dim else None
        features = feature_dim or self.encoder.out_dim
        dims = [features + action_dim, *[int(h) for h in head_hidden], 1]
        self.head = nn.ModuleList(EnsembleLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size
        if init == "xavier":
            xavier_init_(self)

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        features = self.encoder(obs, member)
        if self.bottleneck is not None:
            features = self.bottleneck(features, member)
        actions = actions.expand(features.shape[0], *actions.shape) if actions.dim() == 2 else actions
        return _mlp_forward(self.head, torch.cat([features, actions], dim=-1), member)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class Res35Critic(nn.Module):
    """Res35: ``[s, a]`` -> Linear(width) -> ``num_blocks`` pre-activation residual blocks -> ReLU ->
    Linear 1 (35 blocks of 256: ~4.6M weights, hypernetwork paper, Section 5.2)."""

    def __init__(self, obs_dim: int, action_dim: int, width: int = 256, num_blocks: int = 35,
                 ensemble_size: int = 2, init: str = "torch", primary_init: str = "td3") -> None:
        super().__init__()
        _check_baseline_init(init)
        self.trunk = PrimaryResNet(obs_dim + action_dim, (width,), num_blocks, ensemble_size, primary_init)
        self.out = EnsembleLinear(width, 1, ensemble_size)
        self.ensemble_size = ensemble_size
        if init == "xavier":
            xavier_init_(self)

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        h = self.trunk(torch.cat([obs, actions], dim=-1), member)
        return self.out(torch.relu(h), member).squeeze(-1)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class HyperCritic(nn.Module):
    """SA-Hyper (``meta="state"``: ``Q = f_{w(s)}(a)``) or AS-Hyper (``meta="action"``: ``Q = f_{w(a)}(s)``).

    Keyword arguments go to :class:`aclab.nets.hyper.HyperNetwork` (``dynamic_hidden``,
    ``primary_widths``, ``blocks_per_stage``, ``init``).
    """

    def __init__(self, obs_dim: int, action_dim: int, meta: str = "state", ensemble_size: int = 2,
                 **hyper_kwargs) -> None:
        super().__init__()
        if meta not in ("state", "action"):
            raise ValueError(f"HyperCritic meta must be 'state' or 'action', got {meta!r}")
        self.meta = meta
        meta_dim, base_dim = (obs_dim, action_dim) if meta == "state" else (action_dim, obs_dim)
        self.net = HyperNetwork(meta_dim, base_dim, 1, ensemble_size=ensemble_size, **hyper_kwargs)
        self.ensemble_size = ensemble_size

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        if self.meta == "state":
            return self.net(obs, actions, member).squeeze(-1)
        return self.net(actions, obs, member).squeeze(-1)

    def meta_input(self, obs: Tensor, actions: Tensor) -> Tensor:
        """The primary network's input for these ``(s, a)`` pairs: the states (SA) or the actions (AS)."""
        return obs if self.meta == "state" else actions

    def calibrate(self, obs: Tensor, actions: Tensor) -> Tensor | None:
        """Re-calibrate the heads on real inputs (:meth:`aclab.nets.hyper.HyperNetwork.calibrate_heads`);
        a no-op returning None for ``init="authors"`` (fixed bounds)."""
        if self.net.init != "kaiming":
            return None
        return self.net.calibrate_heads(self.meta_input(obs, actions))

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        """Q for the actor loss: SA-Hyper's primary runs without autograd (its weights do not depend on
        the action, so ``grad_a Q`` only needs the dynamic network)."""
        if self.meta != "state":
            return self.forward(obs, actions, member)
        with torch.no_grad():
            layers = self.net.dynamic_layers(obs, member)
        lead = layers[0].bias.shape[:-1]
        return dynamic_forward(layers, actions.expand(*lead, actions.shape[-1])).squeeze(-1)


def make_critic(kind: str, obs_dim: int, action_dim: int, ensemble_size: int = 2, **options) -> nn.Module:
    """Build a critic of ``kind`` (one of :data:`CRITIC_KINDS`); ``options`` go to its constructor
    (e.g. ``hidden_sizes`` / ``init`` for MLPs, ``primary_widths`` / ``init`` / ``primary_init`` for
    hypernetworks, ``feature_dim`` for ResNet Features)."""
    if kind not in CRITIC_KINDS:
        raise ValueError(f"unknown critic kind {kind!r}; expected one of {', '.join(CRITIC_KINDS)}")
    if kind in ("mlp", "mlp_small", "mlp_large"):
        default = {"mlp": (256, 256), "mlp_small": (256,), "mlp_large": (2900, 2900)}[kind]
        hidden = options.pop("hidden_sizes", default)
        return MLPCritic(obs_dim, action_dim, hidden, ensemble_size=ensemble_size, **options)
    if kind == "d2rl":
        return D2RLCritic(obs_dim, action_dim, ensemble_size=ensemble_size, **options)
    if kind == "resnet_features":
        return ResNetFeaturesCritic(obs_dim, action_dim, ensemble_size=ensemble_size, **options)
    if kind == "res35":
        return Res35Critic(obs_dim, action_dim, ensemble_size=ensemble_size, **options)
    meta = "state" if kind == "sa_hyper" else "action"
    return HyperCritic(obs_dim, action_dim, meta=meta, ensemble_size=ensemble_size, **options)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
