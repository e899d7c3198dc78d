"""Pieces shared by the off-policy algorithms (TD3, SAC): hyperparameters, MLP actors with NumPy
mirrors, Polyak averaging, and :class:`OffPolicyLoop` (env stepping, replay, update scheduling,
gradient-accuracy measurements). Composition, not a base class: TD3 and SAC each own an
``OffPolicyLoop`` and hand it their ``explore`` and ``update`` functions.

Conventions:

* Actions are *normalised*: the actors output ``a`` in ``[-1, 1]^A`` (tanh), the replay buffer and the
  critics use that space, and the env receives ``offset + scale * a`` (``scale = (high - low) / 2``,
  ``offset = (high + low) / 2``). Noise scales (TD3's 0.1 / 0.2 / 0.5) are therefore fractions of the
  action range, as in the TD3 and CleanRL code.
* One env step of ``B`` envs adds ``B`` transitions (dummy autoreset steps are skipped, see
  :mod:`aclab.data.replay`) and, once ``steps >= learning_starts``, ``utd_ratio * B`` gradient steps
  (fractional ratios carry over). Before ``learning_starts`` actions are uniform in ``[-1, 1]``.
* ``iterate`` runs ``steps_per_iteration`` transitions (capped at ``total_steps``), accumulates the
  update statistics as tensors and syncs them to the host once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import gymnasium
import numpy as np
import torch
from torch import Tensor, nn

from aclab.algos.common import adam_step
from aclab.analysis.grad_accuracy import GradientAccuracyResult, GradientProbe, measure_gradient_accuracy
from aclab.config import ConfigError, require
from aclab.core.memory import trim_heap
from aclab.data.replay import ReplayBatch, ReplayBuffer
from aclab.nets.critics import BASELINE_INITS, CRITIC_KINDS, HYPER_CRITIC_KINDS, make_critic, xavier_init_linear
from aclab.nets.hyper import HYPER_INITS, PRIMARY_INITS
from aclab.runs import check_stop

CriticKind = Literal["mlp", "mlp_small", "mlp_large", "resnet_features", "res35", "d2rl", "sa_hyper", "as_hyper"]


@dataclass
class OffPolicyConfig:
    """Hyperparameters shared by TD3 and SAC (defaults: the TD3 / CleanRL MuJoCo values).

    ``critic`` picks the critic model (:mod:`aclab.nets.critics`); ``critic_options`` go to its
    constructor (e.g. ``{"primary_widths": [64, 128, 256]}`` for a smaller hypernetwork). Hyper
    critics train with ``hyper_critic_lr`` (hypernetwork paper: 5e-5), the others with ``critic_lr``.
    ``grad_accuracy_every > 0`` runs the gradient-accuracy estimator
    (:mod:`aclab.analysis.grad_accuracy`) every that many env steps on a separate Gymnasium env
    (MuJoCo only; built with the run's ``env.options``) and logs ``grad_cs/*``;
    ``grad_accuracy_horizon = 0`` rolls out to the episode's time limit (authors), ``> 0`` stops there
    and bootstraps; ``grad_accuracy_independent_states`` (default, the authors' ``bias_test.py``) draws
    each state from its own reset, ``false`` snapshots one run of the policy.

    Initialisation (hypernetwork paper, Section 5.2; the authors' code as options):

    * ``hyper_init`` (``sa_hyper`` / ``as_hyper``): ``"kaiming"`` (the paper: generated weights with
      ``nn.Linear``'s variance) or ``"authors"`` (fixed head bounds 0.05 / 0.008);
    * ``hyper_calibration``: with ``"kaiming"``, ``"data"`` (default) re-calibrates the heads on the
      replay buffer's states (SA) or actions (AS) just before the first gradient step (the critic and its
      target alike); ``"probe"`` keeps the construction-time calibration on standard-normal inputs;
    * ``primary_init``: the hypernetwork primary's (and the ResNet baselines') weight bound, ``"td3"``
      ``1/(2 sqrt(fan_in))`` or ``"sac"`` ``1/sqrt(2 fan_in)`` (the authors' SAC code);
    * ``baseline_init``: the other critics' linear layers, ``"torch"`` (``nn.Linear``'s default) or
      ``"xavier"`` (Xavier-uniform, zero biases: the authors' SAC code); ``resnet_feature_dim``: the ResNet
      Features bottleneck (0: none, the paper; 10: the authors' SAC code);
    * ``actor_init``: the actor's layers, ``"torch"`` or ``"xavier"`` (the authors' SAC policy).

    ``critic_options`` entries override the keys these settings pass to the critic's constructor.

    ``trim_heap_every``: give the heap's free pages back to the OS every that many updates
    (:func:`aclab.core.memory.trim_heap`; 0: never): freed activations otherwise stay resident. Its
    measured gain (TD3 on HalfCheetah, peak RSS 1.30x CleanRL's without, 1.11x with) was taken while
    :func:`polyak_update` still leaked; since that fix the heap no longer grows and the gain is small
    (docs/performance.md, Memory).
    """

    buffer_size: int = 1_000_000
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    learning_starts: int = 25_000
    steps_per_iteration: int = 1000
    utd_ratio: float = 1.0
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    hyper_critic_lr: float = 5e-5
    adam_eps: float = 1e-8
    actor_hidden: tuple[int, ...] = (256, 256)
    critic: CriticKind = "mlp"
    critic_options: dict = field(default_factory=dict)
    acting: Literal["auto", "torch", "numpy"] = "auto"
    trim_heap_every: int = 100
    grad_accuracy_every: int = 0
    grad_accuracy_states: int = 15
    grad_accuracy_actions: int = 15
    grad_accuracy_noise: float = 0.3
    grad_accuracy_repeat: int = 3
    grad_accuracy_horizon: int = 0
    grad_accuracy_start_steps: int = 1000
    grad_accuracy_independent_states: bool = True
    hyper_init: Literal["kaiming", "authors"] = "kaiming"
    hyper_calibration: Literal["data", "probe"] = "data"
    primary_init: Literal["td3", "sac"] = "td3"
    baseline_init: Literal["torch", "xavier"] = "torch"
    resnet_feature_dim: int = 0
    actor_init: Literal["torch", "xavier"] = "torch"

    def validate(self) -> None:
        require(self.buffer_size >= 1, "params.buffer_size", self.buffer_size, "an integer >= 1")
        require(self.batch_size >= 1, "params.batch_size", self.batch_size, "an integer >= 1")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 < self.tau <= 1.0, "params.tau", self.tau, "a number in (0, 1]")
        require(self.learning_starts >= 0, "params.learning_starts", self.learning_starts, "an integer >= 0")
        require(self.steps_per_iteration >= 1, "params.steps_per_iteration", self.steps_per_iteration,
                "an integer >= 1")
        require(self.utd_ratio > 0, "params.utd_ratio", self.utd_ratio, "a number > 0")
        require(self.trim_heap_every >= 0, "params.trim_heap_every", self.trim_heap_every, "an integer >= 0")
        for name in ("actor_lr", "critic_lr", "hyper_critic_lr", "adam_eps"):
            require(getattr(self, name) > 0, f"params.{name}", getattr(self, name), "a number > 0")
        require(len(self.actor_hidden) >= 1 and all(h >= 1 for h in self.actor_hidden), "params.actor_hidden",
                self.actor_hidden, "a non-empty list of positive integers")
        require(self.critic in CRITIC_KINDS, "params.critic", self.critic, "one of " + ", ".join(CRITIC_KINDS))
        require(self.grad_accuracy_every >= 0, "params.grad_accuracy_every", self.grad_accuracy_every,
                "an integer >= 0 (0: off)")
        require(self.grad_accuracy_states >= 1, "params.grad_accuracy_states", self.grad_accuracy_states,
                "an integer >= 1")
        require(self.grad_accuracy_actions >= 2, "params.grad_accuracy_actions", self.grad_accuracy_actions,
                "an integer >= 2")
        require(self.grad_accuracy_noise > 0, "params.grad_accuracy_noise", self.grad_accuracy_noise, "a number > 0")
        require(self.grad_accuracy_repeat >= 1, "params.grad_accuracy_repeat", self.grad_accuracy_repeat,
                "an integer >= 1")
        require(self.grad_accuracy_horizon >= 0, "params.grad_accuracy_horizon", self.grad_accuracy_horizon,
                "an integer >= 0 (0: to the episode's time limit)")
        require(self.grad_accuracy_start_steps >= 1, "params.grad_accuracy_start_steps",
                self.grad_accuracy_start_steps, "an integer >= 1")
        for name, allowed in (("hyper_init", HYPER_INITS), ("hyper_calibration", ("data", "probe")),
                              ("primary_init", PRIMARY_INITS), ("baseline_init", BASELINE_INITS),
                              ("actor_init", BASELINE_INITS)):
            value = getattr(self, name)
            require(value in allowed, f"params.{name}", value, "one of " + ", ".join(allowed))
        require(self.resnet_feature_dim >= 0, "params.resnet_feature_dim", self.resnet_feature_dim,
                "an integer >= 0 (0: the 1024 features, no bottleneck)")

    @property
    def critic_learning_rate(self) -> float:
        return self.hyper_critic_lr if self.critic in HYPER_CRITIC_KINDS else self.critic_lr


# ----------------------------------------------------------------------------------------------
# Actors and their NumPy mirrors
# ----------------------------------------------------------------------------------------------
def _linear_stack(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.ModuleList:
    dims = [in_dim, *[int(h) for h in hidden], out_dim]
    return nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))


def _relu_mlp(layers: nn.ModuleList, x: Tensor) -> Tensor:
    for layer in layers[:-1]:
        x = torch.relu(layer(x))
    return layers[-1](x)


def init_actor_(actor: nn.Module, init: str) -> nn.Module:
    """``init="torch"``: leave ``nn.Linear``'s default; ``"xavier"``: Xavier-uniform weights and zero biases
    on every ``nn.Linear`` (the authors' SAC policy network). Returns ``actor``."""
    if init == "xavier":
        for layer in actor.modules():
            if isinstance(layer, nn.Linear):
                xavier_init_linear(layer)
    elif init != "torch":
        raise ValueError(f"unknown actor init {init!r}; expected one of {BASELINE_INITS}")
    return actor


class DeterministicActor(nn.Module):
    """TD3's actor: ``a = tanh(MLP(s))`` in ``[-1, 1]^A`` (ReLU hidden layers, ``nn.Linear`` init)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        self.layers = _linear_stack(obs_dim, hidden_sizes, action_dim)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(_relu_mlp(self.layers, obs))


def bound_log_std(raw: Tensor, low: float, high: float, squash: str) -> Tensor:
    """``clamp(raw, low, high)`` (Haarnoja et al.) or ``low + (high - low) (tanh(raw) + 1) / 2`` (CleanRL)."""
    if squash == "clamp":
        return raw.clamp(low, high)
    return low + 0.5 * (high - low) * (torch.tanh(raw) + 1.0)


class TanhGaussianActor(nn.Module):
    """SAC's actor: ``u ~ N(mu(s), sigma(s))``, ``a = tanh(u)``; one head outputs ``[mu, log sigma]``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256),
                 log_std_min: float = -20.0, log_std_max: float = 2.0, log_std_squash: str = "clamp") -> None:
        super().__init__()
        self.action_dim = action_dim
        self.layers = _linear_stack(obs_dim, hidden_sizes, 2 * action_dim)
        self.log_std_min, self.log_std_max, self.log_std_squash = log_std_min, log_std_max, log_std_squash

    def forward(self, obs: Tensor) -> Tensor:
        """obs ``[N, D]`` -> distribution parameters ``cat(mean, log_std)`` ``[N, 2A]`` (the layout of
        :mod:`aclab.core.distributions`)."""
        out = _relu_mlp(self.layers, obs)
        mean, raw = out.split(self.action_dim, dim=-1)
        log_std = bound_log_std(raw, self.log_std_min, self.log_std_max, self.log_std_squash)
        return torch.cat([mean, log_std], dim=-1)


class NumpyMLP:
    """A float32 NumPy view of a ReLU MLP of ``nn.Linear`` layers on CPU, sharing the parameters' memory:
    in-place optimiser steps and ``load_state_dict`` are visible without a copy. ``x [N, in] -> [N, out]``
    (no activation on the output)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = [(layer.weight.detach().numpy().T, layer.bias.detach().numpy()) for layer in layers]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for weight, bias in self.layers[:-1]:
            x = x @ weight
            x += bias
            np.maximum(x, 0.0, out=x)
        weight, bias = self.layers[-1]
        return x @ weight + bias


def critic_init_options(params: OffPolicyConfig) -> dict:
    """The constructor options the initialisation settings give critic ``params.critic`` (class
    docstring of :class:`OffPolicyConfig`), overridden by ``params.critic_options``."""
    kind = params.critic
    if kind in HYPER_CRITIC_KINDS:
        options = {"init": params.hyper_init, "primary_init": params.primary_init}
    elif kind == "resnet_features":
        options = {"init": params.baseline_init, "primary_init": params.primary_init,
                   "feature_dim": params.resnet_feature_dim}
    elif kind == "res35":
        options = {"init": params.baseline_init, "primary_init": params.primary_init}
    else:
        options = {"init": params.baseline_init}
    return {**options, **dict(params.critic_options)}


def build_critic(params: OffPolicyConfig, obs_dim: int, action_dim: int, device: torch.device) -> nn.Module:
    """Twin critics of kind ``params.critic``; a bad ``params.critic_options`` key is a ConfigError."""
    try:
        critic = make_critic(params.critic, obs_dim, action_dim, 2, **critic_init_options(params))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid params.critic_options={params.critic_options!r} for critic "
                          f"{params.critic!r}: {exc}") from exc
    return critic.to(device)


CALIBRATION_STATES = 4096


@torch.no_grad()
def calibrate_critic_on_replay(params: OffPolicyConfig, critic: nn.Module, critic_target: nn.Module,
                               buffer: ReplayBuffer, device: torch.device) -> bool:
    """The paper's head initialisation on real data (hypernetwork paper, Section 5.2): re-calibrate a
    ``kaiming`` hyper critic's heads on up to :data:`CALIBRATION_STATES` stored transitions (evenly
    spaced over the filled rows; no random draw) and copy the result into the target critic. Called
    before the first gradient step, when the buffer holds the warm-up data. Returns whether it did
    anything (False for other critics, ``hyper_calibration = "probe"``, ``init="authors"``)."""
    if params.hyper_calibration != "data" or not hasattr(critic, "calibrate") or len(buffer) == 0:
        return False
    count = min(len(buffer), CALIBRATION_STATES)
    rows = np.unique(np.linspace(0, len(buffer) - 1, count).round().astype(np.int64))
    batch = buffer.gather(rows, device)
    if critic.calibrate(batch.obs, batch.actions) is None:
        return False
    critic_target.load_state_dict(critic.state_dict())
    return True


class RunningSums:
    """Per-update statistics of one iteration, summed in place into one float64 ``[size]`` tensor (float32 on
    MPS) on the learner's device, with their count: no host sync per update, and no per-update tensor kept
    alive until the iteration ends (thousands of tiny tensors pinned among the freed activations fragment the CPU heap:
    TD3 on HalfCheetah grew by ~85 KB of RSS per update that way, ~170 MB over 2,000 updates)."""

    def __init__(self, size: int, device: torch.device):
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.total = torch.zeros(size, dtype=dtype, device=device)
        self.count = 0

    def add(self, values: Tensor) -> None:
        """Add one update's ``[size]`` statistics."""
        self.total.add_(values)
        self.count += 1

    def means(self) -> list[float]:
        """The mean of each statistic over the updates added since the last :meth:`reset` (one host sync)."""
        return (self.total / self.count).tolist()

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


@torch.no_grad()
def polyak_update(targets: list[Tensor], sources: list[Tensor], tau: float) -> None:
    """``target <- (1 - tau) target + tau source`` for every pair, in one multi-tensor call.

    Without grad mode: an in-place op on a frozen target whose source requires grad would make the target
    require grad and record one autograd node per call, a chain that grows for the whole run (3.4 KB per
    call for TD3's critic pair, never freed) and keeps the heap from being trimmed."""
    torch._foreach_lerp_(targets, sources, tau)


def twin_critic_step(critic: nn.Module, optimizer: torch.optim.Optimizer, obs: Tensor, actions: Tensor,
                     target: Tensor) -> Tensor:
    """One optimiser step on ``sum_k mean_n (Q_k(s, a) - target)^2`` for the twin critics (``Q`` is
    ``[E, N]``, ``target`` ``[N]``); returns the detached ``[loss, mean Q]`` (no host sync)."""
    q = critic(obs, actions)
    loss = (q - target).pow(2).mean(dim=1).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    adam_step(optimizer)
    return torch.stack([loss.detach(), q.detach().mean()])


def actor_only_step(loss: Tensor, actor_params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
    """One optimiser step on ``loss`` for the actor's parameters alone: ``autograd.grad`` computes no
    gradient for the critic's weights the loss also runs through (``backward`` would, and discard them)."""
    grads = torch.autograd.grad(loss, actor_params)
    for param, grad in zip(actor_params, grads):
        param.grad = grad
    adam_step(optimizer)


def use_numpy_acting(acting: str, device: torch.device) -> bool:
    if acting == "numpy" and device.type != "cpu":
        raise ValueError("params.acting='numpy' needs device cpu")
    return acting == "numpy" or (acting == "auto" and device.type == "cpu")


def freeze(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def make_analysis_env(env_id: str, options: dict | None = None) -> gymnasium.Env:
    """A single Gymnasium env for the gradient-accuracy estimator (needs save/restore: MuJoCo), built with
    the run's env ``options`` as Gymnasium keyword arguments, so that its reward and observations are the
    training env's (e.g. Ant's ``ctrl_cost_weight`` and ``use_contact_forces``). Options Gymnasium does
    not take (EnvPool's config keys) raise a ValueError naming them: train with ``env.backend =
    "gymnasium"`` and Gymnasium's keywords then."""
    from aclab.envs.registry import parse_env_id

    family, name = parse_env_id(env_id)
    if family not in ("mujoco", "gym"):
        raise ValueError(f"gradient accuracy needs a Gymnasium MuJoCo env (state save/restore); {env_id!r} is "
                         f"{family}")
    kwargs = dict(options or {})
    if "max_episode_steps" in kwargs:
        kwargs["max_episode_steps"] = int(kwargs["max_episode_steps"])
    try:
        return gymnasium.make(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"gradient accuracy rebuilds {name} with env.options={options!r} through Gymnasium, "
                         f"which does not take them ({exc}); use env.backend='gymnasium' with Gymnasium's "
                         "keyword arguments") from exc


class OffPolicyLoop:
    """Env stepping, the replay buffer, update scheduling and gradient-accuracy scheduling.

    Attributes: ``buffer``, ``rng`` (NumPy: warm-up actions, exploration noise, replay indices),
    ``steps``, ``iteration``, ``scale`` / ``offset`` (normalised -> env actions).
    """

    def __init__(self, config, env_spec, device: torch.device) -> None:
        space = env_spec.action_space
        if not isinstance(space, gymnasium.spaces.Box):
            raise ValueError(f"off-policy actor-critics need continuous (Box) actions, {env_spec.env_id} has {space}")
        low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise ValueError(f"{env_spec.env_id}: action bounds must be finite for tanh actors, got {space}")
        if len(env_spec.obs_shape) != 1:
            raise ValueError(f"off-policy MLP networks need vector observations, got shape {env_spec.obs_shape}")
        self.config = config
        self.params: OffPolicyConfig = config.params
        self.device = device
        self.env_id = env_spec.env_id
        self.obs_dim = int(env_spec.obs_shape[0])
        self.action_dim = int(np.prod(space.shape))
        self.scale = ((high - low) / 2.0).astype(np.float32).reshape(-1)
        self.offset = ((high + low) / 2.0).astype(np.float32).reshape(-1)
        self.buffer = ReplayBuffer(self.params.buffer_size, env_spec.obs_shape, env_spec.obs_dtype, self.action_dim)
        self.rng = np.random.default_rng(config.seed)
        self.analysis_rng = np.random.default_rng([config.seed, 7])
        self.steps = 0
        self.iteration = 0
        self.updates = 0
        self.update_credit = 0.0
        self.last_measured_step = 0
        self._analysis_env: gymnasium.Env | None = None

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return actions * self.scale + self.offset

    def run(self, envs, explore: Callable[[np.ndarray], np.ndarray], update: Callable[[ReplayBatch], None]
            ) -> tuple[int, np.ndarray, np.ndarray]:
        """One iteration of env steps and updates; returns (updates done, episode returns, lengths)."""
        p = self.params
        num_envs = envs.num_envs
        total = self.config.total_steps
        vec_steps = max(1, p.steps_per_iteration // num_envs)
        if self.steps < total:
            vec_steps = min(vec_steps, math.ceil((total - self.steps) / num_envs))
        buffer, rng, device = self.buffer, self.rng, self.device
        batch_size, learning_starts, utd = p.batch_size, p.learning_starts, p.utd_ratio
        random_shape = (num_envs, self.action_dim)
        scale, offset = self.scale, self.offset
        returns: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        updates = 0
        trim_every = p.trim_heap_every
        for _ in range(vec_steps):
            check_stop()
            obs = envs.obs
            valid = ~envs.next_is_dummy
            if self.steps < learning_starts:
                actions = rng.uniform(-1.0, 1.0, random_shape).astype(np.float32)
            else:
                actions = explore(obs)
            result = envs.step(actions * scale + offset)
            buffer.add(obs, actions, result.reward, result.obs, result.terminated, valid)
            if np.count_nonzero(result.episode_length):
                ended = result.episode_length > 0
                returns.append(result.episode_return[ended])
                lengths.append(result.episode_length[ended])
            self.steps += num_envs
            if self.steps >= learning_starts:
                self.update_credit += utd * num_envs
                while self.update_credit >= 1.0:
                    update(buffer.sample(batch_size, rng, device))
                    self.update_credit -= 1.0
                    updates += 1
                    if trim_every and (self.updates + updates) % trim_every == 0:
                        trim_heap()  # freed activations back to the OS (see OffPolicyConfig)
        self.updates += updates
        self.iteration += 1
        return updates, _concat(returns), _concat(lengths)

    # ------------------------------------------------------------------ gradient accuracy
    def gradient_accuracy_due(self) -> bool:
        every = self.params.grad_accuracy_every
        return bool(every) and self.steps >= self.params.learning_starts and (
            self.steps // every > self.last_measured_step // every)

    def measure_gradient_accuracy(self, probe: GradientProbe) -> GradientAccuracyResult:
        p = self.params
        if self._analysis_env is None:
            self._analysis_env = make_analysis_env(self.env_id, self.config.env.options)
        self.last_measured_step = self.steps
        return measure_gradient_accuracy(
            self._analysis_env, probe, num_states=p.grad_accuracy_states, num_actions=p.grad_accuracy_actions,
            noise_std=p.grad_accuracy_noise, repeat=p.grad_accuracy_repeat, gamma=p.gamma,
            horizon=p.grad_accuracy_horizon or None, max_start_steps=p.grad_accuracy_start_steps,
            independent_states=p.grad_accuracy_independent_states, rng=self.analysis_rng)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "analysis_rng": self.analysis_rng.bit_generator.state,
            "steps": self.steps,
            "iteration": self.iteration,
            "updates": self.updates,
            "update_credit": self.update_credit,
            "last_measured_step": self.last_measured_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.analysis_rng.bit_generator.state = state["analysis_rng"]
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.updates = int(state["updates"])
        self.update_credit = float(state["update_credit"])
        self.last_measured_step = int(state["last_measured_step"])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def episode_metrics(returns: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    if not returns.size:
        return {}
    return {"episode_return": float(returns.mean()), "episode_length": float(lengths.mean()),
            "episodes": float(returns.size)}


def probe_obs_transform(envs) -> Callable[[np.ndarray], np.ndarray]:
    """Frozen observation normalisation of the training envs (identity when off)."""
    normalizer = getattr(envs, "obs_normalizer", None)
    if normalizer is None:
        return lambda obs: np.asarray(obs, dtype=np.float32)
    return lambda obs: normalizer.normalize(np.asarray(obs, dtype=np.float32))
