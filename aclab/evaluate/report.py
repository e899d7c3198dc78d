"""Markdown + PNG report of a set of run directories: curves, paper-style tables, RLiable statistics.

:func:`build_report` writes into ``out_dir``::

    report.md                   the report, embedding every figure below
    curves_overview.png         one panel per task (all tasks at a glance)
    curves/<task>.png           per task: training-episode returns, and evaluations (train/test splits)
    aggregates_<source>.png     median / IQM / mean / optimality gap with 95% bootstrap CIs
    poi_<source>.png            probability of improvement P(X > Y) with CIs (>= 2 algorithms)
    profiles_<source>.png       performance profiles (score distributions) with CIs
    final_scores.csv            one row per run and score source: raw and normalised final scores
    aggregates.json             the aggregate / P(X > Y) numbers shown in the report

A *score source* is where a final score comes from (see :mod:`aclab.evaluate.runs_io`): ``eval/test``,
``eval/train`` (evals.csv) or ``train_episodes`` (metrics.csv). Every source that all runs provide gets
a table and statistics; a source only some runs have gets a table with n/a cells.

Bad inputs raise :class:`ReportError` (a ValueError): no runs, a garbled run dir, algorithms run on
different task sets, tasks needing different normalisations, or a game the normalisation does not know.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from aclab.evaluate import scores as sc
from aclab.evaluate import stats
from aclab.evaluate.runs_io import (
    SCORE_SOURCES,
    RunDirError,
    RunRecord,
    final_score,
    group_runs,
    load_runs,
    uses_episodes,
)

SOURCE_TITLES = {
    "eval/test": "evaluation on the test split (split=test)",
    "eval/train": "evaluation on the train split (split=train)",
    "train_episodes": "training episodes (episodes.csv, else metrics.csv)",
}
MAX_UNION_POINTS = 1000  # curves on different step grids: beyond this, resample the union of their ranges
AGGREGATE_TITLES = {"median": "Median", "iqm": "IQM", "mean": "Mean", "optimality_gap": "Optimality gap"}


class ReportError(ValueError):
    """The runs cannot be reported as asked; the message says why (and names paths, tasks or games)."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """A file-name-safe version of ``text`` ("procgen:bigfish" -> "procgen-bigfish")."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "x"


def format_number(value: float, reference: float | None = None) -> str:
    """Format with a precision chosen from the magnitude of ``reference`` (default: ``value``)."""
    if not math.isfinite(value):
        return "n/a"
    ref = abs(value if reference is None else reference)
    if ref >= 1000:
        return f"{value:,.0f}"
    if ref >= 10:
        return f"{value:.1f}"
    if ref >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def mean_std_cell(values: np.ndarray, bold: bool = False) -> str:
    """``"mean ± std"`` over seeds (sample std, ddof=1; one seed: the value alone)."""
    mean = float(np.mean(values))
    text = format_number(mean)
    if len(values) > 1:
        text += f" ± {format_number(float(np.std(values, ddof=1)), mean)}"
    return f"**{text}**" if bold else text


def mean_and_standard_error(curves: Sequence[tuple[np.ndarray, np.ndarray]], num_points: int = 100):
    """Mean and standard error over seeds of curves ``(steps, values)`` logged at different steps.

    Identical step grids are used as they are. Otherwise the grid is the union of the curves' steps (or,
    beyond :data:`MAX_UNION_POINTS` steps, ``num_points`` steps evenly spread over the union of their
    ranges) and each curve, linearly interpolated, counts only inside its own range: seeds of different
    lengths are not cut at the shortest, ``count`` says how many seeds each point averages. Returns
    ``(steps, mean, se, count)``; ``se`` is ``std(ddof=1) / sqrt(count)`` (0 where one curve contributes).
    """
    curves = [(np.asarray(s, float), np.asarray(v, float)) for s, v in curves if len(s) > 0]
    if not curves:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    first_steps = curves[0][0]
    if all(s.shape == first_steps.shape and np.array_equal(s, first_steps) for s, _ in curves):
        grid, stack = first_steps, np.stack([v for _, v in curves])
    else:
        grid = np.unique(np.concatenate([s for s, _ in curves]))
        if grid.size > MAX_UNION_POINTS:
            grid = np.linspace(grid[0], grid[-1], num_points)
        stack = np.stack([np.where((grid >= s[0]) & (grid <= s[-1]), np.interp(grid, s, v), np.nan) for s, v in curves])
    count = np.sum(np.isfinite(stack), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(count > 0, stack, 0.0), axis=0) if stack.size else np.zeros(0)
        mean = np.where(count > 0, mean, np.nan)
        centred = np.where(np.isfinite(stack), stack - mean, 0.0)
        var = np.sum(centred**2, axis=0) / np.maximum(count - 1, 1)
        se = np.where(count > 1, np.sqrt(var) / np.sqrt(np.maximum(count, 1)), 0.0)
    return grid, mean, se, count


def padded_limits(values: Sequence[float], fraction: float = 0.1) -> tuple[float, float]:
    """Axis limits around ``values`` with a margin of ``fraction`` of their span on each side, so that no
    point sits on an axis edge (a zero span, e.g. one algorithm with one seed, gets a margin of 10% of
    the value's magnitude, at least 0.05)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    if not finite:
        return -1.0, 1.0
    low, high = min(finite), max(finite)
    span = high - low
    pad = fraction * span if span > 0 else max(fraction * max(abs(low), abs(high)), 0.05)
    return low - pad, high + pad


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Collected data
# ----------------------------------------------------------------------------------------------
@dataclass
class FinalScores:
    """Final scores of one source: ``raw[label][task]`` etc. are per-seed arrays (seed order)."""

    source: str
    raw: dict[str, dict[str, np.ndarray]]
    normalized: dict[str, dict[str, np.ndarray]]
    steps: dict[str, dict[str, np.ndarray]]
    seeds: dict[str, dict[str, list[int]]]
    complete: bool  # every (label, task) group has this source for all its runs

    def matrix(self, label: str, tasks: Sequence[str], normalized: bool = True) -> tuple[np.ndarray, bool]:
        """``[runs, tasks]`` matrix for rliable (the i-th seed of each task in row i) and whether runs
        were dropped to make it rectangular (tasks with more seeds than the smallest count)."""
        table = self.normalized if normalized else self.raw
        n = min(len(table[label][t]) for t in tasks)
        dropped = any(len(table[label][t]) != n for t in tasks)
        return np.stack([table[label][t][:n] for t in tasks], axis=1), dropped


def _normalizer(task: str, scheme: str, runs: Sequence[RunRecord]):
    try:
        concrete = sc.resolve_scheme(task, scheme)
        modes = {r.procgen_mode for r in runs} if concrete == "procgen_minmax" else {"easy"}
        if len(modes) > 1:
            raise ReportError(f"runs of {task!r} mix Procgen distribution modes {sorted(modes)}")
        mode = modes.pop()
        sc.normalize(task, 0.0, concrete, mode=mode)  # fail early on an unknown game / mode
    except ReportError:
        raise
    except ValueError as exc:
        raise ReportError(f"cannot normalise task {task!r} with normalization={scheme!r}: {exc}") from exc
    return concrete, (lambda x: sc.normalize(task, x, concrete, mode=mode))


def collect_final_scores(
    groups: dict[tuple[str, str], list[RunRecord]],
    source: str,
    normalizers: dict[str, object],
    *,
    last_k: int,
    last_k_evals: int,
    metric: str,
    last_episodes: int | None = None,
) -> FinalScores:
    raw: dict[str, dict[str, np.ndarray]] = {}
    normalized: dict[str, dict[str, np.ndarray]] = {}
    steps: dict[str, dict[str, np.ndarray]] = {}
    seeds: dict[str, dict[str, list[int]]] = {}
    complete = True
    for (label, task), runs in groups.items():
        have = [r for r in runs if source in r.sources(metric)]
        complete = complete and len(have) == len(runs)
        if not have:
            continue
        values = [final_score(r, source, last_k=last_k, last_k_evals=last_k_evals, metric=metric,
                              last_episodes=last_episodes) for r in have]
        raw.setdefault(label, {})[task] = np.asarray([v for v, _ in values])
        steps.setdefault(label, {})[task] = np.asarray([s for _, s in values])
        seeds.setdefault(label, {})[task] = [r.seed for r in have]
        normalized.setdefault(label, {})[task] = np.asarray(normalizers[task](raw[label][task]), dtype=float)
    return FinalScores(source, raw, normalized, steps, seeds, complete)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _plot_mean_se(ax, curves, color, label, linestyle="-") -> bool:
    grid, mean, se, count = mean_and_standard_error(curves)
    if grid.size == 0:
        return False
    sparse = grid.size <= 30  # e.g. evaluations: show the measured points
    full = count == count.max()
    ax.plot(
        grid,
        np.where(full, mean, np.nan),
        color=color,
        linestyle=linestyle,
        label=label,
        linewidth=1.6,
        marker="o" if sparse else None,
        markersize=3.5,
    )
    if not full.all():  # steps that only some seeds reach (runs of different lengths): thin, dotted
        partial = ~full | np.convolve(~full, np.ones(3), mode="same").astype(bool)  # joined to the solid part
        ax.plot(grid, np.where(partial, mean, np.nan), color=color, linestyle=":", linewidth=1.2,
                marker="o" if sparse else None, markersize=2.5)
    if grid.size == 1:
        ax.errorbar(grid, mean, yerr=se, color=color, capsize=4)
    elif np.any(se > 0):
        ax.fill_between(grid, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)
    return True


def _task_curve_panels(groups, task: str, labels: Sequence[str], metric: str) -> list[str]:
    """Which panels a task has: 'train_episodes' if any run logged ``metric``, 'eval' if any evals."""
    runs = [r for label in labels for r in groups.get((label, task), [])]
    panels = []
    if any(r.has_metric(metric) for r in runs):
        panels.append("train_episodes")
    if any(r.evals for r in runs):
        panels.append("eval")
    return panels


def _draw_task_panel(ax, groups, task, labels, colors, panel, metric, legend=True) -> None:
    for label in labels:
        runs = groups.get((label, task), [])
        n = len(runs)
        if panel == "train_episodes":
            _plot_mean_se(
                ax, [r.curve(metric) for r in runs if r.has_metric(metric)], colors[label], f"{label} (n={n})"
            )
        else:
            for split, style in (("test", "-"), ("train", "--")):
                series = [(r.evals[split].steps, r.evals[split].mean_returns) for r in runs if split in r.evals]
                if series:
                    _plot_mean_se(ax, series, colors[label], f"{label} {split} (n={len(series)})", style)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"{metric.replace('_', ' ')}" if panel == "train_episodes" else "evaluation return")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot_task_curves(groups, task: str, labels: Sequence[str], colors, metric: str, path: Path) -> Path:
    """One figure for ``task``: training-episode returns and (if any) evaluation returns per split,
    mean over seeds with a shaded standard error."""
    panels = _task_curve_panels(groups, task, labels, metric)
    if not panels:
        raise ReportError(f"task {task!r}: no run has values of {metric!r} nor any evaluation to plot")
    fig = Figure(figsize=(5.2 * len(panels), 3.6))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _draw_task_panel(ax, groups, task, labels, colors, panel, metric)
        what = "training episodes" if panel == "train_episodes" else "evaluation (solid: test, dashed: train)"
        ax.set_title(f"{task}: {what}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_overview(groups, tasks: Sequence[str], labels: Sequence[str], colors, metric: str, path: Path) -> Path:
    """All tasks in a grid of panels, each showing the evaluation curves if any, else training episodes."""
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    height = 2.8 * rows + 0.6
    fig = Figure(figsize=(3.6 * cols, height))
    any_eval = False
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        panels = _task_curve_panels(groups, task, labels, metric)
        panel = "eval" if "eval" in panels else "train_episodes"
        any_eval = any_eval or panel == "eval"
        _draw_task_panel(ax, groups, task, labels, colors, panel, metric, legend=False)
        ax.set_title(task + (" (eval)" if panel == "eval" else " (training)"), fontsize=9)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    handles = [Line2D([], [], color=colors[label], label=label) for label in labels]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(labels), 6),
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
    )
    fig.suptitle(
        "Learning curves: mean ± standard error over seeds"
        + (" (eval panels: solid test, dashed train)" if any_eval else ""),
        fontsize=10,
        y=1.0 + 0.25 / height,
    )
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.3 / height))  # room for the legend row
    _save(fig, path)
    return path


def plot_aggregates(
    results: dict[str, dict[str, stats.Interval]],
    labels: Sequence[str],
    colors,
    xlabel: str,
    title: str,
    path: Path,
) -> Path:
    """RLiable-style interval estimates: one panel per aggregate, one row per algorithm."""
    metrics = list(next(iter(results.values())))
    fig = Figure(figsize=(3.2 * len(metrics), 0.5 * len(labels) + 1.6))
    for j, name in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for i, label in enumerate(labels):
            iv = results[label][name]
            ax.barh(i, iv.upper - iv.lower, left=iv.lower, height=0.6, color=colors[label], alpha=0.75)
            ax.vlines(iv.point, i - 0.3, i + 0.3, color="black", linewidth=2)
            if iv.upper - iv.lower <= 0:  # one seed: no interval, show the point itself
                ax.plot([iv.point], [i], marker="D", color=colors[label], markeredgecolor="black", markersize=7)
        ax.set_xlim(*padded_limits([v for lb in labels for v in (results[lb][name].lower, results[lb][name].upper,
                                                                  results[lb][name].point)]))
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if j == 0 else [""] * len(labels))
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.invert_yaxis()
        ax.set_title(
            AGGREGATE_TITLES.get(name, name) + (" (lower is better)" if name == "optimality_gap" else ""),
            fontsize=10,
        )
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    degenerate = all(iv.upper - iv.lower <= 0 for res in results.values() for iv in res.values())
    fig.suptitle(title + (" (one run per task: no interval, points shown)" if degenerate else ""), fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_poi(results: dict[tuple[str, str], stats.Interval], title: str, path: Path) -> Path:
    """P(X > Y) with CIs, one row per pair; the dashed line marks 0.5 (no difference)."""
    pairs = list(results)
    fig = Figure(figsize=(6.0, 0.5 * len(pairs) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    for i, pair in enumerate(pairs):
        iv = results[pair]
        ax.barh(i, iv.upper - iv.lower, left=iv.lower, height=0.6, color="tab:blue", alpha=0.6)
        ax.plot([iv.point], [i], marker="o", color="black", markersize=5)
        ax.annotate(f"{iv.point:.2f}", (iv.point, i - 0.32), ha="center", va="bottom", fontsize=8)
    ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(pairs)))
    ax.set_yticklabels([f"P({x} > {y})" for x, y in pairs])
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("probability of improvement (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_profiles(
    profiles: stats.PerformanceProfiles, labels: Sequence[str], colors, xlabel: str, title: str, path: Path
) -> Path:
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for label in labels:
        ax.plot(profiles.taus, profiles.profiles[label], color=colors[label], label=label, linewidth=1.6)
        ax.fill_between(
            profiles.taus,
            profiles.lower[label],
            profiles.upper[label],
            color=colors[label],
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xlabel(f"{xlabel} (τ)")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _normalized_rows(final: FinalScores, labels, tasks, scheme, ppo_baseline) -> list[tuple[str, dict]]:
    """Per-run summaries over tasks (run i = i-th seed of every task): [(row name, {label: values})]."""
    rows: list[tuple[str, dict]] = []
    present = [lb for lb in labels if lb in final.normalized and all(t in final.normalized[lb] for t in tasks)]
    if not present:
        return rows
    mats = {lb: final.matrix(lb, tasks)[0] for lb in present}
    if scheme == "procgen_minmax":
        rows.append(("Min-max normalised score (mean over tasks)", {lb: m.mean(axis=1) for lb, m in mats.items()}))
    elif scheme == "atari_hns":
        rows.append(("Mean HNS (%)", {lb: m.mean(axis=1) for lb, m in mats.items()}))
        rows.append(("Median HNS (%)", {lb: np.median(m, axis=1) for lb, m in mats.items()}))
        games = {sc.canonical_atari_game(sc.parse_env_id(t)[1]): i for i, t in enumerate(tasks)}
        if all(g in games for g in sc.ATARI5_WEIGHTS):
            rows.append(
                (
                    "Atari-5 (%)",
                    {
                        lb: np.asarray(sc.atari5({g: m[:, games[g]] for g in sc.ATARI5_WEIGHTS}))
                        for lb, m in mats.items()
                    },
                )
            )
    if ppo_baseline is not None and ppo_baseline in final.raw:
        reference = {t: float(np.mean(final.raw[ppo_baseline][t])) for t in tasks}
        values = {}
        for lb in present:
            raw = final.matrix(lb, tasks, normalized=False)[0]
            try:
                values[lb] = np.asarray(sc.ppo_normalized({t: raw[:, i] for i, t in enumerate(tasks)}, reference))
            except ValueError as exc:
                raise ReportError(f"PPO-normalised score against {ppo_baseline!r}: {exc}") from exc
        rows.append((f"{ppo_baseline}-normalised score (%)", values))
    return rows


def final_score_table(final: FinalScores, labels, tasks, scheme, ppo_baseline) -> str:
    """Paper-style table: tasks x algorithms, mean ± std over seeds, best mean in bold, summary rows."""
    header = ["Task"] + list(labels)
    rows = []
    for task in tasks:
        means = {lb: float(np.mean(final.raw[lb][task])) for lb in labels if task in final.raw.get(lb, {})}
        best = max(means.values()) if means else None
        row = [task]
        for lb in labels:
            if lb in means:
                row.append(mean_std_cell(final.raw[lb][task], bold=len(means) > 1 and means[lb] == best))
            else:
                row.append("n/a")
        rows.append(row)
    for name, values in _normalized_rows(final, labels, tasks, scheme, ppo_baseline):
        means = {lb: float(np.mean(v)) for lb, v in values.items()}
        best = max(means.values())
        rows.append(
            [f"*{name}*"]
            + [
                mean_std_cell(values[lb], bold=len(means) > 1 and means[lb] == best) if lb in values else "n/a"
                for lb in labels
            ]
        )
    return _md_table(header, rows)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _check_task_sets(groups, labels) -> list[str]:
    tasks_of = {lb: sorted({t for (g, t) in groups if g == lb}) for lb in labels}
    all_tasks = sorted({t for ts in tasks_of.values() for t in ts})
    mismatched = {lb: sorted(set(all_tasks) - set(ts)) for lb, ts in tasks_of.items() if set(ts) != set(all_tasks)}
    if mismatched:
        details = "; ".join(f"{lb} lacks {', '.join(m)}" for lb, m in mismatched.items())
        raise ReportError(
            f"algorithms were run on different task sets ({details}); aggregate statistics need every "
            "algorithm on every task: add the missing runs or report the task sets separately"
        )
    return all_tasks


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    normalization: str = "auto",
    last_k: int = 10,
    last_k_evals: int = 1,
    last_episodes: int | None = 100,
    metric: str = "episode_return",
    seed: int = 0,
    reps: int = 2000,
    poi_reps: int = 1000,
    ppo_baseline: str | None = None,
    title: str = "aclab report",
    evals_file: str = "evals.csv",
) -> Path:
    """Write ``out_dir/report.md`` (and its PNGs, CSV, JSON) for ``run_dirs``; return the Markdown path.

    ``run_dirs``: run directories or folders containing them. ``normalization``: ``auto`` (Procgen:
    min-max, Atari: human-normalised %, others raw), ``none``, ``procgen_minmax`` or ``atari_hns``.
    ``last_episodes``: final score of training episodes = mean return of the last ``last_episodes``
    finished episodes (episodes.csv); runs without episodes.csv (or ``last_episodes=None``): mean of the
    last ``last_k`` logged values of ``metric``. ``last_k_evals``: of evaluations = mean of the last
    ``last_k_evals`` evaluations per split.
    ``seed``, ``reps``, ``poi_reps``: bootstrap seed and replications (aggregates, P(X > Y), profiles).
    ``ppo_baseline``: an algorithm label to add a PPO-normalised row (DCPG tables) and to put first.
    ``evals_file``: the evaluation file read in each run directory (default ``evals.csv``, the training
    loop's own evaluations; ``evals_adhoc.csv`` holds ``aclab eval`` results); the report names it.
    """
    if not run_dirs:
        raise ReportError("no run directories given")
    if last_episodes is not None and last_episodes < 1:
        raise ReportError(f"last_episodes must be >= 1 (or None), got {last_episodes}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ReportError(f"--out {out_dir} is a file: give a folder, the report writes report.md and its figures "
                          "into it")
    try:
        runs = load_runs(run_dirs, evals_file)
        groups = group_runs(runs)
    except RunDirError as exc:
        raise ReportError(str(exc)) from exc
    labels = sorted({lb for lb, _ in groups})
    if ppo_baseline is not None:
        if ppo_baseline not in labels:
            raise ReportError(f"ppo_baseline {ppo_baseline!r} is not among the algorithms: {labels}")
        labels = [ppo_baseline] + [lb for lb in labels if lb != ppo_baseline]
    tasks = _check_task_sets(groups, labels) if len(labels) > 1 else sorted({t for _, t in groups})

    normalizers, schemes = {}, {}
    for task in tasks:
        schemes[task], normalizers[task] = _normalizer(
            task, normalization, [r for lb in labels for r in groups.get((lb, task), [])]
        )
    if len(set(schemes.values())) > 1:
        raise ReportError(
            f"tasks need different normalisations ({schemes}); aggregate statistics need one scale: "
            "report each suite separately or pass normalization='none'"
        )
    scheme = next(iter(schemes.values()))
    score_label = sc.SCHEME_LABELS[scheme]
    gamma = {"procgen_minmax": 1.0, "atari_hns": 100.0}.get(scheme)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = _colors(labels)
    md: list[str] = [f"# {title}", ""]
    md.append(
        f"{len(runs)} runs: {len(labels)} algorithm(s) ({', '.join(labels)}) on {len(tasks)} task(s). "
        f"Normalisation: **{scheme}** ({score_label})."
    )
    md += ["", "## Runs", ""]
    run_rows = []
    for (label, task), members in groups.items():
        statuses = sorted({r.status for r in members})
        steps = [int(r.metrics["step"][-1]) if r.metrics["step"].size else 0 for r in members]
        run_rows.append(
            [
                label,
                task,
                ", ".join(str(r.seed) for r in members),
                f"{min(steps):,}" + (f"–{max(steps):,}" if max(steps) != min(steps) else ""),
                ", ".join(statuses),
            ]
        )
    md.append(_md_table(["Algorithm", "Task", "Seeds", "Last logged step", "Status"], run_rows))
    unfinished = [r for r in runs if r.status != "finished"]
    if unfinished:
        md += [
            "",
            f"Note: {len(unfinished)} run(s) are not finished (status running/failed/unknown); "
            "their scores are those of their last logged steps.",
        ]

    # ---- learning curves
    md += [
        "",
        "## Learning curves",
        "",
        "Mean over seeds with a shaded standard error; seeds logged at different steps are linearly "
        "interpolated onto the union of their steps. Where only some seeds reach a step (runs of different "
        "lengths) the line is dotted and averages the seeds that reach it.",
        "",
    ]
    if len(tasks) > 1:
        plot_overview(groups, tasks, labels, colors, metric, out / "curves_overview.png")
        md += ["![Learning curves, all tasks](curves_overview.png)", ""]
    for task in tasks:
        rel = f"curves/{slug(task)}.png"
        plot_task_curves(groups, task, labels, colors, metric, out / rel)
        md += [f"### {task}", "", f"![Learning curves on {task}]({rel})", ""]

    # ---- final scores and statistics per source
    from_episodes = sum(uses_episodes(r, metric, last_episodes) for r in runs)
    train_what = f"mean of the last {last_k} logged `{metric}` values (metrics.csv)"
    if from_episodes == len(runs):
        train_what = f"mean return of the last {last_episodes} finished training episodes (episodes.csv)"
    elif from_episodes:
        train_what = (f"mean return of the last {last_episodes} finished training episodes (episodes.csv) for "
                      f"{from_episodes} run(s); for the {len(runs) - from_episodes} run(s) without episodes.csv, "
                      f"the {train_what}")
    available = [s for s in SCORE_SOURCES if any(s in r.sources(metric) for r in runs)]
    if not available:
        raise ReportError(f"no run has a final score: no evaluations and no values of {metric!r}")
    csv_rows: list[dict] = []
    summary_json: dict = {"normalization": scheme, "labels": labels, "tasks": tasks, "sources": {}}
    for source in available:
        final = collect_final_scores(
            groups, source, normalizers, last_k=last_k, last_k_evals=last_k_evals, metric=metric,
            last_episodes=last_episodes,
        )
        for label in final.raw:
            for task in final.raw[label]:
                for i, s in enumerate(final.seeds[label][task]):
                    csv_rows.append(
                        {
                            "algo": label,
                            "env_id": task,
                            "seed": s,
                            "source": source,
                            "score": final.raw[label][task][i],
                            "normalized_score": final.normalized[label][task][i],
                            "step": int(final.steps[label][task][i]),
                        }
                    )
        md += _source_section(
            final,
            labels,
            tasks,
            scheme,
            score_label,
            gamma,
            ppo_baseline,
            colors,
            out,
            summary_json,
            seed=seed,
            reps=reps,
            poi_reps=poi_reps,
            last_k_evals=last_k_evals,
            train_what=train_what,
            evals_file=evals_file,
        )

    with open(out / "final_scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["algo", "env_id", "seed", "source", "score", "normalized_score", "step"])
        writer.writeheader()
        writer.writerows(csv_rows)
    (out / "aggregates.json").write_text(json.dumps(summary_json, indent=2))
    md += [
        "",
        "## Method",
        "",
        f"- Final score per run: training episodes = {train_what}; "
        f"evaluations = mean of the last {last_k_evals} evaluation(s) of the split.",
        f"- Evaluation scores and curves come from `{evals_file}` in each run directory"
        + (" (the training loop's periodic and final evaluations; `aclab eval` results are in `evals_adhoc.csv` "
           "and are not used)." if evals_file == "evals.csv" else " (not the training loop's own evals.csv)."),
        "- Tables: mean ± sample standard deviation (ddof=1) over seeds; best mean per row in bold.",
        "- Summary rows and aggregate statistics pair runs across tasks by seed order (run i = the i-th "
        "seed of each task).",
        f"- Aggregates (rliable): stratified percentile bootstrap, {reps} replications "
        f"(P(X > Y) and profiles: {poi_reps}), 95% CIs, seed {seed}.",
        "- Per-run numbers: `final_scores.csv`; aggregate numbers: `aggregates.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _source_section(
    final: FinalScores,
    labels,
    tasks,
    scheme,
    score_label,
    gamma,
    ppo_baseline,
    colors,
    out,
    summary_json,
    *,
    seed,
    reps,
    poi_reps,
    last_k_evals,
    train_what,
    evals_file="evals.csv",
) -> list[str]:
    source = final.source
    key = slug(source)
    what = (train_what if source == "train_episodes"
            else f"mean of the last {last_k_evals} evaluation(s) in `{evals_file}`")
    all_steps = np.concatenate([v for per_task in final.steps.values() for v in per_task.values()])
    md = [
        "",
        f"## Final scores: {SOURCE_TITLES[source]}",
        "",
        f"Raw returns, {what} per run, mean ± std over seeds; measured at steps "
        f"{int(all_steps.min()):,}"
        + (f"–{int(all_steps.max()):,}" if all_steps.max() != all_steps.min() else "")
        + ".",
        "",
    ]
    md.append(final_score_table(final, labels, tasks, scheme, ppo_baseline))
    entry: dict = {}
    summary_json["sources"][source] = entry
    if not final.complete:
        md += ["", "Some runs have no score from this source (n/a); no aggregate statistics for it."]
        return md
    if scheme == "none" and len(tasks) > 1:
        md += [
            "",
            "Aggregate statistics over several tasks need normalised scores (normalization is 'none' here): skipped.",
        ]
        return md

    matrices = {}
    for label in labels:
        matrices[label], dropped = final.matrix(label, tasks)
        if dropped:
            md += [
                "",
                f"Note: {label} has different seed counts across tasks; its aggregate statistics use "
                f"the first {matrices[label].shape[0]} seed(s) of each task.",
            ]
    metric_names = [m for m in stats.AGGREGATES if gamma is not None or m != "optimality_gap"]
    try:
        aggregates = stats.aggregate_intervals(matrices, metrics=metric_names, gamma=gamma or 1.0, reps=reps, seed=seed)
    except stats.StatsError as exc:
        raise ReportError(f"aggregate statistics for {source}: {exc}") from exc
    entry["aggregates"] = {lb: {m: vars(iv) for m, iv in res.items()} for lb, res in aggregates.items()}
    md += ["", f"### Aggregate metrics ({score_label}, 95% bootstrap CIs)", ""]
    md.append(
        _md_table(
            ["Algorithm"] + [AGGREGATE_TITLES[m] for m in metric_names],
            [[lb] + [str(aggregates[lb][m]) for m in metric_names] for lb in labels],
        )
    )
    plot_aggregates(
        aggregates,
        labels,
        colors,
        score_label,
        f"Aggregate metrics: {SOURCE_TITLES[source]}",
        out / f"aggregates_{key}.png",
    )
    md += ["", f"![Aggregate metrics]({f'aggregates_{key}.png'})"]
    if gamma is not None:
        md += ["", f"Optimality gap threshold γ = {gamma:g} (lower is better)."]

    if len(labels) >= 2:
        poi = stats.probability_of_improvement_intervals(
            matrices, _pairs(labels, ppo_baseline), reps=poi_reps, seed=seed
        )
        entry["probability_of_improvement"] = {f"P({x} > {y})": vars(iv) for (x, y), iv in poi.items()}
        md += ["", "### Probability of improvement", ""]
        md.append(_md_table(["Pair", "P(X > Y) [95% CI]"], [[f"P({x} > {y})", str(iv)] for (x, y), iv in poi.items()]))
        plot_poi(poi, f"P(X > Y): {SOURCE_TITLES[source]}", out / f"poi_{key}.png")
        md += ["", f"![Probability of improvement]({f'poi_{key}.png'})"]

    if scheme != "none":
        profiles = stats.performance_profiles(matrices, reps=poi_reps, seed=seed)
        plot_profiles(
            profiles,
            labels,
            colors,
            score_label,
            f"Performance profiles: {SOURCE_TITLES[source]}",
            out / f"profiles_{key}.png",
        )
        md += ["", "### Performance profiles", "", f"![Performance profiles]({f'profiles_{key}.png'})"]
    return md


def _pairs(labels: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    """Pairs (X, Y) for P(X > Y): each algorithm against the baseline if one is given, else all pairs."""
    if baseline is not None:
        return [(lb, baseline) for lb in labels if lb != baseline]
    return [(labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
