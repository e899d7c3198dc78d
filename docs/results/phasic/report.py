"""Every number and figure of docs/ppg_dcpg.md's "What we measured", from the JSON files in data/.

    python docs/results/phasic/report.py            # prints the markdown tables, writes the PNGs here

Per run (data/<task>.json, written by collect.py from the sweep folders):

* final eval: mean return of the final evaluation (20 episodes, sampled actions);
* training return: mean over the training episodes that ended in the last 10% of the steps (each
  iteration's mean weighted by its episode count);
* value bias early / late: mean of the logged ``value_bias/bias`` over the first / last 20% of the steps
  (each logged value is over the last 100 finished episodes, truncated ones bootstrapped at the cut);
* stiffness: mean over training of the logged cosine (paper's quantity) and cosine_grad_v (sign-free).

Intervals: 95% stratified-bootstrap confidence intervals of the mean over seeds and of the probability
of improvement P(X > Y) (:mod:`aclab.evaluate.stats`, rliable; 2000 / 1000 replicates, seed 0), each
P(X > Y) in its own column. A difference is called supported ("differs") only when the interval of
P(X > Y) excludes 0.5; otherwise the cell says "n.s." (no difference shown).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aclab.evaluate.stats import aggregate_intervals, probability_of_improvement_intervals

HERE = Path(__file__).parent
ORDER = ["ppo", "ppg", "dcpg", "ddcpg", "dcpg-f"]
COLORS = {"ppo": "tab:gray", "ppg": "tab:green", "dcpg": "tab:blue", "ddcpg": "tab:red", "dcpg-f": "tab:orange"}


def load(task: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for run in json.loads((HERE / "data" / f"{task}.json").read_text())["runs"]:
        runs.setdefault(run["algo"], []).append(run)
    return {a: sorted(runs[a], key=lambda r: r["seed"]) for a in ORDER if a in runs}


def column(run: dict, series: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    cols = run[series]["columns"]
    rows = [r for r in run[series]["rows"] if r[cols.index(name)] is not None]
    return (np.array([r[0] for r in rows], dtype=float), np.array([r[cols.index(name)] for r in rows], dtype=float))


def window_mean(run: dict, series: str, name: str, lo: float, hi: float, weight: str | None = None) -> float:
    steps, values = column(run, series, name)
    keep = (steps > lo * run["steps"]) & (steps <= hi * run["steps"])
    if not keep.any():
        return float("nan")
    if weight is None:
        return float(values[keep].mean())
    _, weights = column(run, series, weight)
    return float(np.average(values[keep], weights=weights[keep]))


def per_run_scores(run: dict) -> dict[str, float]:
    out = {"final eval": float(np.mean(run["final_eval"]["test"]["returns"])),
           "training return": window_mean(run, "train", "episode_return", 0.9, 1.0, weight="episodes")}
    if run["value_bias"]["rows"]:
        out["value bias, first 20%"] = window_mean(run, "value_bias", "value_bias/bias", 0.0, 0.2)
        out["value bias, last 20%"] = window_mean(run, "value_bias", "value_bias/bias", 0.8, 1.0)
    if run["stiffness"]["rows"]:
        out["cosine stiffness (paper)"] = window_mean(run, "stiffness", "stiffness/cosine", 0.0, 1.0)
        out["cosine stiffness (grad V)"] = window_mean(run, "stiffness", "stiffness/cosine_grad_v", 0.0, 1.0)
        out["sign stiffness (paper)"] = window_mean(run, "stiffness", "stiffness/sign", 0.0, 1.0)
        out["sign stiffness (grad V)"] = window_mean(run, "stiffness", "stiffness/sign_grad_v", 0.0, 1.0)
    return out


def table(task: str, runs: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> list[str]:
    scores = {algo: [per_run_scores(r) for r in rs] for algo, rs in runs.items()}
    metrics = [m for m in scores[next(iter(scores))][0]]
    for algo in scores:
        metrics += [m for m in scores[algo][0] if m not in metrics]
    env = runs[next(iter(runs))][0]["env"]
    header = list(runs) + [f"P({x} > {y})" for x, y in pairs]
    lines = [f"**{env}** ({', '.join(f'{a}: {len(r)} seeds' for a, r in runs.items())}; mean over seeds "
             "[95% bootstrap CI]; P(X > Y) with its interval)", "", "| metric | " + " | ".join(header) + " |",
             "|---|" + "---|" * len(header)]
    for metric in metrics:
        cells = []
        matrices = {a: np.array([[s[metric]] for s in scores[a]]) for a in scores if metric in scores[a][0]}
        intervals = aggregate_intervals(matrices, metrics=["mean"]) if matrices else {}
        for algo in runs:
            cells.append(str(intervals[algo]["mean"]) if algo in intervals else "n/a")
        for x, y in pairs:
            cells.append(poi_cell(matrices, x, y))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    wall = {a: float(np.mean([r["wall_time_s"] for r in rs])) for a, rs in runs.items()}
    lines.append("| wall time per run (s, shared machine) | " + " | ".join(f"{wall[a]:.0f}" for a in runs)
                 + " |" * (len(pairs) + 1))
    return lines


def poi_cell(matrices: dict[str, np.ndarray], x: str, y: str) -> str:
    """``P(x > y) [lo, hi] (differs | n.s.)``; "n/a" when either has no score for the metric."""
    if x not in matrices or y not in matrices:
        return "n/a"
    poi = probability_of_improvement_intervals(matrices, [(x, y)])[(x, y)]
    return f"{poi} ({'differs' if poi.lower > 0.5 or poi.upper < 0.5 else 'n.s.'})"


def band(ax, runs: list[dict], series: str, name: str, label: str, color: str, linestyle: str = "-") -> None:
    curves = [column(r, series, name) for r in runs]
    curves = [c for c in curves if c[0].size > 1]
    if not curves:
        return
    grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), 60)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # [seeds, points]
    intervals = aggregate_intervals({str(i): ys[:, i:i + 1] for i in range(grid.size)}, metrics=["mean"], reps=500)
    lower = [intervals[str(i)]["mean"].lower for i in range(grid.size)]
    upper = [intervals[str(i)]["mean"].upper for i in range(grid.size)]
    ax.plot(grid, ys.mean(0), color=color, linestyle=linestyle, label=label)
    ax.fill_between(grid, lower, upper, color=color, alpha=0.15)


def save(fig: Figure, name: str) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(HERE / name, dpi=80)


def plots(task: str, runs: dict[str, list[dict]]) -> None:
    env = runs[next(iter(runs))][0]["env"]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for algo, rs in runs.items():
        band(ax, rs, "train", "episode_return", f"{algo} ({len(rs)} seeds)", COLORS[algo])
    ax.set(xlabel="env steps", ylabel="training episode return", title=f"{env}: mean, 95% bootstrap CI")
    ax.legend()
    save(fig, f"learning_{task}.png")
    phasic = [a for a in runs if runs[a][0]["value_bias"]["rows"]]
    fig = Figure(figsize=(4.5 * len(phasic), 3.6))
    for i, algo in enumerate(phasic):
        ax = fig.add_subplot(1, len(phasic), i + 1)
        band(ax, runs[algo], "value_bias", "value_bias/predicted", "predicted V(s_0)", COLORS[algo])
        band(ax, runs[algo], "value_bias", "value_bias/true", "discounted return", "black", linestyle="--")
        ax.set(xlabel="env steps", ylabel="normalised-reward units", title=f"{algo}: value at episode starts")
        ax.legend()
    save(fig, f"value_bias_{task}.png")
    fig = Figure(figsize=(10, 3.6))
    for i, (name, title) in enumerate((("stiffness/cosine", "cosine, loss gradients (paper)"),
                                       ("stiffness/cosine_grad_v", "cosine, grad V (sign-free)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for algo in phasic:
            band(ax, runs[algo], "stiffness", name, algo, COLORS[algo])
        ax.set(xlabel="env steps", ylabel="stiffness", title=f"{env}: {title}")
        ax.legend()
    save(fig, f"stiffness_{task}.png")


def procgen(task: str) -> list[str]:
    runs = load(task)
    lines = [f"**{task}**: per algorithm, mean over seeds [95% bootstrap CI]", "",
             "| algo | seeds | train-levels return | unseen-levels return | P(train > unseen) | OOD actions, raw 15 "
             "| OOD actions, distinct |",
             "|---|---|---|---|---|---|---|"]
    for algo, rs in runs.items():
        cols = {"train": [], "unseen": [], "raw": [], "distinct": []}
        for r in rs:
            cols["train"].append([np.mean(r["final_eval"]["train"]["returns"])])
            cols["unseen"].append([np.mean(r["final_eval"]["test"]["returns"])])
            if "analysis" in r:
                cols["raw"].append([r["analysis"]["mean"]])
                cols["distinct"].append([r["analysis"]["mean_distinct"]])
        ints = aggregate_intervals({k: np.array(v) for k, v in cols.items() if v}, metrics=["mean"])
        cells = [str(ints[k]["mean"]) if k in ints else "n/a" for k in ("train", "unseen", "raw", "distinct")]
        cells.insert(2, poi_cell({k: np.array(cols[k]) for k in ("train", "unseen") if cols[k]}, "train", "unseen"))
        lines.append(f"| {algo} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    pairs = [("dcpg", "ppg"), ("ddcpg", "dcpg")]
    for task in ("cartpole", "acrobot"):
        if (HERE / "data" / f"{task}.json").exists():
            runs = load(task)
            print("\n".join(table(task, runs, pairs)) + "\n")
            plots(task, runs)
    if (HERE / "data" / "procgen_bigfish.json").exists():
        print("\n".join(procgen("procgen_bigfish")))
