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
import dataclasses
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from aclab import distributed, registry
from aclab.algos.common import (
    NonFiniteLossError,
    global_rng_state,
    resolve_device,
    seed_everything,
    set_global_rng_state,
)
from aclab.callbacks import CallbackList, EvaluationInfo, IterationInfo, StopTraining
from aclab.config import (
    Config,
    ConfigError,
    EnvConfig,
    apply_table,
    check_resume_changes,
    config_from_dict,
    config_from_table,
    load_preset,
    parse_override,
    set_key,
)
from aclab.core.threads import flush_denormals, set_threads
from aclab.data.actors import ActorFailureLimit
from aclab.envs import EnvIdError, build_envs, make_env, parse_env_id
from aclab.envs.make import check_level_control
from aclab.envs.registry import import_env_modules, register_env_factory
from aclab.evaluate.policy import eval_levels, evaluate_splits
from aclab.run_logging import EpisodeRecorder, PlainProgress, WandbSink
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
    *,
    env_factory=None,
) -> Config:
    """Resolve a full Config: algorithm defaults <- preset <- env id <- overrides; validated.

    With no ``preset``, the preset ``<algo>-<family>`` for the env's family is used when it exists.
    ``env_factory``: a zero-argument callable returning a ``gymnasium.Env`` (your own env object) instead
    of ``env_id``; the config records it as ``"factory:<module>:<name>"`` (see
    :func:`aclab.envs.register_env_factory`).
    """
    if env_factory is not None:
        if env_id is not None:
            raise ConfigError("give env_id or env_factory, not both")
        env_id = register_env_factory(env_factory)
    entry = registry.get_entry(algo)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    items = list(items)
    loaded = load_preset(preset) if preset is not None else None
    _import_early(items, loaded[1] if loaded else {})
    if env_id is not None:
        parse_env_id(env_id)  # unknown ids fail here, before anything is built
    table: dict = {"algo": algo}
    if preset is None and env_id is not None:
        family, _ = parse_env_id(env_id)
        preset = registry.default_preset(algo, family, _is_discrete(env_id))
        loaded = load_preset(preset) if preset is not None else None
    if loaded is not None:
        preset_name, table = loaded
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
    for key, value in items:
        set_key(config, key, value)
    parse_env_id(config.env.id)
    config.validate()
    check_eval_levels(config)
    if getattr(entry.cls, "LEVEL_CONTROL", False):  # e.g. PLR: the env must offer a finite set of levels
        check_level_control(config.env.id, config.env.options, config.env.backend, config.env.num_envs)
    return config


def check_eval_levels(config: Config) -> None:
    """The evaluation level sets must exist for the training options (e.g. ``eval.levels = "unseen"``
    needs a finite training range): ConfigError naming the keys otherwise."""
    try:
        for split in eval_splits(config):
            eval_levels(config, split)
    except EnvIdError as exc:
        raise ConfigError(f"invalid value eval.levels={config.eval.levels!r} with env.options="
                          f"{config.env.options!r}: {exc}") from None


def eval_splits(config: Config) -> list[str]:
    """The splits each evaluation runs (``eval.split``: train, test or both)."""
    return ["train", "test"] if config.eval.split == "both" else [config.eval.split]


def _import_early(items: list, preset_table: dict) -> None:
    """Import ``env.imports`` (from the preset, then the overrides) before the env id is checked."""
    probe = EnvConfig()
    env_table = preset_table.get("env") if isinstance(preset_table.get("env"), dict) else {}
    if "imports" in env_table:
        apply_table(probe, {"imports": env_table["imports"]}, "env")
    for key, value in items:
        if key in ("env.imports", "imports"):
            apply_table(probe, {"imports": value}, "env")
    probe.validate()
    import_env_modules(probe.imports)


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
    data.setdefault("flush_denormal", False)  # saved before the key existed: trained with IEEE denormals
    try:
        config = config_from_dict(data, registry.get_algorithm(data["algo"]).Config)
    except ConfigError as exc:
        raise ConfigError(f"{Path(run_dir) / 'config.json'}: {exc}") from exc
    import_env_modules(config.env.imports)  # the modules that register the run's own env ids
    return config


def load_run_checkpoint(run_dir: Path, which: str = "final") -> tuple[dict, str]:
    """``(checkpoint, description)`` of a run: ``"final"`` (or ``"latest"``) = its newest checkpoint,
    ``"best"`` = ``checkpoints/best.pt`` (the best evaluation so far), else a checkpoint file's path."""
    from aclab.runs import BEST_CHECKPOINT, find_readable_checkpoint

    run_dir = Path(run_dir)
    if which in ("final", "latest"):
        checkpoint, path, unreadable = find_readable_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir} has no readable checkpoint to evaluate")
        if unreadable:
            print(f"aclab: warning: {', '.join(p.name for p in unreadable)} cannot be read; using {path.name}",
                  file=sys.stderr)
        status = json.loads((run_dir / "summary.json").read_text()).get("status") if (
            run_dir / "summary.json").exists() else None
        return checkpoint, "final" if status == "finished" else f"latest ({status or 'unfinished'} run)"
    path = run_dir / "checkpoints" / BEST_CHECKPOINT if which == "best" else Path(which)
    if not path.is_file():
        if which == "best":
            raise FileNotFoundError(f"{run_dir} has no best checkpoint (checkpoints/{BEST_CHECKPOINT}): it is written "
                                    "at evaluations (eval.every_steps, or the evaluation at the end)")
        raise FileNotFoundError(f"--checkpoint {which}: expected final, best or a checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=False), "best" if which == "best" else str(path)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
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
          start_over: bool = False, stop_after_iterations: int | None = None, console=None, callbacks=(),
          env_factory=None) -> dict:
    """Train ``config.algo`` until ``config.total_steps``; return the summary dict.

    ``resume=True`` reopens ``run_dir`` and continues from its latest readable checkpoint (``start_over``:
    restart from step 0 when no checkpoint can be read, the old logs moved aside); ``config`` (e.g.
    from :func:`resume_config`) is saved as the run's config. Everything that can be checked (device,
    algorithm/env compatibility, the run directory) is checked before the run directory is created or
    touched. ``stop_after_iterations`` stops early (as a kill would, but after a clean checkpoint); for
    tests. ``callbacks``: objects with any of ``on_iteration`` / ``on_evaluation`` / ``on_checkpoint`` (see
    :mod:`aclab.callbacks`); ``on_iteration`` returning False stops the run (status ``"stopped"``).
    ``env_factory``: a zero-argument callable returning a ``gymnasium.Env``; it replaces ``config.env.id``
    (give the same factory again to resume a run whose factory cannot be imported by path).
    """
    if env_factory is not None:
        config.env.id = register_env_factory(env_factory)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    device = resolve_device(config.device)
    dp = _join_ranks(config, device, resume)
    if dp.enabled:
        device = dp.device
    if config.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install 'aclab[wandb]' "
                              "(scripts/setup.sh installs it)") from exc
    if not resume and dp.is_main:
        Run.check_new(run_dir, overwrite)
    if config.deterministic_torch:
        torch.use_deterministic_algorithms(True)
    flush_denormals(config.flush_denormal)  # before any intra-op thread starts: they inherit the mode
    # every rank: the same networks (the run's seed), its own envs and acting streams (its rank's seed)
    seed_everything(config.seed)
    rank_config = dataclasses.replace(config, seed=dp.rank_seed(config.seed)) if dp.enabled else config
    # an algorithm that chooses each episode's level (PLR) gets envs that let it
    envs = build_envs(rank_config, num_envs=dp.local_envs(config.env.num_envs),
                      level_control=getattr(registry.get_algorithm(config.algo), "LEVEL_CONTROL", False))
    algo = None
    try:
        if dp.enabled:
            envs.set_statistics_reducer(dp.merge_moments)  # normalisers see the batches of every rank
        envs.reset(seed=rank_config.seed)
        set_threads(config.torch_threads, obs_shape=envs.spec.obs_shape, device=device)
        algo = build_algorithm(rank_config, envs.spec, device)
        dp.check_replicas(algo)
        if not dp.is_main:  # ranks other than 0 train and never touch the run directory
            run, point = _OtherRank(), ResumePoint(None, [])
        elif resume:
            run, point = Run.resume(run_dir, start_over=start_over)
        else:
            run, point = Run.create(run_dir, config.to_dict(), overwrite=overwrite), ResumePoint(None, [])
        if dp.enabled:  # rank 0 read the checkpoint: each rank gets its part
            point = dataclasses.replace(point, checkpoint=dp.scatter_checkpoint(point.checkpoint),
                                        final_eval_done=dp.broadcast_object(point.final_eval_done))
    except BaseException:
        _close(envs, algo)
        raise
    try:
        if resume:
            run.write_config(config.to_dict())
        return _train_run(run, point, config, envs, algo, device, resume, stop_after_iterations, console,
                          CallbackList(callbacks if dp.is_main else ()), dp)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            run.write_summary({"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc()})
        raise
    finally:
        _close(envs, algo)
        run.close()
        if dp.enabled:
            distributed.shutdown()
            distributed.use(distributed.SINGLE_PROCESS)


def _close(envs, algo) -> None:
    envs.close()
    if algo is not None and hasattr(algo, "close"):  # actor pools (IMPALA/STAC) stop their workers now
        algo.close()


def _train_run(run: Run, point: ResumePoint, config: Config, envs, algo, device, resume: bool,
               stop_after_iterations: int | None, console, hooks: CallbackList,
               dp: distributed.DataParallel = distributed.SINGLE_PROCESS) -> dict:
    progress = _make_progress(config if dp.is_main else dataclasses.replace(config, progress=False), algo.steps,
                              console)
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
        if dp.enabled:
            dp.generator.set_state(checkpoint["minibatch_rng"])
        if not envs_exact:
            notice(f"the {envs.backend_name} backend cannot save its simulators: this run continues from the "
                   f"checkpoint at step {checkpoint['step']} with freshly reset envs (networks, optimisers and "
                   "statistics restored), so it will not match an uninterrupted run bit for bit", "warning")
    final_eval_step = algo.steps if point.final_eval_done else None  # a completed final evaluation
    already_finished = (checkpoint is not None and algo.steps >= config.total_steps
                        and (final_eval_step == algo.steps or config.eval.episodes == 0)
                        and run.read_summary().get("status") == "finished")
    if dp.broadcast_object(already_finished):  # rank 0 read the summary: every rank takes its answer
        notice(f"{run.path} already finished at step {algo.steps:,} (total_steps {config.total_steps:,}); "
               "nothing to do (raise --total-steps to train on)")
        return run.read_summary()
    recent = collections.deque(loop.recent_returns, maxlen=RECENT_EPISODES)
    # Meta-World: success at any step of an episode
    recent_success = collections.deque(loop.recent_successes, maxlen=RECENT_EPISODES)
    divergence = DivergenceMonitor(config.divergence.value_loss_max, config.divergence.kl_max,
                                   config.divergence.entropy_min, envs.spec.discrete)
    divergence.load_state_dict(loop.divergence or {})
    saved_step = int(checkpoint["step"]) if checkpoint is not None else None
    recorder = EpisodeRecorder(envs) if config.logging.episodes else None
    if config.logging.wandb and dp.is_main:
        run.sinks.append(_wandb_sink(config, run))

    def state() -> dict:
        loop.recent_returns, loop.wall_time_s, loop.divergence = list(recent), run.elapsed(), divergence.state_dict()
        loop.recent_successes = list(recent_success)
        return {
            "algo": algo.state_dict(),
            "envs": envs.state_dict(),
            "rng": global_rng_state(),
            "loop": loop.state_dict(),
            "logs": {"eval_rows": run.eval_rows()},
            **({"minibatch_rng": dp.generator.get_state()} if dp.enabled else {}),
        }

    def save() -> None:
        nonlocal saved_step, last_save
        merged = dp.gather_checkpoint(state())  # several ranks: rank 0 writes every rank's state
        saved_step, last_save = algo.steps, time.monotonic()
        if dp.is_main:
            path = run.save_checkpoint(algo.steps, merged, keep=config.keep_checkpoints)
            hooks.on_checkpoint(int(algo.steps), path)

    def evaluate_now(final: bool = False) -> dict[str, float]:
        if not dp.is_main:  # rank 0 evaluates (every rank holds the same parameters)
            return {}
        best_split = "test" if config.eval.split == "both" else config.eval.split
        done, eval_metrics = _run_evals(algo, config, run, envs, hooks, final=final)
        for split, returns in done:
            if split == best_split and returns:
                run.save_best_checkpoint(algo.steps, state(), float(np.mean(returns)), split)
        return eval_metrics

    run.tensorboard()  # import and open the writer before the clock starts
    run.start_clock(loop.wall_time_s)
    start, last_save = time.time(), time.monotonic()
    start_steps = algo.steps
    _warn_long_first_iteration(algo, config, notice)
    status, error, stop_reason = "finished", None, None
    iterations_here = 0
    try:
        with _StopRequest() as stop, progress:
            while algo.steps < config.total_steps:
                signalled = dp.any(stop.requested)  # a signal that reached one rank stops every rank here
                if signalled or (stop_after_iterations is not None and iterations_here >= stop_after_iterations):
                    if saved_step != algo.steps:
                        save()
                    status = "interrupted"
                    if signalled:
                        notice(f"stopped at step {algo.steps:,} after a checkpoint; continue with "
                               f"'aclab train --resume {run.path}'")
                    break
                if recorder is not None:
                    recorder.begin(algo.steps)
                metrics = algo.iterate(envs)
                iterations_here += 1
                iteration = getattr(algo, "iteration", iterations_here)
                rows = recorder.rows(algo) if recorder is not None else []
                finished, metrics, rows = dp.gather_episodes(algo.last_episode_returns, metrics, rows,
                                                             dp.rank * envs.num_envs)
                recent.extend(float(r) for r in (finished if finished is not None else ()))
                successes = envs.pop_episode_successes()  # this rank's envs (Meta-World)
                if successes.size:
                    metrics["episode_success"] = float(successes.mean())
                    recent_success.extend(successes.tolist())
                metrics["steps_per_s"] = (algo.steps - start_steps) / max(time.time() - start, 1e-9)
                if iteration % config.log_every_iterations == 0:
                    run.log(algo.steps, metrics)
                if recorder is not None:
                    run.log_episodes(rows)
                for warning in divergence.check(algo.steps, metrics):
                    notice(warning, "warning")
                    if config.divergence.stop:
                        raise DivergedError(warning)
                progress.update(algo.steps, metrics, recent)
                hooks.on_iteration(IterationInfo(int(algo.steps), iterations_here, metrics,
                                                 np.asarray(finished, dtype=np.float64).reshape(-1),
                                                 run.path, config, algo))
                if dp.enabled:  # rank 0's callbacks decide for every rank
                    request = dp.broadcast_object(None if hooks.stop is None else (hooks.stop.reason,
                                                                                   hooks.stop.final_eval))
                    hooks.stop = None if request is None else StopTraining(*request)
                eval_metrics = {}
                if ((config.eval.every_steps and algo.steps - loop.last_eval_step >= config.eval.every_steps)
                        or (config.eval.every_iterations and iteration % config.eval.every_iterations == 0)):
                    eval_metrics = evaluate_now()
                    loop.last_eval_step = algo.steps
                if eval_metrics:  # the value bias of the training-level evaluation episodes
                    run.log(algo.steps, eval_metrics)
                if algo.steps < config.total_steps and (hooks.stop is not None
                                                        or _checkpoint_due(config, iteration, last_save)):
                    save()
                if hooks.stop is not None and algo.steps < config.total_steps:
                    status, stop_reason = "stopped", hooks.stop.reason
                    break
            final_eval = status == "finished" or (status == "stopped" and hooks.stop.final_eval)
            if status == "finished" and saved_step != algo.steps:
                save()  # the final checkpoint, before the final evaluation (see Run.mark_final_eval)
            if final_eval and config.eval.episodes > 0 and final_eval_step != algo.steps:
                if loop.last_eval_step != algo.steps:  # else the periodic evaluation just done is final
                    final_metrics = evaluate_now(final=True)
                    if final_metrics:
                        run.log(algo.steps, final_metrics)
                run.mark_final_eval(algo.steps)
    except ActorFailureLimit as exc:  # the actors failed, the learner's state is intact: keep it
        save()
        status, error = "failed", str(exc)
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
    if recorder is not None:
        recorder.close()

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
        **({"final_success_rate": float(np.mean(recent_success))} if recent_success else {}),
        "status": status,
        "resumed_with_exact_env_state": envs_exact if resume else None,
        "device": str(device),
        "checkpoint_step": saved_step,
        "notes": list(notice.lines),
        "error": error,
        "traceback": None,
        "stop_reason": stop_reason,
    }
    if dp.enabled:
        summary["world_size"] = dp.world_size
        if not dp.is_main:
            return summary
    if status == "finished" and summary["overshoot_steps"]:
        notice(f"stopped at step {algo.steps:,}, {summary['overshoot_steps']:,} past total_steps "
               f"{config.total_steps:,}: {config.algo} trains on whole iterations (rollouts, batches)")
        summary["notes"] = list(notice.lines)
    summary.update(_last_evals(run.path / EVALS_FILE))
    levels = {split: eval_levels(config, split) for split in eval_splits(config)}
    if any(r is not None for r in levels.values()):  # Procgen: which level ranges each split played
        summary["eval_levels"] = {split: {"range": str(r), "start_level": r.start, "num_levels": r.num}
                                  for split, r in levels.items()}
        summary["eval_seeding"] = config.eval.seeding
    run.write_summary(summary)
    if config.logging.learning_curve:
        try:
            from aclab.plots import plot_learning_curve

            plot_learning_curve(run.path)
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose a finished run
            summary["plot_error"] = str(exc)
    return summary


class _OtherRank:
    """What a rank other than 0 of a data-parallel run holds instead of the run directory: its logging
    calls do nothing (rank 0 logs, evaluates and writes the checkpoints)."""

    path = None

    def __init__(self):
        self.sinks: list = []
        self._started = time.monotonic()
        self._before = 0.0

    def start_clock(self, before: float = 0.0) -> None:
        self._started, self._before = time.monotonic(), float(before or 0.0)

    def elapsed(self) -> float:
        return self._before + time.monotonic() - self._started

    def read_summary(self) -> dict:
        return {}

    def eval_rows(self) -> int:
        return 0

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _join_ranks(config: Config, device: torch.device, resume: bool) -> distributed.DataParallel:
    """The data-parallel context of this process: several ranks under ``torchrun`` (``WORLD_SIZE`` > 1),
    recorded in ``config.world_size``; else the single process. A run keeps its world size."""
    world_size = distributed.launched_world_size()
    if world_size == 1 and config.world_size == 1:
        return distributed.current()
    if world_size == 1 or (resume and config.world_size != world_size):
        launch = "without torchrun" if config.world_size == 1 else (
            f"with 'torchrun --nproc-per-node {config.world_size} -m aclab train ...'")
        raise ConfigError(f"invalid value world_size={config.world_size}: this process has {world_size} rank(s); "
                          f"a run keeps the world size it started with: start it {launch}")
    if not getattr(registry.get_algorithm(config.algo), "DATA_PARALLEL", False):
        able = [name for name, entry in registry.all_algorithms().items() if getattr(entry.cls, "DATA_PARALLEL", False)]
        raise ConfigError(f"{config.algo} has no data-parallel learner: train it in one process (without torchrun); "
                          f"data-parallel algorithms: {', '.join(able)}")
    if config.env.num_envs % world_size:
        raise ConfigError(f"invalid value env.num_envs={config.env.num_envs}: expected a multiple of the world size "
                          f"{world_size} (each rank steps env.num_envs / world_size envs)")
    config.world_size = world_size
    dp = distributed.init_from_environment(config.seed, device.type)
    distributed.use(dp)
    return dp


def _warn_long_first_iteration(algo, config: Config, notice) -> None:
    """Say at the start when the next iteration alone will carry the run past ``total_steps`` (an algorithm
    that knows its iteration's size has ``next_iteration_steps()``, e.g. PEARL's initial data collection)."""
    planned = getattr(algo, "next_iteration_steps", None)
    steps = planned() if planned is not None and algo.steps < config.total_steps else 0
    if steps and algo.steps + steps > config.total_steps:
        notice(f"{config.algo}'s next iteration collects up to {steps:,} env steps, so this run will end past "
               f"total_steps {config.total_steps:,} (at most at step {algo.steps + steps:,}): it trains on whole "
               "iterations", "warning")


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


def _run_evals(algo, config: Config, run: Run, envs, hooks: CallbackList | None = None,
               final: bool = False) -> tuple[list[tuple[str, list[float]]], dict[str, float]]:
    """One evaluation of every split in one batched pass (see :mod:`aclab.evaluate.policy`), logged to
    evals.csv with the level ranges played and passed to the callbacks. Returns ``(split, returns)`` per
    split and the value-bias metrics when the algorithm logs its value bias from the training-level
    evaluation episodes (``params.value_bias_source = "eval"``; else ``{}``)."""
    p = config.params
    from_eval = bool(getattr(p, "log_value_bias", False)) and getattr(p, "value_bias_source", "") == "eval"
    value_fn = _first_critic(algo) if from_eval else None
    results = evaluate_splits(algo, config, eval_splits(config), train_envs=envs, step=algo.steps,
                              value_fn=value_fn, gamma=float(getattr(p, "gamma", 0.99)))
    done = []
    for split, result in results.items():
        run.log_eval(algo.steps, split, result.returns, levels="" if result.levels is None else str(result.levels))
        done.append((split, result.returns))
        if hooks is not None:
            hooks.on_evaluation(EvaluationInfo(int(algo.steps), split, result.returns, final, run.path))
    if not from_eval:
        return done, {}
    from aclab.analysis.value_bias import value_bias

    train = results["train"]
    bias = value_bias(train.start_values, train.discounted_returns, train.truncated, train.bootstrap_values,
                      truncation=p.value_bias_truncation)
    return done, bias.as_metrics("value_bias/")


def _first_critic(algo):
    """``obs [n, ...] (numpy) -> V [n] (numpy)`` of the algorithm's first critic (``value_functions()``, else
    ``net.value``), under no_grad."""
    critics = algo.value_functions() if hasattr(algo, "value_functions") else {"value": algo.net}
    module = next(iter(critics.values()))
    device = next(module.parameters()).device

    @torch.no_grad()
    def values(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, device=device)
        out = module.value(obs_t) if hasattr(module, "value") else module(obs_t)
        return out.float().reshape(-1).cpu().numpy()

    return values


def _wandb_sink(config: Config, run: Run) -> WandbSink:
    log = config.logging
    return WandbSink(run.path, config.to_dict(), project=log.wandb_project, entity=log.wandb_entity,
                     group=log.wandb_group, mode=log.wandb_mode)


def _make_progress(config: Config, start_steps: int, console=None):
    """A rich progress bar on a terminal; plain lines every ``logging.progress_every_s`` seconds otherwise."""
    if config.progress:
        from rich.console import Console

        terminal = (console or Console()).is_terminal
        if not terminal:
            return PlainProgress(config.total_steps, start_steps, config.logging.progress_every_s,
                                 file=console.file if console is not None else None)
    return _Progress(config, start_steps, enabled=config.progress, console=console)


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
    check_eval_levels(config)
    return config
