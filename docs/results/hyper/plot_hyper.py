"""Plots and a summary table for the TD3 critic comparison (MLP vs SA-Hyper vs AS-Hyper) with
gradient-accuracy curves; see docs/hypernetworks.md for the commands that made the runs.

    .venv/bin/python docs/results/hyper/plot_hyper.py /tmp/hyper_exp docs/results/hyper

Expects run directories ``<root>/<critic>-s<seed>`` (metrics.csv with ``grad_cs/*`` columns and
evals.csv). Writes ``learning_curves.png``, ``cosine_similarity.png`` and ``summary.md``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CRITICS = {"mlp": "MLP-Standard", "sa_hyper": "SA-Hyper", "as_hyper": "AS-Hyper"}
COLORS = {"mlp": "tab:blue", "sa_hyper": "tab:red", "as_hyper": "tab:green"}
THRESHOLDS = [round(0.1 * k, 1) for k in range(10)]


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def load(root: Path) -> dict[str, list[dict]]:
    """critic -> list of runs: {"seed", "eval": (steps, returns), "cs": (steps, {column: values})}."""
    runs: dict[str, list[dict]] = {c: [] for c in CRITICS}
    for run_dir in sorted(root.glob("*-s*")):
        if not run_dir.is_dir():
            continue
        critic, seed = run_dir.name.rsplit("-s", 1)
        if critic not in runs:
            continue
        evals = [r for r in _read(run_dir / "evals.csv") if r["split"] == "test"]
        metrics = [r for r in _read(run_dir / "metrics.csv") if r.get("grad_cs/mean", "") != ""]
        cs_columns = ["grad_cs/mean"] + [f"grad_cs/frac_gt_{t:g}" for t in THRESHOLDS]
        runs[critic].append({
            "seed": int(seed),
            "eval": (np.array([int(r["step"]) for r in evals]), np.array([float(r["mean_return"]) for r in evals])),
            "cs": (np.array([int(r["step"]) for r in metrics]),
                   {c: np.array([float(r[c]) if r[c] != "" else np.nan for r in metrics]) for c in cs_columns}),
        })
    return runs


def _aligned(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """All steps any run logged and the values [runs, steps], NaN where a run has no value
    (``key`` = "eval" or a ``grad_cs/*`` column)."""
    series = [r["eval"] if key == "eval" else (r["cs"][0], r["cs"][1][key]) for r in runs]
    steps = sorted(set().union(*[set(s.tolist()) for s, _ in series])) if series else []
    values = np.full((len(series), len(steps)), np.nan)
    for i, (s, v) in enumerate(series):
        for j, t in enumerate(steps):
            if t in s:
                values[i, j] = v[list(s).index(t)]
    return np.array(steps), values


def plot(root: Path, out: Path) -> str:
    runs = {c: r for c, r in load(root).items() if r}
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for critic, rs in runs.items():
        steps, values = _aligned(rs, "eval")
        if not len(steps):
            continue
        ax.plot(steps, np.nanmean(values, 0), color=COLORS[critic], label=f"{CRITICS[critic]} ({len(rs)} seeds)")
        ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=COLORS[critic], alpha=0.15)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (mean action)")
    ax.set_title("TD3 on Hopper-v4: critic models (mean, min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for critic, rs in runs.items():
        color, label = COLORS[critic], CRITICS[critic]
        # (a) fraction of states above each threshold, pooled over all measurements and seeds
        pooled = np.array([np.nanmean(np.concatenate([r["cs"][1][f"grad_cs/frac_gt_{t:g}"] for r in rs]))
                           for t in THRESHOLDS])
        axes[0].plot(THRESHOLDS, pooled, marker="o", color=color, label=label)
        # (b) fraction above 0.25 over training; (c) mean cosine over training
        for ax, key in ((axes[1], "grad_cs/frac_gt_0.2"), (axes[2], "grad_cs/mean")):
            steps, values = _aligned(rs, key)
            if len(steps):
                ax.plot(steps, np.nanmean(values, 0), marker="o", color=color, label=label)
                ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=color, alpha=0.15)
    axes[0].set_xlabel("threshold tau")
    axes[0].set_ylabel("fraction of states with CS > tau")
    axes[0].set_title("(a) all measurements pooled")
    axes[1].set_xlabel("env steps")
    axes[1].set_ylabel("fraction of states with CS > 0.2")
    axes[1].set_title("(b) over training")
    axes[2].set_xlabel("env steps")
    axes[2].set_ylabel("mean cosine similarity")
    axes[2].set_title("(c) mean CS over training")
    axes[2].axhline(0.0, color="gray", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("Gradient accuracy: cos(true grad_a Q, critic grad_a Q), 15 states x 15 actions per point")
    fig.tight_layout()
    fig.savefig(out / "cosine_similarity.png", dpi=110)
    plt.close(fig)

    lines = ["| critic | seeds | final eval return (mean +- std over seeds) | mean CS (all measurements) |"
             " fraction CS > 0 | fraction CS > 0.5 |", "| --- | --- | --- | --- | --- | --- |"]
    common_last = min(int(r["eval"][0].max()) for rs in runs.values() for r in rs if len(r["eval"][0]))
    for critic, rs in runs.items():
        finals = np.array([r["eval"][1][list(r["eval"][0]).index(common_last)] for r in rs
                           if common_last in r["eval"][0]])
        cs = np.concatenate([r["cs"][1]["grad_cs/mean"] for r in rs])
        f0 = np.concatenate([r["cs"][1]["grad_cs/frac_gt_0"] for r in rs])
        f5 = np.concatenate([r["cs"][1]["grad_cs/frac_gt_0.5"] for r in rs])
        lines.append(f"| {CRITICS[critic]} | {len(rs)} | {finals.mean():.0f} +- {finals.std():.0f} "
                     f"(at {common_last} steps; {', '.join(f'{x:.0f}' for x in finals)}) | {np.nanmean(cs):.3f} "
                     f"({len(cs)} measurements) | {np.nanmean(f0):.2f} | {np.nanmean(f5):.2f} |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    return table


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]), Path(sys.argv[2])))
