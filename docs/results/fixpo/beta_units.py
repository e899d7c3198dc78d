"""FixPO at CPU scale: beta under aclab's reward scaling vs Tianshou's target-only return normalisation,
the KL the primary phase leaves before the fixup, how often the fixup acts, and FixPO vs PPO returns.

Conditions (Hopper-v4 and HalfCheetah-v4, 300k env steps, seeds 1-5, no evaluation episodes):

    scaled   fixpo-mujoco: the env layer divides rewards (hence advantages) by the running return std
    targets  fixpo-mujoco with params.return_norm=targets, env.normalize_reward=false (only the change of units)
    authors  fixpo-mujoco-authors: targets + value clipping 0.2 + the sg(beta) KL fixup + Adam eps 1e-8
    ppo      ppo-mujoco (the DNA paper's Table 6 / CleanRL setting)

Run one (condition, env, seed) per call, e.g. under the project's CPU slots, then summarise:

    python docs/results/fixpo/beta_units.py run scaled mujoco:Hopper-v4 1
    python docs/results/fixpo/beta_units.py summarize      # -> beta_units_runs.csv, beta_units.md

Runs go to /tmp/fixpo-beta/<condition>-<env>-s<seed> (``--root``); finished runs are skipped. The per-run
numbers are kept in beta_units_runs.csv next to this script; beta_units.md is generated from it with 95%
stratified-bootstrap CIs (rliable, via aclab.evaluate.stats).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from aclab.evaluate import stats

OUT = Path(__file__).resolve().parent
ENVS = ("mujoco:Hopper-v4", "mujoco:HalfCheetah-v4")
SEEDS = (1, 2, 3, 4, 5)
STEPS = 300_000
CONDITIONS = {
    "scaled": ("fixpo", "fixpo-mujoco", []),
    "targets": ("fixpo", "fixpo-mujoco", ["params.return_norm=targets", "env.normalize_reward=false"]),
    "authors": ("fixpo", "fixpo-mujoco-authors", []),
    "ppo": ("ppo", "ppo-mujoco", []),
}
FIELDS = ["condition", "env", "seed", "final_return", "updates", "beta_median", "beta_p90", "beta_max",
          "beta_last10", "pre_fixup_kl_median", "pre_fixup_kl_max", "fixup_needed_fraction", "fixup_overhead_percent",
          "fallbacks", "post_update_kl_max", "return_std_last", "wall_time_s"]


def _finished(path: Path) -> bool:
    summary = path / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def run_dir(root: Path, condition: str, env: str, seed: int) -> Path:
    return root / f"{condition}-{env.replace(':', '-')}-s{seed}"


def cmd_run(args) -> None:
    from aclab.train import make_config, train

    algo, preset, extra = CONDITIONS[args.condition]
    path = run_dir(Path(args.root), args.condition, args.env, args.seed)
    if _finished(path):
        return
    config = make_config(algo, args.env, preset=preset, overrides=[
        "progress=false", f"seed={args.seed}", f"total_steps={STEPS}", "eval.episodes=0", "torch_threads=1",
        "checkpoint_every_iterations=0", *extra])
    result = train(config, path, overwrite=True)
    print(f"{args.condition} {args.env} seed {args.seed}: {result['final_return']:.1f} in {result['wall_time_s']:.0f}s")


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")])


def run_stats(path: Path, condition: str, env: str, seed: int) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    out = {"condition": condition, "env": env, "seed": seed, "final_return": summary["final_return"],
           "updates": len(rows), "wall_time_s": summary["wall_time_s"]}
    if condition == "ppo":
        return out
    beta = _column(rows, "beta")
    pre = _column(rows, "kl/pre_fixup_max")
    steps, primary = _column(rows, "fixup/steps"), _column(rows, "fixup/primary_steps")
    out.update(beta_median=np.median(beta), beta_p90=np.percentile(beta, 90), beta_max=beta.max(),
               beta_last10=beta[-10:].mean(), pre_fixup_kl_median=np.median(pre), pre_fixup_kl_max=pre.max(),
               fixup_needed_fraction=_column(rows, "fixup/needed").mean(),
               fixup_overhead_percent=100 * steps.sum() / primary.sum(),
               fallbacks=_column(rows, "fixup/fallback").sum(),
               post_update_kl_max=_column(rows, "trust_region/max_kl").max())
    std = _column(rows, "return_norm/std")
    if std.size:
        out["return_std_last"] = std[-1]
    return out


def mean_ci(values) -> str:
    return str(stats.mean_interval(values))


def poi(x, y) -> str:
    return stats.improvement_interval(x, y).text(".2f")


def cmd_summarize(args) -> None:
    root = Path(args.root)
    records = []
    for condition in CONDITIONS:
        for env in ENVS:
            for seed in SEEDS:
                path = run_dir(root, condition, env, seed)
                if _finished(path):
                    records.append(run_stats(path, condition, env, seed))
    if records:
        with open(OUT / "beta_units_runs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in records:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    rows = list(csv.DictReader((OUT / "beta_units_runs.csv").open()))
    md = ["Generated by `beta_units.py summarize` from `beta_units_runs.csv`: mean over seeds with a 95% "
          "stratified-bootstrap CI (rliable); P(X > Y) with its CI.", ""]
    keys = ["final_return", "beta_median", "beta_p90", "beta_last10", "pre_fixup_kl_median", "pre_fixup_kl_max",
            "fixup_needed_fraction", "fixup_overhead_percent", "post_update_kl_max", "fallbacks"]
    for env in ENVS:
        md += [f"### {env}", "", "| metric | " + " | ".join(CONDITIONS) + " |",
               "| --- |" + " --- |" * len(CONDITIONS)]
        for key in keys:
            cells = []
            for condition in CONDITIONS:
                vals = [float(r[key]) for r in rows if r["env"] == env and r["condition"] == condition and r.get(key)]
                cells.append(f"{mean_ci(vals)} (n={len(vals)})" if len(vals) >= 2 else "-")
            md.append(f"| {key} | " + " | ".join(cells) + " |")
        md.append("")
        for x, y, key in (("targets", "scaled", "beta_median"), ("targets", "scaled", "beta_p90"),
                          ("authors", "scaled", "beta_median"), ("scaled", "ppo", "final_return"),
                          ("targets", "ppo", "final_return"), ("authors", "ppo", "final_return")):
            vx = [float(r[key]) for r in rows if r["env"] == env and r["condition"] == x and r.get(key)]
            vy = [float(r[key]) for r in rows if r["env"] == env and r["condition"] == y and r.get(key)]
            if len(vx) >= 2 and len(vy) >= 2:
                md.append(f"- P({x} > {y}) on {key}: {poi(vx, vy)}")
        md.append("")
    (OUT / "beta_units.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/fixpo-beta")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("condition", choices=list(CONDITIONS))
    p.add_argument("env", choices=list(ENVS))
    p.add_argument("seed", type=int)
    p.set_defaults(func=cmd_run)
    sub.add_parser("summarize").set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
