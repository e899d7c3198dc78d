"""Delayed-Critic Policy Gradient (Moon, Lee & Song 2022), Separate DCPG (DCPG paper, Algorithm 2), DDCPG and
its ablations DCPG+F, DCPG+I, DCPG+FI (DCPG paper, F.2, Tables 5-8).

Network: one shared torso with a policy head and a value head V_theta (PPO's shared actor-critic).
Separate DCPG adds a value network V_phi with its own torso, used for the advantages.

Phases (one :meth:`DCPG.iterate` = one policy-phase iteration; every ``N_pi``-th also runs the
auxiliary phase)::

    policy phase (each iteration):
        collect a rollout; V_old = V_theta at rollout time; A = GAE(gamma, lambda) with V_theta (Separate
        DCPG: with V_phi); R_hat = A + V                                       -- computed once, stored
        E_pi epochs over shuffled minibatches:
            L = L_clip - c_e H + beta_V C_V,   C_V = 0.5 E[(V_theta(s) - sg(V_old(s)))^2]
        (no regression of V_theta to the returns here: C_V only anchors the value head while the shared
        torso moves; its gradient reaches head and torso. Separate DCPG adds c_v J_V(phi) for E_V epochs.)
        add (s, R_hat) to B
    auxiliary phase (every N_pi iterations), pi_old = the policy at the end of the policy phases:
        E_aux epochs over B in minibatches of whole env trajectories:
            L = 0.5 (V_theta - R_hat)^2 + beta_pi KL(pi_old || pi_theta)  (+ J_V(phi), + beta_f L_f)
        empty B

V_old is the stored rollout-time prediction, never recomputed with the current network (that would
make C_V identically zero). Two Adam optimisers, global grad-norm clipping (authors' code).
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
    ValueNetwork,
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


@dataclass
class DCPGConfig(PhasicConfig):
    """DCPG hyperparameters (see :class:`aclab.algos.phasic.PhasicConfig`; Table 3 values) plus

    ``value_anchor_coef``: beta_V, the weight of the value regulariser C_V in the policy phase (1.0).
    ``separate_value``: Separate DCPG (Algorithm 2): a value network V_phi with its own torso, trained as
    PPG's (``vf_coef * J_V`` for ``value_epochs`` epochs in the policy phase, ``J_V`` in the auxiliary
    phase) and used for the advantages; V_theta keeps the delayed update and shapes the representation.
    """

    value_anchor_coef: float = 1.0
    separate_value: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.policy_epochs >= 1, "params.policy_epochs", self.policy_epochs, "an integer >= 1")
        require(self.value_anchor_coef >= 0, "params.value_anchor_coef", self.value_anchor_coef, "a number >= 0")


class DCPG:
    Config = DCPGConfig
    DATA_PARALLEL = True  # torchrun: several ranks, see aclab.distributed

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: DCPGConfig = config.params
        p = self.params
        self.device = device
        self.env_spec = env_spec
        require(p.dynamics == "off" or env_spec.discrete, "params.dynamics", p.dynamics,
                "'off' for continuous actions (the discriminator one-hot encodes discrete actions)")
        self.net = build_actor_critic(p, env_spec, shared=True).to(device)
        self.dist = self.net.dist
        self.value_net = None
        if p.separate_value:
            self.value_net = ValueNetwork(env_spec.obs_shape, p.encoder, p.hidden_sizes, p.activation,
                                          p.encoder_init).to(device)
        self.dynamics = None
        if p.dynamics != "off":
            canonical = (canonical_action_map(config.env.id, config.env.options, env_spec.num_actions)
                         if p.dynamics_negatives == "canonical" else None)
            self.dynamics = DynamicsModel(p.dynamics, policy_feature_dim(self.net), env_spec.num_actions,
                                          p.dynamics_hidden_sizes, p.dynamics_eta, canonical).to(device)
        policy_parameters = [*self.net.parameters()]
        if self.value_net is not None:
            policy_parameters += list(self.value_net.parameters())
        self.policy_optimizer = make_adam(policy_parameters, lr=p.lr, eps=p.adam_eps)
        aux_parameters = list(policy_parameters)
        if self.dynamics is not None:
            aux_parameters += list(self.dynamics.parameters())
        self.aux_lr = p.aux_lr if p.aux_lr is not None else p.lr
        self.aux_optimizer = make_adam(aux_parameters, lr=self.aux_lr, eps=p.adam_eps)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
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
            if self.value_net is not None:
                fields["returns_phi"] = ((), torch.float32)
            if self.dynamics is not None:
                fields["actions"] = ((), torch.int64)
                if p.dynamics_resets == "authors":
                    fields["ends"] = ((), torch.bool)
            self.buffer = make_aux_buffer(p, env_spec, local_envs, device, fields)
        critics = ["value"] + (["separate_value"] if self.value_net is not None else [])
        self.analyses = TrainingAnalyses(p, local_envs, critics, config.seed)
        # Separate DCPG: V_theta's rollout-time predictions, written by the collector's callbacks
        self._theta_values = np.zeros((p.num_steps + 1, local_envs), dtype=np.float32)
        self._theta_step = 0
        self.steps = 0
        self.iteration = 0
        self.num_aux_phases = 0
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        """Behaviour policy for the collector: NumPy (actions, log_probs, values, dist_params); the values
        are V_theta, or V_phi for Separate DCPG (V_theta then goes to ``_theta_values``)."""
        params, value = self.net(obs)
        actions = self.dist.sample(params, self.generator)
        log_probs = self.dist.log_prob(params, actions)
        if self.value_net is not None:
            self._theta_values[self._theta_step] = value.cpu().numpy()
            self._theta_step += 1
            value = self.value_net(obs)
        return tuple(x.cpu().numpy() for x in (actions, log_probs, value, params))

    @torch.no_grad()
    def _value(self, obs: torch.Tensor) -> np.ndarray:
        value = self.net.value(obs)
        if self.value_net is not None:
            self._theta_values[self._theta_step] = value.cpu().numpy()
            value = self.value_net(obs)
        return value.cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        params = self.net.dist_params(torch.as_tensor(obs, device=self.device))
        return policy_actions(self.dist, params, deterministic, self.generator)

    # ------------------------------------------------------------------ analysis hooks
    def value_functions(self) -> dict[str, nn.Module]:
        """Critics by name: V_theta (``value``), and V_phi (``separate_value``) for Separate DCPG."""
        out: dict[str, nn.Module] = {"value": self.net}
        if self.value_net is not None:
            out["separate_value"] = self.value_net
        return out

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Shared-torso features [N, F] (the discriminator's phi)."""
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
        # ---- policy phase: one rollout, V_old and R_hat computed once
        self._theta_step = 0
        rollout, episode_returns, episode_lengths = self._collector_for(envs).collect(envs, self._act, self._value)
        next_obs = torch.as_tensor(envs.obs)
        with torch.no_grad():
            advantages = gae(rollout.rewards, rollout.values, rollout.discounts(p.gamma), p.gae_lambda,
                             episode_ends=rollout.ends)
            if self.value_net is None:
                theta_values = rollout.values
                returns = advantages + theta_values[:-1]
                returns_phi = None
            else:  # Separate DCPG: R_hat_theta from V_theta, R_hat_phi from V_phi (Algorithm 2, line 5)
                theta_values = torch.as_tensor(self._theta_values, device=self.device).clone()
                returns = gae(rollout.rewards, theta_values, rollout.discounts(p.gamma), p.gae_lambda,
                              episode_ends=rollout.ends) + theta_values[:-1]
                returns_phi = advantages + rollout.values[:-1]
        metrics: dict[str, float] = {}
        if self.analyses.enabled:
            values = {"value": theta_values, "separate_value": rollout.values}
            targets = {"value": returns, "separate_value": returns_phi}
            metrics.update(self.analyses.value_bias(rollout, values))
            metrics.update(self.analyses.stiffness(self.iteration, self.value_functions(), rollout.obs, targets,
                                                   rollout.valid))
        metrics.update(self.policy_phase(rollout, advantages, theta_values, returns_phi))
        if self.buffer is not None:
            extra = {"actions": rollout.actions} if self.dynamics is not None else {}
            if "ends" in self.buffer.fields:
                extra["ends"] = rollout.ends
            if returns_phi is not None:
                extra["returns_phi"] = returns_phi
            self.buffer.add(rollout.obs, next_obs, rollout.valid, returns=returns, **extra)
            # ---- auxiliary phase every N_pi policy iterations
            if self.buffer.full:
                metrics.update(self.auxiliary_phase())
                self.buffer.clear()
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        metrics["lr"] = self.policy_optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def policy_phase(self, rollout, advantages: torch.Tensor, theta_values: torch.Tensor,
                     returns_phi: torch.Tensor | None) -> dict[str, float]:
        """E_pi epochs of ``L_clip - c_e H + beta_V C_V`` (and, for Separate DCPG, E_V epochs of
        ``c_v J_V(phi)``) on shuffled minibatches of the rollout's valid transitions.

        ``self.last_policy_phase_stats`` keeps the per-minibatch table (rows in update order; column 2 is
        C_V) for inspection.
        """
        p = self.params
        extra = {} if returns_phi is None else {"returns_phi": returns_phi}
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs,
                                  old_values=theta_values[:-1],  # V_old: rollout-time V_theta, never recomputed
                                  advantages=advantages, **extra)
        if p.norm_adv == "batch":
            batch["advantages"] = self.dp.normalize(batch["advantages"])
        params_list = [q for group in self.policy_optimizer.param_groups for q in group["params"]]
        value_epochs = p.value_epochs if self.value_net is not None else 0
        zero = torch.zeros((), device=self.device)
        stats = []
        for epoch in range(max(p.policy_epochs, value_epochs)):
            train_policy, train_phi = epoch < p.policy_epochs, epoch < value_epochs
            for mb in self.dp.minibatches(batch, p.num_minibatches, self.generator, rollout.valid):
                dist_params, values = self.net(mb["obs"])
                log_probs = self.dist.log_prob(dist_params, mb["actions"])
                mb_adv = self.dp.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                pg_loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(
                    log_probs, mb["old_log_probs"], mb_adv, p.clip_coef)
                entropy = self.dist.entropy(dist_params).mean()
                value_anchor = losses.value_loss(values, mb["old_values"])  # C_V
                loss = pg_loss - p.ent_coef * entropy + p.value_anchor_coef * value_anchor if train_policy else 0.0
                phi_loss = zero
                if train_phi:
                    phi_loss = losses.value_loss(self.value_net(mb["obs"]), mb["returns_phi"])
                    loss = loss + p.vf_coef * phi_loss
                self.policy_optimizer.zero_grad(set_to_none=True)
                self.dp.backward(loss, params_list, mb.weight)
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.policy_optimizer)
                if mb.weight:  # a rank holding none of this minibatch (several ranks) adds no row
                    stats.append(torch.stack([pg_loss.detach(), entropy.detach(), value_anchor.detach(),
                                              phi_loss.detach(), approx_kl, clip_frac, grad_norm]))
        table = torch.stack(stats)
        self.last_policy_phase_stats = table
        names = ["loss/policy", "entropy", "loss/value_anchor", "loss/separate_value", "approx_kl",
                 "clip_fraction", "grad_norm"]
        check_finite(dict(zip(names, table.sum(0))), f"DCPG policy phase {self.iteration}")
        out = dict(zip(names, table.mean(0).tolist()))
        if self.value_net is None:
            del out["loss/separate_value"]
        return out

    def auxiliary_phase(self) -> dict[str, float]:
        """E_aux epochs over the buffer in minibatches of whole env trajectories:
        ``0.5 (V_theta - R_hat)^2 + beta_pi KL(pi_old || pi_theta)`` (+ ``J_V(phi)`` for Separate DCPG,
        Algorithm 2 lines 13-14; + ``beta_f L_f`` for DDCPG and its ablations)."""
        p = self.params
        buffer = self.buffer
        dist_params_over_buffer(self.net.dist_params, buffer, "old_params", self.forward_chunk, self.device)
        names = ("returns", "old_params")
        names += ("returns_phi",) if self.value_net is not None else ()
        names += ("actions",) if self.dynamics is not None else ()
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
        names = ["aux/value_loss", "aux/kl", "aux/separate_value_loss", "aux/dynamics_loss",
                 "aux/dynamics_accuracy", "aux/grad_norm"]
        check_finite(dict(zip(names, table.sum(0))), f"DCPG auxiliary phase {self.num_aux_phases}")
        out = dict(zip(names, table.mean(0).tolist()))
        if self.value_net is None:
            del out["aux/separate_value_loss"]
        if self.dynamics is None:
            del out["aux/dynamics_loss"], out["aux/dynamics_accuracy"]
        out["aux/kl_after"] = mean_kl_over_buffer(self.net.dist_params, self.dist, buffer, "old_params",
                                                  self.forward_chunk, self.device)
        self.last_aux_phase_stats = table
        self.num_aux_phases += 1
        return out

    def aux_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of one auxiliary minibatch of ``n`` whole trajectories (see :meth:`AuxBuffer.gather`) and its
        detached parts ``[J_V(theta), KL(pi_old || pi_theta), J_V(phi), L_f, discriminator accuracy]``, each a
        mean over the valid states (transitions for ``L_f``)."""
        p = self.params
        n, T = mb["valid"].shape
        dist_params, values, features = self.net.forward_with_features(mb["obs"].flatten(0, 1))
        mask = mb["valid"].reshape(-1)
        value_loss = masked_mean(half_squared_error(state_rows(values, n, T), mb["returns"].reshape(-1)), mask)
        kl = masked_mean(self.dist.kl(mb["old_params"].reshape(n * T, -1), state_rows(dist_params, n, T)), mask)
        loss = value_loss + p.clone_coef * kl
        zero = torch.zeros((), device=self.device)
        phi_loss = dyn_loss = dyn_accuracy = zero
        if self.value_net is not None:  # Separate DCPG, Algorithm 2 line 14
            phi_values = self.value_net(mb["obs"][:, :T].flatten(0, 1))
            phi_loss = masked_mean(half_squared_error(phi_values, mb["returns_phi"].reshape(-1)), mask)
            loss = loss + phi_loss
        if self.dynamics is not None:  # DDCPG and its ablations
            dyn_loss, dyn_accuracy = trajectory_dynamics_loss(self.dynamics, features.view(n, T + 1, -1),
                                                              mb["actions"], mb["valid"], p.dynamics_resets,
                                                              self.generator, mb.get("ends"))
            loss = loss + p.dynamics_coef * dyn_loss
        parts = torch.stack([value_loss.detach(), kl.detach(), phi_loss.detach(), dyn_loss.detach(), dyn_accuracy])
        return loss, parts

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "value_net": None if self.value_net is None else self.value_net.state_dict(),
            "dynamics": None if self.dynamics is None else self.dynamics.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "iteration": self.iteration,
            "num_aux_phases": self.num_aux_phases,
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "analyses": self.analyses.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        if self.value_net is not None:
            self.value_net.load_state_dict(state["value_net"])
        if self.dynamics is not None:
            self.dynamics.load_state_dict(state["dynamics"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.num_aux_phases = int(state["num_aux_phases"])
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        self.analyses.load_state_dict(state["analyses"])


_DCPG = "dcpg"
ALGORITHMS = {
    "dcpg": Entry(DCPG, "Delayed-Critic Policy Gradient: value anchored in the policy phase, trained in the "
                        "auxiliary phase (DCPG paper, Tables 5-7)"),
    "sdcpg": Entry(DCPG, "Separate DCPG: extra value network with its own encoder for the advantages "
                         "(DCPG paper, Algorithm 2, Table 6)", defaults={"separate_value": True}, preset_prefix=_DCPG),
    "ddcpg": Entry(DCPG, "Dynamics-aware DCPG: one discriminator, wrong-action and wrong-next-state negatives, "
                         "eta = 0.5 (DCPG paper, F.2, Tables 5, 7-9)",
                   defaults={"dynamics": "joint", "dynamics_eta": 0.5}, preset_prefix=_DCPG),
    "dcpg-f": Entry(DCPG, "DCPG+F: forward-dynamics discriminator (wrong next states only; DCPG paper, Table 7)",
                    defaults={"dynamics": "forward"}, preset_prefix=_DCPG),
    "dcpg-i": Entry(DCPG, "DCPG+I: inverse-dynamics discriminator (wrong actions only; DCPG paper, Table 7)",
                    defaults={"dynamics": "inverse"}, preset_prefix=_DCPG),
    "dcpg-fi": Entry(DCPG, "DCPG+FI: separate forward and inverse discriminators, eta = 1.0 (DCPG paper, Table 7)",
                     defaults={"dynamics": "two", "dynamics_eta": 1.0}, preset_prefix=_DCPG),
}
