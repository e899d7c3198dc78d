"""Learning curves (mean +- standard error over seeds) from aclab run directories.

    python docs/results/dna/plot_curves.py OUT.png --title "CartPole-v1" \
        "PPO=/tmp/runs/cp_ppo_*" "DNA=/tmp/runs/cp_dna_*" [--metric episode_return] [--ylabel ...]

Each ``LABEL=GLOB`` is one curve: the runs matching GLOB, each run's ``metric`` column of metrics.csv
interpolated onto a common step grid (up to the shortest run), then averaged. Rows without the metric
(no episode finished in that iteration) are skipped. ``--hline Y`` draws a dashed reference line.
"""

from __future__ import annotations

import argparse
import csv
import glob
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load_curve(run_dir: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    with open(Path(run_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(metric) and np.isfinite(float(row[metric])):  # B_simple is inf while |G|^2 <= 0
                steps.append(float(row["step"]))
                values.append(float(row[metric]))
    return np.asarray(steps), np.asarray(values)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("curves", nargs="+", help="LABEL=GLOB")
    parser.add_argument("--metric", default="episode_return")
    parser.add_argument("--title", default="")
    parser.add_argument("--ylabel", default=None)
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window over logged rows")
    parser.add_argument("--hline", type=float, default=None)
    parser.add_argument("--logy", action="store_true")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=110)
    for spec in args.curves:
        label, pattern = spec.rsplit("=", 1)
        runs = sorted(glob.glob(pattern))
        curves = [load_curve(r, args.metric) for r in runs]
        curves = [(s, smooth(v, args.smooth)) for s, v in curves if s.size]
        if not curves:
            print(f"no data for {label} ({pattern})")
            continue
        end = min(s[-1] for s, _ in curves)
        start = max(s[0] for s, _ in curves)
        grid = np.linspace(start, end, 200)
        stacked = np.stack([np.interp(grid, s, v) for s, v in curves])
        mean = stacked.mean(0)
        err = stacked.std(0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
        ax.plot(grid, mean, label=f"{label} (n={len(curves)})")
        ax.fill_between(grid, mean - err, mean + err, alpha=0.25)
    if args.hline is not None:
        ax.axhline(args.hline, color="k", linestyle="--", linewidth=0.8)
    if args.logy:
        ax.set_yscale("log")
    ax.set_xlabel("environment steps")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    ax.set_ylabel(args.ylabel or args.metric)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
