"""IMPALA vs STAC vs STACX at CPU scale, Figure 5-style metaparameter plots, and the cost of a learner update.

Run from the repository root (see docs/impala_stac.md for the numbers these produced):

    .venv/bin/python docs/results/stac/compare.py run --env CartPole-v1 --steps 200000 --seeds 1 2 3
    .venv/bin/python docs/results/stac/compare.py run --env mujoco:InvertedPendulum-v4 --family control-cpu \
        --steps 200000 --seeds 1 2 3
    .venv/bin/python docs/results/stac/compare.py report    # PNGs + summary.md in docs/results/stac/
    .venv/bin/python docs/results/stac/compare.py bench     # ms per learner update (IMPALA / STAC / STACX)

Runs go to /tmp/stac-compare/<env>/<algo>-s<seed> (``--root`` to change); finished runs are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

ALGOS = ("impala", "stac", "stacx")
OUT = Path(__file__).resolve().parent
COLOURS = {"impala": "tab:green", "stac": "tab:blue", "stacx": "tab:purple"}


def env_tag(env_id: str) -> str:
    return env_id.replace(":", "-").replace("/", "-")


def cmd_run(args) -> None:
    from aclab.train import make_config, train

    for seed in args.seeds:
        for algo in args.algos:
            run_dir = Path(args.root) / env_tag(args.env) / f"{algo}-s{seed}"
            summary = run_dir / "summary.json"
            if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
                continue
            preset = f"{algo}-{args.family}" if args.family else None
            config = make_config(
                algo,
                args.env,
                preset=preset,
                overrides=[
                    "progress=false",
                    f"seed={seed}",
                    f"total_steps={args.steps}",
                    "eval.episodes=10",
                    "checkpoint_every_iterations=0",
                    *args.set,
                ],
            )
            result = train(config, run_dir, overwrite=True)
            print(
                f"{args.env} {algo} seed {seed}: final_return={result['final_return']:.1f} "
                f"eval={result.get('eval_test_return')} wall={result['wall_time_s']:.0f}s",
                flush=True,
            )


def _curve(run_dir: Path, bin_steps: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("episode_return")]
    steps = np.array([float(r["step"]) for r in rows])
    returns = np.array([float(r["episode_return"]) for r in rows])
    edges = np.arange(0, steps.max() + bin_steps, bin_steps)
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (steps > lo) & (steps <= hi)
        if inside.any():
            centres.append(hi)
            means.append(returns[inside].mean())
    return np.array(centres), np.array(means)


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aclab.algos.stac import plot_metaparameters

    lines = [
        "| env | algo | seeds | final return (last 100 episodes), mean +- std | eval return (10 episodes) | "
        "wall time per run (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for env_dir in sorted(Path(args.root).iterdir()):
        if not env_dir.is_dir():
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for algo in ALGOS:
            runs = sorted(d for d in env_dir.glob(f"{algo}-s*") if (d / "summary.json").exists())
            summaries = [json.loads((d / "summary.json").read_text()) for d in runs]
            runs = [d for d, s in zip(runs, summaries) if s["status"] == "finished"]
            summaries = [s for s in summaries if s["status"] == "finished"]
            if not runs:
                continue
            finals = np.array([s["final_return"] for s in summaries], dtype=float)
            evals = np.array([s.get("eval_test_return", np.nan) for s in summaries], dtype=float)
            walls = np.array([s["wall_time_s"] for s in summaries], dtype=float)
            lines.append(
                f"| {env_dir.name} | {algo} | {len(runs)} | {finals.mean():.1f} +- {finals.std():.1f} "
                f"({', '.join(f'{f:.0f}' for f in finals)}) | {np.nanmean(evals):.1f} | {walls.mean():.0f} |"
            )
            curves = [_curve(d, args.bin_steps) for d in runs]
            length = min(len(c[0]) for c in curves)
            x = curves[0][0][:length]
            ys = np.stack([c[1][:length] for c in curves])
            ax.plot(x, ys.mean(0), color=COLOURS[algo], label=f"{algo} ({len(runs)} seeds)")
            ax.fill_between(x, ys.min(0), ys.max(0), color=COLOURS[algo], alpha=0.15)
            if algo != "impala":
                plot_metaparameters(
                    runs,
                    OUT / f"{env_dir.name}_meta_{algo}.png",
                    title=f"{algo.upper()} metaparameters, {env_dir.name} ({len(runs)} seeds)",
                )
        ax.set_xlabel("env steps")
        ax.set_ylabel("episode return (training)")
        ax.set_title(env_dir.name, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / f"{env_dir.name}_curves.png", dpi=90)
        plt.close(fig)
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _bench_one(algo: str, env_id: str, preset: str, overrides: list[str], repeats: int) -> float:
    import torch

    from aclab.algos.impala import batch_from_chunk
    from aclab.envs import build_envs
    from aclab.registry import build
    from aclab.train import make_config

    config = make_config(algo, env_id, preset=preset, overrides=["progress=false", *overrides])
    envs = build_envs(config)
    envs.reset(seed=0)
    agent = build(config, envs.spec, torch.device("cpu"))
    chunk = agent.next_chunk(envs)
    batch = batch_from_chunk(chunk, torch.device("cpu"))
    agent.learner_step(batch, 1e-4)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        agent.learner_step(batch, 1e-4)
    envs.close()
    return (time.perf_counter() - start) / repeats


def cmd_bench(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    settings = [
        ("CartPole-v1, classic CPU preset: m=8, n=20, MLP (64, 64)", "CartPole-v1", "classic", [], 50),
        (
            "dmc:walker-walk, Table 2-3 control: m=24, n=40, MLP (256, 256) + LSTM 256, heads 256",
            "dmc:walker-walk",
            "mujoco",
            [],
            5,
        ),
        (
            "atari:Pong, Table 2-3 Atari network (ResNet 16-32-32, heads 256), m=4 (not 32), n=20",
            "atari:Pong",
            "atari",
            ["env.num_envs=4"],
            3,
        ),
    ]
    lines = [
        f"torch threads: {args.threads}",
        "",
        "| setting | IMPALA ms/update | STAC ms/update | STACX ms/update | STAC / IMPALA | STACX / IMPALA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, env_id, family, extra, repeats in settings:
        times = {algo: _bench_one(algo, env_id, f"{algo}-{family}", extra, repeats) for algo in ALGOS}
        lines.append(
            f"| {label} | {1e3 * times['impala']:.1f} | {1e3 * times['stac']:.1f} | "
            f"{1e3 * times['stacx']:.1f} | {times['stac'] / times['impala']:.2f} | "
            f"{times['stacx'] / times['impala']:.2f} |"
        )
        print(lines[-1], flush=True)
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--env", required=True)
    run.add_argument(
        "--family", default=None, help="preset suffix, e.g. control-cpu (default: the env's family)"
    )
    run.add_argument("--steps", type=int, default=200_000)
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    run.add_argument("--algos", nargs="+", default=list(ALGOS))
    run.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    report = sub.add_parser("report")
    report.add_argument("--bin-steps", type=int, default=10_000)
    bench = sub.add_parser("bench")
    bench.add_argument("--threads", type=int, default=1)
    for p in (run, report):
        p.add_argument("--root", default="/tmp/stac-compare")
    args = parser.parse_args()
    {"run": cmd_run, "report": cmd_report, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    main()
