"""The one training loop shared by every algorithm, plus config resolution and evaluation.

    run = Run.create(...) or Run.resume(...)
    algo = registry.build(config, env_spec, device)
    algo.load_state_dict(checkpoint["algo"])          # when resuming
    while algo.steps < config.total_steps:
        metrics = algo.iterate(envs)                   # collect what it needs, then update
        run.log(algo.steps, metrics)
        checkpoint every N iterations (atomic)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
import time
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
    config_from_dict,
    config_from_table,
    load_preset,
    parse_override,
    set_key,
)
from aclab.data.actors import ActorFailureLimit
from aclab.envs import build_envs, make_env, parse_env_id
from aclab.envs.registry import import_env_modules, register_env_factory
from aclab.evaluate.policy import evaluate
from aclab.run_logging import EpisodeRecorder, PlainProgress, WandbSink
from aclab.runs import Run

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
    return config


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
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    data = json.loads(path.read_text())
    config = config_from_dict(data, registry.get_algorithm(data["algo"]).Config)
    import_env_modules(config.env.imports)  # the modules that register the run's own env ids
    return config


def load_run_checkpoint(run_dir: Path, which: str = "final") -> tuple[dict, str]:
    """``(checkpoint, description)`` of a run: ``"final"`` (or ``"latest"``) = its newest checkpoint,
    ``"best"`` = ``checkpoints/best.pt`` (the best evaluation so far), else a checkpoint file's path."""
    from aclab.runs import BEST_CHECKPOINT, load_latest_checkpoint

    run_dir = Path(run_dir)
    if which in ("final", "latest"):
        checkpoint = load_latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint to evaluate")
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
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next iteration boundary and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          stop_after_iterations: int | None = None, console=None, callbacks=(), env_factory=None) -> dict:
    """Train ``config.algo`` until ``config.total_steps``; return the summary dict.

    ``resume=True`` reopens ``run_dir`` and continues from its latest checkpoint.
    ``stop_after_iterations`` stops early (as a kill would, but after a clean checkpoint); for tests.
    ``callbacks``: objects with any of ``on_iteration`` / ``on_evaluation`` / ``on_checkpoint`` (see
    :mod:`aclab.callbacks`); ``on_iteration`` returning False stops the run (status ``"stopped"``).
    ``env_factory``: a zero-argument callable returning a ``gymnasium.Env``; it replaces ``config.env.id``
    (give the same factory again to resume a run whose factory cannot be imported by path).
    """
    if env_factory is not None:
        config.env.id = register_env_factory(env_factory)
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        env_name = config.env.id.replace(":", "-").replace("/", "-")
        run_dir = Path("runs") / f"{config.algo}-{env_name}-s{config.seed}-{stamp}"
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    dp = _join_ranks(config, device, resume)
    if dp.enabled:
        device = dp.device
    if config.deterministic_torch:
        torch.use_deterministic_algorithms(True)

    if config.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install 'aclab[wandb]' "
                              "(scripts/setup.sh installs it)") from exc
    checkpoint = None
    if not dp.is_main:  # ranks other than 0 train and never touch the run directory
        run = _OtherRank()
    elif resume:
        run, checkpoint = Run.resume(run_dir)
    else:
        run = Run.create(run_dir, config.to_dict(), overwrite=overwrite)
    checkpoint = dp.scatter_checkpoint(checkpoint)

    # every rank: the same networks (the run's seed), its own envs and acting streams (its rank's seed)
    seed_everything(config.seed)
    rank_config = dataclasses.replace(config, seed=dp.rank_seed(config.seed)) if dp.enabled else config
    envs = build_envs(rank_config, num_envs=dp.local_envs(config.env.num_envs))
    if dp.enabled:
        envs.set_statistics_reducer(dp.merge_moments)  # normalisers see the batches of every rank
    envs.reset(seed=rank_config.seed)
    _set_torch_threads(config, device, envs.spec)
    algo = registry.build(rank_config, envs.spec, device)
    dp.check_replicas(algo)
    recent = collections.deque(maxlen=RECENT_EPISODES)
    wall_before = 0.0
    envs_exact = True
    if checkpoint is not None:
        algo.load_state_dict(checkpoint["algo"])
        envs_exact = envs.load_state_dict(checkpoint["envs"])
        set_global_rng_state(checkpoint["rng"])
        recent.extend(checkpoint.get("recent_returns", []))
        wall_before = float(checkpoint.get("wall_time_s", 0.0))
        if dp.enabled:
            dp.generator.set_state(checkpoint["minibatch_rng"])

    hooks = CallbackList(callbacks if dp.is_main else ())
    recorder = EpisodeRecorder(envs) if config.logging.episodes else None
    if config.logging.wandb and dp.is_main:
        run.sinks.append(_wandb_sink(config, run))

    def state() -> dict:
        return {
            "algo": algo.state_dict(),
            "envs": envs.state_dict(),
            "rng": global_rng_state(),
            "recent_returns": list(recent),
            "wall_time_s": wall_before + (time.time() - start),
            **({"minibatch_rng": dp.generator.get_state()} if dp.enabled else {}),
        }

    def save(step: int) -> None:
        merged = dp.gather_checkpoint(state())  # several ranks: rank 0 writes every rank's state
        if dp.is_main:
            path = run.save_checkpoint(step, merged, keep=config.keep_checkpoints)
            hooks.on_checkpoint(int(step), path)

    def evaluate_now(final: bool = False) -> None:
        if not dp.is_main:  # rank 0 evaluates (every rank holds the same parameters)
            return
        best_split = "test" if config.eval.split == "both" else config.eval.split
        for split, returns in _run_evals(algo, config, run, envs, hooks, final=final):
            if split == best_split and returns:
                run.save_best_checkpoint(algo.steps, state(), float(np.mean(returns)), split)

    run.tensorboard()  # import and open the writer before the clock starts
    start = time.time()
    start_steps = algo.steps
    status = "finished"
    error = stop_reason = None
    progress = _make_progress(config if dp.is_main else dataclasses.replace(config, progress=False), algo.steps,
                              console)
    iterations_here = 0
    last_eval_step = algo.steps
    try:
        with _StopRequest() as stop, progress:
            while algo.steps < config.total_steps:
                if recorder is not None:
                    recorder.begin(algo.steps)
                metrics = algo.iterate(envs)
                iterations_here += 1
                iteration = getattr(algo, "iteration", iterations_here)
                rows = recorder.rows(algo) if recorder is not None else []
                finished, metrics, rows = dp.gather_episodes(algo.last_episode_returns, metrics, rows,
                                                             dp.rank * envs.num_envs)
                recent.extend(float(r) for r in (finished if finished is not None else ()))
                elapsed = time.time() - start
                metrics["steps_per_s"] = (algo.steps - start_steps) / max(elapsed, 1e-9)
                if iteration % config.log_every_iterations == 0:
                    run.log(algo.steps, metrics)
                if recorder is not None:
                    run.log_episodes(rows)
                progress.update(algo.steps, metrics, recent)
                hooks.on_iteration(IterationInfo(int(algo.steps), iterations_here, metrics,
                                                 np.asarray(finished, dtype=np.float64).reshape(-1),
                                                 run.path, config, algo))
                if dp.enabled:  # rank 0's callbacks decide for every rank
                    request = dp.broadcast_object(None if hooks.stop is None else (hooks.stop.reason,
                                                                                   hooks.stop.final_eval))
                    hooks.stop = None if request is None else StopTraining(*request)
                if config.eval.every_steps and algo.steps - last_eval_step >= config.eval.every_steps:
                    evaluate_now()
                    last_eval_step = algo.steps
                done = algo.steps >= config.total_steps
                if (config.checkpoint_every_iterations and iteration % config.checkpoint_every_iterations == 0
                        and not done):
                    save(algo.steps)
                if hooks.stop is not None and not done:
                    save(algo.steps)
                    status, stop_reason = "stopped", hooks.stop.reason
                    break
                if dp.any(stop.requested) or (stop_after_iterations is not None
                                              and iterations_here >= stop_after_iterations):
                    if not done:
                        save(algo.steps)
                        status = "interrupted"
                    break
    except NonFiniteLossError as exc:
        status, error = "failed", str(exc)
    except ActorFailureLimit as exc:  # the actors failed, the learner's state is intact: keep it
        save(algo.steps)
        status, error = "failed", str(exc)
    except KeyboardInterrupt:
        status, error = "interrupted", "stopped by a second interrupt before a clean checkpoint"

    wall = wall_before + (time.time() - start)
    if status == "finished":
        save(algo.steps)
    if (status == "finished" or (status == "stopped" and hooks.stop.final_eval)) and config.eval.episodes > 0:
        evaluate_now(final=True)
    if recorder is not None:
        recorder.close()
    envs.close()
    if hasattr(algo, "close"):  # actor pools (IMPALA/STAC) stop their workers now rather than at exit
        algo.close()
    summary = {
        "algo": config.algo,
        "env_id": config.env.id,
        "preset": config.preset,
        "seed": config.seed,
        "steps": int(algo.steps),
        "total_steps": int(config.total_steps),
        "wall_time_s": round(wall, 3),
        "steps_per_s": round((algo.steps - start_steps) / max(time.time() - start, 1e-9), 1),
        "final_return": float(np.mean(recent)) if recent else None,
        "final_return_episodes": len(recent),
        "status": status,
        "resumed_with_exact_env_state": envs_exact if resume else None,
        "device": str(device),
    }
    if error:
        summary["error"] = error
    if stop_reason:
        summary["stop_reason"] = stop_reason
    if dp.enabled:
        summary["world_size"] = dp.world_size
        distributed.shutdown()
        distributed.use(distributed.SINGLE_PROCESS)
        if not dp.is_main:
            return summary
    evals_path = run.path / "evals.csv"
    if evals_path.exists():
        import csv

        rows = list(csv.DictReader(evals_path.open()))
        for split in {r["split"] for r in rows}:
            last = [r for r in rows if r["split"] == split][-1]
            summary[f"eval_{split}_return"] = float(last["mean_return"])
    run.write_summary(summary)
    run.close()
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


def _run_evals(algo, config: Config, run: Run, envs, hooks: CallbackList | None = None,
               final: bool = False) -> list[tuple[str, list[float]]]:
    splits = ["train", "test"] if config.eval.split == "both" else [config.eval.split]
    done = []
    for split in splits:
        returns = evaluate(algo, config, split, train_envs=envs)
        run.log_eval(algo.steps, split, returns)
        done.append((split, returns))
        if hooks is not None:
            hooks.on_evaluation(EvaluationInfo(int(algo.steps), split, returns, final, run.path))
    return done


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
    """The saved config of ``run_dir`` with optional overrides (e.g. a larger total_steps)."""
    config = load_run_config(run_dir)
    for key, value in (parse_override(o) for o in (overrides or [])):
        set_key(config, key, value)
    config.validate()
    return config
