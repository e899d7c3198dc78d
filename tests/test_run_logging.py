"""What a run logs for its user: episodes.csv, plain progress lines, callbacks, Weights & Biases."""

from __future__ import annotations

import csv
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from aclab.callbacks import Callback, EvaluationInfo, IterationInfo, LambdaCallback, StopOnReturn, StopTraining
from aclab.envs import make_env
from aclab.run_logging import EpisodeRecorder, PlainProgress
from aclab.runs import list_checkpoints
from aclab.train import make_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_ENVS = 3
BATCH = 32 * NUM_ENVS


def _cartpole(total_steps: int, *extra: str):
    return make_config("ppo", "CartPole-v1", overrides=[
        "progress=false", "eval.episodes=0", f"total_steps={total_steps}", "env.backend=gymnasium",
        f"env.num_envs={NUM_ENVS}", "params.num_steps=32", "checkpoint_every_iterations=2", *extra])


def _episodes(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((Path(run_dir) / "episodes.csv").open()))


# ----------------------------------------------------------------------------------------------
# episodes.csv
# ----------------------------------------------------------------------------------------------
def test_episodes_csv_has_every_episode_with_its_env_step_and_length(tmp_path):
    """With next-step autoreset, env i's k-th episode ends at env step ``(sum of its lengths + k - 1) *
    num_envs``: one dummy step between episodes. CartPole's reward is 1 a step, so return == length; and the
    per-iteration means of the rows are metrics.csv's episode_return."""
    train(_cartpole(30 * BATCH), tmp_path / "run")
    rows = _episodes(tmp_path / "run")
    assert len(rows) > 20
    for env in range(NUM_ENVS):
        mine = [r for r in rows if int(r["env"]) == env]
        lengths = np.array([int(r["length"]) for r in mine])
        expected_steps = (np.cumsum(lengths) + np.arange(len(lengths))) * NUM_ENVS
        assert [int(r["step"]) for r in mine] == expected_steps.tolist()
        assert [float(r["return"]) for r in mine] == lengths.astype(float).tolist()
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    start = 0
    for row in metrics:
        end = int(row["step"])
        inside = [float(r["return"]) for r in rows if start < int(r["step"]) <= end]
        if inside:
            assert float(row["episode_return"]) == pytest.approx(np.mean(inside), rel=1e-5)
            assert float(row["episodes"]) == len(inside)
        else:
            assert row["episode_return"] == ""
        start = end


def test_episodes_csv_after_a_resume_equals_an_uninterrupted_run(tmp_path):
    """A run killed after iteration 5 whose last checkpoint is from iteration 4 logged episodes that the
    resume repeats: they are dropped, not written twice."""
    train(_cartpole(12 * BATCH), tmp_path / "full")
    train(_cartpole(12 * BATCH), tmp_path / "cut", stop_after_iterations=5)
    list_checkpoints(tmp_path / "cut" / "checkpoints")[-1].unlink()  # as if killed before the 5th checkpoint
    assert max(int(r["step"]) for r in _episodes(tmp_path / "cut")) > 4 * BATCH
    assert train(_cartpole(12 * BATCH), tmp_path / "cut", resume=True)["status"] == "finished"
    assert _episodes(tmp_path / "cut") == _episodes(tmp_path / "full")


def test_episodes_csv_can_be_turned_off(tmp_path):
    train(_cartpole(2 * BATCH, "logging.episodes=false"), tmp_path / "run")
    assert not (tmp_path / "run" / "episodes.csv").exists()


def test_procgen_episodes_carry_their_level():
    """The level of a finished Procgen episode is the level it started on (EnvPool's ``level_seed``)."""
    envs = make_env("procgen:bigfish", 2, 0)
    envs.record_episodes(True)
    envs.reset()
    start_levels = envs.info["level_seed"].tolist()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        envs.step(rng.integers(0, 15, 2))
        if envs.episode_log:
            break
    envs.close()
    call, env, ret, length, level, task = envs.episode_log[0]
    assert level == start_levels[env] and 0 <= level < 200 and task is None and length == call


def test_metaworld_episodes_carry_their_task():
    """Meta-World's ``task_id`` (which goal variation) of the episode that ended."""
    envs = make_env("metaworld:reach-v3", 1, 0)
    envs.record_episodes(True)
    envs.reset()
    task = int(envs.info["task_id"][0])
    for _ in range(600):
        envs.step(np.zeros((1, 4), np.float32))
        if envs.episode_log:
            break
    envs.close()
    call, env, ret, length, level, got = envs.episode_log[0]
    assert (call, env, length, level, got) == (500, 0, 500, None, task) and np.isfinite(ret)


def test_recorder_falls_back_to_the_algorithms_returns():
    """Algorithms that collect on other envs (actor processes, meta-RL tasks) give returns, lengths and tasks;
    their rows carry the iteration's last step and no env index."""
    envs = make_env("CartPole-v1", 2, 0, backend="gymnasium")
    recorder = EpisodeRecorder(envs)
    recorder.begin(100)
    algo = types.SimpleNamespace(steps=164, last_episode_returns=np.array([3.0, 4.0]),
                                 last_episode_lengths=np.array([3, 4]), last_episode_tasks=["a", "b"])
    rows = recorder.rows(algo)
    recorder.close()
    envs.close()
    assert rows == [{"step": 164, "env": None, "return": 3.0, "length": 3, "level": None, "task": "a"},
                    {"step": 164, "env": None, "return": 4.0, "length": 4, "level": None, "task": "b"}]


# ----------------------------------------------------------------------------------------------
# Plain progress lines
# ----------------------------------------------------------------------------------------------
def _progress_output(tmp_path, every_s: float, terminal: bool) -> str:
    out = io.StringIO()
    config = _cartpole(4 * BATCH, "progress=true", f"logging.progress_every_s={every_s}")
    train(config, tmp_path / f"run{every_s}{terminal}", console=Console(file=out, force_terminal=terminal, width=120))
    return out.getvalue()


def test_plain_progress_lines_when_output_is_not_a_terminal(tmp_path):
    lines = _progress_output(tmp_path, 0, terminal=False).strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        f"train step {(i + 1) * BATCH:,}/{4 * BATCH:,} ({25 * (i + 1)}%)" for i in range(4)]
    assert all("steps/s" in line and "elapsed" in line for line in lines)
    rare = _progress_output(tmp_path, 1e9, terminal=False).strip().splitlines()
    total = f"{4 * BATCH:,}"
    assert [line.split(" | ")[0].split()[2] for line in rare] == [f"{BATCH:,}/{total}", f"{total}/{total}"]
    assert "train step" not in _progress_output(tmp_path, 0, terminal=True)  # a terminal gets the bar


def test_plain_progress_period_uses_the_clock():
    now = [0.0]
    out = io.StringIO()
    progress = PlainProgress(1000, 0, every_s=10, file=out, clock=lambda: now[0])
    with progress:
        for step in range(100, 1001, 100):
            now[0] += 3.0  # 3 s per update: lines at t = 3 (first), 15, 27, and the last at t = 30
            progress.update(step, {"steps_per_s": 33.0}, [1.0, 3.0])
    steps = [line.split()[2] for line in out.getvalue().splitlines()]
    assert steps == ["100/1,000", "500/1,000", "900/1,000", "1,000/1,000"]
    assert "return 2 (last 2 episodes)" in out.getvalue()


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self, stop_at_iteration=None):
        self.stop_at_iteration = stop_at_iteration
        self.iterations, self.evaluations, self.checkpoints = [], [], []

    def on_iteration(self, info: IterationInfo):
        self.iterations.append((info.step, info.iteration, info.metrics.get("episode_return")))
        if self.stop_at_iteration is not None and info.iteration >= self.stop_at_iteration:
            return False
        return None

    def on_evaluation(self, info: EvaluationInfo):
        self.evaluations.append((info.step, info.split, list(info.returns), info.final))

    def on_checkpoint(self, step, path):
        assert path.exists()
        self.checkpoints.append((step, path.name))


def test_callbacks_see_iterations_evaluations_checkpoints_and_can_stop(tmp_path):
    cb = Recorder(stop_at_iteration=5)
    summary = train(_cartpole(20 * BATCH, "eval.every_steps=192", "eval.episodes=2"), tmp_path / "run",
                    callbacks=[cb])
    assert summary["status"] == "stopped" and "Recorder.on_iteration returned False" in summary["stop_reason"]
    assert summary["steps"] == 5 * BATCH
    assert [(s, i) for s, i, _ in cb.iterations] == [((i + 1) * BATCH, i + 1) for i in range(5)]
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [r["episode_return"] for r in metrics] == ["" if v is None else f"{v:.6g}" for _, _, v in cb.iterations]
    evals = list(csv.DictReader((tmp_path / "run" / "evals.csv").open()))
    assert [(int(r["step"]), r["split"], [float(x) for x in r["returns"].split()]) for r in evals] == [
        (s, split, returns) for s, split, returns, _ in cb.evaluations]
    assert [e[0] for e in cb.evaluations] == [2 * BATCH, 4 * BATCH, 5 * BATCH]  # two periodic, then the final
    assert [e[3] for e in cb.evaluations] == [False, False, True]
    assert cb.checkpoints[-1] == (5 * BATCH, f"ckpt_{5 * BATCH:012d}.pt")
    assert [s for s, _ in cb.checkpoints] == [2 * BATCH, 4 * BATCH, 5 * BATCH]
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == cb.checkpoints[-1][1]
    resumed = train(_cartpole(8 * BATCH), tmp_path / "run", resume=True)  # a stopped run can go on
    assert resumed["status"] == "finished" and resumed["steps"] == 8 * BATCH


def test_stop_training_without_the_final_evaluation(tmp_path):
    def prune(info):
        raise StopTraining("pruned", final_eval=False)

    summary = train(_cartpole(20 * BATCH, "eval.every_steps=192", "eval.episodes=2"), tmp_path / "run",
                    callbacks=[LambdaCallback(on_evaluation=prune)])
    assert summary["status"] == "stopped" and summary["stop_reason"] == "pruned" and summary["steps"] == 2 * BATCH
    assert len(list(csv.DictReader((tmp_path / "run" / "evals.csv").open()))) == 1  # no final evaluation


def test_stop_on_return():
    cb = StopOnReturn(threshold=10.0, window=3)
    info = lambda returns: IterationInfo(0, 1, {}, np.asarray(returns, float), Path("."))  # noqa: E731
    cb.on_iteration(info([20.0, 20.0]))  # only 2 of 3 episodes yet
    cb.on_iteration(info([]))
    with pytest.raises(StopTraining, match="last 3 training episodes 13.3"):
        cb.on_iteration(info([0.0]))  # mean of 20, 20, 0 = 13.3 >= 10
    test_cb = StopOnReturn(threshold=5.0, source="test")
    assert test_cb.on_iteration(info([100.0] * 200)) is None  # training returns do not count
    test_cb.on_evaluation(EvaluationInfo(0, "train", [9.0], False, Path(".")))  # nor the train split
    with pytest.raises(StopTraining, match="test evaluation mean return 6"):
        test_cb.on_evaluation(EvaluationInfo(0, "test", [5.0, 7.0], False, Path(".")))


def test_a_non_callback_is_refused(tmp_path):
    with pytest.raises(TypeError, match="is not a callback"):
        train(_cartpole(BATCH), tmp_path / "run", callbacks=[print])


# ----------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------
class FakeWandbRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_sink_mirrors_metrics_and_evaluations(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: FakeWandbRun(calls, **kw), Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(_cartpole(4 * BATCH, "logging.wandb=true", "logging.wandb_project=p1", "eval.episodes=2"),
          tmp_path / "run")
    init = calls[0][1]
    assert init["project"] == "p1" and init["config"]["algo"] == "ppo" and init["dir"] == str(tmp_path / "run")
    logged = [c for c in calls if c[0] == "log"]
    metrics = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    train_logs = [c for c in logged if "loss" in c[2] or "episode_return" in c[2]]
    assert [c[1] for c in train_logs] == [int(r["step"]) for r in metrics]
    evals = list(csv.DictReader((tmp_path / "run" / "evals.csv").open()))
    eval_logs = [c for c in logged if "eval/test_return" in c[2]]
    assert [(c[1], c[2]["eval/test_return"]) for c in eval_logs] == [
        (int(r["step"]), pytest.approx(float(r["mean_return"]))) for r in evals]
    assert calls[-1] == ("finish",)
    run_id = init["id"]
    calls.clear()
    train(_cartpole(6 * BATCH, "logging.wandb=true", "logging.wandb_project=p1"), tmp_path / "run", resume=True)
    assert calls[0][1]["id"] == run_id and calls[0][1]["resume"] == "allow"  # the same W&B run goes on


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    train(_cartpole(2 * BATCH, "logging.wandb=true", "logging.wandb_mode=offline", "eval.episodes=2"),
          tmp_path / "run")
    data = b"".join(p.read_bytes() for p in (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"episode_return" in data and b"eval/test_return" in data and b"CartPole-v1" in data
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
