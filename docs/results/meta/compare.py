"""CPU-scale meta-RL comparisons (docs/meta_rl.md): Vanilla vs Context vs Hyper MAML and PEARL vs
Hyper-PEARL on 2-D point navigation, the gradient-noise experiment (hypernetwork paper, Figure 5), and the plots.

Run from the repository root:

    .venv/bin/python docs/results/meta/compare.py run --algos maml maml-context maml-hyper \
        --preset maml-point-nav-cpu --seeds 1 2 3
    .venv/bin/python docs/results/meta/compare.py run --algos pearl pearl-hyper --preset pearl-point-nav-cpu \
        --seeds 1 2 3
    .venv/bin/python docs/results/meta/compare.py run --algos maml-hyper maml-context maml \
        --preset maml-halfcheetah-fwd-back-cpu --seeds 1
    .venv/bin/python docs/results/meta/compare.py noise --runs /tmp/meta-compare/maml-point-nav-cpu/maml-s1 \
        /tmp/meta-compare/maml-point-nav-cpu/maml-context-s1 /tmp/meta-compare/maml-point-nav-cpu/maml-hyper-s1 \
        --updates 20
    .venv/bin/python docs/results/meta/compare.py report     # MAML PNGs, gradient noise, summary.md here
    .venv/bin/python docs/results/meta/plot_pearl.py         # the PEARL plot and table (its own script)

Runs go to /tmp/meta-compare/<preset>/<algo>-s<seed> (``--root``); finished runs are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent
ROOT = Path("/tmp/meta-compare")
COLOURS = {"maml": "tab:gray", "maml-context": "tab:blue", "maml-hyper": "tab:red", "pearl": "tab:blue",
           "pearl-hyper": "tab:red"}


def cmd_run(args) -> None:
    from aclab.train import make_config, train

    for seed in args.seeds:
        for algo in args.algos:
            run_dir = Path(args.root) / args.preset / f"{algo}-s{seed}"
            summary = run_dir / "summary.json"
            if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
                continue
            config = make_config(algo, preset=args.preset, overrides=["progress=false", f"seed={seed}", *args.set])
            result = train(config, run_dir, overwrite=True)
            print(f"{args.preset} {algo} seed {seed}: {result['status']} wall={result['wall_time_s']:.0f}s", flush=True)


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(float(value) if value not in ("", None) else np.nan)
    return {k: np.array(v) for k, v in columns.items()}


def runs_by_algo(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for run in sorted(folder.glob("*-s*")):
        if (run / "metrics.csv").exists():
            found.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
    return found


def curve(runs: list[Path], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values ``[seeds, points]`` of ``key`` at the rows where it was logged (common steps)."""
    series = []
    for run in runs:
        m = read_metrics(run)
        ok = ~np.isnan(m[key])
        series.append((m["step"][ok], m[key][ok]))
    n = min(len(s[0]) for s in series)
    return series[0][0][:n], np.stack([s[1][:n] for s in series])


def plot_panels(folder: Path, panels: list[tuple[str, str]], title: str, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = runs_by_algo(folder)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), sharey=True)
    lines = []
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        for algo, runs in groups.items():
            steps, values = curve(runs, key)
            mean = values.mean(0)
            ax.plot(steps, mean, color=COLOURS.get(algo), label=f"{algo} ({len(runs)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), color=COLOURS.get(algo), alpha=0.2)
            final = values[:, -1]
            lines.append(f"| {title} | {algo} | {label} | {final.mean():.2f} | "
                         f"{' / '.join(f'{v:.2f}' for v in final)} |")
        ax.set_title(label)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("mean return")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return lines


def cmd_noise(args) -> None:
    """``aclab analyze gradient-noise`` on each run (the same function), collected into gradient_noise.json."""
    from aclab.analyze import run_gradient_noise

    results = {}
    for run_dir in args.runs:
        result = run_gradient_noise(run_dir, updates=args.updates, episodes=args.eval_episodes, device="cpu")
        results[Path(run_dir).name] = result
        print(f"{run_dir}: post-update returns mean {result['return_post_mean']:.2f} "
              f"std {result['return_post_std']:.2f}", flush=True)
    (OUT / "gradient_noise.json").write_text(json.dumps(results, indent=1))


def plot_noise(out: Path) -> list[str]:
    """Returns of the independently updated policies minus their mean (the spread is the point: the
    runs sit at different return levels), one box per run, pre- and post-adaptation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((OUT / "gradient_noise.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    lines = []
    for ax, key, label in ((axes[0], "return_pre", "pre-adaptation"), (axes[1], "return_post", "post-adaptation")):
        names = list(data)
        values = [np.array(data[n][key]) for n in names]
        centred = [v - v.mean() for v in values]
        ax.boxplot(centred, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [f"{n}\nstd {v.std():.2f}" for n, v in zip(names, values)],
                      fontsize=8)
        for i, n in enumerate(names):
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(values[i]))
            ax.scatter(np.full(len(values[i]), i + 1) + jitter, centred[i], s=8, alpha=0.5)
            lines.append(f"| {n} | {label} | {values[i].mean():.2f} | {values[i].std():.2f} | "
                         f"{float(data[n][key + '_before_update']):.2f} | {len(values[i])} |")
        ax.set_title(f"{label}: return after one meta-update, minus the mean", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return - mean over updates")
    fig.suptitle(f"Spread of {len(values[0])} independent meta-updates from the same checkpoint "
                 "(hypernetwork paper, Fig. 5)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return lines


def cmd_report(args) -> None:
    lines = ["| experiment | algo | metric | final mean | per seed |", "| --- | --- | --- | --- | --- |"]
    maml = Path(args.root) / "maml-point-nav-cpu"
    if maml.exists():
        lines += plot_panels(maml, [("test/return_pre", "test tasks, pre-adaptation"),
                                    ("test/return_post", "test tasks, post-adaptation")],
                             "MAML on 2-D navigation (CPU scale)", OUT / "maml_point_nav.png")
    cheetah = Path(args.root) / "maml-halfcheetah-fwd-back-cpu"
    if cheetah.exists():
        lines += plot_panels(cheetah, [("test/return_pre", "test tasks, pre-adaptation"),
                                       ("test/return_post", "test tasks, post-adaptation")],
                             "MAML on HalfCheetah-Fwd-Back (CPU scale)", OUT / "maml_halfcheetah_fwd_back.png")
    if (OUT / "gradient_noise.json").exists():
        lines += ["", "| run | returns | mean | std | before the update | updates |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += plot_noise(OUT / "gradient_noise.png")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--algos", nargs="+", required=True)
    r.add_argument("--preset", required=True)
    r.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    r.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE overrides")
    r.add_argument("--root", default=str(ROOT))
    n = sub.add_parser("noise")
    n.add_argument("--runs", nargs="+", type=Path, required=True)
    n.add_argument("--updates", type=int, default=20)
    n.add_argument("--eval-episodes", type=int, default=None, help="per test task (default: the run's setting)")
    p = sub.add_parser("report")
    p.add_argument("--root", default=str(ROOT))
    args = parser.parse_args()
    {"run": cmd_run, "noise": cmd_noise, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
