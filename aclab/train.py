"""The one training loop shared by every algorithm, plus config resolution and evaluation.

    algo = registry.build(config, env_spec, device)   # every input checked before the run dir exists
    run = Run.create(...) or Run.resume(...)          # the run directory's lock is held from here on
    algo.load_state_dict(checkpoint["algo"])          # when resuming (and envs, RNGs, the loop's state)
    while algo.steps < config.total_steps:
        metrics = algo.iterate(envs)                   # collect what it needs, then update
        run.log(algo.steps, metrics)                   # + divergence checks, periodic evaluation
        checkpoint every N iterations / M minutes (atomic)
    final checkpoint, then the final evaluation

Any exception leaves ``status: failed`` and the error in summary.json; SIGINT/SIGTERM stop within seconds
(see :class:`_StopRequest`).
"""

from __future__ import annotations

import collections
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from aclab import registry
from aclab.algos.common import (
    NonFiniteLossError,
    global_rng_state,
    resolve_device,
    seed_everything,
    set_global_rng_state,
)
from aclab.config import (
    Config,
    ConfigError,
    check_resume_changes,
    config_from_dict,
    config_from_table,
    load_preset,
    parse_override,
    set_key,
)
from aclab.envs import build_envs, make_env, parse_env_id
from aclab.evaluate.policy import evaluate
from aclab.runs import (
    EVALS_FILE,
    DivergenceMonitor,
    LoopState,
    ResumePoint,
    Run,
    StopRequested,
    clear_stop,
    read_run_config,
    request_stop,
    stop_requested,
)

RECENT_EPISODES = 100


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
def make_config(
    algo: str,
    env_id: str | None = None,
    preset: str | None = None,
    overrides: list[str] | dict | None = None,
) -> Config:
    """Resolve a full Config: algorithm defaults <- preset <- env id <- overrides; validated.

    With no ``preset``, the preset ``<algo>-<family>`` for the env's family is used when it exists.
    """
    entry = registry.get_entry(algo)
    if env_id is not None:
        parse_env_id(env_id)  # unknown ids fail here, before anything is built
    table: dict = {"algo": algo}
    if preset is None and env_id is not None:
        family, _ = parse_env_id(env_id)
        preset = registry.default_preset(algo, family, _is_discrete(env_id))
    if preset is not None:
        preset_name, table = load_preset(preset)
        table = dict(table)
        preset_algo = table.get("algo", algo)
        if preset_algo != algo and registry.get_algorithm(preset_algo) is not entry.cls:
            raise ConfigError(f"preset {preset_name!r} is for algorithm {preset_algo!r}, not {algo!r}")
        table["algo"] = algo
        table["preset"] = preset_name
    config = config_from_table(table, entry.cls.Config)
    for key, value in entry.defaults.items():
        set_key(config, f"params.{key}", value)
    if env_id is not None:
        config.env.id = env_id
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        set_key(config, key, value)
    parse_env_id(config.env.id)
    config.validate()
    return config


def _is_discrete(env_id: str) -> bool:
    """Whether an env has discrete actions, from a 1-env probe (cheap; closed at once)."""
    envs = make_env(env_id, 1, 0)
    try:
        return envs.spec.discrete
    finally:
        envs.close()


def load_run_config(run_dir: Path) -> Config:
    """The saved config of a run directory; RunError/ConfigError for a missing, unreadable or invalid one."""
    data = read_run_config(Path(run_dir))
    try:
        return config_from_dict(data, registry.get_algorithm(data["algo"]).Config)
    except ConfigError as exc:
        raise ConfigError(f"{Path(run_dir) / 'config.json'}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
_DEFAULT_TORCH_THREADS = torch.get_num_threads()  # before any run changes it


def _set_torch_threads(config: Config, device: torch.device, spec) -> None:
    """``torch_threads = 0`` (auto): one intra-op thread for vector observations on CPU, where small
    networks are bound by per-call overhead and a second thread only adds contention (measured ~3x
    slower PPO on CartPole on a 2-core machine under load); torch's default (all cores) for images and
    for algorithms whose class sets ``ARITHMETIC_BOUND_UPDATES = True`` (TD3 and SAC: 256-wide networks
    on batches of 256, one update per env step; measured 1.5-1.65x faster with two threads than one on
    HalfCheetah on an otherwise idle 2-core machine)."""
    arithmetic_bound = getattr(registry.get_algorithm(config.algo), "ARITHMETIC_BOUND_UPDATES", False)
    if config.torch_threads > 0:
        threads = config.torch_threads
    elif device.type == "cpu" and len(spec.obs_shape) == 1 and not arithmetic_bound:
        threads = 1
    else:  # the process's default, also after an earlier run in this process set another count
        threads = _DEFAULT_TORCH_THREADS
    torch.set_num_threads(threads)


class _StopRequest:
    """SIGINT/SIGTERM request a stop (:func:`aclab.runs.request_stop`): the loop checkpoints at an iteration
    boundary, or abandons the iteration in progress at its next env step or minibatch (its state is not
    consistent; the run resumes from its latest checkpoint). A second signal stops at once."""

    def __init__(self):
        self._previous = {}

    @property
    def requested(self) -> bool:
        return stop_requested()

    def __enter__(self):
        clear_stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if stop_requested():  # second signal: stop now
            raise KeyboardInterrupt
        request_stop()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        clear_stop()


class _Notices:
    """One-line notes and warnings for the console (stderr, or the progress bar's console while it runs),
    also kept for summary.json."""

    def __init__(self, progress: _Progress):
        self.progress = progress
        self.lines: list[str] = []

    def __call__(self, message: str, kind: str = "note") -> None:
        self.lines.append(message)
        live = getattr(self.progress, "_progress", None)
        if live is not None:
            live.console.print(f"aclab: {kind}: {message}", markup=False, highlight=False)
        else:
            print(f"aclab: {kind}: {message}", file=sys.stderr, flush=True)


class DivergedError(RuntimeError):
    """A divergence check fired with ``divergence.stop = true``."""


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    env_name = config.env.id.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{config.algo}-{env_name}-s{config.seed}-{stamp}"


def build_algorithm(config: Config, spec, device: torch.device):
    """``registry.build`` with an algorithm/env mismatch (e.g. SAC on a discrete env) as a ConfigError."""
    try:
        return registry.build(config, spec, device)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"cannot train {config.algo} on {config.env.id}: {exc}") from exc


def train(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          start_over: bool = False, stop_after_iterations: int | None = None, console=None) -> dict:
    """Train ``config.algo`` until ``config.total_steps``; return the summary dict.

    ``resume=True`` reopens ``run_dir`` and continues from its latest readable checkpoint (``start_over``:
    restart from step 0 when no checkpoint can be read, the old logs moved aside); ``config`` (e.g.
    from :func:`resume_config`) is saved as the run's config. Everything that can be checked (device,
    algorithm/env compatibility, the run directory) is checked before the run directory is created or
    touched. ``stop_after_iterations`` stops early (as a kill would, but after a clean checkpoint); for
    tests.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    device = resolve_device(config.device)
    if not resume:
        Run.check_new(run_dir, overwrite)
    if config.deterministic_torch:
        torch.use_deterministic_algorithms(True)
    seed_everything(config.seed)
    envs = build_envs(config)
    algo = None
    try:
        envs.reset(seed=config.seed)
        _set_torch_threads(config, device, envs.spec)
        algo = build_algorithm(config, envs.spec, device)
        if resume:
            run, point = Run.resume(run_dir, start_over=start_over)
        else:
            run, point = Run.create(run_dir, config.to_dict(), overwrite=overwrite), ResumePoint(None, [])
    except BaseException:
        _close(envs, algo)
        raise
    try:
        if resume:
            run.write_config(config.to_dict())
        return _train_run(run, point, config, envs, algo, device, resume, stop_after_iterations, console)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            run.write_summary({"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc()})
        raise
    finally:
        _close(envs, algo)
        run.close()


def _close(envs, algo) -> None:
    envs.close()
    if algo is not None and hasattr(algo, "close"):  # actor pools (IMPALA/STAC) stop their workers now
        algo.close()


def _train_run(run: Run, point: ResumePoint, config: Config, envs, algo, device, resume: bool,
               stop_after_iterations: int | None, console) -> dict:
    progress = _Progress(config, algo.steps, enabled=config.progress, console=console)
    notice = _Notices(progress)
    for note in point.notes:
        notice(note, "warning")
    checkpoint = point.checkpoint
    loop = LoopState.from_checkpoint(checkpoint)
    envs_exact = True
    if checkpoint is not None:
        algo.load_state_dict(checkpoint["algo"])
        envs_exact = envs.load_state_dict(checkpoint["envs"])
        set_global_rng_state(checkpoint["rng"])
        if not envs_exact:
            notice(f"the {envs.backend_name} backend cannot save its simulators: this run continues from the "
                   f"checkpoint at step {checkpoint['step']} with freshly reset envs (networks, optimisers and "
                   "statistics restored), so it will not match an uninterrupted run bit for bit", "warning")
    final_eval_step = algo.steps if point.final_eval_done else None  # a completed final evaluation
    if (checkpoint is not None and algo.steps >= config.total_steps
            and (final_eval_step == algo.steps or config.eval.episodes == 0)
            and run.read_summary().get("status") == "finished"):
        notice(f"{run.path} already finished at step {algo.steps:,} (total_steps {config.total_steps:,}); "
               "nothing to do (raise --total-steps to train on)")
        return run.read_summary()
    recent = collections.deque(loop.recent_returns, maxlen=RECENT_EPISODES)
    divergence = DivergenceMonitor(config.divergence.value_loss_max, config.divergence.kl_max,
                                   config.divergence.entropy_min, envs.spec.discrete)
    divergence.load_state_dict(loop.divergence or {})
    saved_step = int(checkpoint["step"]) if checkpoint is not None else None

    def save() -> None:
        nonlocal saved_step, last_save
        loop.recent_returns, loop.wall_time_s, loop.divergence = list(recent), run.elapsed(), divergence.state_dict()
        run.save_checkpoint(algo.steps, {
            "algo": algo.state_dict(),
            "envs": envs.state_dict(),
            "rng": global_rng_state(),
            "loop": loop.state_dict(),
            "logs": {"eval_rows": run.eval_rows()},
        }, keep=config.keep_checkpoints)
        saved_step, last_save = algo.steps, time.monotonic()

    run.tensorboard()  # import and open the writer before the clock starts
    run.start_clock(loop.wall_time_s)
    start, last_save = time.time(), time.monotonic()
    start_steps = algo.steps
    status, error = "finished", None
    iterations_here = 0
    try:
        with _StopRequest() as stop, progress:
            while algo.steps < config.total_steps:
                if stop.requested or (stop_after_iterations is not None and iterations_here >= stop_after_iterations):
                    if saved_step != algo.steps:
                        save()
                    status = "interrupted"
                    if stop.requested:
                        notice(f"stopped at step {algo.steps:,} after a checkpoint; continue with "
                               f"'aclab train --resume {run.path}'")
                    break
                metrics = algo.iterate(envs)
                iterations_here += 1
                iteration = getattr(algo, "iteration", iterations_here)
                recent.extend(float(r) for r in algo.last_episode_returns)
                metrics["steps_per_s"] = (algo.steps - start_steps) / max(time.time() - start, 1e-9)
                if iteration % config.log_every_iterations == 0:
                    run.log(algo.steps, metrics)
                for warning in divergence.check(algo.steps, metrics):
                    notice(warning, "warning")
                    if config.divergence.stop:
                        raise DivergedError(warning)
                progress.update(algo.steps, metrics, recent)
                if config.eval.every_steps and algo.steps - loop.last_eval_step >= config.eval.every_steps:
                    _run_evals(algo, config, run, envs)
                    loop.last_eval_step = algo.steps
                if algo.steps < config.total_steps and _checkpoint_due(config, iteration, last_save):
                    save()
            if status == "finished":
                if saved_step != algo.steps:
                    save()  # the final checkpoint, before the final evaluation (see Run.mark_final_eval)
                if config.eval.episodes > 0 and final_eval_step != algo.steps:
                    if loop.last_eval_step != algo.steps:  # else the periodic evaluation just done is final
                        _run_evals(algo, config, run, envs)
                    run.mark_final_eval(algo.steps)
    except StopRequested:
        status = "interrupted"
        error = (f"stopped during an iteration at step {algo.steps:,}; its work is not checkpointed: the run "
                 + (f"resumes from its checkpoint at step {saved_step:,}" if saved_step is not None
                    else "has no checkpoint yet and restarts on resume"))
    except KeyboardInterrupt:
        status = "interrupted"
        error = ("stopped at once by a second interrupt; the run resumes from its checkpoint at step "
                 f"{saved_step:,}" if saved_step is not None else "stopped at once by a second interrupt")
    except (NonFiniteLossError, DivergedError) as exc:
        status, error = "failed", str(exc)
    if error:
        notice(error, "warning" if status == "interrupted" else "error")

    summary = {
        "algo": config.algo,
        "env_id": config.env.id,
        "preset": config.preset,
        "seed": config.seed,
        "steps": int(algo.steps),
        "total_steps": int(config.total_steps),
        "overshoot_steps": max(int(algo.steps) - int(config.total_steps), 0),
        "wall_time_s": round(run.elapsed(), 3),
        "steps_per_s": round((algo.steps - start_steps) / max(time.time() - start, 1e-9), 1),
        "final_return": float(np.mean(recent)) if recent else None,
        "final_return_episodes": len(recent),
        "status": status,
        "resumed_with_exact_env_state": envs_exact if resume else None,
        "device": str(device),
        "checkpoint_step": saved_step,
        "notes": list(notice.lines),
        "error": error,
        "traceback": None,
    }
    if status == "finished" and summary["overshoot_steps"]:
        notice(f"stopped at step {algo.steps:,}, {summary['overshoot_steps']:,} past total_steps "
               f"{config.total_steps:,}: {config.algo} trains on whole iterations (rollouts, batches)")
        summary["notes"] = list(notice.lines)
    summary.update(_last_evals(run.path / EVALS_FILE))
    run.write_summary(summary)
    try:
        from aclab.plots import plot_learning_curve

        plot_learning_curve(run.path)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose a finished run
        summary["plot_error"] = str(exc)
    return summary


def _checkpoint_due(config: Config, iteration: int, last_save: float) -> bool:
    every = config.checkpoint_every_iterations
    minutes = config.checkpoint_every_minutes
    return bool((every and iteration % every == 0) or (minutes and time.monotonic() - last_save >= 60 * minutes))


def _last_evals(path: Path) -> dict:
    """``eval_<split>_return``: the mean return of each split's last evaluation in evals.csv."""
    if not path.exists():
        return {}
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        try:
            out[f"eval_{row['split']}_return"] = float(row["mean_return"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _run_evals(algo, config: Config, run: Run, envs) -> None:
    splits = ["train", "test"] if config.eval.split == "both" else [config.eval.split]
    for split in splits:
        returns = evaluate(algo, config, split, train_envs=envs)
        run.log_eval(algo.steps, split, returns)


class _Progress:
    """A rich progress bar (steps, steps/s, recent return, ETA); a no-op when disabled."""

    def __init__(self, config: Config, start_steps: int, enabled: bool, console=None):
        self.enabled = enabled
        self.total = config.total_steps
        self.start_steps = start_steps
        self.console = console
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[sps]} steps/s"),
                TextColumn("return {task.fields[ret]}"), TimeRemainingColumn(), console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start_steps,
                                                 sps="-", ret="-")
        return self

    def update(self, steps: int, metrics: dict, recent) -> None:
        if self._progress is not None:
            ret = f"{np.mean(recent):.1f}" if recent else "-"
            self._progress.update(self._task, completed=min(steps, self.total),
                                  sps=f"{metrics.get('steps_per_s', 0):,.0f}", ret=ret)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)


def resume_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    """The saved config of ``run_dir`` with optional overrides (e.g. a larger total_steps); ConfigError for a
    key that cannot change on resume (see :data:`aclab.config.RESUMABLE_KEYS`)."""
    saved = load_run_config(run_dir)
    config = load_run_config(run_dir)
    for key, value in (parse_override(o) for o in (overrides or [])):
        set_key(config, key, value)
    config.validate()
    check_resume_changes(saved, config)
    return config
