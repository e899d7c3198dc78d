"""Data-parallel equivalence cases: one process with N envs against ranks with N / world_size envs each.

Imported by ``tests/test_distributed.py`` (which builds the data and the single-process references) and
run under ``torchrun`` as a script::

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_cases.py DATA.pt OUT_DIR

Every case feeds the *same* recorded data to an algorithm's own ``iterate`` (its collector replaced by
one that replays the recorded rollouts, each rank seeing only its envs' columns) and records the
parameters afterwards. The data are real CartPole rollouts with short episodes, so they contain episode
ends and next-step-autoreset dummies (invalid steps), and the minibatches are small, so a rank often
holds none of a minibatch.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from aclab import distributed, registry
from aclab.algos.common import seed_everything
from aclab.data.actors import Chunk, TrajectoryCollector
from aclab.data.rollout import Rollout, RolloutCollector
from aclab.envs import build_envs
from aclab.envs.normalize import RunningMeanStd
from aclab.train import make_config

NUM_ENVS = 4
COMMON = ["progress=false", "eval.episodes=0", "env.backend=gymnasium", f"env.num_envs={NUM_ENVS}",
          'env.options={"max_episode_steps": 9}', "torch_threads=1"]

# name -> (algorithm, overrides, iterations). Small minibatches so that a rank often holds none of one.
CASES: dict[str, tuple[str, list[str], int]] = {
    "ppo": ("ppo", ["params.num_steps=8", "params.num_minibatches=8", "params.num_epochs=3",
                    "params.norm_adv=minibatch", "params.target_kl=0.0005", "params.lr=3e-3"], 2),
    "ppo-batch-norm": ("ppo", ["params.num_steps=8", "params.num_minibatches=4", "params.norm_adv=batch",
                               "params.lr=3e-3"], 2),
    "ppg": ("ppg", ["params.num_steps=8", "params.num_minibatches=4", "params.num_policy_iterations=2",
                    "params.aux_epochs=2", f"params.aux_num_minibatches={NUM_ENVS}", "params.lr=3e-3"], 2),
    "dcpg": ("dcpg", ["params.num_steps=8", "params.num_minibatches=4", "params.num_policy_iterations=2",
                      "params.aux_epochs=2", "params.aux_num_minibatches=2", "params.lr=3e-3"], 2),
    "dna": ("dna", ["params.num_steps=8", "params.policy_minibatch_size=4", "params.value_minibatch_size=2",
                    "params.distil_minibatch_size=8", "params.lr=3e-3"], 2),
    "fixpo": ("fixpo", ["params.num_steps=8", "params.minibatch_size=8", "params.fixup_minibatch_size=6",
                        "params.eps_kl=0.002", "params.num_epochs=3", "params.lr=1e-2", "params.norm_adv=minibatch"],
              2),
    "impala": ("impala", ["params.num_steps=6", "params.hidden_sizes=[16]", "params.head_hidden=0",
                          "params.lr=1e-2"], 2),
    "impala-mean": ("impala", ["params.num_steps=6", "params.hidden_sizes=[16]", "params.head_hidden=0",
                               "params.lr=1e-2", "params.loss_reduction=mean"], 2),
    "stac": ("stac", ["params.num_steps=6", "params.hidden_sizes=[16]", "params.head_hidden=0", "params.lr=1e-2",
                      "params.meta_lr=1e-2", "params.max_grad_norm=1.0"], 2),
}


def config_for(name: str):
    algo, overrides, _ = CASES[name]
    return make_config(algo, "CartPole-v1", overrides=[*COMMON, *overrides])


def build(name: str):
    """The case's algorithm, built as the training loop builds it: the run's seed for the networks (the same
    on every rank), the rank's seed for its own generators."""
    config = config_for(name)
    seed_everything(config.seed)
    envs = build_envs(config, num_envs=1)
    dp = distributed.current()
    algo = registry.build(dataclasses.replace(config, seed=dp.rank_seed(config.seed)), envs.spec, torch.device("cpu"))
    envs.close()
    return algo


# ------------------------------------------------------------------------------------------------ data
def record(name: str) -> list:
    """The case's data: ``iterations`` rollouts (or IMPALA chunks) of NUM_ENVS CartPole envs, collected
    with the initial policy of a separate copy of the algorithm."""
    config = config_for(name)
    iterations = CASES[name][2]
    algo = build(name)
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    out = []
    if hasattr(algo, "acting"):  # IMPALA / STAC: chunks of trajectories
        p = algo.params
        collector = TrajectoryCollector(NUM_ENVS, envs.spec.obs_shape, envs.spec.obs_dtype, p.num_steps, p.overlap,
                                        (), np.int64, algo.net.state_size)
        for k in range(iterations):
            out.append(collector.collect(envs, algo.acting, k))
    else:
        act = algo._act
        value = algo._value if hasattr(algo, "_value") else None
        collector = RolloutCollector(envs, algo.params.num_steps, algo.dist.param_dim, torch.device("cpu"))
        for _ in range(iterations):
            rollout, _, _ = collector.collect(envs, act, value)
            out.append((Rollout(**{k: v.clone() for k, v in vars(rollout).items()}),
                        torch.as_tensor(envs.obs).clone()))
    envs.close()
    return out


def columns(item, rank: int, world_size: int):
    """The envs ``[rank B / K, (rank + 1) B / K)`` of a rollout (plus next obs) or of a chunk."""
    per = NUM_ENVS // world_size
    cols = slice(rank * per, (rank + 1) * per)
    if isinstance(item, Chunk):
        fields = {k: getattr(item, k) for k in ("obs", "actions", "behaviour_log_probs", "rewards", "terminated",
                                                 "ends", "valid", "first", "versions")}
        return Chunk(**{k: np.ascontiguousarray(v[:, cols]) for k, v in fields.items()},
                     core_state=None if item.core_state is None else item.core_state[cols],
                     episode_returns=np.zeros(0), episode_lengths=np.zeros(0, dtype=np.int64),
                     env_steps=item.env_steps // world_size, actor_id=item.actor_id)
    rollout, next_obs = item
    return Rollout(**{k: v[:, cols].contiguous() for k, v in vars(rollout).items()}), next_obs[cols].contiguous()


class _Replay:
    """Stands in for an algorithm's collector (and envs): returns the recorded rollouts in turn."""

    def __init__(self, items: list):
        self.items = list(items)
        self.obs = None

    def collect(self, envs, act_fn=None, value_fn=None):
        rollout, next_obs = self.items.pop(0)
        self.obs = next_obs.numpy()
        return rollout, np.zeros(0), np.zeros(0, dtype=np.int64)


def run_case(name: str, items: list, generator_state: torch.Tensor) -> dict:
    """Build the case's algorithm, replay ``items`` through its ``iterate``, return its learned state.

    ``generator_state``: the shuffling generator's state at the start (the algorithm's own in one process,
    the data-parallel context's shared one with several ranks)."""
    algo = build(name)
    dp = distributed.current()
    if dp.enabled:
        dp.generator.set_state(generator_state)
    else:
        algo.generator.set_state(generator_state)
    if hasattr(algo, "acting"):
        chunks = list(items)
        algo.next_chunk = lambda envs: chunks.pop(0)
        for _ in range(len(items)):
            algo.iterate(None)
    else:
        replay = _Replay(items)
        algo._collector = replay
        for _ in range(len(items)):
            algo.iterate(replay)
    state = copy.deepcopy(algo.state_dict())
    keep = {k: v for k, v in state.items() if k in ("net", "policy_net", "value_net", "aux_value_head", "beta",
                                                    "logits", "square_avgs", "steps")}
    keep["meta_grad"] = getattr(algo, "last_meta_grad", None)
    return keep


def normaliser_batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Observation batches [NUM_ENVS, 3] with valid masks; in one of them every env of rank 1 is invalid."""
    rng = np.random.default_rng(seed)
    batches = []
    for k in range(5):
        valid = rng.random(NUM_ENVS) < 0.7
        if k == 2:
            valid[NUM_ENVS // 2:] = False
        batches.append((rng.normal(3.0 * k, 1.0 + k, size=(NUM_ENVS, 3)), valid))
    return batches


def run_normaliser(rank: int, world_size: int, reducer) -> dict:
    rms = RunningMeanStd((3,))
    rms.reducer = reducer
    per = NUM_ENVS // world_size
    for x, valid in normaliser_batches():
        part, ok = x[rank * per:(rank + 1) * per], valid[rank * per:(rank + 1) * per]
        rms.update(part[ok])
    return rms.state_dict()


def main(data_path: str, out_dir: str) -> None:
    data = torch.load(data_path, weights_only=False)
    dp = distributed.init_from_environment(seed=0)
    distributed.use(dp)
    torch.set_num_threads(1)
    results = {}
    for name, (items, generator_state) in data["cases"].items():
        results[name] = run_case(name, [columns(item, dp.rank, dp.world_size) for item in items], generator_state)
    results["normaliser"] = run_normaliser(dp.rank, dp.world_size, dp.merge_moments)
    results["world_size"] = dp.world_size
    torch.save(results, Path(out_dir) / f"rank{dp.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
