"""Where the time goes in the phasic algorithms' auxiliary phase, DNA's three phases and Procgen evaluation.

Runs, one after the other and each in a fresh process under cProfile with one intra-op thread:

* ``ppg`` and ``dcpg`` on ``procgen:bigfish`` with their Procgen presets, shrunk so that two auxiliary
  phases run in 4 iterations (64 envs x 16 steps, ``N_pi = 2``; everything else as the preset: E_aux 6,
  16 auxiliary minibatches per rollout = 4 whole trajectories each);
* ``dna`` with ``dna-procgen`` shrunk the same way (64 envs x 16 steps, minibatches 512 / 256 / 128,
  2 iterations; observation and reward normalisers on, as the preset);
* ``eval``: ``aclab eval`` of the DCPG run's checkpoint, 16 episodes on each of the train and test splits.

For each workload it writes the cumulative seconds of the named parts (cProfile's ``cumtime``; the backward
pass and the convolutions by ``tottime``) and their share of the workload's total, as JSON::

    python benchmarks/phasic_profile.py --json docs/results/performance/phasic_profile.json

cProfile adds a few percent to Python-heavy code; the parts measured here are dominated by torch kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["--set", "env.num_envs=64", "--set", "params.num_steps=16", "--set", "eval.episodes=0",
          "--threads", "1", "--quiet", "--overwrite"]
WORKLOADS = {
    "ppg": ["train", "ppg", "--env", "procgen:bigfish", "--preset", "ppg-procgen", "--total-steps", "4096",
            "--set", "params.num_policy_iterations=2", *SHRINK],
    "dcpg": ["train", "dcpg", "--env", "procgen:bigfish", "--preset", "dcpg-procgen", "--total-steps", "4096",
             "--set", "params.num_policy_iterations=2", *SHRINK],
    "dna": ["train", "dna", "--env", "procgen:bigfish", "--preset", "dna-procgen", "--total-steps", "2048",
            "--set", "params.policy_minibatch_size=512", "--set", "params.value_minibatch_size=256",
            "--set", "params.distil_minibatch_size=128", *SHRINK],
}
def _phasic_parts(algo: str) -> list[tuple[str, str, str]]:
    """PPG and DCPG report the same parts, each from its own module."""
    own = f"algos/{algo}.py"
    return [(own, "iterate", "cum"), (own, "auxiliary_phase", "cum"), (own, "aux_loss", "cum"),
            ("algos/phasic.py", "dist_params_over_buffer", "cum"), ("algos/phasic.py", "mean_kl_over_buffer", "cum"),
            ("algos/phasic.py", "gather", "cum"), (own, "policy_phase", "cum"), ("data/rollout.py", "collect", "cum"),
            (own, "_act", "cum")]


# (file suffix or "~" for builtins, function name, column): the parts reported
PARTS = {
    "ppg": _phasic_parts("ppg"),
    "dcpg": _phasic_parts("dcpg"),
    "dna": [("algos/dna.py", "iterate", "cum"), ("algos/dna.py", "update", "cum"),
            ("algos/dna.py", "_policy_phase", "cum"), ("algos/dna.py", "_value_phase", "cum"),
            ("algos/dna.py", "_distil_phase", "cum"), ("algos/dna.py", "_chunked", "cum"),
            ("data/rollout.py", "collect", "cum"), ("algos/dna.py", "_act", "cum"),
            ("envs/normalize.py", "__call__", "cum"), ("data/rollout.py", "shuffled_minibatches", "cum"),
            ("data/rollout.py", "valid_transitions", "cum")],
    "eval": [("aclab/cli.py", "cmd_eval", "cum"), ("evaluate/policy.py", "_evaluate_splits", "cum"),
             ("algos/dcpg.py", "act", "cum"), ("evaluate/policy.py", "_step", "cum"),
             ("envs/build.py", "build_envs", "cum"), ("aclab/train.py", "build_algorithm", "cum")],
}
KERNELS = [("~", "run_backward", "tot"), ("~", "torch.conv2d", "tot"), ("~", "torch.max_pool2d", "tot")]


def part_seconds(stats: pstats.Stats, file_suffix: str, name: str, column: str) -> float:
    """Sum of ``cumtime`` / ``tottime`` over the profile entries of ``name`` in a file ending ``file_suffix``
    (builtins: ``file_suffix = "~"`` and ``name`` a substring of the entry's name)."""
    total = 0.0
    for (file, _line, func), (_cc, _nc, tt, ct, _callers) in stats.stats.items():
        if file_suffix == "~":
            match = file == "~" and name in func
        else:
            match = file.endswith(file_suffix) and func == name
        if match:
            total += ct if column == "cum" else tt
    return total


def profile(name: str, args: list[str], workdir: Path) -> dict:
    out = workdir / f"{name}.prof"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    aclab = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "aclab.cli"]
    load = os.getloadavg()
    start = time.perf_counter()
    subprocess.run([*aclab, *args], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    stats = pstats.Stats(str(out))
    total = stats.total_tt
    parts = {}
    for file_suffix, func, column in PARTS[name] + KERNELS:
        seconds = part_seconds(stats, file_suffix, func, column)
        key = f"{func} ({column}time)" if file_suffix == "~" else f"{file_suffix}:{func}"
        parts[key] = {"seconds": round(seconds, 3), "share_of_total": round(seconds / total, 4)}
    return {"command": "aclab " + " ".join(args), "wall_s": round(wall, 2), "profiled_total_s": round(total, 2),
            "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
            "parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=[*WORKLOADS, "eval"], default=None)
    args = parser.parse_args()
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
                     "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="aclab-phasic-profile-") as tmp:
        workdir = Path(tmp)
        for name, command in WORKLOADS.items():
            if args.only and name not in args.only and not (name == "dcpg" and "eval" in args.only):
                continue
            run_dir = workdir / f"{name}-run"
            results["workloads"][name] = profile(name, [*command, "--run-dir", str(run_dir)], workdir)
            print(name, json.dumps(results["workloads"][name]["parts"]), flush=True)
        if not args.only or "eval" in args.only:
            command = ["eval", str(workdir / "dcpg-run"), "--episodes", "16", "--split", "both", "--threads", "1",
                       "--no-log"]
            results["workloads"]["eval"] = profile("eval", command, workdir)
            print("eval", json.dumps(results["workloads"]["eval"]["parts"]), flush=True)
    results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
