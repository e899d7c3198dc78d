"""``aclab sweep SPEC.toml``: train a grid of algorithms x environments x seeds as subprocesses.

A sweep spec (TOML)::

    algos = ["ppo", "dcpg"]
    envs = ["procgen:bigfish", "procgen:coinrun"]
    seeds = [1, 2, 3]                 # or an integer n, meaning seeds 0 .. n-1
    out_dir = "runs/procgen"          # relative paths are relative to the spec file's folder
    max_parallel = 2                  # concurrent runs (default: number of CPU cores)
    backend = "local"                 # or "ray" (optional; see below)
    preset = "procgen_easy"           # --preset for every algorithm, or per algorithm:
    presets = { ppo = "ppo_procgen", dcpg = "dcpg_procgen" }
    overrides = { total_steps = 25_000_000, "env.num_envs" = 64 }   # --set for every run
    [env_overrides."procgen:coinrun"]  # --set for one environment
    "params.gamma" = 0.99
    [algo_overrides.dcpg]             # --set for one algorithm
    "params.beta_v" = 1.0

Optional keys: ``run_name`` (default ``"{algo}__{env}__seed{seed}"``, ``{env}`` file-name-safe),
``timeout_s`` (per run), ``command_prefix`` (list of strings), ``ray_address``, ``ray_num_cpus``.
``--set`` values are passed in this order: ``overrides``, ``env_overrides``, ``algo_overrides`` (a later
``--set`` of the same key wins in ``aclab train``).

Each run directory ``out_dir/<run_name>`` is handled by its state:

* absent or empty: ``aclab train ALGO --env ENV --seed SEED --run-dir DIR [--preset P] [--set k=v ...]``;
* ``summary.json`` says ``"finished"``: skipped;
* otherwise with a ``config.json`` (interrupted, failed, or killed before its first checkpoint):
  ``aclab train --resume DIR``;
* non-empty without ``config.json``: not touched, reported as failed (remove it or change out_dir).

Each run's stdout and stderr go to ``out_dir/.logs/<run_name>.log`` (hidden, so ``aclab report
out_dir/*`` sees only run directories). Children get ``OMP_NUM_THREADS`` = cores / max_parallel unless
it is already set, so parallel runs do not oversubscribe the CPU.

Validation: with the default trainer (``aclab train``) every (algo, env) cell is resolved with
:func:`aclab.train.make_config` before anything runs (also with ``--dry-run``), so an unknown algorithm,
env id, preset or override key is a :class:`SweepError` naming the cell.

Stopping: children share the sweep's process group and ask the kernel to send them SIGTERM if the sweep
dies (``ACLAB_DIE_WITH_PARENT``, Linux), so a sweep killed even with SIGKILL leaves no run behind; SIGTERM
or SIGINT to the sweep forwards SIGTERM to its children (which checkpoint and stop within seconds),
starts no new run, and a second signal kills them. Each run directory is locked by its writer, so a
re-run sweep can never resume a directory that a live child still writes.

Ray: with ``backend = "ray"`` each run is a Ray task (``ray_num_cpus`` CPUs, default 1) that executes
the same subprocess on whichever node Ray picks, at most ``max_parallel`` at a time. ``ray_address``
joins an existing cluster (``"auto"``, or the head's ``host:port`` as ``ray start --head`` prints it);
without it a local Ray instance is started for the sweep and shut down after it. Every node needs the
same Python environment with aclab at the path of the sweep's ``sys.executable`` (or a
``command_prefix`` valid on every node), and ``out_dir`` on a filesystem every node sees at the same
path (the tasks write the run directories and ``.logs/`` there). A task's child gets ``OMP_NUM_THREADS``
= ``ray_num_cpus`` (unless the sweep's environment sets it) and otherwise the environment of the node it
runs on. Stopping the sweep (SIGINT or SIGTERM) cancels its tasks: each stops its run with SIGTERM (the
run checkpoints and exits, status ``interrupted``; Ray can lose a cancel, so a task still running
``RAY_CANCEL_GRACE_S`` later is force-cancelled: its worker dies and the kernel sends its run SIGTERM)
and the sweep reports the cells as failed; running
the sweep again resumes them (tested against a Ray head started by the tests,
``tests/test_sweep.py``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ALLOWED_KEYS: tuple[str, ...] = (
    "algos",
    "envs",
    "seeds",
    "out_dir",
    "max_parallel",
    "backend",
    "preset",
    "presets",
    "overrides",
    "env_overrides",
    "algo_overrides",
    "run_name",
    "timeout_s",
    "command_prefix",
    "ray_address",
    "ray_num_cpus",
)
BACKENDS: tuple[str, ...] = ("local", "ray")
DEFAULT_RUN_NAME = "{algo}__{env}__seed{seed}"
LOG_DIR_NAME = ".logs"


class SweepError(ValueError):
    """An invalid sweep spec or an unusable backend; the message names the key or the problem."""


@dataclass
class SweepSpec:
    """A validated sweep spec (see the module docstring for the meaning of each field)."""

    algos: list[str]
    envs: list[str]
    seeds: list[int]
    out_dir: Path
    max_parallel: int
    backend: str = "local"
    presets: dict[str, str] = field(default_factory=dict)  # algo -> preset (``preset`` fills every algo)
    overrides: list[str] = field(default_factory=list)  # "key=value"
    env_overrides: dict[str, list[str]] = field(default_factory=dict)
    algo_overrides: dict[str, list[str]] = field(default_factory=dict)
    run_name: str = DEFAULT_RUN_NAME
    timeout_s: float | None = None
    command_prefix: list[str] | None = None
    ray_address: str | None = None
    ray_num_cpus: float = 1.0


@dataclass
class SweepJob:
    """One cell of the grid and what to do with it: ``action`` in train / resume / skip / blocked."""

    algo: str
    env: str
    seed: int
    run_dir: Path
    action: str
    command: list[str]
    reason: str = ""


@dataclass
class JobResult:
    """The outcome of one job: ``status`` in finished / skipped / failed / planned (dry run)."""

    job: SweepJob
    status: str
    returncode: int | None = None
    duration_s: float = 0.0
    log_path: Path | None = None
    message: str = ""


# ----------------------------------------------------------------------------------------------
# Spec loading and validation
# ----------------------------------------------------------------------------------------------
def _fail(key: str, value: Any, expected: str) -> SweepError:
    return SweepError(f"invalid sweep spec value {key}={value!r}: expected {expected}")


def _string_list(data: dict, key: str) -> list[str]:
    value = data.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(key, value, "a non-empty list of strings")
    if len(set(value)) != len(value):
        raise _fail(key, value, "a list without duplicates")
    return list(value)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _override_list(key: str, value: Any) -> list[str]:
    """``{"total_steps": 1000, "env": {"num_envs": 8}}`` or ``["total_steps=1000"]`` -> ["k=v", ...].

    One level of nesting is flattened (TOML reads ``env.num_envs = 8`` as ``{"env": {"num_envs": 8}}``);
    deeper tables (e.g. ``env.options``) are passed as JSON values.
    """
    if isinstance(value, list):
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise _fail(key, value, 'a table of key = value, or a list of "key=value" strings')
        return list(value)
    if not isinstance(value, dict):
        raise _fail(key, value, 'a table of key = value, or a list of "key=value" strings')
    out = []
    for name, item in value.items():
        if isinstance(item, dict) and name in ("env", "eval", "logging", "params"):
            out += [f"{name}.{inner}={_format_value(v)}" for inner, v in item.items()]
        else:
            out.append(f"{name}={_format_value(item)}")
    return out


def validate_sweep_spec(data: dict, base_dir: Path = Path(".")) -> SweepSpec:
    """Validate a parsed spec table; SweepError naming the offending key (and the allowed keys)."""
    unknown = [k for k in data if k not in ALLOWED_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ALLOWED_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"unknown sweep spec key {unknown[0]!r}{hint}; allowed keys: {', '.join(ALLOWED_KEYS)}")
    for required in ("algos", "envs", "seeds", "out_dir"):
        if required not in data:
            raise SweepError(f"sweep spec is missing {required!r}; required keys: algos, envs, seeds, out_dir")
    algos, envs = _string_list(data, "algos"), _string_list(data, "envs")

    seeds_value = data["seeds"]
    if isinstance(seeds_value, int) and not isinstance(seeds_value, bool) and seeds_value >= 1:
        seeds = list(range(seeds_value))
    elif (
        isinstance(seeds_value, list)
        and seeds_value
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_value)
        and len(set(seeds_value)) == len(seeds_value)
    ):
        seeds = list(seeds_value)
    else:
        raise _fail("seeds", seeds_value, "a list of distinct integers >= 0, or a count n >= 1")

    out_dir_value = data["out_dir"]
    if not isinstance(out_dir_value, str) or not out_dir_value:
        raise _fail("out_dir", out_dir_value, "a path string")
    out_dir = Path(out_dir_value).expanduser()
    out_dir = out_dir if out_dir.is_absolute() else (base_dir / out_dir)

    max_parallel = data.get("max_parallel", os.cpu_count() or 1)
    if not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 1:
        raise _fail("max_parallel", max_parallel, "an integer >= 1")
    backend = data.get("backend", "local")
    if backend not in BACKENDS:
        raise _fail("backend", backend, f"one of {', '.join(map(repr, BACKENDS))}")

    presets: dict[str, str] = {}
    if "preset" in data:
        if not isinstance(data["preset"], str) or not data["preset"]:
            raise _fail("preset", data["preset"], "a preset name")
        presets = dict.fromkeys(algos, data["preset"])
    per_algo = data.get("presets", {})
    if not isinstance(per_algo, dict) or not all(isinstance(v, str) for v in per_algo.values()):
        raise _fail("presets", per_algo, "a table algo = preset name")
    for algo in per_algo:
        if algo not in algos:
            raise SweepError(f"presets names algorithm {algo!r}, which is not in algos {algos}")
    presets.update(per_algo)

    overrides = _override_list("overrides", data.get("overrides", {}))
    env_overrides, algo_overrides = {}, {}
    for key, names, target in (
        ("env_overrides", envs, env_overrides),
        ("algo_overrides", algos, algo_overrides),
    ):
        table = data.get(key, {})
        if not isinstance(table, dict):
            raise _fail(key, table, f"a table of {key[:-10]} -> overrides")
        for name, value in table.items():
            if name not in names:
                raise SweepError(f"{key} names {name!r}, which is not in {key[:-10]}s {names}")
            target[name] = _override_list(f"{key}.{name}", value)

    run_name = data.get("run_name", DEFAULT_RUN_NAME)
    if not isinstance(run_name, str):
        raise _fail("run_name", run_name, "a template string using {algo}, {env}, {seed}")
    try:
        names = {run_name.format(algo=a, env=_slug(e), seed=s) for a in algos for e in envs for s in seeds}
    except (KeyError, IndexError, ValueError) as exc:
        raise _fail("run_name", run_name, "a template using only {algo}, {env}, {seed}") from exc
    if len(names) != len(algos) * len(envs) * len(seeds):
        raise _fail("run_name", run_name, "a template giving every (algo, env, seed) its own name")

    timeout_s = data.get("timeout_s")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or timeout_s <= 0):
        raise _fail("timeout_s", timeout_s, "a number of seconds > 0")
    command_prefix = data.get("command_prefix")
    if command_prefix is not None and (
        not isinstance(command_prefix, list)
        or not command_prefix
        or not all(isinstance(c, str) for c in command_prefix)
    ):
        raise _fail("command_prefix", command_prefix, "a non-empty list of strings")
    ray_num_cpus = data.get("ray_num_cpus", 1.0)
    if not isinstance(ray_num_cpus, (int, float)) or ray_num_cpus <= 0:
        raise _fail("ray_num_cpus", ray_num_cpus, "a number > 0")
    return SweepSpec(
        algos=algos,
        envs=envs,
        seeds=seeds,
        out_dir=out_dir,
        max_parallel=max_parallel,
        backend=backend,
        presets=presets,
        overrides=overrides,
        env_overrides=env_overrides,
        algo_overrides=algo_overrides,
        run_name=run_name,
        timeout_s=float(timeout_s) if timeout_s is not None else None,
        command_prefix=command_prefix,
        ray_address=data.get("ray_address"),
        ray_num_cpus=float(ray_num_cpus),
    )


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec TOML file (relative ``out_dir`` = relative to the file's folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise SweepError(f"sweep spec {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"cannot parse sweep spec {path}: {exc}") from exc
    return validate_sweep_spec(data, base_dir=path.resolve().parent)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------
def validate_cells(spec: SweepSpec) -> None:
    """Resolve every (algo, env) cell's config as ``aclab train`` would; SweepError naming the first bad cell
    (unknown algorithm, env id, preset, override key or value)."""
    from aclab.train import make_config

    for algo in spec.algos:
        for env in spec.envs:
            overrides = spec.overrides + spec.env_overrides.get(env, []) + spec.algo_overrides.get(algo, [])
            try:
                make_config(algo, env, spec.presets.get(algo), overrides + [f"seed={spec.seeds[0]}"])
            except ValueError as exc:  # ConfigError, EnvIdError
                raise SweepError(f"sweep cell algo={algo!r}, env={env!r}: {exc}") from exc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def default_command_prefix() -> list[str]:
    return [sys.executable, "-m", "aclab"]


def _read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def plan_action(run_dir: Path) -> tuple[str, str]:
    """``(action, reason)`` for a run directory: train, skip, resume or blocked (see module docstring)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "train", "new run"
    if _read_status(run_dir) == "finished":
        return "skip", "summary.json says finished"
    if (run_dir / "config.json").exists():
        checkpoints = run_dir / "checkpoints"
        has_ckpt = checkpoints.is_dir() and any(checkpoints.glob("ckpt_*.pt"))
        return (
            "resume",
            "interrupted run with checkpoints" if has_ckpt else "interrupted run, no checkpoint yet",
        )
    return "blocked", f"{run_dir} is not empty but has no config.json: remove it or choose another out_dir"


def plan_sweep(spec: SweepSpec, command_prefix: Sequence[str] | None = None,
               threads: int | None = None) -> list[SweepJob]:
    """The grid in (algo, env, seed) order with each job's action and command (``--threads N`` on every
    training command when ``threads`` is given)."""
    prefix = list(command_prefix or spec.command_prefix or default_command_prefix())
    jobs = []
    for algo in spec.algos:
        for env in spec.envs:
            for seed in spec.seeds:
                run_dir = spec.out_dir / spec.run_name.format(algo=algo, env=_slug(env), seed=seed)
                action, reason = plan_action(run_dir)
                if action == "resume":
                    command = prefix + ["train", "--resume", str(run_dir)]
                else:
                    command = prefix + [
                        "train",
                        algo,
                        "--env",
                        env,
                        "--seed",
                        str(seed),
                        "--run-dir",
                        str(run_dir),
                    ]
                    if algo in spec.presets:
                        command += ["--preset", spec.presets[algo]]
                    for item in spec.overrides + spec.env_overrides.get(env, []) + spec.algo_overrides.get(algo, []):
                        command += ["--set", item]
                if threads:
                    command += ["--threads", str(threads)]
                jobs.append(SweepJob(algo, env, seed, run_dir, action, command if action != "skip" else [], reason))
    return jobs


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------
def _child_env(max_parallel: int) -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max_parallel))
    return env


class _Children:
    """The live child processes of this sweep, so a signal to the sweep can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
            if self.stopping:
                proc.terminate()

    def remove(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def signal_all(self, sig: int) -> None:
        with self._lock:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.send_signal(sig)


CHILDREN = _Children()
STOP_GRACE_S = 60.0  # after SIGTERM, a run gets this long to checkpoint and exit before SIGKILL
RAY_CANCEL_GRACE_S = STOP_GRACE_S + 15.0  # a cancelled Ray task still running after this is force-cancelled


def _stop_child(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM (the run checkpoints and stops), then SIGKILL after ``grace_s``; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def execute_command(command: list[str], log_path: str, timeout_s: float | None, env: dict | None,
                    extra_env: dict | None = None) -> tuple[int, float]:
    """Run ``command`` with stdout+stderr appended to ``log_path``; return (exit code, seconds).

    A plain function of plain values so that a Ray task can run it as is; exit code 124 on timeout (the
    child gets SIGTERM, then SIGKILL after ``STOP_GRACE_S``). ``env`` None: this process's environment (on
    a Ray node: that node's), updated with ``extra_env``. The child is told to die with this process
    (``ACLAB_DIE_WITH_PARENT``). Interrupted (KeyboardInterrupt: Ctrl-C, or a Ray task cancelled because
    its sweep stopped), it stops the child with SIGTERM (then SIGKILL after ``STOP_GRACE_S``) before
    re-raising.
    """
    start = time.monotonic()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), **(extra_env or {}), "ACLAB_DIE_WITH_PARENT": str(os.getpid())}
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            log.write(f"\n[aclab sweep] could not start: {exc}\n")
            return 127, time.monotonic() - start
        CHILDREN.add(proc)
        try:
            code = _wait(proc, timeout_s)
        except subprocess.TimeoutExpired:
            _stop_child(proc)
            log.write(f"\n[aclab sweep] timed out after {timeout_s} s\n")
            code = 124
        except BaseException:
            log.write("\n[aclab sweep] stopped: the run was sent SIGTERM\n")
            log.flush()
            _stop_child(proc)
            raise
        finally:
            CHILDREN.remove(proc)
    return code, time.monotonic() - start


def _wait(proc: subprocess.Popen, timeout_s: float | None) -> int:
    """``proc.wait(timeout_s)`` in short slices, so that an interrupt (a cancelled Ray task) is seen at once."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                raise



def die_with_parent() -> None:
    """In a child started by a sweep (``ACLAB_DIE_WITH_PARENT`` = the sweep's pid): ask Linux to send this
    process SIGTERM when the sweep dies (``prctl(PR_SET_PDEATHSIG)``), and stop at once if it already has.
    A no-op elsewhere."""
    parent = os.environ.get("ACLAB_DIE_WITH_PARENT")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    try:
        os.kill(int(parent), 0)
    except ProcessLookupError:  # the sweep died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    except (ValueError, PermissionError):
        pass


class _SweepSignals:
    """SIGINT/SIGTERM to the sweep: forward SIGTERM to the children and start nothing new; a second
    signal kills them (SIGKILL)."""

    def __enter__(self):
        self._previous = {}
        CHILDREN.stopping = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if CHILDREN.stopping:
            CHILDREN.signal_all(signal.SIGKILL)
            return
        CHILDREN.stopping = True
        CHILDREN.signal_all(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _result(job: SweepJob, code: int, seconds: float, log_path: Path) -> JobResult:
    status = _read_status(job.run_dir)
    if code == 0 and status == "finished":
        return JobResult(job, "finished", code, seconds, log_path, "")
    why = f"exit code {code}" if code != 0 else f"exit code 0 but summary.json status is {status!r}"
    return JobResult(job, "failed", code, seconds, log_path, f"{why}; log {log_path}: {_tail(log_path)}")


def _run_local(
    jobs: list[SweepJob], spec: SweepSpec, max_parallel: int, log_dir: Path, log: Callable[[str], None]
) -> dict[int, JobResult]:
    env = _child_env(max_parallel)

    def run_one(index: int) -> tuple[int, JobResult]:
        job = jobs[index]
        log_path = log_dir / f"{job.run_dir.name}.log"
        if CHILDREN.stopping:
            return index, JobResult(job, "failed", message="not started: the sweep was stopped")
        log(f"[sweep] start  {job.run_dir.name} ({job.action})")
        code, seconds = execute_command(job.command, str(log_path), spec.timeout_s, env)
        result = _result(job, code, seconds, log_path)
        log(f"[sweep] {result.status:<8} {job.run_dir.name} ({seconds:.1f} s)")
        return index, result

    with _SweepSignals(), ThreadPoolExecutor(max_workers=max_parallel) as pool:
        futures = [pool.submit(run_one, i) for i in range(len(jobs))]
        while not all(f.done() for f in futures):  # the main thread stays free to take signals
            time.sleep(0.1)
        return dict(f.result() for f in futures)


class _StopFlag:
    """SIGINT/SIGTERM count in ``requested`` (in the main thread) instead of killing the sweep at once."""

    def __init__(self):
        self.requested = 0
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested += 1

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ray_child_env() -> dict[str, str]:
    """What a Ray task adds to its node's environment: only what the sweep's user set on purpose."""
    return {key: os.environ[key] for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if key in os.environ}


def _run_ray(
    jobs: list[SweepJob], spec: SweepSpec, max_parallel: int, log_dir: Path, log: Callable[[str], None]
) -> dict[int, JobResult]:
    """Each job a Ray task (``ray_num_cpus`` CPUs) running :func:`execute_command` on whichever node Ray
    picks, ``max_parallel`` at a time. A signal to the sweep cancels the tasks (their runs get SIGTERM)."""
    try:
        import ray
    except ImportError as exc:
        raise SweepError("backend = 'ray' needs the ray package: pip install 'aclab[ray]'") from exc
    owns_runtime = not ray.is_initialized()
    if owns_runtime:
        ray.init(address=spec.ray_address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=spec.ray_num_cpus, max_retries=0)(execute_command)
    extra_env = {"OMP_NUM_THREADS": str(max(1, int(spec.ray_num_cpus))), **_ray_child_env()}
    pending: dict[Any, int] = {}
    results: dict[int, JobResult] = {}
    queue = list(range(len(jobs)))
    cancelled = 0  # the number of stop signals acted on
    cancelled_at: float | None = None  # when the first cancel went out
    forced = False
    try:
        with _StopFlag() as stop:
            while queue or pending:
                while queue and len(pending) < max_parallel and not stop.requested:
                    index = queue.pop(0)
                    log_path = log_dir / f"{jobs[index].run_dir.name}.log"
                    log(f"[sweep] submit {jobs[index].run_dir.name} ({jobs[index].action}) to ray")
                    pending[remote.remote(jobs[index].command, str(log_path), spec.timeout_s, None, extra_env)] = index
                if stop.requested and stop.requested != cancelled:
                    log(f"[sweep] stopping: cancelling {len(pending)} run(s), {len(queue)} not started")
                    for index in queue:
                        results[index] = JobResult(jobs[index], "failed", message="not started: the sweep was stopped")
                    queue = []
                    for ref in pending:  # first signal: KeyboardInterrupt in the task, which stops its run with
                        ray.cancel(ref, force=stop.requested > 1)  # SIGTERM; a second: kill the task's worker
                    cancelled, forced = stop.requested, forced or stop.requested > 1
                    cancelled_at = time.monotonic() if cancelled_at is None else cancelled_at
                if pending and not forced and cancelled_at is not None \
                        and time.monotonic() - cancelled_at > RAY_CANCEL_GRACE_S:
                    # Ray can lose a cancel (the interrupt reaches a task between two of its steps, or a worker
                    # too busy to take it): kill the workers still running; their runs get SIGTERM from the kernel
                    # (die_with_parent) and checkpoint as they would have.
                    log(f"[sweep] {len(pending)} run(s) still running {RAY_CANCEL_GRACE_S:.0f} s after the "
                        f"cancel: killing their Ray workers")
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    forced = True
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                stopped_errors = (ray.exceptions.TaskCancelledError,  # a forced cancel can also end in a crash
                                  *((ray.exceptions.WorkerCrashedError,) if forced else ()))
                for ref in done:
                    index = pending.pop(ref)
                    job, log_path = jobs[index], log_dir / f"{jobs[index].run_dir.name}.log"
                    try:
                        code, seconds = ray.get(ref)
                    except stopped_errors:
                        results[index] = JobResult(job, "failed", None, 0.0, log_path,
                                                   "stopped with the sweep: the run was sent SIGTERM; run the sweep "
                                                   "again to resume it")
                    except ray.exceptions.RayError as exc:  # the task's worker or node died
                        results[index] = JobResult(job, "failed", None, 0.0, log_path,
                                                   f"Ray task failed: {type(exc).__name__}: {exc}")
                    else:
                        results[index] = _result(job, code, seconds, log_path)
                    log(f"[sweep] {results[index].status:<8} {job.run_dir.name}")
    finally:
        if owns_runtime:
            ray.shutdown()
    return results


def run_sweep(
    spec_path: str | Path | SweepSpec,
    *,
    dry_run: bool = False,
    command_prefix: Sequence[str] | None = None,
    max_parallel: int | None = None,
    log: Callable[[str], None] | None = print,
    threads: int | None = None,
    validate: bool | None = None,
) -> list[JobResult]:
    """Run (or with ``dry_run`` only plan) the sweep; return one :class:`JobResult` per grid cell.

    ``command_prefix`` replaces ``[sys.executable, "-m", "aclab"]`` (and the spec's own
    ``command_prefix``); ``max_parallel`` overrides the spec's; ``threads`` goes to every run as
    ``--threads`` (default: each run's automatic setting, :mod:`aclab.core.threads`). Results are in
    grid order (algo, env, seed). A failed run does not stop the others; check ``result.status``. With
    the default trainer every cell's config is validated first (``validate``: force it on or off).
    """
    spec = spec_path if isinstance(spec_path, SweepSpec) else load_sweep_spec(spec_path)
    if validate if validate is not None else not (command_prefix or spec.command_prefix):
        validate_cells(spec)
    log = log or (lambda _msg: None)
    parallel = max_parallel if max_parallel is not None else spec.max_parallel
    if parallel < 1:
        raise SweepError(f"max_parallel must be >= 1, got {parallel}")
    jobs = plan_sweep(spec, command_prefix, threads)
    results: dict[int, JobResult] = {}
    runnable = []
    for index, job in enumerate(jobs):
        if job.action == "skip":
            results[index] = JobResult(job, "skipped", message=job.reason)
        elif job.action == "blocked":
            results[index] = JobResult(job, "failed", message=job.reason)
        elif dry_run:
            results[index] = JobResult(job, "planned", message=job.reason)
        else:
            runnable.append(index)
    if runnable:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        log_dir = spec.out_dir / LOG_DIR_NAME
        todo = [jobs[i] for i in runnable]
        log(
            f"[sweep] {len(todo)} run(s) to do, {len(jobs) - len(todo)} skipped/blocked, "
            f"{min(parallel, len(todo))} at a time ({spec.backend})"
        )
        runner = _run_ray if spec.backend == "ray" else _run_local
        for local_index, result in runner(todo, spec, parallel, log_dir, log).items():
            results[runnable[local_index]] = result
    return [results[i] for i in range(len(jobs))]


def format_results(results: Sequence[JobResult]) -> str:
    """A plain-text table of job results (for the CLI)."""
    rows = [("status", "run", "action", "time", "note")]
    for r in results:
        rows.append(
            (
                r.status,
                r.job.run_dir.name,
                r.job.action,
                f"{r.duration_s:.1f}s" if r.duration_s else "",
                r.message
                if r.status in ("failed", "skipped")
                else (" ".join(r.job.command) if r.status == "planned" else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4] for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "skipped", "failed", "planned")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(line.rstrip() for line in lines)
