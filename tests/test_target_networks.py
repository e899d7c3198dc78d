"""Target networks (TD3, SAC, PEARL): the Polyak update is arithmetic on frozen leaves, never a graph.

An in-place ``lerp`` on a frozen target whose source requires grad, run in grad mode, makes the target
require grad and records one autograd node per call; the chain lives as long as the run (3.4 KB per call for
TD3's critic pair on HalfCheetah, ~40 MB over a 12k-step run, and it kept the heap from shrinking:
docs/performance.md, Memory). These tests pin the update's arithmetic, that targets stay leaves through real
updates, and that a learning step keeps no heap memory (glibc's in-use byte count, ``aclab.core.memory.heap_in_use``).
"""

import gc

import numpy as np
import pytest
import torch
from offpolicy_common import build_algo, offpolicy_config
from test_memory import HAS_MALLINFO2
from test_pearl import ENV as PEARL_ENV
from test_pearl import TINY as PEARL_TINY

from aclab.algos.offpolicy import polyak_update
from aclab.core.memory import heap_in_use
from aclab.envs import make_env
from aclab.train import make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_frozen_leaves(module: torch.nn.Module) -> None:
    for name, param in module.named_parameters():
        assert not param.requires_grad and param.grad_fn is None and param.is_leaf, name


def test_polyak_update_is_the_convex_combination_and_records_no_graph():
    rng = np.random.default_rng(0)
    shapes = [(2, 5, 3), (2, 5), (4,)]
    target_np = [rng.standard_normal(s) for s in shapes]
    source_np = [rng.standard_normal(s) for s in shapes]
    targets = [torch.nn.Parameter(torch.tensor(t, dtype=torch.float64), requires_grad=False) for t in target_np]
    sources = [torch.nn.Parameter(torch.tensor(s, dtype=torch.float64)) for s in source_np]  # require grad
    with torch.enable_grad():
        polyak_update(targets, sources, 0.005)
    for t, t0, s0 in zip(targets, target_np, source_np):
        np.testing.assert_allclose(t.numpy(), 0.995 * t0 + 0.005 * s0, rtol=0, atol=1e-15)
        assert not t.requires_grad and t.grad_fn is None and t.is_leaf


@pytest.mark.parametrize("name", ["td3", "sac"])
def test_target_networks_stay_frozen_leaves_through_learning(name):
    algo, envs = build_algo(offpolicy_config(name, "params.learning_starts=10", total=100))
    before = [p.detach().clone() for p in algo.critic_target.parameters()]
    algo.iterate(envs)
    algo.iterate(envs)
    assert algo.critic_updates > 40
    assert any(not torch.equal(b, p) for b, p in zip(before, algo.critic_target.parameters()))  # it was updated
    _assert_frozen_leaves(algo.critic_target)
    if name == "td3":
        _assert_frozen_leaves(algo.actor_target)
    envs.close()


def test_pearl_value_target_stays_a_frozen_leaf_through_learning():
    from aclab.algos.pearl import PEARL

    config = make_config("pearl", PEARL_ENV, overrides=PEARL_TINY)
    envs = make_env(PEARL_ENV, 1, 0, options=config.env.options)
    algo = PEARL(config, envs.spec, torch.device("cpu"))
    before = [p.detach().clone() for p in algo.vf_target.parameters()]
    algo.iterate(envs)
    assert any(not torch.equal(b, p) for b, p in zip(before, algo.vf_target.parameters()))
    _assert_frozen_leaves(algo.vf_target)
    envs.close()


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc's mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("name", ["td3", "sac"])
def test_learning_steps_keep_no_heap_memory(name):
    """300 updates after 50 warm-up ones: the heap's bytes in use grow by < 100 per update (with the Polyak
    update run in grad mode: ~3,400 per update for both, and -0.1 to 7 without it)."""
    algo, envs = build_algo(offpolicy_config(name, "params.learning_starts=10", total=100))
    algo.iterate(envs)  # fills the buffer past the batch size
    rng = np.random.default_rng(0)
    batches = [algo.loop.buffer.sample(8, rng) for _ in range(350)]
    for batch in batches[:50]:
        algo.update(batch)
    gc.collect()
    start = heap_in_use()
    for batch in batches[50:]:
        algo.update(batch)
    gc.collect()
    assert (heap_in_use() - start) / 300 < 100
    envs.close()
