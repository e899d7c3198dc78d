"""The critic zoo of the hypernetwork paper (hypernetwork paper, Sections 3 and 5.2): Q(s, a) models for TD3 / SAC.

Every critic is an ensemble of ``E`` independent members (twin critics: ``E = 2``) evaluated in one
batched call (:class:`aclab.nets.hyper.EnsembleLinear`): ``critic(obs [N, D], actions [N, A])`` ->
``Q`` ``[E, N]``; ``member=k`` evaluates member ``k`` only (``[1, N]``).

| kind | model | parameters / member (HalfCheetah) |
| --- | --- | --- |
| ``mlp`` | MLP-Standard: ``[s, a]`` -> 256 -> 256 -> 1 (ReLU) | 72k |
| ``mlp_small`` | MLP-Small: ``[s, a]`` -> 256 -> 1 (the dynamic network's size) | 6k |
| ``mlp_large`` | MLP-Large: ``[s, a]`` -> 2900 -> 2900 -> 1 (~ the hypernetwork's size) | 8.5M |
| ``resnet_features`` | ResNet Features: primary ResNet on ``s`` (1024), concatenated with ``a``, MLP-Standard | 6.5M |
| ``res35`` | Res35: ``[s, a]`` -> Linear 256 -> 35 pre-activation blocks(256) -> ReLU -> Linear 1 | 4.6M |
| ``d2rl`` | Q-D2RL (Sinha et al. 2020): 4 dense layers of 256, layers 2-4 see ``[h, s, a]`` | 0.2M |
| ``sa_hyper`` | SA-Hyper: ``Q = f_{w(s)}(a)`` (state -> primary, action -> dynamic network) | 8.5M |
| ``as_hyper`` | AS-Hyper: ``Q = f_{w(a)}(s)`` (action -> primary, state -> dynamic network) | 11.4M |

MLP layers use ``nn.Linear``'s default initialisation (as the TD3 / SAC reference code); ResNet parts
use the primary network's (authors') initialisation; hypernetworks see :mod:`aclab.nets.hyper`.

:meth:`q_for_actor` is what the actor loss calls: only ``grad_a Q`` is needed there, so SA-Hyper runs
its primary network without autograd (the action gradient flows only through the dynamic network,
hypernetwork paper, Figure 2c, Eq. 14); for the other critics it equals ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aclab.nets.hyper import EnsembleLinear, HyperNetwork, PrimaryResNet, dynamic_forward

CRITIC_KINDS = ("mlp", "mlp_small", "mlp_large", "resnet_features", "res35", "d2rl", "sa_hyper", "as_hyper")
HYPER_CRITIC_KINDS = ("sa_hyper", "as_hyper")


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
                 ensemble_size: int = 2) -> None:
        super().__init__()
        dims = [obs_dim + action_dim, *[int(h) for h in hidden_sizes], 1]
        self.layers = nn.ModuleList(EnsembleLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return _mlp_forward(self.layers, torch.cat([obs, actions], dim=-1), member)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class D2RLCritic(nn.Module):
    """Q-D2RL (Sinha et al. 2020): ``h1 = relu(L1([s, a]))``, ``h_k = relu(L_k([h_{k-1}, s, a]))`` for
    k = 2..num_layers, ``Q = L_out(h_num_layers)``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, num_layers: int = 4,
                 ensemble_size: int = 2) -> None:
        super().__init__()
        in_dim = obs_dim + action_dim
        self.first = EnsembleLinear(in_dim, hidden, ensemble_size)
        self.dense = nn.ModuleList(EnsembleLinear(hidden + in_dim, hidden, ensemble_size)
                                   for _ in range(num_layers - 1))
        self.out = EnsembleLinear(hidden, 1, ensemble_size)
        self.ensemble_size = ensemble_size

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
    """ResNet Features: ``Q = MLP([ResNet(s), a])`` with the hypernetwork's primary ResNet as the state
    encoder and an MLP-Standard head (hypernetwork paper, Section 5.2)."""

    def __init__(self, obs_dim: int, action_dim: int, primary_widths: Sequence[int] = (256, 512, 1024),
                 blocks_per_stage: int = 2, head_hidden: Sequence[int] = (256, 256), ensemble_size: int = 2) -> None:
        super().__init__()
        self.encoder = PrimaryResNet(obs_dim, primary_widths, blocks_per_stage, ensemble_size)
        dims = [self.encoder.out_dim + action_dim, *[int(h) for h in head_hidden], 1]
        self.head = nn.ModuleList(EnsembleLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size

    def forward(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        features = self.encoder(obs, member)
        actions = actions.expand(features.shape[0], *actions.shape) if actions.dim() == 2 else actions
        return _mlp_forward(self.head, torch.cat([features, actions], dim=-1), member)

    def q_for_actor(self, obs: Tensor, actions: Tensor, member: int | None = None) -> Tensor:
        return self.forward(obs, actions, member)


class Res35Critic(nn.Module):
    """Res35: ``[s, a]`` -> Linear(width) -> ``num_blocks`` pre-activation residual blocks -> ReLU ->
    Linear 1 (35 blocks of 256: ~4.6M weights, hypernetwork paper, Section 5.2)."""

    def __init__(self, obs_dim: int, action_dim: int, width: int = 256, num_blocks: int = 35,
                 ensemble_size: int = 2) -> None:
        super().__init__()
        self.trunk = PrimaryResNet(obs_dim + action_dim, (width,), num_blocks, ensemble_size)
        self.out = EnsembleLinear(width, 1, ensemble_size)
        self.ensemble_size = ensemble_size

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
    (e.g. ``hidden_sizes`` for MLPs, ``primary_widths`` / ``init`` for hypernetworks)."""
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
