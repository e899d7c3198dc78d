"""TD3 (Fujimoto, van Hoof & Meger 2018) with a selectable critic model (hypernetwork paper, Section 3).

One gradient step per env step (``utd_ratio``), after ``learning_starts`` uniformly random steps:

    a~' = clip(pi'(s') + clip(N(0, sigma~^2), -c, c), -1, 1)                 (target policy smoothing)
    y   = r + gamma (1 - terminated) min_k Q'_k(s', a~')                     (clipped double Q)
    L_Q = sum_{k=1,2} mean (Q_k(s, a) - y)^2                                 (both twins, one batched call)
    every ``policy_delay`` critic steps:
        L_pi = -mean Q_1(s, pi(s))          (hypernetwork paper, Eq. 5; only grad_a Q_1 is used)
        theta' <- (1 - tau) theta' + tau theta for the actor and the critics

Exploration: ``clip(pi(s) + N(0, 0.1^2), -1, 1)`` in the normalised action space (see
:mod:`aclab.algos.offpolicy`). Evaluation (``act(deterministic=True)``) uses ``pi(s)``. With a
truncation (time limit) the target bootstraps from the true final observation; only ``terminated``
cuts it. ``critic="sa_hyper"`` etc. selects the critic (:mod:`aclab.nets.critics`); hyper critics
train at ``hyper_critic_lr`` (5e-5) and, with the paper's ``hyper_init="kaiming"``, have their heads
calibrated on the warm-up data just before the first update (:class:`aclab.algos.offpolicy.OffPolicyConfig`).

Names: ``td3`` (presets ``td3-<family>``: Fujimoto's current settings) and ``td3-hyper`` (SA-Hyper critic;
presets ``td3-hyper-<family>``: the hypernetwork paper's TD3 settings, batch 100 and 1,000 random steps,
for the hyper critic and the baselines alike, e.g. ``aclab train td3-hyper --set params.critic=mlp``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from aclab.algos.common import Entry, check_finite, make_adam
from aclab.algos.offpolicy import (
    DeterministicActor,
    NumpyMLP,
    OffPolicyConfig,
    OffPolicyLoop,
    RunningSums,
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
from aclab.data.replay import ReplayBatch


@dataclass
class TD3Config(OffPolicyConfig):
    """TD3 hyperparameters; the shared ones are in :class:`OffPolicyConfig` (defaults: TD3 paper / CleanRL)."""

    exploration_noise: float = 0.1
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_delay: int = 2

    def validate(self) -> None:
        super().validate()
        require(self.exploration_noise >= 0, "params.exploration_noise", self.exploration_noise, "a number >= 0")
        require(self.policy_noise >= 0, "params.policy_noise", self.policy_noise, "a number >= 0")
        require(self.noise_clip >= 0, "params.noise_clip", self.noise_clip, "a number >= 0")
        require(self.policy_delay >= 1, "params.policy_delay", self.policy_delay, "an integer >= 1")


def td3_targets(rewards: torch.Tensor, terminated: torch.Tensor, next_q: torch.Tensor, gamma: float) -> torch.Tensor:
    """``y = r + gamma (1 - terminated) min_k next_q[k]`` for ``next_q`` ``[K, N]`` -> ``[N]``."""
    return rewards + gamma * (1.0 - terminated) * next_q.min(dim=0).values


class TD3:
    Config = TD3Config

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: TD3Config = config.params
        self.device = device
        p = self.params
        self.loop = OffPolicyLoop(config, env_spec, device)
        obs_dim, action_dim = self.loop.obs_dim, self.loop.action_dim
        self.actor = init_actor_(DeterministicActor(obs_dim, action_dim, p.actor_hidden), p.actor_init).to(device)
        self.critic = build_critic(p, obs_dim, action_dim, device)
        self.actor_target = freeze(copy.deepcopy(self.actor))
        self.critic_target = freeze(copy.deepcopy(self.critic))
        self.actor_optimizer = make_adam(self.actor.parameters(), lr=p.actor_lr, eps=p.adam_eps)
        self.critic_optimizer = make_adam(self.critic.parameters(), lr=p.critic_learning_rate, eps=p.adam_eps)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self._actor_params = list(self.actor.parameters())
        self._critic_params = list(self.critic.parameters())
        self._actor_target_params = list(self.actor_target.parameters())
        self._critic_target_params = list(self.critic_target.parameters())
        self.numpy_actor = NumpyMLP(self.actor.layers) if use_numpy_acting(p.acting, device) else None
        self.critic_updates = 0
        self.last_episode_returns = np.zeros(0)
        self._critic_stats = RunningSums(2, device)  # loss, mean Q
        self._actor_stats = RunningSums(1, device)  # loss

    # ------------------------------------------------------------------ contract attributes
    @property
    def steps(self) -> int:
        return self.loop.steps

    @property
    def iteration(self) -> int:
        return self.loop.iteration

    # ------------------------------------------------------------------ acting
    def _mean_action(self, obs: np.ndarray) -> np.ndarray:
        """Normalised ``pi(s)`` ``[N, A]`` float32."""
        if self.numpy_actor is not None:
            return np.tanh(self.numpy_actor(np.asarray(obs, dtype=np.float32)))
        with torch.no_grad():
            return self.actor(torch.as_tensor(obs, dtype=torch.float32, device=self.device)).cpu().numpy()

    def _explore(self, obs: np.ndarray) -> np.ndarray:
        actions = self._mean_action(obs)
        noise = self.loop.rng.normal(0.0, self.params.exploration_noise, actions.shape)
        return np.clip(actions + noise, -1.0, 1.0).astype(np.float32)

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Env-scaled actions for evaluation: ``pi(s)``, plus exploration noise unless deterministic."""
        actions = self._mean_action(obs) if deterministic else self._explore(obs)
        return self.loop.to_env(actions)

    # ------------------------------------------------------------------ learning
    def update(self, batch: ReplayBatch) -> None:
        """One critic step and, every ``policy_delay`` critic steps, one actor step and target update.
        Before the first one, a ``kaiming`` hyper critic is calibrated on the warm-up data
        (:func:`aclab.algos.offpolicy.calibrate_critic_on_replay`)."""
        p = self.params
        if self.critic_updates == 0:
            calibrate_critic_on_replay(p, self.critic, self.critic_target, self.loop.buffer, self.device)
        with torch.no_grad():
            noise = torch.randn(batch.actions.shape, generator=self.generator, device=self.device)
            noise = (noise * p.policy_noise).clamp_(-p.noise_clip, p.noise_clip)
            next_actions = (self.actor_target(batch.next_obs) + noise).clamp_(-1.0, 1.0)
            target = td3_targets(batch.rewards, batch.terminated,
                                 self.critic_target(batch.next_obs, next_actions), p.gamma)
        self._critic_stats.add(twin_critic_step(self.critic, self.critic_optimizer, batch.obs, batch.actions,
                                                   target))
        self.critic_updates += 1
        if self.critic_updates % p.policy_delay == 0:
            actor_loss = -self.critic.q_for_actor(batch.obs, self.actor(batch.obs), member=0).mean()
            actor_only_step(actor_loss, self._actor_params, self.actor_optimizer)
            polyak_update(self._actor_target_params, self._actor_params, p.tau)
            polyak_update(self._critic_target_params, self._critic_params, p.tau)
            self._actor_stats.add(actor_loss.detach())

    def iterate(self, envs) -> dict[str, float]:
        updates, returns, lengths = self.loop.run(envs, self._explore, self.update)
        metrics: dict[str, float] = {"updates": float(updates), "buffer_size": float(len(self.loop.buffer))}
        critic, actor = self._critic_stats, self._actor_stats
        if critic.count:
            named = {"loss/critic": critic.total[0]}
            if actor.count:
                named["loss/actor"] = actor.total[0]
            check_finite(named, f"TD3 iteration {self.loop.iteration}")
            metrics["loss/critic"], metrics["q_mean"] = critic.means()
            if actor.count:
                metrics["loss/actor"] = actor.means()[0]
        critic.reset()
        actor.reset()
        metrics.update(episode_metrics(returns, lengths))
        self.last_episode_returns = returns
        if self.loop.gradient_accuracy_due():
            metrics.update(self.loop.measure_gradient_accuracy(self.gradient_probe(envs)).metrics())
        return metrics

    # ------------------------------------------------------------------ analysis
    def gradient_probe(self, envs=None) -> GradientProbe:
        """Callables for :func:`aclab.analysis.grad_accuracy.measure_gradient_accuracy`: the mean policy,
        ``grad_a Q_1(s, a)`` (what the actor follows) and ``min_k Q'_k(s, pi(s))`` as the bootstrap."""
        device = self.device

        def critic_gradient(obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            a = torch.as_tensor(actions, dtype=torch.float32, device=device).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(o, a, member=0).sum(), a)
            return grad.cpu().numpy()

        @torch.no_grad()
        def bootstrap(obs: np.ndarray) -> np.ndarray:
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            return self.critic_target(o, self.actor(o)).min(dim=0).values.cpu().numpy()

        return GradientProbe(policy=self._mean_action, critic_gradient=critic_gradient,
                             to_env_action=self.loop.to_env, bootstrap_value=bootstrap,
                             obs_transform=probe_obs_transform(envs))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "critic_updates": self.critic_updates,
            "loop": self.loop.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["generator"])
        self.critic_updates = int(state["critic_updates"])
        self.loop.load_state_dict(state["loop"])


ALGORITHMS = {
    "td3": Entry(TD3, "TD3 (twin critics, target smoothing, delayed actor); params.critic picks the critic model"),
    "td3-hyper": Entry(TD3, "TD3 with the SA-Hyper hypernetwork critic (Sarafian et al. 2021), critic lr 5e-5, "
                            "the paper's batch 100 and 1k random steps", defaults={"critic": "sa_hyper"},
                       preset_prefix="td3-hyper"),
}
