"""The training loop end to end: run directories, resume after a kill, NaN handling, image envs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from run_rows import metric_rows

from aclab.runs import list_checkpoints, load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0"]


def _cartpole(total_steps: int, *extra: str):
    return make_config(
        "ppo", "CartPole-v1",
        overrides=[*FAST, f"total_steps={total_steps}", "env.backend=gymnasium", "params.num_steps=32",
                   "checkpoint_every_iterations=2", *extra],
    )


def test_run_directory_contents(tmp_path):
    config = _cartpole(2048, "eval.episodes=3")
    summary = train(config, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "summary.json", "evals.csv", "learning_curve.png"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir())
    saved = json.loads((run / "config.json").read_text())
    assert saved["params"]["num_steps"] == 32 and saved["env"]["backend"] == "gymnasium"
    assert summary["status"] == "finished" and summary["steps"] >= 2048
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    rows = metric_rows(run)
    assert [int(r["step"]) for r in rows] == [128 * (i + 1) for i in range(len(rows))]
    assert len(list_checkpoints(run / "checkpoints")) <= config.keep_checkpoints
    evals = list(csv.DictReader((run / "evals.csv").open()))
    assert evals[-1]["num_episodes"] == "3" and len(evals[-1]["returns"].split()) == 3


def test_learning_curve_off_draws_no_plot_and_never_imports_matplotlib(tmp_path):
    """logging.learning_curve=false (equal work in the side-by-side benchmark, where CleanRL draws no plot)."""
    code = ("import sys; from aclab.train import make_config, train; "
            "c = make_config('ppo', 'CartPole-v1', overrides=['progress=false', 'eval.episodes=0', 'total_steps=256', "
            "'env.backend=gymnasium', 'params.num_steps=32', 'logging.learning_curve=false']); "
            f"s = train(c, {str(tmp_path / 'run')!r}); print(s['status'], 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["finished", "False"], out
    assert (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "learning_curve.png").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path):
    train(_cartpole(256), tmp_path / "run")
    with pytest.raises(FileExistsError, match="already exists"):
        train(_cartpole(256), tmp_path / "run")
    train(_cartpole(256), tmp_path / "run", overwrite=True)
    assert len(metric_rows(tmp_path / "run")) == 2


def _final_params(run_dir: Path) -> dict:
    return load_latest_checkpoint(run_dir / "checkpoints")["algo"]["net"]


def test_resume_after_clean_stop_equals_uninterrupted(tmp_path):
    total = 128 * 12
    train(_cartpole(total), tmp_path / "full")
    first = train(_cartpole(total), tmp_path / "split", stop_after_iterations=5)
    assert first["status"] == "interrupted"
    resumed = train(_cartpole(total), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    total = 128 * 40
    args = ["--set", "progress=false", "--set", "eval.episodes=0", "--set", "env.backend=gymnasium",
            "--set", "params.num_steps=32", "--set", "checkpoint_every_iterations=3", "--total-steps", str(total)]
    full = tmp_path / "full"
    subprocess.run([sys.executable, "-m", "aclab", "train", "ppo", "--env", "CartPole-v1", "--run-dir", str(full),
                    *args], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "aclab", "train", "ppo", "--env", "CartPole-v1", "--run-dir",
                             str(killed), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list_checkpoints(killed / "checkpoints")) >= 1 and len(metric_rows(killed)) >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; raise total"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "running"  # a killed run never wrote its final summary
    subprocess.run([sys.executable, "-m", "aclab", "train", "--resume", str(killed)], check=True,
                   capture_output=True)
    a, b = _final_params(full), _final_params(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert metric_rows(full) == metric_rows(killed)
    assert json.loads((killed / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, gradients):
    from aclab.core import losses
    from aclab.nets import analytic_ppo

    calls = {"n": 0}

    def poison(real, nan_value):
        def poisoned(*args, **kwargs):
            calls["n"] += 1
            out = real(*args, **kwargs)
            return nan_value(out) if calls["n"] > 4 * 4 * 3 else out  # from the 4th iteration on
        return poisoned

    if gradients == "autograd":
        monkeypatch.setattr(losses, "value_loss", poison(losses.value_loss, lambda v: v * float("nan")))
    else:  # the closed form returns [pg_loss, v_loss, entropy, approx_kl, clip_fraction]
        monkeypatch.setattr(analytic_ppo, "ppo_loss_and_grads", poison(
            analytic_ppo.ppo_loss_and_grads, lambda stats: stats * torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])))
    config = _cartpole(128 * 10, "checkpoint_every_iterations=1", f"params.gradients={gradients}")
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "failed"
    assert "non-finite loss" in summary["error"] and "loss/value" in summary["error"]
    checkpoint = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint["step"] == 128 * 3
    for tensor in checkpoint["algo"]["net"].values():
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("env_id, encoder", [("procgen:coinrun", "impala"), ("atari:Pong", "nature_cnn")])
def test_image_envs_train_end_to_end(tmp_path, env_id, encoder):
    config = make_config("ppo", env_id, overrides=[*FAST, "env.num_envs=2", "params.num_steps=8",
                                                   "params.num_minibatches=2", "params.num_epochs=1",
                                                   "total_steps=32", "eval.episodes=0"])
    assert config.params.encoder == encoder
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 32
    checkpoint = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert any("conv" in k or "stages" in k or "cnn" in k for k in checkpoint["algo"]["net"])


def test_eval_counts_first_episodes_per_env(tmp_path):
    from aclab import registry
    from aclab.algos.common import resolve_device
    from aclab.envs import build_envs
    from aclab.evaluate.policy import evaluate

    config = _cartpole(256, "eval.num_envs=3")
    envs = build_envs(config)
    envs.reset(seed=0)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    returns = evaluate(algo, config, "test", episodes=7, train_envs=envs)
    assert len(returns) == 7 and all(r > 0 for r in returns)
    assert np.isfinite(returns).all()


class _StaggeredEnvs:
    """Fake eval envs: env i's episodes last ``lengths[i]`` steps; its k-th episode returns 10 i + k."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)
        self.num_envs = len(lengths)
        self.t = 0
        self.obs = np.zeros((len(lengths), 1), dtype=np.float32)
        self.next_is_dummy = np.zeros(len(lengths), dtype=bool)  # same-step resets: no dummy steps
        self.info = {"level_seed": np.zeros(len(lengths), dtype=np.int64)}

    def reset(self, seed=None):
        self.t = 0
        return self.obs

    def step(self, actions):
        from types import SimpleNamespace

        self.t += 1
        done = self.t % self.lengths == 0
        k = self.t // self.lengths - 1
        ret = np.where(done, 10.0 * np.arange(len(self.lengths)) + k, np.nan)
        zeros = np.zeros(len(self.lengths), dtype=bool)
        return SimpleNamespace(episode_length=np.where(done, self.lengths, 0), episode_return=ret, obs=self.obs,
                               reward=np.zeros(len(self.lengths)), terminated=done, truncated=zeros)

    def close(self):
        pass


def test_eval_takes_each_envs_first_episodes_in_order_however_long_they_are(monkeypatch):
    """Procgen's protocol: each eval env contributes its first episodes, interleaved env by env, so
    an env with short episodes cannot fill the quota (reference written out by hand)."""
    from types import SimpleNamespace

    from aclab.evaluate import policy

    seen = {}

    def fake_build_envs(config, num_envs, seed, options):
        seen.update(num_envs=num_envs, options=options)
        return _StaggeredEnvs([1, 5, 9])

    monkeypatch.setattr(policy, "build_envs", fake_build_envs)
    algo = SimpleNamespace(act=lambda obs, deterministic: np.zeros(len(obs), dtype=np.int64))
    config = _cartpole(256, "eval.num_envs=3")
    returns = policy.evaluate(algo, config, "test", episodes=7)
    # per env ceil(7 / 3) = 3 episodes; env i's k-th has return 10 i + k; order k-major, then env
    assert returns == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0, 2.0]
    assert seen == {"num_envs": 3, "options": {}}


@pytest.mark.parametrize(("split", "levels"), [("test", "test"), ("train", "train")])
def test_procgen_evaluation_uses_the_splits_level_set(monkeypatch, split, levels):
    """Procgen's test score is measured on the unseen test levels, the train score on the training
    levels (Procgen paper's generalisation protocol); other envs only get new seeds."""
    from types import SimpleNamespace

    from aclab.evaluate import policy

    seen = []

    def fake_build_envs(config, num_envs, seed, options):
        seen.append(options)
        return _StaggeredEnvs([2] * num_envs)

    monkeypatch.setattr(policy, "build_envs", fake_build_envs)
    algo = SimpleNamespace(act=lambda obs, deterministic: np.zeros(len(obs), dtype=np.int64))
    procgen = make_config("ppo", "procgen:bigfish", overrides=["eval.num_envs=2"])
    assert len(policy.evaluate(algo, procgen, split, episodes=2)) == 2
    policy.evaluate(algo, _cartpole(256, "eval.num_envs=2"), split, episodes=2)
    # explicit level ranges: the training range [0, 200) for train, the full distribution for test
    num_levels = {"train": 200, "test": 0}[levels]
    assert seen == [{"levels": "train", "start_level": 0, "num_levels": num_levels}, {}]
