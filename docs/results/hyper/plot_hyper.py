"""The TD3 critic comparison (MLP vs SA-Hyper with the paper's init vs SA-Hyper with the authors' init)
with gradient accuracy: data, 95% bootstrap CIs and plots. See docs/hypernetworks.md for the runs.

    .venv/bin/python docs/results/hyper/plot_hyper.py collect RUNS_ROOT docs/results/hyper
    .venv/bin/python docs/results/hyper/plot_hyper.py report docs/results/hyper

``collect`` reads run directories ``<root>/<arm>-s<seed>`` (evals.csv, metrics.csv with ``grad_cs/*``)
into ``evals.csv`` and ``grad_cs.csv`` here; ``report`` computes the statistics from those files only
(``summary.md``, ``learning_curves.png``, ``cosine_similarity.png``). Statistics: per run the final
evaluation return and the mean over its measurements of the mean cosine similarity and of the fractions
of states above tau = 0.25 and 0.75 (the paper's Figure 3b-c); per arm the mean and IQM across runs with
stratified-bootstrap 95% CIs (rliable via aclab.evaluate.stats), and P(arm > MLP) with its CI.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aclab.evaluate.stats import aggregate_intervals, probability_of_improvement_intervals  # noqa: E402

ARMS = {"mlp": "MLP-Standard", "sa_hyper": "SA-Hyper, paper init (calibrated)",
        "sa_hyper_authors": "SA-Hyper, authors' init", "as_hyper": "AS-Hyper"}
COLORS = {"mlp": "tab:blue", "sa_hyper": "tab:red", "sa_hyper_authors": "tab:orange", "as_hyper": "tab:green"}
THRESHOLDS = [0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
CS_COLUMNS = ["grad_cs/mean"] + [f"grad_cs/frac_gt_{t:g}" for t in THRESHOLDS]


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _finished(run: Path) -> bool:
    """Only runs that reached their total steps (a run stopped early has another status)."""
    summary = run / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def collect(root: Path, out: Path) -> None:
    evals, grads = [], []
    for run_dir in sorted(root.glob("*-s*")):
        if not _finished(run_dir):
            continue
        arm, seed = run_dir.name.rsplit("-s", 1)
        seen = set()
        for r in _read(run_dir / "evals.csv"):
            if r["split"] == "test" and r["step"] not in seen:  # older versions logged the final evaluation twice
                seen.add(r["step"])
                evals.append({"arm": arm, "seed": seed, "step": r["step"], "mean_return": r["mean_return"]})
        for r in _read(run_dir / "metrics.csv"):
            if r.get("grad_cs/mean", "") != "":
                grads.append({"arm": arm, "seed": seed, "step": r["step"], **{c: r.get(c, "") for c in CS_COLUMNS}})
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("evals.csv", evals), ("grad_cs.csv", grads)):
        with (out / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _float(x: str) -> float:
    return float(x) if x not in ("", None) else np.nan


def report(out: Path) -> str:
    evals, grads = _read(out / "evals.csv"), _read(out / "grad_cs.csv")
    arms = [a for a in ARMS if any(r["arm"] == a for r in evals)]
    final_step = max(int(r["step"]) for r in evals)
    per_run: dict[str, dict[str, dict[str, float]]] = {a: {} for a in arms}
    for arm in arms:
        for seed in sorted({r["seed"] for r in evals if r["arm"] == arm}, key=int):
            run_evals = [r for r in evals if r["arm"] == arm and r["seed"] == seed]
            run_grads = [r for r in grads if r["arm"] == arm and r["seed"] == seed]
            final = [float(r["mean_return"]) for r in run_evals if int(r["step"]) == final_step]
            per_run[arm][seed] = {
                "final_return": final[0] if final else np.nan,
                "cs_mean": np.nanmean([_float(r["grad_cs/mean"]) for r in run_grads]),
                "frac_0.25": np.nanmean([_float(r["grad_cs/frac_gt_0.25"]) for r in run_grads]),
                "frac_0.75": np.nanmean([_float(r["grad_cs/frac_gt_0.75"]) for r in run_grads]),
            }
    grad_steps = ", ".join(f"{s:,}" for s in sorted({int(r["step"]) for r in grads}))
    lines = [f"Final evaluation at {final_step} steps (mean action, 5 episodes per run); gradient accuracy = mean "
             f"over the run's measurements (at {grad_steps} steps, 15 states x 15 actions). Point estimate "
             "[95% stratified-bootstrap CI] across runs.", "",
             "| arm | runs | final return: mean | final return: IQM | mean CS | fraction CS > 0.25 | "
             "fraction CS > 0.75 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    scores: dict[str, dict[str, np.ndarray]] = {}
    for key in ("final_return", "cs_mean", "frac_0.25", "frac_0.75"):
        scores[key] = {arm: np.array([[v[key]] for v in per_run[arm].values()]) for arm in arms}
    intervals = {key: aggregate_intervals(scores[key], metrics=("mean", "iqm"), reps=5000, seed=0)
                 for key in scores}
    for arm in arms:
        lines.append(f"| {ARMS[arm]} | {len(per_run[arm])} | {intervals['final_return'][arm]['mean']} | "
                     f"{intervals['final_return'][arm]['iqm']} | {intervals['cs_mean'][arm]['mean']} | "
                     f"{intervals['frac_0.25'][arm]['mean']} | {intervals['frac_0.75'][arm]['mean']} |")
    if "mlp" in arms:
        lines += ["", "Probability of improvement over MLP-Standard, P(arm > MLP) [95% CI]:", "",
                  "| arm | final return | mean CS |", "| --- | --- | --- |"]
        for arm in arms:
            if arm == "mlp":
                continue
            row = []
            for key in ("final_return", "cs_mean"):
                poi = probability_of_improvement_intervals(scores[key], [(arm, "mlp")], reps=2000, seed=0)
                row.append(str(poi[(arm, "mlp")]))
            lines.append(f"| {ARMS[arm]} | {row[0]} | {row[1]} |")
    lines += ["", "Per run (seed: final return, mean CS):", ""]
    for arm in arms:
        cells = ", ".join(f"s{seed}: {v['final_return']:.0f} / {v['cs_mean']:.3f}" for seed, v in per_run[arm].items())
        lines.append(f"- {ARMS[arm]}: {cells}")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    _plots(out, arms, evals, grads)
    return table


def _series(rows: list[dict], arm: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values [seeds, steps] of one column (NaN where a run has none)."""
    runs = sorted({r["seed"] for r in rows if r["arm"] == arm}, key=int)
    steps = sorted({int(r["step"]) for r in rows if r["arm"] == arm})
    values = np.full((len(runs), len(steps)), np.nan)
    for r in rows:
        if r["arm"] == arm:
            values[runs.index(r["seed"]), steps.index(int(r["step"]))] = _float(r[column])
    return np.array(steps), values


def _plots(out: Path, arms: list[str], evals: list[dict], grads: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in arms:
        steps, values = _series(evals, arm, "mean_return")
        ax.plot(steps, np.nanmean(values, 0), marker="o", color=COLORS[arm], label=f"{ARMS[arm]} ({len(values)} runs)")
        ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=COLORS[arm], alpha=0.15)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (mean action)")
    ax.set_title("TD3 on Hopper-v4 (mean, min-max over runs)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arm in arms:
        color, label = COLORS[arm], ARMS[arm]
        pooled = [np.nanmean([_float(r[f"grad_cs/frac_gt_{t:g}"]) for r in grads if r["arm"] == arm])
                  for t in THRESHOLDS]
        axes[0].plot(THRESHOLDS, pooled, marker="o", color=color, label=label)
        for ax, key in ((axes[1], "grad_cs/frac_gt_0.25"), (axes[2], "grad_cs/mean")):
            steps, values = _series(grads, arm, key)
            ax.plot(steps, np.nanmean(values, 0), marker="o", color=color, label=label)
            ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=color, alpha=0.15)
    axes[0].set_xlabel("threshold tau")
    axes[0].set_ylabel("fraction of states with CS > tau")
    axes[0].set_title("(a) all measurements pooled")
    axes[1].set_xlabel("env steps")
    axes[1].set_ylabel("fraction of states with CS > 0.25")
    axes[1].set_title("(b) tau = 0.25 over training")
    axes[2].set_xlabel("env steps")
    axes[2].set_ylabel("mean cosine similarity")
    axes[2].set_title("(c) mean CS over training")
    axes[2].axhline(0.0, color="gray", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Gradient accuracy: cos(true grad_a Q, critic grad_a Q), 15 states x 15 actions per point")
    fig.tight_layout()
    fig.savefig(out / "cosine_similarity.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(Path(sys.argv[2]), Path(sys.argv[3]))
    print(report(Path(sys.argv[-1])))
