"""Gradient noise scale of DNA's three losses (DNA paper, Figure 2 and Appendix D) from aclab run directories.

    python docs/results/dna/plot_noise.py OUT.png "lambda_pi=0.8=/tmp/runs/noise_lp0.8" \
        "lambda_pi=0.95=/tmp/runs/noise_lp0.95" [--title ...]

Each ``TITLE=RUN_DIR`` is one panel with sigma = sqrt(B_simple) of the policy, value and distillation
losses (the ``noise/<loss>/sigma`` columns written when ``params.noise_scale_every > 0``). The title is
everything before the last ``=``. Prints, per run, the median sigma of each loss and the median ratio
sigma_pi / sigma_V over the iterations where both were measured (B_simple is undefined while the
smoothed |G|^2 is not positive; those rows are skipped).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOSSES = (("policy", "sigma_pi (policy)"), ("value", "sigma_V (value)"), ("distil", "sigma_D (distil)"))


def load_sigmas(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{loss: (steps, sigma)} over the rows where that loss's sigma is finite and positive."""
    columns: dict[str, tuple[list[float], list[float]]] = {loss: ([], []) for loss, _ in LOSSES}
    with open(Path(run_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for loss, _ in LOSSES:
                value = row.get(f"noise/{loss}/sigma")
                if value and np.isfinite(float(value)) and float(value) > 0:
                    columns[loss][0].append(float(row["step"]))
                    columns[loss][1].append(float(value))
    return {loss: (np.asarray(s), np.asarray(v)) for loss, (s, v) in columns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("panels", nargs="+", help="TITLE=RUN_DIR")
    parser.add_argument("--title", default="DNA gradient noise scale")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.panels), figsize=(5 * len(args.panels), 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], args.panels):
        title, run_dir = panel.rsplit("=", 1)
        sigmas = load_sigmas(run_dir)
        for loss, label in LOSSES:
            steps, sigma = sigmas[loss]
            if len(steps):
                ax.plot(steps, sigma, label=label, lw=1.2)
        policy, value = sigmas["policy"], sigmas["value"]
        common = np.intersect1d(policy[0], value[0])
        ratio = policy[1][np.isin(policy[0], common)] / value[1][np.isin(value[0], common)]
        medians = {loss: float(np.median(sigmas[loss][1])) if len(sigmas[loss][1]) else float("nan")
                   for loss, _ in LOSSES}
        print(f"{title}: median sigma policy {medians['policy']:.2f}, value {medians['value']:.2f}, "
              f"distil {medians['distil']:.2f}; median sigma_pi / sigma_V {np.median(ratio):.1f} "
              f"over {len(ratio)} measurements")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("sigma = sqrt(B_simple)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
