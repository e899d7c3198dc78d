"""Where a PPO minibatch step goes on a CPU, autograd against the closed-form gradient.

Builds PPO on CartPole-v1 (preset ``ppo-classic``: 4 envs x 128 steps, minibatches of 128) or HalfCheetah-v4
(``ppo-cleanrl-mujoco``: 1 env x 2,048 steps, minibatches of 64), collects one rollout, then times the parts of
the update's minibatch loop on that rollout, each part in place inside the loop (so caches and allocator state
are those of a real update):

* ``minibatch``: drawing the next minibatch (per-epoch shuffle, slices);
* ``normalize``: per-minibatch advantage normalisation;
* ``loss+grad``: autograd (forward, losses, ``zero_grad``, ``backward``) or the closed form
  (:func:`aclab.nets.analytic_ppo.ppo_loss_and_grads`);
* ``clip``: ``torch.nn.utils.clip_grad_norm_`` or :func:`aclab.algos.common.clip_grad_norm`;
* ``adam``: ``optimizer.step()`` or :func:`aclab.algos.common.adam_step`;
* ``stats``: the per-minibatch statistics row.

The two configurations ("before": autograd, torch's clip, ``optimizer.step``; "after": what PPO does now)
alternate, ``--rounds`` rounds of ``--updates`` whole updates each, one intra-op thread::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ppo_minibatch_anatomy.py \
        --json docs/results/performance/ppo_minibatch_anatomy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from aclab import registry
from aclab.algos.common import adam_step, clip_grad_norm, resolve_device
from aclab.core import losses
from aclab.core.returns import gae
from aclab.data.rollout import valid_transitions
from aclab.envs import build_envs
from aclab.nets import analytic_ppo
from aclab.train import make_config

WORKLOADS = {
    "cartpole": ("CartPole-v1", "ppo-classic"),
    "halfcheetah": ("mujoco:HalfCheetah-v4", "ppo-cleanrl-mujoco"),
}
PARTS = ("minibatch", "normalize", "loss+grad", "clip", "adam", "stats")


def setup(workload: str):
    env_id, preset = WORKLOADS[workload]
    config = make_config("ppo", env_id, preset, ["progress=false", "eval.episodes=0", "device=cpu"])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    p = algo.params
    rollout, _, _ = algo._collector_for(envs).collect(envs, algo._act, algo._value)
    advantages = gae(rollout.rewards, rollout.values, rollout.discounts(p.gamma), p.gae_lambda,
                     episode_ends=rollout.ends)
    returns = advantages + rollout.values[:-1]
    batch = valid_transitions(rollout.valid, obs=rollout.obs, actions=rollout.actions,
                              old_log_probs=rollout.log_probs, old_values=rollout.values[:-1],
                              advantages=advantages, returns=returns)
    envs.close()
    return algo, rollout, batch


def one_update(algo, rollout, batch, after: bool, totals: dict[str, float]) -> int:
    """One update (all epochs) with the parts timed into ``totals``; returns the number of minibatches."""
    p, net, dist, dp = algo.params, algo.net, algo.dist, algo.dp
    params = list(net.parameters())
    value_clip = (p.value_clip_coef if p.value_clip_coef is not None else p.clip_coef) if p.clip_value_loss else None
    count = 0
    clock = time.perf_counter
    for _ in range(p.num_epochs):
        minibatches = iter(dp.minibatches(batch, p.num_minibatches, algo.generator, rollout.valid))
        while True:
            t0 = clock()
            mb = next(minibatches, None)
            if mb is None:
                break
            t1 = clock()
            adv = losses.normalize(mb["advantages"]) if p.norm_adv == "minibatch" else mb["advantages"]
            t2 = clock()
            if after:
                row = analytic_ppo.ppo_loss_and_grads(net, mb["obs"], mb["actions"], mb["old_log_probs"], adv,
                                                      mb["returns"], mb["old_values"], clip_coef=p.clip_coef,
                                                      value_clip=value_clip, vf_coef=p.vf_coef, ent_coef=p.ent_coef)
            else:
                dist_params, values = net(mb["obs"])
                log_probs = dist.log_prob(dist_params, mb["actions"])
                pg, kl, cf = losses.clipped_surrogate_loss(log_probs, mb["old_log_probs"], adv, p.clip_coef)
                v_loss = losses.value_loss(values, mb["returns"], mb["old_values"], value_clip)
                entropy = dist.entropy(dist_params).mean()
                algo.optimizer.zero_grad(set_to_none=True)
                (pg + p.vf_coef * v_loss - p.ent_coef * entropy).backward()
                row = torch.stack([pg.detach(), v_loss.detach(), entropy.detach(), kl, cf])
            t3 = clock()
            if after:
                norm = clip_grad_norm(params, p.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm, foreach=True)
            t4 = clock()
            if after:
                adam_step(algo.optimizer)
            else:
                algo.optimizer.step()
            t5 = clock()
            torch.cat([row, norm.unsqueeze(0)])
            t6 = clock()
            for part, (a, b) in zip(PARTS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
                totals[part] += b - a
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=5, help="whole updates per round and configuration")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for workload in args.workloads:
        algo, rollout, batch = setup(workload)
        one_update(algo, rollout, batch, True, dict.fromkeys(PARTS, 0.0))  # warm-up, creates Adam's state
        rounds = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                totals, count = dict.fromkeys(PARTS, 0.0), 0
                for _ in range(args.updates):
                    count += one_update(algo, rollout, batch, name == "after", totals)
                rounds[name].append({part: 1e6 * v / count for part, v in totals.items()})
        summary = {}
        for name, per_round in rounds.items():
            summary[name] = {part: statistics.median(r[part] for r in per_round) for part in PARTS}
            summary[name]["total"] = statistics.median(sum(r.values()) for r in per_round)
        summary["speedup"] = summary["before"]["total"] / summary["after"]["total"]
        results[workload] = {"minibatch_size": int(batch["obs"].shape[0]) // algo.params.num_minibatches,
                             "rounds": rounds, "median_us_per_minibatch": summary}
        print(f"{workload}: us per minibatch step (median of {args.rounds} rounds)")
        for name in ("before", "after"):
            print(f"  {name:6s} " + "  ".join(f"{part} {summary[name][part]:.0f}" for part in (*PARTS, "total")))
        print(f"  speed-up of the minibatch step: {summary['speedup']:.2f}x")
    if args.json:
        machine = {"cores": os.cpu_count(), "load_avg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M"),
                   "torch": torch.__version__, "command": " ".join(sys.argv)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
