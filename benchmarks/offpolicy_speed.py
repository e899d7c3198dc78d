"""Steps/s of aclab's TD3 and SAC with CleanRL's hyperparameters, and Stable-Baselines3 as an in-process peer.

The workload is CleanRL's (td3_continuous_action.py / sac_continuous_action.py): HalfCheetah-v4, one
env, networks 256-256, batch 256, 5,000 uniformly random steps, then one gradient step per env step,
12,000 steps in all. CleanRL's own figures on this kind of machine (2 CPU cores, torch 2.13 CPU) are
passed in with ``--cleanrl-td3`` / ``--cleanrl-sac`` (defaults: the measured 256 and 130 steps/s) and
the ratio is printed. Each measurement is the run's steps / wall seconds from the first env step to
the end (CleanRL: ``global_step / (time.time() - start_time)``, its clock starting after setup).

    .venv/bin/python benchmarks/offpolicy_speed.py                    # aclab TD3 + SAC, then SB3
    .venv/bin/python benchmarks/offpolicy_speed.py --algos td3 --no-sb3 --threads 2 --repeats 3

aclab runs go through :func:`aclab.train.train` (the real training loop, logging and a final
checkpoint included). Hyperparameters: TD3 = preset ``td3-mujoco`` (CleanRL's TD3 defaults) with
``learning_starts = 5000``; SAC = preset ``sac-cleanrl``. SB3: the same values where SB3 has them
(its SAC uses one learning rate for actor, critics and temperature and updates the actor every step,
so it does the same or more work per step than CleanRL's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLEANRL = {"td3": 256.0, "sac": 130.0}
PRESETS = {"td3": "td3-mujoco", "sac": "sac-cleanrl"}


def run_aclab(algo: str, steps: int, learning_starts: int, threads: int, seed: int) -> dict:
    from aclab.train import make_config, train

    overrides = ["progress=false", "eval.episodes=0", f"total_steps={steps}", f"seed={seed}",
                 f"params.learning_starts={learning_starts}", f"torch_threads={threads}",
                 "checkpoint_every_iterations=0", "env.num_envs=1"]
    config = make_config(algo, "mujoco:HalfCheetah-v4", preset=PRESETS[algo], overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = train(config, Path(tmp) / "run")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # steps/s of the loop itself (from the first step to the final checkpoint), as CleanRL counts from
    # after building its env and networks; with_setup_steps_per_s adds run-dir, env and network setup
    return {"steps_per_s": summary["steps_per_s"], "with_setup_steps_per_s": steps / wall,
            "cpu_steps_per_s": steps / cpu, "final_return": summary["final_return"]}


def run_sb3(algo: str, steps: int, learning_starts: int, threads: int, seed: int) -> dict:
    import gymnasium
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise

    if threads > 0:
        torch.set_num_threads(threads)
    env = gymnasium.make("HalfCheetah-v4")
    common = dict(buffer_size=1_000_000, learning_starts=learning_starts, batch_size=256, tau=0.005, gamma=0.99,
                  train_freq=1, gradient_steps=1, policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu",
                  verbose=0)
    if algo == "td3":
        noise = NormalActionNoise(np.zeros(6), 0.1 * np.ones(6))
        model = TD3("MlpPolicy", env, learning_rate=3e-4, action_noise=noise, policy_delay=2,
                    target_policy_noise=0.2, target_noise_clip=0.5, **common)
    else:
        model = SAC("MlpPolicy", env, learning_rate=3e-4, ent_coef="auto", **common)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    env.close()
    return {"steps_per_s": steps / wall, "cpu_steps_per_s": steps / cpu}


def td3_gemm_floor(threads: int, batch: int = 256, obs_dim: int = 17, act_dim: int = 6, hidden: int = 256,
                   repeats: int = 300) -> dict:
    """Seconds per TD3 learning step spent in its matrix products alone (no autograd, optimiser or env).

    Lists every GEMM of one TD3 step with 256-256 networks (target actor and twin target critics
    forward; twin critics forward, weight and input gradients; half an actor step: actor forward and
    backward, critic forward and input gradients) at their real shapes and times them with
    ``torch.mm`` on preallocated tensors: a floor no implementation of these hyperparameters can beat
    in fp32 on this CPU, to read the loop's time against.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    mlp_actor, mlp_critic = [obs_dim, hidden, hidden, act_dim], [obs_dim + act_dim, hidden, hidden, 1]
    shapes: list[tuple[int, int, int, float]] = []  # (m, k, n, weight): [m, k] @ [k, n], weight = calls per step

    def forward(widths: list[int], weight: float) -> None:
        shapes.extend((batch, i, o, weight) for i, o in zip(widths[:-1], widths[1:]))

    def backward(widths: list[int], weight: float, input_grad_first: bool, weight_grads: bool) -> None:
        for layer, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
            if weight_grads:
                shapes.append((i, batch, o, weight))          # dW = x^T @ dy
            if layer > 0 or input_grad_first:
                shapes.append((batch, o, i, weight))          # dx = dy @ W^T

    forward(mlp_actor, 1.0)                                   # target actor
    forward(mlp_critic, 2.0)                                  # twin target critics
    forward(mlp_critic, 2.0)                                  # twin critics
    backward(mlp_critic, 2.0, input_grad_first=False, weight_grads=True)
    forward(mlp_actor, 0.5)                                   # actor step every second step
    forward(mlp_critic, 0.5)
    backward(mlp_critic, 0.5, input_grad_first=True, weight_grads=False)
    backward(mlp_actor, 0.5, input_grad_first=False, weight_grads=True)
    flops = sum(2 * m * k * n * w for m, k, n, w in shapes)
    operands = [(torch.randn(m, k), torch.randn(k, n), torch.empty(m, n), w) for m, k, n, w in shapes]
    for a, b, out, _ in operands:
        torch.mm(a, b, out=out)
    seconds = 0.0
    for a, b, out, weight in operands:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        seconds += weight * (time.perf_counter() - start) / repeats
    return {"seconds_per_step": seconds, "gflop_per_step": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=["td3", "sac"], choices=["td3", "sac"])
    parser.add_argument("--steps", type=int, default=12_000)
    parser.add_argument("--learning-starts", type=int, default=5_000)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads for every run (0: the training loop's automatic setting, "
                             "which is all cores for TD3/SAC; torch's default for SB3)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-sb3", action="store_true")
    parser.add_argument("--cleanrl-td3", type=float, default=CLEANRL["td3"])
    parser.add_argument("--cleanrl-sac", type=float, default=CLEANRL["sac"])
    parser.add_argument("--json", type=str, default=None, help="also write the results to this file")
    parser.add_argument("--gemm-floor", action="store_true",
                        help="also time the matrix products of one TD3 step alone and print the steps/s they allow")
    args = parser.parse_args()
    if args.gemm_floor:
        floor = td3_gemm_floor(args.threads)
        learning = args.steps - args.learning_starts
        best = args.steps / (learning * floor["seconds_per_step"])
        print(f"TD3 GEMM floor, threads {args.threads}: {floor['gflop_per_step']:.3f} GFLOP per learning step, "
              f"{1e3 * floor['seconds_per_step']:.2f} ms ({floor['gflop_per_s']:.0f} GFLOP/s) -> at most "
              f"{best:.0f} steps/s for {args.steps} steps with {args.learning_starts} random ones "
              f"(random steps counted as free)", flush=True)
    cleanrl = {"td3": args.cleanrl_td3, "sac": args.cleanrl_sac}
    results = []
    for algo in args.algos:
        for repeat in range(args.repeats):
            row = {"algo": algo, "repeat": repeat, "threads": args.threads, "load_avg": os.getloadavg()[0]}
            row["aclab"] = run_aclab(algo, args.steps, args.learning_starts, args.threads, args.seed + repeat)
            row["cleanrl_reference"] = cleanrl[algo]
            row["ratio_vs_cleanrl"] = row["aclab"]["steps_per_s"] / cleanrl[algo]
            if not args.no_sb3:
                row["sb3"] = run_sb3(algo, args.steps, args.learning_starts, args.threads, args.seed + repeat)
                row["ratio_vs_sb3"] = row["aclab"]["steps_per_s"] / row["sb3"]["steps_per_s"]
            results.append(row)
            a = row["aclab"]
            line = (f"{algo} repeat {repeat} threads {args.threads} (load {row['load_avg']:.1f}): aclab "
                    f"{a['steps_per_s']:.0f} steps/s (per CPU second {a['cpu_steps_per_s']:.0f}) = "
                    f"{row['ratio_vs_cleanrl']:.2f}x CleanRL ({cleanrl[algo]:.0f})")
            if "sb3" in row:
                b = row["sb3"]
                line += (f"; SB3 {b['steps_per_s']:.0f} steps/s (per CPU second {b['cpu_steps_per_s']:.0f}), "
                         f"aclab/SB3 = {row['ratio_vs_sb3']:.2f}x (CPU time: "
                         f"{a['cpu_steps_per_s'] / b['cpu_steps_per_s']:.2f}x)")
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
