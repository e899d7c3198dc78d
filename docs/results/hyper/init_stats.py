"""Generated dynamic-weight statistics of the SA-Hyper critic at initialisation on real states
(hypernetwork paper, Section 5.2: "the average initial distribution dynamic weights resembles the
Kaiming-uniform initialization").

    .venv/bin/python docs/results/hyper/init_stats.py > docs/results/hyper/init_stats.md

States: 1000 steps of uniformly random actions on HalfCheetah-v4 and Hopper-v4 (what the replay buffer
holds when learning starts with 1000 random steps). For each initialisation, the std of the generated
layer-1 and layer-2 weights over those states, divided by nn.Linear's default std 1/sqrt(3 fan_in)
(1.0 = the paper's target), for the paper-size primary (256-512-1024), one network per seed, 5 seeds.
"""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import torch

from aclab.nets.critics import HyperCritic

INITS = {
    "kaiming, standard-normal probe (before)": dict(init="kaiming"),
    "kaiming, calibrated on the states (paper, default)": dict(init="kaiming"),
    "authors, TD3 primary U(1/(2 sqrt n))": dict(init="authors", primary_init="td3"),
    "authors, SAC primary U(1/sqrt(2 n))": dict(init="authors", primary_init="sac"),
}


def random_states(env_id: str, steps: int = 1000, seed: int = 0) -> torch.Tensor:
    env = gymnasium.make(env_id)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    states = []
    for _ in range(steps):
        states.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return torch.as_tensor(np.array(states), dtype=torch.float32)


def ratios(critic: HyperCritic, states: torch.Tensor) -> list[float]:
    with torch.no_grad():
        layers = critic.net.dynamic_layers(states)
    return [float(layer.weight.std()) * math.sqrt(3.0 * fan_in)
            for layer, (fan_in, _) in zip(layers, critic.net.layer_dims)]


def main() -> None:
    torch.set_num_threads(1)
    print("| env | initialisation | W1 std / target (5 seeds) | W2 std / target (5 seeds) |")
    print("| --- | --- | --- | --- |")
    for env_id in ("HalfCheetah-v4", "Hopper-v4"):
        states = random_states(env_id)
        action_dim = gymnasium.make(env_id).action_space.shape[0]
        for label, options in INITS.items():
            rows = []
            for seed in range(5):
                torch.manual_seed(seed)
                critic = HyperCritic(states.shape[1], action_dim, ensemble_size=1, probe_size=2048, **options)
                if "calibrated" in label:
                    critic.calibrate(states, None)
                rows.append(ratios(critic, states))
            r = np.array(rows)
            print(f"| {env_id} | {label} | {r[:, 0].mean():.2f} ({r[:, 0].min():.2f}-{r[:, 0].max():.2f}) | "
                  f"{r[:, 1].mean():.2f} ({r[:, 1].min():.2f}-{r[:, 1].max():.2f}) |")


if __name__ == "__main__":
    main()
