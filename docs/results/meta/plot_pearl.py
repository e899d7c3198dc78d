"""PEARL vs Hyper-PEARL on 2-D point navigation (CPU scale): test return after adaptation against env
steps, mean over seeds (thick) and every seed (thin), and the first (prior z) episode for reference.

Runs (one at a time, from the repository root; each writes /tmp/meta-compare/pearl-point-nav-cpu/<algo>-s<seed>):

    nice -n 10 .venv/bin/python docs/results/meta/compare.py run --algos pearl pearl-hyper \
        --preset pearl-point-nav-cpu --seeds 1 2 --set torch_threads=1
    .venv/bin/python docs/results/meta/plot_pearl.py      # -> pearl_point_nav.png here, table on stdout
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent
COLOURS = {"pearl": "tab:blue", "pearl-hyper": "tab:red"}
PANELS = (("test/return_final", "test tasks, final episode (posterior z)"),
          ("test/return_first", "test tasks, first episode (prior z)"))


def logged(run_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` at the rows of ``metrics.csv`` where it was logged."""
    steps, values = [], []
    for row in csv.DictReader((run_dir / "metrics.csv").open()):
        if row.get(key) not in (None, ""):
            steps.append(float(row["step"]))
            values.append(float(row[key]))
    return np.array(steps), np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/meta-compare/pearl-point-nav-cpu")
    parser.add_argument("--out", default=str(OUT / "pearl_point_nav.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[Path]] = {}
    for run in sorted(Path(args.root).glob("*-s*")):
        if (run / "metrics.csv").exists():
            runs.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(10, 3.8), sharey=True)
    print("| algo | metric | seed | first logged | final |")
    print("| --- | --- | --- | --- | --- |")
    for ax, (key, title) in zip(axes, PANELS):
        for algo, dirs in runs.items():
            series = [logged(d, key) for d in dirs]
            n = min(len(s) for s, _ in series)
            for d, (steps, values) in zip(dirs, series):
                ax.plot(steps[:n], values[:n], color=COLOURS.get(algo), alpha=0.35, lw=0.8)
                print(f"| {algo} | {key} | {d.name.rsplit('-s', 1)[1]} | {values[0]:.2f} | {values[n - 1]:.2f} |")
            mean = np.mean([v[:n] for _, v in series], axis=0)
            ax.plot(series[0][0][:n], mean, color=COLOURS.get(algo), lw=2.2, label=f"{algo} (mean of {len(dirs)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean return per test episode")
    axes[0].legend(fontsize=8)
    fig.suptitle("PEARL vs Hyper-PEARL, 2-D point navigation (pearl-point-nav-cpu; thin: seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
