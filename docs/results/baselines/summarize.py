"""Summary of a CPU-scale baseline sweep (see docs/daac_drac_plr.md).

    python docs/results/baselines/summarize.py /tmp/aclab-baselines-cpu/cartpole

For every algorithm in the sweep folder: the final evaluation return of each seed (``evals.csv``, last row of
the ``test`` split), its mean and IQM over seeds with 95% stratified-bootstrap confidence intervals
(``aclab.evaluate.stats``, rliable), the mean of the last 10 logged training returns and the training speed.
Writes ``<folder name>.csv`` (one row per run) and ``<folder name>.md`` (the table) next to this script,
and ``<folder name>.png`` (training returns, mean over seeds with min-max band).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aclab.evaluate.stats import aggregate_intervals

OUT = Path(__file__).parent


def load(folder: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(p for p in folder.iterdir() if (p / "summary.json").exists()):
        summary = json.loads((run / "summary.json").read_text())
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        evals = [r for r in csv.DictReader((run / "evals.csv").open()) if r["split"] == "test"]
        curve = [(float(r["step"]), float(r["episode_return"])) for r in rows if r.get("episode_return")]
        runs[summary["algo"]].append({
            "seed": summary["seed"], "status": summary["status"], "steps_per_s": summary["steps_per_s"],
            "eval": float(evals[-1]["mean_return"]) if evals else float("nan"),
            "train_last10": float(np.mean([y for _, y in curve[-10:]])) if curve else float("nan"),
            "curve": curve,
        })
    return runs


def main(folder: Path) -> None:
    runs = load(folder)
    name = folder.name
    with open(OUT / f"{name}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["algo", "seed", "status", "eval_test_return", "train_return_last10", "steps_per_s"])
        for algo, items in runs.items():
            for r in items:
                writer.writerow([algo, r["seed"], r["status"], r["eval"], round(r["train_last10"], 3),
                                 r["steps_per_s"]])
    scores = {algo: np.array([[r["eval"]] for r in items]) for algo, items in runs.items()}
    lines = ["| algorithm | seeds | eval return: mean [95% CI] | IQM [95% CI] | train return (last 10) | steps/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    intervals = aggregate_intervals(scores, metrics=("mean", "iqm")) if all(len(s) > 1 for s in scores.values()) \
        else None
    for algo, items in runs.items():
        train = np.mean([r["train_last10"] for r in items])
        speed = np.mean([r["steps_per_s"] for r in items])
        if intervals is not None:
            m, q = intervals[algo]["mean"], intervals[algo]["iqm"]
            cells = f"{m.point:.1f} [{m.lower:.1f}, {m.upper:.1f}] | {q.point:.1f} [{q.lower:.1f}, {q.upper:.1f}]"
        else:
            cells = f"{np.mean(scores[algo]):.1f} | -"
        lines.append(f"| {algo} | {len(items)} | {cells} | {train:.1f} | {speed:.0f} |")
    table = "\n".join(lines)
    header = (f"# Table 5 baselines at CPU scale: {name}\n\nFinal evaluation return per algorithm (mean and IQM over "
              f"seeds, 95% stratified-bootstrap CIs when there are several seeds), from "
              f"`docs/results/baselines/cpu_{name}.toml` via "
              f"`python docs/results/baselines/summarize.py {folder}`; per-run rows in `{name}.csv`. See "
              "[DAAC, IDAAC, UCB-DrAC, PLR](../../daac_drac_plr.md) for what these runs can and cannot show.\n\n"
              f"![training returns]({name}.png)\n\n")
    (OUT / f"{name}.md").write_text(header + table + "\n")
    print(table)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for algo, items in runs.items():
        grid = np.array(sorted({x for r in items for x, _ in r["curve"]}))
        ys = np.array([np.interp(grid, *zip(*r["curve"])) for r in items if r["curve"]])
        ax.plot(grid, ys.mean(0), label=algo)
        ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.15)
    ax.set_xlabel("env steps")
    ax.set_ylabel("training episode return")
    ax.set_title(f"{name}: mean over seeds, band = min-max")
    ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(OUT / f"{name}.png"))


if __name__ == "__main__":
    for path in sys.argv[1:]:
        main(Path(path))
