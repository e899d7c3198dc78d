"""Prioritised Level Replay (Jiang, Grefenstette & Rocktaeschel 2021) on PPO, the DCPG paper's baseline (DCPG
paper, Appendix D and Table 5: L1 value loss as score, rank prioritisation, beta = 0.1, rho = 0.1).

PLR changes only which level each episode is played on; the learner is PPO unchanged::

    during the rollout, whenever env b's episode ends:  level ~ LevelSampler; env b starts its next episode there
    after the rollout (GAE advantages with the rollout-time values):
        every episode segment of the rollout scores its level: S_l <- mean_t |A_t|     (L1 value loss)
    PPO update

The envs must let the algorithm choose levels (``LEVEL_CONTROL``: the training loop builds them with
``make_env(..., level_control=True)``, see :mod:`aclab.envs.levels`); evaluation envs are the usual ones.
The sampler is :class:`aclab.data.level_sampler.LevelSampler`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from aclab.algos.common import Entry
from aclab.algos.ppo import PPO, PPOConfig
from aclab.config import Config, require
from aclab.data.level_sampler import LevelSampler, segment_scores


@dataclass
class PLRConfig(PPOConfig):
    """PPO's hyperparameters (see :class:`aclab.algos.ppo.PPOConfig`) plus the level sampler's:

    ``score`` (``"value_l1"``: mean |GAE advantage| of the episode, the paper's L1 value loss; ``"gae"``: the
    signed mean), ``score_transform`` (``"rank"`` or ``"power"``, proportional), ``temperature`` beta,
    ``staleness_coef`` rho, ``min_seen_fraction`` (no replay before this fraction of the levels was seen: 0 in
    the paper's replay decision, 1.0 in the authors' code, where its name is rho) and ``score_ema`` (the weight
    of a new score in the level's running score; 1 replaces it, as the paper).
    """

    score: Literal["value_l1", "gae"] = "value_l1"
    score_transform: Literal["rank", "power"] = "rank"
    temperature: float = 0.1
    staleness_coef: float = 0.1
    min_seen_fraction: float = 0.0
    score_ema: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(self.temperature > 0, "params.temperature", self.temperature, "a number > 0")
        require(0.0 <= self.staleness_coef <= 1.0, "params.staleness_coef", self.staleness_coef, "a number in [0, 1]")
        require(0.0 <= self.min_seen_fraction <= 1.0, "params.min_seen_fraction", self.min_seen_fraction,
                "a number in [0, 1]")
        require(0.0 < self.score_ema <= 1.0, "params.score_ema", self.score_ema, "a number in (0, 1]")


class LevelAssigningEnvs:
    """The training envs as the rollout collector sees them: after every step, each env whose episode ended
    gets its next level from the sampler; ``played`` records the level of every step (``[T][B]``)."""

    def __init__(self, envs, sampler: LevelSampler):
        self.envs, self.sampler = envs, sampler
        self.played: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.envs, name)

    def step(self, actions):
        self.played.append(self.envs.current_levels.copy())
        result = self.envs.step(actions)
        for b in np.flatnonzero(result.terminated | result.truncated):
            self.envs.set_next_level(int(b), self.sampler.sample())
        return result


class PLR(PPO):
    Config = PLRConfig
    LEVEL_CONTROL = True

    def __init__(self, config: Config, env_spec, device: torch.device):
        require(getattr(env_spec, "levels", None) is not None, "env.id", env_spec.env_id,
                "envs built with level control (the training loop does this for plr: Procgen with a finite "
                "training range, or a Gymnasium env)")
        super().__init__(config, env_spec, device)
        p: PLRConfig = self.params
        self.sampler = LevelSampler(env_spec.levels, p.score_transform, p.temperature, p.staleness_coef,
                                    p.min_seen_fraction, p.score_ema, seed=config.seed + 31_337)
        self._proxy: LevelAssigningEnvs | None = None

    def iterate(self, envs) -> dict[str, float]:
        self._proxy = LevelAssigningEnvs(envs, self.sampler)
        return super().iterate(self._proxy)

    def update(self, rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        metrics = self.score_levels(rollout, advantages)
        metrics.update(super().update(rollout, advantages, returns))
        return metrics

    def score_levels(self, rollout, advantages: torch.Tensor) -> dict[str, float]:
        """Update the sampler with the scores of this rollout's episode segments (:func:`segment_scores`)."""
        played = np.stack(self._proxy.played)
        scores = segment_scores(advantages.cpu().numpy(), rollout.valid.cpu().numpy(), rollout.ends.cpu().numpy(),
                                played, self.params.score)
        for level, score, _steps in scores:
            self.sampler.update(level, score)
        s = self.sampler
        weights = s.replay_weights()
        nonzero = weights[weights > 0]
        return {
            "plr/seen_fraction": float(s.seen.mean()),
            "plr/replay_probability": s.replay_probability(),
            "plr/score_mean": float(s.scores[s.seen].mean()) if s.seen.any() else 0.0,
            "plr/weights_entropy": float(-(nonzero * np.log(nonzero)).sum()),
            "plr/levels_in_rollout": float(len(np.unique(played[rollout.valid.cpu().numpy()]))),
        }

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])


ALGORITHMS = {
    "plr": Entry(PLR, "Prioritised Level Replay on PPO: L1-value-loss scores, rank prioritisation, beta 0.1, "
                      "staleness rho 0.1 (DCPG paper, Table 5 baseline)"),
}
