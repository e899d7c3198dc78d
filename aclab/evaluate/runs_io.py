"""Read aclab run directories into tidy structures: learning curves, evaluations, final scores.

A run directory (written by :class:`aclab.runs.Run`) holds::

    config.json    resolved config: "algo", "env" {"id", "options"}, "seed", "total_steps", ...
    metrics.csv    step, time_s, then metric columns (e.g. episode_return; empty cells allowed)
    evals.csv      step, split ("train" | "test"), mean_return, std_return, num_episodes, returns: the
                   training loop's periodic and final evaluations (``aclab eval`` writes evals_adhoc.csv,
                   read instead with ``evals_file="evals_adhoc.csv"``)
    episodes.csv   step, env, return, length, level, task: one row per finished training episode
    summary.json   {"algo", "env_id", "seed", "steps", "wall_time_s", "status", ...} (optional here)

``config.json`` and ``metrics.csv`` are required; ``evals.csv``, ``episodes.csv`` and ``summary.json``
are optional.
Anything missing or unparsable raises :class:`RunDirError` naming the path and the problem.

Final scores (one number per run and *score source*):

* ``"train_episodes"``: the mean return of the last ``last_episodes`` finished training episodes
  (episodes.csv); for runs without episodes.csv (or ``last_episodes=None``, or another ``metric``), the
  mean of the last ``last_k`` finite values of a metrics.csv column (``episode_return`` by default:
  per-iteration means of the training episodes);
* ``"eval/test"``, ``"eval/train"``: mean of ``mean_return`` over the last ``last_k_evals`` evaluations
  of that split in evals.csv (Procgen: test = held-out levels, train = training levels).

:func:`write_synthetic_run` writes a run directory with known curves (tests, documentation demos).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCORE_SOURCES: tuple[str, ...] = ("eval/test", "eval/train", "train_episodes")
EVAL_COLUMNS: tuple[str, ...] = ("step", "split", "mean_return", "std_return", "num_episodes", "returns")


class RunDirError(ValueError):
    """A run directory is missing, incomplete or unreadable; the message names the path."""


@dataclass
class EvalSeries:
    """All evaluations of one split, in step order: ``steps[i]``, ``mean_returns[i]``, ``returns[i]``."""

    steps: np.ndarray
    mean_returns: np.ndarray
    returns: list[np.ndarray]


@dataclass
class RunRecord:
    """One loaded run directory."""

    path: Path
    algo: str
    env_id: str
    seed: int
    total_steps: int
    status: str
    config: dict
    summary: dict
    metrics: dict[str, np.ndarray]
    evals: dict[str, EvalSeries] = field(default_factory=dict)
    episodes: dict[str, np.ndarray] | None = None  # episodes.csv columns "step", "return", "length"

    @property
    def label(self) -> str:
        """The name the run is grouped and shown under: summary/config "label" if set, else the algo."""
        return str(self.summary.get("label") or self.config.get("label") or self.algo)

    @property
    def procgen_mode(self) -> str:
        """Procgen distribution mode from ``env.options.distribution_mode`` (default ``"easy"``)."""
        options = (self.config.get("env") or {}).get("options") or {}
        mode = options.get("distribution_mode", "easy")
        if isinstance(mode, str):
            return mode.lower()
        return {0: "easy", 1: "hard"}.get(mode, str(mode))  # procgen's integer codes

    def curve(self, metric: str = "episode_return") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a metrics.csv column, rows with an empty value dropped."""
        if metric not in self.metrics:
            raise RunDirError(f"{self.path / 'metrics.csv'}: no column {metric!r}; columns: {', '.join(self.metrics)}")
        steps, values = self.metrics["step"], self.metrics[metric]
        keep = np.isfinite(values)
        return steps[keep], values[keep]

    def has_metric(self, metric: str) -> bool:
        return metric in self.metrics and bool(np.isfinite(self.metrics[metric]).any())

    def sources(self, metric: str = "episode_return") -> list[str]:
        """The score sources this run can provide, in :data:`SCORE_SOURCES` order."""
        found = [f"eval/{split}" for split in ("test", "train") if split in self.evals]
        if self.has_metric(metric):
            found.append("train_episodes")
        return found


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RunDirError(f"{path.parent}: missing {path.name} ({what})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _to_float(text: str | None, path: Path, line: int, column: str) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError as exc:
        raise RunDirError(f"{path}, line {line}, column {column!r}: not a number: {text!r}") from exc


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise RunDirError(f"{path.parent}: missing metrics.csv (the training log)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "step" not in columns:
            raise RunDirError(f"{path}: no 'step' column (header: {columns})")
        values: dict[str, list[float]] = {c: [] for c in columns}
        for line, row in enumerate(reader, start=2):
            if None in row:
                raise RunDirError(f"{path}, line {line}: more cells than header columns")
            for column in columns:
                values[column].append(_to_float(row[column], path, line, column))
    out = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    if np.any(~np.isfinite(out["step"])):
        raise RunDirError(f"{path}: empty 'step' cell")
    order = np.argsort(out["step"], kind="stable")
    return {c: v[order] for c, v in out.items()}


def _read_evals(path: Path) -> dict[str, EvalSeries]:
    if not path.exists():
        return {}
    rows: dict[str, list[tuple[float, float, np.ndarray]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("step", "split", "mean_return") if c not in (reader.fieldnames or [])]
        if missing:
            raise RunDirError(f"{path}: missing columns {missing} (header: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            step = _to_float(row["step"], path, line, "step")
            mean = _to_float(row["mean_return"], path, line, "mean_return")
            text = (row.get("returns") or "").split()
            try:
                episode_returns = np.asarray([float(r) for r in text], dtype=np.float64)
            except ValueError as exc:
                raise RunDirError(f"{path}, line {line}, column 'returns': {exc}") from exc
            if math.isnan(step):
                raise RunDirError(f"{path}, line {line}: empty 'step' cell")
            if not math.isnan(mean):
                rows.setdefault(row["split"], []).append((step, mean, episode_returns))
    series = {}
    for split, items in rows.items():
        items.sort(key=lambda item: item[0])
        series[split] = EvalSeries(
            steps=np.asarray([s for s, _, _ in items]),
            mean_returns=np.asarray([m for _, m, _ in items]),
            returns=[r for _, _, r in items],
        )
    return series


def load_run(path: str | Path, evals_file: str = "evals.csv") -> RunRecord:
    """Load one run directory (its evaluations from ``evals_file``); RunDirError naming the path and what is
    missing or garbled."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory")
    config = _read_json(path / "config.json", "the resolved config")
    summary = _read_json(path / "summary.json", "run summary") if (path / "summary.json").exists() else {}
    env = config.get("env")
    env_id = env.get("id") if isinstance(env, dict) else None
    missing = [
        k for k, v in (("algo", config.get("algo")), ("env.id", env_id), ("seed", config.get("seed"))) if v is None
    ]
    if missing:
        raise RunDirError(f"{path / 'config.json'}: missing key(s) {', '.join(missing)}")
    return RunRecord(
        path=path,
        algo=str(config["algo"]),
        env_id=str(env_id),
        seed=int(config["seed"]),
        total_steps=int(config.get("total_steps") or 0),
        status=str(summary.get("status", "unknown")),
        config=config,
        summary=summary,
        metrics=_read_metrics(path / "metrics.csv"),
        evals=_read_evals(path / evals_file),
        episodes=_read_episodes(path / "episodes.csv"),
    )


def _read_episodes(path: Path) -> dict[str, np.ndarray] | None:
    """episodes.csv as float arrays ``step``, ``return``, ``length`` in file (= finishing) order, or None."""
    if not path.exists():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("step", "return") if c not in (reader.fieldnames or [])]
        if missing:
            raise RunDirError(f"{path}: missing columns {missing} (header: {reader.fieldnames})")
        columns: dict[str, list[float]] = {"step": [], "return": [], "length": []}
        for line, row in enumerate(reader, start=2):
            for column in columns:
                columns[column].append(_to_float(row.get(column), path, line, column))
    out = {c: np.asarray(v, dtype=np.float64) for c, v in columns.items()}
    if np.any(~np.isfinite(out["step"])) or np.any(~np.isfinite(out["return"])):
        raise RunDirError(f"{path}: empty 'step' or 'return' cell")
    return out


def _looks_like_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "metrics.csv", "summary.json", "evals.csv"))


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: each is a run dir or a folder searched recursively for them.

    Hidden folders (``.logs`` of a sweep) are skipped. RunDirError for a path that does not exist, a
    folder that holds no run directory, or a folder that looks like a run dir but lacks config.json.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise RunDirError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise RunDirError(f"{path}: not a directory (expected a run directory or a folder of them)")
        if (path / "config.json").exists():
            found.append(path)
            continue
        if _looks_like_run_dir(path):
            raise RunDirError(f"{path}: missing config.json (the resolved config)")
        nested = sorted(
            p.parent
            for p in path.rglob("config.json")
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        # Only the outermost run dirs (a run dir's own subfolders are not runs).
        nested = [p for p in nested if not any(q != p and q in p.parents for q in nested)]
        if not nested:
            raise RunDirError(f"{path}: no run directories (folders with config.json) found")
        found.extend(nested)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def load_runs(paths: Iterable[str | Path], evals_file: str = "evals.csv") -> list[RunRecord]:
    """Load every run directory named by ``paths`` (see :func:`expand_run_dirs`)."""
    dirs = expand_run_dirs(paths)
    if not dirs:
        raise RunDirError("no run directories given")
    return [load_run(d, evals_file) for d in dirs]


def group_runs(runs: Sequence[RunRecord]) -> dict[tuple[str, str], list[RunRecord]]:
    """``{(label, env_id): runs sorted by seed}``; RunDirError if two runs share label, env and seed."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.label, run.env_id), []).append(run)
    for key, members in groups.items():
        members.sort(key=lambda r: r.seed)
        seeds = [r.seed for r in members]
        duplicated = {s for s in seeds if seeds.count(s) > 1}
        if duplicated:
            paths = [str(r.path) for r in members if r.seed in duplicated]
            raise RunDirError(
                f"duplicate runs for algo {key[0]!r}, env {key[1]!r}, seed(s) {sorted(duplicated)}: {paths}; "
                "give each configuration its own label (summary.json or config.json 'label')"
            )
    return dict(sorted(groups.items()))


# ----------------------------------------------------------------------------------------------
# Final scores
# ----------------------------------------------------------------------------------------------
def final_score(
    run: RunRecord,
    source: str = "train_episodes",
    *,
    last_k: int = 10,
    last_k_evals: int = 1,
    metric: str = "episode_return",
    last_episodes: int | None = None,
) -> tuple[float, float]:
    """``(score, step)``: the run's final score from ``source`` and the last step it was measured at.

    ``train_episodes`` with ``last_episodes = N``: the mean return of the run's last N finished training
    episodes (episodes.csv) when it has them and ``metric`` is ``episode_return``; otherwise the mean of the
    last ``last_k`` logged values of ``metric`` (metrics.csv).
    """
    if source == "train_episodes":
        if last_episodes is not None and uses_episodes(run, metric, last_episodes):
            if last_episodes < 1:
                raise ValueError(f"last_episodes must be >= 1, got {last_episodes}")
            returns = run.episodes["return"]
            return float(returns[-last_episodes:].mean()), float(run.episodes["step"][-1])
        if last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        steps, values = run.curve(metric)
        if values.size == 0:
            raise RunDirError(f"{run.path / 'metrics.csv'}: column {metric!r} has no values")
        return float(values[-last_k:].mean()), float(steps[-1])
    if source.startswith("eval/"):
        if last_k_evals < 1:
            raise ValueError(f"last_k_evals must be >= 1, got {last_k_evals}")
        split = source.split("/", 1)[1]
        if split not in run.evals:
            raise RunDirError(f"{run.path}: no {split!r} evaluations in evals.csv")
        series = run.evals[split]
        return float(series.mean_returns[-last_k_evals:].mean()), float(series.steps[-1])
    raise ValueError(f"unknown score source {source!r}; valid: {', '.join(SCORE_SOURCES)}")


def uses_episodes(run: RunRecord, metric: str = "episode_return", last_episodes: int | None = 100) -> bool:
    """Whether the ``train_episodes`` score of ``run`` comes from episodes.csv (see :func:`final_score`)."""
    return (last_episodes is not None and metric == "episode_return" and run.episodes is not None
            and run.episodes["return"].size > 0)


# ----------------------------------------------------------------------------------------------
# Synthetic run directories (tests and demos)
# ----------------------------------------------------------------------------------------------
def write_synthetic_run(
    path: str | Path,
    *,
    algo: str = "ppo",
    env_id: str = "CartPole-v1",
    seed: int = 0,
    total_steps: int = 10_000,
    num_points: int = 20,
    curve: Callable[[np.ndarray], np.ndarray] | None = None,
    eval_curves: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    num_evals: int = 5,
    episodes: int = 4,
    episode_spread: float = 1.0,
    empty_every: int = 0,
    status: str = "finished",
    checkpoint: bool = False,
    env_options: dict | None = None,
    extra_config: dict | None = None,
    train_episodes: Sequence[tuple[int, float]] | None = None,
) -> Path:
    """Write a run directory with known curves.

    metrics.csv gets ``num_points`` rows at steps ``total_steps * i / num_points`` (i = 1..num_points)
    with ``episode_return = curve(step)`` (default: ``step / total_steps``), ``episode_length`` and a
    ``loss/policy`` column; with ``empty_every = n`` every n-th row has an empty episode_return.
    evals.csv gets ``num_evals`` evaluations per split of ``eval_curves`` ({split: curve}); the
    ``episodes`` per-episode returns are spread symmetrically (``episode_spread``) so their mean is
    exactly the curve value. ``checkpoint=True`` writes an (empty) checkpoints/ckpt_<step>.pt file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    curve = curve or (lambda s: s / total_steps)
    config = {
        "algo": algo,
        "preset": None,
        "seed": seed,
        "total_steps": total_steps,
        "env": {"id": env_id, "num_envs": 4, "options": dict(env_options or {})},
        "params": {},
    }
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config, indent=2))

    steps = (np.arange(1, num_points + 1) * total_steps) // num_points
    returns = np.asarray(curve(steps.astype(np.float64)), dtype=np.float64)
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "time_s", "episode_return", "episode_length", "loss/policy"])
        for i, (step, ret) in enumerate(zip(steps, returns), start=1):
            empty = empty_every > 0 and i % empty_every == 0
            writer.writerow(
                [
                    int(step),
                    f"{0.01 * i:.3f}",
                    "" if empty else repr(float(ret)),
                    "" if empty else 100,
                    f"{-0.01 * i:.4f}",
                ]
            )

    if eval_curves:
        offsets = np.linspace(-episode_spread, episode_spread, episodes) if episodes > 1 else np.zeros(1)
        eval_steps = (np.arange(1, num_evals + 1) * total_steps) // num_evals
        with open(path / "evals.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(EVAL_COLUMNS)
            for step in eval_steps:
                for split, eval_curve in eval_curves.items():
                    mean = float(eval_curve(np.float64(step)))
                    per_episode = mean + offsets
                    writer.writerow(
                        [
                            int(step),
                            split,
                            repr(mean),
                            repr(float(per_episode.std())),
                            len(per_episode),
                            " ".join(repr(float(r)) for r in per_episode),
                        ]
                    )

    if train_episodes is not None:
        with open(path / "episodes.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "env", "return", "length", "level", "task"])
            for step, ret in train_episodes:
                writer.writerow([int(step), 0, repr(float(ret)), 10, "", ""])

    if checkpoint:
        (path / "checkpoints").mkdir(exist_ok=True)
        (path / "checkpoints" / f"ckpt_{int(steps[-1]):012d}.pt").write_bytes(b"")
    summary: dict[str, Any] = {
        "algo": algo,
        "env_id": env_id,
        "seed": seed,
        "steps": int(steps[-1]) if status == "finished" else int(steps[-1]) // 2,
        "wall_time_s": 0.01 * num_points,
        "steps_per_s": float(steps[-1]) / (0.01 * num_points),
        "final_return": float(returns[-1]),
        "status": status,
    }
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    return path
