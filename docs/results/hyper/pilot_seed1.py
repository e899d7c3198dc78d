"""Seed-1 pilot of the corrected-settings comparisons (one seed per arm: observations, no intervals).

The 5-seed runs of run_td3_critics.sh and docs/results/meta/run_maml_fwd_back.sh did not fit the shared
CPU budget; their first seed finished for the three TD3 critics and for Context-MAML and Hyper-MAML.
This script tabulates those runs' evaluation returns and gradient-accuracy measurements:

    .venv/bin/python docs/results/hyper/pilot_seed1.py ROOT_HYPER ROOT_META

writes docs/results/hyper/pilot_seed1.csv and docs/results/meta/pilot_seed1.csv.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(path: Path, column: str) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get(column)]


def hyper(root: Path) -> list[dict]:
    out = []
    for arm in ("mlp", "sa_hyper", "sa_hyper_authors"):
        run = root / f"{arm}-s1"
        evals = {r["step"]: r["mean_return"] for r in _rows(run / "evals.csv", "mean_return")}
        for r in _rows(run / "metrics.csv", "grad_cs/mean"):
            out.append({"arm": arm, "seed": 1, "step": r["step"], "eval_return": evals.get(r["step"], ""),
                        "cs_mean": r["grad_cs/mean"], "cs_frac_gt_0": r["grad_cs/frac_gt_0"],
                        "cs_frac_gt_0.25": r["grad_cs/frac_gt_0.25"], "cs_frac_gt_0.5": r["grad_cs/frac_gt_0.5"]})
    return out


def meta(root: Path) -> list[dict]:
    out = []
    for algo in ("maml-context", "maml-hyper"):
        for r in _rows(root / f"{algo}-s1" / "metrics.csv", "test/return_pre"):
            out.append({"algo": algo, "seed": 1, "step": r["step"], "test_return_pre": r["test/return_pre"],
                        "test_return_post": r["test/return_post"]})
    return out


def _write(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    _write(hyper(Path(sys.argv[1])), HERE / "pilot_seed1.csv")
    _write(meta(Path(sys.argv[2])), HERE.parent / "meta" / "pilot_seed1.csv")
