"""aclab with the flush-to-zero mode on (``flush_denormal=true``, the default) against off, side by side.

Runs workloads of ``cleanrl_side_by_side.py`` (by default the off-policy ones, TD3 / SAC on HalfCheetah-v4,
12k steps, 5k random; ``--workloads procgen`` for PPO on Procgen bigfish; its aclab command lines, one thread)
with ``--set flush_denormal=true`` and ``=false`` one after the other, the order alternating between repeats
and each repeat on its own seed, and reports each run's steps/s
(``summary.json``) and the on / off ratio of each pair:

    .venv/bin/python benchmarks/flush_denormal_ab.py --repeats 3 \\
        --json docs/results/performance/flush_denormal_ab.json --markdown docs/results/performance/flush_denormal_ab.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cleanrl_side_by_side import WORKLOADS, run_aclab  # noqa: E402

OFF_POLICY = ("td3", "sac")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(OFF_POLICY), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows = []
    for repeat in range(args.repeats):
        for name in args.workloads:
            seed = args.seed + repeat
            load = os.getloadavg()[0]
            order = (True, False) if repeat % 2 == 0 else (False, True)
            pair = {}
            for flush in order:
                workload = dict(WORKLOADS[name])
                workload["aclab"] = [*workload["aclab"], "--set", f"flush_denormal={str(flush).lower()}"]
                pair["on" if flush else "off"] = run_aclab(workload, 1, seed, args.timeout)
            ratio = pair["on"]["steps_per_s"] / pair["off"]["steps_per_s"]
            rows.append({"workload": name, "repeat": repeat, "seed": seed, "load_avg": load, **pair, "ratio": ratio})
            print(f"{name} repeat {repeat} (load {load:.1f}): on {pair['on']['steps_per_s']:.0f} steps/s, "
                  f"off {pair['off']['steps_per_s']:.0f} steps/s, on/off {ratio:.2f}", flush=True)
    lines = ["| workload (1 thread) | steps/s, flush on | steps/s, flush off | on / off (median, range) | load avg |",
             "| --- | --- | --- | --- | --- |"]
    summary = {}
    for name in args.workloads:
        mine = [r for r in rows if r["workload"] == name]
        on = [r["on"]["steps_per_s"] for r in mine]
        off = [r["off"]["steps_per_s"] for r in mine]
        ratios = [r["ratio"] for r in mine]
        loads = [r["load_avg"] for r in mine]
        summary[name] = {"on": on, "off": off, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios)}
        lines.append(f"| {WORKLOADS[name]['label']} | {min(on):.0f}-{max(on):.0f} | {min(off):.0f}-{max(off):.0f} "
                     f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                     f"| {min(loads):.1f}-{max(loads):.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "command": " ".join(sys.argv)},
                                         "rows": rows, "summary": summary}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
