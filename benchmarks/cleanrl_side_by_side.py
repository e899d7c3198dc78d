"""aclab against a CleanRL checkout, side by side: steps/s and peak memory on the same workloads.

CleanRL is not part of aclab: give the path of a checkout installed in its own virtual environment
(docs/performance.md, "Installing the CleanRL peer"). Each repeat runs every workload once with aclab
and once with CleanRL, one after the other (the order alternates between repeats so slow drifts of
the machine's load hit both), each in a fresh process with the same intra-op threads
(``OMP_NUM_THREADS`` for both, ``--threads`` for aclab). Steps/s are what each program reports for
its own loop (aclab's ``summary.json`` ``steps_per_s``, CleanRL's last ``SPS:`` line); peak RSS is
the process's ``ru_maxrss`` from ``wait4``. The table gives the median ratio aclab / CleanRL and the
range over repeats, with the load average before each pair.

    .venv/bin/python benchmarks/cleanrl_side_by_side.py --cleanrl /path/to/cleanrl --repeats 3 \\
        --json docs/results/performance/side_by_side.json --markdown docs/results/performance/side_by_side.md

Workloads (CleanRL's script at its defaults unless stated; aclab with the matching settings):

  procgen       ppo_procgen.py --env-id bigfish, 32,768 steps (64 envs x 256, 3 epochs, 8 minibatches, all
                levels, reward normalisation with gamma 0.999, advantages per minibatch)
  td3           td3_continuous_action.py HalfCheetah-v4, 12,000 steps, 5,000 random
  sac           sac_continuous_action.py HalfCheetah-v4, 12,000 steps, 5,000 random
  ppo-cartpole  ppo.py CartPole-v1, 100,000 steps
  ppo-mujoco    ppo_continuous_action.py HalfCheetah-v4, 49,152 steps (24 iterations of 2048)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCGEN_OPTIONS = 'env.options={"levels": "test", "distribution_mode": "easy"}'
WORKLOADS: dict[str, dict] = {
    "procgen": {
        "label": "PPO Procgen bigfish, ppo_procgen.py settings, 32k steps",
        "cleanrl": ["cleanrl/ppo_procgen.py", "--env-id", "bigfish", "--total-timesteps", "32768"],
        "aclab": ["ppo", "--env", "procgen:bigfish", "--preset", "ppo-procgen", "--total-steps", "32768",
                  "--set", PROCGEN_OPTIONS, "--set", "params.norm_adv=minibatch", "--set", "env.reward_gamma=0.999"],
    },
    "td3": {
        "label": "TD3 HalfCheetah-v4, 12k steps (5k random)",
        "cleanrl": ["cleanrl/td3_continuous_action.py", "--env-id", "HalfCheetah-v4", "--total-timesteps", "12000",
                    "--learning-starts", "5000"],
        "aclab": ["td3", "--env", "mujoco:HalfCheetah-v4", "--preset", "td3-mujoco", "--total-steps", "12000",
                  "--set", "params.learning_starts=5000"],
    },
    "sac": {
        "label": "SAC HalfCheetah-v4, 12k steps (5k random)",
        "cleanrl": ["cleanrl/sac_continuous_action.py", "--env-id", "HalfCheetah-v4", "--total-timesteps", "12000",
                    "--learning-starts", "5000"],
        "aclab": ["sac", "--env", "mujoco:HalfCheetah-v4", "--preset", "sac-cleanrl", "--total-steps", "12000",
                  "--set", "params.learning_starts=5000"],
    },
    "ppo-cartpole": {
        "label": "PPO CartPole-v1, ppo.py defaults, 100k steps",
        "cleanrl": ["cleanrl/ppo.py", "--env-id", "CartPole-v1", "--total-timesteps", "100000"],
        "aclab": ["ppo", "--env", "CartPole-v1", "--preset", "ppo-classic", "--total-steps", "100000"],
    },
    "ppo-mujoco": {
        "label": "PPO HalfCheetah-v4, ppo_continuous_action.py settings, 49k steps",
        "cleanrl": ["cleanrl/ppo_continuous_action.py", "--env-id", "HalfCheetah-v4", "--total-timesteps", "49152"],
        "aclab": ["ppo", "--env", "mujoco:HalfCheetah-v4", "--preset", "ppo-cleanrl-mujoco", "--total-steps",
                  "49152"],
    },
}
# equal work: CleanRL's scripts evaluate nothing, checkpoint nothing and draw no plot at the end
ACLAB_COMMON = ["--quiet", "--set", "eval.episodes=0", "--set", "checkpoint_every_iterations=0", "--set",
                "logging.learning_curve=false", "--set", "device=cpu"]
SPS = re.compile(r"SPS:\s*([0-9.]+)")


def run_process(command: list[str], cwd: str, env: dict[str, str], timeout_s: float) -> dict:
    """Run ``command``; return its output, exit code, wall time and peak RSS (MB) from wait4."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    return {"returncode": process.returncode, "output": text, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": usage.ru_maxrss / 1024.0}


def run_aclab(workload: dict, threads: int, seed: int, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "aclab", "train", *workload["aclab"], *ACLAB_COMMON, "--seed", str(seed),
                   "--run-dir", str(run_dir)]
        if threads:
            command += ["--threads", str(threads)]
        result = run_process(command, tmp, env, timeout_s)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if result["returncode"] != 0 or "steps_per_s" not in summary:
        raise RuntimeError(f"aclab failed ({result['returncode']}): {' '.join(command)}\n{result['output'][-3000:]}")
    return {"steps_per_s": float(summary["steps_per_s"]), "peak_rss_mb": result["peak_rss_mb"],
            "wall_s": result["wall_s"]}


def run_cleanrl(workload: dict, cleanrl: Path, python: str, threads: int, seed: int, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # CleanRL as it runs by itself
    script, *args = workload["cleanrl"]
    with tempfile.TemporaryDirectory() as tmp:  # CleanRL writes runs/ into its working directory
        command = [python, str(cleanrl / script), *args, "--seed", str(seed)]
        result = run_process(command, tmp, {**env, "PYTHONPATH": str(cleanrl)}, timeout_s)
    values = SPS.findall(result["output"])
    if result["returncode"] != 0 or not values:
        raise RuntimeError(f"CleanRL failed ({result['returncode']}): {' '.join(command)}\n{result['output'][-3000:]}")
    return {"steps_per_s": float(values[-1]), "peak_rss_mb": result["peak_rss_mb"], "wall_s": result["wall_s"]}


PACKAGES = ("torch", "gymnasium", "mujoco", "numpy")


def package_versions(python: str) -> dict[str, str | None]:
    """The versions of :data:`PACKAGES` in the environment of ``python`` (None where one is not installed)."""
    code = ("import importlib.metadata as m, json\n"
            "def v(p):\n    try:\n        return m.version(p)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            f"print(json.dumps({{p: v(p) for p in {PACKAGES!r}}}))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


def summarise(rows: list[dict]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        speed = [r["aclab"]["steps_per_s"] / r["cleanrl"]["steps_per_s"] for r in mine]
        memory = [r["aclab"]["peak_rss_mb"] / r["cleanrl"]["peak_rss_mb"] for r in mine]
        table[name] = {
            "label": WORKLOADS[name]["label"],
            "aclab_steps_per_s": [r["aclab"]["steps_per_s"] for r in mine],
            "cleanrl_steps_per_s": [r["cleanrl"]["steps_per_s"] for r in mine],
            "speed_ratio_median": statistics.median(speed), "speed_ratio_min": min(speed),
            "speed_ratio_max": max(speed),
            "aclab_peak_rss_mb": [r["aclab"]["peak_rss_mb"] for r in mine],
            "cleanrl_peak_rss_mb": [r["cleanrl"]["peak_rss_mb"] for r in mine],
            "rss_ratio_median": statistics.median(memory),
            "load_avg": [r["load_avg"] for r in mine],
        }
    return table


def markdown(table: dict[str, dict], threads: int) -> str:
    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"

    lines = [f"| workload ({threads or 'default'} thread(s)) | aclab steps/s | CleanRL steps/s | ratio (median, range) "
             "| peak RSS aclab / CleanRL (MB) | load avg |", "| --- | --- | --- | --- | --- | --- |"]
    for row in table.values():
        lines.append(
            f"| {row['label']} | {span(row['aclab_steps_per_s'], ',.0f')} | {span(row['cleanrl_steps_per_s'], ',.0f')} "
            f"| {row['speed_ratio_median']:.2f} ({row['speed_ratio_min']:.2f}-{row['speed_ratio_max']:.2f}) "
            f"| {span(row['aclab_peak_rss_mb'], '.0f')} / {span(row['cleanrl_peak_rss_mb'], '.0f')} "
            f"({row['rss_ratio_median']:.2f}) | {span(row['load_avg'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cleanrl", type=Path, required=True, help="a CleanRL checkout (its repository root)")
    parser.add_argument("--cleanrl-python", help="the interpreter of CleanRL's venv (default CLEANRL/.venv/bin/python)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both (0: each one's default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--markdown", type=Path, help="write the ratio table here")
    args = parser.parse_args()
    cleanrl = args.cleanrl.resolve()
    python = args.cleanrl_python or str(cleanrl / ".venv" / "bin" / "python")
    if not (cleanrl / "cleanrl" / "ppo.py").exists():
        parser.error(f"{cleanrl} is not a CleanRL checkout (no cleanrl/ppo.py)")
    rows = []
    for repeat in range(args.repeats):
        for name in args.workloads:
            workload, seed = WORKLOADS[name], args.seed + repeat
            load = os.getloadavg()[0]
            order = ("aclab", "cleanrl") if repeat % 2 == 0 else ("cleanrl", "aclab")
            row = {"workload": name, "repeat": repeat, "seed": seed, "threads": args.threads, "load_avg": load}
            for who in order:
                if who == "aclab":
                    row["aclab"] = run_aclab(workload, args.threads, seed, args.timeout)
                else:
                    row["cleanrl"] = run_cleanrl(workload, cleanrl, python, args.threads, seed, args.timeout)
            rows.append(row)
            print(f"{name} repeat {repeat} (load {load:.1f}): aclab {row['aclab']['steps_per_s']:,.0f} steps/s "
                  f"{row['aclab']['peak_rss_mb']:.0f} MB, CleanRL {row['cleanrl']['steps_per_s']:,.0f} steps/s "
                  f"{row['cleanrl']['peak_rss_mb']:.0f} MB, ratio "
                  f"{row['aclab']['steps_per_s'] / row['cleanrl']['steps_per_s']:.2f}", flush=True)
    table = summarise(rows)
    text = markdown(table, args.threads)
    print(text)
    machine = {"cores": os.cpu_count(), "uname": " ".join(os.uname()), "date": time.strftime("%Y-%m-%d %H:%M"),
               "command": " ".join(sys.argv),
               "versions": {"aclab": package_versions(sys.executable), "cleanrl": package_versions(python)}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "summary": table}, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
