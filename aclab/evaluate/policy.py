"""Evaluation of a policy on separate env instances (the training loop's periodic and final evaluations,
``aclab eval``).

``evaluate_splits(algo, config, splits)`` runs ``algo.act`` on new envs built from the run's config, one
env set per split, and returns an :class:`EvalResult` per split; ``evaluate(algo, config, split)`` is
the one-split shortcut returning the raw episode returns. ``algo`` is any object with
``act(obs, deterministic)``; ``config`` an :class:`aclab.config.Config`.

Level sets (Procgen; :func:`eval_levels`): the run's training range ``[start, start + n)`` comes from
``env.options``; split ``train`` plays exactly that range, split ``test`` plays ``eval.levels``:
``"test"`` (default) the full distribution (``num_levels = 0``, Cobbe et al. 2020 and the DCPG
authors' code) or ``"unseen"`` (levels guaranteed outside the training range). The ranges are set
explicitly, whatever ``levels`` / ``num_levels`` / ``start_level`` the training options hold. Other
env families evaluate on new seeds.

Seeds: ``eval.seeding = "fixed"`` evaluates every time on the same env seeds (the same Procgen levels
for every evaluation and every algorithm of a seed); ``"fresh"`` draws new ones at each evaluation
(derived from the run's seed and the step, so a resumed run draws the same), as the DCPG authors' code
does for its curves.

Batching: all envs of all requested splits are stepped together; each step makes **one** ``algo.act``
call over the observations of the envs that still owe episodes (an env that has collected its episodes
leaves the forward pass; a split whose envs are all done is closed). Each env contributes its first
``ceil(episodes / num_envs)`` episodes in order (Procgen protocol: the first episode of each env), so
short episodes are not over-represented.

Random draws: an evaluation draws on its own random streams (:mod:`aclab.evaluate.rng`), never on the
training's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aclab.config import Config
from aclab.envs import build_envs, parse_env_id
from aclab.envs.registry import LevelRange, procgen_eval_levels
from aclab.evaluate.rng import evaluation_seed, own_streams
from aclab.runs import check_stop

EVAL_SEED_OFFSET = 1_000_003
MAX_EVAL_STEPS = 1_000_000


def eval_levels(config: Config, split: str) -> LevelRange | None:
    """The Procgen level range of an evaluation split (None for other env families): ``train`` -> the
    training range of ``config.env.options``, ``test`` -> ``config.eval.levels`` (``"test"``: all levels,
    ``"unseen"``: outside the training range)."""
    family, _ = parse_env_id(config.env.id)
    if family != "procgen":
        return None
    return procgen_eval_levels(config.env.options, "train" if split == "train" else config.eval.levels)


def eval_options(config: Config, split: str) -> dict:
    """Env options for an evaluation split: Procgen's explicit level range, nothing for other envs."""
    levels = eval_levels(config, split)
    return {} if levels is None else {"levels": "train", **levels.options()}


def eval_seed(config: Config, step: int = 0) -> int:
    """Env seed of an evaluation: ``seed + EVAL_SEED_OFFSET`` (``eval.seeding = "fixed"``), or one drawn
    from ``(seed, EVAL_SEED_OFFSET, step)`` (``"fresh"``: new levels / initial states at every step)."""
    if config.eval.seeding == "fixed":
        return config.seed + EVAL_SEED_OFFSET
    return int(np.random.SeedSequence([config.seed, EVAL_SEED_OFFSET, int(step)]).generate_state(1)[0])


@dataclass
class EvalResult:
    """One split's evaluation. ``returns`` / ``lengths``: raw returns and lengths of the counted episodes
    (by episode index: first episode of every env, then the second, ...; the first ``episodes`` of that
    order). ``level_seeds``:
    the Procgen level of each counted episode (None for other envs). ``levels``: the split's level range.
    ``seed``: the env seed used. With a ``value_fn``, per counted episode: ``start_values`` V(s_0),
    ``discounted_returns`` (sum of gamma^t r_t over the rewards the critic is trained on: normalised
    when reward normalisation is on, with the training statistics frozen), ``truncated`` and
    ``bootstrap_values`` (gamma^L V(s_L) at a truncation's final observation, else 0)."""

    split: str
    returns: list[float]
    lengths: list[int]
    level_seeds: list[int] | None
    levels: LevelRange | None
    seed: int
    start_values: list[float] = field(default_factory=list)
    discounted_returns: list[float] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    bootstrap_values: list[float] = field(default_factory=list)


class _SplitEnvs:
    """The envs of one split and what they have collected so far (episodes in per-env lists)."""

    def __init__(self, split: str, envs, per_env: int, episodes: int, levels: LevelRange | None, seed: int,
                 track_values: bool):
        self.split, self.envs, self.per_env, self.levels, self.seed = split, envs, per_env, levels, seed
        self.num_episodes = episodes
        n = envs.num_envs
        self.counts = np.zeros(n, dtype=np.int64)
        self.episodes: list[list[tuple]] = [[] for _ in range(n)]
        self.track_values = track_values
        self.level = None
        if levels is not None:
            self.level = np.asarray(envs.info["level_seed"], dtype=np.int64).copy()
        self.start_value = np.zeros(n)
        self.disc_return = np.zeros(n)
        self.discount = np.ones(n)
        self.open = False

    @property
    def active(self) -> np.ndarray:
        return np.nonzero(self.counts < self.per_env)[0]

    def filler(self, num: int, actions: np.ndarray) -> np.ndarray:
        return np.zeros((num, *actions.shape[1:]), dtype=actions.dtype)

    def result(self) -> EvalResult:
        ordered = [ep for k in range(self.per_env) for env_eps in self.episodes for ep in env_eps[k:k + 1]]
        ordered = ordered[:self.num_episodes]
        out = EvalResult(self.split, [e[0] for e in ordered], [e[1] for e in ordered],
                         None if self.level is None else [e[2] for e in ordered], self.levels, self.seed)
        if self.track_values:
            out.start_values = [e[3] for e in ordered]
            out.discounted_returns = [e[4] for e in ordered]
            out.truncated = [e[5] for e in ordered]
            out.bootstrap_values = [e[6] for e in ordered]
        return out


def evaluate_splits(algo, config: Config, splits: Sequence[str], *, episodes: int | None = None, train_envs=None,
                    deterministic: bool | None = None, step: int = 0,
                    value_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                    gamma: float | None = None) -> dict[str, EvalResult]:
    """Evaluate ``algo`` on every split of ``splits`` at once; ``{split: EvalResult}``.

    ``episodes`` per split (default ``eval.episodes``) from ``min(eval.num_envs, episodes)`` envs each.
    Observation/reward normalisation statistics are copied from ``train_envs`` and frozen. ``step``
    picks the seed under ``eval.seeding = "fresh"``. ``value_fn`` (obs ``[n, ...]`` -> values ``[n]``)
    with ``gamma`` also records, per counted episode, V(s_0), the discounted return and the bootstrap
    at a truncation (the DCPG paper's value bias at episode starts, Appendix C).
    Random draws come from the evaluation's own streams for (seed, splits, ``algo.steps``); the training's
    RNG states are left untouched.
    """
    stream = splits[0] if len(splits) == 1 else "+".join(splits)
    with own_streams(algo, evaluation_seed(config.seed, stream, getattr(algo, "steps", step))):
        return _evaluate_splits(algo, config, splits, episodes, train_envs, deterministic, step, value_fn, gamma)


def _evaluate_splits(algo, config: Config, splits: Sequence[str], episodes: int | None, train_envs,
                     deterministic: bool | None, step: int, value_fn, gamma) -> dict[str, EvalResult]:
    episodes = config.eval.episodes if episodes is None else episodes
    deterministic = config.eval.deterministic if deterministic is None else deterministic
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if value_fn is not None and gamma is None:
        raise ValueError("value_fn needs the discount gamma of the returns it is compared with")
    num_envs = min(config.eval.num_envs, episodes)
    per_env = math.ceil(episodes / num_envs)
    seed = eval_seed(config, step)
    groups: list[_SplitEnvs] = []
    try:
        for split in splits:
            envs = build_envs(config, num_envs=num_envs, seed=seed, options=eval_options(config, split))
            if train_envs is not None:
                envs.copy_normalization_from(train_envs, freeze=True)
            envs.reset(seed=seed)
            group = _SplitEnvs(split, envs, per_env, episodes, eval_levels(config, split), seed, value_fn is not None)
            groups.append(group)
            if value_fn is not None:
                group.start_value[:] = value_fn(envs.obs)
                group.open = True
        live = list(groups)
        for _ in range(MAX_EVAL_STEPS):
            check_stop()
            live = [g for g in live if g.active.size]
            if not live:
                break
            active = [g.active for g in live]
            actions = np.asarray(algo.act(np.concatenate([g.envs.obs[idx] for g, idx in zip(live, active)]),
                                          deterministic))
            offset = 0
            for group, idx in zip(live, active):
                full = group.filler(group.envs.num_envs, actions)
                full[idx] = actions[offset:offset + idx.size]
                offset += idx.size
                _step(group, full, value_fn, gamma)
            for group in groups:
                if group.envs is not None and not group.active.size:
                    group.envs.close()
                    group.envs = None
    finally:
        for group in groups:
            if group.envs is not None:
                group.envs.close()
                group.envs = None
    return {group.split: group.result() for group in groups}


def _step(group: _SplitEnvs, actions: np.ndarray, value_fn, gamma) -> None:
    """Step one split's envs and book the episodes that ended (only an env's first ``per_env``)."""
    envs = group.envs
    was_dummy = envs.next_is_dummy.copy()
    result = envs.step(actions)
    owed = group.counts < group.per_env
    if value_fn is not None:
        counting = owed & ~was_dummy
        group.disc_return[counting] += group.discount[counting] * result.reward[counting]
        group.discount[counting] *= gamma
    ended = np.nonzero((result.episode_length > 0) & owed)[0]
    bootstrap = np.zeros(envs.num_envs)
    if value_fn is not None:
        cut = ended[result.truncated[ended] & ~result.terminated[ended]]
        if cut.size:  # the true final observation of a truncated episode: bootstrap gamma^L V(s_L)
            bootstrap[cut] = group.discount[cut] * value_fn(result.obs[cut])
    for i in ended:
        level = None if group.level is None else int(group.level[i])
        group.episodes[i].append((float(result.episode_return[i]), int(result.episode_length[i]), level,
                                  float(group.start_value[i]), float(group.disc_return[i]),
                                  bool(result.truncated[i] and not result.terminated[i]), float(bootstrap[i])))
        group.counts[i] += 1
    if group.level is not None and was_dummy.any():  # a dummy step resets: the new episode's level
        group.level[was_dummy] = np.asarray(envs.info["level_seed"], dtype=np.int64)[was_dummy]
    if value_fn is not None:
        starting = np.nonzero(was_dummy & (group.counts < group.per_env))[0]
        if starting.size:  # the first observation of the env's next counted episode
            group.start_value[starting] = value_fn(result.obs[starting])
            group.disc_return[starting] = 0.0
            group.discount[starting] = 1.0


def evaluate(algo, config: Config, split: str = "test", episodes: int | None = None,
             train_envs=None, deterministic: bool | None = None, step: int = 0) -> list[float]:
    """Raw returns of ``episodes`` episodes of one split (see :func:`evaluate_splits`)."""
    return evaluate_splits(algo, config, [split], episodes=episodes, train_envs=train_envs,
                           deterministic=deterministic, step=step)[split].returns
