"""IMPALA (Espeholt et al. 2018) as configured by STAC (Zahavy et al. 2020): a V-trace actor-critic learner
on batches of fixed-length trajectories, with decoupled actors.

One iteration (= one learner update):
    1. get m trajectories of n steps (``m = env.num_envs``): collected here with ``envs`` (synchronous
       mode) or taken from the actors' queue (thread / process / Ray actors, see aclab.data.actors);
    2. unroll the network over the batch at the learner's parameters; (leaky) V-trace targets and
       policy-gradient advantages from sg(values) and sg(pi / mu) (STAC Eq. 2 / Eq. 5, Algorithm 1);
    3. the summed loss of STAC Eq. (1): ``g_v * L_value + g_p * L_policy + g_e * L_entropy`` (for a
       squashed-Gaussian policy ``L_entropy`` is replaced by ``sum KL(pi || N(0, I))``, Section 4.2);
       with ``num_heads > 1`` (IMPALA with auxiliary heads) the heads' losses are averaged
       (Algorithm 2 line 11) and head 1 acts;
    4. one RMSProp step (decay 0.99, eps 0.1; optax convention ``g / sqrt(ms + eps)`` with ``ms`` starting
       at 0, see :func:`rmsprop_step`) with the learning rate decayed linearly (Table 3).

Dummy transitions of next-step autoreset get zero loss weight and log-ratio 0 (so no inf/NaN can reach
the V-trace recursion); episode ends cut the traces (see aclab.core.returns).

The policy lag (learner updates between the behaviour parameters and the learner's) is logged per batch:
``policy_lag_mean`` / ``policy_lag_max``. Synchronous mode has lag 0 except for overlapping steps.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal, NamedTuple

import gymnasium
import numpy as np
import torch
from torch import Tensor, nn

from aclab import distributed
from aclab.algos.common import Entry, check_finite, linear_schedule
from aclab.config import ConfigError, require
from aclab.core.distributions import (
    Categorical,
    TanhGaussian,
    categorical_log_prob,
    categorical_sample,
    make_distribution,
    normal_kl,
    normal_sample,
    tanh_normal_log_prob,
)
from aclab.core.returns import leaky_vtrace
from aclab.data.actors import (
    Chunk,
    FailureBudget,
    TrajectoryCollector,
    concat_chunks,
    make_actor_pool,
    make_actor_specs,
)
from aclab.nets.encoders import MLP, make_encoder

ACTOR_MODES = ("sync", "thread", "process", "ray")


@dataclass
class ImpalaConfig:
    """IMPALA hyperparameters. Defaults: STAC Table 3 (Atari column) and Table 2; ``m = env.num_envs``.

    In STAC these loss settings are the *outer* hyperparameters (gamma = gamma_outer, vf_coef = g_v_outer...).
    """

    # trajectories (Table 3): n steps; control uses n = 40 with overlap 30
    num_steps: int = 20
    overlap: int = 0
    # loss (Eq. 1, Algorithm 1)
    gamma: float = 0.995
    trace_lambda: float = 1.0
    vf_coef: float = 0.25  # g_v
    pg_coef: float = 1.0  # g_p
    ent_coef: float = 0.01  # g_e (entropy bonus; KL to N(0, I) weight for squashed Gaussians)
    rho_bar: float = 1.0
    c_bar: float = 1.0
    rho_bar_pg: float = 1.0
    alpha_rho: float = 1.0  # leaky V-trace (Eq. 5); 1 = V-trace
    alpha_c: float = 1.0
    pg_lambda_mix: bool = False  # rlax's q_s = r + gamma (lambda v_s+1 + (1 - lambda) V_s+1); paper: False
    # not in the paper: clamp log(pi / mu) to [-c, c] so that leaky V-trace's unclipped (1 - alpha) IS term
    # stays bounded (STACX's auxiliary Gaussian heads can reach ratios of e^20 against head 1)
    log_rho_clip: float | None = None
    loss_reduction: Literal["sum", "mean"] = "sum"  # Eq. 1 sums over the batch
    reward_clip: float | None = None  # IMPALA clips Atari rewards to [-1, 1]
    max_grad_norm: float | None = None
    # optimiser (Table 3)
    lr: float = 6e-4
    lr_end: float = 0.0
    rmsprop_decay: float = 0.99
    rmsprop_eps: float = 0.1
    rmsprop_eps_placement: Literal["inside", "outside"] = (
        "inside"  # optax / TF: sqrt(ms + eps); torch: sqrt(ms)+eps
    )
    rmsprop_initial_ms: float = 0.0  # optax 0; TF1's RMSPropOptimizer starts at 1
    # network (Table 2)
    encoder: Literal["auto", "mlp", "impala", "nature_cnn"] = "auto"
    hidden_sizes: tuple[int, ...] = (256, 256)
    channels: tuple[int, ...] = (16, 32, 32)
    torso_out: int = 256
    lstm_size: int = 0
    head_hidden: int = 256
    num_heads: int = 1
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    continuous_regularizer: Literal["kl_standard_normal", "entropy"] = "kl_standard_normal"
    # acting
    actor_mode: Literal["sync", "thread", "process", "ray"] = "sync"
    num_actors: int = 2
    envs_per_actor: int = 0  # 0: env.num_envs // num_actors
    max_pending_per_actor: int = 2
    ray_address: str | None = None  # None: start a local runtime if none is running; "auto": join a cluster
    ray_num_cpus: int | None = None  # for a local runtime started here
    ray_cpus_per_actor: float = 1.0
    actor_timeout_s: float = 300.0
    # actors that survive (not in the paper): see aclab.data.actors and docs/scaling.md
    wait_for_actors: bool = True  # the first update waits until every actor has built its envs
    max_policy_lag: int | None = 5  # drop chunks collected more than this many updates ago (None: keep all)
    actor_failure_limit: int = 5  # stop the run (failed, after a checkpoint) at this many actor failures ...
    actor_failure_window_s: float = 300.0  # ... within this many seconds

    def validate(self) -> None:
        require(self.num_steps >= 1, "params.num_steps", self.num_steps, "an integer >= 1")
        require(
            0 <= self.overlap < self.num_steps, "params.overlap", self.overlap, "an integer in [0, num_steps)"
        )
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(
            0.0 <= self.trace_lambda <= 1.0, "params.trace_lambda", self.trace_lambda, "a number in [0, 1]"
        )
        for key in ("vf_coef", "pg_coef", "ent_coef"):
            require(getattr(self, key) >= 0, f"params.{key}", getattr(self, key), "a number >= 0")
        for key in ("rho_bar", "c_bar", "rho_bar_pg", "lr", "rmsprop_eps"):
            require(getattr(self, key) > 0, f"params.{key}", getattr(self, key), "a number > 0")
        for key in ("alpha_rho", "alpha_c"):
            require(
                0.0 <= getattr(self, key) <= 1.0, f"params.{key}", getattr(self, key), "a number in [0, 1]"
            )
        require(self.lr_end >= 0, "params.lr_end", self.lr_end, "a number >= 0")
        require(
            0.0 <= self.rmsprop_decay < 1.0, "params.rmsprop_decay", self.rmsprop_decay, "a number in [0, 1)"
        )
        require(
            self.rmsprop_initial_ms >= 0,
            "params.rmsprop_initial_ms",
            self.rmsprop_initial_ms,
            "a number >= 0",
        )
        require(
            self.reward_clip is None or self.reward_clip > 0,
            "params.reward_clip",
            self.reward_clip,
            "a number > 0 or None",
        )
        require(
            self.log_rho_clip is None or self.log_rho_clip > 0,
            "params.log_rho_clip",
            self.log_rho_clip,
            "a number > 0 or None",
        )
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "params.max_grad_norm",
            self.max_grad_norm,
            "a number > 0 or None",
        )
        require(
            all(h >= 1 for h in self.hidden_sizes),
            "params.hidden_sizes",
            self.hidden_sizes,
            "a list of positive integers",
        )
        require(
            len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
            "params.channels",
            self.channels,
            "a non-empty list of positive integers",
        )
        require(self.lstm_size >= 0, "params.lstm_size", self.lstm_size, "an integer >= 0 (0: no LSTM)")
        require(
            self.head_hidden >= 0, "params.head_hidden", self.head_hidden, "an integer >= 0 (0: linear heads)"
        )
        require(self.num_heads >= 1, "params.num_heads", self.num_heads, "an integer >= 1")
        require(
            self.log_std_min < self.log_std_max,
            "params.log_std_max",
            self.log_std_max,
            "a number > log_std_min",
        )
        require(self.num_actors >= 1, "params.num_actors", self.num_actors, "an integer >= 1")
        require(self.envs_per_actor >= 0, "params.envs_per_actor", self.envs_per_actor, "an integer >= 0")
        require(
            self.max_pending_per_actor >= 1,
            "params.max_pending_per_actor",
            self.max_pending_per_actor,
            "an integer >= 1",
        )
        require(self.actor_timeout_s > 0, "params.actor_timeout_s", self.actor_timeout_s, "a number > 0")
        require(
            self.max_policy_lag is None or self.max_policy_lag >= 0,
            "params.max_policy_lag",
            self.max_policy_lag,
            "an integer >= 0 or None (keep every chunk)",
        )
        require(
            self.actor_failure_limit >= 1, "params.actor_failure_limit", self.actor_failure_limit, "an integer >= 1"
        )
        require(
            self.actor_failure_window_s > 0,
            "params.actor_failure_window_s",
            self.actor_failure_window_s,
            "a number of seconds > 0",
        )


# ----------------------------------------------------------------------------------------------
# Network (STAC Table 2)
# ----------------------------------------------------------------------------------------------
class LSTMCore(nn.Module):
    """A plain LSTM cell (written out so that double backward works on every device).

    State ``[B, 2 * size]`` = ``cat(h, c)``; gates ``i, f, g, o`` from ``x W_x + h W_h + b``.
    """

    def __init__(self, in_dim: int, size: int):
        super().__init__()
        self.size = size
        self.input_layer = nn.Linear(in_dim, 4 * size)
        self.hidden_layer = nn.Linear(size, 4 * size, bias=False)
        nn.init.orthogonal_(self.input_layer.weight)
        nn.init.orthogonal_(self.hidden_layer.weight)
        nn.init.zeros_(self.input_layer.bias)
        with torch.no_grad():
            self.input_layer.bias[size : 2 * size] = 1.0  # forget-gate bias 1

    def forward(self, x: Tensor, state: Tensor) -> Tensor:
        """x [B, in_dim], state [B, 2 size] -> new state [B, 2 size] (the output is its first half)."""
        h, c = state.chunk(2, dim=-1)
        i, f, g, o = (self.input_layer(x) + self.hidden_layer(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=-1)


class ImpalaNet(nn.Module):
    """Shared torso (-> optional LSTM) -> ``num_heads`` pairs of policy and value heads (STAC Table 2).

    Torso: MLP (``hidden_sizes``, ReLU) for vectors; IMPALA ResNet (``channels``, 2 residual blocks and
    a 3x3 stride-2 max-pool per stage, Linear ``torso_out``) for images. Heads: MLPs with one hidden layer
    of ``head_hidden`` units (0: linear). Continuous actions (squashed Gaussian): the policy head's ``2D``
    outputs ``y`` give ``mean = tanh(y_mean)`` and ``log_std = s_min + 0.5 (s_max - s_min)(tanh(y_std) + 1)``
    (the paper's bounded std, Section 9.3). ``gamma_embedding > 0`` concatenates ``Linear(1, E)(gamma_h)``
    to the features of head ``h`` (Xu et al. 2018; STAC Section 9.5); the gamma fed to acting is the
    buffer ``gamma_input`` [num_heads].
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        dist,
        *,
        encoder: str = "auto",
        hidden_sizes: tuple[int, ...] = (256, 256),
        channels: tuple[int, ...] = (16, 32, 32),
        torso_out: int = 256,
        lstm_size: int = 0,
        head_hidden: int = 256,
        num_heads: int = 1,
        log_std_bounds: tuple[float, float] = (-5.0, 2.0),
        gamma_embedding: int = 0,
    ):
        super().__init__()
        self.dist = dist
        self.discrete = isinstance(dist, Categorical)
        self.num_heads = num_heads
        self.log_std_bounds = log_std_bounds
        if len(obs_shape) == 1 and encoder in ("auto", "mlp"):
            self.torso: nn.Module = MLP(obs_shape[0], hidden_sizes, activation="relu")
        else:
            kind = "impala" if encoder == "auto" else encoder
            kwargs = (
                {"channels": tuple(channels), "out_dim": torso_out}
                if kind == "impala"
                else {"out_dim": torso_out}
            )
            self.torso = make_encoder(tuple(obs_shape), kind=kind, **kwargs)
        features = self.torso.out_dim
        self.core = LSTMCore(features, lstm_size) if lstm_size else None
        self.state_size = 2 * lstm_size
        features = lstm_size or features
        self.gamma_embed = nn.Linear(1, gamma_embedding) if gamma_embedding else None
        self.register_buffer("gamma_input", torch.full((num_heads,), 0.99))
        head_in = features + gamma_embedding
        hidden = (head_hidden,) if head_hidden else ()
        self.policy_heads = nn.ModuleList(
            MLP(head_in, hidden, activation="relu", out_dim=dist.param_dim, out_gain=0.01)
            for _ in range(num_heads)
        )
        self.value_heads = nn.ModuleList(
            MLP(head_in, hidden, activation="relu", out_dim=1, out_gain=1.0) for _ in range(num_heads)
        )

    def dist_params_from_head(self, head_out: Tensor) -> Tensor:
        if self.discrete:
            return head_out
        mean_out, std_out = head_out.chunk(2, dim=-1)
        low, high = self.log_std_bounds
        log_std = low + 0.5 * (high - low) * (torch.tanh(std_out) + 1.0)
        return torch.cat([torch.tanh(mean_out), log_std], dim=-1)

    def _head_input(self, features: Tensor, head: int, gamma: Tensor | None) -> Tensor:
        if self.gamma_embed is None:
            return features
        g = (self.gamma_input if gamma is None else gamma)[head].reshape(1, 1).to(features.dtype)
        embedding = self.gamma_embed(g).expand(*features.shape[:-1], -1)
        return torch.cat([features, embedding], dim=-1)

    def _core_unroll(self, features: Tensor, first: Tensor, state: Tensor | None) -> Tensor:
        """features [T1, B, F], first [T1, B] -> core outputs [T1, B, size]."""
        if state is None:
            state = features.new_zeros(features.shape[1], self.state_size)
        outputs = []
        for t in range(features.shape[0]):
            state = state * (1.0 - first[t].to(features.dtype)).unsqueeze(-1)
            state = self.core(features[t], state)
            outputs.append(state[:, : self.core.size])
        return torch.stack(outputs)

    def forward(
        self, obs: Tensor, first: Tensor, core_state: Tensor | None = None, gamma: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Unroll over a batch of trajectories.

        obs [T1, B, *obs_shape]; first [T1, B] (reset the LSTM state there); core_state [B, 2 size] or None;
        gamma [num_heads] for the gamma embedding (default: the ``gamma_input`` buffer).
        Returns dist_params [H, T1, B, P] and values [H, T1, B].
        """
        t1, b = obs.shape[:2]
        features = self.torso(obs.reshape(t1 * b, *obs.shape[2:]))
        if self.core is not None:
            features = self._core_unroll(features.reshape(t1, b, -1), first, core_state).reshape(t1 * b, -1)
        params, values = [], []
        for h in range(self.num_heads):
            x = self._head_input(features, h, gamma)
            params.append(self.dist_params_from_head(self.policy_heads[h](x)).reshape(t1, b, -1))
            values.append(self.value_heads[h](x).reshape(t1, b))
        return torch.stack(params), torch.stack(values)

    def step(self, obs: Tensor, first: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One acting step of head 1: obs [B, ...], first [B] -> (dist_params [B, P], new state or None)."""
        features = self.torso(obs)
        if self.core is not None:
            state = state * (1.0 - first.to(features.dtype)).unsqueeze(-1)
            state = self.core(features, state)
            features = state[:, : self.core.size]
        return self.dist_params_from_head(self.policy_heads[0](self._head_input(features, 0, None))), state


def build_network(params: ImpalaConfig, env_spec) -> ImpalaNet:
    dist = make_distribution(env_spec.action_space, "auto" if env_spec.discrete else "tanh_gaussian")
    return ImpalaNet(
        env_spec.obs_shape,
        dist,
        encoder=params.encoder,
        hidden_sizes=tuple(params.hidden_sizes),
        channels=tuple(params.channels),
        torso_out=params.torso_out,
        lstm_size=params.lstm_size,
        head_hidden=params.head_hidden,
        num_heads=params.num_heads,
        log_std_bounds=(params.log_std_min, params.log_std_max),
        gamma_embedding=getattr(params, "gamma_embedding", 0),
    )


def flat_state(net: nn.Module) -> np.ndarray:
    """Every parameter and buffer of ``net`` as one float32 vector (what actors receive)."""
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in net.state_dict().values()]).numpy()


def load_flat_state(net: nn.Module, flat: np.ndarray) -> None:
    """Inverse of :func:`flat_state`."""
    offset = 0
    with torch.no_grad():
        for tensor in net.state_dict().values():
            n = tensor.numel()
            tensor.copy_(torch.from_numpy(flat[offset : offset + n]).reshape(tensor.shape))
            offset += n
    if offset != flat.size:
        raise ValueError(f"parameter vector has {flat.size} entries, the network {offset}")


def stored_action_log_prob(dist, dist_params: Tensor, stored_actions: Tensor) -> Tensor:
    """log pi of stored actions; squashed Gaussians store the pre-tanh sample ``u`` (exact, no atanh)."""
    if isinstance(dist, TanhGaussian):
        return tanh_normal_log_prob(dist_params, torch.tanh(stored_actions), pre_tanh=stored_actions)
    return dist.log_prob(dist_params, stored_actions)


class ImpalaActingPolicy:
    """Acting with an :class:`ImpalaNet` (head 1): NumPy in/out, samples with a dedicated generator.

    Continuous actions: ``u ~ N(mean, std)``, the env gets ``tanh(u)`` rescaled to the action bounds and
    the learner gets ``u`` (stored actions) and ``log mu(tanh(u))`` with the Jacobian correction.
    """

    def __init__(self, net: ImpalaNet, generator: torch.Generator, action_space: gymnasium.spaces.Space):
        self.net = net
        self.generator = generator
        self.state_size = net.state_size
        self.device = next(net.parameters()).device
        self.discrete = isinstance(action_space, gymnasium.spaces.Discrete)
        if not self.discrete:
            low = np.asarray(action_space.low, dtype=np.float32)
            high = np.asarray(action_space.high, dtype=np.float32)
            finite = np.isfinite(low) & np.isfinite(high)
            self.scale = np.where(finite, (high - low) / 2, 1.0).astype(np.float32)
            self.offset = np.where(finite, (high + low) / 2, 0.0).astype(np.float32)

    def to_env_actions(self, squashed: np.ndarray) -> np.ndarray:
        return squashed * self.scale + self.offset

    @torch.no_grad()
    def act(self, obs: np.ndarray, first: np.ndarray, state: np.ndarray | None):
        obs_t = torch.as_tensor(obs, device=self.device)
        first_t = torch.as_tensor(first, device=self.device)
        state_t = None if state is None else torch.as_tensor(state, device=self.device)
        params, new_state = self.net.step(obs_t, first_t, state_t)
        new_state_np = None if new_state is None else new_state.cpu().numpy()
        if self.discrete:
            actions = categorical_sample(params, self.generator)
            log_probs = categorical_log_prob(params, actions)
            actions_np = actions.cpu().numpy()
            return actions_np, actions_np, log_probs.cpu().numpy(), new_state_np
        pre_tanh = normal_sample(params, self.generator)
        squashed = torch.tanh(pre_tanh)
        log_probs = tanh_normal_log_prob(params, squashed, pre_tanh=pre_tanh)
        return (
            self.to_env_actions(squashed.cpu().numpy()),
            pre_tanh.cpu().numpy(),
            log_probs.cpu().numpy(),
            new_state_np,
        )

    def load_flat_params(self, flat: np.ndarray) -> None:
        load_flat_state(self.net, flat)


def make_acting_policy(config, env_spec, seed: int) -> ImpalaActingPolicy:
    """Factory for remote actors (module-level so that it pickles): a CPU copy of the network."""
    net = build_network(config.params, env_spec)
    net.eval()
    generator = torch.Generator()
    generator.manual_seed(seed)
    return ImpalaActingPolicy(net, generator, env_spec.action_space)


# ----------------------------------------------------------------------------------------------
# RMSProp as a pure function (the inner step of STAC differentiates through it)
# ----------------------------------------------------------------------------------------------
def rmsprop_step(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    lr: float | Tensor,
    decay: float,
    eps: float,
    eps_inside_sqrt: bool = True,
    differentiate_stats: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """One RMSProp step: ``ms' = decay ms + (1 - decay) g^2``, ``theta' = theta - lr g / denom``.

    ``denom = sqrt(ms' + eps)`` (optax ``scale_by_rms`` / TF, ``eps_inside_sqrt=True``) or
    ``sqrt(ms') + eps`` (torch.optim.RMSprop). Written with out-of-place ops so autograd can
    differentiate ``theta'`` with respect to whatever ``grads`` depend on (STAC's metaparameters);
    ``differentiate_stats=False`` treats ``ms'`` as a constant there ("frozen optimiser statistics").
    Returns (new params, new square averages).
    """
    new_params, new_avgs = [], []
    for p, g, s in zip(params, grads, square_avgs):
        g_stats = g if differentiate_stats else g.detach()
        s_new = decay * s + (1.0 - decay) * g_stats * g_stats
        if eps_inside_sqrt:
            denom = torch.sqrt(s_new + eps)
        else:  # sqrt has an infinite derivative at 0: keep the argument positive
            denom = torch.sqrt(s_new.clamp_min(torch.finfo(s_new.dtype).tiny)) + eps
        new_params.append(p - lr * g / denom)
        new_avgs.append(s_new)
    return new_params, new_avgs


def clip_by_global_norm(grads: list[Tensor], max_norm: float | None) -> tuple[list[Tensor], Tensor]:
    """Scale ``grads`` by ``min(1, max_norm / ||g||)`` (differentiable); returns (grads, norm)."""
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    if max_norm is None:
        return grads, norm
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads], norm


# ----------------------------------------------------------------------------------------------
# Batches and the loss (STAC Eq. 1, Algorithm 1)
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A learner batch on the device, time-major. obs [T + 1, B, ...]; actions [T, B(, D)];
    behaviour_log_probs, rewards, not_terminated, weights (1 for valid steps, 0 for dummies) [T, B] float;
    ends [T, B] bool; first [T + 1, B] float; core_state [B, S] or None; versions [T, B] int64."""

    obs: Tensor
    actions: Tensor
    behaviour_log_probs: Tensor
    rewards: Tensor
    not_terminated: Tensor
    ends: Tensor
    weights: Tensor
    first: Tensor
    core_state: Tensor | None
    versions: Tensor

    def to(self, dtype: torch.dtype) -> Batch:
        """Floating-point fields (not obs of uint8 images) in ``dtype`` (e.g. float64 for gradient checks)."""

        def cast(x):
            return x.to(dtype) if x is not None and x.is_floating_point() else x

        return Batch(**{name: cast(getattr(self, name)) for name in self.__dataclass_fields__})


def batch_from_chunk(chunk: Chunk, device: torch.device, reward_clip: float | None = None) -> Batch:
    def tensor(x):
        return torch.as_tensor(x, device=device)

    rewards = tensor(chunk.rewards)
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    valid = tensor(chunk.valid)
    return Batch(
        obs=tensor(chunk.obs),
        actions=tensor(chunk.actions),
        behaviour_log_probs=tensor(chunk.behaviour_log_probs),
        rewards=rewards,
        not_terminated=(~tensor(chunk.terminated)).float(),
        ends=tensor(chunk.ends),
        weights=valid.float(),
        first=tensor(chunk.first).float(),
        core_state=None if chunk.core_state is None else tensor(chunk.core_state),
        versions=tensor(chunk.versions),
    )


@dataclass
class LossWeights:
    """Hyperparameters of one head's loss: floats (IMPALA, STAC's outer loss) or 0-d tensors (STAC inner)."""

    gamma: float | Tensor
    trace_lambda: float | Tensor
    alpha_rho: float | Tensor
    alpha_c: float | Tensor
    g_v: float | Tensor
    g_p: float | Tensor
    g_e: float | Tensor


@dataclass(frozen=True)
class LossSettings:
    """Fixed parts of the loss: truncation levels, policy-gradient target form, reduction, regulariser."""

    rho_bar: float = 1.0
    c_bar: float = 1.0
    rho_bar_pg: float = 1.0
    pg_lambda_mix: bool = False
    reduction: str = "sum"
    regularizer: str = "entropy"  # or "kl_standard_normal"
    log_rho_clip: float | None = None

    @staticmethod
    def from_config(p: ImpalaConfig, discrete: bool) -> LossSettings:
        return LossSettings(
            p.rho_bar,
            p.c_bar,
            p.rho_bar_pg,
            p.pg_lambda_mix,
            p.loss_reduction,
            "entropy" if discrete else p.continuous_regularizer,
            p.log_rho_clip,
        )


def outer_weights(p: ImpalaConfig) -> LossWeights:
    return LossWeights(p.gamma, p.trace_lambda, p.alpha_rho, p.alpha_c, p.vf_coef, p.pg_coef, p.ent_coef)


def kl_to_standard_normal(dist_params: Tensor) -> Tensor:
    """``KL(N(mean, std) || N(0, I))`` [...] of Gaussian params ``cat(mean, log_std)`` (= the squashed KL)."""
    return normal_kl(dist_params, torch.zeros_like(dist_params))


class StopGradientInputs(NamedTuple):
    """What Algorithm 1 wraps in sg(): the values [T + 1, B] and log pi(a_s|x_s) [T, B] of one head."""

    values: Tensor
    log_pi: Tensor


def head_loss(
    dist,
    dist_params: Tensor,
    values: Tensor,
    batch: Batch,
    w: LossWeights,
    settings: LossSettings,
    stop_advantage: bool = True,
    held: StopGradientInputs | None = None,
) -> tuple[Tensor, dict[str, Tensor], StopGradientInputs]:
    """One head's IMPALA loss (STAC Algorithm 1), summed (or averaged) over valid steps.

    dist_params [T + 1, B, P] (row T unused), values [T + 1, B] at the learner's parameters.
    ``L = g_v sum (v_s - V(x_s))^2 - g_p sum log pi(a_s|x_s) A_s + g_e L_reg`` with (leaky) V-trace
    targets ``v_s`` and advantages ``A_s = rho_pg_s (r_s + gamma_s v_s+1 - V(x_s))`` computed from
    sg(V) and sg(pi / mu); ``L_reg = -sum H(pi(.|x_s))`` (the entropy *bonus*; Eq. 1 prints its sign
    the other way) or ``sum KL(pi(.|x_s) || N(0, I))``. gamma, lambda and alpha stay differentiable:
    with ``stop_advantage=False`` (STAC's inner loss, line 20) ``A_s`` keeps its dependence on them; with
    True (line 22, and IMPALA) it is detached.

    ``held`` replaces the stop-gradient inputs (sg(V), sg(log pi)) by given constants: with them held,
    the pseudo-loss is an ordinary function whose derivative is its gradient (for gradient checks).
    Returns (loss, diagnostics without gradient, the stop-gradient inputs used).
    """
    policy_params = dist_params[:-1]
    log_pi = stored_action_log_prob(dist, policy_params, batch.actions)
    if held is None:
        held = StopGradientInputs(values.detach(), log_pi.detach())
    valid = batch.weights > 0
    log_rhos = torch.where(valid, held.log_pi - batch.behaviour_log_probs, torch.zeros_like(log_pi))
    if settings.log_rho_clip is not None:
        log_rhos = log_rhos.clamp(-settings.log_rho_clip, settings.log_rho_clip)
    vt = leaky_vtrace(
        log_rhos,
        batch.rewards,
        held.values,
        w.gamma * batch.not_terminated,
        lambda_=w.trace_lambda,
        alpha_rho=w.alpha_rho,
        alpha_c=w.alpha_c,
        rho_bar=settings.rho_bar,
        c_bar=settings.c_bar,
        rho_bar_pg=settings.rho_bar_pg,
        episode_ends=batch.ends,
        pg_lambda_mix=settings.pg_lambda_mix,
    )
    advantages = vt.pg_advantages.detach() if stop_advantage else vt.pg_advantages
    weights = batch.weights
    value_loss = (weights * (vt.vs - values[:-1]).square()).sum()
    policy_loss = -(weights * log_pi * advantages).sum()
    if settings.regularizer == "entropy":
        regularizer = -(weights * dist.entropy(policy_params)).sum()
    else:
        regularizer = (weights * kl_to_standard_normal(policy_params)).sum()
    loss = w.g_v * value_loss + w.g_p * policy_loss + w.g_e * regularizer
    count = weights.sum().clamp_min(1.0)
    if settings.reduction == "mean":
        loss = loss / count
    with torch.no_grad():
        importance = torch.exp(log_rhos)
        stats = {
            "loss/value": value_loss / count,
            "loss/policy": policy_loss / count,
            "regularizer": regularizer / count,
            "is_ratio_mean": (weights * importance).sum() / count,
            "is_clipped_fraction": (weights * (importance > settings.rho_bar).float()).sum() / count,
            "value_mean": (weights * values[:-1]).sum() / count,
        }
    return loss, stats, held


def multi_head_loss(
    dist,
    dist_params: Tensor,
    values: Tensor,
    batch: Batch,
    weights: list[LossWeights],
    settings: LossSettings,
    stop_advantage: bool = True,
    held: list[StopGradientInputs] | None = None,
) -> tuple[Tensor, dict[str, Tensor], list[StopGradientInputs]]:
    """``1/P sum_p L_p`` over heads (STAC Algorithm 2 line 11); dist_params [P, T + 1, B, ...], values
    [P, T + 1, B]; each head's importance ratios use its own policy against the behaviour (head 1).
    Diagnostics are head 1's; ``held`` / the returned list: per-head stop-gradient inputs."""
    total, stats, used = None, {}, []
    for h in range(dist_params.shape[0]):
        loss, head_stats, head_held = head_loss(
            dist,
            dist_params[h],
            values[h],
            batch,
            weights[h],
            settings,
            stop_advantage,
            None if held is None else held[h],
        )
        total = loss if total is None else total + loss
        used.append(head_held)
        if h == 0:
            stats = head_stats
    num_heads = dist_params.shape[0]
    return (total if num_heads == 1 else total / num_heads), stats, used


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
class Impala:
    """IMPALA learner with synchronous, thread, process or Ray actors (``params.actor_mode``).

    In the asynchronous modes the actors own their envs (built from ``config.env`` with their own seeds,
    see :func:`aclab.data.actors.make_actor_specs`); the ``envs`` given to :meth:`iterate` are then not
    stepped (the training loop still builds them, for the spec and for evaluation). Observation and
    reward normalisation need synchronous mode (each actor would keep its own statistics).
    """

    Config = ImpalaConfig
    DATA_PARALLEL = True  # torchrun: several learner ranks, see aclab.distributed

    def __init__(self, config, env_spec, device: torch.device):
        p: ImpalaConfig = config.params
        self.config = config
        self.params = p
        self.device = device
        self.env_spec = env_spec
        self.net = build_network(p, env_spec).to(device)
        self.dist = self.net.dist
        self.param_list = list(self.net.parameters())
        self.square_avgs = [torch.full_like(q, p.rmsprop_initial_ms) for q in self.param_list]
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.acting = ImpalaActingPolicy(self.net, self.generator, env_spec.action_space)
        self.loss_settings = LossSettings.from_config(p, env_spec.discrete)
        self.batch_size = config.env.num_envs
        self.dp = distributed.current()  # several ranks: each learns from m / world_size trajectories
        self.local_batch_size = self.dp.local_envs(self.batch_size)
        self.steps_per_update = self.batch_size * (p.num_steps - p.overlap)
        self.num_updates = max(math.ceil(config.total_steps / self.steps_per_update), 1)
        self.steps = 0
        self.iteration = 0
        self.last_episode_returns = np.zeros(0)
        self._eval_state: Tensor | None = None
        self._pool = None
        self.dropped_chunks = 0  # chunks older than max_policy_lag (this process)
        action_shape = () if env_spec.discrete else (env_spec.action_dim,)
        action_dtype = np.int64 if env_spec.discrete else np.float32
        if p.actor_mode == "sync":
            self.collector: TrajectoryCollector | None = TrajectoryCollector(
                self.local_batch_size,
                env_spec.obs_shape,
                env_spec.obs_dtype,
                p.num_steps,
                p.overlap,
                action_shape,
                action_dtype,
                self.net.state_size,
            )
        else:
            self.collector = None
            per_actor = p.envs_per_actor or max(self.local_batch_size // p.num_actors, 1)
            if self.local_batch_size % per_actor:
                raise ConfigError(
                    f"invalid value params.envs_per_actor={per_actor}: env.num_envs="
                    f"{self.batch_size} (the batch size m, per rank {self.local_batch_size}) must be a multiple of it"
                )
            if config.env.normalize_obs or config.env.normalize_reward:
                raise ConfigError(
                    f"params.actor_mode={p.actor_mode!r} needs env.normalize_obs=false and "
                    "env.normalize_reward=false (each actor would keep its own statistics)"
                )
            self.envs_per_actor = per_actor

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Evaluation actions from head 1. With an LSTM the state persists across calls (reset when the
        batch size changes); this interface does not see episode boundaries."""
        obs_t = torch.as_tensor(obs, device=self.device)
        state = None
        if self.net.state_size:
            if self._eval_state is None or self._eval_state.shape[0] != obs_t.shape[0]:
                self._eval_state = torch.zeros(obs_t.shape[0], self.net.state_size, device=self.device)
            state = self._eval_state
        first = torch.zeros(obs_t.shape[0], device=self.device)
        params, new_state = self.net.step(obs_t, first, state)
        if new_state is not None:
            self._eval_state = new_state
        if self.env_spec.discrete:
            actions = self.dist.mode(params) if deterministic else self.dist.sample(params, self.generator)
            return actions.cpu().numpy()
        squashed = self.dist.mode(params) if deterministic else self.dist.sample(params, self.generator)
        return self.acting.to_env_actions(squashed.cpu().numpy())

    # ------------------------------------------------------------------ data
    def _ensure_pool(self):
        if self._pool is None:
            p = self.params
            specs = make_actor_specs(
                self.config, make_acting_policy, p.num_actors, self.envs_per_actor, p.num_steps, p.overlap
            )
            flat = flat_state(self.net)
            ray_kwargs = {}
            if p.ray_address is not None:
                ray_kwargs["address"] = p.ray_address
            if p.ray_num_cpus is not None:
                ray_kwargs["num_cpus"] = p.ray_num_cpus
            self._pool = make_actor_pool(
                p.actor_mode,
                specs,
                flat.size,
                max_pending_per_actor=p.max_pending_per_actor,
                ray_init_kwargs=ray_kwargs,
                ray_num_cpus_per_actor=p.ray_cpus_per_actor,
                budget=FailureBudget(p.actor_failure_limit, p.actor_failure_window_s),
            )
            self._finalizer = weakref.finalize(self, self._pool.close)
            if p.wait_for_actors:
                self._pool.wait_ready(p.actor_timeout_s)
            self._pool.publish(flat, self.iteration)
        return self._pool

    def actor_pids(self) -> list[int | None]:
        """Process ids of the actors (process and Ray modes; None for threads); [] before they start."""
        return [] if self._pool is None else self._pool.pids()

    def next_chunk(self, envs) -> Chunk:
        """The next batch of m trajectories (collected here in sync mode, else from the actors).

        From actors, a chunk collected with parameters more than ``max_policy_lag`` updates old is
        dropped (counted in ``actors/dropped_chunks``): the learner never trains on staler data than that.
        """
        if self.collector is not None:
            self.net.eval()
            return self.collector.collect(envs, self.acting, self.iteration)
        pool = self._ensure_pool()
        max_lag = self.params.max_policy_lag
        chunks, count = [], 0
        while count < self.local_batch_size:
            chunk = pool.get(timeout=self.params.actor_timeout_s)
            if max_lag is not None and self.iteration - chunk.version > max_lag:
                self.dropped_chunks += 1
                continue
            chunks.append(chunk)
            count += chunk.num_envs
        return concat_chunks(chunks)

    # ------------------------------------------------------------------ one iteration
    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        chunk = self.next_chunk(envs)
        batch = batch_from_chunk(chunk, self.device, p.reward_clip)
        lr = linear_schedule(p.lr, p.lr_end, self.iteration / self.num_updates)
        self.net.train()
        metrics = self.learner_step(batch, lr)
        lag = self.iteration - chunk.versions
        valid = chunk.valid
        metrics["policy_lag_mean"] = float(lag[valid].mean()) if valid.any() else 0.0
        metrics["policy_lag_max"] = float(lag.max())
        metrics["lr"] = lr
        if self._pool is not None:
            metrics.update(self._pool.stats())
            metrics["actors/dropped_chunks"] = float(self.dropped_chunks)
        self.iteration += 1
        if self._pool is not None:
            self._pool.publish(flat_state(self.net), self.iteration)
        self.steps += self.dp.sum_int(chunk.env_steps)
        self.last_episode_returns = chunk.episode_returns
        self.last_episode_lengths = chunk.episode_lengths
        if chunk.episode_returns.size:
            metrics["episode_return"] = float(chunk.episode_returns.mean())
            metrics["episode_length"] = float(chunk.episode_lengths.mean())
            metrics["episodes"] = float(chunk.episode_returns.size)
        return metrics

    def gradient_share(self, batch: Batch) -> float:
        """This rank's weight when the ranks' gradients are summed: 1 for the summed loss of Eq. (1) (the
        batch's loss is the sum of the ranks'), its share of the valid steps for ``loss_reduction="mean"``."""
        return 1.0 if self.loss_settings.reduction == "sum" else self.dp.share(batch.weights.sum())

    def head_weights(self) -> list[LossWeights]:
        return [outer_weights(self.params)] * self.params.num_heads

    def learner_step(self, batch: Batch, lr: float) -> dict[str, float]:
        """One IMPALA update on ``batch`` (RMSProp via :func:`rmsprop_step`, the same function STAC uses)."""
        p = self.params
        dist_params, values = self.net(batch.obs, batch.first, batch.core_state)
        loss, stats, _ = multi_head_loss(
            self.dist, dist_params, values, batch, self.head_weights(), self.loss_settings
        )
        grads = torch.autograd.grad(loss, self.param_list)
        grads = self.dp.reduce_gradients(list(grads), self.param_list, self.gradient_share(batch))
        grads, grad_norm = clip_by_global_norm(list(grads), p.max_grad_norm)
        with torch.no_grad():
            new_params, self.square_avgs = rmsprop_step(
                self.param_list,
                grads,
                self.square_avgs,
                lr,
                p.rmsprop_decay,
                p.rmsprop_eps,
                p.rmsprop_eps_placement == "inside",
            )
            for param, new in zip(self.param_list, new_params):
                param.copy_(new)
        stats = {"loss/total": loss.detach(), **stats, "grad_norm": grad_norm.detach()}
        check_finite(stats, f"IMPALA update {self.iteration}")
        return dict(zip(stats, torch.stack(list(stats.values())).tolist()))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the actors (also done automatically when the object is collected or at exit)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "square_avgs": [s.clone() for s in self.square_avgs],
            "generator": self.generator.get_state(),
            "collector": None if self.collector is None else self.collector.state_dict(),
            "steps": self.steps,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.square_avgs = [s.to(self.device).clone() for s in state["square_avgs"]]
        self.generator.set_state(state["generator"])
        if self.collector is not None and state.get("collector") is not None:
            self.collector.load_state_dict(state["collector"])
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        if self._pool is not None:
            self._pool.publish(flat_state(self.net), self.iteration)


ALGORITHMS = {
    "impala": Entry(
        Impala, "IMPALA: V-trace actor-critic with decoupled (sync / thread / process / Ray) actors"
    ),
    "impala_aux": Entry(
        Impala,
        "IMPALA with 3 auxiliary policy/value heads on a shared torso (STAC Table 4)",
        defaults={"num_heads": 3},
        preset_prefix="impala",
    ),
}
