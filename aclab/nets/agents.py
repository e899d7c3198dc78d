"""Policy/value assemblies built from the encoders: shared torso or separate networks.

An :class:`ActorCritic` maps observations [N, *obs_shape] to ``(dist_params [N, P], value [N])``,
where ``dist_params`` is the single parameter tensor of an :mod:`aclab.core.distributions` adapter
(categorical logits, or ``cat(mean, log_std)`` for Gaussians). Initialisation follows the PPO
papers and CleanRL: orthogonal hidden layers with gain sqrt(2), policy head gain 0.01, value head
gain 1.0, zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aclab.core.distributions import Categorical
from aclab.nets.encoders import init_linear, make_encoder


def build_encoder(obs_shape: Sequence[int], kind: str, hidden_sizes: Sequence[int], activation: str,
                  init: str = "orthogonal") -> nn.Module:
    """An encoder for ``obs_shape``; MLP options only apply to vector observations, ``init`` (see
    :func:`aclab.nets.encoders.init_torso`) only to image torsos (MLP torsos stay orthogonal)."""
    if len(obs_shape) == 1 and kind in ("auto", "mlp"):
        return make_encoder(tuple(obs_shape), kind="mlp", hidden_sizes=tuple(hidden_sizes), activation=activation)
    return make_encoder(tuple(obs_shape), kind=kind, init=init)


class ActorCritic(nn.Module):
    """Policy and value function; ``shared=True`` puts both heads on one encoder.

    Args:
        obs_shape: single observation shape.
        dist: a distribution adapter (``Categorical``, ``DiagGaussian``, ``TanhGaussian``).
        encoder: "auto" | "mlp" | "nature_cnn" | "impala".
        hidden_sizes, activation: MLP torso for vector observations.
        encoder_init: image torso initialisation, "orthogonal" | "xavier" | "default".
        shared: one encoder for both heads (Procgen/Atari PPO) or two (CleanRL's MuJoCo PPO).
        log_std_init: initial log standard deviation of a state-independent Gaussian policy.
        state_dependent_std: Gaussian log std from the policy head instead of a free parameter.
    """

    def __init__(
        self,
        obs_shape: Sequence[int],
        dist,
        *,
        encoder: str = "auto",
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        shared: bool = False,
        log_std_init: float = 0.0,
        state_dependent_std: bool = False,
        encoder_init: str = "orthogonal",
    ):
        super().__init__()
        self.dist = dist
        self.shared = shared
        self.discrete = isinstance(dist, Categorical)
        self.policy_encoder = build_encoder(obs_shape, encoder, hidden_sizes, activation, encoder_init)
        self.value_encoder = (
            self.policy_encoder if shared else build_encoder(obs_shape, encoder, hidden_sizes, activation, encoder_init)
        )
        feat = self.policy_encoder.out_dim
        self.state_dependent_std = state_dependent_std or self.discrete
        out = dist.param_dim if self.state_dependent_std else dist.param_dim // 2
        self.policy_head = init_linear(nn.Linear(feat, out), gain=0.01)
        self.value_head = init_linear(nn.Linear(self.value_encoder.out_dim, 1), gain=1.0)
        if not self.state_dependent_std:
            self.log_std = nn.Parameter(torch.full((out,), float(log_std_init)))

    def _params_from_head(self, head_out: torch.Tensor) -> torch.Tensor:
        if self.state_dependent_std:
            return head_out
        return torch.cat([head_out, self.log_std.expand_as(head_out)], dim=-1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [N, *obs_shape] -> (dist_params [N, P], value [N])."""
        policy_features = self.policy_encoder(obs)
        value_features = policy_features if self.shared else self.value_encoder(obs)
        params = self._params_from_head(self.policy_head(policy_features))
        return params, self.value_head(value_features).squeeze(-1)

    def forward_with_features(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs [N, *obs_shape] -> (dist_params [N, P], value [N], policy-encoder features [N, F]).

        The features feed auxiliary heads on the policy torso (PPG's auxiliary value head, DDCPG's
        dynamics discriminator); with ``shared=True`` they are the shared encoder's output.
        """
        policy_features = self.policy_encoder(obs)
        value_features = policy_features if self.shared else self.value_encoder(obs)
        params = self._params_from_head(self.policy_head(policy_features))
        return params, self.value_head(value_features).squeeze(-1), policy_features

    def dist_params(self, obs: torch.Tensor) -> torch.Tensor:
        return self._params_from_head(self.policy_head(self.policy_encoder(obs)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_head(self.value_encoder(obs)).squeeze(-1)


class FusedMLPActorCritic(nn.Module):
    """Separate policy and value MLPs evaluated together with batched matrix multiplies.

    Mathematically the same model as ``ActorCritic(shared=False)`` with MLP torsos (same
    initialisation statistics), but each layer holds both networks' weights as one ``[2, in, out]``
    tensor (index 0: policy, 1: value), so a forward pass is one ``baddbmm`` per layer instead of
    two ``linear`` calls, and the optimiser sees half as many tensors. On CPU, small networks are
    bound by per-call overhead, so this cuts PPO's update time by ~25% on CartPole (measured).
    The heads are one ``[2, H, P]`` layer: the value uses column 0 of slice 1 (the other columns of
    that slice get zero gradients and stay at their initial values).
    """

    def __init__(
        self,
        obs_dim: int,
        dist,
        *,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        log_std_init: float = 0.0,
    ):
        super().__init__()
        self.dist = dist
        self.shared = False
        self.discrete = isinstance(dist, Categorical)
        self.state_dependent_std = self.discrete
        self.activation = {"tanh": torch.tanh, "relu": torch.relu}[activation]
        self.activation_name = activation
        dims = [obs_dim, *hidden_sizes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            self.weights.append(nn.Parameter(_orthogonal_stack(fan_in, fan_out, (2 ** 0.5, 2 ** 0.5))))
            self.biases.append(nn.Parameter(torch.zeros(2, 1, fan_out)))
        out = dist.param_dim if self.state_dependent_std else dist.param_dim // 2
        self.head_weight = nn.Parameter(_orthogonal_stack(dims[-1], out, (0.01, 1.0), value_cols=1))
        self.head_bias = nn.Parameter(torch.zeros(2, 1, out))
        if not self.state_dependent_std:
            self.log_std = nn.Parameter(torch.full((out,), float(log_std_init)))

    def layer_outputs(self, obs: torch.Tensor) -> list[torch.Tensor]:
        """The input broadcast to both MLPs [2, N, D] followed by every hidden layer's output [2, N, H_k]
        (index 0: policy, 1: value); :mod:`aclab.nets.analytic_ppo` backpropagates through them by hand."""
        outputs = [obs.unsqueeze(0).expand(2, *obs.shape)]
        for weight, bias in zip(self.weights, self.biases):
            outputs.append(self.activation(torch.baddbmm(bias, outputs[-1], weight)))
        return outputs

    def _hidden(self, obs: torch.Tensor) -> torch.Tensor:
        """Last hidden layer of both MLPs [2, N, H] (index 0: policy, 1: value)."""
        return self.layer_outputs(obs)[-1]

    def _heads(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.head_bias, self._hidden(obs), self.head_weight)

    def _params_from_head(self, head_out: torch.Tensor) -> torch.Tensor:
        if self.state_dependent_std:
            return head_out
        return torch.cat([head_out, self.log_std.expand_as(head_out)], dim=-1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [N, obs_dim] -> (dist_params [N, P], value [N])."""
        out = self._heads(obs)
        return self._params_from_head(out[0]), out[1, :, 0]

    def forward_with_features(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs [N, obs_dim] -> (dist_params [N, P], value [N], policy MLP features [N, H])."""
        hidden = self._hidden(obs)
        out = torch.baddbmm(self.head_bias, hidden, self.head_weight)
        return self._params_from_head(out[0]), out[1, :, 0], hidden[0]

    def dist_params(self, obs: torch.Tensor) -> torch.Tensor:
        return self.forward(obs)[0]

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.forward(obs)[1]


def _orthogonal_stack(
    fan_in: int, fan_out: int, gains: tuple[float, float], value_cols: int | None = None
) -> torch.Tensor:
    """[2, fan_in, fan_out] weights, slice k orthogonal with gain ``gains[k]`` (as nn.Linear's
    orthogonal init, transposed); ``value_cols`` limits slice 1 to its first columns (others zero)."""
    stacked = torch.zeros(2, fan_in, fan_out)
    for k, gain in enumerate(gains):
        cols = fan_out if (k == 0 or value_cols is None) else value_cols
        weight = torch.empty(cols, fan_in)
        nn.init.orthogonal_(weight, gain=gain)
        stacked[k, :, :cols] = weight.T
    return stacked


def make_actor_critic(
    obs_shape: Sequence[int],
    dist,
    *,
    encoder: str = "auto",
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "tanh",
    shared: bool = False,
    log_std_init: float = 0.0,
    encoder_init: str = "orthogonal",
) -> nn.Module:
    """:class:`FusedMLPActorCritic` for separate MLP networks on vector observations, else
    :class:`ActorCritic` (``encoder_init``: the image torsos' initialisation)."""
    if len(obs_shape) == 1 and encoder in ("auto", "mlp") and not shared:
        return FusedMLPActorCritic(obs_shape[0], dist, hidden_sizes=hidden_sizes, activation=activation,
                                   log_std_init=log_std_init)
    return ActorCritic(obs_shape, dist, encoder=encoder, hidden_sizes=hidden_sizes, activation=activation,
                       shared=shared, log_std_init=log_std_init, encoder_init=encoder_init)
