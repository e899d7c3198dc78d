"""The learning-curve PNG written into every run directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def plot_learning_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """Plot training episode return (and eval returns, if any) against env steps.

    Returns the PNG path, or None when the run has logged no finished episode yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open())) if (run_dir / "metrics.csv").exists() else []
    points = [(int(float(r["step"])), float(r["episode_return"])) for r in rows if r.get("episode_return")]
    if not points:
        return None
    config = json.loads((run_dir / "config.json").read_text())
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps, returns = zip(*points)
    ax.plot(steps, returns, lw=1.0, alpha=0.35, color="tab:blue", label="train episodes (per iteration)")
    window = max(1, len(returns) // 25)
    if window > 1:
        smooth = [sum(returns[max(0, i - window + 1): i + 1]) / len(returns[max(0, i - window + 1): i + 1])
                  for i in range(len(returns))]
        ax.plot(steps, smooth, lw=2.0, color="tab:blue", label=f"train, moving average ({window})")
    evals = run_dir / "evals.csv"
    if evals.exists():
        eval_rows = list(csv.DictReader(evals.open()))
        for split, color in (("train", "tab:green"), ("test", "tab:orange")):
            pts = [(int(float(r["step"])), float(r["mean_return"])) for r in eval_rows
                   if r["split"] == split and r["mean_return"]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=color, label=f"eval ({split})")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    env_id = config.get("env", {}).get("id", "?")
    ax.set_title(f"{config.get('algo', '?')} on {env_id} (seed {config.get('seed', '?')})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "learning_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
