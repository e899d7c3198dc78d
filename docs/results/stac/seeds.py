"""STAC vs IMPALA at CPU scale with 5 seeds and 95% bootstrap CIs, and the numbers behind docs/impala_stac.md:
metaparameter drift, policy lag of the asynchronous actors, exact vs frozen meta-gradients, and the cost of
STAC measured side by side with IMPALA.

    python docs/results/stac/seeds.py run stac 1           # CartPole-v1, *-classic preset, 200k steps
    python docs/results/stac/seeds.py lag thread 1         # IMPALA with 2 thread / process / ray actors, 50k steps
    python docs/results/stac/seeds.py cosine               # exact vs frozen RMSProp statistics -> cosine.csv
    python docs/results/stac/seeds.py speed                # interleaved IMPALA / STAC timing -> speed.csv
    python docs/results/stac/seeds.py summarize            # -> seeds_runs.csv, lag_runs.csv, seeds.md

Runs go to /tmp/stac-seeds (``--root``); the per-run numbers are kept next to this script as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from aclab.evaluate import stats

OUT = Path(__file__).resolve().parent
SEEDS = (1, 2, 3, 4, 5)
ALGOS = ("impala", "stac")
STEPS = 200_000
LAG_STEPS = 50_000
LAG_MODES = ("thread", "process", "ray")
META = ("gamma", "lambda", "g_v", "g_p", "g_e", "alpha")


def _done(path: Path) -> bool:
    summary = path / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def cmd_run(args) -> None:
    from aclab.train import make_config, train

    path = Path(args.root) / f"{args.algo}-s{args.seed}"
    if _done(path):
        return
    config = make_config(args.algo, "CartPole-v1", overrides=[
        "progress=false", f"seed={args.seed}", f"total_steps={STEPS}", "eval.episodes=0", "torch_threads=1",
        "checkpoint_every_iterations=0"])
    result = train(config, path, overwrite=True)
    print(f"{args.algo} seed {args.seed}: {result['final_return']:.1f} in {result['wall_time_s']:.0f}s")


def cmd_lag(args) -> None:
    from aclab.train import make_config, train

    path = Path(args.root) / f"lag-{args.mode}-s{args.seed}"
    if _done(path):
        return
    config = make_config("impala", "CartPole-v1", overrides=[
        "progress=false", f"seed={args.seed}", f"total_steps={LAG_STEPS}", "eval.episodes=0", "torch_threads=1",
        "checkpoint_every_iterations=0", f"params.actor_mode={args.mode}", "params.num_actors=2",
        "env.normalize_obs=false", "env.normalize_reward=false", "params.lr=4e-3", "params.ray_num_cpus=2"])
    result = train(config, path, overwrite=True)
    print(f"lag {args.mode} seed {args.seed}: {result['final_return']:.1f}")


def _problem(kind: str, seed: int):
    """A random meta-learning problem (as tests/test_stac.py): a small float64 network, a batch of 6 x 3
    off-policy steps with a termination and dummy steps, random RMSProp mean squares and metaparameters."""
    import torch

    from aclab.algos.impala import Batch, ImpalaNet, LossSettings, LossWeights
    from aclab.algos.stac import ETA_NAMES, ETA_NAMES_SEPARATE_ALPHAS, MetaSettings
    from aclab.core.distributions import Categorical, TanhGaussian

    torch.manual_seed(seed)
    T, B, obs_dim = 6, 3, 3
    heads = 3 if kind == "stacx" else 1
    dist = TanhGaussian(2) if kind == "continuous" else Categorical(3)
    net = ImpalaNet((obs_dim,), dist, hidden_sizes=(6,), head_hidden=5, num_heads=heads,
                    lstm_size=4 if kind == "continuous" else 0).double()
    actions = torch.randn(T, B, 2, dtype=torch.float64) if kind == "continuous" else torch.randint(0, 3, (T, B))
    terminated = torch.zeros(T, B, dtype=torch.bool)
    ends, valid = terminated.clone(), torch.ones(T, B, dtype=torch.bool)
    ends[2, 0] = terminated[2, 0] = True
    valid[3, 0] = False
    first = torch.zeros(T + 1, B, dtype=torch.float64)
    first[4, 0] = 1.0
    batch = Batch(obs=torch.randn(T + 1, B, obs_dim, dtype=torch.float64), actions=actions,
                  behaviour_log_probs=-1.0 + 0.7 * torch.randn(T, B, dtype=torch.float64),
                  rewards=torch.randn(T, B, dtype=torch.float64), not_terminated=(~terminated).double(), ends=ends,
                  weights=valid.double(), first=first, core_state=None, versions=torch.zeros(T, B))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    square_avgs = [0.5 * torch.rand_like(p) for p in params.values()]
    names = ETA_NAMES_SEPARATE_ALPHAS if kind == "stacx" else ETA_NAMES
    logits = (1.0 + torch.rand(heads, len(names), dtype=torch.float64)).requires_grad_(True)
    outer = LossWeights(gamma=0.99, trace_lambda=1.0, alpha_rho=1.0, alpha_c=1.0, g_v=0.25, g_p=1.0, g_e=0.01)

    def settings(frozen: bool):
        return MetaSettings(loss=LossSettings(regularizer="kl_standard_normal" if kind == "continuous" else "entropy"),
                            outer=outer, names=names, tuned=(True,) * len(names), kl_coef=1.0, decay=0.99, eps=0.1,
                            eps_inside_sqrt=True, freeze_stats=frozen, max_grad_norm=None, gamma_embedding=False)
    return net, params, square_avgs, logits, batch, settings


def cmd_cosine(args) -> None:
    import torch

    from aclab.algos.stac import meta_objective

    rows = []
    for kind in ("stac", "stacx", "continuous"):
        for seed in range(args.cases):
            net, params, avgs, logits, batch, settings = _problem(kind, seed)
            grads = {}
            for frozen in (False, True):
                result = meta_objective(net, params, avgs, logits, batch, 0.05, settings(frozen))
                (grads[frozen],) = torch.autograd.grad(result.outer_loss, logits)
            exact, frozen_g = grads[False].reshape(-1), grads[True].reshape(-1)
            rows.append({"kind": kind, "seed": seed,
                         "cosine": float(exact @ frozen_g / (exact.norm() * frozen_g.norm())),
                         "norm_ratio": float(frozen_g.norm() / exact.norm())})
    with open(OUT / "cosine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cos = np.array([r["cosine"] for r in rows])
    ratio = np.array([r["norm_ratio"] for r in rows])
    print(f"{len(rows)} cases: cosine min {cos.min():.4f} median {np.median(cos):.4f} max {cos.max():.4f}; "
          f"|frozen| / |exact| min {ratio.min():.3f} median {np.median(ratio):.3f} max {ratio.max():.3f}")


def cmd_speed(args) -> None:
    """One process, IMPALA and STAC learners side by side on the same CartPole batch (the classic presets),
    timed in alternating blocks so that a change in the machine's load hits both; then whole runs
    (acting included), alternating IMPALA and STAC."""
    import torch

    from aclab.algos.impala import batch_from_chunk
    from aclab.envs import build_envs
    from aclab.registry import build
    from aclab.train import make_config, train

    torch.set_num_threads(1)
    agents, batches = {}, {}
    for algo in ALGOS:
        config = make_config(algo, "CartPole-v1", overrides=["progress=false"])
        envs = build_envs(config)
        envs.reset(seed=0)
        agents[algo] = build(config, envs.spec, torch.device("cpu"))
        batches[algo] = batch_from_chunk(agents[algo].next_chunk(envs), torch.device("cpu"))
        agents[algo].learner_step(batches[algo], 1e-4)  # warm-up
        envs.close()
    rows = []
    load_before = os.getloadavg()[0]
    for block in range(args.blocks):
        times = {}
        for algo in (ALGOS if block % 2 == 0 else ALGOS[::-1]):
            start = time.perf_counter()
            for _ in range(args.updates):
                agents[algo].learner_step(batches[algo], 1e-4)
            times[algo] = (time.perf_counter() - start) / args.updates
        rows.append({"kind": "update", "block": block, "impala_s": times["impala"], "stac_s": times["stac"],
                     "ratio": times["stac"] / times["impala"], "load1": os.getloadavg()[0]})
    for pair in range(args.runs):
        times = {}
        for algo in (ALGOS if pair % 2 == 0 else ALGOS[::-1]):
            config = make_config(algo, "CartPole-v1", overrides=[
                "progress=false", f"seed={pair + 1}", f"total_steps={args.run_steps}", "eval.episodes=0",
                "torch_threads=1", "checkpoint_every_iterations=0"])
            times[algo] = train(config, Path(args.root) / f"speed-{algo}-{pair}", overwrite=True)["wall_time_s"]
        rows.append({"kind": "run", "block": pair, "impala_s": times["impala"], "stac_s": times["stac"],
                     "ratio": times["stac"] / times["impala"], "load1": os.getloadavg()[0]})
    with open(OUT / "speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"load before {load_before:.2f}")
    for kind in ("update", "run"):
        r = np.array([row["ratio"] for row in rows if row["kind"] == kind])
        print(f"{kind}: STAC / IMPALA = {mean_ci(r)} over {r.size} alternating blocks")


def mean_ci(values) -> str:
    return str(stats.mean_interval(values))


def poi(x, y) -> str:
    return stats.improvement_interval(x, y).text(".2f")


def _metric(rows, key):
    return np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")])


def cmd_summarize(args) -> None:
    root = Path(args.root)
    records = []
    for algo in ALGOS:
        for seed in SEEDS:
            path = root / f"{algo}-s{seed}"
            if not _done(path):
                continue
            summary = json.loads((path / "summary.json").read_text())
            rows = list(csv.DictReader((path / "metrics.csv").open()))
            rec = {"algo": algo, "seed": seed, "final_return": summary["final_return"],
                   "wall_time_s": summary["wall_time_s"], "updates": len(rows)}
            for name in META:
                values = _metric(rows, f"meta/{name}")
                if values.size:
                    rec[f"{name}_first"], rec[f"{name}_last"] = values[0], values[-1]
                    rec[f"{name}_drift"] = values[-1] - values[0]
                    rec[f"{name}_range"] = values.max() - values.min()
            records.append(rec)
    lag = []
    for mode in LAG_MODES:
        for seed in SEEDS:
            path = root / f"lag-{mode}-s{seed}"
            if _done(path):
                rows = list(csv.DictReader((path / "metrics.csv").open()))
                dropped = _metric(rows, "actors/dropped_chunks")
                lag.append({"mode": mode, "seed": seed, "lag_mean": _metric(rows, "policy_lag_mean").mean(),
                            "lag_max": _metric(rows, "policy_lag_max").max(),
                            "dropped_chunks": dropped[-1] if dropped.size else "", "updates": len(rows),
                            "final_return": json.loads((path / "summary.json").read_text())["final_return"]})
    for name, data in (("seeds_runs.csv", records), ("lag_runs.csv", lag)):
        if data:
            fields = sorted({k for r in data for k in r}, key=lambda k: list(data[-1]).index(k)
                            if k in data[-1] else 999)
            with open(OUT / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                for r in data:
                    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    runs = list(csv.DictReader((OUT / "seeds_runs.csv").open()))
    md = ["Generated by `seeds.py summarize`: mean over seeds with a 95% stratified-bootstrap CI (rliable).", "",
          "| metric | impala | stac |", "| --- | --- | --- |"]
    keys = ["final_return", "wall_time_s"] + [f"{n}_{s}" for n in META for s in ("last", "drift", "range")]
    for key in keys:
        cells = []
        for algo in ALGOS:
            vals = [float(r[key]) for r in runs if r["algo"] == algo and r.get(key)]
            cells.append(f"{mean_ci(vals)} (n={len(vals)})" if len(vals) >= 2 else "-")
        md.append(f"| {key} | " + " | ".join(cells) + " |")
    ret = {a: [float(r["final_return"]) for r in runs if r["algo"] == a] for a in ALGOS}
    if all(len(v) >= 2 for v in ret.values()):
        md += ["", f"- P(stac > impala) on final_return: {poi(ret['stac'], ret['impala'])}"]
    if (OUT / "lag_runs.csv").exists():
        lag_rows = list(csv.DictReader((OUT / "lag_runs.csv").open()))
        md += ["", "Policy lag of 2 asynchronous actors (`seeds.py lag`, IMPALA, CartPole-v1, 50k steps, "
               "`max_policy_lag` = 5): mean lag over a run's updates (95% CI over seeds), the largest lag and the "
               "chunks dropped as too stale in each run (seeds in order).", "",
               "| actors | mean lag | max lag per run | dropped chunks per run | final return |",
               "| --- | --- | --- | --- | --- |"]
        for mode in LAG_MODES:
            rows = [r for r in lag_rows if r["mode"] == mode]
            if len(rows) >= 2:
                md.append(f"| {mode} (n={len(rows)}) | {mean_ci([float(r['lag_mean']) for r in rows])} | "
                          + ", ".join(str(int(float(r["lag_max"]))) for r in rows) + " | "
                          + ", ".join(str(int(float(r["dropped_chunks"]))) if r.get("dropped_chunks") else "-"
                                      for r in rows)
                          + f" | {mean_ci([float(r['final_return']) for r in rows])} |")
    if (OUT / "speed.csv").exists():
        speed = list(csv.DictReader((OUT / "speed.csv").open()))
        md += ["", "STAC / IMPALA wall time, measured side by side in one process (`seeds.py speed`):", "",
               "| measured | IMPALA s | STAC s | STAC / IMPALA | blocks | 1-min load |",
               "| --- | --- | --- | --- | --- | --- |"]
        for kind, label in (("update", "one learner update (same batch)"), ("run", "whole 50k-step run")):
            rows = [r for r in speed if r["kind"] == kind]
            if len(rows) >= 2:
                col = {k: [float(r[k]) for r in rows] for k in ("impala_s", "stac_s", "ratio", "load1")}
                md.append(f"| {label} | {np.mean(col['impala_s']):.4g} | {np.mean(col['stac_s']):.4g} | "
                          f"{mean_ci(col['ratio'])} | {len(rows)} | {min(col['load1']):.1f}-{max(col['load1']):.1f} |")
    (OUT / "seeds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/stac-seeds")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("algo", choices=ALGOS)
    p.add_argument("seed", type=int)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("lag")
    p.add_argument("mode", choices=LAG_MODES)
    p.add_argument("seed", type=int)
    p.set_defaults(func=cmd_lag)
    p = sub.add_parser("cosine")
    p.add_argument("--cases", type=int, default=10, help="random problems per kind (stac, stacx, continuous)")
    p.set_defaults(func=cmd_cosine)
    p = sub.add_parser("speed")
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--run-steps", type=int, default=50_000)
    p.set_defaults(func=cmd_speed)
    sub.add_parser("summarize").set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
