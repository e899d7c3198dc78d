"""Pieces shared by the phasic family (PPG, DCPG and their variants; DCPG paper, Algorithms 1 and 2).

Every algorithm of the family alternates two phases:

* policy phase, each iteration: collect a rollout, compute ``R_hat`` once, optimise the policy (and
  whatever the algorithm trains there) for a few epochs, and add the rollout to the buffer ``B``;
* auxiliary phase, every ``N_pi`` iterations: ``E_aux`` epochs over ``B`` in minibatches of whole env
  trajectories, with behaviour cloning to ``pi_old`` = the policy at the end of the policy phases
  (``beta_pi * KL(pi_old || pi_theta)``), then ``B`` is emptied.

This module holds the phase-independent parts: the configuration fields every member shares
(:class:`PhasicConfig`), the auxiliary buffer (:class:`AuxBuffer`, uint8 frames stay uint8), the
dynamics discriminator of DDCPG and its ablations (:class:`DynamicsModel`, DCPG paper, F.2), the OOD-action
count (DCPG paper, Table 8), masked means, and the value-function analyses logged during training
(:class:`TrainingAnalyses`: value bias at episode starts, stiffness). The phases themselves are written
out in :mod:`aclab.algos.ppg` and :mod:`aclab.algos.dcpg`.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aclab.algos.common import linear_schedule
from aclab.analysis.stiffness import value_stiffness
from aclab.analysis.value_bias import EpisodeStartTracker, value_bias_from_starts
from aclab.config import require
from aclab.core.distributions import make_distribution
from aclab.nets.agents import ActorCritic, FusedMLPActorCritic, build_encoder, make_actor_critic
from aclab.nets.encoders import MLP, init_linear
from aclab.runs import check_stop

DYNAMICS_MODES = ("off", "joint", "forward", "inverse", "two")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class PhasicConfig:
    """Hyperparameters shared by PPG and DCPG. Defaults: DCPG paper, Tables 2 and 3 (Procgen).

    Policy phase: ``policy_epochs`` (E_pi) epochs of the policy loss and ``value_epochs`` (E_V) of the value
    loss over the rollout, on the same ``num_minibatches`` shuffled minibatches (the longer of the two
    sets the epoch count). ``vf_coef`` weighs ``J_V = 0.5 (V - R_hat)^2`` of a separate value network in
    that phase (PPG's V_phi, Separate DCPG's V_phi; the authors' code uses 1.0).

    Auxiliary phase: every ``num_policy_iterations`` (N_pi) rollouts, ``aux_epochs`` (E_aux, 0 disables the
    phase) epochs over the buffer; each epoch shuffles the ``N_pi * num_envs`` env trajectories and splits
    them into minibatches of ``num_envs // aux_num_minibatches`` trajectories (Table 3: 16 minibatches per
    rollout, i.e. 4 trajectories of 256 steps). ``clone_coef`` is beta_pi. ``aux_lr`` defaults to ``lr``.
    ``aux_buffer_device``: ``"learner"`` keeps the buffer where the networks are, ``"host"`` in (pinned)
    host memory with one transfer per minibatch.

    Networks: ``encoder`` and ``encoder_init`` (image torsos: ``"orthogonal"``, ``"xavier"`` = the DCPG
    authors' IMPALA torso, the Procgen presets' choice, or ``"default"``; see
    :func:`aclab.nets.encoders.init_torso`).

    Dynamics learning (DCPG paper, F.2), trained in the auxiliary phase with weight ``dynamics_coef`` (beta_f) on
    the policy torso's features: ``"joint"`` (DDCPG: one discriminator, wrong-action negatives weighted by
    ``dynamics_eta``), ``"forward"`` (DCPG+F), ``"inverse"`` (DCPG+I), ``"two"`` (DCPG+FI: a forward and an
    inverse discriminator, the inverse one weighted by ``dynamics_eta``). ``dynamics_resets``: what happens at
    an episode reset (:func:`transition_pairs`): ``"mask"`` (default) keeps only true transitions (an
    episode's last step goes to its true final observation; nothing crosses the reset); ``"authors"`` pairs
    the last observation and action with the next episode's first observation, as the DCPG authors'
    same-step autoreset does (their envs never show the final observation); ``"dummy"`` also keeps the
    autoreset dummy step (final observation, an ignored action, first observation).
    ``dynamics_negatives``: ``"raw"`` draws the wrong action among the 15 raw actions; ``"canonical"``
    (Procgen) among the other action-equivalence classes, as each class's canonical action, so an alias of
    the true action (BigFish's keys 9-14 = no-op) is never labelled wrong
    (:mod:`aclab.analysis.action_classes`).

    Analyses during training: ``log_value_bias`` logs ``value_bias/*`` (``V(s_0)`` against the discounted
    return; DCPG paper, Appendix C) from ``value_bias_source``: ``"rollouts"`` = the last ``value_bias_episodes``
    finished training episodes with their rollout-time values, ``"eval"`` = the episodes of every evaluation
    on the training levels with the current critic (the DCPG authors' logging: 100 fresh training-level
    episodes at every log point; needs ``eval.split`` = train or both). Truncated episodes count per
    ``value_bias_truncation`` (``"bootstrap"``: with ``gamma^L V(s_L)`` at the cut; ``"partial"``: the
    partial return, as the authors' code; ``"exclude"``);
    ``stiffness_every`` > 0 logs the value network's stiffness every that many iterations on
    ``stiffness_states`` states of the rollout (DCPG paper, Appendix A), sign stiffness per ``stiffness_sign``:
    ``stiffness/cosine`` and ``stiffness/sign`` of the value-loss gradients (the paper's quantity) and
    ``stiffness/cosine_grad_v``, ``stiffness/sign_grad_v`` of ``grad V`` (sign-free: without the residuals'
    signs, see :mod:`aclab.analysis.stiffness`).
    """

    num_steps: int = 256
    gamma: float = 0.999
    gae_lambda: float = 0.95
    norm_adv: Literal["batch", "minibatch", "off"] = "batch"
    policy_epochs: int = 1
    value_epochs: int = 1
    num_minibatches: int = 8
    lr: float = 5e-4
    anneal_lr: bool = False
    adam_eps: float = 1e-5
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 1.0
    max_grad_norm: float = 0.5
    num_policy_iterations: int = 32
    aux_epochs: int = 6
    aux_num_minibatches: int = 16
    clone_coef: float = 1.0
    aux_lr: float | None = None
    aux_buffer_device: Literal["learner", "host"] = "learner"
    dynamics: Literal["off", "joint", "forward", "inverse", "two"] = "off"
    dynamics_coef: float = 1.0
    dynamics_eta: float = 0.5
    dynamics_hidden_sizes: tuple[int, ...] = (256, 256)
    dynamics_resets: Literal["mask", "authors", "dummy"] = "mask"
    dynamics_negatives: Literal["raw", "canonical"] = "raw"
    encoder: Literal["auto", "mlp", "nature_cnn", "impala"] = "auto"
    encoder_init: Literal["orthogonal", "xavier", "default"] = "orthogonal"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    action_dist: Literal["auto", "gaussian", "tanh_gaussian"] = "auto"
    log_std_init: float = 0.0
    acting: Literal["auto", "torch", "numpy"] = "auto"
    log_value_bias: bool = False
    value_bias_episodes: int = 100
    value_bias_source: Literal["rollouts", "eval"] = "rollouts"
    value_bias_truncation: Literal["bootstrap", "partial", "exclude"] = "bootstrap"
    stiffness_every: int = 0
    stiffness_states: int = 512
    stiffness_sign: Literal["exact", "subset", "off"] = "subset"
    stiffness_sign_subset: int = 256

    def validate(self) -> None:
        positive_ints = ("num_steps", "num_minibatches", "num_policy_iterations", "aux_num_minibatches",
                         "value_bias_episodes", "stiffness_states", "stiffness_sign_subset")
        for name in positive_ints:
            require(getattr(self, name) >= 1, f"params.{name}", getattr(self, name), "an integer >= 1")
        for name in ("policy_epochs", "value_epochs", "aux_epochs", "stiffness_every"):
            require(getattr(self, name) >= 0, f"params.{name}", getattr(self, name), "an integer >= 0")
        require(self.policy_epochs + self.value_epochs >= 1, "params.policy_epochs", self.policy_epochs,
                "policy_epochs + value_epochs >= 1")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 <= self.gae_lambda <= 1.0, "params.gae_lambda", self.gae_lambda, "a number in [0, 1]")
        for name in ("lr", "clip_coef", "max_grad_norm"):
            require(getattr(self, name) > 0, f"params.{name}", getattr(self, name), "a number > 0")
        for name in ("ent_coef", "vf_coef", "clone_coef", "dynamics_coef", "dynamics_eta"):
            require(getattr(self, name) >= 0, f"params.{name}", getattr(self, name), "a number >= 0")
        require(self.aux_lr is None or self.aux_lr > 0, "params.aux_lr", self.aux_lr, "a number > 0 or None")
        for name in ("hidden_sizes", "dynamics_hidden_sizes"):
            sizes = getattr(self, name)
            require(len(sizes) >= 1 and all(h >= 1 for h in sizes), f"params.{name}", sizes,
                    "a non-empty list of positive integers")

    def validate_with(self, config) -> None:
        """Checks that need the rest of the run's config (called by :meth:`aclab.config.Config.validate`)."""
        if self.dynamics != "off" and self.dynamics_negatives == "canonical":
            require(config.env.id.startswith("procgen:"), "params.dynamics_negatives", self.dynamics_negatives,
                    "'raw' on non-Procgen envs (action-equivalence classes are built for Procgen games)")
        if self.log_value_bias and self.value_bias_source == "eval":
            require(config.eval.split in ("train", "both"), "eval.split", config.eval.split,
                    "'train' or 'both' with params.value_bias_source = 'eval' (the bias is measured on the "
                    "training-level evaluation episodes)")


def anneal_learning_rates(optimizers: list[torch.optim.Optimizer], base_lrs: list[float], iteration: int,
                          num_iterations: int) -> None:
    """PPO's linear annealing to 0 over the run (same arithmetic, so PPG can equal PPO bit for bit)."""
    for optimizer, base in zip(optimizers, base_lrs):
        lr = linear_schedule(base, 0.0, iteration / num_iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def build_actor_critic(params: PhasicConfig, env_spec, shared: bool) -> nn.Module:
    """The policy/value assembly PPO builds (same initialisation, same RNG draws): shared torso for DCPG,
    separate policy and value networks for PPG (the fused MLP for vector observations)."""
    kind = "auto" if params.action_dist == "gaussian" else params.action_dist
    dist = make_distribution(env_spec.action_space, kind)
    return make_actor_critic(env_spec.obs_shape, dist, encoder=params.encoder, hidden_sizes=params.hidden_sizes,
                             activation=params.activation, shared=shared, log_std_init=params.log_std_init,
                             encoder_init=params.encoder_init)


def policy_feature_dim(net: nn.Module) -> int:
    """Width of the features ``net.forward_with_features`` returns."""
    if isinstance(net, FusedMLPActorCritic):
        return int(net.head_weight.shape[1])
    if isinstance(net, ActorCritic):
        return int(net.policy_encoder.out_dim)
    raise TypeError(f"unsupported actor-critic {type(net).__name__}")


class ValueNetwork(nn.Module):
    """A value network with its own encoder: obs [N, ...] -> V [N] (Separate DCPG's V_phi)."""

    def __init__(self, obs_shape, encoder: str, hidden_sizes, activation: str, encoder_init: str = "orthogonal"):
        super().__init__()
        self.encoder = build_encoder(obs_shape, encoder, hidden_sizes, activation, encoder_init)
        self.head = init_linear(nn.Linear(self.encoder.out_dim, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs)).squeeze(-1)


class ValueFunction(nn.Module):
    """``obs [N, ...] -> net.value(obs) [N]`` as a module, for :func:`aclab.analysis.value_stiffness`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net.value(obs) if hasattr(self.net, "value") else self.net(obs)


def value_parameter_names(module: nn.Module) -> list[str]:
    """Names (in ``module.named_parameters()``) of the parameters on the value path of a
    :class:`ValueFunction`: the value encoder and head of an :class:`ActorCritic` (the shared encoder
    when shared), every MLP weight of a fused network (its policy slices get exact zero gradients, which
    leave norms and dot products unchanged), everything of any other module."""
    names = [name for name, _ in module.named_parameters()]
    net = getattr(module, "net", None)
    if isinstance(net, ActorCritic):
        encoder = "net.policy_encoder." if net.shared else "net.value_encoder."
        return [n for n in names if n.startswith((encoder, "net.value_head."))]
    if isinstance(net, FusedMLPActorCritic):
        return [n for n in names if n != "net.log_std"]
    return names


# ----------------------------------------------------------------------------------------------
# Small pure functions
# ----------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(x * mask) / max(sum(mask), 1)`` over all elements (mask float or bool, same shape as x)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def half_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise ``0.5 (prediction - target)^2`` (the value losses J_V, J_aux and C_V before averaging)."""
    return 0.5 * (prediction - target).square()


def state_rows(x: torch.Tensor, num_trajectories: int, num_steps: int) -> torch.Tensor:
    """Flat per-frame outputs ``[n * R, ...]`` of ``n`` trajectories of ``R`` frames (``R = T`` or ``T + 1``
    with the next observation) -> the ``T`` states' rows ``[n * T, ...]`` (the extra row dropped)."""
    rows = x.shape[0] // num_trajectories
    if rows == num_steps:
        return x
    return x.view(num_trajectories, rows, *x.shape[1:])[:, :num_steps].reshape(-1, *x.shape[1:])


# ----------------------------------------------------------------------------------------------
# Auxiliary buffer
# ----------------------------------------------------------------------------------------------
class AuxBuffer:
    """The rollouts of one policy phase, kept for the auxiliary phase.

    Storage (``K = capacity`` rollout slots, ``T`` steps, ``B`` envs): ``obs [K, T + 1, B, *obs_shape]`` in
    the env's dtype (uint8 frames stay uint8: 32 x 257 x 64 Procgen frames take 6.5 GB, float32 would take
    26 GB); row ``T`` is the observation after the rollout, so ``obs[k, t + 1]`` is the next state of step
    ``t`` (the true final observation when an episode ended at ``t``, see :mod:`aclab.data.rollout`).
    ``valid [K, T, B]`` masks next-step-autoreset dummies. Float fields ``[K, T, B, ...]`` (``R_hat``,
    computed once at rollout time) and optional fields (actions for the discriminator, ``pi_old``'s
    distribution parameters) are declared at construction.
    """

    def __init__(self, capacity: int, num_steps: int, num_envs: int, obs_shape: tuple[int, ...],
                 obs_dtype: torch.dtype, fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, pin: bool = False):
        self.capacity, self.num_steps, self.num_envs = capacity, num_steps, num_envs
        self.device = device
        K, T, B = capacity, num_steps, num_envs

        def empty(shape, dtype):  # uninitialised: only the filled slots [:size] are ever read
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)

        self.obs = empty((K, T + 1, B, *obs_shape), obs_dtype)
        self.valid = empty((K, T, B), torch.bool)
        self.fields = {name: empty((K, T, B, *shape), dtype) for name, (shape, dtype) in fields.items()}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def add(self, obs: torch.Tensor, next_obs: torch.Tensor, valid: torch.Tensor, **fields: torch.Tensor) -> None:
        """Copy one rollout in: obs [T, B, ...], next_obs [B, ...] (the observation after it), valid [T, B],
        and declared fields [T, B, ...] (a field not given, such as pi_old's parameters, is filled later)."""
        if self.full:
            raise RuntimeError("auxiliary buffer is full: run the auxiliary phase and clear it first")
        k = self.size
        self.obs[k, :-1].copy_(obs)
        self.obs[k, -1].copy_(next_obs)
        self.valid[k].copy_(valid)
        for name, value in fields.items():
            self.fields[name][k].copy_(value)
        self.size += 1

    def clear(self) -> None:
        self.size = 0

    def trajectory_minibatches(self, per_minibatch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch: the ``size * B`` env trajectories shuffled, in groups of ``per_minibatch`` (the last
        incomplete group is dropped, as the authors' sampler). Yields flat ids ``k * B + b`` (int64 [n])."""
        total = self.size * self.num_envs
        perm = torch.randperm(total, generator=generator, device=generator.device)
        per_minibatch = max(min(per_minibatch, total), 1)
        for start in range(0, total - per_minibatch + 1, per_minibatch):
            check_stop()
            yield perm[start:start + per_minibatch]

    def gather(self, ids: torch.Tensor, names: tuple[str, ...], device: torch.device,
               with_next_obs: bool = False) -> dict[str, torch.Tensor]:
        """Trajectories ``ids`` as batch-major tensors on ``device``: ``obs [n, T (+ 1), ...]``, ``valid
        [n, T]`` and the named fields ``[n, T, ...]``."""
        ids = ids.to(self.device)
        k, b = ids // self.num_envs, ids % self.num_envs
        obs = self.obs[k, :, b] if with_next_obs else self.obs[k, :-1, b]
        out = {"obs": obs, "valid": self.valid[k, :, b]}
        for name in names:
            out[name] = self.fields[name][k, :, b]
        return {name: value.to(device, non_blocking=True) for name, value in out.items()}

    def state_dict(self) -> dict:
        """The filled slots only (a checkpoint at a phase boundary holds an empty buffer)."""
        n = self.size
        return {"size": n, "obs": self.obs[:n].cpu().clone(), "valid": self.valid[:n].cpu().clone(),
                "fields": {name: value[:n].cpu().clone() for name, value in self.fields.items()}}

    def load_state_dict(self, state: dict) -> None:
        n = int(state["size"])
        self.size = n
        self.obs[:n].copy_(state["obs"])
        self.valid[:n].copy_(state["valid"])
        for name, value in state["fields"].items():
            self.fields[name][:n].copy_(value)


def make_aux_buffer(params: PhasicConfig, env_spec, num_envs: int, device: torch.device,
                    fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> AuxBuffer:
    obs_dtype = torch.from_numpy(np.zeros(0, dtype=env_spec.obs_dtype)).dtype
    host = params.aux_buffer_device == "host"
    storage = torch.device("cpu") if host else device
    return AuxBuffer(params.num_policy_iterations, params.num_steps, num_envs, tuple(env_spec.obs_shape),
                     obs_dtype, fields, storage, pin=host and device.type == "cuda")


@torch.no_grad()
def dist_params_over_buffer(policy_fn, buffer: AuxBuffer, out_name: str, chunk_size: int,
                            device: torch.device) -> None:
    """Fill ``buffer.fields[out_name] [K, T, B, P]`` with ``policy_fn(obs)`` over every stored state,
    ``chunk_size`` states per call on ``device``. Before an auxiliary phase this records ``pi_old``, the
    policy at the end of the policy phases (not the behaviour policies of the older rollouts)."""
    out = buffer.fields[out_name]
    for k in range(buffer.size):
        frames = buffer.obs[k, :-1].reshape(-1, *buffer.obs.shape[3:])
        target = out[k].view(-1, out.shape[-1])
        for start in range(0, frames.shape[0], chunk_size):
            stop = min(start + chunk_size, frames.shape[0])
            target[start:stop].copy_(policy_fn(frames[start:stop].to(device, non_blocking=True)))


@torch.no_grad()
def mean_kl_over_buffer(policy_fn, dist, buffer: AuxBuffer, old_name: str, chunk_size: int,
                        device: torch.device) -> float:
    """Mean ``KL(pi_old || pi)`` over the buffer's valid states, ``pi_old`` from ``buffer.fields[old_name]``
    and ``pi`` = ``policy_fn`` now (after an auxiliary phase: how far behaviour cloning let the policy move)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    old = buffer.fields[old_name]
    for k in range(buffer.size):
        frames = buffer.obs[k, :-1].reshape(-1, *buffer.obs.shape[3:])
        old_params = old[k].reshape(-1, old.shape[-1])
        valid = buffer.valid[k].reshape(-1)
        for start in range(0, frames.shape[0], chunk_size):
            part = slice(start, min(start + chunk_size, frames.shape[0]))
            kl = dist.kl(old_params[part].to(device), policy_fn(frames[part].to(device)))
            mask = valid[part].to(device)
            total += (kl * mask).sum(dtype=torch.float64)
            count += mask.sum(dtype=torch.float64)
    return float(total / count.clamp_min(1.0))


# ----------------------------------------------------------------------------------------------
# Dynamics discriminator (DDCPG, DCPG paper, F.2)
# ----------------------------------------------------------------------------------------------
class DynamicsDiscriminator(nn.Module):
    """``f(s, a, s')``: an MLP (ReLU, hidden ``[256, 256]``, orthogonal init) over
    ``[phi(s), onehot(a), phi(s')]`` giving one logit per transition: ``[N, F], [N], [N, F] -> [N]``."""

    def __init__(self, feature_dim: int, num_actions: int, hidden_sizes=(256, 256)):
        super().__init__()
        self.num_actions = num_actions
        self.mlp = MLP(2 * feature_dim + num_actions, hidden_sizes, activation="relu", out_dim=1, out_gain=1.0)

    def forward(self, features: torch.Tensor, actions: torch.Tensor, next_features: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(actions.long(), self.num_actions).to(features.dtype)
        return self.mlp(torch.cat([features, onehot, next_features], dim=-1)).squeeze(-1)


def sample_wrong_actions(actions: torch.Tensor, num_actions: int, generator: torch.Generator,
                         canonical: torch.Tensor | None = None) -> torch.Tensor:
    """One negative action per transition: drawn from the minibatch's action histogram with the
    transition's own action removed; uniform over the other actions when no other action occurs.
    actions int64 [N] -> int64 [N], never equal to ``actions`` (``num_actions >= 2``).

    ``canonical [num_actions]`` (each action's class representative; :func:`canonical_action_map`): the
    histogram is over classes, the transition's whole class is removed and the draw is a class's
    canonical action, so no alias of the true action is ever a negative.
    """
    if canonical is not None:
        return _sample_other_classes(canonical[actions], canonical, generator)
    onehot = F.one_hot(actions, num_actions).to(torch.float32)
    counts = torch.bincount(actions, minlength=num_actions).to(torch.float32)
    weights = counts.unsqueeze(0) * (1.0 - onehot)
    none_left = weights.sum(dim=1, keepdim=True) == 0
    weights = torch.where(none_left, 1.0 - onehot, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _sample_other_classes(classes: torch.Tensor, canonical: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``classes [N]`` (canonical actions) -> a canonical action of another class per transition, from the
    minibatch's class histogram (uniform over the other classes when none occurs)."""
    num_actions = canonical.numel()
    is_rep = (canonical == torch.arange(num_actions, device=canonical.device)).to(torch.float32)  # [A]
    onehot = F.one_hot(classes, num_actions).to(torch.float32)
    counts = torch.bincount(classes, minlength=num_actions).to(torch.float32)
    weights = counts.unsqueeze(0) * (1.0 - onehot)
    none_left = weights.sum(dim=1, keepdim=True) == 0
    weights = torch.where(none_left, is_rep.unsqueeze(0) * (1.0 - onehot), weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def canonical_action_map(env_id: str, options: dict, num_actions: int) -> torch.Tensor:
    """``[num_actions]`` int64: each action's class representative in a Procgen game (found by replay,
    :func:`aclab.analysis.action_classes.procgen_action_classes`); identity for other envs."""
    from aclab.analysis.action_classes import canonical_actions, procgen_action_classes

    if not env_id.startswith("procgen:"):
        return torch.arange(num_actions)
    classes = procgen_action_classes(env_id.split(":", 1)[1], options.get("distribution_mode", "easy"))
    return torch.as_tensor(canonical_actions(classes, num_actions))


def sample_other_indices(n: int, generator: torch.Generator) -> torch.Tensor:
    """For each ``i < n`` a uniformly random ``j != i`` (int64 [n]); ``[0]`` when ``n == 1``."""
    if n < 2:
        return torch.zeros(n, dtype=torch.int64, device=generator.device)
    offsets = torch.randint(1, n, (n,), generator=generator, device=generator.device)
    return (torch.arange(n, device=generator.device) + offsets) % n


def bce_with_logits(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Mean binary cross entropy of ``sigmoid(logits)`` against a constant label."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def dynamics_objective(mode: str, eta: float, positive: torch.Tensor, wrong_action: torch.Tensor | None,
                       wrong_next: torch.Tensor | None, inverse_positive: torch.Tensor | None = None,
                       inverse_wrong_action: torch.Tensor | None = None) -> torch.Tensor:
    """The dynamics loss ``L_f`` (negative of DCPG paper, F.2's ``J_f``) from discriminator logits [N].

    joint (DDCPG):   ``BCE(f(s,a,s'),1) + eta BCE(f(s,a_hat,s'),0) + BCE(f(s,a,s_hat'),0)``;
    forward (+F):    ``BCE(f(s,a,s'),1) + BCE(f(s,a,s_hat'),0)``;
    inverse (+I):    ``BCE(f(s,a,s'),1) + BCE(f(s,a_hat,s'),0)``;
    two (+FI):       forward with ``f`` plus ``eta [BCE(f~(s,a,s'),1) + BCE(f~(s,a_hat,s'),0)]``.
    """
    if mode == "joint":
        return bce_with_logits(positive, 1.0) + eta * bce_with_logits(wrong_action, 0.0) + bce_with_logits(
            wrong_next, 0.0)
    if mode == "forward":
        return bce_with_logits(positive, 1.0) + bce_with_logits(wrong_next, 0.0)
    if mode == "inverse":
        return bce_with_logits(positive, 1.0) + bce_with_logits(wrong_action, 0.0)
    if mode == "two":
        inverse = bce_with_logits(inverse_positive, 1.0) + bce_with_logits(inverse_wrong_action, 0.0)
        return bce_with_logits(positive, 1.0) + bce_with_logits(wrong_next, 0.0) + eta * inverse
    raise ValueError(f"unknown dynamics mode {mode!r}; expected one of {DYNAMICS_MODES[1:]}")


class DynamicsModel(nn.Module):
    """The discriminator(s) of one dynamics mode and their loss on a batch of transitions.

    ``discriminator`` is ``f`` (the forward discriminator in mode ``two``); ``inverse_discriminator`` is
    ``f~`` (mode ``two`` only). Gradients reach the encoder through the features passed in.
    """

    def __init__(self, mode: str, feature_dim: int, num_actions: int, hidden_sizes, eta: float,
                 canonical: torch.Tensor | None = None):
        super().__init__()
        if mode not in DYNAMICS_MODES[1:]:
            raise ValueError(f"unknown dynamics mode {mode!r}; expected one of {DYNAMICS_MODES[1:]}")
        self.mode, self.eta, self.num_actions = mode, eta, num_actions
        self.canonical = canonical  # wrong actions among the other action classes (dynamics_negatives)
        self.discriminator = DynamicsDiscriminator(feature_dim, num_actions, hidden_sizes)
        self.inverse_discriminator = (DynamicsDiscriminator(feature_dim, num_actions, hidden_sizes)
                                      if mode == "two" else None)

    def loss(self, features: torch.Tensor, actions: torch.Tensor, next_features: torch.Tensor,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_f, accuracy of ``f`` on its positives and negatives) over transitions ``[N]``.

        Negatives are drawn inside the batch (:func:`sample_wrong_actions`, :func:`sample_other_indices`);
        all of ``f``'s inputs go through it in one call.
        """
        n = actions.shape[0]
        f_wrong_action = self.mode in ("joint", "inverse")
        f_wrong_next = self.mode in ("joint", "forward", "two")
        canonical = None if self.canonical is None else self.canonical.to(actions.device)
        wrong_actions = (sample_wrong_actions(actions, self.num_actions, generator, canonical)
                         if self.mode in ("joint", "inverse", "two") else None)
        wrong_next = next_features[sample_other_indices(n, generator)] if f_wrong_next else None
        rows = [(actions, next_features)]
        if f_wrong_action:
            rows.append((wrong_actions, next_features))
        if f_wrong_next:
            rows.append((actions, wrong_next))
        logits = self.discriminator(features.repeat(len(rows), 1), torch.cat([a for a, _ in rows]),
                                    torch.cat([s for _, s in rows])).split(n)
        positive = logits[0]
        wrong_action_logits = logits[1] if f_wrong_action else None
        wrong_next_logits = logits[-1] if f_wrong_next else None
        inverse_positive = inverse_wrong = None
        if self.inverse_discriminator is not None:
            inverse_positive, inverse_wrong = self.inverse_discriminator(
                features.repeat(2, 1), torch.cat([actions, wrong_actions]), next_features.repeat(2, 1)).split(n)
        loss = dynamics_objective(self.mode, self.eta, positive, wrong_action_logits, wrong_next_logits,
                                  inverse_positive, inverse_wrong)
        with torch.no_grad():
            correct = [positive > 0] + [x < 0 for x in (wrong_action_logits, wrong_next_logits) if x is not None]
            accuracy = torch.cat(correct).float().mean()
        return loss, accuracy


@torch.no_grad()
def ood_action_counts(discriminator: DynamicsDiscriminator, features: torch.Tensor, actions: torch.Tensor,
                      next_features: torch.Tensor, canonical: torch.Tensor | None = None) -> torch.Tensor:
    """DCPG paper, Table 8: per transition, ``sum_{a_hat != a} 1[f(s, a_hat, s') > 0.5]`` (int64 [N]).

    ``f > 0.5`` is ``logit > 0``. Evaluates all ``N * A`` (transition, action) pairs in one call. Over the
    raw actions by default; with ``canonical [A]`` (each action's class representative) over the distinct
    actions: one canonical action per class, the true action's whole class left out (the paper counts over
    BigFish's 9 distinct actions, where the raw count charges the no-op's 6 aliases).
    """
    n, num_actions = actions.shape[0], discriminator.num_actions
    all_actions = torch.arange(num_actions, device=actions.device).repeat(n)
    logits = discriminator(features.repeat_interleave(num_actions, 0), all_actions,
                           next_features.repeat_interleave(num_actions, 0)).view(n, num_actions)
    accepted = logits > 0
    if canonical is None:
        accepted[torch.arange(n, device=actions.device), actions.long()] = False
        return accepted.sum(dim=1)
    canonical = canonical.to(actions.device)
    representatives = canonical == torch.arange(num_actions, device=actions.device)  # [A]
    other_class = canonical.unsqueeze(0) != canonical[actions.long()].unsqueeze(1)  # [N, A]
    return (accepted & representatives.unsqueeze(0) & other_class).sum(dim=1)


RESET_PAIRINGS = ("mask", "authors", "dummy")


def transition_pairs(valid: torch.Tensor, ends: torch.Tensor | None, resets: str):
    """The transitions ``(s, a, s')`` of batch-major trajectories ``valid [n, T]``, as flat indices:
    ``(state rows, next rows)`` into the ``n * (T + 1)`` observation rows (row ``t + 1`` of a trajectory
    follows step ``t``) and ``action rows`` into the ``n * T`` steps.

    With next-step autoreset a valid step's next row is its true successor (an episode's final
    observation when it ended there) and the step after an episode end is a dummy (``valid = False``:
    final observation, ignored action, next episode's first observation).

    * ``"mask"``: the valid steps, each to its next row (nothing crosses a reset);
    * ``"authors"``: the DCPG authors' pairs (same-step autoreset, no final observation): a valid step that
      ends an episode (``ends [n, T]``) goes to the next episode's first observation, row ``t + 2``; the
      dummy step is left out, and so is an episode end at the last step (its reset frame lies in the next
      rollout);
    * ``"dummy"``: every step to its next row, dummies included.
    """
    n, T = valid.shape
    steps = torch.arange(T, device=valid.device).expand(n, T)
    base = (torch.arange(n, device=valid.device) * (T + 1)).unsqueeze(1)
    offset = torch.ones_like(steps)
    if resets == "mask":
        keep = valid
    elif resets == "dummy":
        keep = torch.ones_like(valid)
    elif resets == "authors":
        if ends is None:
            raise ValueError("resets='authors' needs the episode ends of every step")
        ended = valid & ends
        keep = valid & ~(ended & (steps + 2 > T))
        offset = offset + ended.long()
    else:
        raise ValueError(f"unknown reset pairing {resets!r}; expected one of {RESET_PAIRINGS}")
    flat = torch.nonzero(keep.reshape(-1)).squeeze(1)
    state_rows = (base + steps).reshape(-1)[flat]
    next_rows = (base + steps + offset).reshape(-1)[flat]
    return state_rows, next_rows, flat


def trajectory_dynamics_loss(model: DynamicsModel, features: torch.Tensor, actions: torch.Tensor,
                             valid: torch.Tensor, resets: str, generator: torch.Generator,
                             ends: torch.Tensor | None = None):
    """(L_f, accuracy) over the transitions of ``n`` trajectories: ``features [n, T + 1, F]`` (row ``t + 1``
    is the observation after step ``t``), ``actions [n, T]``, ``valid [n, T]``, ``ends [n, T]`` (for
    ``resets = "authors"``); the pairs per :func:`transition_pairs`."""
    state_rows, next_rows, action_rows = transition_pairs(valid, ends, resets)
    flat = features.reshape(-1, features.shape[-1])
    return model.loss(flat[state_rows], actions.reshape(-1)[action_rows], flat[next_rows], generator)


# ----------------------------------------------------------------------------------------------
# Analyses logged during training
# ----------------------------------------------------------------------------------------------
class TrainingAnalyses:
    """Value bias at episode starts and value-network stiffness, logged on request (DCPG paper, Appendices A, C).

    ``critics``: the names of the value functions to follow (the first is reported without a name
    suffix: ``value_bias/bias``, ``stiffness/cosine``; the others as ``value_bias/<name>/bias`` ...).
    Enabling these analyses does not change training: stiffness draws its states with its own generator.
    """

    def __init__(self, params: PhasicConfig, num_envs: int, critics: list[str], seed: int):
        self.params = params
        self.critics = critics
        self.trackers = {name: EpisodeStartTracker(num_envs, params.gamma) for name in critics}
        self.starts = {name: collections.deque(maxlen=params.value_bias_episodes) for name in critics}
        self.truncated = {name: 0 for name in critics}
        self.generator = torch.Generator().manual_seed(seed + 7_919)

    @property
    def enabled(self) -> bool:
        return self.params.log_value_bias or self.params.stiffness_every > 0

    def _prefix(self, kind: str, name: str) -> str:
        return f"{kind}/" if name == self.critics[0] else f"{kind}/{name}/"

    def value_bias(self, rollout, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Feed one rollout (``values[name] [T + 1, B]`` rollout-time predictions; row ``T`` bootstraps an
        episode truncated at the last step) and return the bias over the last ``value_bias_episodes``
        finished episodes (truncated ones per ``value_bias_truncation``). Nothing with source ``eval``."""
        p = self.params
        if not p.log_value_bias or p.value_bias_source != "rollouts":
            return {}
        metrics: dict[str, float] = {}
        rewards, ends = rollout.rewards.cpu().numpy(), rollout.ends.cpu().numpy()
        valid, terminated = rollout.valid.cpu().numpy(), rollout.terminated.cpu().numpy()
        for name in self.critics:
            finished = self.trackers[name].feed_rollout(values[name].cpu().numpy(), rewards, ends, valid, terminated)
            for start in finished:
                self.truncated[name] += int(start.truncated)
                if not (start.truncated and p.value_bias_truncation == "exclude"):
                    self.starts[name].append(start)
            if self.starts[name]:
                result = value_bias_from_starts(list(self.starts[name]), truncation=p.value_bias_truncation)
                metrics.update(result.as_metrics(self._prefix("value_bias", name)))
        return metrics

    def stiffness(self, iteration: int, modules: dict[str, nn.Module], obs: torch.Tensor,
                  targets: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, float]:
        """Every ``stiffness_every`` iterations: stiffness of each critic over ``stiffness_states`` valid states
        drawn uniformly from ``obs [T, B, ...]`` with their value targets ``targets[name] [T, B]``."""
        p = self.params
        if p.stiffness_every <= 0 or iteration % p.stiffness_every:
            return {}
        flat_valid = torch.nonzero(valid.reshape(-1).cpu()).squeeze(1)
        pick = flat_valid[torch.randperm(flat_valid.numel(), generator=self.generator)[:p.stiffness_states]]
        pick = pick.sort().values
        states = obs.reshape(-1, *obs.shape[2:])[pick.to(obs.device)]
        metrics: dict[str, float] = {}
        for name in self.critics:
            # a copy: value_stiffness (torch.func.functional_call) swaps the Parameter objects of a submodule
            # registered under two names (the shared torso) for new ones, which the optimisers do not hold
            module = ValueFunction(copy.deepcopy(modules[name]))
            result = value_stiffness(module, states, targets[name].reshape(-1)[pick.to(obs.device)],
                                     params=value_parameter_names(module), sign=p.stiffness_sign,
                                     sign_subset_size=p.stiffness_sign_subset, generator=self.generator)
            prefix = self._prefix("stiffness", name)
            metrics[f"{prefix}cosine"] = result.cosine
            metrics[f"{prefix}cosine_grad_v"] = result.cosine_grad_v
            if p.stiffness_sign != "off":
                metrics[f"{prefix}sign"] = result.sign
                metrics[f"{prefix}sign_grad_v"] = result.sign_grad_v
        return metrics

    def state_dict(self) -> dict:
        return {"trackers": copy.deepcopy(self.trackers), "starts": {k: list(v) for k, v in self.starts.items()},
                "truncated": dict(self.truncated), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.trackers = copy.deepcopy(state["trackers"])
        for name, starts in state["starts"].items():
            self.starts[name].clear()
            self.starts[name].extend(starts)
        self.truncated = dict(state["truncated"])
        self.generator.set_state(state["generator"])

