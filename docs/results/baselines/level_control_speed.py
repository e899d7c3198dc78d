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


def main(game: str = "bigfish", rounds: int = 3) -> dict:
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
        "ratio": float(np.median(times["level_control"]) / np.median(times["pool"])),
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    (Path(__file__).parent / "level_control_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bigfish", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
