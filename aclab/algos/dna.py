"""DNA: PPO with a Dual Network Architecture (Aitchison & Sweetser 2022), and the PPO (2x) baseline.

Two independent networks: the policy network outputs ``pi`` and its own value head ``V_pi`` (used only
by distillation); the value network outputs ``V_V``. One iteration (DNA paper, Algorithm 1):

    1. collect T steps from B envs with pi; the rollout-time values are the value network's;
    2. once per rollout, from V_V:  A = GAE(gamma, lambda_pi) = TD(lambda_pi) - V_V     (Eqs. 7-9)
                                    V_targ = TD(gamma, lambda_V)                         (Eq. 6)
       advantages normalised once over the whole rollout;
    3. policy phase, E_pi epochs:  L = -L_clip(rho, A) - c_eb * H[pi]                     (Eq. 11)
    4. value phase,  E_V epochs:   L = c_V * (V_V(s) - V_targ)^2                          (Eq. 12)
    5. distil phase, E_D epochs, pi_old = pi after step 3, targets V_V(s) from the updated value network:
                                   L = c_D (V_pi(s) - sg(V_V(s)))^2 + beta * KL(pi_old || pi) (Eq. 10, c_D = 1)
       on the policy network only. Constraint options: ``logit_mse`` (the authors' code:
       ``0.5 * mean_a (z_old - z)^2`` on pre-softmax logits), ``mean_mse`` (Gaussian policies,
       DNA paper, Appendix K: ``mean_d (mu_old - mu)^2``) and ``scaled_mean_mse`` (the authors' MuJoCo code:
       ``0.5 * mean_d (mu_old - mu)^2 / (2 sg(sigma_d)^2 + 1e-5)``); the authors' value term is c_D = 0.5.

Each phase has its own Adam (eps 1e-5), epochs, minibatch size and global gradient-norm clip over
its own parameters. Optional (DNA paper, Appendix A, "used by every method"): a repeated-action penalty
subtracted from the (normalised) rewards after the env's normaliser once the same action has been
*repeated* more than ``limit`` times, and a uniform-random-action warm-up that seeds the normalisers and
de-synchronises the envs; and gradient-noise-scale measurements (Section 3.2, Appendix N) of the three
losses every K iterations. The authors' code, as options: the ratio clipped per action dimension
(``ratio_clip="per_dim"``, Gaussian policies), time-limit ends treated as terminal
(``time_limit="terminal"``), their noise-scale estimator (``noise_small_average="norms"``, 16 small batches,
EMA 0.9 on S and |G|^2, ``noise_g2_floor``).

``PPO2x`` is aclab's PPO with the Nature-CNN channels doubled (64, 128, 128; the DNA paper's "PPO (2x)",
about 3.5M parameters like DNA's two networks), with the same Appendix A penalty and warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from aclab import distributed
from aclab.algos.common import (
    Entry,
    adam_step,
    check_finite,
    clip_grad_norm,
    linear_schedule,
    make_adam,
    policy_actions,
)
from aclab.algos.ppo import PPO, PPOConfig
from aclab.analysis.noise_scale import GradientNoiseScale, measure_noise_scale
from aclab.config import Config, require
from aclab.core import losses
from aclab.core.distributions import Categorical, DiagGaussian, make_distribution, normal_split
from aclab.core.returns import gae, td_lambda_returns
from aclab.data.rollout import RolloutCollector, valid_transitions
from aclab.nets.agents import ActorCritic, build_encoder
from aclab.nets.encoders import init_linear
from aclab.runs import check_stop

ConstraintKind = Literal["kl", "logit_mse", "mean_mse", "scaled_mean_mse"]
SCALED_MSE_EPS = 1e-5  # the authors' bias term in 0.5 (mu_old - mu)^2 / (2 sigma^2 + eps)
NOISE_LOSSES = ("policy", "value", "distil")


@dataclass
class DNAConfig:
    """DNA hyperparameters. Defaults: the DNA paper's Atari setting (Table 1 with the tuned epochs 2/1/2 of
    Section 6.1 and lambdas 0.8/0.95 of Section 6.2)."""

    num_steps: int = 128
    gamma: float = 0.999
    lambda_pi: float = 0.8
    lambda_v: float = 0.95
    policy_epochs: int = 2
    value_epochs: int = 1
    distil_epochs: int = 2
    policy_minibatch_size: int = 2048
    value_minibatch_size: int = 512
    distil_minibatch_size: int = 512
    single_minibatch_size: int | None = None  # ablation "DNA (mb=512)": one size for all phases
    lr: float = 2.5e-4
    value_lr: float | None = None  # None: lr
    distil_lr: float | None = None  # None: lr
    anneal_lr: bool = False
    adam_eps: float = 1e-5
    max_grad_norm: float = 5.0
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    value_loss_coef: float = 1.0  # Eq. 12 has no 1/2; 0.5 = the spec's / authors' 0.5 (V - V_targ)^2
    distil_beta: float = 1.0
    distil_constraint: ConstraintKind = "kl"
    distil_value_coef: float = 1.0  # Eq. 10 (no 1/2); the authors' code: 0.5 (V_pi - V_V)^2
    norm_adv: Literal["batch", "minibatch", "off"] = "batch"
    ratio_clip: Literal["joint", "per_dim"] = "joint"  # per_dim: the authors' MuJoCo code (Gaussian)
    time_limit: Literal["bootstrap", "terminal"] = "bootstrap"  # terminal: the authors' code (no bootstrap)
    repeat_action_penalty: float = 0.0
    repeat_action_limit: int = 100  # penalise once the same action has been repeated more than this
    warmup_max_steps: int = 0
    encoder: Literal["auto", "mlp", "nature_cnn", "impala"] = "auto"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    log_std_init: float = 0.0
    forward_chunk_size: int = 4096
    noise_scale_every: int = 0  # measure B_simple every K iterations (0: off)
    noise_b_small: int = 32
    noise_b_big: int = 16384  # capped at the number of valid transitions of a rollout
    noise_num_small_batches: int = 32
    noise_g2_smoothing: float = 0.95
    noise_s_smoothing: float = 0.0
    noise_small_batches: Literal["independent", "partition"] = "independent"
    noise_small_average: Literal["squares", "norms"] = "squares"  # norms: the authors' code
    noise_g2_floor: float | None = None  # the authors' code: 1e-4

    def validate(self) -> None:
        positive_int = "an integer >= 1"
        for key in ("num_steps", "policy_minibatch_size", "value_minibatch_size", "distil_minibatch_size",
                    "repeat_action_limit", "forward_chunk_size", "noise_b_small", "noise_num_small_batches"):
            require(getattr(self, key) >= 1, f"params.{key}", getattr(self, key), positive_int)
        for key in ("gamma", "lambda_pi", "lambda_v"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"params.{key}", value, "a number in [0, 1]")
        require(self.policy_epochs >= 1, "params.policy_epochs", self.policy_epochs, positive_int)
        require(self.value_epochs >= 1, "params.value_epochs", self.value_epochs, positive_int)
        require(self.distil_epochs >= 0, "params.distil_epochs", self.distil_epochs, "an integer >= 0 (0: no distil)")
        require(self.single_minibatch_size is None or self.single_minibatch_size >= 1, "params.single_minibatch_size",
                self.single_minibatch_size, "an integer >= 1 or None")
        for key in ("lr", "max_grad_norm", "clip_coef", "adam_eps"):
            require(getattr(self, key) > 0, f"params.{key}", getattr(self, key), "a number > 0")
        for key in ("value_lr", "distil_lr"):
            value = getattr(self, key)
            require(value is None or value > 0, f"params.{key}", value, "a number > 0 or None (use lr)")
        for key in ("ent_coef", "value_loss_coef", "distil_beta", "distil_value_coef", "repeat_action_penalty",
                    "warmup_max_steps", "noise_scale_every"):
            require(getattr(self, key) >= 0, f"params.{key}", getattr(self, key), "a number >= 0")
        require(self.noise_b_big > self.noise_b_small, "params.noise_b_big", self.noise_b_big,
                f"an integer > params.noise_b_small ({self.noise_b_small})")
        for key in ("noise_g2_smoothing", "noise_s_smoothing"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"params.{key}", value, "a number in [0, 1)")
        require(self.noise_g2_floor is None or self.noise_g2_floor > 0, "params.noise_g2_floor", self.noise_g2_floor,
                "None or a number > 0")
        require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "params.hidden_sizes",
                self.hidden_sizes, "a non-empty list of positive integers")

    def minibatch_sizes(self) -> dict[str, int]:
        """Minibatch size per phase, after the ``single_minibatch_size`` ablation switch."""
        if self.single_minibatch_size is not None:
            return dict.fromkeys(NOISE_LOSSES, self.single_minibatch_size)
        return {"policy": self.policy_minibatch_size, "value": self.value_minibatch_size,
                "distil": self.distil_minibatch_size}


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class ValueNetwork(nn.Module):
    """The value network: its own encoder and a linear head (gain 1). obs [N, *obs_shape] -> V [N]."""

    def __init__(self, obs_shape, encoder: str = "auto", hidden_sizes=(64, 64), activation: str = "tanh"):
        super().__init__()
        self.encoder = build_encoder(obs_shape, encoder, hidden_sizes, activation)
        self.head = init_linear(nn.Linear(self.encoder.out_dim, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(obs)).squeeze(-1)


def build_dna_networks(params: DNAConfig, obs_shape, dist) -> tuple[ActorCritic, ValueNetwork]:
    """(policy network: pi and V_pi on one encoder, value network: V_V on another encoder)."""
    policy_net = ActorCritic(obs_shape, dist, encoder=params.encoder, hidden_sizes=params.hidden_sizes,
                             activation=params.activation, shared=True, log_std_init=params.log_std_init)
    value_net = ValueNetwork(obs_shape, params.encoder, params.hidden_sizes, params.activation)
    return policy_net, value_net


# ----------------------------------------------------------------------------------------------
# Losses (pure functions on flat minibatches [N]; each returns a scalar mean)
# ----------------------------------------------------------------------------------------------
def normal_log_prob_per_dim(params: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Per-dimension log densities ``[N, D]`` of a diagonal Gaussian with params ``cat(mean, log_std)``."""
    mean, log_std = normal_split(params)
    return -0.5 * ((actions - mean) / log_std.exp()).square() - log_std - 0.5 * math.log(2.0 * math.pi)


def policy_phase_loss(
    dist, dist_params: torch.Tensor, actions: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
    clip_coef: float, ent_coef: float, old_params: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DNA paper, Eq. 11 as a loss: ``-mean(min(rho A, clip(rho, 1 +- eps) A)) - c_eb * mean H[pi]``.

    With ``old_params`` (a diagonal Gaussian's behaviour params [N, 2D]) the ratio is clipped per action
    dimension, as in the authors' MuJoCo code: ``rho_d = pi_d(a_d|s) / pi_old,d(a_d|s)`` and the loss is
    ``-mean_s mean_d min(rho_d A, clip(rho_d) A)``."""
    if old_params is None:
        log_probs, old = dist.log_prob(dist_params, actions), old_log_probs
        adv = advantages
    else:
        log_probs = normal_log_prob_per_dim(dist_params, actions)
        old = normal_log_prob_per_dim(old_params, actions)
        adv = advantages.unsqueeze(-1)
    pg_loss, approx_kl, clip_fraction = losses.clipped_surrogate_loss(log_probs, old, adv, clip_coef)
    entropy = dist.entropy(dist_params).mean()
    stats = {"loss/policy": pg_loss.detach(), "entropy": entropy.detach(), "approx_kl": approx_kl,
             "clip_fraction": clip_fraction}
    return pg_loss - ent_coef * entropy, stats


def value_phase_loss(values: torch.Tensor, targets: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """DNA paper, Eq. 12: ``coef * mean((V_V(s) - V_targ)^2)`` (coef 1 in the paper)."""
    return coef * (values - targets).square().mean()


def distil_constraint(kind: str, dist, old_params: torch.Tensor, new_params: torch.Tensor) -> torch.Tensor:
    """The policy constraint of the distil phase, a scalar.

    ``kl``: ``mean_s KL(pi_old(.|s) || pi(.|s))`` (DNA paper, Eq. 10, exact per state). ``logit_mse``: the
    authors' code, ``0.5 * mean_{s, a} (z_old - z)^2`` on logits (categorical only). ``mean_mse``:
    DNA paper, Appendix K for Gaussian policies, ``mean_{s, d} (mu_old - mu)^2``. ``scaled_mean_mse``: the
    authors' MuJoCo code, ``0.5 * mean_{s, d} (mu_old - mu)^2 / (2 sg(sigma_d)^2 + 1e-5)`` with the current
    std (the mean-dependent part of the Gaussian KL, "ignoring the constant term").
    """
    if kind == "kl":
        return dist.kl(old_params, new_params).mean()
    if kind == "logit_mse":
        return 0.5 * (old_params - new_params).square().mean()
    if kind == "mean_mse":
        old_mean, _ = normal_split(old_params)
        new_mean, _ = normal_split(new_params)
        return (old_mean - new_mean).square().mean()
    if kind == "scaled_mean_mse":
        old_mean, _ = normal_split(old_params)
        new_mean, new_log_std = normal_split(new_params)
        variance = (2.0 * new_log_std).exp().detach()
        return 0.5 * ((old_mean - new_mean).square() / (2.0 * variance + SCALED_MSE_EPS)).mean()
    raise ValueError(f"unknown distil constraint {kind!r}; expected one of kl, logit_mse, mean_mse, scaled_mean_mse")


def distil_phase_loss(
    policy_values: torch.Tensor, value_targets: torch.Tensor, dist, old_params: torch.Tensor,
    new_params: torch.Tensor, beta: float, kind: str = "kl", value_coef: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DNA paper, Eq. 10: ``c_D mean((V_pi(s) - V_V(s))^2) + beta * constraint`` (c_D = 1; the authors' code
    0.5); returns (loss, mse, constraint).

    ``value_targets`` and ``old_params`` must carry no gradient (the value network is not trained here).
    """
    mse = (policy_values - value_targets).square().mean()
    constraint = distil_constraint(kind, dist, old_params, new_params)
    return value_coef * mse + beta * constraint, mse, constraint


def repeated_action_mask(
    actions: np.ndarray, valid: np.ndarray, ends: np.ndarray, last_action: np.ndarray, run_length: np.ndarray,
    limit: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the repeated-action penalty applies (DNA paper, Appendix A), carried across rollouts.

    actions, valid, ends: [T, B]; last_action, run_length: [B] (the state after the previous rollout;
    ``last_action = -1`` means none). On a valid step the run length becomes ``run + 1`` if the action
    equals the previous one, else 1; the step is penalised when the action has been *repeated* more
    than ``limit`` times (DNA paper, Appendix A: "repeated the same action more than 100 times"), i.e.
    when ``run - 1 > limit``: from the ``limit + 2``-th identical action in a row (the authors' counter
    counts repeats the same way). Dummy (autoreset) steps change nothing; an episode end clears the
    run. Returns (mask [T, B] bool, last_action [B], run_length [B]).
    """
    last_action = last_action.copy()
    run_length = run_length.copy()
    mask = np.zeros(actions.shape[:2], dtype=bool)
    for t in range(actions.shape[0]):
        same = actions[t] == last_action
        run_length = np.where(valid[t], np.where(same, run_length + 1, 1), run_length)
        last_action = np.where(valid[t], actions[t], last_action)
        mask[t] = valid[t] & (run_length - 1 > limit)
        run_length = np.where(ends[t], 0, run_length)
        last_action = np.where(ends[t], -1, last_action)
    return mask, last_action, run_length


def penalise_repeated_actions(
    rewards: torch.Tensor, rollout, last_action: np.ndarray, run_length: np.ndarray, penalty: float, limit: int,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, float]:
    """DNA paper, Appendix A: ``rewards - penalty * mask`` with :func:`repeated_action_mask` (carried state in,
    new state out). Returns (rewards [T, B], last_action [B], run_length [B], penalised fraction of the
    valid steps)."""
    valid = rollout.valid.cpu().numpy()
    mask, last_action, run_length = repeated_action_mask(
        rollout.actions.cpu().numpy(), valid, rollout.ends.cpu().numpy(), last_action, run_length, limit)
    penalised = rewards - penalty * torch.as_tensor(mask, device=rewards.device, dtype=rewards.dtype)
    return penalised, last_action, run_length, float(mask[valid].mean()) if valid.any() else 0.0


def random_actions(env_spec, num_envs: int, np_rng: np.random.Generator) -> np.ndarray:
    """Uniformly random actions ``[B, ...]`` (a Box with infinite bounds: uniform on [-1, 1])."""
    space = env_spec.action_space
    if env_spec.discrete:
        return np_rng.integers(0, int(space.n), size=num_envs).astype(np.int64)
    low = np.where(np.isfinite(space.low), space.low, -1.0)
    high = np.where(np.isfinite(space.high), space.high, 1.0)
    return np_rng.uniform(low, high, size=(num_envs, *space.shape)).astype(np.float32)


def random_warmup(envs, act_fn, random_fn, np_rng: np.random.Generator, max_steps: int, device,
                  lockstep=int) -> int:
    """DNA paper, Appendix A: env b first takes n_b ~ U(1, W) uniformly random actions (``random_fn()``).

    The envs step in lockstep, so env b then acts with the current (untrained) policy ``act_fn`` until the
    longest warm-up ends; nothing is learned from these steps. With several data-parallel ranks,
    ``lockstep`` (the ranks' maximum) makes every rank's envs step the same number of times.
    Returns the number of lockstep steps.
    """
    num_envs = envs.num_envs
    per_env = np_rng.integers(1, max_steps + 1, size=num_envs)
    length = int(lockstep(int(per_env.max())))
    for t in range(length):
        check_stop()
        actions = random_fn()
        acting = t >= per_env
        if acting.any():
            obs = torch.as_tensor(np.ascontiguousarray(envs.obs), device=device)
            actions[acting] = act_fn(obs)[0][acting]
        envs.step(actions)
    return length


def bootstrap_discounts(rollout, gamma: float, time_limit: str) -> torch.Tensor:
    """``gamma * (1 - terminated)`` (a time-limit end bootstraps from V(final obs)); with ``time_limit =
    "terminal"`` (the DNA authors' code, whose time limits set ``done``) ``gamma * (1 - end)``."""
    if time_limit == "terminal":
        return gamma * (~rollout.ends).to(rollout.rewards.dtype)
    return rollout.discounts(gamma)


def _num_minibatches(batch_size: int, minibatch_size: int) -> int:
    return max(batch_size // minibatch_size, 1)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
class DNA:
    Config = DNAConfig
    DATA_PARALLEL = True  # torchrun: several ranks, see aclab.distributed

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: DNAConfig = config.params
        p = self.params
        self.device = device
        self.env_spec = env_spec
        self.dist = make_distribution(env_spec.action_space)
        if p.distil_constraint == "logit_mse":
            require(isinstance(self.dist, Categorical), "params.distil_constraint", p.distil_constraint,
                    "'kl' or 'mean_mse' for continuous actions ('logit_mse' needs discrete actions)")
        if p.distil_constraint in ("mean_mse", "scaled_mean_mse"):
            require(isinstance(self.dist, DiagGaussian), "params.distil_constraint", p.distil_constraint,
                    f"'kl' or 'logit_mse' for discrete actions ('{p.distil_constraint}' needs a Gaussian policy)")
        require(p.ratio_clip == "joint" or isinstance(self.dist, DiagGaussian), "params.ratio_clip", p.ratio_clip,
                "'joint' for discrete actions ('per_dim' clips each dimension of a Gaussian policy)")
        require(p.repeat_action_penalty == 0 or env_spec.discrete, "params.repeat_action_penalty",
                p.repeat_action_penalty, "0 for continuous actions (the penalty counts repeated discrete actions)")
        self.policy_net, self.value_net = build_dna_networks(p, env_spec.obs_shape, self.dist)
        self.policy_net.to(device)
        self.value_net.to(device)
        self.base_lrs = {"policy": p.lr, "value": p.value_lr or p.lr, "distil": p.distil_lr or p.lr}
        self.optimizers = {
            "policy": make_adam(self.policy_net.parameters(), lr=self.base_lrs["policy"], eps=p.adam_eps),
            "value": make_adam(self.value_net.parameters(), lr=self.base_lrs["value"], eps=p.adam_eps),
            "distil": make_adam(self.policy_net.parameters(), lr=self.base_lrs["distil"], eps=p.adam_eps),
        }
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.np_rng = np.random.default_rng(config.seed)
        self.dp = distributed.current()  # several ranks: each steps num_envs / world_size envs
        self.num_envs = self.dp.local_envs(config.env.num_envs)
        self.batch_size = config.env.num_envs * p.num_steps
        self.num_iterations = max(config.total_steps // self.batch_size, 1)
        self.minibatch_sizes = p.minibatch_sizes()
        self.steps = 0
        self.iteration = 0
        self.warmed_up = p.warmup_max_steps == 0
        self.repeat_last_action = np.full(self.num_envs, -1, dtype=np.int64)
        self.repeat_run_length = np.zeros(self.num_envs, dtype=np.int64)
        self.noise_estimators = {
            name: GradientNoiseScale(p.noise_b_small, p.noise_b_big, p.noise_g2_smoothing, p.noise_s_smoothing,
                                     small_average=p.noise_small_average, g2_floor=p.noise_g2_floor)
            for name in NOISE_LOSSES
        }
        self.noise_generator = torch.Generator().manual_seed(config.seed + 1)
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        """Behaviour policy for the collector; the stored values are the value network's (for GAE/TD)."""
        dist_params = self.policy_net.dist_params(obs)
        actions = self.dist.sample(dist_params, self.generator)
        log_probs = self.dist.log_prob(dist_params, actions)
        values = self.value_net(obs)
        return tuple(x.cpu().numpy() for x in (actions, log_probs, values, dist_params))

    @torch.no_grad()
    def _value(self, obs: torch.Tensor) -> np.ndarray:
        return self.value_net(obs).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        dist_params = self.policy_net.dist_params(torch.as_tensor(obs, device=self.device))
        return policy_actions(self.dist, dist_params, deterministic, self.generator)

    def _random_actions(self) -> np.ndarray:
        return random_actions(self.env_spec, self.num_envs, self.np_rng)

    def _warmup(self, envs) -> int:
        """DNA paper, Appendix A (:func:`random_warmup`); the steps count towards ``steps``."""
        length = random_warmup(envs, self._act, self._random_actions, self.np_rng, self.params.warmup_max_steps,
                               self.device, self.dp.max_int)
        self.steps += self.num_envs * self.dp.world_size * length
        self.warmed_up = True
        return length

    # ------------------------------------------------------------------ one iteration
    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        metrics: dict[str, float] = {}
        if not self.warmed_up:
            metrics["warmup_steps"] = float(self._warmup(envs) * self.num_envs)
        if self._collector is None:
            self._collector = RolloutCollector(envs, p.num_steps, self.dist.param_dim, self.device)
        if p.anneal_lr:
            fraction = linear_schedule(1.0, 0.0, self.iteration / self.num_iterations)
            for name, optimizer in self.optimizers.items():
                _set_lr(optimizer, self.base_lrs[name] * fraction)
        self.policy_net.eval()
        self.value_net.eval()
        rollout, episode_returns, episode_lengths = self._collector.collect(envs, self._act, self._value)
        self.policy_net.train()
        self.value_net.train()
        rewards = rollout.rewards
        if p.repeat_action_penalty > 0:
            rewards, self.repeat_last_action, self.repeat_run_length, fraction = penalise_repeated_actions(
                rewards, rollout, self.repeat_last_action, self.repeat_run_length, p.repeat_action_penalty,
                p.repeat_action_limit)
            metrics["repeat_penalty_fraction"] = fraction
        with torch.no_grad():
            discounts = bootstrap_discounts(rollout, p.gamma, p.time_limit)
            advantages = gae(rewards, rollout.values, discounts, p.lambda_pi, episode_ends=rollout.ends)
            value_targets = td_lambda_returns(rewards, rollout.values, discounts, p.lambda_v,
                                              episode_ends=rollout.ends)
        metrics.update(self.update(rollout, advantages, value_targets))
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        for name, optimizer in self.optimizers.items():
            metrics[f"lr/{name}"] = optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def update(self, rollout, advantages: torch.Tensor, value_targets: torch.Tensor) -> dict[str, float]:
        """The three phases on one rollout. advantages = GAE(lambda_pi), value_targets = TD(lambda_V),
        both [T, B]; only valid (non-dummy) transitions are used."""
        p = self.params
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_params=rollout.dist_params,
                                  advantages=advantages, value_targets=value_targets, old_values=rollout.values[:-1])
        old_values = batch.pop("old_values")  # for explained variance only: no phase trains on it
        if p.norm_adv == "batch":
            batch["advantages"] = self.dp.normalize(batch["advantages"])
        measure_noise = p.noise_scale_every > 0 and self.iteration % p.noise_scale_every == 0
        metrics: dict[str, float] = {}
        metrics.update(self._policy_phase(batch, measure_noise, rollout.valid))
        metrics.update(self._value_phase(batch, measure_noise, rollout.valid))
        if p.distil_epochs > 0:
            metrics.update(self._distil_phase(batch, measure_noise, rollout.valid))
        with torch.no_grad():
            targets = batch["value_targets"]
            var_targets = targets.var()
            explained = 1.0 - (targets - old_values).var() / var_targets if var_targets > 0 else torch.nan
        metrics["explained_variance"] = float(explained)
        return metrics

    def _step(self, name: str, loss: torch.Tensor, parameters: list[torch.Tensor], weight: float = 1.0) -> torch.Tensor:
        """One step of phase ``name``'s optimiser (``weight``: this rank's share of the minibatch)."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        self.dp.backward(loss, parameters, weight)
        grad_norm = clip_grad_norm(parameters, self.params.max_grad_norm)
        adam_step(optimizer)
        return grad_norm

    def _summarise(self, phase: str, stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Mean of each statistic over the phase's minibatches; one host sync and one finiteness check."""
        names = list(stats[0])
        table = torch.stack([torch.stack([s[n].detach().float().reshape(()) for n in names]) for s in stats])
        check_finite(dict(zip(names, table.sum(0))), f"DNA {phase} phase, iteration {self.iteration}")
        return dict(zip(names, table.mean(0).tolist()))

    def _policy_phase(self, batch: dict[str, torch.Tensor], measure_noise: bool,
                      valid: torch.Tensor | None = None) -> dict[str, float]:
        p = self.params
        fields = ("obs", "actions", "old_log_probs", "advantages")
        if p.ratio_clip == "per_dim":
            fields += ("old_params",)
        data = {k: batch[k] for k in fields}
        parameters = list(self.policy_net.parameters())
        metrics = {}
        if measure_noise:
            def loss_fn(indices: torch.Tensor) -> torch.Tensor:
                i = indices.to(self.device)
                params = self.policy_net.dist_params(data["obs"][i])
                return policy_phase_loss(self.dist, params, data["actions"][i], data["old_log_probs"][i],
                                         data["advantages"][i], p.clip_coef, p.ent_coef,
                                         data["old_params"][i] if "old_params" in data else None)[0]
            metrics.update(self._measure_noise("policy", loss_fn, parameters, data["obs"].shape[0]))
        num_minibatches = _num_minibatches(self.batch_size, self.minibatch_sizes["policy"])
        stats = []
        for _ in range(p.policy_epochs):
            for mb in self.dp.minibatches(data, num_minibatches, self.generator, valid):
                dist_params = self.policy_net.dist_params(mb["obs"])
                advantages = self.dp.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                loss, mb_stats = policy_phase_loss(self.dist, dist_params, mb["actions"], mb["old_log_probs"],
                                                   advantages, p.clip_coef, p.ent_coef, mb.get("old_params"))
                mb_stats["grad_norm/policy"] = self._step("policy", loss, parameters, mb.weight)
                if mb.weight:  # a rank holding none of this minibatch (several ranks) adds no row
                    stats.append(mb_stats)
        metrics.update(self._summarise("policy", stats))
        return metrics

    def _value_phase(self, batch: dict[str, torch.Tensor], measure_noise: bool,
                     valid: torch.Tensor | None = None) -> dict[str, float]:
        p = self.params
        data = {"obs": batch["obs"], "value_targets": batch["value_targets"]}
        parameters = list(self.value_net.parameters())
        metrics = {}
        if measure_noise:
            def loss_fn(indices: torch.Tensor) -> torch.Tensor:
                i = indices.to(self.device)
                return value_phase_loss(self.value_net(data["obs"][i]), data["value_targets"][i], p.value_loss_coef)
            metrics.update(self._measure_noise("value", loss_fn, parameters, data["obs"].shape[0]))
        num_minibatches = _num_minibatches(self.batch_size, self.minibatch_sizes["value"])
        stats = []
        for _ in range(p.value_epochs):
            for mb in self.dp.minibatches(data, num_minibatches, self.generator, valid):
                loss = value_phase_loss(self.value_net(mb["obs"]), mb["value_targets"], p.value_loss_coef)
                grad_norm = self._step("value", loss, parameters, mb.weight)
                if mb.weight:
                    stats.append({"loss/value": loss.detach(), "grad_norm/value": grad_norm})
        metrics.update(self._summarise("value", stats))
        return metrics

    @torch.no_grad()
    def _chunked(self, fn: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
        size = self.params.forward_chunk_size
        return torch.cat([fn(obs[i:i + size]) for i in range(0, obs.shape[0], size)])

    def _distil_phase(self, batch: dict[str, torch.Tensor], measure_noise: bool,
                      valid: torch.Tensor | None = None) -> dict[str, float]:
        p = self.params
        data = {
            "obs": batch["obs"],
            "old_params": self._chunked(self.policy_net.dist_params, batch["obs"]),  # pi_old: after the policy phase
            "targets": self._chunked(self.value_net, batch["obs"]),  # V_V of the updated value network
        }
        parameters = list(self.policy_net.parameters())
        metrics = {}
        if measure_noise:
            def loss_fn(indices: torch.Tensor) -> torch.Tensor:
                i = indices.to(self.device)
                params, values = self.policy_net(data["obs"][i])
                return distil_phase_loss(values, data["targets"][i], self.dist, data["old_params"][i], params,
                                         p.distil_beta, p.distil_constraint, p.distil_value_coef)[0]
            metrics.update(self._measure_noise("distil", loss_fn, parameters, data["obs"].shape[0]))
        num_minibatches = _num_minibatches(self.batch_size, self.minibatch_sizes["distil"])
        stats = []
        for _ in range(p.distil_epochs):
            for mb in self.dp.minibatches(data, num_minibatches, self.generator, valid):
                params, values = self.policy_net(mb["obs"])
                loss, mse, constraint = distil_phase_loss(values, mb["targets"], self.dist, mb["old_params"], params,
                                                          p.distil_beta, p.distil_constraint, p.distil_value_coef)
                grad_norm = self._step("distil", loss, parameters, mb.weight)
                if mb.weight:
                    stats.append({"loss/distil": loss.detach(), "loss/distil_value": mse.detach(),
                                  "loss/distil_constraint": constraint.detach(), "grad_norm/distil": grad_norm})
        metrics.update(self._summarise("distil", stats))
        return metrics

    def _measure_noise(self, name: str, loss_fn, parameters: list[torch.Tensor], dataset_size: int) -> dict[str, float]:
        """Algorithm 2 on this phase's loss at the phase's starting parameters; ``noise/<name>/...`` metrics."""
        p = self.params
        estimator = self.noise_estimators[name]
        b_big = min(p.noise_b_big, dataset_size)  # a rollout smaller than B_big: use all of it
        if p.noise_small_batches == "partition":
            b_big -= b_big % p.noise_b_small
        if b_big <= p.noise_b_small:
            return {}
        estimator.b_big = b_big
        estimate = measure_noise_scale(
            estimator, loss_fn, parameters, dataset_size, num_small_batches=p.noise_num_small_batches,
            max_chunk_size=p.forward_chunk_size, small_batches=p.noise_small_batches,
            generator=self.noise_generator)
        return estimate.as_metrics(f"noise/{name}/")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "policy_net": self.policy_net.state_dict(),
            "value_net": self.value_net.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "noise_estimators": {name: est.state_dict() for name, est in self.noise_estimators.items()},
            "steps": self.steps,
            "iteration": self.iteration,
            "warmed_up": self.warmed_up,
            "repeat_last_action": self.repeat_last_action.copy(),
            "repeat_run_length": self.repeat_run_length.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy_net.load_state_dict(state["policy_net"])
        self.value_net.load_state_dict(state["value_net"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.generator.set_state(state["generator"])
        self.noise_generator.set_state(state["noise_generator"])
        self.np_rng.bit_generator.state = state["np_rng"]
        for name, est in self.noise_estimators.items():
            est.load_state_dict(state["noise_estimators"][name])
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.warmed_up = bool(state["warmed_up"])
        self.repeat_last_action = np.array(state["repeat_last_action"], dtype=np.int64, copy=True)
        self.repeat_run_length = np.array(state["repeat_run_length"], dtype=np.int64, copy=True)


# ----------------------------------------------------------------------------------------------
# PPO (2x): the DNA paper's PPO baseline with doubled encoder channels
# ----------------------------------------------------------------------------------------------
class ScaledNatureCNN(nn.Module):
    """Nature CNN with ``channel_multiplier`` times the channels (2: 64 8x8 s4, 128 4x4 s2, 128 3x3 s1),
    then Linear ``out_dim`` (512), ReLU everywhere; orthogonal init with gain sqrt(2), zero biases.

    Input ``[N, C, H, H]`` uint8 (scaled by 1/255 here) or float; output ``[N, out_dim]``. With
    multiplier 1 it has the same shapes as :class:`aclab.nets.encoders.NatureCNN`.
    """

    def __init__(self, in_channels: int, channel_multiplier: int = 2, out_dim: int = 512, image_size: int = 84):
        super().__init__()
        c1, c2, c3 = (channel_multiplier * c for c in (32, 64, 64))
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        side = image_size
        for kernel, stride in ((8, 4), (4, 2), (3, 1)):
            side = (side - kernel) // stride + 1
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for the Nature CNN")
        self.linear = nn.Sequential(nn.Linear(c3 * side * side, out_dim), nn.ReLU())
        for layer in self.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                init_linear(layer, math.sqrt(2))
        self.out_dim = out_dim

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        if observations.dtype == torch.uint8:
            observations = observations.to(self.linear[0].weight.dtype) / 255.0
        return self.linear(self.convs(observations))


@dataclass
class PPO2xConfig(PPOConfig):
    """PPO's parameters plus the encoder width multiplier (2 = the DNA paper's PPO (2x)) and the DNA paper's
    Appendix A choices "used by every method": the repeated-action penalty and the random warm-up."""

    channel_multiplier: int = 2
    repeat_action_penalty: float = 0.0
    repeat_action_limit: int = 100
    warmup_max_steps: int = 0

    def validate(self) -> None:
        super().validate()
        require(self.channel_multiplier >= 1, "params.channel_multiplier", self.channel_multiplier, "an integer >= 1")
        require(self.repeat_action_limit >= 1, "params.repeat_action_limit", self.repeat_action_limit,
                "an integer >= 1")
        for key in ("repeat_action_penalty", "warmup_max_steps"):
            require(getattr(self, key) >= 0, f"params.{key}", getattr(self, key), "a number >= 0")


class PPO2x(PPO):
    """aclab's PPO with a wider torso: Nature CNN channels times ``channel_multiplier`` for image
    observations; for vector observations the MLP hidden sizes are multiplied instead. Like DNA, it can
    warm up with random actions and penalise repeated actions (DNA paper, Appendix A)."""

    Config = PPO2xConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        params: PPO2xConfig = config.params
        multiplier = params.channel_multiplier
        image = len(env_spec.obs_shape) == 3
        if not image:
            wider = tuple(multiplier * h for h in params.hidden_sizes)
            config = dataclasses.replace(config, params=dataclasses.replace(params, hidden_sizes=wider))
        super().__init__(config, env_spec, device)
        if image and multiplier != 1:
            if params.encoder not in ("auto", "nature_cnn") or tuple(env_spec.obs_shape[1:]) != (84, 84):
                raise ValueError("PPO2x widens the Nature CNN: it needs [C, 84, 84] observations and "
                                 f"encoder 'auto' or 'nature_cnn', got {env_spec.obs_shape} / {params.encoder!r}")
            net = self.net

            def wide() -> ScaledNatureCNN:
                return ScaledNatureCNN(env_spec.obs_shape[0], multiplier, net.policy_encoder.out_dim,
                                       env_spec.obs_shape[1])

            net.policy_encoder = wide().to(device)
            net.value_encoder = net.policy_encoder if net.shared else wide().to(device)
            self.optimizer = make_adam(net.parameters(), lr=params.lr, eps=params.adam_eps)
        require(params.repeat_action_penalty == 0 or env_spec.discrete, "params.repeat_action_penalty",
                params.repeat_action_penalty, "0 for continuous actions (the penalty counts repeated discrete actions)")
        self.num_envs = self.dp.local_envs(config.env.num_envs)  # this rank's envs
        self.warmed_up = params.warmup_max_steps == 0
        self.repeat_last_action = np.full(self.num_envs, -1, dtype=np.int64)
        self.repeat_run_length = np.zeros(self.num_envs, dtype=np.int64)

    def iterate(self, envs) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not self.warmed_up:  # DNA paper, Appendix A
            length = random_warmup(envs, self._act, self._random_actions, self.np_rng, self.params.warmup_max_steps,
                                   self.device, self.dp.max_int)
            warmup_steps = self.num_envs * self.dp.world_size * length
            self.steps += warmup_steps
            self.warmed_up = True
            metrics["warmup_steps"] = float(warmup_steps)
        metrics.update(super().iterate(envs))
        return metrics

    def _random_actions(self) -> np.ndarray:
        return random_actions(self.env_spec, self.num_envs, self.np_rng)

    def learning_rewards(self, rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The repeated-action penalty (DNA paper, Appendix A), as in :class:`DNA`."""
        p = self.params
        if p.repeat_action_penalty == 0:
            return rollout.rewards, {}
        rewards, self.repeat_last_action, self.repeat_run_length, fraction = penalise_repeated_actions(
            rollout.rewards, rollout, self.repeat_last_action, self.repeat_run_length, p.repeat_action_penalty,
            p.repeat_action_limit)
        return rewards, {"repeat_penalty_fraction": fraction}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(warmed_up=self.warmed_up, repeat_last_action=self.repeat_last_action.copy(),
                     repeat_run_length=self.repeat_run_length.copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.warmed_up = bool(state.get("warmed_up", True))
        if "repeat_last_action" in state:
            self.repeat_last_action = np.array(state["repeat_last_action"], dtype=np.int64, copy=True)
            self.repeat_run_length = np.array(state["repeat_run_length"], dtype=np.int64, copy=True)


_DNA = "DNA (dual network PPO): separate policy and value networks, three phases, TD(lambda) returns per task"
ALGORITHMS = {
    "dna": Entry(DNA, _DNA),
    "dna-no-distil": Entry(DNA, "DNA ablation: no distillation phase (DNA paper, Appendix C)",
                           defaults={"distil_epochs": 0},
                           preset_prefix="dna"),
    "dna-mb512": Entry(DNA, "DNA ablation: minibatch 512 for all three phases (DNA paper, Appendix C)",
                       defaults={"single_minibatch_size": 512}, preset_prefix="dna"),
    "dna-same-lambda": Entry(DNA, "DNA ablation: lambda_pi = lambda_V = 0.95 (DNA paper, Appendix C)",
                             defaults={"lambda_pi": 0.95, "lambda_v": 0.95}, preset_prefix="dna"),
    "ppo2x": Entry(PPO2x, "PPO (2x): PPO with doubled Nature-CNN channels, DNA's baseline (DNA paper, Section 5)"),
}
