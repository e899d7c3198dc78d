"""Throughput on this machine: sweeps on a Ray head with 1 vs 2 worker CPUs, and PPO with 1 vs 2 torchrun ranks.

Run from the repository root on a quiet machine (the numbers in docs/scaling.md):

    .venv/bin/python docs/results/scaling/throughput.py sweep --repeats 2
    .venv/bin/python docs/results/scaling/throughput.py ddp --repeats 3

``sweep``: a Ray head is started here (``ray start --head --num-cpus=K``, its processes stopped by pid
afterwards) for K = 1 and 2 in turn (interleaved over repeats), and a sweep of 4 short PPO CartPole runs
(``--steps`` each, ``ray_num_cpus = 1``, ``max_parallel = K``) joins it; wall time and runs per hour.
The local backend with ``max_parallel`` 1 and 2 is timed the same way for comparison.

``ddp``: ``aclab train ppo --env CartPole-v1`` (8 envs, ``--steps``) as one process and as ``torchrun
--nproc-per-node 2`` (gloo, 4 envs per rank), with and without observation + reward normalisation (whose
statistics the ranks merge every step); ``steps_per_s`` from summary.json, interleaved repeats.

Every row records the 1-minute load average when it started. Writes sweep_throughput.csv /
ddp_throughput.csv here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent
ROOT = Path("/tmp/aclab-scaling")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# A driver joining a head by address sends Ray's auth token only with RAY_AUTH_MODE=token (docs/scaling.md).
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


class RayHead:
    """``ray start --head --num-cpus=K`` on this machine; stopped by pid (only the processes it started)."""

    def __init__(self, num_cpus: int):
        self.temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                        f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1"], check=True,
                       capture_output=True, env=RAY_ENV)

    def stop(self) -> None:
        for attempt in range(3):
            pids = _processes_mentioning(self.temp_dir)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM if attempt == 0 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(2)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def sweep_once(backend: str, parallel: int, steps: int) -> dict:
    out = ROOT / f"sweep-{backend}-{parallel}-{time.time_ns()}"
    out.mkdir(parents=True)
    head = RayHead(parallel) if backend == "ray" else None
    lines = ["algos = [\"ppo\"]", "envs = [\"CartPole-v1\"]", "seeds = 4", "out_dir = \"runs\"",
             f"max_parallel = {parallel}", f"backend = \"{backend}\""]
    if head is not None:
        lines += [f"ray_address = \"{head.address}\"", "ray_num_cpus = 1"]
    lines += ["[overrides]", f"total_steps = {steps}", "\"env.backend\" = \"gymnasium\"", "\"eval.episodes\" = 0",
              "torch_threads = 1", "checkpoint_every_iterations = 0", "progress = false"]
    spec = out / "sweep.toml"
    spec.write_text("\n".join(lines) + "\n")
    load = os.getloadavg()[0]
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "aclab", "sweep", str(spec)], capture_output=True, text=True,
                                env=RAY_ENV if head is not None else None)
    finally:
        if head is not None:
            head.stop()
    wall = time.monotonic() - start
    finished = sum(json.loads(p.read_text()).get("status") == "finished"
                   for p in (out / "runs").glob("*/summary.json"))
    shutil.rmtree(out, ignore_errors=True)
    assert result.returncode == 0 and finished == 4, result.stdout[-2000:] + result.stderr[-2000:]
    return {"backend": backend, "workers": parallel, "runs": 4, "steps_per_run": steps, "wall_s": round(wall, 2),
            "runs_per_hour": round(4 * 3600 / wall, 1), "load_1min": load}


def ddp_once(ranks: int, normalize: bool, steps: int) -> dict:
    run_dir = ROOT / f"ddp-{ranks}-{int(normalize)}-{time.time_ns()}"
    train = ["-m", "aclab", "train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run_dir), "--quiet",
             "--set", f"total_steps={steps}", "--set", "env.num_envs=8", "--set", "env.backend=gymnasium",
             "--set", "eval.episodes=0", "--set", "checkpoint_every_iterations=0", "--set", "torch_threads=1",
             "--set", f"env.normalize_obs={str(normalize).lower()}",
             "--set", f"env.normalize_reward={str(normalize).lower()}"]
    command = [sys.executable, *train] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
        str(ranks), *train]
    load = os.getloadavg()[0]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"ranks": ranks, "normalize": normalize, "steps": steps, "steps_per_s": summary["steps_per_s"],
            "wall_s": summary["wall_time_s"], "load_1min": load}


def write(rows: list[dict], name: str) -> None:
    with open(OUT / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print((OUT / name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["sweep", "ddp"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        if args.what == "sweep":
            for backend in ("ray", "local"):
                for parallel in (1, 2):
                    rows.append(sweep_once(backend, parallel, args.steps or 16384))
                    print(rows[-1], flush=True)
        else:
            for normalize in (False, True):
                for ranks in (1, 2):
                    rows.append(ddp_once(ranks, normalize, args.steps or 65536))
                    print(rows[-1], flush=True)
    write(rows, f"{args.what}_throughput.csv")


if __name__ == "__main__":
    main()
