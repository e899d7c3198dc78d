"""PPO: loss terms against hand-computed values, masking of autoreset dummies, learning."""

import csv
import math

import numpy as np
import pytest
import torch

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.core import losses
from aclab.data.rollout import shuffled_minibatches
from aclab.envs import build_envs
from aclab.train import make_config, train


def test_clipped_surrogate_by_hand():
    log_probs = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios 1.5, 0.5, 1.1, 0.7 (old log-prob 0)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    loss, approx_kl, clip_frac = losses.clipped_surrogate_loss(log_probs, old, adv, 0.2)
    # min(r A, clip(r) A): 1.5 -> 1.2; 0.5*1 -> 0.5; 1.1*-2 = -2.2 (unclipped, inside); 0.7*-1 vs 0.8*-1 -> -0.8
    expected = -(1.2 + 0.5 - 2.2 - 0.8) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(clip_frac.item(), 3 / 4)  # |r - 1| > 0.2 for 1.5, 0.5, 0.7
    r = np.array([1.5, 0.5, 1.1, 0.7])
    assert math.isclose(approx_kl.item(), float(np.mean((r - 1) - np.log(r))), rel_tol=1e-5)


def test_value_loss_by_hand():
    v = torch.tensor([1.0, 3.0])
    ret = torch.tensor([0.0, 0.0])
    old = torch.tensor([0.5, 1.0])
    assert math.isclose(losses.value_loss(v, ret).item(), 0.5 * (1 + 9) / 2)
    # clipped: v_clip = old + clip(v - old, -0.2, 0.2) = [0.7, 1.2]; max(v^2, v_clip^2) = [1, 9]
    assert math.isclose(losses.value_loss(v, ret, old, 0.2).item(), 0.5 * (1 + 9) / 2)
    v = torch.tensor([0.1])
    old = torch.tensor([1.0])
    # v_clip = 0.8: max(0.01, 0.64) = 0.64: the clipped term wins when the update moved V toward R too far
    assert math.isclose(losses.value_loss(v, torch.zeros(1), old, 0.2).item(), 0.5 * 0.64, rel_tol=1e-6)


def test_shuffled_minibatches_cover_each_item_once_per_epoch():
    batch = {"x": torch.arange(10), "y": torch.arange(10) * 2}
    g = torch.Generator().manual_seed(0)
    parts = list(shuffled_minibatches(batch, 3, g))
    assert len(parts) == 3 and all(len(p["x"]) == 3 for p in parts)
    seen = torch.cat([p["x"] for p in parts])
    assert len(set(seen.tolist())) == 9
    for p in parts:
        assert torch.equal(p["y"], p["x"] * 2)


def _algo(overrides):
    config = make_config("ppo", "CartPole-v1", overrides=["progress=false", "eval.episodes=0", *overrides])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    return config, envs, registry.build(config, envs.spec, resolve_device("cpu"))


def test_dummy_autoreset_steps_are_masked_and_truncation_bootstraps():
    config, envs, algo = _algo(["env.num_envs=2", "params.num_steps=64", "env.options={\"max_episode_steps\": 10}"])
    rollout, returns, lengths = algo._collector_for(envs).collect(envs, algo._act, algo._value)
    valid = rollout.valid.numpy()
    ends = rollout.ends.numpy()
    # the step after every episode end is a dummy, and only those
    expected_valid = np.ones_like(valid)
    expected_valid[1:] = ~ends[:-1]
    assert (valid[1:] == expected_valid[1:]).all() and (~valid).sum() > 0
    assert (rollout.rewards.numpy()[~valid] == 0).all()
    assert (lengths <= 10).all() and len(lengths) > 0
    # truncations (episodes of exactly 10) bootstrap: discount stays gamma where not terminated
    discounts = rollout.discounts(0.99).numpy()
    truncated = ends & ~rollout.terminated.numpy()
    assert truncated.any() and np.allclose(discounts[truncated], 0.99)


def test_update_ignores_dummy_transitions(monkeypatch):
    _, envs, algo = _algo(["env.num_envs=2", "params.num_steps=32", "env.options={\"max_episode_steps\": 5}"])
    rollout, _, _ = algo._collector_for(envs).collect(envs, algo._act, algo._value)
    seen = []
    real_forward = algo.net.forward

    def spy(obs):
        seen.append(obs.shape[0])
        return real_forward(obs)

    monkeypatch.setattr(algo.net, "forward", spy)
    adv = torch.zeros_like(rollout.rewards)
    algo.update(rollout, adv, adv)
    n_valid = int(rollout.valid.sum())
    assert sum(seen) == algo.params.num_epochs * (n_valid // algo.params.num_minibatches) * algo.params.num_minibatches


def test_numpy_and_torch_acting_learn_the_same_way():
    """Both acting paths produce valid rollouts; log-probs stored match the torch network's."""
    _, envs, algo = _algo(["params.num_steps=16"])
    assert algo.numpy_actor is not None
    rollout, _, _ = algo._collector_for(envs).collect(envs, algo._act, algo._value)
    with torch.no_grad():
        obs = rollout.obs.reshape(-1, 4)
        params, values = algo.net(obs)
        log_probs = algo.dist.log_prob(params, rollout.actions.reshape(-1))
    torch.testing.assert_close(log_probs, rollout.log_probs.reshape(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values, rollout.values[:-1].reshape(-1), rtol=1e-4, atol=1e-5)


def test_ppo_reaches_475_on_cartpole(tmp_path):
    """The demo's claim: the ppo-classic preset (CleanRL defaults, 500k steps), seed 1, reaches >= 475."""
    config = make_config("ppo", "CartPole-v1", overrides=["progress=false", "eval.episodes=10", "seed=1"])
    assert config.preset == "ppo-classic" and config.total_steps == 500_000
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] >= 475, summary
    assert summary["eval_test_return"] >= 475, summary


def test_continuous_ppo_improves_on_inverted_pendulum(tmp_path):
    config = make_config("ppo", "mujoco:InvertedPendulum-v4", overrides=["progress=false", "eval.episodes=0",
                                                                         "total_steps=30720", "seed=1"])
    train(config, tmp_path / "run")
    rows = [r for r in csv.DictReader((tmp_path / "run" / "metrics.csv").open()) if r["episode_return"]]
    first, last = float(rows[0]["episode_return"]), float(rows[-1]["episode_return"])
    assert first < 50 and last > 300, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_ppo_cartpole_other_seeds(tmp_path, seed):
    summary = train(make_config("ppo", "CartPole-v1", overrides=["progress=false", f"seed={seed}"]),
                    tmp_path / "run")
    assert summary["final_return"] >= 450, summary
