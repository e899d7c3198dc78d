"""Evaluation: Procgen level sets (always disjoint, recorded), fixed / fresh seeds, one batched forward pass
per step, the value bias of the evaluation episodes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from aclab.config import ConfigError
from aclab.envs import EnvIdError, build_envs, make_env
from aclab.envs.registry import PROCGEN_MAX_LEVEL, LevelRange, procgen_eval_levels, procgen_level_range
from aclab.evaluate.policy import eval_options, eval_seed, evaluate, evaluate_splits
from aclab.train import make_config, train

TOP = PROCGEN_MAX_LEVEL


# ---------------------------------------------------------------------------------------------------
# Level ranges (pure functions)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, train, unseen", [
    ({}, (0, 200), (200, TOP - 200)),
    ({"levels": "train"}, (0, 200), (200, TOP - 200)),
    ({"num_levels": 1, "start_level": 5}, (5, 1), (6, TOP - 6)),
    ({"num_levels": 10}, (0, 10), (10, TOP - 10)),
    ({"levels": "test", "num_levels": 50}, (0, 50), (50, TOP - 50)),  # explicit num_levels wins over the set
    ({"start_level": 1000}, (1000, 200), (1200, TOP - 1200)),
    ({"levels": "test-unseen"}, (200, TOP - 200), (0, 200)),  # the range reaches the top: unseen lies below
    ({"start_level": TOP - 10, "num_levels": 10}, (TOP - 10, 10), (0, TOP - 10)),
])
def test_level_ranges_are_explicit_and_disjoint(options, train, unseen):
    assert procgen_level_range(options) == LevelRange(*train)
    assert procgen_eval_levels(options, "train") == LevelRange(*train)
    assert procgen_eval_levels(options, "test") == LevelRange(0, 0)  # the full distribution (Cobbe et al.)
    got = procgen_eval_levels(options, "unseen")
    assert got == LevelRange(*unseen)
    (s, n), (u, m) = train, unseen
    assert u + m <= s or u >= s + n  # no training level is unseen
    assert u + m <= TOP


@pytest.mark.parametrize("options", [{"levels": "test"}, {"num_levels": 0, "start_level": 3}])
def test_no_unseen_levels_after_training_on_all_of_them(options):
    with pytest.raises(EnvIdError, match="no level is unseen"):
        procgen_eval_levels(options, "unseen")
    with pytest.raises(ConfigError, match="eval.levels='unseen'"):
        make_config("ppo", "procgen:bigfish", overrides=[f"env.options={json.dumps(options)}", "eval.levels=unseen"])


def test_eval_options_override_the_training_options():
    # the old bug: with an explicit num_levels in env.options the test split played the training levels
    config = make_config("ppo", "procgen:bigfish", overrides=["env.options.num_levels=1", "env.options.start_level=5"])
    assert eval_options(config, "train") == {"levels": "train", "start_level": 5, "num_levels": 1}
    assert eval_options(config, "test") == {"levels": "train", "start_level": 0, "num_levels": 0}
    config.eval.levels = "unseen"
    assert eval_options(config, "test") == {"levels": "train", "start_level": 6, "num_levels": TOP - 6}
    assert eval_options(make_config("ppo", "CartPole-v1"), "test") == {}


# ---------------------------------------------------------------------------------------------------
# Level sets on the real env, and a policy that memorised one level
# ---------------------------------------------------------------------------------------------------
class MemorisedLevelPolicy:
    """'Trained' on one level: the actions of the best of a few random episodes on that level, keyed by the
    observation (Procgen levels are deterministic), no-op on every frame it has not seen."""

    def __init__(self, game: str, level: int, tries: int = 16, steps: int = 400, seed: int = 0):
        rng = np.random.default_rng(seed)
        envs = make_env(f"procgen:{game}", tries, seed, options={"num_levels": 1, "start_level": level})
        envs.reset()
        plans = rng.integers(0, 15, size=(steps, tries))
        frames = [[] for _ in range(tries)]
        returns = np.full(tries, np.nan)
        for t in range(steps):
            for i in np.nonzero(np.isnan(returns))[0]:
                frames[i].append((envs.obs[i].tobytes(), int(plans[t, i])))
            result = envs.step(plans[t])
            ended = (result.episode_length > 0) & np.isnan(returns)
            returns[ended] = result.episode_return[ended]
        envs.close()
        best = int(np.nanargmax(returns))
        self.best_return = float(returns[best])
        self.memory: dict[bytes, int] = {}
        for key, action in frames[best]:
            self.memory.setdefault(key, action)
        self.calls: list[int] = []

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        self.calls.append(len(obs))
        return np.array([self.memory.get(o.tobytes(), 4) for o in obs], dtype=np.int64)


def _procgen_config(*extra: str):
    return make_config("ppo", "procgen:bigfish", overrides=[
        "env.options.num_levels=1", "env.options.start_level=5", "env.num_envs=2", "eval.num_envs=4",
        "eval.episodes=8", "progress=false", *extra])


def test_a_policy_trained_on_one_level_scores_differently_on_train_and_unseen_levels():
    policy = MemorisedLevelPolicy("bigfish", level=5)
    assert policy.best_return >= 3  # a good episode was found and memorised
    config = _procgen_config("eval.levels=unseen")
    results = evaluate_splits(policy, config, ["train", "test"])
    train_split, unseen = results["train"], results["test"]
    assert train_split.level_seeds == [5] * 8 and train_split.levels == LevelRange(5, 1)
    assert all(level >= 6 for level in unseen.level_seeds) and len(set(unseen.level_seeds)) == 8
    assert unseen.levels == LevelRange(6, TOP - 6)
    # the memorised level replays exactly; the unseen levels get the no-op policy's (much lower) returns
    assert train_split.returns == [policy.best_return] * 8
    assert np.mean(unseen.returns) < policy.best_return - 2
    full = evaluate_splits(policy, _procgen_config(), ["test"])["test"]  # eval.levels = test: all levels
    assert full.levels == LevelRange(0, 0) and len(set(full.level_seeds)) == 8


class NoOp:
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        return np.full(len(obs), 4, dtype=np.int64)


def test_fixed_and_fresh_seeding():
    policy = NoOp()
    fixed = _procgen_config("eval.episodes=4")
    levels = [evaluate_splits(policy, fixed, ["test"], step=s)["test"].level_seeds for s in (0, 1000)]
    assert levels[0] == levels[1] and eval_seed(fixed, 0) == eval_seed(fixed, 1000)
    fresh = _procgen_config("eval.episodes=4", "eval.seeding=fresh")
    first, second = (evaluate_splits(policy, fresh, ["test"], step=s)["test"].level_seeds for s in (0, 1000))
    assert not set(first) & set(second)
    assert evaluate_splits(policy, fresh, ["test"], step=1000)["test"].level_seeds == second  # resume-safe


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------
class CartPoleHeuristic:
    """Pushes the cart toward the pole's lean (episodes of a few dozen to hundreds of steps); records the
    batch size of every call."""

    def __init__(self, velocity_gain: float = 0.3):
        self.calls: list[int] = []
        self.gain = velocity_gain

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        self.calls.append(len(obs))
        return (obs[:, 2] + self.gain * obs[:, 3] > 0).astype(np.int64)


@pytest.mark.parametrize("episodes", [3, 6])
def test_one_forward_pass_per_step_over_all_splits_and_only_for_envs_that_owe_episodes(episodes):
    config = make_config("ppo", "CartPole-v1", overrides=["eval.num_envs=3", "env.options.max_episode_steps=60"])
    policy = CartPoleHeuristic(velocity_gain=0.0)
    results = evaluate_splits(policy, config, ["train", "test"], episodes=episodes)
    per_env = episodes // 3
    # each env is in the forward pass for its counted episodes' steps plus the dummy steps between them
    busy = {split: [0] * 3 for split in results}
    for split, result in results.items():
        assert len(result.lengths) == episodes
        for k, length in enumerate(result.lengths):
            busy[split][k % 3] += length + (1 if k >= 3 else 0)
    all_busy = busy["train"] + busy["test"]
    assert sum(policy.calls) == sum(all_busy)
    assert len(policy.calls) == max(all_busy)  # one call per step for both splits together
    assert policy.calls[0] == 6
    single = CartPoleHeuristic(velocity_gain=0.0)
    assert evaluate(single, config, "test", episodes=episodes) == results["test"].returns
    assert per_env in (1, 2)


def test_value_bias_records_of_the_evaluation_episodes():
    gamma = 0.9
    config = make_config("ppo", "CartPole-v1", overrides=["eval.num_envs=3", "env.options.max_episode_steps=45"])
    result = evaluate_splits(CartPoleHeuristic(velocity_gain=0.0), config, ["train"], episodes=6,
                             value_fn=lambda obs: 100.0 * obs[:, 2] + 1.0, gamma=gamma)["train"]
    envs = build_envs(config, num_envs=3, seed=eval_seed(config), options=eval_options(config, "train"))
    first_obs = envs.reset(seed=eval_seed(config))
    envs.close()
    np.testing.assert_allclose(result.start_values[:3], 100.0 * first_obs[:, 2] + 1.0, rtol=1e-6)
    for length, ret, cut, boot in zip(result.lengths, result.discounted_returns, result.truncated,
                                      result.bootstrap_values):
        assert ret == pytest.approx((1 - gamma**length) / (1 - gamma))  # CartPole pays 1 per step
        assert cut == (length == 45)
        assert (boot != 0.0) == cut and abs(boot) <= gamma**45 * (100.0 * 0.21 + 1.0)
    assert any(result.truncated) and not all(result.truncated)


# ---------------------------------------------------------------------------------------------------
# The training loop: ranges recorded, periodic evaluation every N iterations, value bias from eval
# ---------------------------------------------------------------------------------------------------
def test_run_records_the_level_ranges(tmp_path):
    config = make_config("ppo", "procgen:bigfish", overrides=[
        "env.options.num_levels=3", "env.num_envs=2", "params.num_steps=8", "params.num_minibatches=2",
        "params.num_epochs=1", "total_steps=32", "eval.episodes=2", "eval.num_envs=2", "eval.split=both",
        "eval.levels=unseen", "eval.every_iterations=1", "progress=false", "torch_threads=1"])
    summary = train(config, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "evals.csv").open()))
    assert {(r["split"], r["levels"]) for r in rows} == {("train", "[0, 3)"), ("test", f"[3, {TOP})")}
    # every iteration (2); the evaluation at the last step is the final one (not repeated)
    assert [(r["step"], r["split"]) for r in rows] == [("16", "train"), ("16", "test"), ("32", "train"), ("32", "test")]
    assert summary["eval_levels"] == {
        "train": {"range": "[0, 3)", "start_level": 0, "num_levels": 3},
        "test": {"range": f"[3, {TOP})", "start_level": 3, "num_levels": TOP - 3}}


def test_value_bias_logged_from_training_level_evaluations(tmp_path):
    overrides = ["total_steps=2048", "params.num_steps=64", "env.num_envs=4", "params.num_policy_iterations=2",
                 "params.log_value_bias=true", "params.value_bias_source=eval", "eval.split=both",
                 "eval.episodes=4", "eval.num_envs=4", "eval.every_iterations=4", "progress=false"]
    with pytest.raises(ConfigError, match="eval.split"):
        make_config("ppg", "CartPole-v1", overrides=[*overrides, "eval.split=test"])
    train(make_config("ppg", "CartPole-v1", overrides=overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    biased = [r for r in rows if r.get("value_bias/bias") is not None]
    evals = [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / "evals.csv").open()) if r["split"] == "train"]
    assert [int(r["step"]) for r in biased] == evals == [1024, 2048]  # every 4th iteration (the last is the final one)
    assert all(r["value_bias/episodes"] == 4 for r in biased)
    for r in biased:
        assert r["value_bias/bias"] == pytest.approx(r["value_bias/predicted"] - r["value_bias/true"])
