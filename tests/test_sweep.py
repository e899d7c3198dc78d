"""Sweeps with a fake trainer: grid size, commands, skipping finished runs, resuming, parallelism, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest

from aclab import sweep as sw
from aclab.evaluate.runs_io import expand_run_dirs, load_run

# A stand-in for `python -m aclab`: understands `train ALGO --env E --seed S --run-dir D [...]` and
# `train --resume D`, writes a tiny finished run directory, and appends one JSON line per invocation
# (argv, pid, start and end times, how it ended) to $FAKE_TRAINER_LOG. $FAKE_TRAINER_SLEEP: seconds to sleep;
# $FAKE_TRAINER_FAIL_SEED: exit 1 (status "failed") for that seed. The same settings can come from
# settings.json beside the script (Ray tasks run with their node's environment, not the test's). SIGTERM
# stops it as it stops aclab train: status "interrupted" with a checkpoint, exit code 0.
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    start = time.time()
    settings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings.json")
    if os.path.exists(settings):
        os.environ.update(json.load(open(settings)))
    from aclab.sweep import die_with_parent
    die_with_parent()  # as aclab train does: SIGTERM when the process that started it dies
    argv = sys.argv[1:]
    assert argv[0] == "train", argv
    if argv[1] == "--resume":
        run_dir = argv[2]
        config = json.load(open(os.path.join(run_dir, "config.json")))
    else:
        opts = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1, 2)}
        run_dir = opts["--run-dir"]
        os.makedirs(run_dir, exist_ok=True)
        config = {"algo": argv[1], "seed": int(opts["--seed"]), "total_steps": 100,
                  "env": {"id": opts["--env"]}}
        json.dump(config, open(os.path.join(run_dir, "config.json"), "w"))
    def log_call(how):
        with open(os.environ["FAKE_TRAINER_LOG"], "a") as f:
            f.write(json.dumps({"argv": argv, "pid": os.getpid(), "start": start, "end": time.time(),
                                "how": how}) + "\\n")
    def stop(signum, frame):
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        open(os.path.join(run_dir, "checkpoints", "ckpt_000000000050.pt"), "w").close()
        json.dump({"status": "interrupted"}, open(os.path.join(run_dir, "summary.json"), "w"))
        log_call("sigterm")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    log_call("start")
    time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP", "0")))
    failed = str(config["seed"]) == os.environ.get("FAKE_TRAINER_FAIL_SEED")
    with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
        f.write("step,time_s,episode_return\\n100,0.1,%d\\n" % (config["seed"] + 1))
    summary = {"algo": config["algo"], "env_id": config["env"]["id"], "seed": config["seed"], "steps": 100,
               "status": "failed" if failed else "finished"}
    json.dump(summary, open(os.path.join(run_dir, "summary.json"), "w"))
    log_call("done")
    print("fake trainer done", run_dir)
    sys.exit(1 if failed else 0)
""")


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    log = tmp_path / "invocations.jsonl"
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(log))
    monkeypatch.delenv("FAKE_TRAINER_SLEEP", raising=False)
    monkeypatch.delenv("FAKE_TRAINER_FAIL_SEED", raising=False)

    def invocations(how: str = "done") -> list[dict]:
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [c for c in calls if c["how"] == how]

    return [sys.executable, str(script)], invocations


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(text))
    return path


GRID = """
    algos = ["ppo", "dcpg"]
    envs = ["procgen:bigfish", "CartPole-v1"]
    seeds = [1, 2]
    out_dir = "runs"
    max_parallel = 2
    presets = { dcpg = "dcpg_procgen" }
    overrides = { total_steps = 1000, env.num_envs = 2, "params.lr" = 3e-4, env.options = { a = "b" } }
    [env_overrides."CartPole-v1"]
    "params.gamma" = 0.99
    [algo_overrides.dcpg]
    "params.beta_v" = 1.0
    normalize = true
"""


# ----------------------------------------------------------------------------------------------
# Spec loading
# ----------------------------------------------------------------------------------------------
def test_load_spec(tmp_path):
    spec = sw.load_sweep_spec(write_spec(tmp_path, GRID))
    assert spec.algos == ["ppo", "dcpg"] and spec.envs == ["procgen:bigfish", "CartPole-v1"]
    assert spec.seeds == [1, 2] and spec.max_parallel == 2 and spec.backend == "local"
    assert spec.out_dir == tmp_path.resolve() / "runs"  # relative to the spec file's folder
    assert spec.presets == {"dcpg": "dcpg_procgen"}
    assert spec.overrides == [
        "total_steps=1000",
        "env.num_envs=2",
        'env.options={"a": "b"}',
        "params.lr=0.0003",
    ]  # TOML groups the dotted env.* keys in one table
    assert spec.env_overrides == {"CartPole-v1": ["params.gamma=0.99"]}
    assert spec.algo_overrides == {"dcpg": ["params.beta_v=1.0", "normalize=true"]}


def test_spec_defaults(tmp_path):
    spec = sw.load_sweep_spec(
        write_spec(
            tmp_path,
            """
        algos = ["ppo"]
        envs = ["CartPole-v1"]
        seeds = 3
        out_dir = "/tmp/somewhere"
        preset = "ppo_classic"
    """,
        )
    )
    assert spec.seeds == [0, 1, 2]
    assert spec.out_dir == Path("/tmp/somewhere")
    assert spec.max_parallel >= 1 and spec.presets == {"ppo": "ppo_classic"}
    assert sw.default_command_prefix() == [sys.executable, "-m", "aclab"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\nmax_paralel=2',
            r"unknown sweep spec key 'max_paralel' \(did you mean 'max_parallel'\?\); allowed keys: algos",
        ),
        ('algos=["ppo"]\nenvs=["e"]\nout_dir="r"', "missing 'seeds'"),
        (
            'algos=[]\nenvs=["e"]\nseeds=[1]\nout_dir="r"',
            "algos=\\[\\]: expected a non-empty list of strings",
        ),
        (
            'algos=["ppo"]\nenvs=["e"]\nseeds=[1, 1]\nout_dir="r"',
            "seeds=\\[1, 1\\]: expected a list of distinct",
        ),
        ('algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\nmax_parallel=0', "max_parallel=0"),
        ('algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\nbackend="slurm"', "backend='slurm'"),
        (
            'algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\npresets={sac="x"}',
            "presets names algorithm 'sac'",
        ),
        ('algos=["ppo"]\nenvs=["e"]\nseeds=[1, 2]\nout_dir="r"\nrun_name="{algo}"', "its own name"),
        (
            'algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\nrun_name="{oops}"',
            "only {algo}, {env}, {seed}",
        ),
        (
            'algos=["ppo"]\nenvs=["e"]\nseeds=[1]\nout_dir="r"\n[env_overrides.x]\na=1',
            "env_overrides names 'x'",
        ),
        ('algos=["ppo"\n', "cannot parse sweep spec"),
    ],
)
def test_spec_errors(tmp_path, text, message):
    with pytest.raises(sw.SweepError, match=message):
        sw.load_sweep_spec(write_spec(tmp_path, text))


def test_missing_spec_file(tmp_path):
    with pytest.raises(sw.SweepError, match="does not exist"):
        sw.load_sweep_spec(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------------------------
# Planning and running
# ----------------------------------------------------------------------------------------------
def test_dry_run_plans_the_grid(tmp_path):
    results = sw.run_sweep(write_spec(tmp_path, GRID), dry_run=True, command_prefix=["aclab"], log=None)
    assert len(results) == 2 * 2 * 2
    assert {r.status for r in results} == {"planned"}
    assert [(r.job.algo, r.job.env, r.job.seed) for r in results][:3] == [
        ("ppo", "procgen:bigfish", 1),
        ("ppo", "procgen:bigfish", 2),
        ("ppo", "CartPole-v1", 1),
    ]
    assert not (tmp_path / "runs").exists()
    dcpg_cartpole = next(r.job for r in results if r.job.algo == "dcpg" and r.job.env == "CartPole-v1")
    run_dir = str(tmp_path.resolve() / "runs" / "dcpg__CartPole-v1__seed1")
    assert dcpg_cartpole.command == [
        "aclab",
        "train",
        "dcpg",
        "--env",
        "CartPole-v1",
        "--seed",
        "1",
        "--run-dir",
        run_dir,
        "--preset",
        "dcpg_procgen",
        "--set",
        "total_steps=1000",
        "--set",
        "env.num_envs=2",
        "--set",
        'env.options={"a": "b"}',
        "--set",
        "params.lr=0.0003",
        "--set",
        "params.gamma=0.99",
        "--set",
        "params.beta_v=1.0",
        "--set",
        "normalize=true",
    ]
    ppo_bigfish = results[0].job
    assert "--preset" not in ppo_bigfish.command and ppo_bigfish.run_dir.name == "ppo__procgen-bigfish__seed1"
    assert "planned" in sw.format_results(results).splitlines()[1]


def test_run_skip_and_resume(tmp_path, fake):
    prefix, invocations = fake
    spec_path = write_spec(tmp_path, GRID)
    results = sw.run_sweep(spec_path, command_prefix=prefix, log=None)
    assert [r.status for r in results] == ["finished"] * 8, [r.message for r in results]
    assert len(invocations()) == 8
    for r in results:
        run = load_run(r.job.run_dir)
        assert (run.algo, run.env_id, run.seed, run.status) == (r.job.algo, r.job.env, r.job.seed, "finished")
        assert r.log_path.exists() and "fake trainer done" in r.log_path.read_text()
        assert r.log_path.parent.name == ".logs"
    assert len(expand_run_dirs([tmp_path / "runs"])) == 8  # the hidden .logs folder is not a run

    # Everything finished: a second sweep runs nothing.
    again = sw.run_sweep(spec_path, command_prefix=prefix, log=None)
    assert [r.status for r in again] == ["skipped"] * 8 and len(invocations()) == 8

    # Interrupt one run (checkpoint, no finished summary), block another (stray files, no config).
    interrupted = results[3].job.run_dir
    (interrupted / "summary.json").write_text(json.dumps({"status": "running"}))
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "ckpt_000000000050.pt").write_bytes(b"")
    blocked = results[5].job.run_dir
    (blocked / "config.json").unlink()
    (blocked / "summary.json").unlink()
    third = sw.run_sweep(spec_path, command_prefix=prefix, log=None)
    calls = invocations()[8:]
    assert [c["argv"] for c in calls] == [["train", "--resume", str(interrupted)]]
    assert third[3].job.action == "resume" and third[3].status == "finished"
    assert third[5].status == "failed" and "no config.json" in third[5].message
    assert [r.status for i, r in enumerate(third) if i not in (3, 5)] == ["skipped"] * 6


def test_resume_without_checkpoint(tmp_path, fake):
    prefix, invocations = fake
    spec_path = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=[0]\nout_dir="runs"\n')
    run_dir = tmp_path / "runs" / "ppo__CartPole-v1__seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algo": "ppo", "seed": 0, "env": {"id": "CartPole-v1"}}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed"}))
    (result,) = sw.run_sweep(spec_path, command_prefix=prefix, log=None)
    assert result.job.action == "resume" and result.job.reason == "interrupted run, no checkpoint yet"
    assert result.status == "finished" and invocations()[0]["argv"][:2] == ["train", "--resume"]


def test_failed_run_does_not_stop_the_others(tmp_path, fake, monkeypatch):
    prefix, _ = fake
    monkeypatch.setenv("FAKE_TRAINER_FAIL_SEED", "2")
    spec_path = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=[1, 2, 3]\nout_dir="runs"\n')
    results = sw.run_sweep(spec_path, command_prefix=prefix, log=None)
    assert [r.status for r in results] == ["finished", "failed", "finished"]
    assert "exit code 1" in results[1].message and "fake trainer done" in results[1].message
    assert "1 failed" in sw.format_results(results)


def _max_overlap(calls: list[dict]) -> int:
    events = sorted([(c["start"], 1) for c in calls] + [(c["end"], -1) for c in calls], key=lambda e: (e[0], e[1]))
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


@pytest.mark.parametrize("max_parallel", [1, 2])
def test_parallelism_bound(tmp_path, fake, monkeypatch, max_parallel):
    prefix, invocations = fake
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.4")
    spec_path = write_spec(
        tmp_path,
        f'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=4\nout_dir="runs"\nmax_parallel={max_parallel}\n',
    )
    messages: list[str] = []
    results = sw.run_sweep(spec_path, command_prefix=prefix, log=messages.append)
    assert [r.status for r in results] == ["finished"] * 4
    assert _max_overlap(invocations()) == max_parallel
    assert sum(m.startswith("[sweep] start") for m in messages) == 4


def test_max_parallel_argument_overrides_spec(tmp_path, fake, monkeypatch):
    prefix, invocations = fake
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.3")
    spec_path = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=2\nout_dir="runs"\nmax_parallel=2\n')
    sw.run_sweep(spec_path, command_prefix=prefix, max_parallel=1, log=None)
    assert _max_overlap(invocations()) == 1
    with pytest.raises(sw.SweepError, match="max_parallel must be >= 1"):
        sw.run_sweep(spec_path, command_prefix=prefix, max_parallel=0, log=None)


def test_ray_backend_without_ray(tmp_path, fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    prefix, _ = fake
    spec_path = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["e"]\nseeds=[0]\nout_dir="runs"\nbackend="ray"\n')
    with pytest.raises(sw.SweepError, match="needs the ray package"):
        sw.run_sweep(spec_path, command_prefix=prefix, log=None)


# ----------------------------------------------------------------------------------------------
# Ray: a head started here (as `ray start --head` on a cluster's first machine), sweeps join it
# ----------------------------------------------------------------------------------------------
# Ray's token authentication (its default for `ray start`): a driver that joins by an explicit address
# sends the token (~/.ray/auth_token) only with RAY_AUTH_MODE=token in its environment.
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def _ray_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          env=RAY_ENV, **kwargs)


def _sweep_cli(spec_path: Path, **kwargs):
    """``aclab sweep SPEC`` as a user runs it, in its own process."""
    return subprocess.Popen([sys.executable, "-m", "aclab", "sweep", str(spec_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=RAY_ENV, **kwargs)


def _processes_mentioning(text: str) -> list[int]:
    """Pids of this machine's processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with 2 CPUs on this machine (one per module); its address, for ``ray_address``. Torn down by
    stopping the processes it started (found by its own temp dir; other Ray instances are left alone)."""
    pytest.importorskip("ray")
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = _ray_cli("start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                       "--disable-usage-stats", f"--temp-dir={temp_dir}", timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"127.0.0.1:{port}"
    for _ in range(3):
        pids = _processes_mentioning(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM if _ == 0 else signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(2)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_spec(tmp_path: Path, address: str, seeds: str, **settings) -> Path:
    """A sweep spec on the Ray head; the fake trainer's settings go beside it (Ray tasks do not see the
    test's environment variables)."""
    script = tmp_path / "fake_trainer.py"
    (tmp_path / "settings.json").write_text(json.dumps({"FAKE_TRAINER_LOG": os.environ["FAKE_TRAINER_LOG"],
                                                        **{k: str(v) for k, v in settings.items()}}))
    return write_spec(tmp_path, f"""
        algos = ["ppo"]
        envs = ["CartPole-v1"]
        seeds = {seeds}
        out_dir = "runs"
        max_parallel = 2
        backend = "ray"
        ray_address = "{address}"
        command_prefix = ["{sys.executable}", "{script}"]
    """)


def test_ray_sweep_on_a_head_runs_in_parallel_fails_one_and_skips_a_finished_one(tmp_path, fake, ray_head):
    _, invocations = fake
    spec_path = _ray_spec(tmp_path, ray_head, "[0, 1, 2, 3]", FAKE_TRAINER_SLEEP=1.0, FAKE_TRAINER_FAIL_SEED=2)
    finished = tmp_path / "runs" / "ppo__CartPole-v1__seed0"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"status": "finished"}))
    sweep = _sweep_cli(spec_path)
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 3, output  # one cell failed
    table = {line.split()[1]: line.split()[0] for line in output.splitlines() if line.startswith(
        ("finished ", "skipped ", "failed "))}
    assert table == {"ppo__CartPole-v1__seed0": "skipped", "ppo__CartPole-v1__seed1": "finished",
                     "ppo__CartPole-v1__seed2": "failed", "ppo__CartPole-v1__seed3": "finished"}, output
    assert "exit code 1" in output and "1 failed" in output and output.count("to ray") == 3
    calls = invocations()
    assert sorted(c["argv"][5] for c in calls) == ["1", "2", "3"]  # the finished seed 0 never ran
    assert _max_overlap(calls) == 2  # two at a time on the head's 2 CPUs
    assert (tmp_path / "runs" / ".logs" / "ppo__CartPole-v1__seed1.log").exists()


def test_ray_sweep_stopped_by_a_signal_stops_its_runs_and_resumes_without_duplicates(tmp_path, fake, ray_head):
    """SIGTERM to the sweep cancels its Ray tasks, which stop their runs with SIGTERM (they checkpoint, status
    interrupted) and start no others; running the sweep again resumes those runs and trains the rest, so each
    cell is trained from scratch once and finished once."""
    _, invocations = fake
    spec_path = _ray_spec(tmp_path, ray_head, "[0, 1, 2]", FAKE_TRAINER_SLEEP=120)
    sweep = _sweep_cli(spec_path)
    deadline = time.monotonic() + 120
    while len(invocations("start")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    started = invocations("start")
    assert len(started) == 2, sweep.stdout.read() if sweep.poll() is not None else "runs did not start"
    sweep.send_signal(signal.SIGTERM)
    output, _ = sweep.communicate(timeout=sw.RAY_CANCEL_GRACE_S + 120)  # a lost cancel is forced after the grace
    assert sweep.returncode == 3, output
    stopped = invocations("sigterm")
    assert sorted(c["pid"] for c in stopped) == sorted(c["pid"] for c in started), output
    assert not any(Path(f"/proc/{c['pid']}").exists() for c in started)
    assert "stopped with the sweep" in output and "not started: the sweep was stopped" in output
    first = {c["argv"][5] for c in started}

    (tmp_path / "settings.json").write_text(json.dumps({"FAKE_TRAINER_LOG": os.environ["FAKE_TRAINER_LOG"]}))
    again = _sweep_cli(spec_path)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "3 finished" in output, output
    resumed = [c for c in invocations() if c["argv"][1] == "--resume"]
    fresh = [c for c in invocations() if c["argv"][1] != "--resume"]
    assert sorted(Path(c["argv"][2]).name[-1] for c in resumed) == sorted(first)
    assert [c["argv"][5] for c in fresh] == sorted({"0", "1", "2"} - first)
    assert len(invocations("start")) == 2 + 3  # no cell ran twice in the second sweep


SLEEPER = textwrap.dedent("""
    import os, sys, time
    from aclab.sweep import die_with_parent
    die_with_parent()
    run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
    os.makedirs(run_dir, exist_ok=True)
    with open(run_dir + ".pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_sweep_stops_its_children(tmp_path, sig):
    """SIGTERM to the sweep is forwarded to its runs; a sweep killed with SIGKILL takes its runs with it (they
    would otherwise keep writing run directories that a re-run sweep resumes)."""
    import signal
    import subprocess
    import time

    (tmp_path / "sleeper.py").write_text(SLEEPER)
    spec_path = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=2\nout_dir="runs"\nmax_parallel=2\n')
    driver = (f"from aclab.sweep import run_sweep; run_sweep({str(spec_path)!r}, "
              f"command_prefix=[{sys.executable!r}, {str(tmp_path / 'sleeper.py')!r}])")
    sweep = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / "runs" / f"ppo__CartPole-v1__seed{s}.pid" for s in (0, 1)]
    deadline = time.time() + 60
    while not all(p.exists() and p.read_text() for p in pid_files) and time.time() < deadline:
        time.sleep(0.05)
    children = [int(p.read_text()) for p in pid_files]
    assert all(_alive(pid) for pid in children)
    sweep.send_signal(getattr(signal, sig))
    sweep.wait(timeout=60)
    deadline = time.time() + 30
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in children)


class _LossyRay(types.SimpleNamespace):
    """Just enough of ``ray`` for ``_run_ray``: tasks never finish on their own, a plain cancel is lost (as
    Ray can lose one) and a forced cancel ends the task; SIGTERM reaches the sweep on its third wait."""

    def __init__(self):
        class RayError(Exception):
            pass

        errors = {name: type(name, (RayError,), {}) for name in ("TaskCancelledError", "WorkerCrashedError")}
        super().__init__(cancels=[], waits=0, finished=set(),
                         exceptions=types.SimpleNamespace(RayError=RayError, **errors))

    def is_initialized(self):
        return True

    def remote(self, **_options):
        return lambda function: types.SimpleNamespace(remote=lambda *args: object())

    def cancel(self, ref, force=False):
        self.cancels.append((time.monotonic(), force))
        if force:
            self.finished.add(ref)

    def wait(self, refs, num_returns, timeout):
        self.waits += 1
        if self.waits == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.waits > 1000:
            raise RuntimeError("the sweep did not stop its tasks")
        time.sleep(0.01)
        return [r for r in refs if r in self.finished][:num_returns], []

    def get(self, ref):
        raise self.exceptions.WorkerCrashedError()  # what a task whose worker was killed can give


def test_a_ray_task_whose_cancel_was_lost_is_force_cancelled_after_the_grace(tmp_path, monkeypatch):
    """A stopped Ray sweep cancels each task (its run gets SIGTERM); a task still running RAY_CANCEL_GRACE_S
    later is force-cancelled (its worker dies and the kernel sends the run SIGTERM), so the sweep stops even
    when Ray loses a cancel."""
    fake_ray = _LossyRay()
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(sw, "RAY_CANCEL_GRACE_S", 0.5)
    spec = write_spec(tmp_path, 'algos=["ppo"]\nenvs=["CartPole-v1"]\nseeds=2\nout_dir="runs"\nmax_parallel=2\n'
                                'backend="ray"\n')
    lines: list[str] = []
    results = sw.run_sweep(spec, command_prefix=["true"], log=lines.append)
    assert [force for _, force in fake_ray.cancels] == [False, False, True, True], fake_ray.cancels
    waited = fake_ray.cancels[2][0] - fake_ray.cancels[0][0]
    assert 0.5 < waited < 5.0, waited
    assert all(r.status == "failed" and "stopped with the sweep" in r.message for r in results), results
    assert any("killing their Ray workers" in line for line in lines), lines
