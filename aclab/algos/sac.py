"""SAC (Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications") with twin critics, a
tanh-Gaussian actor, a fixed or auto-tuned temperature, and a selectable critic model.

One gradient step per env step (``utd_ratio``), after ``learning_starts`` uniformly random steps:

    a' ~ pi(.|s'),  y = r + gamma (1 - terminated) (min_k Q'_k(s', a') - alpha log pi(a'|s'))
    L_Q  = sum_{k=1,2} mean (Q_k(s, a) - y)^2                          (both twins, one batched call)
    every ``policy_frequency`` critic steps, ``policy_frequency`` times (CleanRL's delayed scheme;
    1 = every step as in the paper):
        a~ ~ pi(.|s) (reparameterised),  L_pi = mean(alpha log pi(a~|s) - min_k Q_k(s, a~))
        autotune: L_alpha = -mean(alpha (log pi(a~|s) + H_target)),  H_target = -dim(A) by default
    every ``target_frequency`` critic steps: theta' <- (1 - tau) theta' + tau theta (critics only)

The policy's log standard deviation is bounded by ``clamp(-20, 2)`` (paper code) or, with
``log_std_squash="tanh"``, ``-5 + 3.5 (tanh(x) + 1)`` (CleanRL). ``log pi`` includes the tanh
correction ``- sum log(1 - tanh(u)^2)`` (exact, :mod:`aclab.core.distributions`). Evaluation with
``act(deterministic=True)`` uses the mean action ``tanh(mu(s))`` (``eval_action = "raw_mean"``: the raw
pre-tanh mean, as the authors' SAC code evaluates). Actions are normalised to ``[-1, 1]`` (see
:mod:`aclab.algos.offpolicy`).

Names: ``sac`` (presets ``sac-<family>``) and ``sac-hyper`` (SA-Hyper critic; presets ``sac-hyper-<family>``:
the hypernetwork paper's SAC, i.e. the SAC paper it cites (Haarnoja et al. 2018, arXiv:1801.01290):
lr 3e-4, batch 256, a fixed temperature 0.2 (that paper's reward scale 5 with temperature 1), 1,000 random
steps as the authors' code, for the hyper critic and the baselines alike).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from aclab.algos.common import Entry, adam_step, check_finite, make_adam
from aclab.algos.offpolicy import (
    NumpyMLP,
    OffPolicyConfig,
    OffPolicyLoop,
    RunningSums,
    TanhGaussianActor,
    actor_only_step,
    build_critic,
    calibrate_critic_on_replay,
    episode_metrics,
    freeze,
    init_actor_,
    polyak_update,
    probe_obs_transform,
    twin_critic_step,
    use_numpy_acting,
)
from aclab.analysis.grad_accuracy import GradientProbe
from aclab.config import Config, require
from aclab.core.distributions import tanh_normal_sample_and_log_prob
from aclab.data.replay import ReplayBatch


@dataclass
class SACConfig(OffPolicyConfig):
    """SAC hyperparameters; the shared ones are in :class:`OffPolicyConfig`."""

    learning_starts: int = 5_000
    alpha: float = 0.2
    autotune: bool = True
    alpha_lr: float = 3e-4
    target_entropy: float | None = None
    policy_frequency: int = 1
    target_frequency: int = 1
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    log_std_squash: Literal["clamp", "tanh"] = "clamp"
    eval_action: Literal["tanh_mean", "raw_mean"] = "tanh_mean"
    grad_accuracy_soft: bool = False

    def validate(self) -> None:
        super().validate()
        require(self.eval_action in ("tanh_mean", "raw_mean"), "params.eval_action", self.eval_action,
                "'tanh_mean' or 'raw_mean'")
        require(self.alpha >= 0, "params.alpha", self.alpha, "a number >= 0")
        require(self.alpha_lr > 0, "params.alpha_lr", self.alpha_lr, "a number > 0")
        require(self.policy_frequency >= 1, "params.policy_frequency", self.policy_frequency, "an integer >= 1")
        require(self.target_frequency >= 1, "params.target_frequency", self.target_frequency, "an integer >= 1")
        require(self.log_std_min < self.log_std_max, "params.log_std_min", self.log_std_min,
                f"a number < params.log_std_max ({self.log_std_max})")


def soft_targets(rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, next_log_prob: torch.Tensor,
                 alpha: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """``y = r + gamma (1 - terminated) (min_k next_q[k] - alpha log pi(a'|s'))``; ``next_q`` ``[K, N]``."""
    soft_value = next_q.min(dim=0).values - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated) * soft_value


class SAC:
    Config = SACConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: SACConfig = config.params
        self.device = device
        p = self.params
        self.loop = OffPolicyLoop(config, env_spec, device)
        obs_dim, action_dim = self.loop.obs_dim, self.loop.action_dim
        self.actor = init_actor_(TanhGaussianActor(obs_dim, action_dim, p.actor_hidden, p.log_std_min, p.log_std_max,
                                                   p.log_std_squash), p.actor_init).to(device)
        self.critic = build_critic(p, obs_dim, action_dim, device)
        self.critic_target = freeze(copy.deepcopy(self.critic))
        self.actor_optimizer = make_adam(self.actor.parameters(), lr=p.actor_lr, eps=p.adam_eps)
        self.critic_optimizer = make_adam(self.critic.parameters(), lr=p.critic_learning_rate, eps=p.adam_eps)
        self.target_entropy = -float(action_dim) if p.target_entropy is None else float(p.target_entropy)
        initial = 1.0 if p.autotune else p.alpha
        self.log_alpha = torch.tensor(math.log(initial) if initial > 0 else -math.inf, device=device,
                                      requires_grad=p.autotune)
        self.alpha_optimizer = make_adam([self.log_alpha], lr=p.alpha_lr, eps=p.adam_eps) if p.autotune else None
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self._actor_params = list(self.actor.parameters())
        self._critic_params = list(self.critic.parameters())
        self._critic_target_params = list(self.critic_target.parameters())
        self.numpy_actor = NumpyMLP(self.actor.layers) if use_numpy_acting(p.acting, device) else None
        self.critic_updates = 0
        self.last_episode_returns = np.zeros(0)
        self._critic_stats = RunningSums(2, device)  # loss, mean Q
        self._actor_stats = RunningSums(3, device)  # actor loss, alpha loss, entropy estimate
        self._last_alpha: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return self.loop.steps

    @property
    def iteration(self) -> int:
        return self.loop.iteration

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # ------------------------------------------------------------------ acting
    def _numpy_params(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.numpy_actor(np.asarray(obs, dtype=np.float32))
        a = self.actor.action_dim
        mean, raw = out[:, :a], out[:, a:]
        low, high = self.actor.log_std_min, self.actor.log_std_max
        if self.actor.log_std_squash == "clamp":
            log_std = np.clip(raw, low, high)
        else:
            log_std = low + 0.5 * (high - low) * (np.tanh(raw) + 1.0)
        return mean, log_std

    def _mean_action(self, obs: np.ndarray, squash: bool = True) -> np.ndarray:
        """``tanh(mu(s))`` ``[N, A]`` (``squash=False``: the raw pre-tanh mean ``mu(s)``)."""
        if self.numpy_actor is not None:
            mean = self._numpy_params(obs)[0]
            return np.tanh(mean) if squash else mean
        with torch.no_grad():
            mean = self.actor(torch.as_tensor(obs, dtype=torch.float32, device=self.device))[:, : self.actor.action_dim]
            return (torch.tanh(mean) if squash else mean).cpu().numpy()

    def _explore(self, obs: np.ndarray) -> np.ndarray:
        if self.numpy_actor is not None:
            mean, log_std = self._numpy_params(obs)
            noise = self.loop.rng.standard_normal(mean.shape, dtype=np.float32)
            return np.tanh(mean + np.exp(log_std) * noise).astype(np.float32)
        with torch.no_grad():
            params = self.actor(torch.as_tensor(obs, dtype=torch.float32, device=self.device))
            actions, _ = tanh_normal_sample_and_log_prob(params, self.generator)
            return actions.cpu().numpy()

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Env-scaled actions: when deterministic ``tanh(mu(s))`` (``eval_action = "tanh_mean"``) or the raw
        pre-tanh mean ``mu(s)`` (``"raw_mean"``, the authors' SAC evaluation; the env clips it to the
        action bounds), else a sample."""
        if deterministic:
            actions = self._mean_action(obs, squash=self.params.eval_action == "tanh_mean")
        else:
            actions = self._explore(obs)
        return self.loop.to_env(actions)

    # ------------------------------------------------------------------ learning
    def update(self, batch: ReplayBatch) -> None:
        p = self.params
        if self.critic_updates == 0:  # a kaiming hyper critic: calibrate its heads on the warm-up data
            calibrate_critic_on_replay(p, self.critic, self.critic_target, self.loop.buffer, self.device)
        alpha = self.alpha
        with torch.no_grad():
            next_actions, next_log_prob = tanh_normal_sample_and_log_prob(self.actor(batch.next_obs), self.generator)
            next_q = self.critic_target(batch.next_obs, next_actions)
            target = soft_targets(batch.rewards, batch.terminated, next_q, next_log_prob, alpha, p.gamma)
        self._critic_stats.add(twin_critic_step(self.critic, self.critic_optimizer, batch.obs, batch.actions,
                                                   target))
        self.critic_updates += 1
        if self.critic_updates % p.policy_frequency == 0:
            for _ in range(p.policy_frequency):
                alpha = self.alpha
                actions, log_prob = tanh_normal_sample_and_log_prob(self.actor(batch.obs), self.generator)
                q_pi = self.critic.q_for_actor(batch.obs, actions).min(dim=0).values
                actor_loss = (alpha * log_prob - q_pi).mean()
                actor_only_step(actor_loss, self._actor_params, self.actor_optimizer)
                log_prob = log_prob.detach()
                if self.alpha_optimizer is not None:
                    alpha_loss = -(self.log_alpha.exp() * (log_prob + self.target_entropy)).mean()
                    (self.log_alpha.grad,) = torch.autograd.grad(alpha_loss, [self.log_alpha])
                    adam_step(self.alpha_optimizer)
                else:
                    alpha_loss = torch.zeros((), device=self.device)
                self._actor_stats.add(torch.stack([actor_loss.detach(), alpha_loss.detach(), -log_prob.mean()]))
                self._last_alpha = alpha
        if self.critic_updates % p.target_frequency == 0:
            polyak_update(self._critic_target_params, self._critic_params, p.tau)

    def iterate(self, envs) -> dict[str, float]:
        updates, returns, lengths = self.loop.run(envs, self._explore, self.update)
        metrics: dict[str, float] = {"updates": float(updates), "buffer_size": float(len(self.loop.buffer))}
        critic, actor = self._critic_stats, self._actor_stats
        if critic.count:
            named = {"loss/critic": critic.total[0]}
            if actor.count:
                named["loss/actor"] = actor.total[0]
                named["loss/alpha"] = actor.total[1]
            check_finite(named, f"SAC iteration {self.loop.iteration}")
            metrics["loss/critic"], metrics["q_mean"] = critic.means()
            if actor.count:
                metrics["loss/actor"], metrics["loss/alpha"], metrics["entropy"] = actor.means()
                metrics["alpha"] = float(self._last_alpha)
        critic.reset()
        actor.reset()
        metrics.update(episode_metrics(returns, lengths))
        self.last_episode_returns = returns
        if self.loop.gradient_accuracy_due():
            metrics.update(self.loop.measure_gradient_accuracy(self.gradient_probe(envs)).metrics())
        return metrics

    # ------------------------------------------------------------------ analysis
    def gradient_probe(self, envs=None) -> GradientProbe:
        """The mean policy, ``grad_a min_k Q_k(s, a)`` (what the SAC actor follows) and a bootstrap value.

        SAC's critic is a *soft* Q: the expected return of the stochastic policy plus its future entropy
        bonuses ``-alpha log pi``. ``grad_accuracy_soft = false`` (default) measures it against the
        estimator as the paper defines it for TD3 (mean-policy rollouts, rewards only; bootstrap
        ``min_k Q'_k(s, tanh(mu(s)))``, which still holds the entropy of the steps after the horizon);
        ``true`` makes the rollouts soft: after the repeated action the policy's sampled actions, each
        step's reward plus ``-alpha log pi(a|s)``, and the soft value ``min_k Q'_k(s, a') - alpha log
        pi(a'|s)`` (``a' ~ pi``) as the bootstrap, so that the "true" gradient is that of the quantity the
        critic models (noisier: the continuations are random)."""
        device = self.device
        soft = self.params.grad_accuracy_soft
        generator = torch.Generator(device=device)
        if soft:  # its own stream, drawn from the (checkpointed) analysis generator
            generator.manual_seed(int(self.loop.analysis_rng.integers(2**62)))

        def critic_gradient(obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            a = torch.as_tensor(actions, dtype=torch.float32, device=device).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(o, a).min(dim=0).values.sum(), a)
            return grad.cpu().numpy()

        @torch.no_grad()
        def soft_sample(obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions, log_prob = tanh_normal_sample_and_log_prob(self.actor(o), generator)
            return o, actions, log_prob

        @torch.no_grad()
        def bootstrap(obs: np.ndarray) -> np.ndarray:
            if soft:
                o, actions, log_prob = soft_sample(obs)
                value = self.critic_target(o, actions).min(dim=0).values - self.alpha * log_prob
                return value.cpu().numpy()
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            mean_actions = torch.tanh(self.actor(o)[:, : self.actor.action_dim])
            return self.critic_target(o, mean_actions).min(dim=0).values.cpu().numpy()

        def soft_rollout_policy(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            _, actions, log_prob = soft_sample(obs)
            return actions.cpu().numpy(), (-self.alpha * log_prob).cpu().numpy()

        return GradientProbe(policy=self._mean_action, critic_gradient=critic_gradient,
                             to_env_action=self.loop.to_env, bootstrap_value=bootstrap,
                             obs_transform=probe_obs_transform(envs),
                             rollout_policy=soft_rollout_policy if soft else None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "alpha_optimizer": None if self.alpha_optimizer is None else self.alpha_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "critic_updates": self.critic_updates,
            "loop": self.loop.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        if self.alpha_optimizer is not None:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.generator.set_state(state["generator"])
        self.critic_updates = int(state["critic_updates"])
        self.loop.load_state_dict(state["loop"])


ALGORITHMS = {
    "sac": Entry(SAC, "SAC (twin critics, tanh-Gaussian actor, fixed or auto-tuned temperature); params.critic "
                      "picks the critic model"),
    "sac-hyper": Entry(SAC, "SAC with the SA-Hyper hypernetwork critic (Sarafian et al. 2021), critic lr 5e-5, "
                            "fixed temperature 0.2, 1k random steps", defaults={"critic": "sa_hyper"},
                       preset_prefix="sac-hyper"),
}
