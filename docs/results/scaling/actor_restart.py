"""How long a killed actor takes to come back: kill an IMPALA actor by its pid, repeatedly, and time it.

Run from the repository root on a quiet machine (the numbers in docs/scaling.md):

    .venv/bin/python docs/results/scaling/actor_restart.py --kills 5

For each mode (process, Ray), a pool of 2 actors (CartPole, 2 envs each, the tests' tiny network) delivers
chunks to a loop that takes them as a learner would; every ``--every`` chunks actor 0 is killed with
SIGKILL. Per kill it records ``detect_s`` (kill -> the pool counts the failure), ``restart_s`` (failure
detected -> the replacement is ready: a new process built its envs and policy; what ``actors/restart_s``
logs) and ``total_s``, plus the machine's load average. Writes actor_restart.csv and actor_restart.json here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent


def measure(mode: str, kills: int, every: int) -> list[dict]:
    import torch

    from aclab.algos.impala import build_network, flat_state, make_acting_policy
    from aclab.data.actors import FailureBudget, LocalActorPool, RayActorPool, make_actor_specs
    from aclab.envs import build_envs
    from aclab.train import make_config

    config = make_config("impala", "CartPole-v1", overrides=[
        "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=8", "params.hidden_sizes=[16]",
        "params.head_hidden=0", "env.normalize_obs=false", "env.normalize_reward=false"])
    envs = build_envs(config, num_envs=1)
    params = flat_state(build_network(config.params, envs.spec))
    envs.close()
    torch.set_num_threads(1)
    specs = make_actor_specs(config, make_acting_policy, 2, 2, 8, 0)
    budget = FailureBudget(limit=kills + 1, window_s=1e9)
    if mode == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        pool = RayActorPool(specs, inflight=2, budget=budget)
    else:
        pool = LocalActorPool(specs, params.size, backend="process", inflight=2, budget=budget)
    rows = []
    try:
        pool.wait_ready(timeout=300)
        pool.publish(params, 0)
        for k in range(kills):
            for _ in range(every):
                pool.get(timeout=300)
            victim = pool.pids()[0]
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            detected_at = None
            while True:
                pool.get(timeout=300)
                stats = pool.stats()
                if detected_at is None and stats["actors/restarts"] == k + 1:
                    detected_at = time.monotonic()
                if stats["actors/restarts"] == k + 1 and stats["actors/alive"] == 2:
                    break
            restart_s = pool.restart_durations[-1]
            total_s = time.monotonic() - killed_at
            rows.append({"mode": mode, "kill": k + 1, "detect_s": round(total_s - restart_s, 4),
                         "restart_s": round(restart_s, 4), "total_s": round(total_s, 4),
                         "load_1min": os.getloadavg()[0]})
            print(rows[-1], flush=True)
    finally:
        pool.close()
        if mode == "ray":
            import ray

            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--every", type=int, default=10, help="chunks taken between kills")
    parser.add_argument("--modes", nargs="+", default=["process", "ray"])
    args = parser.parse_args()
    rows = [row for mode in args.modes for row in measure(mode, args.kills, args.every)]
    with open(OUT / "actor_restart.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {key: {"median": statistics.median(r[key] for r in mine),
                               "min": min(r[key] for r in mine), "max": max(r[key] for r in mine)}
                         for key in ("detect_s", "restart_s", "total_s")}
        summary[mode]["kills"] = len(mine)
    summary["cpus"] = os.cpu_count()
    (OUT / "actor_restart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
