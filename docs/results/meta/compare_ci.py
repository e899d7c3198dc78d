"""MAML on HalfCheetah-Fwd-Back (maml-halfcheetah-fwd-back-cpu, 20 meta-iterations) with 5 seeds per policy
and the gradient-noise experiment (hypernetwork paper, Figure 5) on every Context-MAML and Hyper-MAML seed's
final checkpoint: data, 95% bootstrap CIs, plots.

Runs (one per command): docs/results/meta/run_maml_fwd_back.sh ROOT, i.e.

    aclab train maml | maml-context | maml-hyper --preset maml-halfcheetah-fwd-back-cpu --total-steps 320000 \
        --seed S --run-dir ROOT/<algo>-sS --set params.eval_every=5
    aclab analyze gradient-noise ROOT/<algo>-sS --updates 8 --episodes 2 --device cpu --out ROOT/noise-<algo>-sS.json

Then:

    .venv/bin/python docs/results/meta/compare_ci.py collect ROOT docs/results/meta
    .venv/bin/python docs/results/meta/compare_ci.py report docs/results/meta

``collect`` writes ``maml_fwd_back_5seeds.csv`` (test-task returns before / after adaptation at every
evaluation) and ``gradient_noise_5seeds.csv`` (the returns of every independently updated policy);
``report`` reads only those files and writes ``summary_5seeds.md``, ``maml_fwd_back_5seeds.png`` and
``gradient_noise_5seeds.png``. Intervals: stratified percentile bootstrap over runs (rliable via
aclab.evaluate.stats) for means and IQMs; for ratios of two policies' mean spreads, a percentile
bootstrap resampling each policy's runs independently (numpy, 5000 draws).
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

ALGOS = {"maml": "Vanilla-MAML", "maml-context": "Context-MAML", "maml-hyper": "Hyper-MAML"}
CURVES_CSV, CURVES_PNG = "maml_fwd_back_5seeds.csv", "maml_fwd_back_5seeds.png"
COLOURS = {"maml": "tab:gray", "maml-context": "tab:blue", "maml-hyper": "tab:red"}


def _finished(run: Path) -> bool:
    """Only runs that reached their total steps (a run stopped early has another status)."""
    summary = run / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def collect(root: Path, out: Path) -> None:
    curves, noise = [], []
    for run in sorted(root.glob("*-s*")):
        if not run.is_dir() or not _finished(run):
            continue
        algo, seed = run.name.rsplit("-s", 1)
        for row in csv.DictReader((run / "metrics.csv").open()):
            if row.get("test/return_pre", "") != "":
                curves.append({"algo": algo, "seed": seed, "step": row["step"],
                               "return_pre": row["test/return_pre"], "return_post": row["test/return_post"]})
    for path in sorted(root.glob("noise-*-s*.json")):
        algo, seed = path.stem[len("noise-"):].rsplit("-s", 1)
        data = json.loads(path.read_text())
        for i, (pre, post) in enumerate(zip(data["return_pre"], data["return_post"])):
            noise.append({"algo": algo, "seed": seed, "update": i, "return_pre": pre, "return_post": post,
                          "checkpoint_pre": data["return_pre_before_update"],
                          "checkpoint_post": data["return_post_before_update"]})
    for name, rows in ((CURVES_CSV, curves), ("gradient_noise_5seeds.csv", noise)):
        with (out / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _ratio_interval(x: np.ndarray, y: np.ndarray, reps: int = 5000, seed: int = 0) -> tuple[float, float, float]:
    """mean(x) / mean(y) with a percentile bootstrap CI (runs of x and y resampled independently)."""
    rng = np.random.default_rng(seed)
    draws = [rng.choice(x, len(x)).mean() / rng.choice(y, len(y)).mean() for _ in range(reps)]
    return float(x.mean() / y.mean()), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def report(out: Path) -> str:
    curves = list(csv.DictReader((out / CURVES_CSV).open()))
    algos = [a for a in ALGOS if any(r["algo"] == a for r in curves)]
    final_step = max(int(r["step"]) for r in curves)
    final = {a: {k: np.array([[float(r[k])] for r in curves if r["algo"] == a and int(r["step"]) == final_step])
                 for k in ("return_pre", "return_post")} for a in algos}
    gain = {a: final[a]["return_post"] - final[a]["return_pre"] for a in algos}
    pre = aggregate_intervals({a: final[a]["return_pre"] for a in algos}, metrics=("mean", "iqm"), reps=5000)
    post = aggregate_intervals({a: final[a]["return_post"] for a in algos}, metrics=("mean", "iqm"), reps=5000)
    gains = aggregate_intervals(gain, metrics=("mean",), reps=5000)
    lines = [f"MAML on HalfCheetah-Fwd-Back, maml-halfcheetah-fwd-back-cpu, final evaluation ({final_step} env steps): "
             "mean return per test episode on the 20 test tasks. Point estimate [95% stratified-bootstrap CI] "
             "across runs.", "",
             "| policy | runs | before adaptation: mean | IQM | after one inner step: mean | IQM | "
             "gain from adaptation |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in algos:
        lines.append(f"| {ALGOS[a]} | {len(final[a]['return_pre'])} | {pre[a]['mean']} | {pre[a]['iqm']} | "
                     f"{post[a]['mean']} | {post[a]['iqm']} | {gains[a]['mean']} |")
    if {"maml-hyper", "maml-context"} <= set(algos):
        pairs = [("maml-hyper", "maml-context")]
        p_pre = probability_of_improvement_intervals({a: final[a]["return_pre"] for a in algos}, pairs, reps=2000)
        p_post = probability_of_improvement_intervals({a: final[a]["return_post"] for a in algos}, pairs, reps=2000)
        lines += ["", f"P(Hyper-MAML > Context-MAML): before adaptation {p_pre[pairs[0]]}, after "
                      f"{p_post[pairs[0]]}."]
    lines += ["", "Per run (seed: before / after):", ""]
    for a in algos:
        cells = ", ".join(f"{x[0]:.2f} / {y[0]:.2f}" for x, y in zip(final[a]["return_pre"], final[a]["return_post"]))
        lines.append(f"- {ALGOS[a]}: {cells}")
    _plot_curves(out, algos, curves)

    noise_path = out / "gradient_noise_5seeds.csv"
    if noise_path.exists():
        noise = list(csv.DictReader(noise_path.open()))
        nalgos = [a for a in algos if any(r["algo"] == a for r in noise)]
        spread = {a: {} for a in nalgos}
        for a in nalgos:
            for key in ("return_pre", "return_post"):
                per_seed = []
                for seed in sorted({r["seed"] for r in noise if r["algo"] == a}, key=int):
                    values = np.array([float(r[key]) for r in noise if r["algo"] == a and r["seed"] == seed])
                    per_seed.append(values.std(ddof=1))
                spread[a][key] = np.array(per_seed)
        n_updates = len([r for r in noise if r["algo"] == nalgos[0] and r["seed"] == noise[0]["seed"]])
        lines += ["", f"Gradient noise (hypernetwork paper, Figure 5): from each run's final checkpoint, {n_updates} "
                      "independent meta-updates (each from a fresh meta-batch), every updated policy evaluated on the "
                      "same test tasks with the same evaluation seed; per run the standard deviation of those returns; "
                      "mean over runs [95% bootstrap CI].", "",
                  "| policy | runs | std before adaptation | std after adaptation |", "| --- | --- | --- | --- |"]
        s_pre = aggregate_intervals({a: spread[a]["return_pre"][:, None] for a in nalgos}, metrics=("mean",), reps=5000)
        s_post = aggregate_intervals({a: spread[a]["return_post"][:, None] for a in nalgos}, metrics=("mean",),
                                     reps=5000)
        for a in nalgos:
            lines.append(f"| {ALGOS[a]} | {len(spread[a]['return_pre'])} | {s_pre[a]['mean']} | {s_post[a]['mean']} |")
        if {"maml-hyper", "maml-context"} <= set(nalgos):
            lines += [""]
            for key, label in (("return_pre", "before adaptation"), ("return_post", "after adaptation")):
                r, lo, hi = _ratio_interval(spread["maml-context"][key], spread["maml-hyper"][key])
                lines.append(f"- Context-MAML / Hyper-MAML spread, {label}: {r:.2f} [{lo:.2f}, {hi:.2f}]")
        amp = aggregate_intervals({a: (spread[a]["return_post"] / spread[a]["return_pre"])[:, None] for a in nalgos},
                                  metrics=("mean",), reps=5000)
        lines += ["", "Spread after / before adaptation per run (what the inner step adds), mean [95% CI]: "
                      + "; ".join(f"{ALGOS[a]} {amp[a]['mean']}" for a in nalgos)]
        lines += ["", "Per run (seed: std before / after):", ""]
        for a in nalgos:
            cells = ", ".join(f"{x:.3f} / {y:.3f}" for x, y in zip(spread[a]["return_pre"], spread[a]["return_post"]))
            lines.append(f"- {ALGOS[a]}: {cells}")
        _plot_noise(out, nalgos, spread)
    table = "\n".join(lines) + "\n"
    (out / "summary_5seeds.md").write_text(table)
    return table


def _plot_curves(out: Path, algos: list[str], curves: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "return_pre", "before adaptation"), (axes[1], "return_post", "after one step")):
        for a in algos:
            seeds = sorted({r["seed"] for r in curves if r["algo"] == a}, key=int)
            steps = sorted({int(r["step"]) for r in curves if r["algo"] == a})
            values = np.full((len(seeds), len(steps)), np.nan)
            for r in curves:
                if r["algo"] == a:
                    values[seeds.index(r["seed"]), steps.index(int(r["step"]))] = float(r[key])
            ax.plot(steps, np.nanmean(values, 0), color=COLOURS[a], label=f"{ALGOS[a]} ({len(seeds)} runs)")
            ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=COLOURS[a], alpha=0.2)
        ax.set_title(f"test tasks, {label}")
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean return (min-max over runs)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / CURVES_PNG, dpi=90)
    plt.close(fig)


def _plot_noise(out: Path, algos: list[str], spread: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=False)
    for ax, key, label in ((axes[0], "return_pre", "before adaptation"), (axes[1], "return_post", "after adaptation")):
        for i, a in enumerate(algos):
            values = spread[a][key]
            ax.scatter(np.full(len(values), i), values, color=COLOURS[a])
            ax.plot([i - 0.2, i + 0.2], [values.mean()] * 2, color=COLOURS[a])
        ax.set_xticks(range(len(algos)), [ALGOS[a] for a in algos], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"std of returns after one meta-update, {label}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gradient_noise_5seeds.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(Path(sys.argv[2]), Path(sys.argv[3]))
    print(report(Path(sys.argv[-1])))
