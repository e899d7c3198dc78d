"""The no-grad IMPALA forward (acting, pi_old recording, evaluation) per chunk size and grad mode, on one thread.

``aclab.nets.encoders.chunked_forward`` splits a large batch into chunks of ``CPU_CHUNK_FRAMES`` (64)
frames, a size chosen on the forward+backward of a training minibatch. This checks whether a forward
without autograd (the acting forward of 64 envs, the pi_old and KL passes over the auxiliary buffer, the
100-env evaluation) would prefer another chunk size, or ``torch.inference_mode`` over ``torch.no_grad``.
Chunk sizes and modes are interleaved within each repeat (the machine is shared); ms per frame::

    OMP_NUM_THREADS=1 python benchmarks/inference_chunks.py --json docs/results/performance/inference_chunks.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from aclab.nets import encoders
from aclab.nets.encoders import ImpalaResNet

CHUNKS = (16, 32, 64, 128, 1024)
MODES = ("no_grad", "inference_mode")


def time_forward(net: ImpalaResNet, frames: torch.Tensor, chunk: int, mode: str) -> float:
    """Seconds per frame of one ``net(frames)`` with ``CPU_CHUNK_FRAMES = chunk`` (after a warm-up call)."""
    saved = encoders.CPU_CHUNK_FRAMES
    encoders.CPU_CHUNK_FRAMES = chunk
    try:
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            net(frames[:chunk])
            start = time.perf_counter()
            net(frames)
            return (time.perf_counter() - start) / frames.shape[0]
    finally:
        encoders.CPU_CHUNK_FRAMES = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = ImpalaResNet(3, init="xavier").eval()
    frames = torch.randint(0, 256, (args.frames, 3, 64, 64), dtype=torch.uint8)
    runs = []
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        for chunk in CHUNKS:
            for mode in MODES:
                ms = 1000 * time_forward(net, frames, chunk, mode)
                runs.append({"repeat": repeat, "chunk": chunk, "mode": mode, "ms_per_frame": round(ms, 4),
                             "load_1min": round(load, 2)})
                print(runs[-1], flush=True)
    summary = {f"{c}/{m}": round(statistics.median(r["ms_per_frame"] for r in runs
                                                  if r["chunk"] == c and r["mode"] == m), 4)
               for c in CHUNKS for m in MODES}
    out = {"frames": args.frames, "threads": 1, "torch": torch.__version__,
           "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "median_ms_per_frame": summary, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
