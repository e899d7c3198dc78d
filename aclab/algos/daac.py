"""DAAC and IDAAC (Raileanu & Fergus 2021), the DCPG paper's baselines (DCPG paper, Appendix D, Tables 4-5:
E_pi = 1, E_V = 9, N_pi = 1, alpha_a = 0.25, alpha_i = 0.001 for every Procgen game).

Networks: a policy network (torso + policy head + advantage head ``A_theta(s, a)`` on ``[features, onehot(a)]``)
and a separate value network V_phi (own torso + value head), each with its own Adam optimiser.

One iteration (:meth:`DAAC.iterate`)::

    collect a rollout with pi_theta; A_hat = GAE(gamma, lambda) with V_phi; R_hat = A_hat + V_phi;
    A_hat normalised over the rollout
    policy phase, E_pi epochs over shuffled minibatches:
        L_pi = L_clip(A_hat) - c_e H + alpha_a (A_theta(s, a) - A_hat)^2          (+ alpha_i L_E, IDAAC)
    value phase, every N_pi iterations, E_V epochs over shuffled minibatches:
        L_V = 0.5 max((V - R_hat)^2, (V_old + clip(V - V_old, +-eps) - R_hat)^2)   (authors' code; or unclipped)

IDAAC adds an order discriminator D(e_i, e_j) = P(s_j comes before s_i in their episode) on the policy torso's
embeddings e = E(s) of two states of the same episode. Each policy minibatch first trains D on detached
embeddings (binary cross entropy with the true order), then the torso receives
``alpha_i L_E``, ``L_E = BCE(D(e_i, e_j), 1/2)``: it is pushed to make the order unpredictable, i.e. to forget
episode-specific (level-specific) information that would let the value-free policy overfit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aclab.algos.common import (
    Entry,
    adam_step,
    check_finite,
    clip_grad_norm,
    linear_schedule,
    make_adam,
    policy_actions,
)
from aclab.algos.phasic import ValueNetwork
from aclab.config import Config, require
from aclab.core import losses
from aclab.core.distributions import Categorical
from aclab.core.returns import gae
from aclab.data.rollout import RolloutCollector, shuffled_minibatches, valid_transitions
from aclab.nets.agents import build_encoder
from aclab.nets.encoders import MLP, init_linear


@dataclass
class DAACConfig:
    """DAAC / IDAAC hyperparameters. Defaults: DCPG paper, Table 2 (PPO on Procgen) and Appendix D (DAAC).

    ``policy_epochs`` E_pi, ``value_epochs`` E_V, ``value_every`` N_pi (the value phase runs every that many
    iterations), ``adv_coef`` alpha_a, ``order_coef`` alpha_i (0: DAAC; > 0: IDAAC), ``order_hidden_sizes``:
    hidden layers of the order discriminator (empty: linear, the authors' default; the authors' per-game
    setting uses one hidden layer of 4 or 64 ReLU units). ``clip_value_loss``: PPO's clipped value loss (the
    authors' code; the DAAC paper writes the plain squared error), clip range ``clip_coef``. ``encoder_init``:
    the image torsos' initialisation (``"xavier"``: the DCPG authors' IMPALA torso, the Procgen preset's
    choice), for the policy and the value network alike.
    """

    num_steps: int = 256
    gamma: float = 0.999
    gae_lambda: float = 0.95
    num_minibatches: int = 8
    policy_epochs: int = 1
    value_epochs: int = 9
    value_every: int = 1
    lr: float = 5e-4
    anneal_lr: bool = False
    adam_eps: float = 1e-5
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    adv_coef: float = 0.25
    clip_value_loss: bool = True
    max_grad_norm: float = 0.5
    order_coef: float = 0.0
    order_hidden_sizes: tuple[int, ...] = ()
    encoder: Literal["auto", "mlp", "nature_cnn", "impala"] = "auto"
    encoder_init: Literal["orthogonal", "xavier", "default"] = "orthogonal"
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: Literal["tanh", "relu"] = "tanh"

    def validate(self) -> None:
        for name in ("num_steps", "num_minibatches", "policy_epochs", "value_epochs", "value_every"):
            require(getattr(self, name) >= 1, f"params.{name}", getattr(self, name), "an integer >= 1")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 <= self.gae_lambda <= 1.0, "params.gae_lambda", self.gae_lambda, "a number in [0, 1]")
        for name in ("lr", "clip_coef", "max_grad_norm"):
            require(getattr(self, name) > 0, f"params.{name}", getattr(self, name), "a number > 0")
        for name in ("ent_coef", "adv_coef", "order_coef"):
            require(getattr(self, name) >= 0, f"params.{name}", getattr(self, name), "a number >= 0")
        require(all(h >= 1 for h in self.order_hidden_sizes), "params.order_hidden_sizes", self.order_hidden_sizes,
                "a list of positive integers (empty: a linear discriminator)")
        require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "params.hidden_sizes",
                self.hidden_sizes, "a non-empty list of positive integers")


# ----------------------------------------------------------------------------------------------- networks
class DAACPolicy(nn.Module):
    """Policy torso with a policy head (gain 0.01) and an advantage head (gain 1) on ``[features, onehot(a)]``.

    ``forward(obs [N, ...]) -> (logits [N, A], features [N, F])``; ``advantage(features, actions [N]) -> [N]``.
    """

    def __init__(self, obs_shape, num_actions: int, encoder: str, hidden_sizes, activation: str,
                 encoder_init: str = "orthogonal"):
        super().__init__()
        self.num_actions = num_actions
        self.encoder = build_encoder(obs_shape, encoder, hidden_sizes, activation, encoder_init)
        self.policy_head = init_linear(nn.Linear(self.encoder.out_dim, num_actions), gain=0.01)
        self.advantage_head = init_linear(nn.Linear(self.encoder.out_dim + num_actions, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(obs)
        return self.policy_head(features), features

    def advantage(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(actions.long(), self.num_actions).to(features.dtype)
        return self.advantage_head(torch.cat([features, onehot], dim=-1)).squeeze(-1)


class OrderDiscriminator(nn.Module):
    """IDAAC's D: ``[e_i, e_j] [N, 2F] -> logit [N]`` of P(s_j precedes s_i); linear without hidden sizes."""

    def __init__(self, feature_dim: int, hidden_sizes=()):
        super().__init__()
        self.mlp = MLP(2 * feature_dim, tuple(hidden_sizes), activation="relu", out_dim=1, out_gain=1.0)

    def forward(self, features: torch.Tensor, other_features: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([features, other_features], dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------- pure functions
def advantage_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DAAC's L_A = mean (A_theta(s, a) - A_hat)^2 over the minibatch ([N] each; A_hat the normalised GAE)."""
    return (predicted - target).square().mean()


def order_classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The discriminator's binary cross entropy: ``-mean(y log D + (1 - y) log(1 - D))``, D = sigmoid(logits)."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def order_confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """IDAAC's encoder loss L_E = ``-mean(0.5 log D + 0.5 log(1 - D))``: smallest (log 2) when D = 1/2."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))


def episode_pairs(valid: torch.Tensor, ends: torch.Tensor, generator: torch.Generator):
    """For every state of a rollout, another state of the same episode segment, uniformly (possibly itself).

    ``valid, ends`` bool ``[T, B]`` (time-major). A segment is a maximal run of valid steps of one env that no
    episode end cuts (next-step autoreset dummies are invalid and belong to no pair). Returns, over the flat
    time-major index ``t * B + b``: ``other`` int64 [T * B] (the partner's flat index), ``label`` float32
    [T * B] (1 when the partner comes strictly earlier, the authors' label), ``mask`` bool [T * B] (valid).
    """
    T, B = valid.shape
    device = valid.device
    v = valid.t().reshape(-1)
    e = ends.t().reshape(-1)
    t = torch.arange(T, device=device).repeat(B)
    breaks = t == 0
    breaks[1:] |= e[:-1] | (v[1:] != v[:-1])
    segment = torch.cumsum(breaks.long(), 0) - 1
    counts = torch.bincount(segment)
    starts = torch.cumsum(counts, 0) - counts
    start, length = starts[segment], counts[segment]
    u = torch.rand(T * B, generator=generator, device=generator.device).to(device)
    partner = start + torch.minimum((u * length).long(), length - 1)  # env-major position of the partner
    position = torch.arange(T * B, device=device)
    label = (partner < position).to(torch.float32)

    def time_major(x):
        return x.view(B, T).t().reshape(-1)

    partner_flat = (partner % T) * B + partner // T
    return time_major(partner_flat), time_major(label), time_major(v)


# ----------------------------------------------------------------------------------------------- algorithm
class DAAC:
    Config = DAACConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: DAACConfig = config.params
        p = self.params
        self.device = device
        self.env_spec = env_spec
        require(env_spec.discrete, "env.id", env_spec.env_id,
                "an env with discrete actions (the advantage head one-hot encodes the action)")
        self.policy = DAACPolicy(env_spec.obs_shape, env_spec.num_actions, p.encoder, p.hidden_sizes,
                                 p.activation, p.encoder_init).to(device)
        self.value_net = ValueNetwork(env_spec.obs_shape, p.encoder, p.hidden_sizes, p.activation,
                                      encoder_init=p.encoder_init).to(device)
        self.dist = Categorical(env_spec.num_actions)
        self.policy_optimizer = make_adam(self.policy.parameters(), lr=p.lr, eps=p.adam_eps)
        self.value_optimizer = make_adam(self.value_net.parameters(), lr=p.lr, eps=p.adam_eps)
        self.discriminator = self.discriminator_optimizer = None
        if p.order_coef > 0:
            self.discriminator = OrderDiscriminator(self.policy.encoder.out_dim, p.order_hidden_sizes).to(device)
            self.discriminator_optimizer = make_adam(self.discriminator.parameters(), lr=p.lr, eps=p.adam_eps)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.batch_size = config.env.num_envs * p.num_steps
        self.num_iterations = max(config.total_steps // self.batch_size, 1)
        self.steps = 0
        self.iteration = 0
        self._collector: RolloutCollector | None = None
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def _act(self, obs: torch.Tensor):
        logits, _ = self.policy(obs)
        actions = self.dist.sample(logits, self.generator)
        log_probs = self.dist.log_prob(logits, actions)
        values = self.value_net(obs)
        return tuple(x.cpu().numpy() for x in (actions, log_probs, values, logits))

    @torch.no_grad()
    def _value(self, obs: torch.Tensor) -> np.ndarray:
        return self.value_net(obs).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        logits, _ = self.policy(torch.as_tensor(obs, device=self.device))
        return policy_actions(self.dist, logits, deterministic, self.generator)

    def value_functions(self) -> dict[str, nn.Module]:
        return {"value": self.value_net}

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy(obs)[1]

    # ------------------------------------------------------------------ one iteration
    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        if p.anneal_lr:
            lr = linear_schedule(p.lr, 0.0, self.iteration / self.num_iterations)
            for optimizer in (self.policy_optimizer, self.value_optimizer, self.discriminator_optimizer):
                for group in (optimizer.param_groups if optimizer is not None else []):
                    group["lr"] = lr
        if self._collector is None:
            self._collector = RolloutCollector(envs, p.num_steps, self.dist.param_dim, self.device)
        self.policy.eval()
        rollout, episode_returns, episode_lengths = self._collector.collect(envs, self._act, self._value)
        self.policy.train()
        with torch.no_grad():
            advantages = gae(rollout.rewards, rollout.values, rollout.discounts(p.gamma), p.gae_lambda,
                             episode_ends=rollout.ends)
            returns = advantages + rollout.values[:-1]
        batch = self.make_batch(rollout, advantages, returns)
        metrics = self.policy_phase(batch)
        if self.iteration % p.value_every == 0:
            metrics.update(self.value_phase(batch))
        self.last_episode_returns = episode_returns
        self.steps += self.batch_size
        self.iteration += 1
        metrics["lr"] = self.policy_optimizer.param_groups[0]["lr"]
        if episode_returns.size:
            metrics["episode_return"] = float(episode_returns.mean())
            metrics["episode_length"] = float(episode_lengths.mean())
            metrics["episodes"] = float(episode_returns.size)
        return metrics

    def make_batch(self, rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rollout's valid transitions, advantages normalised over all of them; IDAAC adds each state's
        partner observation and order label (:func:`episode_pairs`)."""
        pairs = {}
        if self.discriminator is not None:
            partner, label, _ = episode_pairs(rollout.valid, rollout.ends, self.generator)
            pairs = {"partner": partner.view(rollout.valid.shape), "order": label.view(rollout.valid.shape)}
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_values=rollout.values[:-1],
                                  advantages=advantages, returns=returns, **pairs)
        batch["advantages"] = losses.normalize(batch["advantages"])
        if pairs:
            batch["other_obs"] = rollout.obs.reshape(-1, *rollout.obs.shape[2:])[batch.pop("partner")]
        return batch

    def policy_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``L_clip - c_e H + alpha_a L_A (+ alpha_i L_E)`` on one minibatch, and its detached parts
        ``[L_clip, H, L_A, approx_kl, clip_fraction, L_E, discriminator loss, discriminator accuracy]``.
        With IDAAC, first one discriminator step on detached embeddings."""
        p = self.params
        logits, features = self.policy(mb["obs"])
        log_probs = self.dist.log_prob(logits, mb["actions"])
        pg_loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(log_probs, mb["old_log_probs"],
                                                                      mb["advantages"], p.clip_coef)
        entropy = self.dist.entropy(logits).mean()
        adv_loss = advantage_loss(self.policy.advantage(features, mb["actions"]), mb["advantages"])
        loss = pg_loss - p.ent_coef * entropy + p.adv_coef * adv_loss
        zero = torch.zeros((), device=self.device)
        confusion = disc_loss = disc_acc = zero
        if self.discriminator is not None:
            other_features = self.policy.encoder(mb["other_obs"])
            disc_logits = self.discriminator(features.detach(), other_features.detach())
            disc_loss = order_classifier_loss(disc_logits, mb["order"])
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            clip_grad_norm(list(self.discriminator.parameters()), p.max_grad_norm)
            adam_step(self.discriminator_optimizer)
            disc_acc = ((disc_logits.detach() > 0).float() == mb["order"]).float().mean()
            confusion = order_confusion_loss(self.discriminator(features, other_features))
            loss = loss + p.order_coef * confusion
        parts = torch.stack([pg_loss.detach(), entropy.detach(), adv_loss.detach(), approx_kl, clip_frac,
                             confusion.detach(), disc_loss.detach(), disc_acc])
        return loss, parts

    def policy_phase(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        p = self.params
        params_list = list(self.policy.parameters())
        stats = []
        for _epoch in range(p.policy_epochs):
            for mb in shuffled_minibatches(batch, p.num_minibatches, self.generator):
                loss, parts = self.policy_loss(mb)
                self.policy_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.policy_optimizer)
                stats.append(torch.cat([parts, grad_norm.reshape(1)]))
        names = ["loss/policy", "entropy", "loss/advantage", "approx_kl", "clip_fraction", "idaac/confusion_loss",
                 "idaac/discriminator_loss", "idaac/discriminator_accuracy", "grad_norm"]
        table = torch.stack(stats)
        check_finite(dict(zip(names, table.sum(0))), f"DAAC policy phase {self.iteration}")
        out = dict(zip(names, table.mean(0).tolist()))
        if self.discriminator is None:
            for name in names[5:8]:
                del out[name]
        return out

    def value_phase(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """E_V epochs of the (clipped) value loss on V_phi alone."""
        p = self.params
        params_list = list(self.value_net.parameters())
        clip = p.clip_coef if p.clip_value_loss else None
        stats = []
        for _epoch in range(p.value_epochs):
            for mb in shuffled_minibatches(batch, p.num_minibatches, self.generator):
                v_loss = losses.value_loss(self.value_net(mb["obs"]), mb["returns"], mb["old_values"], clip)
                self.value_optimizer.zero_grad(set_to_none=True)
                v_loss.backward()
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.value_optimizer)
                stats.append(torch.stack([v_loss.detach(), grad_norm]))
        table = torch.stack(stats)
        check_finite({"loss/value": table[:, 0].sum()}, f"DAAC value phase {self.iteration}")
        with torch.no_grad():
            ret, old = batch["returns"], batch["old_values"]
            var = ret.var()
            explained = 1.0 - (ret - old).var() / var if var > 0 else torch.nan
        means = table.mean(0).tolist()
        return {"loss/value": means[0], "value_grad_norm": means[1], "explained_variance": float(explained)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "value_net": self.value_net.state_dict(),
            "discriminator": None if self.discriminator is None else self.discriminator.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "value_optimizer": self.value_optimizer.state_dict(),
            "discriminator_optimizer": (None if self.discriminator_optimizer is None
                                        else self.discriminator_optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.value_net.load_state_dict(state["value_net"])
        self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])


ALGORITHMS = {
    "daac": Entry(DAAC, "DAAC: decoupled policy (+ advantage head) and value networks (DCPG paper, Table 5 baseline)"),
    "idaac": Entry(DAAC, "IDAAC: DAAC + adversarial order discriminator on the policy torso, alpha_i = 0.001 "
                         "(DCPG paper, Table 4)", defaults={"order_coef": 0.001}, preset_prefix="daac"),
}
