"""Where a TD3 / SAC learning step's time and memory go (HalfCheetah shapes, one thread).

Builds the algorithm as ``aclab train`` does (``td3-mujoco`` / ``sac-cleanrl``: batch 256, 256-256 networks),
fills its replay buffer with 10,000 random transitions and then, for each algorithm:

* ``ms_per_update``: wall time of ``algo.update`` over ``--updates`` sampled batches (after 50 warm-up ones);
* ``profile``: torch.profiler's self CPU time per operator over 150 updates, and the share of the matrix
  products (``bmm``, ``baddbmm``, ``addmm``, ``mm``) in the total;
* ``denormal_adam_moments_after_2000_updates``: how many of Adam's moments (``exp_avg``, ``exp_avg_sq``) of
  the actor and of the critic are denormal floats after the 2,000 updates below;
* ``rss_mb``: the process's resident memory after 1, 100, 500, 1,000 and 2,000 updates run back to back as
  one iteration, i.e. with the iteration's statistics accumulating (``aclab.algos.offpolicy.RunningSums``);
  ``heap_in_use_mb``: at the same points, the bytes malloc has handed out and not taken back
  (``aclab.core.memory.heap_in_use``): growth there is a leak, growth of RSS alone is the allocator.

Each algorithm is measured twice, with the CPU's flush-to-zero mode off (IEEE denormals) and on (a run's
default, ``flush_denormal``); ``ms_per_update`` and the profile are taken after the 2,000 updates, when Adam's
moments of weights without gradient have had time to decay into the denormal range.

    .venv/bin/python benchmarks/offpolicy_anatomy.py --json docs/results/performance/offpolicy_anatomy.json

Each algorithm runs in its own fresh process (so the memory figures do not mix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {"td3": "td3-mujoco", "sac": "sac-cleanrl"}
GEMMS = ("aten::bmm", "aten::baddbmm", "aten::addmm", "aten::mm")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS"))


def build_with_random_replay(name: str, flush: bool):
    """``(algo, rng)``: algorithm ``name`` built as ``aclab train`` builds it (preset :data:`PRESETS`, HalfCheetah
    shapes, CPU, one thread, the flush-to-zero mode ``flush``) with 10,000 random transitions in its replay
    buffer, and the generator to sample batches with (also used by ``offpolicy_compile.py``)."""
    import numpy as np
    import torch

    from aclab import registry
    from aclab.core.threads import flush_denormals
    from aclab.envs import make_env
    from aclab.train import make_config

    flush_denormals(flush)
    torch.set_num_threads(1)
    config = make_config(name, "mujoco:HalfCheetah-v4", preset=PRESETS[name], overrides=["progress=false"])
    envs = make_env("mujoco:HalfCheetah-v4", 1, 0)
    algo = registry.build(config, envs.spec, torch.device("cpu"))
    rng = np.random.default_rng(0)
    n, obs_dim, act_dim = 10_000, envs.spec.obs_shape[0], algo.loop.action_dim
    algo.loop.buffer.add(rng.standard_normal((n, obs_dim)).astype(np.float32),
                         rng.uniform(-1, 1, (n, act_dim)).astype(np.float32), rng.standard_normal(n).astype(np.float32),
                         rng.standard_normal((n, obs_dim)).astype(np.float32), np.zeros(n, np.float32))
    return algo, rng


def measure(name: str, updates: int, flush: bool) -> dict:
    import torch

    algo, rng = build_with_random_replay(name, flush)

    def batch():
        return algo.loop.buffer.sample(256, rng)

    from aclab.core.memory import heap_in_use

    def in_use_mb():
        n_bytes = heap_in_use()
        return None if n_bytes is None else n_bytes / 2**20

    rss, in_use = {"0": _rss_mb()}, {"0": in_use_mb()}
    for i in range(1, 2001):  # one long iteration: statistics accumulate in between
        algo.update(batch())
        if i in (1, 100, 500, 1000, 2000):
            rss[str(i)] = _rss_mb()
            in_use[str(i)] = in_use_mb()
    denormal = {}  # Adam moments that are denormal now, from their bits (exponent 0, mantissa not)
    for label in ("actor", "critic"):
        optimizer = getattr(algo, f"{label}_optimizer")
        bits = [state[key].view(torch.int32) for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
        denormal[label] = {"denormal": sum(int((((b & 0x7F800000) == 0) & ((b & 0x007FFFFF) != 0)).sum())
                                           for b in bits),
                           "total": sum(b.numel() for b in bits)}
    batches = [batch() for _ in range(updates)]
    start = time.perf_counter()
    for b in batches:
        algo.update(b)
    ms = (time.perf_counter() - start) / updates * 1e3
    from torch.profiler import ProfilerActivity, profile

    batches = [batch() for _ in range(150)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            algo.update(b)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:15])
    return {"algo": name, "preset": PRESETS[name], "flush_denormal": flush, "ms_per_update": ms,
            "updates_timed": updates, "adam_ms_per_update": ops.get("aten::_fused_adam_", 0.0) / 150 / 1e3,
            "rss_mb_after_updates": rss, "heap_in_use_mb_after_updates": in_use,
            "denormal_adam_moments_after_2000_updates": denormal,
            "profile_top_self_cpu_share": {k: v / total for k, v in top.items()},
            "gemm_share_of_self_cpu": sum(v for k, v in ops.items() if k in GEMMS) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--flush", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.updates, args.flush == "on")))
        return
    results = []
    for name in args.algos:
        for flush in ("off", "on"):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", name, "--updates", str(args.updates),
                                  "--flush", flush], capture_output=True, text=True, env=env, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            result["load_avg"] = os.getloadavg()[0]
            results.append(result)
            share = result['gemm_share_of_self_cpu']
            print(f"{name} (flush to zero {flush}): {result['ms_per_update']:.2f} ms/update, Adam "
                  f"{result['adam_ms_per_update']:.2f} ms of it (profiled), matrix products {share:.0%} of self "
                  f"CPU time, RSS {result['rss_mb_after_updates']} MB (load {result['load_avg']:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine_cores": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
