"""``aclab tune SPEC.toml``: hyperparameter search with Optuna, trials run as ``aclab train`` processes.

A tuning spec (TOML)::

    algo = "ppo"
    env = "CartPole-v1"
    preset = "ppo-classic"            # optional (default: the env family's preset, as aclab train)
    seed = 1                          # every trial trains this seed
    n_trials = 30                     # trials in the study, counting those of earlier (killed) sessions
    out_dir = "tune/ppo-cartpole"     # relative to the spec's folder: study.db, trial-0000/, ..., report
    study_name = "ppo-cartpole"       # default: the spec file's name
    objective = "eval/test"           # eval/test | eval/train (last evaluation's mean return) |
                                      # train_episodes (mean return of the last 100 training episodes)
    direction = "maximize"
    sampler = "tpe"                   # tpe | random;  sampler_seed = 0
    pruner = "median"                 # median | successive_halving | none
    pruner_startup_trials = 5         # median: trials finished before any pruning
    pruner_warmup_steps = 0           # median: env steps before a trial can be pruned
    max_parallel = 1                  # trials at a time
    backend = "local"                 # local processes, or "ray" (ray_address, ray_num_cpus as in sweeps)
    timeout_s = 3600                  # per trial (optional)
    overrides = { total_steps = 100_000, "eval.every_steps" = 10_000, "eval.episodes" = 10 }

    [space]                           # config keys (as --set) -> search space
    "params.lr" = { low = 1e-5, high = 1e-2, log = true }      # float (log scale)
    "params.num_epochs" = { low = 1, high = 10 }               # int (both bounds integers)
    "params.clip" = { low = 0.1, high = 0.3, step = 0.05 }     # float on a grid
    "params.gae_lambda" = { choices = [0.9, 0.95, 0.98] }      # categorical

The study lives in ``out_dir/study.db`` (SQLite), so a killed tuning resumes: ``aclab tune SPEC.toml`` again
continues each trial that was running (``aclab train --resume`` of its run directory, same parameters),
then asks for new trials until the study has ``n_trials``. Pruning: every evaluation of a trial
(``eval.every_steps``) is reported to the study from inside the trial process (the study's pruner is
rebuilt there from the study's attributes); a trial the pruner stops ends with ``status: "stopped"`` after
a checkpoint and no final evaluation. Trials run through the sweep backends (local processes or Ray
tasks, :func:`aclab.sweep.execute_command`). At the end: ``out_dir/tune_report.md`` (best trials,
parameter importances) and ``out_dir/trials.csv``.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aclab.callbacks import Callback, EvaluationInfo, IterationInfo, StopTraining
from aclab.config import ConfigError, load_toml
from aclab.sweep import _child_env, _tail, default_command_prefix, execute_command

ALLOWED_KEYS = ("algo", "env", "preset", "seed", "n_trials", "out_dir", "study_name", "objective", "direction",
                "sampler", "sampler_seed", "pruner", "pruner_startup_trials", "pruner_warmup_steps", "max_parallel",
                "backend", "timeout_s", "overrides", "space", "ray_address", "ray_num_cpus")
OBJECTIVES = ("eval/test", "eval/train", "train_episodes")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "none")
BACKENDS = ("local", "ray")
STUDY_FILE = "study.db"
ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_OBJECTIVE = ("ACLAB_TUNE_STORAGE", "ACLAB_TUNE_STUDY", "ACLAB_TUNE_TRIAL_ID",
                                                    "ACLAB_TUNE_OBJECTIVE")
PRUNED_REASON = "pruned by the tuning study"


class TuneError(ValueError):
    """An invalid tuning spec or an unusable backend; the message names the key and the allowed values."""


@dataclass
class Param:
    """One search-space entry: ``kind`` float / int / categorical."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "categorical":
            return d.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass
class TuneSpec:
    algo: str
    env: str
    out_dir: Path
    space: list[Param]
    n_trials: int = 20
    preset: str | None = None
    seed: int = 1
    study_name: str = "aclab"
    objective: str = "eval/test"
    direction: str = "maximize"
    sampler: str = "tpe"
    sampler_seed: int | None = 0
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    max_parallel: int = 1
    backend: str = "local"
    timeout_s: float | None = None
    overrides: list[str] = field(default_factory=list)
    ray_address: str | None = None
    ray_num_cpus: float = 1.0

    @property
    def storage(self) -> str:
        return f"sqlite:///{(self.out_dir / STUDY_FILE).resolve()}"


# ----------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------
def _fail(key: str, value: Any, expected: str) -> TuneError:
    return TuneError(f"invalid tuning spec value {key}={value!r}: expected {expected}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(key: str, table: Any) -> Param:
    where = f"space.{key!r}"
    if not isinstance(table, dict):
        raise _fail(where, table, "a table {low, high[, log, step]} or {choices = [...]}")
    unknown = set(table) - {"low", "high", "log", "step", "choices", "type"}
    if unknown:
        raise TuneError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: low, high, log, step, choices, type")
    if "choices" in table:
        if not isinstance(table["choices"], list) or not table["choices"]:
            raise _fail(f"{where}.choices", table.get("choices"), "a non-empty list")
        return Param(key, "categorical", choices=list(table["choices"]))
    low, high = table.get("low"), table.get("high")
    if not (_number(low) and _number(high) and low < high):
        raise _fail(where, table, "numbers low < high (or choices = [...])")
    kind = table.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) and not table.get("log")
                                 and isinstance(table.get("step", 1), int) else "float")
    if kind not in ("int", "float"):
        raise _fail(f"{where}.type", kind, "'int' or 'float'")
    log = bool(table.get("log", False))
    if log and low <= 0:
        raise _fail(f"{where}.low", low, "a number > 0 with log = true")
    step = table.get("step")
    if step is not None and (not _number(step) or step <= 0 or log):
        raise _fail(f"{where}.step", step, "a number > 0 (not with log = true)")
    return Param(key, kind, float(low), float(high), log, step)


def validate_tune_spec(data: dict, base_dir: Path = Path("."), name: str = "aclab") -> TuneSpec:
    """Validate a parsed spec; TuneError naming the key. Config keys and values are checked by building
    the config of the search space's lower corner (``aclab train``'s own validation)."""
    unknown = [k for k in data if k not in ALLOWED_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ALLOWED_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TuneError(f"unknown tuning spec key {unknown[0]!r}{hint}; allowed keys: {', '.join(ALLOWED_KEYS)}")
    for required in ("algo", "env", "out_dir", "space"):
        if required not in data:
            raise TuneError(f"tuning spec is missing {required!r}; required keys: algo, env, out_dir, space")
    for key in ("algo", "env", "out_dir"):
        if not isinstance(data[key], str) or not data[key]:
            raise _fail(key, data[key], "a non-empty string")
    if not isinstance(data["space"], dict) or not data["space"]:
        raise _fail("space", data["space"], "a table of config key -> {low, high} or {choices}")
    spec = TuneSpec(algo=data["algo"], env=data["env"], out_dir=Path(data["out_dir"]).expanduser(),
                    space=[_param(k, v) for k, v in data["space"].items()], study_name=data.get("study_name", name))
    if not spec.out_dir.is_absolute():
        spec.out_dir = base_dir / spec.out_dir
    choices = {"objective": OBJECTIVES, "direction": ("maximize", "minimize"), "sampler": SAMPLERS,
               "pruner": PRUNERS, "backend": BACKENDS}
    for key, allowed in choices.items():
        if key in data:
            if data[key] not in allowed:
                raise _fail(key, data[key], f"one of {', '.join(map(repr, allowed))}")
            setattr(spec, key, data[key])
    for key, minimum in (("n_trials", 1), ("seed", 0), ("max_parallel", 1), ("pruner_startup_trials", 0),
                         ("pruner_warmup_steps", 0), ("sampler_seed", 0)):
        if key in data:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise _fail(key, value, f"an integer >= {minimum}")
            setattr(spec, key, value)
    if "preset" in data:
        spec.preset = str(data["preset"])
    if "timeout_s" in data:
        if not _number(data["timeout_s"]) or data["timeout_s"] <= 0:
            raise _fail("timeout_s", data["timeout_s"], "a number of seconds > 0")
        spec.timeout_s = float(data["timeout_s"])
    if "ray_num_cpus" in data:
        if not _number(data["ray_num_cpus"]) or data["ray_num_cpus"] <= 0:
            raise _fail("ray_num_cpus", data["ray_num_cpus"], "a number > 0")
        spec.ray_num_cpus = float(data["ray_num_cpus"])
    spec.ray_address = data.get("ray_address")
    from aclab.sweep import _override_list

    spec.overrides = _override_list("overrides", data.get("overrides", {}))
    _check_config(spec)
    return spec


def _check_config(spec: TuneSpec) -> None:
    """Every override and every search-space key must be a valid ``aclab train --set`` for this algorithm."""
    from aclab.train import make_config

    corner = [f"{p.key}={json.dumps(p.choices[0]) if p.kind == 'categorical' else _value(p, p.low)}"
              for p in spec.space]
    try:
        config = make_config(spec.algo, spec.env, spec.preset, [*spec.overrides, *corner, f"seed={spec.seed}"])
    except ConfigError as exc:
        raise TuneError(f"tuning spec: {exc}") from exc
    if spec.pruner != "none" and config.eval.every_steps <= 0 and spec.objective != "train_episodes":
        raise TuneError("pruning needs intermediate evaluations: set overrides 'eval.every_steps' (> 0) or "
                        "pruner = 'none'")
    if spec.objective.startswith("eval/") and config.eval.episodes <= 0:
        raise TuneError(f"objective {spec.objective!r} needs evaluations: eval.episodes > 0")


def _value(param: Param, value: Any) -> str:
    return str(int(value)) if param.kind == "int" else repr(float(value))


def load_tune_spec(path: str | Path) -> TuneSpec:
    path = Path(path)
    if not path.exists():
        raise TuneError(f"tuning spec {path} does not exist")
    try:
        data = load_toml(path)
    except ConfigError as exc:
        raise TuneError(str(exc)) from exc
    return validate_tune_spec(data, base_dir=path.resolve().parent, name=path.stem)


# ----------------------------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------------------------
def _import_optuna():
    try:
        import optuna
    except ImportError as exc:
        raise TuneError("aclab tune needs optuna: pip install 'aclab[tune]' (scripts/setup.sh installs it)") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_pruner(attrs: dict):
    """The study's pruner from its ``pruner`` attribute (also rebuilt inside each trial process)."""
    optuna = _import_optuna()
    name = attrs.get("name", "none")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(attrs.get("startup_trials", 5)),
                                           n_warmup_steps=int(attrs.get("warmup_steps", 0)))
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _pruner_attrs(spec: TuneSpec) -> dict:
    return {"name": spec.pruner, "startup_trials": spec.pruner_startup_trials, "warmup_steps": spec.pruner_warmup_steps}


def open_study(spec: TuneSpec):
    """Create or reopen the study in ``out_dir/study.db``."""
    optuna = _import_optuna()
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    sampler = (optuna.samplers.RandomSampler(seed=spec.sampler_seed) if spec.sampler == "random"
               else optuna.samplers.TPESampler(seed=spec.sampler_seed))
    study = optuna.create_study(storage=spec.storage, study_name=spec.study_name, direction=spec.direction,
                                sampler=sampler, pruner=make_pruner(_pruner_attrs(spec)), load_if_exists=True)
    study.set_user_attr("pruner", _pruner_attrs(spec))
    study.set_user_attr("objective", spec.objective)
    return study


def ask_trial(study, spec: TuneSpec):
    """A new trial with its parameters and its run directory (``out_dir/trial-<number>``)."""
    trial = study.ask({p.key: p.distribution() for p in spec.space})
    trial.set_user_attr("run_dir", str(spec.out_dir / f"trial-{trial.number:04d}"))
    return trial


def trial_command(spec: TuneSpec, params: dict, run_dir: Path, resume: bool,
                  prefix: list[str] | None = None) -> list[str]:
    prefix = list(prefix or default_command_prefix())
    if resume:
        return prefix + ["train", "--resume", str(run_dir), "--quiet"]
    command = prefix + ["train", spec.algo, "--env", spec.env, "--seed", str(spec.seed), "--run-dir", str(run_dir),
                        "--quiet", "--overwrite"]
    if spec.preset:
        command += ["--preset", spec.preset]
    by_key = {p.key: p for p in spec.space}
    for item in spec.overrides:
        command += ["--set", item]
    for key, value in params.items():
        text = json.dumps(value) if by_key[key].kind == "categorical" else _value(by_key[key], value)
        command += ["--set", f"{key}={text}"]
    return command


def trial_env(spec: TuneSpec, trial_id: int) -> dict[str, str]:
    env = _child_env(spec.max_parallel)
    env.update({ENV_STORAGE: spec.storage, ENV_STUDY: spec.study_name, ENV_TRIAL: str(trial_id),
                ENV_OBJECTIVE: spec.objective})
    return env


def trial_outcome(run_dir: Path, objective: str) -> tuple[str, float | None, str]:
    """``(state, value, note)`` of a finished trial process from its run directory: COMPLETE with the
    objective's value, PRUNED, or FAIL."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return "FAIL", None, "no summary.json"
    status = summary.get("status")
    if status == "stopped" and str(summary.get("stop_reason", "")).startswith(PRUNED_REASON):
        return "PRUNED", None, summary["stop_reason"]
    if status != "finished":
        return "FAIL", None, f"status {status!r}: {summary.get('error', '')}"
    if objective == "train_episodes":
        value = summary.get("final_return")
    else:
        split = objective.split("/", 1)[1]
        rows = list(csv.DictReader((run_dir / "evals.csv").open())) if (run_dir / "evals.csv").exists() else []
        rows = [r for r in rows if r["split"] == split and r["mean_return"]]
        value = float(rows[-1]["mean_return"]) if rows else None
    if value is None or not math.isfinite(float(value)):
        return "FAIL", None, f"no value for objective {objective!r}"
    return "COMPLETE", float(value), ""


# ----------------------------------------------------------------------------------------------
# Inside a trial process: report evaluations, prune
# ----------------------------------------------------------------------------------------------
class PruningCallback(Callback):
    """Reports each intermediate evaluation (or, for ``train_episodes``, the mean of the last 100
    training episodes at that step) to the trial and stops the run when the study's pruner says so."""

    def __init__(self, storage: str, study_name: str, trial_id: int, objective: str):
        optuna = _import_optuna()
        study = optuna.load_study(study_name=study_name, storage=storage)
        study.pruner = make_pruner(study.user_attrs.get("pruner", {}))
        self.trial = optuna.trial.Trial(study, trial_id)
        self.objective = objective
        self._recent: list[float] = []

    def on_iteration(self, info: IterationInfo) -> None:
        self._recent = (self._recent + [float(r) for r in info.episode_returns])[-100:]

    def on_evaluation(self, info: EvaluationInfo) -> None:
        if info.final:
            return
        if self.objective == "train_episodes":
            if not self._recent:
                return
            value = sum(self._recent) / len(self._recent)
        elif info.split == self.objective.split("/", 1)[1]:
            value = info.mean_return
        else:
            return
        self.trial.report(float(value), step=int(info.step))
        if self.trial.should_prune():
            raise StopTraining(f"{PRUNED_REASON} at step {info.step} (value {value:.4g})", final_eval=False)


def callbacks_from_environment() -> list:
    """The pruning callback when this ``aclab train`` process is a tuning trial (see :func:`trial_env`)."""
    if ENV_TRIAL not in os.environ:
        return []
    return [PruningCallback(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]),
                            os.environ.get(ENV_OBJECTIVE, "eval/test"))]


# ----------------------------------------------------------------------------------------------
# The tuning loop
# ----------------------------------------------------------------------------------------------
class _LocalPool:
    def __init__(self, max_parallel: int):
        self._pool = ThreadPoolExecutor(max_workers=max_parallel)

    def submit(self, command, log_path, timeout_s, env):
        return self._pool.submit(execute_command, command, log_path, timeout_s, env)

    def wait_any(self, handles):
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return [(h, h.result()) for h in done]

    def close(self):
        self._pool.shutdown(wait=True)


class _RayPool:  # pragma: no cover - exercised by the slow test
    def __init__(self, spec: TuneSpec):
        try:
            import ray
        except ImportError as exc:
            raise TuneError("backend = 'ray' needs the ray package: pip install 'aclab[ray]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=spec.ray_address)
        self._remote = ray.remote(num_cpus=spec.ray_num_cpus)(execute_command)

    def submit(self, command, log_path, timeout_s, env):
        return self._remote.remote(command, log_path, timeout_s, env)

    def wait_any(self, handles):
        done, _ = self.ray.wait(list(handles), num_returns=1)
        return [(h, self.ray.get(h)) for h in done]

    def close(self):
        pass


def run_tune(spec_path: str | Path | TuneSpec, *, log: Callable[[str], None] | None = print,
             command_prefix: list[str] | None = None, max_parallel: int | None = None) -> Path:
    """Run (or resume) the study until it has ``n_trials`` trials; write the report; return its path."""
    spec = spec_path if isinstance(spec_path, TuneSpec) else load_tune_spec(spec_path)
    if max_parallel is not None:
        spec.max_parallel = max_parallel
    log = log or (lambda _m: None)
    optuna = _import_optuna()
    study = open_study(spec)
    running = optuna.trial.TrialState.RUNNING
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == running]
    pool = _RayPool(spec) if spec.backend == "ray" else _LocalPool(spec.max_parallel)
    pending: dict[Any, tuple[int, Path]] = {}
    log_dir = spec.out_dir / ".logs"

    def submit(trial_id: int, number: int, params: dict, run_dir: Path, resume: bool) -> None:
        command = trial_command(spec, params, run_dir, resume, command_prefix)
        log(f"[tune] trial {number}: {'resume' if resume else 'start'} {json.dumps(params)}")
        handle = pool.submit(command, str(log_dir / f"{run_dir.name}.log"), spec.timeout_s, trial_env(spec, trial_id))
        pending[handle] = (number, run_dir)

    queue = []
    for t in stale:  # trials of a killed session: finished meanwhile (tell), or go on where they stopped
        run_dir = Path(t.user_attrs["run_dir"])
        state, value, _ = trial_outcome(run_dir, spec.objective)
        if state != "FAIL":
            study.tell(t.number, value, state=getattr(optuna.trial.TrialState, state), skip_if_finished=True)
            log(f"[tune] trial {t.number}: {state.lower()} (before this session)")
        else:
            queue.append((t._trial_id, t.number, t.params, run_dir, (run_dir / "config.json").exists()))
    try:
        while True:
            while len(pending) < spec.max_parallel and (queue or len(study.get_trials(deepcopy=False)) < spec.n_trials):
                if queue:
                    submit(*queue.pop(0))
                else:
                    trial = ask_trial(study, spec)
                    submit(trial._trial_id, trial.number, trial.params, Path(trial.user_attrs["run_dir"]), False)
            if not pending:
                break
            for handle, (code, seconds) in pool.wait_any(list(pending)):
                number, run_dir = pending.pop(handle)
                state, value, note = trial_outcome(run_dir, spec.objective)
                if state == "FAIL" and code != 0:
                    note = f"exit code {code}; {_tail(log_dir / f'{run_dir.name}.log')}"
                study.tell(number, value if state == "COMPLETE" else None,
                           state=getattr(optuna.trial.TrialState, state), skip_if_finished=True)
                log(f"[tune] trial {number}: {state.lower()} after {seconds:.1f} s"
                    + (f": value {value:.4g}" if value is not None else f": {note}" if note else ""))
    finally:
        pool.close()
    return write_tune_report(study, spec)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def write_tune_report(study, spec: TuneSpec, top: int = 10) -> Path:
    """``out_dir/tune_report.md`` (best trials, parameter importances) and ``out_dir/trials.csv``."""
    optuna = _import_optuna()
    trials = study.get_trials(deepcopy=False)
    keys = [p.key for p in spec.space]
    with open(spec.out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", *keys, "last_step", "run_dir"])
        for t in trials:
            last = max(t.intermediate_values) if t.intermediate_values else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                             *[t.params.get(k, "") for k in keys], last, t.user_attrs.get("run_dir", "")])
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    reverse = spec.direction == "maximize"
    best = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    md = [f"# Tuning: {spec.algo} on {spec.env} ({spec.study_name})", "",
          f"{len(trials)} trials ({', '.join(f'{n} {s.lower()}' for s, n in counts.items() if n)}); objective "
          f"{spec.objective} ({spec.direction}); sampler {spec.sampler}, pruner {spec.pruner}; seed {spec.seed}. "
          f"Study: `{STUDY_FILE}`; every trial: `trials.csv`.", "", "## Best trials", ""]
    if best:
        md.append("| trial | value | " + " | ".join(f"`{k}`" for k in keys) + " |")
        md.append("|" + " --- |" * (2 + len(keys)))
        for t in best:
            md.append(f"| {t.number} | {t.value:.4g} | " + " | ".join(_cell(t.params.get(k)) for k in keys) + " |")
        command = trial_command(spec, best[0].params, Path(f"runs/{spec.study_name}-best"), False, ["aclab"])
        command = [c for c in command if c not in ("--quiet", "--overwrite")]
        md += ["", f"Best: trial {best[0].number} (run directory `{best[0].user_attrs.get('run_dir', '')}`, its "
               f"full config in config.json). To train it again: `{' '.join(command)}`"]
    else:
        md.append("No trial has completed yet.")
    md += ["", "## Parameter importances", ""]
    if len(complete) >= 2 and len(keys) >= 1:
        try:
            importances = optuna.importance.get_param_importances(study, params=keys)
        except (RuntimeError, ValueError) as exc:  # e.g. every completed trial has the same parameters
            md.append(f"Not computable: {exc}")
        else:
            md += ["fANOVA importance (Optuna's default evaluator) of each parameter for the objective, over the "
                   f"{len(complete)} completed trials; they sum to 1.", "", "| parameter | importance |",
                   "| --- | --- |"]
            md += [f"| `{k}` | {v:.3f} |" for k, v in importances.items()]
    else:
        md.append("Needs at least two completed trials.")
    path = spec.out_dir / "tune_report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if not isinstance(value, (int, str)) else str(value)


def report_only(spec_path: str | Path) -> Path:
    """Rewrite the report of an existing study (no trials run)."""
    spec = load_tune_spec(spec_path)
    if not (spec.out_dir / STUDY_FILE).exists():
        raise TuneError(f"no study yet: {spec.out_dir / STUDY_FILE} does not exist")
    return write_tune_report(open_study(spec), spec)
