"""PPO: loss terms against hand-computed values, masking of autoreset dummies, learning."""

import csv
import math

import numpy as np
import pytest
import torch

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.core import losses
from aclab.data.rollout import LARGE_ITEM_ELEMENTS, shuffled_minibatches, valid_transitions
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


def test_shuffled_minibatches_gather_large_items_per_minibatch_as_one_shuffle():
    """Image-sized items are gathered per minibatch, small ones sliced from one shuffle: every minibatch
    equals the straightforward reference ``v[perm][i * size:(i + 1) * size]`` of the same permutation,
    so frames stay aligned with their actions."""
    n = 23
    frames = torch.randint(0, 256, (n, 3, 16, 32), dtype=torch.uint8)  # 1,536 elements per item: large
    batch = {"obs": frames, "actions": torch.arange(n), "params": torch.randn(n, 5)}
    assert frames[0].numel() >= LARGE_ITEM_ELEMENTS > batch["params"][0].numel()
    parts = list(shuffled_minibatches(batch, 4, torch.Generator().manual_seed(3)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    size = n // 4
    assert len(parts) == 4
    for i, part in enumerate(parts):
        for k, v in batch.items():
            assert torch.equal(part[k], v[perm][i * size:(i + 1) * size]), (i, k)
        assert torch.equal(part["obs"], frames[part["actions"]])


def test_valid_transitions_keeps_real_steps_in_time_major_order():
    """Against a loop over t then b: only valid steps, in the order t * B + b, every trailing shape kept."""
    T, B = 3, 4
    valid = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    obs = torch.randn(T, B, 2, 5)
    logp = torch.randn(T, B)
    params = torch.randn(T, B, 6)
    batch = valid_transitions(valid, obs=obs, old_log_probs=logp, old_params=params)
    keep = [(t, b) for t in range(T) for b in range(B) if valid[t, b]]
    assert torch.equal(batch["obs"], torch.stack([obs[t, b] for t, b in keep]))
    assert torch.equal(batch["old_log_probs"], torch.stack([logp[t, b] for t, b in keep]))
    assert torch.equal(batch["old_params"], torch.stack([params[t, b] for t, b in keep]))


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


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_update_ignores_dummy_transitions(monkeypatch, gradients):
    from aclab.nets import analytic_ppo

    _, envs, algo = _algo(["env.num_envs=2", "params.num_steps=32", "env.options={\"max_episode_steps\": 5}",
                           f"params.gradients={gradients}"])
    rollout, _, _ = algo._collector_for(envs).collect(envs, algo._act, algo._value)
    seen = []
    real_forward, real_analytic = algo.net.forward, analytic_ppo.ppo_loss_and_grads

    def spy(obs):
        seen.append(obs.shape[0])
        return real_forward(obs)

    def spy_analytic(net, obs, *args, **kwargs):
        seen.append(obs.shape[0])
        return real_analytic(net, obs, *args, **kwargs)

    monkeypatch.setattr(algo.net, "forward", spy)
    monkeypatch.setattr(analytic_ppo, "ppo_loss_and_grads", spy_analytic)
    adv = torch.zeros_like(rollout.rewards)
    algo.update(rollout, adv, adv)
    n_valid = int(rollout.valid.sum())
    assert sum(seen) == algo.params.num_epochs * (n_valid // algo.params.num_minibatches) * algo.params.num_minibatches


def _slow_gae(rewards, values, terminated, ends, gamma, lam):
    """GAE with python loops: delta_t = r_t + gamma (1 - term_t) V_{t+1} - V_t; the trace is cut at episode ends."""
    T, B = rewards.shape
    adv = np.zeros((T, B))
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            discount = 0.0 if terminated[t, b] else gamma
            delta = rewards[t, b] + discount * values[t + 1, b] - values[t, b]
            last = delta + discount * lam * (0.0 if ends[t, b] else 1.0) * last
            adv[t, b] = last
    return adv


def _spy_update(algo, captured: list, envs=None) -> None:
    real = algo.update

    def update(rollout, advantages, returns):
        if envs is not None:  # V of the observation that follows the rollout, before any update
            with torch.no_grad():
                captured.append({"next_value": algo.net.value(torch.as_tensor(envs.obs)).clone()})
        captured.append({"rollout": {k: getattr(rollout, k).clone() for k in
                                     ("obs", "actions", "log_probs", "values", "rewards", "terminated", "ends",
                                      "valid")},
                         "advantages": advantages.clone(), "returns": returns.clone()})
        return real(rollout, advantages, returns)

    algo.update = update


def test_advantages_are_gae_and_returns_add_the_rollout_values():
    """A_t = GAE(gamma, lambda) over the rollout, truncations bootstrapping from V(final obs), terminations
    not, and R_t = A_t + V_t (the PPO paper, Eqs. 11-12; CleanRL), against a loop reference."""
    _, envs, algo = _algo(["env.num_envs=2", "params.num_steps=64", "env.options={\"max_episode_steps\": 10}"])
    captured = []
    _spy_update(algo, captured, envs)
    algo.iterate(envs)
    envs.close()
    c = captured[1]
    torch.testing.assert_close(c["rollout"]["values"][-1], captured[0]["next_value"], rtol=1e-5, atol=1e-6)
    r = {k: v.double().numpy() for k, v in c["rollout"].items()}
    assert (r["ends"] * (1 - r["terminated"])).any()  # some truncations
    expected = _slow_gae(r["rewards"], r["values"], r["terminated"], r["ends"], 0.99, 0.95)
    valid = r["valid"].astype(bool)
    np.testing.assert_allclose(c["advantages"].numpy()[valid], expected[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c["returns"].numpy()[valid], (expected + r["values"][:-1])[valid], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_each_gradient_step_is_that_of_the_ppo_loss_written_out(gradients, monkeypatch):
    """With one minibatch, every step's (clipped) gradient equals that of
    L = -mean(min(r A, clip(r, 1 -+ eps) A)) + c_v 0.5 mean(max((V - R)^2, (V_clip - R)^2)) - c_e mean H,
    A normalised over the minibatch, computed here on a copy of the network with torch.distributions, then
    clipped to a global norm of 0.5; the second epoch exercises the ratio and value clipping. Both ways of
    computing the gradient (autograd, and the closed form that "auto" picks on CPU) are checked."""
    import copy

    from torch import distributions as td

    _, envs, algo = _algo(["env.num_envs=2", "params.num_steps=64", "params.num_minibatches=1",
                           "params.num_epochs=3", "params.lr=0.01", f"params.gradients={gradients}"])
    assert algo.analytic == (gradients == "analytic")
    p = algo.params
    assert (p.clip_value_loss, p.norm_adv, p.ent_coef, p.vf_coef, p.max_grad_norm) == (
        True, "minibatch", 0.01, 0.5, 0.5)
    captured, checked = [], []
    _spy_update(algo, captured)
    from aclab.algos import ppo as ppo_module

    real_step = ppo_module.adam_step

    def step(optimizer):
        assert optimizer is algo.optimizer
        c = captured[-1]
        valid = c["rollout"]["valid"].reshape(-1)
        obs = c["rollout"]["obs"].reshape(-1, 4)[valid]
        actions = c["rollout"]["actions"].reshape(-1)[valid]
        old_log_probs = c["rollout"]["log_probs"].reshape(-1)[valid]
        old_values = c["rollout"]["values"][:-1].reshape(-1)[valid]
        adv = c["advantages"].reshape(-1)[valid]
        ret = c["returns"].reshape(-1)[valid]
        net = copy.deepcopy(algo.net)
        logits, values = net(obs)
        dist = td.Categorical(logits=logits)
        ratio = torch.exp(dist.log_prob(actions) - old_log_probs)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
        v_clip = old_values + (values - old_values).clamp(-0.2, 0.2)
        v_loss = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2).mean()
        (pg + 0.5 * v_loss - 0.01 * dist.entropy().mean()).backward()
        grads = [q.grad for q in net.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        for mine, ref in zip(algo.net.parameters(), grads):
            torch.testing.assert_close(mine.grad, ref * scale, rtol=1e-4, atol=1e-6)
        checked.append((float(norm), float(((ratio - 1).abs() > 0.2).float().mean()),
                        float(((values - old_values).abs() > 0.2).float().mean())))
        return real_step(optimizer)

    monkeypatch.setattr(ppo_module, "adam_step", step)
    algo.iterate(envs)
    envs.close()
    assert len(checked) == 3
    assert max(c[0] for c in checked) > 0.5  # the clip was active
    assert max(c[1] for c in checked) > 0 and max(c[2] for c in checked) > 0  # ratio and value clipping mattered


def test_learning_rate_anneals_linearly_to_zero():
    """CleanRL's schedule: lr_k = lr (1 - k / N) at iteration k of N = total_steps / batch."""
    _, envs, algo = _algo(["env.num_envs=2", "params.num_steps=16", "total_steps=128"])
    lrs = [algo.iterate(envs)["lr"] for _ in range(3)]
    envs.close()
    assert lrs == pytest.approx([2.5e-4, 2.5e-4 * 3 / 4, 2.5e-4 / 2])


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
