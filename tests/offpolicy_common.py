"""Shared set-up of the TD3 and SAC tests: tiny networks on Pendulum with Gymnasium's exact env state."""

import numpy as np

from aclab import registry
from aclab.algos.common import resolve_device, seed_everything
from aclab.envs import build_envs
from aclab.evaluate.policy import evaluate
from aclab.train import make_config

FAST = ["progress=false", "eval.episodes=0", "torch_threads=1"]  # tiny networks: one thread
TINY = ["params.actor_hidden=[16,16]", 'params.critic_options={"hidden_sizes":[16,16]}', "params.batch_size=8",
        "params.learning_starts=40", "params.steps_per_iteration=50"]


def offpolicy_config(algo: str, *extra: str, env: str = "Pendulum-v1", total: int = 200):
    """``algo`` with FAST and TINY on one Gymnasium env for ``total`` steps, then ``extra`` overrides."""
    return make_config(algo, env, overrides=[*FAST, *TINY, "env.backend=gymnasium", "env.num_envs=1",
                                             f"total_steps={total}", *extra])


def build_algo(config, seed_envs: int = 0):
    """The algorithm of ``config`` on CPU and its envs, reset with ``seed_envs``."""
    envs = build_envs(config)
    envs.reset(seed=seed_envs)
    return registry.build(config, envs.spec, resolve_device("cpu")), envs


def learn_and_evaluate(algo_name: str, env_id: str, total: int, seed: int, *extra: str) -> float:
    """Train with 64-unit networks for ``total`` steps; mean return of the mean action on 4 eval episodes."""
    config = make_config(algo_name, env_id, overrides=[
        *FAST, "env.backend=gymnasium", f"total_steps={total}", "params.learning_starts=1000",
        "params.actor_hidden=[64,64]", 'params.critic_options={"hidden_sizes":[64,64]}', "params.batch_size=128",
        "params.actor_lr=1e-3", "params.critic_lr=1e-3", "eval.episodes=4", "eval.num_envs=4", f"seed={seed}",
        *extra])
    seed_everything(seed)
    algo, envs = build_algo(config, seed_envs=seed)
    while algo.steps < config.total_steps:
        algo.iterate(envs)
    returns = evaluate(algo, config, "test", train_envs=envs)
    envs.close()
    return float(np.mean(returns))
