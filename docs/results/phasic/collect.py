"""Extract the small per-run series of a sweep folder into one JSON file kept in the repo.

    python docs/results/phasic/collect.py /tmp/aclab-phasic-cpu/cartpole docs/results/phasic/data/cartpole.json

Per run: algo, env, seed, wall time, the final evaluation's per-episode returns (test split, and train /
levels when present), the training-episode returns per iteration (step, mean return, episodes), and the
logged value bias (step, bias, predicted, true, episodes, truncated) and stiffness (step, cosine, sign,
cosine_grad_v, sign_grad_v) rows. ``report.py`` computes every number of docs/ppg_dcpg.md from these files.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

SERIES = {
    "train": ("episode_return", "episodes"),
    "value_bias": ("value_bias/bias", "value_bias/predicted", "value_bias/true", "value_bias/episodes",
                   "value_bias/truncated"),
    "stiffness": ("stiffness/cosine", "stiffness/sign", "stiffness/cosine_grad_v", "stiffness/sign_grad_v"),
}


def _float(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


def collect_run(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    out = {"algo": config["algo"], "env": config["env"]["id"], "seed": config["seed"],
           "steps": summary["steps"], "wall_time_s": summary["wall_time_s"], "status": summary["status"],
           "eval_levels": summary.get("eval_levels")}
    for name, keys in SERIES.items():
        series = []
        for row in rows:
            if row.get(keys[0]) not in (None, ""):
                series.append([int(float(row["step"]))] + [_float(row.get(k)) for k in keys])
        out[name] = {"columns": ["step", *keys], "rows": series}
    evals = list(csv.DictReader((run / "evals.csv").open())) if (run / "evals.csv").exists() else []
    final = {}
    for row in evals:
        if int(float(row["step"])) == summary["steps"]:
            final[row["split"]] = {"returns": [float(r) for r in row["returns"].split()],
                                   "levels": row.get("levels", "")}
    out["final_eval"] = final
    extra = run / "analysis.json"  # post-training analyses (ood-actions), when a driver wrote them
    if extra.exists():
        out["analysis"] = json.loads(extra.read_text())
    return out


def main(folder: str, out: str) -> None:
    runs = [collect_run(p) for p in sorted(Path(folder).iterdir()) if (p / "summary.json").exists()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"runs": runs}, separators=(",", ":")) + "\n")
    print(f"{len(runs)} runs -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
