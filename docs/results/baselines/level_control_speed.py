"""Cost of per-episode level choice on Procgen (PLR's envs) against the usual 64-env EnvPool pool.

    python docs/results/baselines/level_control_speed.py [game] [rounds]

Steps ``make_env(game, 64, level_control=...)`` with random actions, 512 vector steps per measurement, the
two kinds interleaved ``rounds`` times; with level control every finished episode starts on a level drawn
uniformly from the 200 training levels (a new one-env pool each time). Prints and writes
``level_control_speed.json`` (median microseconds per env step, and the machine's load average).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from aclab.envs import make_env


def measure(game: str, level_control: bool, steps: int = 512) -> tuple[float, int]:
    envs = make_env(f"procgen:{game}", 64, 0, level_control=level_control)
    envs.reset()
    rng = np.random.default_rng(0)
    sampler = np.random.default_rng(1)
    episodes = 0
    start = time.perf_counter()
    for _ in range(steps):
        result = envs.step(rng.integers(0, 15, 64))
        done = np.flatnonzero(result.terminated | result.truncated)
        episodes += done.size
        if level_control:
            for b in done:
                envs.set_next_level(int(b), int(sampler.integers(200)))
    elapsed = time.perf_counter() - start
    envs.close()
    return 1e6 * elapsed / (steps * 64), episodes


def pool_costs(game: str, count: int = 40) -> dict[str, float]:
    """Milliseconds to build a one-env pool for one level (after the first, which loads the assets) and to
    reset it: what the level-controlled backend pays at every episode start."""
    import envpool

    task = f"{game.capitalize()}Easy-v0"

    def make(level):
        return envpool.make(task, env_type="gymnasium", num_envs=1, batch_size=1, num_threads=1, num_levels=1,
                            start_level=level)

    start = time.perf_counter()
    first = make(0)
    first_s = time.perf_counter() - start
    builds, resets = [], []
    for level in range(1, count + 1):
        start = time.perf_counter()
        pool = make(level)
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        pool.reset()
        resets.append(time.perf_counter() - start)
        pool.close()
    first.close()
    return {"first_pool_s": first_s, "build_ms_median": 1e3 * float(np.median(builds)),
            "reset_ms_median": 1e3 * float(np.median(resets))}


def main(game: str = "bigfish", rounds: int = 3) -> dict:
    costs = pool_costs(game)
    times: dict[str, list[float]] = {"pool": [], "level_control": []}
    episodes = {"pool": 0, "level_control": 0}
    for _ in range(rounds):
        for kind in times:
            us, eps = measure(game, kind == "level_control")
            times[kind].append(us)
            episodes[kind] += eps
    result = {
        "game": game,
        "rounds": rounds,
        "us_per_env_step_median": {k: float(np.median(v)) for k, v in times.items()},
        "us_per_env_step_all": times,
        "episodes_finished": episodes,
        "one_env_pool": costs,
        "ratio": float(np.median(times["level_control"]) / np.median(times["pool"])),
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    (Path(__file__).parent / "level_control_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bigfish", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
