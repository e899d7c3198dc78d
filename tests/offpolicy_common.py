"""Shared set-up of the TD3 and SAC tests: tiny networks on Pendulum with Gymnasium's exact env state."""

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.train import build_envs, make_config

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
