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


def build_encoder(obs_shape: Sequence[int], kind: str, hidden_sizes: Sequence[int], activation: str) -> nn.Module:
    """An encoder for ``obs_shape``; MLP options only apply to vector observations."""
    if len(obs_shape) == 1 and kind in ("auto", "mlp"):
        return make_encoder(tuple(obs_shape), kind="mlp", hidden_sizes=tuple(hidden_sizes), activation=activation)
    return make_encoder(tuple(obs_shape), kind=kind)


class ActorCritic(nn.Module):
    """Policy and value function; ``shared=True`` puts both heads on one encoder.

    Args:
        obs_shape: single observation shape.
        dist: a distribution adapter (``Categorical``, ``DiagGaussian``, ``TanhGaussian``).
        encoder: "auto" | "mlp" | "nature_cnn" | "impala".
        hidden_sizes, activation: MLP torso for vector observations.
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
    ):
        super().__init__()
        self.dist = dist
        self.shared = shared
        self.discrete = isinstance(dist, Categorical)
        self.policy_encoder = build_encoder(obs_shape, encoder, hidden_sizes, activation)
        self.value_encoder = (
            self.policy_encoder if shared else build_encoder(obs_shape, encoder, hidden_sizes, activation)
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

    def dist_params(self, obs: torch.Tensor) -> torch.Tensor:
        return self._params_from_head(self.policy_head(self.policy_encoder(obs)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_head(self.value_encoder(obs)).squeeze(-1)
