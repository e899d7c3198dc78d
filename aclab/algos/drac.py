"""DrAC and UCB-DrAC (Raileanu, Goldstein, Yarats, Kostrikov & Fergus 2021), the DCPG paper's baseline
(DCPG paper, Appendix D and Table 5: alpha_r = 0.1, c = 0.1, K = 10 for every Procgen game).

DrAC is PPO with a regulariser that makes the policy and the value invariant to an image augmentation f::

    each iteration (PPO's rollout, GAE, advantages normalised over the rollout):
        UCB-DrAC only: reward the arm used for the last update with the mean return R of this rollout,
                       then pick the next arm (augmentation) by sliding-window UCB
        for each epoch, for each minibatch:
            L = L_clip - c_e H + c_v L_V + alpha_r (G_pi + G_V)
            G_pi = KL(sg(pi(.|s)) || pi(.|f(s)))          G_V = (sg(V(s)) - V(f(s)))^2       (paper)
            G_pi = -log pi(a'|f(s)), a' ~ pi(.|s)        G_V = 0.5 (sg(V(s)) - V(f(s)))^2   (authors' code)
        fresh augmentation parameters per image and minibatch

The bandit (:class:`SlidingWindowUCB`) picks ``argmax_f Q(f) + c sqrt(log t / N(f))``, with ``Q(f)`` the mean of
the last ``K`` rewards of arm ``f``. The augmentations are :data:`aclab.data.augmentations.AUGMENTATIONS`.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from aclab.algos.common import Entry, adam_step, check_finite, clip_grad_norm
from aclab.algos.ppo import PPO, PPOConfig
from aclab.config import Config, require
from aclab.core import losses
from aclab.data.augmentations import AUGMENTATION_NAMES, AUGMENTATIONS, to_unit_float
from aclab.data.rollout import shuffled_minibatches, valid_transitions


@dataclass
class DrACConfig(PPOConfig):
    """PPO's hyperparameters (see :class:`aclab.algos.ppo.PPOConfig`) plus

    ``aug_coef``: alpha_r, the weight of ``G_pi + G_V`` (0.1). ``augmentation``: the fixed augmentation of DrAC
    (``selection = "fixed"``). ``selection = "ucb"`` (UCB-DrAC) picks one of ``augmentations`` before every
    update with :class:`SlidingWindowUCB` (``ucb_coef`` = c, ``ucb_window`` = K; ``ucb_init = "try_each"``
    pulls every arm once first, the textbook reading of the paper's formula; ``"authors"`` starts, as the
    authors' code, from N = 1, Q = 0, t = 1 for every arm). ``regularizer``: ``"paper"`` (exact KL, squared
    error) or ``"authors"`` (sampled-action negative log-likelihood, half squared error).
    """

    aug_coef: float = 0.1
    augmentation: Literal["crop", "random-conv", "grayscale", "flip", "rotate", "cutout", "cutout-color",
                          "color-jitter"] = "crop"
    selection: Literal["fixed", "ucb"] = "fixed"
    augmentations: tuple[str, ...] = AUGMENTATION_NAMES
    ucb_coef: float = 0.1
    ucb_window: int = 10
    ucb_init: Literal["try_each", "authors"] = "try_each"
    regularizer: Literal["paper", "authors"] = "paper"

    def validate(self) -> None:
        super().validate()
        require(self.aug_coef >= 0, "params.aug_coef", self.aug_coef, "a number >= 0")
        require(self.ucb_coef >= 0, "params.ucb_coef", self.ucb_coef, "a number >= 0")
        require(self.ucb_window >= 1, "params.ucb_window", self.ucb_window, "an integer >= 1")
        require(len(self.augmentations) >= 1 and all(a in AUGMENTATION_NAMES for a in self.augmentations),
                "params.augmentations", self.augmentations, f"a non-empty list of {', '.join(AUGMENTATION_NAMES)}")


# ----------------------------------------------------------------------------------------------- bandit
class SlidingWindowUCB:
    """UCB over ``num_arms`` arms with sliding-window value estimates (UCB-DrAC paper, Section 3.2).

    ``select()`` returns ``argmax_i Q_i + c sqrt(log t / N_i)`` (first index on ties), where ``Q_i`` is the mean of
    the last ``window`` rewards of arm ``i`` (0 before any), ``N_i`` the number of pulls of arm ``i`` and ``t`` the
    total number of pulls. ``init="try_each"``: N, t start at 0 and an arm never pulled is chosen first;
    ``init="authors"``: N and t start at 1 (so every arm scores 0 at the start and arm 0 goes first).
    """

    def __init__(self, num_arms: int, coef: float, window: int, init: str = "try_each"):
        if init not in ("try_each", "authors"):
            raise ValueError(f"unknown init {init!r}; expected 'try_each' or 'authors'")
        self.num_arms, self.coef, self.window, self.init = num_arms, float(coef), int(window), init
        start = 1 if init == "authors" else 0
        self.counts = np.full(num_arms, start, dtype=np.int64)
        self.total = start
        self.rewards = [collections.deque(maxlen=self.window) for _ in range(num_arms)]

    def values(self) -> np.ndarray:
        """Q [num_arms]: the sliding-window mean reward of each arm (0 for an arm without rewards)."""
        return np.array([float(np.mean(r)) if r else 0.0 for r in self.rewards])

    def scores(self) -> np.ndarray:
        """The UCB score of every arm (``inf`` for an arm never pulled, with ``init="try_each"``)."""
        counts = self.counts.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.coef * np.sqrt(math.log(max(self.total, 1)) / counts)
        return np.where(counts > 0, self.values() + bonus, np.inf)

    def select(self) -> int:
        return int(np.argmax(self.scores()))

    def update(self, arm: int, reward: float) -> None:
        self.total += 1
        self.counts[arm] += 1
        self.rewards[arm].append(float(reward))

    def state_dict(self) -> dict:
        return {"counts": self.counts.copy(), "total": self.total, "rewards": [list(r) for r in self.rewards]}

    def load_state_dict(self, state: dict) -> None:
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.total = int(state["total"])
        for deque, rewards in zip(self.rewards, state["rewards"]):
            deque.clear()
            deque.extend(rewards)


# ----------------------------------------------------------------------------------------------- regulariser
def drac_regularizers(dist, params: torch.Tensor, values: torch.Tensor, aug_params: torch.Tensor,
                      aug_values: torch.Tensor, kind: str,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(G_pi, G_V) of DrAC (UCB-DrAC paper, Section 3.1) over a minibatch; gradients reach only the augmented
    branch.

    ``params [N, P], values [N]``: the network on the original observations; ``aug_params, aug_values``: on the
    augmented ones. ``kind="paper"``: ``G_pi = mean KL(sg(pi(.|s)) || pi(.|f(s)))``, ``G_V = mean (sg(V(s)) -
    V(f(s)))^2``. ``kind="authors"``: ``G_pi = -mean log pi(a'|f(s))`` with ``a' ~ pi(.|s)`` drawn from
    ``generator``, ``G_V = 0.5 mean (sg(V(s)) - V(f(s)))^2``.
    """
    params, values = params.detach(), values.detach()
    if kind == "paper":
        return dist.kl(params, aug_params).mean(), (values - aug_values).square().mean()
    if kind == "authors":
        actions = dist.sample(params, generator)
        return -dist.log_prob(aug_params, actions).mean(), 0.5 * (values - aug_values).square().mean()
    raise ValueError(f"unknown regularizer {kind!r}; expected 'paper' or 'authors'")


# ----------------------------------------------------------------------------------------------- algorithm
class DrAC(PPO):
    """PPO plus DrAC's augmentation regulariser; with ``selection="ucb"``, UCB-DrAC."""

    Config = DrACConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        shape = tuple(env_spec.obs_shape)
        require(len(shape) == 3 and shape[0] == 3, "env.id", env_spec.env_id,
                f"an env with RGB image observations [3, H, W] for DrAC's augmentations (got shape {shape})")
        super().__init__(config, env_spec, device)
        p: DrACConfig = self.params
        self.arms = tuple(p.augmentations) if p.selection == "ucb" else (p.augmentation,)
        self.bandit = SlidingWindowUCB(len(self.arms), p.ucb_coef, p.ucb_window, p.ucb_init)
        self.current_arm = 0
        self.aug_generator = torch.Generator(device=device)
        self.aug_generator.manual_seed(config.seed + 7_777)

    def choose_augmentation(self, rollout_return: float) -> int:
        """UCB-DrAC: reward the arm of the previous update with this rollout's mean return, pick the next arm."""
        if self.params.selection == "ucb":
            if self.iteration > 0:
                self.bandit.update(self.current_arm, rollout_return)
            self.current_arm = self.bandit.select()
        return self.current_arm

    def update(self, rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        p: DrACConfig = self.params
        batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                                  old_log_probs=rollout.log_probs, old_values=rollout.values[:-1],
                                  advantages=advantages, returns=returns)
        arm = self.choose_augmentation(float(batch["returns"].mean()))
        augment = AUGMENTATIONS[self.arms[arm]]
        if p.norm_adv == "batch":
            batch["advantages"] = losses.normalize(batch["advantages"])
        value_clip = None
        if p.clip_value_loss:
            value_clip = p.value_clip_coef if p.value_clip_coef is not None else p.clip_coef
        params_list = list(self.net.parameters())
        stats = []
        for _epoch in range(p.num_epochs):
            for mb in shuffled_minibatches(batch, p.num_minibatches, self.generator):
                dist_params, values = self.net(mb["obs"])
                log_probs = self.dist.log_prob(dist_params, mb["actions"])
                mb_adv = losses.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
                pg_loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(
                    log_probs, mb["old_log_probs"], mb_adv, p.clip_coef)
                v_loss = losses.value_loss(values, mb["returns"], mb["old_values"], value_clip)
                entropy = self.dist.entropy(dist_params).mean()
                aug_params, aug_values = self.net(augment(to_unit_float(mb["obs"]), self.aug_generator))
                g_pi, g_v = drac_regularizers(self.dist, dist_params, values, aug_params, aug_values, p.regularizer,
                                              self.aug_generator)
                loss = pg_loss + p.vf_coef * v_loss - p.ent_coef * entropy + p.aug_coef * (g_pi + g_v)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = clip_grad_norm(params_list, p.max_grad_norm)
                adam_step(self.optimizer)
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), entropy.detach(), approx_kl, clip_frac,
                                          grad_norm, g_pi.detach(), g_v.detach()]))
        table = torch.stack(stats)
        names = ["loss/policy", "loss/value", "entropy", "approx_kl", "clip_fraction", "grad_norm", "drac/policy_reg",
                 "drac/value_reg"]
        check_finite(dict(zip(names, table.sum(0))), f"DrAC update {self.iteration}")
        out = dict(zip(names, table.mean(0).tolist()))
        out["drac/arm"] = float(arm)
        if p.selection == "ucb":
            for name, q, n in zip(self.arms, self.bandit.values(), self.bandit.counts):
                out[f"ucb/q/{name}"] = float(q)
                out[f"ucb/n/{name}"] = float(n)
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(bandit=self.bandit.state_dict(), current_arm=self.current_arm,
                     aug_generator=self.aug_generator.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bandit.load_state_dict(state["bandit"])
        self.current_arm = int(state["current_arm"])
        self.aug_generator.set_state(state["aug_generator"])


ALGORITHMS = {
    "drac": Entry(DrAC, "DrAC: PPO + augmentation-invariance regulariser, one fixed augmentation (crop)",
                  preset_prefix="drac"),
    "ucb-drac": Entry(DrAC, "UCB-DrAC: DrAC with a sliding-window UCB bandit over 8 augmentations "
                            "(DCPG paper, Table 5 baseline)", defaults={"selection": "ucb"}, preset_prefix="drac"),
}
