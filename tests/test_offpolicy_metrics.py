"""TD3 / SAC iteration metrics: the means over that iteration's updates, summed in place (no per-update tensor
kept alive until the iteration ends: on CPU that fragmented the heap, ~85 KB of RSS per update)."""

import gc
import sys

import pytest
import torch
from offpolicy_common import build_algo, offpolicy_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


@pytest.mark.parametrize("name", ["td3", "sac"])
def test_iteration_metrics_are_the_means_of_its_own_updates_and_keep_no_per_update_tensor(monkeypatch, name):
    algo, envs = build_algo(offpolicy_config(name, "params.learning_starts=10", total=200))
    module = sys.modules[type(algo).__module__]
    critic, actor, live, round_ = [], [], {}, [0]
    real_critic_step, real_actor_step = module.twin_critic_step, module.actor_only_step

    def critic_step(*args):
        out = real_critic_step(*args)
        critic.append(out.tolist())  # floats: the test itself keeps no tensor
        if round_[0] == 1 and len(critic) in (5, 35):  # same phase of the actor's every-2nd-update cycle
            live[len(critic)] = _live_tensors()
        return out

    def actor_step(loss, *args):
        actor.append(float(loss))
        return real_actor_step(loss, *args)

    monkeypatch.setattr(module, "twin_critic_step", critic_step)
    monkeypatch.setattr(module, "actor_only_step", actor_step)
    for round_[0] in range(2):  # the second iteration's means must not include the first's updates
        critic.clear()
        actor.clear()
        metrics = algo.iterate(envs)
        expected = torch.tensor(critic, dtype=torch.float64).mean(0)
        assert metrics["updates"] == len(critic) and len(actor) >= 2
        assert metrics["loss/critic"] == pytest.approx(float(expected[0]), rel=1e-9)
        assert metrics["q_mean"] == pytest.approx(float(expected[1]), rel=1e-9)
        assert metrics["loss/actor"] == pytest.approx(sum(actor) / len(actor), rel=1e-6)
    assert live[35] == live[5], live  # 30 more updates, no more live tensors
    if name == "sac":
        assert metrics["alpha"] == pytest.approx(float(algo.alpha), rel=1e-2)
    envs.close()
