"""aclab's PPO against Stable-Baselines3's PPO with identical hyperparameters, in one process.

Reports env steps per second, the final mean return (last 100 training episodes) and the speed
ratio aclab / SB3 for each workload. Absolute times on a shared machine mean little: read the ratio.

    .venv/bin/python benchmarks/ppo_speed.py                       # both workloads
    .venv/bin/python benchmarks/ppo_speed.py --workloads cartpole --steps 500000 --repeats 3

Workloads (CleanRL's defaults, which SB3 can express exactly):
  cartpole:    CartPole-v1, 4 envs x 128 steps, 4 epochs, 4 minibatches, lr 2.5e-4 annealed,
               separate 64-64 tanh actor and critic, clipped value loss, entropy 0.01.
  halfcheetah: HalfCheetah-v4 (aclab: EnvPool; SB3: Gymnasium), 1 env x 2048 steps, 10 epochs,
               32 minibatches, lr 3e-4 annealed, observation and reward normalisation, entropy 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

WORKLOADS = {
    "cartpole": {
        "env": "CartPole-v1",
        "sb3_env": "CartPole-v1",
        "steps": 200_000,
        "aclab": {"preset": "ppo-classic", "overrides": {}},
        "common": dict(num_envs=4, num_steps=128, epochs=4, minibatches=4, lr=2.5e-4, gamma=0.99, lam=0.95,
                       clip=0.2, clip_vf=True, ent=0.01, vf=0.5, max_grad=0.5, normalize=False),
    },
    "halfcheetah": {
        "env": "mujoco:HalfCheetah-v4",
        "sb3_env": "HalfCheetah-v4",
        "steps": 100_000,
        "aclab": {"preset": "ppo-mujoco", "overrides": {}},
        "common": dict(num_envs=1, num_steps=2048, epochs=10, minibatches=32, lr=3e-4, gamma=0.99, lam=0.95,
                       clip=0.2, clip_vf=False, ent=0.0, vf=0.5, max_grad=0.5, normalize=True),
    },
}


def run_aclab(workload: dict, steps: int, seed: int, threads: int) -> dict:
    from aclab.train import make_config, train

    c = workload["common"]
    overrides = {
        "total_steps": steps, "seed": seed, "progress": False, "eval.episodes": 0, "device": "cpu",
        "torch_threads": threads, "checkpoint_every_iterations": 0,
        "env.num_envs": c["num_envs"], "params.num_steps": c["num_steps"], "params.num_epochs": c["epochs"],
        "params.num_minibatches": c["minibatches"], "params.lr": c["lr"], "params.gamma": c["gamma"],
        "params.gae_lambda": c["lam"], "params.clip_coef": c["clip"], "params.clip_value_loss": c["clip_vf"],
        "params.ent_coef": c["ent"], "params.vf_coef": c["vf"], "params.max_grad_norm": c["max_grad"],
        "params.anneal_lr": True, "params.norm_adv": "minibatch",
        "env.normalize_obs": c["normalize"], "env.normalize_reward": c["normalize"],
    }
    config = make_config("ppo", workload["env"], workload["aclab"]["preset"], overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = train(config, f"{tmp}/run")
        wall = time.perf_counter() - start
    # steps/s of the training loop (as CleanRL's SPS): run-directory set-up and the final plot excluded
    return {"steps_per_s": summary["steps_per_s"], "final_return": summary["final_return"], "wall_s": wall}


def run_sb3(workload: dict, steps: int, seed: int, threads: int) -> dict:
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    if threads:
        torch.set_num_threads(threads)
    c = workload["common"]
    env = make_vec_env(workload["sb3_env"], n_envs=c["num_envs"], seed=seed)
    if c["normalize"]:
        env = VecNormalize(env, gamma=c["gamma"])
    batch = c["num_envs"] * c["num_steps"]
    model = PPO(
        "MlpPolicy", env, learning_rate=lambda f: c["lr"] * f, n_steps=c["num_steps"],
        batch_size=batch // c["minibatches"], n_epochs=c["epochs"], gamma=c["gamma"], gae_lambda=c["lam"],
        clip_range=c["clip"], clip_range_vf=c["clip"] if c["clip_vf"] else None, ent_coef=c["ent"],
        vf_coef=c["vf"], max_grad_norm=c["max_grad"], seed=seed, device="cpu", verbose=0,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
    )
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - start
    returns = [info["r"] for info in model.ep_info_buffer]
    del gym
    return {"steps_per_s": model.num_timesteps / wall, "final_return": float(np.mean(returns)) if returns else None,
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None, help="env steps per run (default per workload)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating aclab/SB3 pairs per workload")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (0: torch default)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    results = {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        steps = args.steps or workload["steps"]
        pairs = []
        for r in range(args.repeats):
            a = run_aclab(workload, steps, args.seed + r, args.threads)
            b = run_sb3(workload, steps, args.seed + r, args.threads)
            pairs.append((a, b))
            print(f"{name} repeat {r}: aclab {a['steps_per_s']:,.0f} steps/s (return {a['final_return']}), "
                  f"SB3 {b['steps_per_s']:,.0f} steps/s (return {b['final_return']}), "
                  f"ratio {a['steps_per_s'] / b['steps_per_s']:.2f}", flush=True)
        ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in pairs]
        results[name] = {
            "steps": steps,
            "aclab_steps_per_s": statistics.median(a["steps_per_s"] for a, _ in pairs),
            "sb3_steps_per_s": statistics.median(b["steps_per_s"] for _, b in pairs),
            "ratio_median": statistics.median(ratios),
            "aclab_final_return": [a["final_return"] for a, _ in pairs],
            "sb3_final_return": [b["final_return"] for _, b in pairs],
        }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
