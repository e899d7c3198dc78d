"""Prioritised level replay: the sampler's distribution against a slow reference of the PLR formulas, its
replay decision and staleness, segment scores against an independent split, the level-controlled envs
(Gymnasium and Procgen through EnvPool), PLR replaying high-score levels, exact resume."""

from __future__ import annotations

import csv

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from run_rows import assert_resumed_like_uninterrupted

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.data.level_sampler import LevelSampler, segment_scores
from aclab.envs import build_envs, make_env
from aclab.envs.registry import EnvIdError
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ sampler
def _reference_weights(scores, seen, staleness, transform, beta, rho):
    """P_replay = (1 - rho) P_S + rho P_C over seen levels, from the definitions (loops, no sorting)."""
    idx = [i for i in range(len(scores)) if seen[i]]
    h = {}
    for i in idx:
        if transform == "rank":
            rank = 1 + sum(1 for j in idx if scores[j] > scores[i] or (scores[j] == scores[i] and j < i))
            h[i] = (1.0 / rank) ** (1.0 / beta)
        else:
            h[i] = max(scores[i], 0.0) ** (1.0 / beta)
    total_h = sum(h.values())
    total_c = sum(staleness[i] for i in idx)
    out = np.zeros(len(scores))
    for i in idx:
        out[i] = (1 - rho) * h[i] / total_h + (rho * staleness[i] / total_c if total_c > 0 else 0.0)
    return out / out.sum()


@pytest.mark.parametrize("transform", ["rank", "power"])
def test_replay_weights_match_the_formulas(transform):
    rng = np.random.default_rng(0)
    sampler = LevelSampler(range(10, 22), score_transform=transform, temperature=0.5, staleness_coef=0.3)
    scores = rng.random(12)
    scores[3] = scores[5]  # a tie
    for level, score in zip(range(10, 22), scores):
        if level not in (12, 20):
            sampler.update(level, score)
    sampler.staleness = rng.integers(0, 9, 12).astype(float)
    expected = _reference_weights(scores, sampler.seen, sampler.staleness, transform, 0.5, 0.3)
    np.testing.assert_allclose(sampler.replay_weights(), expected, rtol=1e-12)
    assert sampler.replay_weights()[2] == 0 and sampler.replay_weights()[10] == 0


def test_rank_and_proportional_prioritisation_differ():
    scores = {0: 1.0, 1: 2.0, 2: 4.0}
    weights = {}
    for transform in ("rank", "power"):
        sampler = LevelSampler(range(3), score_transform=transform, temperature=1.0, staleness_coef=0.0)
        for level, score in scores.items():
            sampler.update(level, score)
        weights[transform] = sampler.replay_weights()
    np.testing.assert_allclose(weights["rank"], np.array([1 / 3, 1 / 2, 1]) / (11 / 6))
    np.testing.assert_allclose(weights["power"], np.array([1, 2, 4]) / 7)


def test_sampling_replay_decision_and_staleness():
    sampler = LevelSampler(range(10), staleness_coef=0.1, seed=0)
    first = sampler.sample()  # nothing seen: an unseen level, uniformly
    assert sampler.staleness[first] == 0 and sampler.staleness.sum() == 9
    sampler.sample()
    assert sampler.staleness[first] in (1, 0)
    for level in range(4):  # 40% seen: replay with probability 0.4
        sampler.update(level, 1.0 + level)
    draws = np.array([sampler.sample() for _ in range(4000)])
    # a replay draws a seen level; a new level is one of the unseen ones
    replayed = (draws < 4).mean()
    assert 0.36 < replayed < 0.44
    sampler.min_seen_fraction = 0.5
    assert sampler.replay_probability() == 0.0 and all(sampler.sample() >= 4 for _ in range(200))


def test_sampler_replays_the_highest_scores_and_staleness_revisits_the_rest():
    sampler = LevelSampler(range(20), temperature=0.1, staleness_coef=0.1, seed=1)
    for level in range(20):
        sampler.update(level, 0.1 if level != 7 else 5.0)
    draws = np.array([sampler.sample() for _ in range(4000)])
    counts = np.bincount(draws, minlength=20)
    assert counts[7] / 4000 > 0.8  # rank 1 with beta 0.1: (1 - rho) * 1 / sum_k k^-10 ~ 0.9, plus staleness
    assert (counts > 0).all()  # the staleness part still brings every level back


def test_segment_scores_against_a_split_of_each_column():
    rng = np.random.default_rng(2)
    T, B = 30, 4
    adv = rng.normal(size=(T, B))
    ends = rng.random((T, B)) < 0.15
    valid = np.ones((T, B), bool)
    valid[1:] &= ~ends[:-1]
    levels = rng.integers(0, 5, (T, B))
    got = segment_scores(adv, valid, ends, levels, "value_l1")
    finished, running = [], []
    for b in range(B):
        cuts = [t + 1 for t in range(T) if ends[t, b]]
        for piece in np.split(np.arange(T), cuts):
            piece = piece[valid[piece, b]]
            if piece.size == 0:
                continue
            item = (int(levels[piece[0], b]), float(np.abs(adv[piece, b]).mean()), int(piece.size))
            (finished if ends[piece[-1], b] else running).append(item)
    assert got == finished + running
    signed = segment_scores(adv, valid, ends, levels, "gae")
    assert [s for _, s, _ in signed] != [s for _, s, _ in got]


# ------------------------------------------------------------------------------------------------ envs
def test_gymnasium_levels_follow_set_next_level():
    envs = make_env("CartPole-v1", 2, 0, level_control=True, options={"num_levels": 50, "start_level": 100})
    assert envs.spec.levels == tuple(range(100, 150))
    envs.reset()
    assert envs.current_levels.tolist() == [100, 101]  # first episodes: levels in order
    np.testing.assert_allclose(envs.obs[1], gymnasium.make("CartPole-v1").reset(seed=101)[0])
    envs.set_next_level(0, 137)
    for _ in range(500):
        result = envs.step(np.zeros(2, dtype=np.int64))
        if result.terminated[0] or result.truncated[0]:
            break
    assert envs.current_levels[0] == 100
    result = envs.step(np.zeros(2, dtype=np.int64))  # the dummy step starts level 137
    assert result.reward[0] == 0 and not result.terminated[0] and envs.current_levels[0] == 137
    np.testing.assert_allclose(envs.obs[0], gymnasium.make("CartPole-v1").reset(seed=137)[0])
    with pytest.raises(ValueError, match="not one of"):
        envs.set_next_level(1, 7)
    envs.close()


def test_procgen_levels_follow_set_next_level():
    import envpool

    envs = make_env("procgen:coinrun", 2, 0, level_control=True)
    assert envs.spec.levels == tuple(range(200))
    envs.reset()
    envs.set_next_level(1, 42)
    episode_ended = False
    for _ in range(2000):
        result = envs.step(np.full(2, 4, dtype=np.int64))
        if result.terminated[1] or result.truncated[1]:
            episode_ended = True
            break
    assert episode_ended
    envs.step(np.full(2, 4, dtype=np.int64))
    assert envs.current_levels[1] == 42
    ref = envpool.make("CoinrunEasy-v0", env_type="gymnasium", num_envs=1, num_levels=1, start_level=42)
    np.testing.assert_array_equal(envs.obs[1], ref.reset()[0][0])
    ref.close()
    envs.close()
    with pytest.raises(EnvIdError, match="finite set of training levels"):
        make_env("procgen:coinrun", 2, 0, level_control=True, options={"levels": "test"})


def _noisy_levels():
    return NoisyLevels()


def test_level_control_on_own_env_factories_and_not_with_frames():
    from aclab.envs.registry import register_env_factory

    env_id = register_env_factory(_noisy_levels)
    envs = make_env(env_id, 2, 0, level_control=True, options={"num_levels": 30, "start_level": 10})
    assert envs.spec.levels == tuple(range(10, 40))
    envs.reset()
    assert envs.current_levels.tolist() == [10, 11]
    envs.close()
    with pytest.raises(EnvIdError, match="cannot be combined"):
        make_env("CartPole-v1", 1, 0, level_control=True, render=True)


# ------------------------------------------------------------------------------------------------ algorithm
class NoisyLevels(gymnasium.Env):
    """One-dimensional constant observation, episodes of 4 steps; levels >= 15 pay rewards N(0, 3^2), others 0.
    The critic cannot tell levels apart, so |A| (the L1 value loss) is large exactly on the noisy levels."""

    def __init__(self):
        self.observation_space = spaces.Box(-1, 1, (1,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._t, self._noisy = 0, False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t, self._noisy = 0, seed is not None and seed >= 15
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self._t += 1
        reward = float(self.np_random.normal(0, 3)) if self._noisy else 0.0
        return np.zeros(1, np.float32), reward, self._t >= 4, False, {}


if "AclabNoisyLevels-v0" not in gymnasium.registry:
    gymnasium.register("AclabNoisyLevels-v0", entry_point=NoisyLevels)


def test_plr_replays_the_levels_with_the_largest_value_loss():
    config = make_config("plr", "gym:AclabNoisyLevels-v0", preset="plr-classic",
                         overrides=[*FAST, "env.options={\"num_levels\": 20}", "params.num_steps=32"])
    envs = build_envs(config, level_control=True)
    envs.reset(seed=config.seed)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    played = []
    for _ in range(48):
        algo.iterate(envs)
        played.append(np.stack(algo._proxy.played))
    late = np.concatenate(played[24:]).reshape(-1)
    assert algo.sampler.seen.all()
    assert (late >= 15).mean() > 0.6  # the steps the envs played; uniform levels would give 0.25
    assert np.argsort(-algo.sampler.scores)[:5].min() >= 15


def test_plr_resume_equals_uninterrupted(tmp_path):
    overrides = [*FAST, "total_steps=2048", "params.num_steps=64", "checkpoint_every_iterations=3"]
    train(make_config("plr", "CartPole-v1", overrides=overrides), tmp_path / "full")
    first = train(make_config("plr", "CartPole-v1", overrides=overrides), tmp_path / "split", stop_after_iterations=4)
    assert first["status"] == "interrupted"
    resumed = train(make_config("plr", "CartPole-v1", overrides=overrides), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    assert_resumed_like_uninterrupted(tmp_path / "full", tmp_path / "split")  # the level sampler's state too
    full = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]
    # episodes.csv names each episode's level (a reset seed); every finished episode made the sampler draw one
    with open(tmp_path / "full" / "episodes.csv") as f:
        levels = [int(row["level"]) for row in csv.DictReader(f)]
    assert levels and all(0 <= level < 200 for level in levels) and len(set(levels)) > 20
    assert len(levels) == int(full["sampler"]["counts"].sum())


def test_plr_preset_and_tiny_procgen_run(tmp_path):
    p = make_config("plr", "procgen:bigfish").params
    assert (p.score, p.score_transform, p.temperature, p.staleness_coef, p.num_epochs, p.num_minibatches) == (
        "value_l1", "rank", 0.1, 0.1, 3, 8)
    with pytest.raises(EnvIdError, match="finite set of training levels"):  # before any run directory exists
        make_config("plr", "procgen:bigfish", overrides=['env.options={"levels": "test"}'])
    config = make_config("plr", "procgen:bigfish", overrides=[*FAST, "env.num_envs=2", "params.num_steps=8",
                                                              "params.num_minibatches=2", "total_steps=32"])
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 32
