"""Peak memory and time of one epoch of minibatches over a rollout of image observations.

``aclab.data.rollout.shuffled_minibatches`` gathers image-sized items per minibatch instead of shuffling
the whole batch once per epoch (same minibatches, no shuffled copy of every frame). This times one epoch
of both ways, each in a fresh process (peak RSS is per process), the two interleaved, over ``--items``
Procgen-sized frames (3 x 64 x 64, float32 as DNA's normalised observations, or uint8) plus the small
per-step fields; every minibatch is read once (a sum) as a training step would::

    OMP_NUM_THREADS=1 python benchmarks/minibatch_gather.py --json docs/results/performance/minibatch_gather.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def one_epoch(impl: str, items: int, dtype: str, num_minibatches: int) -> dict:
    import torch

    from aclab.data.rollout import shuffled_minibatches

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if dtype == "uint8":
        obs = torch.randint(0, 256, (items, 3, 64, 64), dtype=torch.uint8, generator=g)
    else:
        obs = torch.randn(items, 3, 64, 64, generator=g)
    batch = {"obs": obs, "actions": torch.randint(0, 15, (items,), generator=g), "advantages": torch.randn(items)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    total = 0.0
    if impl == "new":
        parts = shuffled_minibatches(batch, num_minibatches, g)
    else:  # the previous implementation: one shuffled copy of every tensor per epoch, minibatches are slices
        perm = torch.randperm(items, generator=g)
        shuffled = {k: v[perm] for k, v in batch.items()}
        size = items // num_minibatches
        parts = ({k: v[i * size:(i + 1) * size] for k, v in shuffled.items()} for i in range(num_minibatches))
    for mb in parts:
        total += float(mb["obs"].float().sum()) + float(mb["advantages"].sum())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "seconds": round(seconds, 4), "peak_rss_mb": round(peak / 1024, 1),
            "epoch_extra_rss_mb": round((peak - base) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--items", type=int, default=8192)
    parser.add_argument("--dtype", choices=["float32", "uint8"], default="float32")
    parser.add_argument("--minibatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["old", "new"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_epoch(args.child, args.items, args.dtype, args.minibatches)))
        return
    runs = []
    for repeat in range(args.repeats):
        for impl in (("old", "new") if repeat % 2 == 0 else ("new", "old")):
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--items", str(args.items), "--dtype",
                                  args.dtype, "--minibatches", str(args.minibatches)], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            row = {"repeat": repeat, "load_1min": round(load, 2), **json.loads(out.stdout)}
            runs.append(row)
            print(row, flush=True)
    result = {"items": args.items, "dtype": args.dtype, "frame": [3, 64, 64], "minibatches": args.minibatches,
              "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
