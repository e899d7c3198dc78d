"""Meta-World's success rate (success at any step of an episode): the env layer, the training loop and
``aclab report`` (the FixPO paper plots it, Section 4.3 / Figure 6)."""

from __future__ import annotations

import csv
import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from aclab.envs import make_env
from aclab.evaluate import report as rp
from aclab.evaluate.runs_io import write_synthetic_run
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

EPISODE = 4  # real steps per episode; with next-step autoreset one more (dummy) step follows


class SuccessToy(gym.Env):
    """Episodes of 4 steps. The k-th episode of an env (k = 0, 1, ...) flags ``success`` at step 2 only
    when k is odd, so half of the episodes succeed, and only in the middle of the episode. ``reset``
    reports ``success=True`` to make sure the autoreset dummy step is not counted."""

    observation_space = spaces.Box(0.0, 10.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.episode += 1
        return np.zeros(1, np.float32), {"success": True}

    def step(self, action):
        self.t += 1
        success = self.t == 2 and self.episode % 2 == 1
        return np.array([self.t], np.float32), 1.0, self.t >= EPISODE, False, {"success": success}


gym.register("aclab-test/SuccessToy-v0", entry_point=SuccessToy)


def test_episode_success_is_success_at_any_real_step():
    env = make_env(SuccessToy, 3, 0)
    env.reset()
    ended = []
    for _ in range(4 * (EPISODE + 1)):
        result = env.step(np.zeros(3, dtype=np.int64))
        done = result.episode_length > 0
        assert np.isnan(result.episode_success[~done]).all()
        ended.append(result.episode_success[done])
    flags = np.concatenate(ended)
    # per env: episodes 0, 1, 2, 3 -> 0, 1, 0, 1 (the success at step 2 counts at the episode's end,
    # the reset's success=True never does)
    np.testing.assert_array_equal(flags, np.repeat([0.0, 1.0, 0.0, 1.0], 3))
    np.testing.assert_array_equal(env.pop_episode_successes(), flags)
    assert env.pop_episode_successes().size == 0  # popped once
    env.close()


def test_envs_without_a_success_flag_report_none():
    env = make_env("CartPole-v1", 2, 0)
    env.reset()
    assert env.step(np.zeros(2, dtype=np.int64)).episode_success is None
    assert env.pop_episode_successes().size == 0
    env.close()


def test_train_logs_the_success_rate_and_its_final_value(tmp_path):
    # 2 envs x 20 steps per iteration = 4 episodes per env per iteration, half of them successful
    config = make_config("ppo", "gym:aclab-test/SuccessToy-v0", overrides=[
        "progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=20", "total_steps=120"])
    summary = train(config, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [float(r["episode_success"]) for r in rows] == [0.5] * 3
    assert summary["final_success_rate"] == 0.5
    assert "final_success_rate" not in train(make_config("ppo", "CartPole-v1", overrides=[
        "progress=false", "eval.episodes=0", "total_steps=512"]), tmp_path / "cartpole")


def test_the_recent_success_flags_survive_a_resume(tmp_path):
    """The checkpoint's loop state carries the recent episodes' success flags, so a resumed run's
    final_success_rate counts the episodes before the interruption too."""
    overrides = ["progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=20", "total_steps=120",
                 "checkpoint_every_iterations=1"]
    run_dir = tmp_path / "run"
    assert train(make_config("ppo", "gym:aclab-test/SuccessToy-v0", overrides=overrides), run_dir,
                 stop_after_iterations=2)["status"] == "interrupted"
    loop = load_latest_checkpoint(run_dir / "checkpoints")["loop"]
    assert sorted(loop["recent_successes"]) == [0.0] * 8 + [1.0] * 8  # 2 iterations x 2 envs x 4 episodes
    summary = train(make_config("ppo", "gym:aclab-test/SuccessToy-v0", overrides=overrides), run_dir, resume=True)
    assert summary["status"] == "finished" and summary["final_success_rate"] == 0.5
    loop = load_latest_checkpoint(run_dir / "checkpoints")["loop"]  # at step 120: the flags of all 3 iterations
    assert sorted(loop["recent_successes"]) == [0.0] * 12 + [1.0] * 12


def _success_run(path, algo, task, seed, rates):
    """A synthetic run whose metrics.csv gets an ``episode_success`` column with the given values."""
    run = write_synthetic_run(path, algo=algo, env_id=task, seed=seed, num_points=len(rates))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "episode_success"])
        writer.writeheader()
        for row, rate in zip(rows, rates):
            writer.writerow({**row, "episode_success": rate})
    return run


def test_report_aggregates_the_success_rate(tmp_path):
    tasks = ["metaworld:reach-v3", "metaworld:push-v3"]
    finals = {"fixpo": {tasks[0]: [0.9, 0.7, 0.8], tasks[1]: [0.2, 0.4, 0.3]},
              "ppo": {tasks[0]: [0.5, 0.5, 0.5], tasks[1]: [0.1, 0.0, 0.2]}}
    for algo, per_task in finals.items():
        for task, values in per_task.items():
            for seed, value in enumerate(values):
                # last 2 points average to `value`; the first point is noise the final value must ignore
                _success_run(tmp_path / f"{algo}-{task[10:]}-{seed}", algo, task, seed,
                             [0.0, value - 0.05, value + 0.05])
    md = rp.build_report([tmp_path], tmp_path / "report", last_k=2, reps=200).read_text()
    assert "## Success rate" in md
    summary = json.loads((tmp_path / "report" / "aggregates.json").read_text())["success_rate"]
    for algo, per_task in finals.items():
        for task, values in per_task.items():
            np.testing.assert_allclose(summary["per_task"][algo][task], values)
        mean = summary["mean_over_tasks"][algo]
        expected = np.mean([np.mean(v) for v in per_task.values()])
        assert mean["point"] == pytest.approx(expected)
        assert mean["lower"] <= expected <= mean["upper"] and mean["lower"] < mean["upper"]
    assert "0.800 ± 0.100" in md  # fixpo on reach: mean ± std over seeds
    # runs without the column: no section
    plain = tmp_path / "plain"
    write_synthetic_run(plain / "r", num_points=3)
    assert "## Success rate" not in rp.build_report([plain], tmp_path / "report2", reps=100).read_text()
