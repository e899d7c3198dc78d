"""Phasic Policy Gradient (Cobbe et al. 2021) as in DCPG paper, Algorithm 1 and Table 3, with PPG+DR,
PPG+AR (DCPG paper, Appendix B) and DPPG (PPG + the dynamics loss, DCPG paper, F.2, Table 9).

Networks: the policy network pi_theta (torso + policy head + auxiliary value head V_theta_aux) and a
separate value network V_phi (own torso + value head); built by PPO's builder with separate networks,
plus the auxiliary head on the policy torso's features.

Phases (one :meth:`PPG.iterate` = one policy-phase iteration; every ``N_pi``-th also runs the
auxiliary phase)::

    policy phase (each iteration):
        collect a rollout with pi_theta; A = GAE(gamma, lambda) with V_phi; R_hat = A + V_phi
        (PPG+DR: R_hat = GAE(gamma', lambda) + V_phi, gamma' < gamma)         -- computed once, stored
        E_pi / E_V epochs over shuffled minibatches:
            L = L_clip(pi_theta) - c_e H + c_v J_V(phi),  J_V = 0.5 (V_phi - R_hat)^2 (+ alpha V_phi^2, AR)
        add (s, R_hat) to B
    auxiliary phase (every N_pi iterations), pi_old = pi_theta at the end of the policy phases:
        E_aux epochs over B in minibatches of whole env trajectories:
            L = 0.5 (V_theta_aux - R_hat)^2 + beta_pi KL(pi_old || pi_theta) + J_V(phi) (+ beta_f L_f, DPPG)
        empty B

With ``aux_epochs = 0`` nothing is buffered and PPG is PPO with separate networks, one epoch, whole-rollout
advantage normalisation and an unclipped value loss (tested bit for bit against :mod:`aclab.algos.ppo`).
Two Adam optimisers (policy phase, auxiliary phase), global grad-norm clipping in both (authors' code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aclab import distributed
from aclab.algos.common import Entry, adam_step, check_finite, clip_grad_norm, make_adam, policy_actions
from aclab.algos.phasic import (
    DynamicsModel,
    PhasicConfig,
    TrainingAnalyses,
    anneal_learning_rates,
    build_actor_critic,
    canonical_action_map,
    dist_params_over_buffer,
    half_squared_error,
    make_aux_buffer,
    masked_mean,
    mean_kl_over_buffer,
    policy_feature_dim,
    state_rows,
    trajectory_dynamics_loss,
)
from aclab.config import Config, require
from aclab.core import losses
from aclab.core.returns import gae
from aclab.data.rollout import RolloutCollector, valid_transitions
from aclab.nets.agents import FusedMLPActorCritic
from aclab.nets.encoders import init_linear
from aclab.nets.numpy_policy import NumpyActorCritic


@dataclass
class PPGConfig(PhasicConfig):
    """PPG hyperparameters (see :class:`aclab.algos.phasic.PhasicConfig`) plus the explicit value
    regularisers of DCPG paper, Appendix B (our reading of Amit, Meir & Ciosek 2020):

    PPG+DR: the value targets R_hat use a discount gamma' < gamma (advantages keep ``gamma``), given as
    ``value_gamma`` or, when that is None, derived from ``gamma`` by ``value_horizon_ratio`` rho: the
    effective horizon ``1 / (1 - gamma')`` is rho times ``1 / (1 - gamma)``, i.e.
    ``gamma' = 1 - (1 - gamma) / rho`` (:func:`discount_regularised_gamma`). ``ppg-dr`` uses rho = 0.2, the
    paper's 1000 -> 200 steps (gamma = 0.999 -> gamma' = 0.995, DCPG paper, Appendix B; gamma = 0.99 ->
    0.95). Both None: plain PPG. ``value_reg_coef`` (PPG+AR): alpha in ``J_V + alpha E[V_phi(s)^2]``, in
    both phases.
    """

    value_gamma: float | None = None
    value_horizon_ratio: float | None = None
    value_reg_coef: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.value_gamma is None or 0.0 <= self.value_gamma < self.gamma, "params.value_gamma",
                self.value_gamma, f"a number in [0, gamma = {self.gamma}) or None (discount regularisation "
                "needs gamma' < gamma)")
        require(self.value_horizon_ratio is None or 0.0 < self.value_horizon_ratio < 1.0,
                "params.value_horizon_ratio", self.value_horizon_ratio, "a number in (0, 1) or None")
        if self.value_gamma is None and self.value_horizon_ratio is not None:
            gamma_prime = discount_regularised_gamma(self.gamma, self.value_horizon_ratio)
            require(0.0 <= gamma_prime < self.gamma, "params.value_horizon_ratio", self.value_horizon_ratio,
                    f"a ratio giving gamma' = 1 - (1 - gamma) / ratio in [0, gamma) for gamma = {self.gamma} "
                    f"(got gamma' = {gamma_prime:.6g})")
        require(self.value_reg_coef >= 0, "params.value_reg_coef", self.value_reg_coef, "a number >= 0")

    def target_gamma(self) -> float:
        """The discount of the value targets: ``value_gamma``, else derived by ``value_horizon_ratio``,
        else ``gamma``."""
        if self.value_gamma is not None:
            return self.value_gamma
        if self.value_horizon_ratio is not None:
            return discount_regularised_gamma(self.gamma, self.value_horizon_ratio)
        return self.gamma


def discount_regularised_gamma(gamma: float, horizon_ratio: float) -> float:
    """PPG+DR's gamma' with an effective horizon ``horizon_ratio`` times that of ``gamma``:
    ``1 / (1 - gamma') = horizon_ratio / (1 - gamma)``, so ``gamma' = 1 - (1 - gamma) / horizon_ratio``
    (DCPG paper, Appendix B: 0.999 -> 0.995 is ratio 0.2)."""
    return 1.0 - (1.0 - gamma) / horizon_ratio


class PPG:
    Config = PPGConfig
    DATA_PARALLEL = True  # torchrun: several ranks, see aclab.distributed

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: PPGConfig = config.params
        p = self.params
        self.device = device
        self.env_spec = env_spec
        require(p.dynamics == "off" or env_spec.discrete, "params.dynamics", p.dynamics,
                "'off' for continuous actions (the discriminator one-hot encodes discrete actions)")
        # pi_theta and V_phi (separate torsos), created exactly as PPO creates its separate networks
        self.net = build_actor_critic(p, env_spec, shared=False).to(device)
        self.dist = self.net.dist
        feature_dim = policy_feature_dim(self.net)
        self.aux_value_head = init_linear(nn.Linear(feature_dim, 1), gain=1.0).to(device)
        self.dynamics = None
        if p.dynamics != "off":
            canonical = (canonical_action_map(config.env.id, config.env.options, env_spec.num_actions)
                         if p.dynamics_negatives == "canonical" else None)
            self.dynamics = DynamicsModel(p.dynamics, feature_dim, env_spec.num_actions, p.dynamics_hidden_sizes,
                                          p.dynamics_eta, canonical).to(device)
        self.policy_optimizer = make_adam(self.net.parameters(), lr=p.lr, eps=p.adam_eps)
        aux_parameters = [*self.net.parameters(), *self.aux_value_head.parameters()]
        if self.dynamics is not None:
            aux_parameters += list(self.dynamics.parameters())
        self.aux_lr = p.aux_lr if p.aux_lr is not None else p.lr
        self.aux_optimizer = make_adam(aux_parameters, lr=self.aux_lr, eps=p.adam_eps)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.numpy_actor = None
        use_numpy = p.acting == "numpy" or (p.acting == "auto" and device.type == "cpu" and config.env.num_envs <= 64)
        if use_numpy and isinstance(self.net, FusedMLPActorCritic) and device.type == "cpu":
            self.numpy_actor = NumpyActorCritic(self.net)
        self.np_rng = np.random.default_rng(config.seed)
        self.dp = distributed.current()  # several ranks: each steps num_envs / world_size envs
        num_envs = config.env.num_envs
        local_envs = self.dp.local_envs(num_envs)
        self.batch_size = num_envs * p.num_steps
        self.num_iterations = max(config.total_steps // self.batch_size, 1)
        self.aux_envs_per_minibatch = max(num_envs // p.aux_num_minibatches, 1)
        self.forward_chunk = max(self.batch_size // p.num_minibatches, 1)
        self.buffer = None
        if p.aux_epochs > 0:
            fields = {"returns": ((), torch.float32), "old_params": ((self.dist.param_dim,), torch.float32)}
            if self.dynamics is not None:
                fields["actions"] = ((), torch.int64)
                if p.dynamics_resets == "authors":
                    fields["ends"] = ((), torch.bool)
            self.buffer = make_aux_buffer(p, env_spec, local_envs, device, fields)
        self.analyses = TrainingAnalyses(p, local_envs, ["value"], config.seed)
        self.steps = 0
        self.iteration = 0
        self.num_aux_phases = 0
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        """Behaviour policy for the collector: NumPy (actions, log_probs, V_phi values, dist_params)."""
        if self.numpy_actor is not None:
            return self.numpy_actor.act(obs.numpy(), self.np_rng)
        params, value = self.net(obs)
        actions = self.dist.sample(params, self.generator)
        log_probs = self.dist.log_prob(params, actions)
        return tuple(x.cpu().numpy() for x in (actions, log_probs, value, params))

    @torch.no_grad()
    def _value(self, obs: torch.Tensor) -> np.ndarray:
        if self.numpy_actor is not None:
            return self.numpy_actor.forward(obs.numpy())[1]
        return self.net.value(obs).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        params = self.net.dist_params(torch.as_tensor(obs, device=self.device))
        return policy_actions(self.dist, params, deterministic, self.generator)

    # ------------------------------------------------------------------ analysis hooks
    def value_functions(self) -> dict[str, nn.Module]:
        """Critics by name, each with ``.value(obs [N, ...]) -> [N]``: V_phi."""
        return {"value": self.net}

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Policy-torso features [N, F] (the discriminator's phi)."""
        return self.net.forward_with_features(obs)[2]

    # ------------------------------------------------------------------ one iteration
    def _collector_for(self, envs) -> RolloutCollector:
        if self._collector is None:
            self._collector = RolloutCollector(envs, self.params.num_steps, self.dist.param_dim, self.device)
        return self._collector

    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        if p.anneal_lr:
            anneal_learning_rates([self.policy_optimizer, self.aux_optimizer], [p.lr, self.aux_lr], self.iteration,
                                  self.num_iterations)
        # ---- policy phase: one rollout, R_hat computed once
        self.net.eval()
        rollout, episode_returns, episode_lengths = self._collector_for(envs).collect(envs, self._act, self._value)
        self.net.train()
        next_obs = torch.as_tensor(envs.obs)
        with torch.no_grad():
            advantages = gae(rollout.rewards, rollout.values, rollout.discounts(p.gamma), p.gae_lambda,
                             episode_ends=rollout.ends)
            targets = advantages + rollout.values[:-1]
            gamma_prime = p.target_gamma()
            if gamma_prime != p.gamma:  # PPG+DR
                targets = gae(rollout.rewards, rollout.values, rollout.discounts(gamma_prime), p.gae_lambda,
                              episode_ends=rollout.ends) + rollout.values[:-1]
        metrics: dict[str, float] = {}
        if self.analyses.enabled:
            metrics.update(self.analyses.value_bias(rollout, {"value": rollout.values}))
            metrics.update(self.analyses.stiffness(self.iteration, self.value_functions(), rollout.obs,
                                                   {"value": targets}, rollout.valid))
        metrics.update(self.policy_phase(rollout, advantages, targets))
        if self.buffer is not None:
            extra = {"actions": rollout.actions} if self.dynamics is not None else {}
            if "ends" in self.buffer.fields:
                extra["ends"] = rollout.ends
            self.buffer.add(rollout.obs, next_obs, rollout.valid, returns=targets, **extra)
            # ---- auxiliary phase every N_pi policy iterations
            if self.buffer.full:
                metrics.update(self.auxiliary_phase())
                self.buffer.clear()
        if self.numpy_actor is not None:
            self.numpy_actor.sync()
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        metrics["lr"] = self.policy_optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def policy_phase(self, rollout, advantages: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """E_pi epochs of ``L_clip - c_e H`` on pi_theta and E_V epochs of ``c_v J_V`` on V_phi, on the same
        shuffled minibatches of the rollout's valid transitions (Algorithm 1, lines 5-7)."""
        p = self.params
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_values=rollout.values[:-1],
                                  advantages=advantages, returns=targets)
        if p.norm_adv == "batch":
            batch["advantages"] = self.dp.normalize(batch["advantages"])
        params_list = list(self.net.parameters())
        stats = []
        for epoch in range(max(p.policy_epochs, p.value_epochs)):
            train_policy, train_value = epoch < p.policy_epochs, epoch < p.value_epochs
            for mb in self.dp.minibatches(batch, p.num_minibatches, self.generator, rollout.valid):
                dist_params, values = self.net(mb["obs"])
                log_probs = self.dist.log_prob(dist_params, mb["actions"])
                mb_adv = self.dp.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                pg_loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(
                    log_probs, mb["old_log_probs"], mb_adv, p.clip_coef)
                v_loss = losses.value_loss(values, mb["returns"])
                activation = values.square().mean()
                if p.value_reg_coef > 0:  # PPG+AR
                    v_loss = v_loss + p.value_reg_coef * activation
                entropy = self.dist.entropy(dist_params).mean()
                if train_policy and train_value:
                    loss = pg_loss + p.vf_coef * v_loss - p.ent_coef * entropy
                elif train_policy:
                    loss = pg_loss - p.ent_coef * entropy
                else:
                    loss = p.vf_coef * v_loss
                self.policy_optimizer.zero_grad(set_to_none=True)
                self.dp.backward(loss, params_list, mb.weight)
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.policy_optimizer)
                if mb.weight:  # a rank holding none of this minibatch (several ranks) adds no row
                    stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach(), approx_kl,
                                              clip_frac, grad_norm, activation.detach()]))
        table = torch.stack(stats)
        names = ["loss/policy", "loss/value", "entropy", "approx_kl", "clip_fraction", "grad_norm",
                 "value_activation"]
        check_finite(dict(zip(names, table.sum(0))), f"PPG policy phase {self.iteration}")
        with torch.no_grad():
            ret, old_values = batch["returns"], batch["old_values"]
            var_returns = ret.var()
            explained = 1.0 - (ret - old_values).var() / var_returns if var_returns > 0 else torch.nan
        out = dict(zip(names, table.mean(0).tolist()))
        out["explained_variance"] = float(explained)
        return out

    def auxiliary_phase(self) -> dict[str, float]:
        """E_aux epochs over the buffer in minibatches of whole env trajectories (Algorithm 1, lines 10-12):
        ``0.5 (V_aux - R_hat)^2 + beta_pi KL(pi_old || pi_theta) + J_V(phi)`` (+ ``beta_f L_f`` for DPPG)."""
        p = self.params
        buffer = self.buffer
        dist_params_over_buffer(self.net.dist_params, buffer, "old_params", self.forward_chunk, self.device)
        names = ("returns", "old_params") + (("actions",) if self.dynamics is not None else ())
        names += ("ends",) if "ends" in buffer.fields else ()
        params_list = [q for group in self.aux_optimizer.param_groups for q in group["params"]]
        stats = []
        for _epoch in range(p.aux_epochs):
            for ids in self.dp.trajectory_minibatches(buffer, self.aux_envs_per_minibatch, self.generator):
                mb = buffer.gather(ids, names, self.device, with_next_obs=self.dynamics is not None)
                weight = self.dp.share(mb["valid"].sum())  # the losses are means over valid states
                loss, parts = self.aux_loss(mb) if ids.numel() else (None, None)
                self.aux_optimizer.zero_grad(set_to_none=True)
                self.dp.backward(loss, params_list, weight)
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.aux_optimizer)
                if parts is not None:
                    stats.append(torch.cat([parts, grad_norm.reshape(1)]))
        table = torch.stack(stats)
        names = ["aux/aux_value_loss", "aux/value_loss", "aux/kl", "aux/dynamics_loss", "aux/dynamics_accuracy",
                 "aux/grad_norm"]
        check_finite(dict(zip(names, table.sum(0))), f"PPG auxiliary phase {self.num_aux_phases}")
        out = dict(zip(names, table.mean(0).tolist()))
        if self.dynamics is None:
            del out["aux/dynamics_loss"], out["aux/dynamics_accuracy"]
        out["aux/kl_after"] = mean_kl_over_buffer(self.net.dist_params, self.dist, buffer, "old_params",
                                                  self.forward_chunk, self.device)
        self.last_aux_phase_stats = table
        self.num_aux_phases += 1
        return out

    def aux_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one auxiliary minibatch of ``n`` whole trajectories (see :meth:`AuxBuffer.gather`) and its
        detached parts ``[J_aux, J_V(phi), KL(pi_old || pi_theta), L_f, discriminator accuracy]``, each a mean
        over the valid states (transitions for ``L_f``)."""
        p = self.params
        n, T = mb["valid"].shape
        dist_params, values, features = self.net.forward_with_features(mb["obs"].flatten(0, 1))
        aux_values = state_rows(self.aux_value_head(features).squeeze(-1), n, T)
        values = state_rows(values, n, T)
        mask = mb["valid"].reshape(-1)
        returns = mb["returns"].reshape(-1)
        aux_value_loss = masked_mean(half_squared_error(aux_values, returns), mask)
        value_loss = masked_mean(half_squared_error(values, returns), mask)
        if p.value_reg_coef > 0:  # PPG+AR
            value_loss = value_loss + p.value_reg_coef * masked_mean(values.square(), mask)
        kl = masked_mean(self.dist.kl(mb["old_params"].reshape(n * T, -1), state_rows(dist_params, n, T)), mask)
        loss = aux_value_loss + value_loss + p.clone_coef * kl
        dyn_loss = dyn_accuracy = torch.zeros((), device=self.device)
        if self.dynamics is not None:  # DPPG
            dyn_loss, dyn_accuracy = trajectory_dynamics_loss(self.dynamics, features.view(n, T + 1, -1),
                                                              mb["actions"], mb["valid"], p.dynamics_resets,
                                                              self.generator, mb.get("ends"))
            loss = loss + p.dynamics_coef * dyn_loss
        parts = torch.stack([aux_value_loss.detach(), value_loss.detach(), kl.detach(), dyn_loss.detach(),
                             dyn_accuracy])
        return loss, parts

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "aux_value_head": self.aux_value_head.state_dict(),
            "dynamics": None if self.dynamics is None else self.dynamics.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "steps": self.steps,
            "iteration": self.iteration,
            "num_aux_phases": self.num_aux_phases,
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "analyses": self.analyses.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.aux_value_head.load_state_dict(state["aux_value_head"])
        if self.dynamics is not None:
            self.dynamics.load_state_dict(state["dynamics"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.generator.set_state(state["generator"])
        self.np_rng.bit_generator.state = state["np_rng"]
        if self.numpy_actor is not None:
            self.numpy_actor.sync()
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.num_aux_phases = int(state["num_aux_phases"])
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        self.analyses.load_state_dict(state["analyses"])


ALGORITHMS = {
    "ppg": Entry(PPG, "Phasic Policy Gradient (DCPG paper, Algorithm 1, Table 3)"),
    "ppg-dr": Entry(PPG, "PPG with discount regularisation: value targets with gamma' = 1 - (1 - gamma) / 0.2 "
                         "(0.995 at gamma 0.999; DCPG paper, App. B)",
                    defaults={"value_horizon_ratio": 0.2}, preset_prefix="ppg"),
    "ppg-ar": Entry(PPG, "PPG with activation regularisation alpha E[V^2], alpha = 0.05 (DCPG paper, App. B)",
                    defaults={"value_reg_coef": 0.05}, preset_prefix="ppg"),
    "dppg": Entry(PPG, "PPG + DDCPG's dynamics discriminator on the policy torso (DCPG paper, F.2, Table 9)",
                  defaults={"dynamics": "joint", "dynamics_eta": 0.5}, preset_prefix="ppg"),
}
