"""PPO (Schulman et al. 2017) with the details of the papers' baselines.

One iteration:
    1. collect T steps from B envs with the current policy (dummy autoreset steps masked);
    2. advantages A = GAE(gamma, lambda) from the rollout-time values, returns R = A + V;
    3. for each epoch, for each shuffled minibatch of valid transitions:
           L = L_clip(ratio, A) + c_v * L_V - c_e * H      (clipped value loss optional)
       one Adam step with the global gradient norm clipped.
Advantage normalisation per minibatch (CleanRL, SB3) or over the whole rollout (PPG/DNA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

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
from aclab.core.returns import gae
from aclab.data.rollout import RolloutCollector, valid_transitions
from aclab.nets import analytic_ppo
from aclab.nets.agents import FusedMLPActorCritic, make_actor_critic
from aclab.nets.numpy_policy import NumpyActorCritic


@dataclass
class PPOConfig:
    """PPO hyperparameters (defaults: CleanRL's ppo.py on classic control). ``encoder_init``: the image
    torso's initialisation (:func:`aclab.nets.encoders.init_torso`; the Procgen preset uses ``"xavier"``).
    ``gradients``: how a minibatch's gradient is computed: ``"autograd"``, ``"analytic"`` (the closed form of
    :mod:`aclab.nets.analytic_ppo`, for separate MLPs with a categorical or state-independent Gaussian
    policy, one process), or ``"auto"`` (analytic where it applies on CPU, else autograd)."""

    num_steps: int = 128
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    adam_eps: float = 1e-5
    clip_coef: float = 0.2
    clip_value_loss: bool = True
    value_clip_coef: float | None = None
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    norm_adv: Literal["minibatch", "batch", "off"] = "minibatch"
    target_kl: float | None = None
    encoder: Literal["auto", "mlp", "nature_cnn", "impala"] = "auto"
    encoder_init: Literal["orthogonal", "xavier", "default"] = "orthogonal"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"
    shared_network: bool = False
    action_dist: Literal["auto", "gaussian", "tanh_gaussian"] = "auto"
    log_std_init: float = 0.0
    acting: Literal["auto", "torch", "numpy"] = "auto"
    gradients: Literal["auto", "autograd", "analytic"] = "auto"

    def validate(self) -> None:
        require(self.num_steps >= 1, "params.num_steps", self.num_steps, "an integer >= 1")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 <= self.gae_lambda <= 1.0, "params.gae_lambda", self.gae_lambda, "a number in [0, 1]")
        require(self.num_epochs >= 1, "params.num_epochs", self.num_epochs, "an integer >= 1")
        require(self.num_minibatches >= 1, "params.num_minibatches", self.num_minibatches, "an integer >= 1")
        require(self.lr > 0, "params.lr", self.lr, "a number > 0")
        require(self.clip_coef > 0, "params.clip_coef", self.clip_coef, "a number > 0")
        require(self.max_grad_norm > 0, "params.max_grad_norm", self.max_grad_norm, "a number > 0")
        require(self.ent_coef >= 0, "params.ent_coef", self.ent_coef, "a number >= 0")
        require(self.vf_coef >= 0, "params.vf_coef", self.vf_coef, "a number >= 0")
        require(self.target_kl is None or self.target_kl > 0, "params.target_kl", self.target_kl,
                "a number > 0 or None")
        require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "params.hidden_sizes",
                self.hidden_sizes, "a non-empty list of positive integers")
        require(self.gradients != "analytic" or (not self.shared_network and self.encoder in ("auto", "mlp")
                                                  and self.action_dist != "tanh_gaussian"),
                "params.gradients", self.gradients,
                "'auto' or 'autograd' ('analytic' needs shared_network=false, encoder 'auto' or 'mlp' and "
                "action_dist 'auto' or 'gaussian')")


def build_actor_critic(params: PPOConfig, env_spec) -> torch.nn.Module:
    kind = "auto" if params.action_dist == "gaussian" else params.action_dist
    dist = make_distribution(env_spec.action_space, kind)
    return make_actor_critic(
        env_spec.obs_shape,
        dist,
        encoder=params.encoder,
        hidden_sizes=params.hidden_sizes,
        activation=params.activation,
        shared=params.shared_network,
        log_std_init=params.log_std_init,
        encoder_init=params.encoder_init,
    )


def minibatch_indices(valid: torch.Tensor, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle the flat indices of valid transitions and split them into ``num_minibatches`` parts."""
    idx = torch.nonzero(valid.reshape(-1)).squeeze(1)
    idx = idx[torch.randperm(idx.numel(), generator=generator, device=idx.device)]
    size = max(idx.numel() // num_minibatches, 1)
    return [idx[i * size : (i + 1) * size] for i in range(min(num_minibatches, idx.numel()))]


class PPO:
    Config = PPOConfig
    DATA_PARALLEL = True  # torchrun: several ranks, see aclab.distributed

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: PPOConfig = config.params
        self.device = device
        self.env_spec = env_spec
        self.net = build_actor_critic(self.params, env_spec).to(device)
        self.dist = self.net.dist
        self.optimizer = make_adam(self.net.parameters(), lr=self.params.lr, eps=self.params.adam_eps)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        # acting on CPU with small MLPs: a NumPy mirror of the network (see aclab.nets.numpy_policy)
        self.numpy_actor = None
        use_numpy = self.params.acting == "numpy" or (
            self.params.acting == "auto" and device.type == "cpu" and config.env.num_envs <= 64)
        if use_numpy and isinstance(self.net, FusedMLPActorCritic) and device.type == "cpu":
            self.numpy_actor = NumpyActorCritic(self.net)
        self.np_rng = np.random.default_rng(config.seed)
        self.dp = distributed.current()  # several ranks: each steps num_envs / world_size envs
        # minibatch gradients in closed form for small MLPs (see aclab.nets.analytic_ppo): no autograd overhead
        analytic_ok = analytic_ppo.supports(self.net) and not self.dp.enabled
        if self.params.gradients == "analytic" and not analytic_ok:
            raise ValueError(
                "params.gradients='analytic' needs separate MLP networks (params.shared_network=false, vector "
                "observations) with a categorical or Gaussian (params.action_dist='auto') policy in one process; "
                "use 'auto' or 'autograd'")
        self.analytic = analytic_ok and (
            self.params.gradients == "analytic" or (self.params.gradients == "auto" and device.type == "cpu"))
        self.batch_size = config.env.num_envs * self.params.num_steps
        self.num_iterations = max(config.total_steps // self.batch_size, 1)
        self.steps = 0
        self.iteration = 0
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        """Behaviour policy for the collector: NumPy (actions, log_probs, values, dist_params)."""
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

    # ------------------------------------------------------------------ one iteration
    def _collector_for(self, envs) -> RolloutCollector:
        if self._collector is None:
            self._collector = RolloutCollector(envs, self.params.num_steps, self.dist.param_dim, self.device)
        return self._collector

    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        if p.anneal_lr:
            lr = linear_schedule(p.lr, 0.0, self.iteration / self.num_iterations)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.net.eval()
        rollout, episode_returns, episode_lengths = self._collector_for(envs).collect(envs, self._act, self._value)
        self.net.train()
        rewards, reward_metrics = self.learning_rewards(rollout)
        with torch.no_grad():
            advantages = gae(rewards, rollout.values, rollout.discounts(p.gamma), p.gae_lambda,
                             episode_ends=rollout.ends)
            returns = advantages + rollout.values[:-1]
        metrics = self.update(rollout, advantages, returns)
        metrics.update(reward_metrics)
        if self.numpy_actor is not None:
            self.numpy_actor.sync()
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def learning_rewards(self, rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The rewards GAE sees (here the rollout's; a subclass may shape them) and metrics about them."""
        return rollout.rewards, {}

    def update(self, rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        p = self.params
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_values=rollout.values[:-1],
                                  advantages=advantages, returns=returns)
        if p.norm_adv == "batch":
            batch["advantages"] = self.dp.normalize(batch["advantages"])
        value_clip = None
        if p.clip_value_loss:
            value_clip = p.value_clip_coef if p.value_clip_coef is not None else p.clip_coef
        params_list = list(self.net.parameters())
        stats = []
        for _epoch in range(p.num_epochs):
            epoch_kl, weights = [], []
            for mb in self.dp.minibatches(batch, p.num_minibatches, self.generator, rollout.valid):
                mb_adv = self.dp.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                if self.analytic:  # the same loss; p.grad set in closed form
                    row = analytic_ppo.ppo_loss_and_grads(
                        self.net, mb["obs"], mb["actions"], mb["old_log_probs"], mb_adv, mb["returns"],
                        mb["old_values"], clip_coef=p.clip_coef, value_clip=value_clip, vf_coef=p.vf_coef,
                        ent_coef=p.ent_coef)
                    approx_kl = row[3]
                else:
                    dist_params, values = self.net(mb["obs"])
                    log_probs = self.dist.log_prob(dist_params, mb["actions"])
                    pg_loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(
                        log_probs, mb["old_log_probs"], mb_adv, p.clip_coef)
                    v_loss = losses.value_loss(values, mb["returns"], mb["old_values"], value_clip)
                    entropy = self.dist.entropy(dist_params).mean()
                    loss = pg_loss + p.vf_coef * v_loss - p.ent_coef * entropy
                    self.optimizer.zero_grad(set_to_none=True)
                    self.dp.backward(loss, params_list, mb.weight)
                    row = torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach(), approx_kl, clip_frac])
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.optimizer)
                if mb.weight:  # a rank holding none of this minibatch (several ranks) adds no row
                    stats.append(torch.cat([row, grad_norm.unsqueeze(0)]))
                epoch_kl.append(approx_kl)
                weights.append(mb.weight)
            if p.target_kl is not None and float(self.dp.minibatch_mean(epoch_kl, weights)) > p.target_kl:
                break
        table = torch.stack(stats)
        names = ["loss/policy", "loss/value", "entropy", "approx_kl", "clip_fraction", "grad_norm"]
        means = table.mean(0)
        check_finite(dict(zip(names, table.sum(0))), f"PPO update {self.iteration}")
        with torch.no_grad():
            ret, old_values = batch["returns"], batch["old_values"]
            var_returns = ret.var()
            explained = 1.0 - (ret - old_values).var() / var_returns if var_returns > 0 else torch.nan
        out = dict(zip(names, means.tolist()))
        out["explained_variance"] = float(explained)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "steps": self.steps,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.np_rng.bit_generator.state = state["np_rng"]
        if self.numpy_actor is not None:
            self.numpy_actor.sync()
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])


ALGORITHMS = {"ppo": Entry(PPO, "Proximal Policy Optimization (clipped surrogate), the papers' baseline")}
