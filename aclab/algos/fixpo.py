"""FixPO: a guaranteed trust region from a KL penalty and a fixup phase (Zentner, Puri et al. 2023).

For a batch collected by pi_old with GAE advantages A (no clipping anywhere in the policy loss):

    D(s)     = KL(pi_old(.|s) || pi_theta(.|s))                          exact, per state
    L_theta  = -mean(rho A) + c_VF L_VF - c_ent H + sg(beta) mean_s D(s)  (FixPO paper, Sec. 3.1)
    L_beta   = beta * sg(eps_KL - C_beta max_s D(s))                      (FixPO paper, L_beta; minibatch max)

beta is a Lagrange multiplier with its own Adam (lr gamma_beta), clamped at 0 (and optionally capped).
Algorithm (FixPO paper, Algorithm 1), for each epoch:

    1. primary phase: for each shuffled minibatch, one step on L_theta (grad-norm clip), then one on L_beta;
    2. fixup phase: pass over the whole batch in minibatches of B_fix; wherever some state has
       D(s) > eps_KL, one step on L_KL = mean_s D(s) alone (the FixPO paper's "gamma_theta L_KL + gamma_beta L_beta";
       ``fixup_loss="beta_kl"``: sg(beta) mean_s D(s), the spec's / authors' form) and one on L_beta;
       repeat full passes until a pass finds no violation.

Postcondition, checked independently after every fixup phase: ``max_s D(s) <= eps_KL`` over the whole
batch (within a float tolerance ``check_rtol``); a violation raises :class:`TrustRegionViolation`. The
run logs the max KL and the number of fixup steps of every update, and the batch's max KL *before* each
fixup phase (``kl/pre_fixup_max``), i.e. what the primary phase alone left behind.

A fixup phase that has not terminated after ``max_fixup_steps`` steps of one update falls back to the
parameters the update started from (``on_fixup_failure="revert"``): pi_old itself, whose KL to pi_old is 0,
satisfies the trust region. The update is dropped, ``fixup/fallback`` logs it and the run continues
(``"raise"``: stop with :class:`TrustRegionViolation` instead).

Return normalisation (``return_norm``): ``"off"`` uses the rewards as the env layer gives them (aclab's
reward scaler, when ``env.normalize_reward`` is on, divides the rewards, hence the advantages, by the
running std of the discounted return). ``"targets"`` is Tianshou's ``rew_norm`` (the FixPO authors'
code): the critic predicts returns divided by ``s = sqrt(var_R + 1e-8)``, GAE runs on the raw rewards
with ``s * V``, the advantages stay in raw reward units, only the critic's targets are divided by ``s``,
and ``var_R`` (a running variance of the batches' lambda-returns, no mean subtraction) is updated
after each batch's targets are formed (:func:`normalized_value_targets`).

Ablations (FixPO paper, Section 4.2) as switches: ``fixup="off"`` (no fixup phase; the check then only logs),
``kl_target="mean"`` (beta and the fixup exit use the mean KL), ``c_beta=1``, ``fixup="last_epoch"``,
constant beta (``beta_lr=0``, ``beta_init=10``). Works with any distribution with an exact KL:
categorical, diagonal Gaussian, and the Beta policy of :mod:`aclab.core.distributions_extra`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import gymnasium
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
from aclab.config import Config, require
from aclab.core import losses
from aclab.core.distributions import make_distribution
from aclab.core.distributions_extra import Beta, make_extra_distribution
from aclab.core.returns import gae
from aclab.data.rollout import RolloutCollector, valid_transitions
from aclab.envs.normalize import RunningMeanStd
from aclab.nets.agents import ActorCritic
from aclab.runs import check_stop


class TrustRegionViolation(RuntimeError):
    """FixPO's postcondition failed: after a policy update some state's KL(pi_old || pi) exceeds eps_KL
    (or the fixup phase did not terminate within ``max_fixup_steps``)."""


@dataclass
class FixPOConfig:
    """FixPO hyperparameters. Defaults: the MuJoCo setting (spec fixpo.md; 64 envs x 128 = 8192)."""

    num_steps: int = 128
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_epochs: int = 10
    minibatch_size: int = 512
    fixup_minibatch_size: int = 1024
    lr: float = 3e-4
    anneal_lr: bool = True
    adam_eps: float = 1e-5
    max_grad_norm: float = 0.5
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    clip_value_loss: bool = False
    value_clip_coef: float = 0.2
    norm_adv: Literal["off", "batch", "minibatch"] = "off"
    eps_kl: float = 0.5
    c_beta: float = 3.0
    beta_lr: float = 0.01
    beta_init: float = 1.0
    beta_max: float | None = None
    kl_target: Literal["max", "mean"] = "max"
    fixup: Literal["every_epoch", "last_epoch", "off"] = "every_epoch"
    fixup_loss: Literal["kl", "beta_kl"] = "kl"  # FixPO paper: L_KL; "beta_kl": sg(beta) L_KL (spec / authors' code)
    trust_region_check: Literal["auto", "raise", "log"] = "auto"  # auto: raise unless fixup="off"
    check_rtol: float = 1e-4
    max_fixup_steps: int = 10_000
    on_fixup_failure: Literal["revert", "raise"] = "revert"  # revert: drop the update, keep pi_old (KL = 0)
    return_norm: Literal["off", "targets"] = "off"  # targets: Tianshou's rew_norm (the authors' code)
    encoder: Literal["auto", "mlp", "nature_cnn", "impala"] = "auto"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    log_std_init: float = -0.5
    action_dist: Literal["auto", "gaussian", "beta"] = "auto"

    def validate(self) -> None:
        for key in ("num_steps", "num_epochs", "minibatch_size", "fixup_minibatch_size", "max_fixup_steps"):
            require(getattr(self, key) >= 1, f"params.{key}", getattr(self, key), "an integer >= 1")
        for key in ("gamma", "gae_lambda"):
            require(0.0 <= getattr(self, key) <= 1.0, f"params.{key}", getattr(self, key), "a number in [0, 1]")
        for key in ("lr", "adam_eps", "max_grad_norm", "eps_kl", "value_clip_coef"):
            require(getattr(self, key) > 0, f"params.{key}", getattr(self, key), "a number > 0")
        for key in ("vf_coef", "ent_coef", "beta_lr", "beta_init", "check_rtol"):
            require(getattr(self, key) >= 0, f"params.{key}", getattr(self, key), "a number >= 0")
        require(self.c_beta >= 1.0, "params.c_beta", self.c_beta, "a number >= 1 (1: the C_beta = 1 ablation)")
        require(self.beta_max is None or self.beta_max >= self.beta_init, "params.beta_max", self.beta_max,
                f"None or a number >= params.beta_init ({self.beta_init})")
        require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "params.hidden_sizes",
                self.hidden_sizes, "a non-empty list of positive integers")


# ----------------------------------------------------------------------------------------------
# Losses (pure functions on flat minibatches [N])
# ----------------------------------------------------------------------------------------------
def importance_weighted_policy_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor
) -> torch.Tensor:
    """Unclipped surrogate as a loss: ``-mean(exp(log pi - log pi_old) * A)`` (FixPO paper, L_pi)."""
    return -(torch.exp(log_probs - old_log_probs) * advantages).mean()


def squared_error_value_loss(
    values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None, clip: float | None = None
) -> torch.Tensor:
    """``mean((V - R)^2)`` (Tianshou's form, no 1/2), or its clipped version ``mean(max(., (V_clip - R)^2))``."""
    return 2.0 * losses.value_loss(values, returns, old_values, clip)


def kl_statistic(kl: torch.Tensor, target: str, dp=None) -> torch.Tensor:
    """The per-state KLs [N] reduced as FixPO constrains them: ``max`` (the paper) or ``mean`` (ablation).
    ``dp`` (an :class:`aclab.distributed.DataParallel`): over the states of every rank."""
    if target == "max":
        return kl.max() if dp is None else dp.max(kl)
    if target == "mean":
        return kl.mean() if dp is None else dp.mean(kl)
    raise ValueError(f"unknown kl_target {target!r}; expected 'max' or 'mean'")


def beta_loss(beta: torch.Tensor, kl_stat: torch.Tensor, eps_kl: float, c_beta: float) -> torch.Tensor:
    """``L_beta = beta * sg(eps_KL - C_beta * D)``: its gradient lowers beta when ``C_beta D < eps_KL``."""
    return beta * (eps_kl - c_beta * kl_stat).detach()


def primary_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, value_loss: torch.Tensor,
    entropy: torch.Tensor, kl: torch.Tensor, beta: torch.Tensor, vf_coef: float, ent_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_theta = L_pi + c_VF L_VF - c_ent mean H + sg(beta) mean D``; returns (L_theta, L_pi).

    entropy and kl are per state [N]; beta a scalar (its gradient is stopped here).
    """
    policy_loss = importance_weighted_policy_loss(log_probs, old_log_probs, advantages)
    total = policy_loss + vf_coef * value_loss - ent_coef * entropy.mean() + beta.detach() * kl.mean()
    return total, policy_loss


RETURN_NORM_EPS = 1e-8  # Tianshou's PGPolicy._eps


def return_scale(return_rms: RunningMeanStd) -> float:
    """``s = sqrt(var_R + 1e-8)``: the critic's unit under ``return_norm="targets"`` (Tianshou's ret_rms)."""
    return float(np.sqrt(float(return_rms.var) + RETURN_NORM_EPS))


def normalized_value_targets(
    rewards: torch.Tensor, critic_values: torch.Tensor, discounts: torch.Tensor, gae_lambda: float,
    episode_ends: torch.Tensor, valid: torch.Tensor, return_rms: RunningMeanStd,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tianshou's ``rew_norm`` (A2CPolicy._compute_returns): target-only return normalisation.

    rewards, discounts, episode_ends, valid: [T, B] (raw rewards); critic_values: [T + 1, B], the
    critic's outputs in normalised units. With ``s = sqrt(var_R + eps)`` of ``return_rms`` *before* this
    batch: ``A = GAE(r, s V)`` (raw reward units, not rescaled), ``R = A + s V[:-1]`` and the critic's
    targets ``R / s``; then ``return_rms`` absorbs the valid ``R`` (no mean subtraction, as Tianshou).
    Returns (advantages [T, B], targets [T, B]).
    """
    scale = return_scale(return_rms)
    values = critic_values * scale
    advantages = gae(rewards, values, discounts, gae_lambda, episode_ends=episode_ends)
    returns = advantages + values[:-1]
    return_rms.update(returns[valid].double().cpu().numpy())
    return advantages, returns / scale


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
def build_distribution(kind: str, action_space):
    """The policy distribution for ``params.action_dist``: auto (categorical / diagonal Gaussian) or beta."""
    if kind == "beta":
        return make_extra_distribution(action_space, "beta")
    if kind == "gaussian":
        require(isinstance(action_space, gymnasium.spaces.Box), "params.action_dist", kind,
                "'auto' for discrete actions")
    return make_distribution(action_space)


class FixPO:
    Config = FixPOConfig
    DATA_PARALLEL = True  # torchrun: several ranks, see aclab.distributed

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: FixPOConfig = config.params
        p = self.params
        self.device = device
        self.env_spec = env_spec
        self.dist = build_distribution(p.action_dist, env_spec.action_space)
        self.net = ActorCritic(env_spec.obs_shape, self.dist, encoder=p.encoder, hidden_sizes=p.hidden_sizes,
                               activation=p.activation, shared=False, log_std_init=p.log_std_init,
                               state_dependent_std=isinstance(self.dist, Beta)).to(device)
        self.optimizer = make_adam(self.net.parameters(), lr=p.lr, eps=p.adam_eps)
        self.beta = nn.Parameter(torch.tensor(float(p.beta_init), device=device))
        self.beta_optimizer = make_adam([self.beta], lr=p.beta_lr)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.dp = distributed.current()  # several ranks: each steps num_envs / world_size envs
        self.batch_size = config.env.num_envs * p.num_steps
        self.num_iterations = max(config.total_steps // self.batch_size, 1)
        self.raise_on_violation = p.trust_region_check == "raise" or (
            p.trust_region_check == "auto" and p.fixup != "off")
        self.steps = 0
        self.iteration = 0
        self.total_primary_steps = 0
        self.total_fixup_steps = 0
        self.total_fallbacks = 0
        self.total_updates_with_fixup = 0
        self.return_rms = RunningMeanStd()
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        dist_params, value = self.net(obs)
        actions = self.dist.sample(dist_params, self.generator)
        log_probs = self.dist.log_prob(dist_params, actions)
        return tuple(x.cpu().numpy() for x in (actions, log_probs, value, dist_params))

    @torch.no_grad()
    def _value(self, obs: torch.Tensor) -> np.ndarray:
        return self.net.value(obs).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        dist_params = self.net.dist_params(torch.as_tensor(obs, device=self.device))
        return policy_actions(self.dist, dist_params, deterministic, self.generator)

    # ------------------------------------------------------------------ one iteration
    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        if self._collector is None:
            self._collector = RolloutCollector(envs, p.num_steps, self.dist.param_dim, self.device)
        if p.anneal_lr:
            lr = linear_schedule(p.lr, 0.0, self.iteration / self.num_iterations)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.net.eval()
        rollout, episode_returns, episode_lengths = self._collector.collect(envs, self._act, self._value)
        self.net.train()
        with torch.no_grad():
            discounts = rollout.discounts(p.gamma)
            if p.return_norm == "targets":
                advantages, returns = normalized_value_targets(
                    rollout.rewards, rollout.values, discounts, p.gae_lambda, rollout.ends, rollout.valid,
                    self.return_rms)
            else:
                advantages = gae(rollout.rewards, rollout.values, discounts, p.gae_lambda, episode_ends=rollout.ends)
                returns = advantages + rollout.values[:-1]
        metrics = self.update(rollout, advantages, returns)
        if p.return_norm == "targets":
            metrics["return_norm/std"] = return_scale(self.return_rms)
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def update(self, rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """Primary and fixup phases on one rollout; advantages and returns [T, B]; valid transitions only."""
        p = self.params
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_params=rollout.dist_params,
                                  old_values=rollout.values[:-1], advantages=advantages, returns=returns)
        if p.norm_adv == "batch":
            batch["advantages"] = self.dp.normalize(batch["advantages"])
        num_minibatches = max(self.batch_size // p.minibatch_size, 1)
        value_clip = p.value_clip_coef if p.clip_value_loss else None
        parameters = list(self.net.parameters())
        snapshot = self._snapshot() if p.fixup != "off" and p.on_fixup_failure == "revert" else None
        stats = []
        fixup_steps = 0
        fallback = False
        pre_fixup: list[float] = []
        checks: list[tuple[float, float]] = []
        for epoch in range(p.num_epochs):
            for mb in self.dp.minibatches(batch, num_minibatches, self.generator, rollout.valid):
                dist_params, values = self.net(mb["obs"])
                log_probs = self.dist.log_prob(dist_params, mb["actions"])
                kl = self.dist.kl(mb["old_params"], dist_params)
                entropy = self.dist.entropy(dist_params)
                advantages = self.dp.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                value_loss = squared_error_value_loss(values, mb["returns"], mb["old_values"], value_clip)
                loss, policy_loss = primary_loss(log_probs, mb["old_log_probs"], advantages, value_loss, entropy, kl,
                                                 self.beta, p.vf_coef, p.ent_coef)
                grad_norm = self._theta_step(loss, parameters, mb.weight)
                self._beta_step(kl_statistic(kl.detach(), p.kl_target, self.dp))
                if mb.weight:  # a rank holding none of this minibatch (several ranks) adds no row
                    stats.append(torch.stack([policy_loss.detach(), value_loss.detach(), entropy.detach().mean(),
                                              kl.detach().mean(), kl.detach().max(), grad_norm]))
            if p.fixup == "every_epoch" or (p.fixup == "last_epoch" and epoch == p.num_epochs - 1):
                pre_fixup.append(float(self.dp.max(self.batch_kl(batch))))
                steps, terminated = self._fixup_phase(batch, fixup_steps, rollout.valid)
                fixup_steps += steps
                if not terminated:
                    if snapshot is None:
                        raise TrustRegionViolation(
                            f"FixPO fixup phase did not terminate within max_fixup_steps={p.max_fixup_steps} "
                            f"(iteration {self.iteration}, beta={float(self.beta.detach()):.4g}); "
                            "params.on_fixup_failure='revert' keeps pi_old instead")
                    self._restore(snapshot)  # pi_old: KL(pi_old || pi_old) = 0 satisfies the trust region
                    fallback = True
                checks.append(self._check_trust_region(batch))
                if fallback:
                    break
        if p.fixup == "off":
            checks.append(self._check_trust_region(batch))
        names = ["loss/policy", "loss/value", "entropy", "kl/mean_primary", "kl/max_primary", "grad_norm"]
        table = torch.stack(stats)
        check_finite(dict(zip(names, table.sum(0))) | {"beta": self.beta.detach()}, f"FixPO update {self.iteration}")
        primary_steps = len(stats)
        self.total_primary_steps += primary_steps
        self.total_fixup_steps += fixup_steps
        self.total_fallbacks += int(fallback)
        self.total_updates_with_fixup += int(fixup_steps > 0)
        metrics = dict(zip(names, table.mean(0).tolist()))
        metrics["kl/max_primary"] = float(table[:, 4].max())
        metrics["beta"] = float(self.beta.detach())
        metrics["fixup/steps"] = float(fixup_steps)
        metrics["fixup/primary_steps"] = float(primary_steps)
        metrics["fixup/overhead_percent"] = 100.0 * fixup_steps / primary_steps
        metrics["fixup/overhead_percent_total"] = 100.0 * self.total_fixup_steps / max(self.total_primary_steps, 1)
        metrics["fixup/needed"] = float(fixup_steps > 0)
        metrics["fixup/needed_total"] = float(self.total_updates_with_fixup)
        metrics["fixup/fallback"] = float(fallback)
        metrics["fixup/fallbacks_total"] = float(self.total_fallbacks)
        if pre_fixup:
            metrics["kl/pre_fixup_max"] = max(pre_fixup)
            metrics["kl/pre_fixup_violations"] = float(sum(k > p.eps_kl for k in pre_fixup))
        metrics["trust_region/max_kl"] = max(c[0] for c in checks)
        metrics["trust_region/final_max_kl"] = checks[-1][0]
        metrics["trust_region/final_mean_kl"] = checks[-1][1]
        metrics["trust_region/violations"] = float(sum(self._violates(*c) for c in checks))
        with torch.no_grad():
            ret, old_values = batch["returns"], batch["old_values"]
            var_returns = ret.var()
            explained = 1.0 - (ret - old_values).var() / var_returns if var_returns > 0 else torch.nan
        metrics["explained_variance"] = float(explained)
        return metrics

    def _snapshot(self) -> dict:
        """The network and its optimiser before an update (pi_old), to fall back to."""
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _restore(self, snapshot: dict) -> None:
        self.net.load_state_dict(snapshot["net"])
        self.optimizer.load_state_dict(snapshot["optimizer"])

    def _theta_step(self, loss: torch.Tensor, parameters: list[torch.Tensor], weight: float = 1.0) -> torch.Tensor:
        """One Adam step on ``loss`` (``weight``: this rank's share of the minibatch)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.dp.backward(loss, parameters, weight)
        grad_norm = clip_grad_norm(parameters, self.params.max_grad_norm)
        adam_step(self.optimizer)
        return grad_norm

    def _beta_step(self, kl_stat: torch.Tensor) -> None:
        """One Adam step on L_beta, then beta <- clamp(beta, 0, beta_max). No step when gamma_beta = 0."""
        p = self.params
        if p.beta_lr == 0:
            return
        self.beta_optimizer.zero_grad(set_to_none=True)
        beta_loss(self.beta, kl_stat, p.eps_kl, p.c_beta).backward()
        self.beta_optimizer.step()
        with torch.no_grad():
            self.beta.clamp_(min=0.0, max=p.beta_max)

    def _fixup_phase(self, batch: dict[str, torch.Tensor], steps_so_far: int,
                     valid: torch.Tensor | None = None) -> tuple[int, bool]:
        """Repeat passes over the batch (minibatches of B_fix, shuffled); step on mean D (or sg(beta) mean D)
        and on L_beta wherever the constraint is violated; stop after a clean pass. Returns (the steps taken,
        whether it terminated: False once the update's steps reach ``max_fixup_steps``)."""
        p = self.params
        states = {"obs": batch["obs"], "old_params": batch["old_params"]}
        parameters = list(self.net.parameters())
        steps = 0
        while True:
            clean = True
            for chunk in self.dp.chunks(states, p.fixup_minibatch_size, self.generator, valid):
                check_stop()
                kl = self.dist.kl(chunk["old_params"], self.net.dist_params(chunk["obs"]))
                stat = kl_statistic(kl.detach(), p.kl_target, self.dp)
                if float(stat) <= p.eps_kl:  # one host sync per minibatch: the exit test needs it
                    continue
                clean = False
                fixup_loss = kl.mean() if p.fixup_loss == "kl" else self.beta.detach() * kl.mean()
                self._theta_step(fixup_loss, parameters, chunk.weight)
                self._beta_step(stat)
                steps += 1
                if steps_so_far + steps >= p.max_fixup_steps:
                    return steps, False
            if clean:
                return steps, True

    @torch.no_grad()
    def batch_kl(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(pi_old(.|s) || pi(.|s)) [N] for every state of the batch (chunks of B_fix, in order)."""
        size = self.params.fixup_minibatch_size
        obs, old = batch["obs"], batch["old_params"]
        return torch.cat([self.dist.kl(old[i:i + size], self.net.dist_params(obs[i:i + size]))
                          for i in range(0, obs.shape[0], size)])

    def _violates(self, max_kl: float, mean_kl: float) -> bool:
        p = self.params
        stat = max_kl if p.kl_target == "max" else mean_kl
        return stat > p.eps_kl * (1.0 + p.check_rtol)

    def _check_trust_region(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """The postcondition, recomputed independently of the fixup loop: (max KL, mean KL) over the batch."""
        kl = self.batch_kl(batch)
        max_kl, mean_kl = float(self.dp.max(kl)), float(self.dp.mean(kl))
        if self.raise_on_violation and self._violates(max_kl, mean_kl):
            p = self.params
            raise TrustRegionViolation(
                f"FixPO trust region violated after the update of iteration {self.iteration}: "
                f"{p.kl_target} KL(pi_old || pi) over the batch = {max_kl if p.kl_target == 'max' else mean_kl:.6g} "
                f"> eps_kl = {p.eps_kl} (max {max_kl:.6g}, mean {mean_kl:.6g}, {kl.numel()} states)")
        return max_kl, mean_kl

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "beta": self.beta.detach().clone(),
            "beta_optimizer": self.beta_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "iteration": self.iteration,
            "total_primary_steps": self.total_primary_steps,
            "total_fixup_steps": self.total_fixup_steps,
            "total_fallbacks": self.total_fallbacks,
            "total_updates_with_fixup": self.total_updates_with_fixup,
            "return_rms": self.return_rms.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.beta.copy_(state["beta"])
        self.beta_optimizer.load_state_dict(state["beta_optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.total_primary_steps = int(state["total_primary_steps"])
        self.total_fixup_steps = int(state["total_fixup_steps"])
        self.total_fallbacks = int(state.get("total_fallbacks", 0))
        self.total_updates_with_fixup = int(state.get("total_updates_with_fixup", 0))
        if "return_rms" in state:
            self.return_rms.load_state_dict(state["return_rms"])


_FIXPO = "FixPO: KL-penalised surrogate with a Lagrange-multiplier beta and a fixup phase (guaranteed trust region)"
ALGORITHMS = {
    "fixpo": Entry(FixPO, _FIXPO),
    "fixpo-no-fixup": Entry(FixPO, "FixPO ablation: no fixup phase (FixPO paper, Section 4.2)",
                            defaults={"fixup": "off"}, preset_prefix="fixpo"),
    "fixpo-mean-kl": Entry(FixPO, "FixPO ablation: limit the mean KL instead of the max (FixPO paper, Section 4.2)",
                           defaults={"kl_target": "mean"}, preset_prefix="fixpo"),
    "fixpo-cbeta1": Entry(FixPO, "FixPO ablation: C_beta = 1, the Lagrangian optimum on the boundary "
                          "(FixPO paper, Section 4.2)",
                          defaults={"c_beta": 1.0}, preset_prefix="fixpo"),
    "fixpo-last-epoch-fixup": Entry(FixPO, "FixPO ablation: fixup phase only after the last epoch "
                                    "(FixPO paper, Section 4.2)",
                                    defaults={"fixup": "last_epoch"}, preset_prefix="fixpo"),
    "fixpo-const-beta": Entry(FixPO, "FixPO ablation: constant beta = 10, gamma_beta = 0 (FixPO paper, Section 4.2)",
                              defaults={"beta_lr": 0.0, "beta_init": 10.0}, preset_prefix="fixpo"),
}
