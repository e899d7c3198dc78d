"""Plots and a summary table of the CPU-scale phasic runs (see docs/ppg_dcpg.md).

    python docs/results/phasic/make_plots.py /tmp/aclab-phasic-cpu/cartpole /tmp/aclab-phasic-cpu/acrobot

For every sweep folder: learning curves (training-episode returns), value bias at episode starts
(predicted V(s_0) and discounted return, phasic runs) and cosine / sign stiffness of the critic, each the
mean over seeds with a band of +-1 standard deviation; writes PNGs next to this script and prints a
markdown table of final scores (mean of the last 10 logged training returns, final evaluation).
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

OUT = Path(__file__).parent
ORDER = ["ppo", "ppg", "dcpg", "ddcpg"]
COLORS = {"ppo": "tab:gray", "ppg": "tab:green", "dcpg": "tab:blue", "ddcpg": "tab:red"}


def load(folder: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for run in sorted(p for p in folder.iterdir() if (p / "config.json").exists()):
        config = json.loads((run / "config.json").read_text())
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        evals = list(csv.DictReader((run / "evals.csv").open())) if (run / "evals.csv").exists() else []
        runs[config["algo"]].append({"config": config, "rows": rows, "evals": evals,
                                     "summary": json.loads((run / "summary.json").read_text())})
    return runs


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x), np.asarray(y)


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or y.size < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def band(ax, runs: list[dict], key: str, label: str, color: str, k: int = 1, linestyle: str = "-") -> None:
    curves = []
    for run in runs:
        x, y = series(run["rows"], key)
        if x.size:
            curves.append((x[k - 1:] if k > 1 and x.size >= k else x, smooth(y, k)))
    if not curves:
        return
    lo = max(c[0][0] for c in curves)
    hi = min(c[0][-1] for c in curves)
    grid = np.linspace(lo, hi, 100)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean, std = ys.mean(0), ys.std(0)
    ax.plot(grid, mean, color=color, linestyle=linestyle, label=label)
    ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)


def save(fig: Figure, name: str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=90)
    print(f"wrote {OUT / name}")


def plot_folder(folder: Path) -> list[str]:
    runs = load(folder)
    env = next(iter(runs.values()))[0]["config"]["env"]["id"]
    tag = env.split("-")[0].lower()
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for algo in ORDER:
        if algo in runs:
            band(ax, runs[algo], "episode_return", f"{algo} ({len(runs[algo])} seeds)", COLORS[algo], k=5)
    ax.set(xlabel="env steps", ylabel="training episode return", title=f"{env}: mean +- std over seeds")
    ax.legend()
    save(fig, f"learning_{tag}.png")

    phasic = [a for a in ORDER if a in runs and a != "ppo"]
    fig = Figure(figsize=(6 * len(phasic), 4))
    for i, algo in enumerate(phasic):
        ax = fig.add_subplot(1, len(phasic), i + 1)
        band(ax, runs[algo], "value_bias/predicted", "predicted V(s_0)", COLORS[algo])
        band(ax, runs[algo], "value_bias/true", "discounted return G_0", "black", linestyle="--")
        ax.set(xlabel="env steps", ylabel="normalised-reward units", title=f"{algo}: value at episode starts")
        ax.legend()
    save(fig, f"value_bias_{tag}.png")

    fig = Figure(figsize=(12, 4))
    for i, key in enumerate(("stiffness/cosine", "stiffness/sign")):
        ax = fig.add_subplot(1, 2, i + 1)
        for algo in phasic:
            band(ax, runs[algo], key, algo, COLORS[algo])
        ax.set(xlabel="env steps", ylabel=key, title=f"{env}: critic {key.split('/')[1]} stiffness")
        ax.legend()
    save(fig, f"stiffness_{tag}.png")

    lines = [f"| {env} | last-10 training return | final eval (20 ep.) | value bias (last) | cosine stiffness "
             "(mean over training) | sign stiffness (mean) | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for algo in ORDER:
        if algo not in runs:
            continue
        finals, evals, biases, cosines, signs, walls = [], [], [], [], [], []
        for run in runs[algo]:
            _, y = series(run["rows"], "episode_return")
            finals.append(y[-10:].mean())
            test = [float(e["mean_return"]) for e in run["evals"] if e["split"] == "test"]
            evals.append(test[-1] if test else np.nan)
            _, bias = series(run["rows"], "value_bias/bias")
            biases.append(bias[-1] if bias.size else np.nan)
            _, cos = series(run["rows"], "stiffness/cosine")
            cosines.append(cos.mean() if cos.size else np.nan)
            _, sign = series(run["rows"], "stiffness/sign")
            signs.append(sign.mean() if sign.size else np.nan)
            walls.append(run["summary"].get("wall_time_s", np.nan))

        def fmt(values):
            values = np.asarray(values, dtype=float)
            return "n/a" if np.isnan(values).all() else f"{np.nanmean(values):.3g} ± {np.nanstd(values):.2g}"

        lines.append(f"| {algo} | {fmt(finals)} | {fmt(evals)} | {fmt(biases)} | {fmt(cosines)} | {fmt(signs)} | "
                     f"{fmt(walls)} |")
    return lines


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print("\n".join(plot_folder(Path(folder))))
