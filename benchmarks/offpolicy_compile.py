"""``torch.compile`` on the TD3 / SAC learning step on the CPU: compile time, and time per update against eager.

Builds the algorithm as ``benchmarks/offpolicy_anatomy.py`` does (``td3-mujoco`` / ``sac-cleanrl``, HalfCheetah
shapes, 10,000 random transitions in the replay buffer, one thread, denormals flushed as a run does) and, in
a fresh process per mode:

* ``eager``: ``algo.update`` as it runs in ``aclab train``;
* ``compiled``: the ``forward`` of every network of the step (actor, critics and their targets) replaced by
  ``torch.compile(forward)`` (inductor, default mode), the way a user would try it.

Records ``first_updates_s`` (wall time of the first 5 updates: for ``compiled`` this is where compilation
happens, each process with an empty compile cache) and ``ms_per_update`` over ``--updates`` updates after 50
more warm-up ones.

    .venv/bin/python benchmarks/offpolicy_compile.py --json docs/results/performance/offpolicy_compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offpolicy_anatomy import PRESETS, build_with_random_replay  # noqa: E402

NETWORKS = ("actor", "actor_target", "critic", "critic_target")


def measure(name: str, mode: str, updates: int) -> dict:
    import torch

    algo, rng = build_with_random_replay(name, flush=True)
    compiled = []
    if mode == "compiled":
        for attr in NETWORKS:
            module = getattr(algo, attr, None)
            if module is not None:
                module.forward = torch.compile(module.forward)
                compiled.append(attr)
    start = time.perf_counter()
    for _ in range(5):
        algo.update(algo.loop.buffer.sample(256, rng))
    first = time.perf_counter() - start
    for _ in range(50):
        algo.update(algo.loop.buffer.sample(256, rng))
    batches = [algo.loop.buffer.sample(256, rng) for _ in range(updates)]
    start = time.perf_counter()
    for batch in batches:
        algo.update(batch)
    ms = (time.perf_counter() - start) / updates * 1e3
    return {"algo": name, "preset": PRESETS[name], "mode": mode, "compiled": compiled, "first_updates_s": first,
            "ms_per_update": ms, "updates_timed": updates, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.updates)))
        return
    results = []
    for name in args.algos:
        for mode in ("eager", "compiled"):
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as cache:  # an empty compile cache: compile from scratch
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, __file__, "--child", name, mode, "--updates",
                                      str(args.updates)], capture_output=True, text=True, env=env, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            result["load_avg"] = load
            results.append(result)
            print(f"{name} {mode}: first 5 updates {result['first_updates_s']:.1f} s, then "
                  f"{result['ms_per_update']:.2f} ms/update (load {load:.1f})", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine_cores": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
