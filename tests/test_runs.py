"""Run directories you can trust: exact continuation (evaluation schedule and streams, TensorBoard, time,
final evaluation, resume overrides), no silent data loss (unreadable checkpoints, torn files, one writer,
failures recorded), divergence warnings, stopping and the step budget."""

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

from aclab import runs
from aclab.config import ConfigError
from aclab.runs import (
    DivergenceMonitor,
    Run,
    RunInUseError,
    UnreadableCheckpointsError,
    list_checkpoints,
    load_latest_checkpoint,
)
from aclab.train import make_config, resume_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["progress=false", "env.backend=gymnasium", "params.num_steps=32", "checkpoint_every_iterations=2"]


def _ppo(total: int, *extra: str):
    """PPO on CartPole, 4 envs x 32 steps = 128 env steps per iteration."""
    return make_config("ppo", "CartPole-v1", overrides=[*FAST, "eval.episodes=0", f"total_steps={total}", *extra])


def _evals(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "evals.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def _net(run_dir: Path) -> dict:
    return load_latest_checkpoint(Path(run_dir) / "checkpoints")["algo"]["net"]


def _same_net(a: Path, b: Path) -> bool:
    x, y = _net(a), _net(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------
# Exact continuation
# ---------------------------------------------------------------------------------------------
def test_periodic_evaluation_resumes_exactly(tmp_path):
    """The evaluation schedule is in the checkpoint and evaluations draw on their own streams: a run with
    periodic evaluation, stopped and resumed, has the uninterrupted run's evaluations, metrics and weights."""
    extra = ["eval.every_steps=600", "eval.episodes=2", "eval.num_envs=2", "checkpoint_every_iterations=3"]
    train(_ppo(128 * 16, *extra), tmp_path / "full")
    assert train(_ppo(128 * 16, *extra), tmp_path / "split", stop_after_iterations=7)["status"] == "interrupted"
    train(_ppo(128 * 16, *extra), tmp_path / "split", resume=True)
    assert [int(r["step"]) for r in _evals(tmp_path / "full")] == [640, 1280, 1920, 2048]
    assert _evals(tmp_path / "full") == _evals(tmp_path / "split")
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")
    assert _same_net(tmp_path / "full", tmp_path / "split")


def test_evaluation_leaves_the_training_streams_untouched(tmp_path):
    """Training with periodic evaluation follows the same trajectory as training without it."""
    train(_ppo(128 * 6), tmp_path / "plain")
    train(_ppo(128 * 6, "eval.every_steps=256", "eval.episodes=3", "eval.num_envs=2"), tmp_path / "evaluated")
    assert len(_evals(tmp_path / "evaluated")) == 3
    assert metric_rows(tmp_path / "plain") == metric_rows(tmp_path / "evaluated")
    assert _same_net(tmp_path / "plain", tmp_path / "evaluated")


def test_evaluation_of_offpolicy_noise_leaves_training_rng_untouched():
    """TD3's exploration noise comes from the training loop's NumPy generator; an evaluation must not
    advance it, and the same step gives the same evaluation."""
    from aclab import registry
    from aclab.algos.common import resolve_device
    from aclab.envs import build_envs
    from aclab.evaluate.policy import evaluate

    config = make_config("td3", "Pendulum-v1", overrides=[
        "progress=false", "env.num_envs=1", "params.actor_hidden=[8]", 'params.critic_options={"hidden_sizes":[8]}',
        "eval.episodes=1", "eval.num_envs=1"])
    envs = build_envs(config)
    envs.reset(seed=0)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    before = dict(algo.loop.rng.bit_generator.state)
    torch_before = torch.get_rng_state()
    first = evaluate(algo, config, "test", train_envs=envs)
    assert algo.loop.rng.bit_generator.state == before and torch.equal(torch.get_rng_state(), torch_before)
    assert evaluate(algo, config, "test", train_envs=envs) == first
    envs.close()


def test_tensorboard_keeps_the_checkpoint_step_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalar_steps(run_dir: Path) -> list[int]:
        acc = EventAccumulator(str(run_dir / "tb"))
        acc.Reload()
        return [e.step for e in acc.Scalars("loss/value")]

    train(_ppo(128 * 8), tmp_path / "full")
    train(_ppo(128 * 8), tmp_path / "split", stop_after_iterations=4)
    train(_ppo(128 * 8), tmp_path / "split", resume=True)
    assert scalar_steps(tmp_path / "full") == [128 * (i + 1) for i in range(8)]
    assert scalar_steps(tmp_path / "split") == scalar_steps(tmp_path / "full")


def test_time_is_cumulative_across_resumes(tmp_path):
    train(_ppo(128 * 8), tmp_path / "run", stop_after_iterations=4)
    checkpoint = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    summary = train(_ppo(128 * 8), tmp_path / "run", resume=True)
    times = [float(r["time_s"]) for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open())]
    assert len(times) == 8 and times == sorted(times)
    assert times[4] >= checkpoint["loop"]["wall_time_s"]  # the first row after the resume continues the clock
    assert summary["wall_time_s"] >= times[-1]


def test_final_evaluation_is_never_duplicated(tmp_path, monkeypatch):
    """Resuming a finished run changes nothing; a run killed during its final evaluation repeats exactly that
    evaluation once."""
    extra = ["eval.episodes=2", "eval.num_envs=2", "eval.split=both"]
    train(_ppo(128 * 4, *extra), tmp_path / "full")
    reference = _evals(tmp_path / "full")
    assert [(r["step"], r["split"]) for r in reference] == [("512", "train"), ("512", "test")]
    files = ("summary.json", "metrics.csv", "evals.csv", "config.json")
    before = {name: (tmp_path / "full" / name).read_bytes() for name in files}
    summary = train(_ppo(128 * 4, *extra), tmp_path / "full", resume=True)
    assert summary["status"] == "finished" and _evals(tmp_path / "full") == reference
    assert {name: (tmp_path / "full" / name).read_bytes() for name in files} == before  # untouched

    # killed after the final evaluation completed but before the summary said "finished": not repeated
    summary_path = tmp_path / "full" / "summary.json"
    summary_path.write_text(json.dumps(dict(json.loads(summary_path.read_text()), status="running")))
    assert train(_ppo(128 * 4, *extra), tmp_path / "full", resume=True)["status"] == "finished"
    assert _evals(tmp_path / "full") == reference

    real_log_eval, calls = Run.log_eval, []

    def killed_in_final_eval(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation's second split is being written: a kill arrives
            raise KeyboardInterrupt
        return real_log_eval(self, *args, **kwargs)

    monkeypatch.setattr(Run, "log_eval", killed_in_final_eval)
    assert train(_ppo(128 * 4, *extra), tmp_path / "killed")["status"] == "interrupted"
    assert len(_evals(tmp_path / "killed")) == 1  # one split written before the kill
    monkeypatch.setattr(Run, "log_eval", real_log_eval)
    assert train(_ppo(128 * 4, *extra), tmp_path / "killed", resume=True)["status"] == "finished"
    assert _evals(tmp_path / "killed") == reference


def test_resume_overrides_are_saved_and_fixed_keys_refused(tmp_path):
    train(_ppo(128 * 2), tmp_path / "run")
    config = resume_config(tmp_path / "run", ["total_steps=512", "eval.episodes=0"])
    assert train(config, tmp_path / "run", resume=True)["steps"] == 512
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 512
    assert resume_config(tmp_path / "run").total_steps == 512  # a later plain resume keeps the new budget
    for override, key in (("params.hidden_sizes=[32]", "params.hidden_sizes"), ("env.num_envs=8", "env.num_envs"),
                          ("seed=3", "seed")):
        with pytest.raises(ConfigError, match=f"cannot change {key} on resume"):
            resume_config(tmp_path / "run", [override])


# ---------------------------------------------------------------------------------------------
# No silent data loss
# ---------------------------------------------------------------------------------------------
def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    train(_ppo(128 * 8), tmp_path / "full")
    train(_ppo(128 * 8), tmp_path / "run", stop_after_iterations=6)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    _corrupt(newest)
    summary = train(_ppo(128 * 8), tmp_path / "run", resume=True)
    assert summary["status"] == "finished" and any("cannot be read" in n for n in summary["notes"])
    assert newest.with_name(newest.name + ".unreadable").exists()
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "full") and _same_net(tmp_path / "full",
                                                                                          tmp_path / "run")


def test_no_readable_checkpoint_refuses_then_starts_over_keeping_the_old_logs(tmp_path):
    train(_ppo(128 * 8), tmp_path / "run", stop_after_iterations=6)
    before = (tmp_path / "run" / "metrics.csv").read_text()
    for path in list_checkpoints(tmp_path / "run" / "checkpoints"):
        _corrupt(path)
    with pytest.raises(UnreadableCheckpointsError, match="--start-over"):
        train(_ppo(128 * 8), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "metrics.csv").read_text() == before  # nothing was touched
    summary = train(_ppo(128 * 8), tmp_path / "run", resume=True, start_over=True)
    assert summary["status"] == "finished" and summary["steps"] == 128 * 8
    aside = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("discarded-")]
    assert len(aside) == 1 and (aside[0] / "metrics.csv").read_text() == before
    assert len(list((aside[0] / "checkpoints").iterdir())) == 2


def test_retention_counts_only_checkpoints_that_load(tmp_path):
    run = Run.create(tmp_path / "run", {"algo": "ppo"})
    state = {"algo": {"w": torch.zeros(3)}}
    (run.checkpoint_dir / f"ckpt_{10**9:012d}.pt").write_bytes(b"torn")  # a corrupt file with a higher step
    run.save_checkpoint(100, state, keep=1)
    run.save_checkpoint(200, state, keep=1)
    run.close()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [f"ckpt_{200:012d}.pt"]
    assert load_latest_checkpoint(tmp_path / "run" / "checkpoints")["step"] == 200


def test_torn_temporary_files_are_removed_at_resume(tmp_path):
    train(_ppo(128 * 4), tmp_path / "run", stop_after_iterations=2)
    torn = [tmp_path / "run" / "checkpoints" / ".ckpt_000000000384.pt.tmp4242",
            tmp_path / "run" / ".summary.json.tmp99"]
    for path in torn:
        path.write_bytes(b"x" * 1000)
    summary = train(_ppo(128 * 4), tmp_path / "run", resume=True)
    assert not any(path.exists() for path in torn)
    assert any("torn temporary" in n for n in summary["notes"])


def test_a_second_writer_is_refused(tmp_path):
    run = Run.create(tmp_path / "run", {"algo": "ppo"})
    try:
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            Run.resume(tmp_path / "run")
        with pytest.raises(RunInUseError):
            Run.create(tmp_path / "run", {"algo": "ppo"}, overwrite=True)
    finally:
        run.close()
    Run.resume(tmp_path / "run")[0].close()  # released: a later writer gets it


def test_any_exception_leaves_status_failed_and_the_run_resumable(tmp_path, monkeypatch):
    from aclab.algos.ppo import PPO

    real_iterate, calls = PPO.iterate, []

    def dies(self, envs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("actor died")
        return real_iterate(self, envs)

    monkeypatch.setattr(PPO, "iterate", dies)
    with pytest.raises(RuntimeError, match="actor died"):
        train(_ppo(128 * 6), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "RuntimeError: actor died" in summary["error"]
    assert "Traceback" in summary["traceback"]
    monkeypatch.setattr(PPO, "iterate", real_iterate)
    train(_ppo(128 * 6), tmp_path / "full")
    resumed = train(_ppo(128 * 6), tmp_path / "run", resume=True)
    assert resumed["status"] == "finished" and resumed["error"] is None
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "full")


def test_bad_algorithm_env_pair_creates_no_run_directory(tmp_path):
    config = make_config("sac", "CartPole-v1", overrides=["progress=false"])
    with pytest.raises(ConfigError, match="cannot train sac on CartPole-v1"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------
def test_divergence_monitor_thresholds():
    monitor = DivergenceMonitor(value_loss_max=1e6, kl_max=10.0, entropy_min=1e-3, discrete=True)
    assert monitor.check(100, {"loss/value": 5e5, "approx_kl": 0.01, "entropy": 0.6}) == []
    found = monitor.check(200, {"loss/value": 2e6, "approx_kl": 50.0, "entropy": 0.0})
    assert len(found) == 3 and "loss/value = 2e+06" in found[0] and "approx_kl" in found[1] and "entropy" in found[2]
    assert monitor.check(300, {"loss/value": 1e14}) == []  # each kind is reported once
    continuous = DivergenceMonitor(1e6, 10.0, 1e-3, discrete=False)
    assert continuous.check(1, {"entropy": -3.0}) == []  # Gaussian entropies may be negative
    off = DivergenceMonitor(0.0, 0.0, 0.0, discrete=True)
    assert off.check(1, {"loss/value": 1e30, "kl": 1e9, "entropy": 0.0}) == []


def test_a_collapsing_run_warns_or_stops(tmp_path):
    """PPO with lr = 1e6: the policy collapses (entropy 0) and the value loss explodes."""
    summary = train(_ppo(128 * 6, "params.lr=1e6", "params.anneal_lr=false"), tmp_path / "warn")
    assert summary["status"] == "finished", summary  # training itself stays finite, only absurd
    notes = " | ".join(summary["notes"])
    assert "loss/value = " in notes and "approx_kl = " in notes and "policy collapse" in notes, notes
    stopped = train(_ppo(128 * 6, "divergence.value_loss_max=1e-12", "divergence.stop=true"), tmp_path / "stop")
    assert stopped["status"] == "failed" and "divergence.value_loss_max" in stopped["error"]
    assert stopped["steps"] == 128


# ---------------------------------------------------------------------------------------------
# Stopping and the step budget
# ---------------------------------------------------------------------------------------------
def test_sigterm_inside_a_long_iteration_stops_there_and_resumes_exactly(tmp_path):
    """One iteration of 4 x 4096 CartPole steps takes seconds: SIGTERM stops inside it (grace 0 here), the
    run keeps its last checkpoint, and the resumed run equals an uninterrupted one. While the run lives, its
    directory refuses a second writer."""
    sets = [*FAST, "eval.episodes=0", "params.num_steps=4096", "params.num_epochs=1", "checkpoint_every_iterations=1",
            f"total_steps={4 * 4096 * 3}"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, ACLAB_STOP_GRACE_S="0")
    proc = subprocess.Popen([sys.executable, "-m", "aclab", "train", "ppo", "--env", "CartPole-v1", "--run-dir",
                             str(run_dir), *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list_checkpoints(run_dir / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    with pytest.raises(RunInUseError, match="in use by another aclab process"):
        Run.resume(run_dir)
    time.sleep(0.3)  # well inside the second iteration
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "stopped during an iteration" in summary["error"], err
    assert summary["checkpoint_step"] == 4 * 4096 and "stopped during an iteration" in err
    assert summary["steps"] == 4 * 4096  # stopped while collecting the rollout (PPO counts it when complete)
    config = make_config("ppo", "CartPole-v1", overrides=sets)
    assert train(config, run_dir, resume=True)["status"] == "finished"
    train(config, tmp_path / "full")
    assert metric_rows(run_dir) == metric_rows(tmp_path / "full") and _same_net(run_dir, tmp_path / "full")


@pytest.mark.parametrize("algo, env_id, sets", [
    ("ppo", "CartPole-v1", ["params.num_steps=64"]),  # the rollout collector
    ("td3", "Pendulum-v1", ["params.learning_starts=10", "params.steps_per_iteration=64", "params.batch_size=8",
                            "params.actor_hidden=[8]", 'params.critic_options={"hidden_sizes":[8]}']),  # off-policy
    ("ppo", "CartPole-v1", ["eval.episodes=4", "eval.num_envs=1"]),  # an evaluation
])
def test_a_stop_request_ends_an_iteration_at_its_next_env_step(algo, env_id, sets, monkeypatch):
    from aclab.envs import build_envs
    from aclab.envs.vec import VecEnv
    from aclab.evaluate.policy import evaluate
    from aclab.registry import build

    config = make_config(algo, env_id, overrides=["progress=false", "env.backend=gymnasium", *sets])
    envs = build_envs(config)
    envs.reset(seed=0)
    agent = build(config, envs.spec, torch.device("cpu"))
    real_step, steps = VecEnv.step, []
    monkeypatch.setattr(VecEnv, "step", lambda self, actions: steps.append(1) or real_step(self, actions))
    monkeypatch.setattr(runs, "STOP_GRACE_S", 0.0)
    runs.request_stop()
    try:
        with pytest.raises(runs.StopRequested):
            evaluate(agent, config, "test") if "eval.episodes=4" in sets else agent.iterate(envs)
    finally:
        runs.clear_stop()
        envs.close()
    assert steps == []  # not one env step after the request


def test_a_second_signal_stops_at_once():
    from aclab.train import _StopRequest

    with _StopRequest() as stop:
        stop._handle(signal.SIGTERM, None)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)
    assert not runs.stop_requested()


def test_check_stop_waits_out_the_grace_period(monkeypatch):
    monkeypatch.setattr(runs, "STOP_GRACE_S", 60.0)
    runs.request_stop()
    try:
        runs.check_stop()  # a short iteration may still finish and be checkpointed
        monkeypatch.setattr(runs, "STOP_GRACE_S", 0.0)
        with pytest.raises(runs.StopRequested):
            runs.check_stop()
    finally:
        runs.clear_stop()


def test_step_budget_overshoot_is_reported(tmp_path):
    ppo = train(_ppo(1000), tmp_path / "ppo")  # whole rollouts of 128 steps: 1024
    assert ppo["steps"] == 1024 and ppo["overshoot_steps"] == 24 and any("24 past" in n for n in ppo["notes"])
    td3 = train(make_config("td3", "Pendulum-v1", overrides=[
        "progress=false", "eval.episodes=0", "env.num_envs=2", "total_steps=101", "params.learning_starts=50",
        "params.steps_per_iteration=40", "params.batch_size=8", "params.actor_hidden=[8]",
        'params.critic_options={"hidden_sizes":[8]}']), tmp_path / "td3")
    assert td3["steps"] == 102 and td3["overshoot_steps"] == 1  # within one vectorised env step
    assert np.isfinite(td3["wall_time_s"])


def test_a_first_iteration_past_the_budget_is_announced_at_the_start(tmp_path, capsys):
    # PEARL's first iteration collects the initial data of every training task (6 tasks x 20 steps) plus
    # 2 sampled tasks x (20 prior + 20 extra) steps: 200 env steps at most, past total_steps = 50.
    config = make_config("pearl", "gym:aclab/MetaPointNav-v0", overrides=[
        "progress=false", "total_steps=50", "eval.episodes=0", "params.num_train_tasks=6", "params.num_test_tasks=2",
        "params.meta_batch=2", "params.batch_size=16", "params.embedding_batch_size=8", "params.num_initial_steps=20",
        "params.num_steps_prior=20", "params.num_extra_rl_steps_posterior=20", "params.num_train_steps_per_itr=1",
        "params.num_tasks_sample=2", "params.hidden_sizes=[8]", "params.encoder_hidden=[8]", "params.eval_every=0",
        'env.options={"horizon": 10}'])
    summary = train(config, tmp_path / "pearl")
    err = capsys.readouterr().err
    assert "pearl's next iteration collects up to 200 env steps" in err and "at most at step 200" in err
    assert summary["steps"] == 200 and summary["overshoot_steps"] == 150
    assert err.index("next iteration collects") < err.index("150 past total_steps")  # said first, then again


def test_envpool_resume_says_on_the_console_that_it_is_not_exact(tmp_path, capsys):
    config = _ppo(128 * 4, "env.backend=envpool")
    train(config, tmp_path / "run", stop_after_iterations=2)
    capsys.readouterr()
    summary = train(config, tmp_path / "run", resume=True)
    assert summary["resumed_with_exact_env_state"] is False
    err = capsys.readouterr().err
    assert "aclab: warning: the envpool backend cannot save its simulators" in err and "freshly reset" in err


def test_checkpoints_come_every_n_iterations_and_every_m_minutes():
    from aclab.train import _checkpoint_due

    by_iterations = _ppo(128, "checkpoint_every_iterations=3", "checkpoint_every_minutes=0")
    assert [_checkpoint_due(by_iterations, i, time.monotonic()) for i in range(1, 7)] == [False, False, True] * 2
    by_time = _ppo(128, "checkpoint_every_iterations=0", "checkpoint_every_minutes=10")
    assert not _checkpoint_due(by_time, 7, time.monotonic() - 590)
    assert _checkpoint_due(by_time, 7, time.monotonic() - 601)
