"""Evaluation of a policy on separate env instances (the training loop's periodic and final evaluations,
``aclab eval``).

``evaluate(algo, config, split)`` runs ``algo.act`` on fresh envs built from the run's config (an
``eval_options`` split: Procgen level sets, other envs new seeds) and returns raw episode returns.
``algo`` is any object with ``act(obs, deterministic)``; ``config`` an :class:`aclab.config.Config`.
An evaluation draws on its own random streams (:mod:`aclab.evaluate.rng`), never on the training's.
"""

from __future__ import annotations

import math

import numpy as np

from aclab.config import Config
from aclab.envs import build_envs, parse_env_id
from aclab.evaluate.rng import evaluation_seed, own_streams
from aclab.runs import check_stop

EVAL_SEED_OFFSET = 1_000_003


def eval_options(config: Config, split: str) -> dict:
    """Env options for an evaluation split: Procgen uses its level sets, other envs new seeds."""
    family, _ = parse_env_id(config.env.id)
    if family == "procgen":
        return {"levels": "train" if split == "train" else "test"}
    return {}


def evaluate(algo, config: Config, split: str = "test", episodes: int | None = None,
             train_envs=None, deterministic: bool | None = None) -> list[float]:
    """Raw returns of ``episodes`` episodes on separate env instances.

    Each eval env contributes its first episodes in order (Procgen protocol: the first episode of
    each env), so short episodes are not over-represented. Observation-normalisation statistics are
    copied from ``train_envs`` and frozen. Random draws come from the evaluation's own streams for
    (seed, split, ``algo.steps``), and the training's RNG states are left untouched.
    """
    with own_streams(algo, evaluation_seed(config.seed, split, getattr(algo, "steps", 0))):
        return _evaluate(algo, config, split, episodes, train_envs, deterministic)


def _evaluate(algo, config: Config, split: str, episodes: int | None, train_envs, deterministic: bool | None
              ) -> list[float]:
    episodes = config.eval.episodes if episodes is None else episodes
    deterministic = config.eval.deterministic if deterministic is None else deterministic
    num_envs = min(config.eval.num_envs, episodes)
    per_env = math.ceil(episodes / num_envs)
    envs = build_envs(config, num_envs=num_envs, seed=config.seed + EVAL_SEED_OFFSET,
                      options=eval_options(config, split))
    try:
        if train_envs is not None:
            envs.copy_normalization_from(train_envs, freeze=True)
        envs.reset(seed=config.seed + EVAL_SEED_OFFSET)
        counts = np.zeros(num_envs, dtype=np.int64)
        collected: list[list[float]] = [[] for _ in range(num_envs)]
        max_steps = 1_000_000
        for _ in range(max_steps):
            check_stop()
            result = envs.step(algo.act(envs.obs, deterministic))
            for i in np.nonzero(result.episode_length > 0)[0]:
                if counts[i] < per_env:
                    collected[i].append(float(result.episode_return[i]))
                    counts[i] += 1
            if counts.sum() >= num_envs * per_env:
                break
    finally:
        envs.close()
    flat = [r for k in range(per_env) for env_returns in collected for r in env_returns[k:k + 1]]
    return flat[:episodes]
