"""DNA's gradient noise scale at CPU scale, 5 seeds: the policy / value ordering (DNA paper, Section 3.2,
Figure 2) and the effect of lambda_pi (Section 6.2, Figure 5), with the paper's estimator (Algorithm 2)
and the authors' (16 small batches, norms averaged before squaring, EMA 0.9 on S and |G|^2).

Conditions (CartPole-v1, dna-classic, 150k env steps, noise measured every 4th update, B_small 32,
B_big = the whole 512-step rollout, seeds 1-5, no evaluation episodes):

    paper095    lambda_pi 0.95, Algorithm 2 with 16 small batches (mean of squared norms), |G|^2 EMA 0.95
    paper080    the same with lambda_pi 0.8 (the DNA paper's Atari choice)
    paperv080   lambda_pi 0.95, lambda_V 0.8 (Section 6.2: a lower lambda_V *raised* the value noise)
    authors095  lambda_pi 0.95, the authors' estimator (dna-atari-noise-authors' noise settings)

    python docs/results/dna/noise_seeds.py run paper095 1     # one (condition, seed) per call
    python docs/results/dna/noise_seeds.py summarize          # -> noise_seeds_runs.csv, noise_seeds.md

Runs go to /tmp/dna-noise/<condition>-s<seed> (``--root``). Per run: the median over its measurements of
sigma = sqrt(B_simple) per loss (the smoothed estimate, as logged), the per-run ratio of the policy's to the
value's median, how many raw trace estimates S (Eq. 5) came out negative, and the final return. The
estimator does not change training (its batches come from a generator of their own), so paper095 and
authors095 train identically; for the paper conditions the summary also re-smooths the logged raw
estimates |G|^2 and S with the authors' smoothing (EMA 0.9 on both, |G|^2 floored at 1e-4) while keeping
Algorithm 2's mean of squared norms (``sigma_<loss>_median_ema09``), which splits the two estimators'
difference into its smoothing part and its norm-averaging part.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from aclab.evaluate import stats

OUT = Path(__file__).resolve().parent
SEEDS = (1, 2, 3, 4, 5)
STEPS = 150_000
NOISE = ["params.noise_scale_every=4", "params.noise_b_small=32", "params.noise_b_big=512",
         "params.noise_num_small_batches=16"]
AUTHORS = ["params.noise_num_small_batches=16", "params.noise_small_average=norms", "params.noise_g2_smoothing=0.9",
           "params.noise_s_smoothing=0.9", "params.noise_g2_floor=0.0001"]
CONDITIONS = {
    "paper095": [*NOISE, "params.lambda_pi=0.95"],
    "paper080": [*NOISE, "params.lambda_pi=0.8"],
    "paperv080": [*NOISE, "params.lambda_pi=0.95", "params.lambda_v=0.8"],
    "authors095": [*NOISE, *AUTHORS, "params.lambda_pi=0.95"],
}
LOSSES = ("policy", "value", "distil")


def run_dir(root: Path, condition: str, seed: int) -> Path:
    return root / f"{condition}-s{seed}"


def cmd_run(args) -> None:
    from aclab.train import make_config, train

    path = run_dir(Path(args.root), args.condition, args.seed)
    summary = path / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
        return
    config = make_config("dna", "CartPole-v1", overrides=[
        "progress=false", f"seed={args.seed}", f"total_steps={STEPS}", "eval.episodes=0", "torch_threads=1",
        "checkpoint_every_iterations=0", *CONDITIONS[args.condition]])
    result = train(config, path, overwrite=True)
    print(f"{args.condition} seed {args.seed}: {result['final_return']:.1f} in {result['wall_time_s']:.0f}s")


def run_stats(path: Path, condition: str, seed: int) -> dict:
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    out = {"condition": condition, "seed": seed,
           "final_return": json.loads((path / "summary.json").read_text())["final_return"]}
    for loss in LOSSES:
        sigma = np.array([float(r[f"noise/{loss}/sigma"]) for r in rows if r.get(f"noise/{loss}/sigma")])
        raw_s = np.array([float(r[f"noise/{loss}/s"]) for r in rows if r.get(f"noise/{loss}/s")])
        out[f"sigma_{loss}_median"] = float(np.median(sigma))
        out[f"measurements_{loss}"] = int(sigma.size)
        out[f"negative_s_{loss}"] = int((raw_s < 0).sum())
    out["ratio_policy_value"] = out["sigma_policy_median"] / out["sigma_value_median"]
    if condition.startswith("paper"):
        for loss in LOSSES:
            out[f"sigma_{loss}_median_ema09"] = resmoothed_sigma_median(rows, loss)
    return out


def resmoothed_sigma_median(rows: list[dict], loss: str, alpha: float = 0.9, floor: float = 1e-4) -> float:
    """The median over a run's measurements of sqrt(max(S_ema / max(|G|^2_ema, floor), 0)), the EMAs (constant
    ``alpha``, first value as the initial average) taken over the logged raw estimates ``noise/<loss>/g2`` and
    ``noise/<loss>/s``: the authors' smoothing applied to Algorithm 2's estimates."""
    g2_ema = s_ema = None
    sigmas = []
    for r in rows:
        if not r.get(f"noise/{loss}/g2"):
            continue
        g2, s = float(r[f"noise/{loss}/g2"]), float(r[f"noise/{loss}/s"])
        g2_ema = g2 if g2_ema is None else alpha * g2_ema + (1 - alpha) * g2
        s_ema = s if s_ema is None else alpha * s_ema + (1 - alpha) * s
        sigmas.append(np.sqrt(max(s_ema / max(g2_ema, floor), 0.0)))
    return float(np.median(sigmas))


def mean_ci(values) -> str:
    return str(stats.mean_interval(values))


def poi(x, y) -> str:
    return stats.improvement_interval(x, y).text(".2f")


def cmd_summarize(args) -> None:
    root = Path(args.root)
    records = [run_stats(run_dir(root, c, s), c, s) for c in CONDITIONS for s in SEEDS
               if (run_dir(root, c, s) / "summary.json").exists()]
    csv_path = OUT / "noise_seeds_runs.csv"
    if records:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    rows = list(csv.DictReader(csv_path.open()))
    keys = ["final_return", "sigma_policy_median", "sigma_value_median", "sigma_distil_median",
            "ratio_policy_value", "sigma_policy_median_ema09", "sigma_value_median_ema09",
            "sigma_distil_median_ema09", "negative_s_policy", "negative_s_value", "negative_s_distil",
            "measurements_policy"]
    md = ["Generated by `noise_seeds.py summarize` from `noise_seeds_runs.csv`: mean over seeds with a 95% "
          "stratified-bootstrap CI (rliable); P(X > Y) with its CI.", "",
          "| metric | " + " | ".join(CONDITIONS) + " |", "| --- |" + " --- |" * len(CONDITIONS)]
    values = {c: {k: [float(r[k]) for r in rows if r["condition"] == c and r.get(k)] for k in keys} for c in CONDITIONS}
    for key in keys:
        md.append(f"| {key} | " + " | ".join(
            f"{mean_ci(values[c][key])} (n={len(values[c][key])})" if len(values[c][key]) >= 2 else "-"
            for c in CONDITIONS) + " |")
    md.append("")
    for c in CONDITIONS:
        ratios = values[c]["ratio_policy_value"]
        if ratios:
            md.append(f"- {c}: sigma_pi / sigma_V per seed: " + ", ".join(f"{x:.1f}" for x in ratios))
    comparisons = (("paper095", "paper080", "sigma_policy_median"), ("paper095", "paper080", "final_return"),
                   ("paperv080", "paper095", "sigma_value_median"), ("paperv080", "paper095", "final_return"),
                   ("paper095", "authors095", "sigma_policy_median"), ("paper095", "authors095", "sigma_value_median"))
    for x, y, key in comparisons:
        if len(values[x][key]) >= 2 and len(values[y][key]) >= 2:
            md.append(f"- P({x} > {y}) on {key}: {poi(values[x][key], values[y][key])}")
    (OUT / "noise_seeds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/dna-noise")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("condition", choices=list(CONDITIONS))
    p.add_argument("seed", type=int)
    p.set_defaults(func=cmd_run)
    sub.add_parser("summarize").set_defaults(func=cmd_summarize)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
