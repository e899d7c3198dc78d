"""kill -9 / resume cycles through the command line, compared bit for bit with an uninterrupted run.

Each case trains through ``python -m aclab train``, is killed with SIGKILL at drawn points (after a drawn
number of logged rows plus a drawn delay, so kills land inside iterations, evaluations and checkpoint
writes), resumed with ``aclab train --resume`` and killed again, then resumed to the end. The final
checkpoint's whole algorithm state (networks, optimisers, generators, replay buffers, counters), the
metric rows, the evaluation rows and the summary must equal those of the same config trained without
interruption. The fast suite runs one case per kind of state (periodic evaluation, MuJoCo TD3 and SAC);
``test_kill_resume_cycles_every_family`` (slow) runs every family with more kills.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from run_rows import metric_rows

from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = ["progress=false", "torch_threads=1", "checkpoint_every_iterations=1"]
OFFPOLICY = ["env.num_envs=1", "params.actor_hidden=[16,16]", 'params.critic_options={"hidden_sizes":[16,16]}',
             "params.batch_size=16", "params.learning_starts=100", "params.steps_per_iteration=50", "eval.episodes=0"]


@dataclass
class Case:
    algo: str
    env: str
    total: int
    sets: list[str]


CASES = {
    "ppo-periodic-eval": Case("ppo", "CartPole-v1", 128 * 40, [
        "env.backend=gymnasium", "params.num_steps=32", "checkpoint_every_iterations=3", "eval.every_steps=600",
        "eval.episodes=2", "eval.num_envs=2"]),
    "td3-hopper": Case("td3", "mujoco:Hopper-v4", 1200, OFFPOLICY),
    "sac-halfcheetah": Case("sac", "mujoco:HalfCheetah-v4", 1200, OFFPOLICY),
    # the slow test adds every other family
    "ppo-mujoco-normalized": Case("ppo", "mujoco:Hopper-v4", 64 * 2 * 30, [
        "env.backend=gymnasium", "env.num_envs=2", "params.num_steps=64", "params.num_minibatches=2",
        "env.normalize_obs=true", "env.normalize_reward=true", "eval.episodes=0"]),
    "ppg": Case("ppg", "CartPole-v1", 128 * 30, [
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=32", "params.num_minibatches=4",
        "params.num_policy_iterations=3", "params.aux_epochs=2", "eval.episodes=0"]),
    "dcpg": Case("dcpg", "CartPole-v1", 128 * 30, [
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=32", "params.num_minibatches=4",
        "params.num_policy_iterations=3", "params.aux_epochs=2", "eval.episodes=0"]),
    "dna": Case("dna", "CartPole-v1", 64 * 40, [
        "env.backend=gymnasium", "env.num_envs=2", "params.num_steps=32", "params.policy_minibatch_size=32",
        "params.value_minibatch_size=16", "params.distil_minibatch_size=16", "eval.episodes=0"]),
    "fixpo": Case("fixpo", "CartPole-v1", 256 * 20, [
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=64", "params.minibatch_size=64",
        "params.fixup_minibatch_size=128", "eval.episodes=0"]),
    "impala": Case("impala", "CartPole-v1", 32 * 60, [
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=8", "params.hidden_sizes=[16]",
        "params.head_hidden=8", "eval.episodes=0"]),
    "stac": Case("stac", "CartPole-v1", 32 * 60, [
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=8", "params.hidden_sizes=[16]",
        "params.head_hidden=8", "params.gamma_embedding=4", "eval.episodes=0"]),
    "maml": Case("maml", "gym:aclab/MetaPointNav-v0", 8 * 3 * 4 * 2 * 25, [
        "params.meta_batch_size=3", "params.episodes_per_task=4", "params.num_train_tasks=10",
        "params.num_test_tasks=3", "params.hidden_sizes=[16,16]", "params.eval_every=2", 'env.options={"horizon": 8}',
        "env.num_envs=1", "eval.episodes=2", "eval.num_envs=1", "eval.every_steps=400"]),
    "pearl": Case("pearl", "gym:aclab/MetaPointNav-v0", 1500, [
        "params.num_train_tasks=6", "params.num_test_tasks=3", "params.meta_batch=4", "params.batch_size=32",
        "params.embedding_batch_size=16", "params.num_initial_steps=20", "params.num_steps_prior=20",
        "params.num_extra_rl_steps_posterior=20", "params.num_train_steps_per_itr=5", "params.num_tasks_sample=2",
        "params.hidden_sizes=[16,16]", "params.encoder_hidden=[16]", "params.eval_every=0",
        'env.options={"horizon": 10}', "eval.episodes=0"]),
}
FAST_CASES = {"ppo-periodic-eval": 2, "td3-hopper": 1, "sac-halfcheetah": 1}


def _overrides(case: Case) -> list[str]:
    return [*COMMON, *case.sets, f"total_steps={case.total}"]


def _rows(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.csv") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def _assert_same(a, b, path: str = "algo") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


def kill_resume_cycles(case: Case, run_dir: Path, kills: int, rng: np.random.Generator, expected_rows: int) -> int:
    """Train ``case`` in ``run_dir`` through the CLI, SIGKILL it ``kills`` times at drawn points and resume
    it each time; finish it. Returns the number of kills that hit a live run."""
    new = [sys.executable, "-m", "aclab", "train", case.algo, "--env", case.env, "--run-dir", str(run_dir),
           *[arg for item in _overrides(case) for arg in ("--set", item)]]
    resume = [sys.executable, "-m", "aclab", "train", "--resume", str(run_dir)]
    targets = np.sort(rng.choice(np.arange(1, expected_rows - 1), size=kills, replace=False))
    hits = 0
    for i, target in enumerate(targets):
        proc = subprocess.Popen(new if i == 0 else resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and _rows(run_dir) < target and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0.0, 0.05)))  # land anywhere: in an iteration, an evaluation, a write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            hits += 1
        proc.wait()
    finish = subprocess.run(resume if kills else new, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    return hits


def _check_case(name: str, kills: int, tmp_path: Path, seed: int = 0) -> int:
    case = CASES[name]
    reference = tmp_path / "reference"
    train(make_config(case.algo, case.env, overrides=_overrides(case)), reference)
    expected_rows = len(metric_rows(reference))
    killed = tmp_path / "killed"
    hits = kill_resume_cycles(case, killed, kills, np.random.default_rng([seed, len(name)]), expected_rows)
    assert hits >= 1, "every run finished before its kill: raise the case's total steps"
    _assert_same(load_latest_checkpoint(reference / "checkpoints")["algo"],
                 load_latest_checkpoint(killed / "checkpoints")["algo"])
    assert metric_rows(killed) == metric_rows(reference)
    for evals in ("evals.csv",):
        if (reference / evals).exists():
            assert list(csv.DictReader((killed / evals).open())) == list(csv.DictReader((reference / evals).open()))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == json.loads(
        (reference / "summary.json").read_text())["steps"]
    assert summary["resumed_with_exact_env_state"] is True
    assert not list(killed.rglob(".*.tmp*"))  # no torn temporary file survives a resume
    return hits


@pytest.mark.parametrize("name", list(FAST_CASES))
def test_kill_resume_cycles_equal_an_uninterrupted_run(name, tmp_path):
    _check_case(name, FAST_CASES[name], tmp_path)


@pytest.mark.slow
def test_kill_resume_cycles_every_family(tmp_path):
    """Every case with 4 kills (8 for the periodic-evaluation and MuJoCo off-policy cases); prints the count
    of kills that hit a live run per case."""
    counts = {}
    for name in CASES:
        kills = 8 if name in FAST_CASES else 4
        counts[name] = _check_case(name, kills, tmp_path / name, seed=1)
    print("kill -9 / resume cycles that hit a live run:", json.dumps(counts))
