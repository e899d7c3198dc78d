"""Learning parity on HalfCheetah-v4: aclab's PPO (preset ppo-cleanrl-mujoco) against CleanRL's
ppo_continuous_action.py at its defaults, 200k steps, several seeds each; 95% bootstrap CIs.

    # one run per call (so a shared machine can interleave them), then the summary:
    .venv/bin/python docs/results/performance/parity/parity.py run aclab 1 --cleanrl /path/to/cleanrl
    .venv/bin/python docs/results/performance/parity/parity.py run aclab-autograd 1 --cleanrl /path/to/cleanrl
    .venv/bin/python docs/results/performance/parity/parity.py run cleanrl 1 --cleanrl /path/to/cleanrl
    .venv/bin/python docs/results/performance/parity/parity.py summary

Score of a run: the mean undiscounted return of the training episodes that ended in the last 20k steps
(aclab: ``metrics.csv`` rows weighted by their episode counts; CleanRL: its ``episodic_return`` lines),
the same window for both. Results go to ``returns.csv`` beside this file. ``aclab`` runs with its default
minibatch gradients (``params.gradients=auto``: the closed form of ``aclab.nets.analytic_ppo`` on CPU),
``aclab-autograd`` with ``params.gradients=autograd`` (the only path before the closed form existed: the
first five ``aclab-autograd`` rows were run as ``aclab`` then).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS, WINDOW = 200_000, 20_000
RESULTS = HERE / "returns.csv"
IMPLS = ("aclab", "aclab-autograd", "cleanrl")
EPISODE = re.compile(r"global_step=(\d+), episodic_return=\[?([-0-9.e+]+)")


def score_aclab(run_dir: Path) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in csv.DictReader((run_dir / "metrics.csv").open()):
        if int(float(row["step"])) > STEPS - WINDOW and row.get("episodes"):
            total += float(row["episode_return"]) * float(row["episodes"])
            count += int(float(row["episodes"]))
    return total / count, count


def score_cleanrl(output: str) -> tuple[float, int]:
    returns = [float(r) for step, r in EPISODE.findall(output) if int(step) > STEPS - WINDOW]
    return sum(returns) / len(returns), len(returns)


def run(who: str, seed: int, cleanrl: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if who.startswith("aclab"):
            run_dir = Path(tmp) / "run"
            gradients = "autograd" if who == "aclab-autograd" else "auto"
            subprocess.run([sys.executable, "-m", "aclab", "train", "ppo", "--env", "mujoco:HalfCheetah-v4", "--preset",
                            "ppo-cleanrl-mujoco", "--total-steps", str(STEPS), "--seed", str(seed), "--run-dir",
                            str(run_dir), "--quiet", "--threads", "1", "--set", "eval.episodes=0", "--set",
                            f"params.gradients={gradients}"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            score, episodes = score_aclab(run_dir)
        else:
            out = subprocess.run([str(cleanrl / ".venv/bin/python"), str(cleanrl / "cleanrl/ppo_continuous_action.py"),
                                  "--env-id", "HalfCheetah-v4", "--total-timesteps", str(STEPS), "--seed", str(seed)],
                                 env={**env, "PYTHONPATH": str(cleanrl)}, cwd=tmp, check=True, capture_output=True,
                                 text=True).stdout
            score, episodes = score_cleanrl(out)
    new = not RESULTS.exists()
    with RESULTS.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["impl", "seed", "steps", "score", "episodes"])
        writer.writerow([who, seed, STEPS, f"{score:.2f}", episodes])
    print(who, seed, round(score, 1), episodes)


def summary() -> None:
    import numpy as np

    from aclab.evaluate.stats import aggregate_intervals

    rows = list(csv.DictReader(RESULTS.open()))
    impls = [who for who in IMPLS if any(r["impl"] == who for r in rows)]
    scores = {who: np.array([[float(r["score"])] for r in rows if r["impl"] == who]) for who in impls}
    intervals = aggregate_intervals(scores, metrics=["mean", "iqm"], reps=5000, seed=0)
    for who, by_metric in intervals.items():
        values = ", ".join(f"{float(v):.0f}" for v in scores[who][:, 0])
        print(f"{who} ({len(scores[who])} seeds: {values}): " + "; ".join(
            f"{m} {i.point:.0f} [{i.lower:.0f}, {i.upper:.0f}]" for m, i in by_metric.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "summary"])
    parser.add_argument("who", nargs="?", choices=IMPLS)
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--cleanrl", type=Path, help="CleanRL checkout with its venv in .venv")
    args = parser.parse_args()
    if args.action == "run":
        run(args.who, args.seed, args.cleanrl)
    else:
        summary()


if __name__ == "__main__":
    main()
