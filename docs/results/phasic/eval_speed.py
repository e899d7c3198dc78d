"""Batched evaluation vs the earlier per-split loop on Procgen (docs/ppg_dcpg.md, "Evaluation").

    python docs/results/phasic/eval_speed.py [--repeats 5] [--episodes 8] [--out eval_speed.json]

Policy: an untrained PPO with the ppo-procgen preset's IMPALA torso (xavier init), greedy actions (so both
methods play the same episodes), one torch thread. Splits train and test (bigfish, easy, 200 training
levels), ``--episodes`` per split from as many envs. "sequential" is the loop aclab used before: one split
after the other, every env of the split in every forward pass until the last env has finished its
episode. "batched" is :func:`aclab.evaluate.policy.evaluate_splits`: both splits stepped together, one
forward pass per step over the envs that still owe an episode. Runs alternate (sequential, batched, ...)
so machine load hits both alike; the ratio is taken per pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.envs import build_envs
from aclab.evaluate.policy import eval_options, eval_seed, evaluate_splits
from aclab.train import make_config


class Counting:
    """Wraps ``algo.act``: counts forward calls and the frames they carry."""

    def __init__(self, algo):
        self.algo, self.calls, self.frames = algo, 0, 0

    def act(self, obs, deterministic=False):
        self.calls += 1
        self.frames += len(obs)
        return self.algo.act(obs, deterministic)


def sequential(policy, config, splits, episodes):
    """The earlier loop (aclab before the batched evaluation), one split at a time."""
    out = {}
    for split in splits:
        num_envs = min(config.eval.num_envs, episodes)
        per_env = math.ceil(episodes / num_envs)
        envs = build_envs(config, num_envs=num_envs, seed=eval_seed(config), options=eval_options(config, split))
        envs.reset(seed=eval_seed(config))
        counts = np.zeros(num_envs, dtype=np.int64)
        collected = [[] for _ in range(num_envs)]
        while counts.sum() < num_envs * per_env:
            result = envs.step(policy.act(envs.obs, True))
            for i in np.nonzero(result.episode_length > 0)[0]:
                if counts[i] < per_env:
                    collected[i].append(float(result.episode_return[i]))
                    counts[i] += 1
        envs.close()
        out[split] = [r for k in range(per_env) for env_returns in collected for r in env_returns[k:k + 1]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "eval_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = make_config("ppo", "procgen:bigfish", overrides=[
        f"eval.episodes={args.episodes}", f"eval.num_envs={args.episodes}", "eval.split=both"])
    envs = build_envs(config, num_envs=1)
    torch.manual_seed(0)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    envs.close()
    rows = []
    for repeat in range(args.repeats):
        for method in ("sequential", "batched"):
            policy = Counting(algo)
            start = time.perf_counter()
            if method == "sequential":
                returns = sequential(policy, config, ["train", "test"], args.episodes)
            else:
                results = evaluate_splits(policy, config, ["train", "test"], deterministic=True)
                returns = {split: r.returns for split, r in results.items()}
            wall = time.perf_counter() - start
            rows.append({"repeat": repeat, "method": method, "wall_s": wall, "forward_calls": policy.calls,
                         "frames": policy.frames, "returns": returns})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "returns"}), flush=True)
    ratios = [s["wall_s"] / b["wall_s"] for s, b in zip(rows[0::2], rows[1::2])]
    same = all(s["returns"] == b["returns"] for s, b in zip(rows[0::2], rows[1::2]))
    summary = {"episodes_per_split": args.episodes, "repeats": args.repeats, "load_average": os.getloadavg(),
               "median_speedup": float(np.median(ratios)), "speedups": ratios, "same_returns": same, "runs": rows}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"median speed-up {np.median(ratios):.2f}x (per pair: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"same returns: {same}; wrote {args.out}")


if __name__ == "__main__":
    main()
