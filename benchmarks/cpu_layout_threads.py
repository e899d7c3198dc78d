"""The IMPALA torso's CPU layout and chunking, and intra-op threads on a quiet and a loaded machine.

Two micro-workloads, each timed interleaved (best of ``--repeats`` wall times per setting):

* ``torso``: one PPO minibatch step of the Procgen agent (``ActorCritic`` with the IMPALA torso,
  shared trunk, 15 actions) on 2,048 uint8 frames 3x64x64: forward, backward and fused Adam; and the
  acting forward on 64 frames. Settings: the contiguous NCHW layout in one call (what aclab did
  before), channels-last in one call, channels-last in chunks of 64 frames (aclab's default now).
* ``threads``: the torso step (channels-last, chunks) and a TD3 learning step's matrix work
  (256-256 MLP critic pair and actor on HalfCheetah shapes, batch 256: forward, backward, Adam), at
  1 and 2 threads, quiet and with one competing busy process (``--load``) at the same priority.

    .venv/bin/python benchmarks/cpu_layout_threads.py \\
        --json docs/results/performance/cpu_layout_threads.json

Layouts are switched through ``aclab.nets.encoders`` (``CPU_CHUNK_FRAMES`` and a patched image
conversion), so the measured code is the library's. Threads are set per setting with
``torch.set_num_threads``; the process imports aclab first (passive OpenMP waits, see ``aclab``).
"""

# ruff: noqa: I001  (aclab before torch: passive OpenMP waits)
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aclab  # noqa: F401  (first: passive OpenMP waits)
import torch

from aclab.core.distributions import Categorical
from aclab.nets import encoders
from aclab.nets.agents import ActorCritic

_ORIGINAL_TO_FLOAT = encoders._to_float_image


def _nchw_to_float(observations, dtype):
    return observations.to(dtype) / 255.0 if observations.dtype == torch.uint8 else observations


def set_layout(name: str) -> None:
    """``nchw`` (contiguous, one call), ``channels_last`` (one call), ``channels_last_chunks`` (default)."""
    encoders._to_float_image = _nchw_to_float if name == "nchw" else _ORIGINAL_TO_FLOAT
    encoders.CPU_CHUNK_FRAMES = 64 if name == "channels_last_chunks" else 1 << 30


def torso_workload():
    torch.manual_seed(0)
    net = ActorCritic((3, 64, 64), Categorical(15), encoder="impala", shared=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4, eps=1e-5, fused=True)
    frames = torch.randint(0, 256, (2048, 3, 64, 64), dtype=torch.uint8)
    acting = frames[:64].clone()

    def train_step():
        logits, value = net(frames)
        loss = logits.logsumexp(-1).mean() + value.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def act():
        with torch.no_grad():
            net(acting)

    return train_step, act


def td3_workload():
    torch.manual_seed(0)
    obs_dim, act_dim, batch = 17, 6, 256

    def mlp(inputs, outputs):
        return torch.nn.Sequential(torch.nn.Linear(inputs, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, outputs))

    critics = torch.nn.ModuleList([mlp(obs_dim + act_dim, 1) for _ in range(2)])
    actor = mlp(obs_dim, act_dim)
    critic_opt = torch.optim.Adam(critics.parameters(), lr=3e-4, fused=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, fused=True)
    obs, actions, targets = torch.randn(batch, obs_dim), torch.randn(batch, act_dim), torch.randn(batch, 1)

    def step():
        with torch.no_grad():
            next_actions = torch.tanh(actor(obs))
            x = torch.cat([obs, next_actions], 1)
            target = targets + 0.99 * torch.min(critics[0](x), critics[1](x))
        x = torch.cat([obs, actions], 1)
        loss = sum((critic(x) - target).square().mean() for critic in critics)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        actor_loss = -critics[0](torch.cat([obs, torch.tanh(actor(obs))], 1)).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()

    return step


def best_time(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"machine": {"cores": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
                                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}}

    train_step, act = torso_workload()
    torch.set_num_threads(1)
    layouts = {}
    for _ in range(args.repeats):  # interleaved: one timing of each layout per round
        for name in ("nchw", "channels_last", "channels_last_chunks"):
            set_layout(name)
            row = layouts.setdefault(name, {"train_2048_s": [], "act_64_ms": []})
            row["train_2048_s"].append(best_time(train_step, 1, 1))
            row["act_64_ms"].append(1e3 * best_time(act, 5, 1))
    set_layout("channels_last_chunks")
    results["torso_layout_1_thread"] = {k: {m: min(v) for m, v in row.items()} for k, row in layouts.items()}
    print(json.dumps(results["torso_layout_1_thread"], indent=1), flush=True)

    td3_step = td3_workload()
    threads: dict = {}
    for load in ("quiet", "loaded"):
        busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "loaded" else None)
        try:
            time.sleep(0.5 if busy else 0.0)
            for n in (1, 2):
                torch.set_num_threads(n)
                threads[f"{load}_{n}"] = {"torso_train_2048_s": best_time(train_step, 1, args.repeats),
                                          "td3_step_ms": 1e3 * best_time(td3_step, 50, args.repeats)}
                print(load, n, threads[f"{load}_{n}"], flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    results["threads"] = threads
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
