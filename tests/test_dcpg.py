"""DCPG, Separate DCPG, DDCPG and its ablations: the delayed value update (C_V), the auxiliary loss, the
dynamics discriminator (negatives, objective per mode, reset masking, OOD-action count), the analysis
functions on a run directory, resume, end-to-end runs on CartPole and a tiny Procgen configuration."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from run_rows import assert_resumed_like_uninterrupted

from aclab import analyze as run_analysis
from aclab import registry
from aclab.algos import phasic
from aclab.algos.common import resolve_device
from aclab.algos.phasic import (
    DynamicsDiscriminator,
    DynamicsModel,
    dynamics_objective,
    ood_action_counts,
    sample_other_indices,
    sample_wrong_actions,
    trajectory_dynamics_loss,
)
from aclab.config import ConfigError
from aclab.envs import build_envs
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
TINY = [*FAST, "env.num_envs=4", "params.num_steps=32", "params.num_minibatches=4", "params.gamma=0.99"]
DCPG_VARIANTS = ["dcpg", "sdcpg", "ddcpg", "dcpg-f", "dcpg-i", "dcpg-fi"]



pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

def _algo(name: str, overrides: list[str], env_id: str = "CartPole-v1"):
    config = make_config(name, env_id, overrides=overrides)
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return config, envs, registry.build(config, envs.spec, resolve_device("cpu"))


# ------------------------------------------------------------------------------------------------ registry
def test_names_fix_their_switches_and_share_the_dcpg_presets():
    expected = {"dcpg": ("off", False), "sdcpg": ("off", True), "ddcpg": ("joint", False),
                "dcpg-f": ("forward", False), "dcpg-i": ("inverse", False), "dcpg-fi": ("two", False)}
    for name, (dynamics, separate) in expected.items():
        config = make_config(name, preset="dcpg-procgen")
        assert registry.default_preset(name, "procgen", True) == "dcpg-procgen"
        assert registry.default_preset(name, "classic", True) == "dcpg-classic"
        assert config.params.dynamics == dynamics and config.params.separate_value is separate, name
    assert make_config("ddcpg", preset="dcpg-procgen").params.dynamics_eta == 0.5
    assert make_config("dcpg-fi", preset="dcpg-procgen").params.dynamics_eta == 1.0
    config = make_config("dcpg", "procgen:bigfish")
    p = config.params  # DCPG paper, Tables 2 and 3
    assert config.preset == "dcpg-procgen" and config.env.num_envs == 64 and p.encoder == "impala"
    assert (p.num_steps, p.gamma, p.num_minibatches, p.policy_epochs, p.num_policy_iterations, p.aux_epochs,
            p.aux_num_minibatches, p.clone_coef, p.value_anchor_coef, p.lr) == (256, 0.999, 8, 1, 32, 6, 16, 1.0,
                                                                                 1.0, 5e-4)


# ------------------------------------------------------------------------------------------------ C_V
def test_value_anchor_is_zero_at_the_first_minibatch_and_grows():
    """C_V uses the rollout-time predictions: 0 (to float precision) before the first update, then positive
    once updates have moved the shared torso. A C_V recomputed from the current network would stay 0."""
    _, envs, algo = _algo("dcpg", [*TINY, "params.policy_epochs=3", "params.num_policy_iterations=8"])
    algo.iterate(envs)
    anchor = algo.last_policy_phase_stats[:, 2]
    assert anchor.shape[0] == 12
    assert anchor[0].item() < 1e-12
    assert (anchor[1:] > 1e-9).all() and anchor[1:].max() > 1e6 * max(anchor[0].item(), 1e-18)


def test_policy_phase_does_not_regress_the_value_to_returns():
    """With beta_V = 0 nothing in the policy phase touches the value head (no J_V there); with beta_V = 1
    C_V's gradient reaches both the head and the shared torso."""
    heads = {}
    for beta in (0.0, 1.0):
        _, envs, algo = _algo("dcpg", [*TINY, f"params.value_anchor_coef={beta}", "params.num_policy_iterations=8"])
        head_before = algo.net.value_head.weight.detach().clone()
        torso_before = [q.detach().clone() for q in algo.net.policy_encoder.parameters()]
        algo.iterate(envs)
        heads[beta] = not torch.equal(head_before, algo.net.value_head.weight)
        assert any(not torch.equal(a, b) for a, b in zip(torso_before, algo.net.policy_encoder.parameters()))
    assert heads == {0.0: False, 1.0: True}


def _torso_after(name: str, overrides: list[str], iterations: int) -> list[torch.Tensor]:
    """The shared torso's parameters after ``iterations`` iterations (no gradient clipping, so that the
    losses that do not reach the torso cannot change its updates through the clipping factor)."""
    _, envs, algo = _algo(name, [*TINY, "params.max_grad_norm=1e9", *overrides])
    for _ in range(iterations):
        algo.iterate(envs)
    envs.close()
    return [q.detach().clone() for q in algo.net.policy_encoder.parameters()]


def test_value_anchor_gradient_reaches_the_shared_torso():
    """DCPG paper, Algorithm 2: C_V = 0.5 E[(V_theta(s) - V_old(s))^2] is a loss of the whole value network
    on the shared torso, so it shapes the torso's features: with and without it the torso ends elsewhere."""
    base = ["params.policy_epochs=3", "params.num_policy_iterations=8"]
    with_anchor = _torso_after("dcpg", [*base, "params.value_anchor_coef=1.0"], 1)
    without = _torso_after("dcpg", [*base, "params.value_anchor_coef=0.0"], 1)
    assert any(not torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(with_anchor, without))


def test_dynamics_loss_gradient_reaches_the_shared_torso():
    """DDCPG (DCPG paper, Section 4.2, F.2): the discriminator reads the policy torso's features and its loss
    trains that torso too; with beta_f = 0 only the discriminator's own weights would differ."""
    base = ["params.num_policy_iterations=2", "params.aux_epochs=1", "params.aux_num_minibatches=2"]
    with_dynamics = _torso_after("ddcpg", [*base, "params.dynamics_coef=1.0"], 2)
    without = _torso_after("ddcpg", [*base, "params.dynamics_coef=0.0"], 2)
    assert any(not torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(with_dynamics, without))


def test_value_anchor_gradient_is_that_of_half_squared_distance_to_stored_values():
    torch.manual_seed(0)
    values = torch.randn(6, requires_grad=True)
    stored = torch.randn(6)
    from aclab.core import losses

    losses.value_loss(values, stored).backward()
    torch.testing.assert_close(values.grad, (values - stored).detach() / 6)


# ------------------------------------------------------------------------------------------------ aux loss
def _filled(name: str, overrides: list[str]):
    config, envs, algo = _algo(name, [*TINY, "params.num_policy_iterations=3", "params.aux_num_minibatches=2",
                                      *overrides])
    for _ in range(2):
        algo.iterate(envs)
    return config, envs, algo


def test_aux_loss_matches_a_slow_reference():
    """Separate DCPG: 0.5 (V_theta - R_theta)^2 + beta KL(old || new) + 0.5 (V_phi - R_phi)^2 per valid state."""
    _, _, algo = _filled("sdcpg", ["params.aux_epochs=1", "params.clone_coef=0.5"])
    buffer = algo.buffer
    phasic.dist_params_over_buffer(algo.net.dist_params, buffer, "old_params", 64, torch.device("cpu"))
    with torch.no_grad():
        algo.net.policy_head.weight.add_(0.05 * torch.randn_like(algo.net.policy_head.weight))
    mb = buffer.gather(torch.tensor([1, 4, 7]), ("returns", "old_params", "returns_phi"), torch.device("cpu"))
    mb["valid"][2, 0] = False
    loss, parts = algo.aux_loss(mb)
    n, T = mb["valid"].shape
    total, count = 0.0, 0
    for i in range(n):
        for t in range(T):
            if not bool(mb["valid"][i, t]):
                continue
            obs = mb["obs"][i, t].unsqueeze(0)
            logits, value = algo.net(obs)
            log_p, log_old = torch.log_softmax(logits[0], -1), torch.log_softmax(mb["old_params"][i, t], -1)
            kl = (log_old.exp() * (log_old - log_p)).sum()
            phi = algo.value_net(obs)[0]
            total = total + 0.5 * (value[0] - mb["returns"][i, t]) ** 2 + 0.5 * kl + 0.5 * (
                phi - mb["returns_phi"][i, t]) ** 2
            count += 1
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)
    assert parts[1].item() > 1e-5 and parts[2].item() > 0


def _capture(algo, envs) -> dict:
    collector = algo._collector_for(envs)
    real, kept = collector.collect, {}

    def collect(*args):
        rollout, returns, lengths = real(*args)
        kept.update({k: getattr(rollout, k).clone() for k in ("rewards", "values", "terminated", "ends", "valid")})
        return rollout, returns, lengths

    collector.collect = collect
    return kept


def test_separate_dcpg_stores_two_targets_and_uses_v_phi_for_advantages():
    from aclab.core.returns import gae

    _, envs, algo = _algo("sdcpg", [*TINY, "params.num_policy_iterations=3",
                                    "env.options={\"max_episode_steps\": 20}"])
    kept = _capture(algo, envs)
    import copy

    phi_before = copy.deepcopy(algo.value_net)
    theta_before = copy.deepcopy(algo.net)
    theta_head = algo.net.value_head.weight.detach().clone()
    phi_params = [q.detach().clone() for q in algo.value_net.parameters()]
    algo.iterate(envs)
    frames = algo.buffer.obs[0]  # [T + 1, B, ...]: the stored states and the final next state
    T, B = kept["rewards"].shape
    with torch.no_grad():  # the collector's values are V_phi at rollout time, _theta_values V_theta
        torch.testing.assert_close(kept["values"], phi_before(frames.flatten(0, 1)).view(T + 1, B))
        torch.testing.assert_close(torch.as_tensor(algo._theta_values),
                                   theta_before.value(frames.flatten(0, 1)).view(T + 1, B))
    discounts = 0.99 * (~kept["terminated"]).float()
    r_phi = gae(kept["rewards"], kept["values"], discounts, 0.95, episode_ends=kept["ends"]) + kept["values"][:-1]
    valid = kept["valid"]
    torch.testing.assert_close(algo.buffer.fields["returns_phi"][0][valid], r_phi[valid])
    # ... and R_theta comes from V_theta's rollout-time predictions, kept separately
    theta = torch.as_tensor(algo._theta_values)
    r_theta = gae(kept["rewards"], theta, discounts, 0.95, episode_ends=kept["ends"]) + theta[:-1]
    torch.testing.assert_close(algo.buffer.fields["returns"][0][valid], r_theta[valid])
    assert not torch.allclose(r_theta[valid], r_phi[valid])
    # V_phi is fitted in the policy phase, V_theta's head is only anchored (it moves with C_V)
    assert any(not torch.equal(a, b) for a, b in zip(phi_params, algo.value_net.parameters()))
    assert not torch.equal(theta_head, algo.net.value_head.weight)


# ------------------------------------------------------------------------------------------------ dynamics
def test_wrong_actions_follow_the_histogram_without_the_own_action():
    g = torch.Generator().manual_seed(0)
    actions = torch.tensor([0, 0, 0, 1, 2, 2])  # histogram 3, 1, 2 over 4 actions (action 3 never occurs)
    draws = torch.stack([sample_wrong_actions(actions, 4, g) for _ in range(6000)])  # [6000, 6]
    assert (draws != actions).all()
    freq_for_a0 = torch.bincount(draws[:, 0], minlength=4).float() / 6000  # own 0 removed: 1/3, 2/3 for 1, 2
    np.testing.assert_allclose(freq_for_a0.numpy(), [0, 1 / 3, 2 / 3, 0], atol=0.03)
    freq_for_a1 = torch.bincount(draws[:, 3], minlength=4).float() / 6000  # own 1 removed: 3/5, 2/5 for 0, 2
    np.testing.assert_allclose(freq_for_a1.numpy(), [0.6, 0, 0.4, 0], atol=0.03)
    same = torch.zeros(5, dtype=torch.int64)  # no other action in the batch: uniform over the others
    draws = torch.stack([sample_wrong_actions(same, 3, g) for _ in range(3000)])
    np.testing.assert_allclose((torch.bincount(draws.reshape(-1), minlength=3).float() / draws.numel()).numpy(),
                               [0, 0.5, 0.5], atol=0.03)


def test_canonical_wrong_actions_come_from_the_other_classes():
    g = torch.Generator().manual_seed(0)
    canonical = torch.tensor([0, 1, 1, 3, 3, 3])  # classes {0}, {1, 2}, {3, 4, 5}
    actions = torch.tensor([0, 0, 2, 4, 5, 1])  # class histogram: 2, 2, 2
    draws = torch.stack([sample_wrong_actions(actions, 6, g, canonical) for _ in range(6000)])
    assert (canonical[draws] != canonical[actions]).all()  # never an alias of the true action
    assert set(draws.unique().tolist()) <= {0, 1, 3}  # only canonical actions
    np.testing.assert_allclose((torch.bincount(draws[:, 2], minlength=6).float() / 6000).numpy(),
                               [0.5, 0, 0, 0.5, 0, 0], atol=0.03)  # action 2 (class 1): classes 0 and 3
    one_class = torch.tensor([3, 4, 5, 4])  # no other class in the batch: uniform over the other classes
    draws = torch.stack([sample_wrong_actions(one_class, 6, g, canonical) for _ in range(3000)])
    np.testing.assert_allclose((torch.bincount(draws.reshape(-1), minlength=6).float() / draws.numel()).numpy(),
                               [0.5, 0.5, 0, 0, 0, 0], atol=0.03)
    raw = sample_wrong_actions(actions, 6, torch.Generator().manual_seed(1))
    same = sample_wrong_actions(actions, 6, torch.Generator().manual_seed(1), torch.arange(6))
    assert torch.equal(raw, same)  # singleton classes: the raw sampler


def test_canonical_negatives_option_builds_the_games_classes():
    with pytest.raises(ConfigError, match="dynamics_negatives"):
        make_config("ddcpg", "CartPole-v1", overrides=["params.dynamics_negatives=canonical"])
    config = make_config("ddcpg", "procgen:bigfish", overrides=[
        "params.dynamics_negatives=canonical", "env.num_envs=2", "params.num_steps=4", "params.num_minibatches=1",
        "params.num_policy_iterations=2", "params.aux_num_minibatches=1", "params.dynamics_resets=authors"])
    envs = build_envs(config)
    envs.reset(seed=0)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    assert algo.dynamics.canonical.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4]
    for _ in range(2):
        metrics = algo.iterate(envs)
    envs.close()
    assert math.isfinite(metrics["aux/dynamics_loss"]) and "ends" in algo.buffer.fields


def test_other_indices_are_uniform_over_the_others():
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_other_indices(5, g) for _ in range(5000)])
    assert (draws != torch.arange(5)).all()
    freq = torch.bincount(draws[:, 2], minlength=5).float() / 5000
    np.testing.assert_allclose(freq.numpy(), [0.25, 0.25, 0, 0.25, 0.25], atol=0.03)
    assert sample_other_indices(1, g).tolist() == [0]


def _bce(logit: float, label: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def test_dynamics_objective_per_mode_by_hand():
    pos, wa, wn, ipos, iwa = (torch.tensor(x) for x in ([0.5, -1.0], [0.2, 2.0], [-0.3, 1.0], [1.5, 0.1],
                                                         [-2.0, 0.3]))

    def mean_bce(x, label):
        return sum(_bce(v, label) for v in x.tolist()) / len(x)

    eta = 0.5
    joint = mean_bce(pos, 1) + eta * mean_bce(wa, 0) + mean_bce(wn, 0)
    assert dynamics_objective("joint", eta, pos, wa, wn).item() == pytest.approx(joint, rel=1e-5)
    assert dynamics_objective("forward", eta, pos, None, wn).item() == pytest.approx(
        mean_bce(pos, 1) + mean_bce(wn, 0), rel=1e-5)
    assert dynamics_objective("inverse", eta, pos, wa, None).item() == pytest.approx(
        mean_bce(pos, 1) + mean_bce(wa, 0), rel=1e-5)
    two = mean_bce(pos, 1) + mean_bce(wn, 0) + 1.0 * (mean_bce(ipos, 1) + mean_bce(iwa, 0))
    assert dynamics_objective("two", 1.0, pos, None, wn, ipos, iwa).item() == pytest.approx(two, rel=1e-5)


@pytest.mark.parametrize("mode", ["joint", "forward", "inverse", "two"])
def test_dynamics_model_loss_uses_the_right_negatives(mode):
    torch.manual_seed(0)
    model = DynamicsModel(mode, 3, 4, (8,), eta=0.5)
    feats, nxt = torch.randn(7, 3), torch.randn(7, 3)
    actions = torch.tensor([0, 1, 1, 2, 3, 0, 2])
    loss, accuracy = model.loss(feats, actions, nxt, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the same negatives
    wrong_a = sample_wrong_actions(actions, 4, g) if mode != "forward" else None
    wrong_n = nxt[sample_other_indices(7, g)] if mode != "inverse" else None
    f = model.discriminator
    pos = f(feats, actions, nxt)
    wa = f(feats, wrong_a, nxt) if mode in ("joint", "inverse") else None
    wn = f(feats, actions, wrong_n) if mode != "inverse" else None
    ipos = iwa = None
    if mode == "two":
        ipos, iwa = model.inverse_discriminator(feats, actions, nxt), model.inverse_discriminator(feats, wrong_a, nxt)
    expected = dynamics_objective(mode, 0.5, pos, wa, wn, ipos, iwa)
    torch.testing.assert_close(loss, expected)
    assert 0.0 <= accuracy.item() <= 1.0
    loss.backward()
    assert all(q.grad is not None for q in model.discriminator.parameters())


def test_dynamics_transition_pairs_at_resets(monkeypatch):
    model = DynamicsModel("joint", 2, 9, (4,), eta=0.5)
    seen = {}

    def fake_loss(features, actions, next_features, generator):
        seen.update(pairs=[(int(a[1]), int(b[1])) for a, b in zip(features, next_features)],
                    trajectories=[int(a[0]) for a in features], actions=actions.tolist())
        return torch.zeros(()), torch.zeros(())

    monkeypatch.setattr(model, "loss", fake_loss)
    T = 4
    # features[i, r] = (trajectory i, row r); row t + 1 is the observation after step t
    features = torch.stack([torch.tensor([[float(i), float(r)] for r in range(T + 1)]) for i in range(2)])
    actions = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    # trajectory 0: step 0 ends an episode, step 1 is its autoreset dummy, step 3 ends one at the last step;
    # trajectory 1: step 2 ends an episode, step 3 is the dummy
    valid = torch.tensor([[True, False, True, True], [True, True, True, False]])
    ends = torch.tensor([[True, False, False, True], [False, False, True, False]])
    expected = {
        "mask": ([(0, 1), (2, 3), (3, 4), (0, 1), (1, 2), (2, 3)], [1, 3, 4, 5, 6, 7]),
        # the authors' pair: the episode's last observation and action -> the next episode's first observation
        # (row t + 2, after the dummy); an end at the rollout's last step has its reset frame outside it
        "authors": ([(0, 2), (2, 3), (0, 1), (1, 2), (2, 4)], [1, 3, 5, 6, 7]),
        "dummy": ([(0, 1), (1, 2), (2, 3), (3, 4), (0, 1), (1, 2), (2, 3), (3, 4)], [1, 2, 3, 4, 5, 6, 7, 8]),
    }
    for resets, (pairs, acts) in expected.items():
        trajectory_dynamics_loss(model, features, actions, valid, resets, torch.Generator(), ends)
        assert seen["pairs"] == pairs and seen["actions"] == acts, resets
        assert seen["trajectories"] == [a // 5 for a in acts]
    with pytest.raises(ValueError, match="needs the episode ends"):
        trajectory_dynamics_loss(model, features, actions, valid, "authors", torch.Generator())


def test_ood_action_count_matches_a_loop():
    torch.manual_seed(3)
    disc = DynamicsDiscriminator(4, 5, (16,))
    with torch.no_grad():
        disc.mlp.layers[-1].bias.fill_(0.05)  # some logits on both sides of 0
    feats, nxt = torch.randn(20, 4), torch.randn(20, 4)
    actions = torch.randint(0, 5, (20,))
    counts = ood_action_counts(disc, feats, actions, nxt)
    expected = []
    for i in range(20):
        c = 0
        for a in range(5):
            if a != int(actions[i]):
                logit = disc(feats[i:i + 1], torch.tensor([a]), nxt[i:i + 1])
                c += int(torch.sigmoid(logit).item() > 0.5)
        expected.append(c)
    assert counts.tolist() == expected and 0 < sum(expected) < 20 * 4
    # over distinct actions: one representative per class, the own class left out
    canonical = torch.tensor([0, 1, 1, 3, 3])  # classes {0}, {1, 2}, {3, 4}
    distinct = ood_action_counts(disc, feats, actions, nxt, canonical)
    expected = []
    for i in range(20):
        own = int(canonical[actions[i]])
        expected.append(sum(int(disc(feats[i:i + 1], torch.tensor([rep]), nxt[i:i + 1]).item() > 0)
                            for rep in (0, 1, 3) if rep != own))
    assert distinct.tolist() == expected and (distinct <= 2).all()


# ------------------------------------------------------------------------------------------------ runs
@pytest.mark.parametrize("name", DCPG_VARIANTS)
def test_variants_train_end_to_end_on_cartpole(tmp_path, name):
    config = make_config(name, "CartPole-v1", overrides=[*TINY, "total_steps=768", "params.num_policy_iterations=2",
                                                         "params.aux_epochs=1", "eval.episodes=2"])
    summary = train(config, tmp_path / name)
    assert summary["status"] == "finished" and summary["steps"] == 768 and "eval_test_return" in summary
    rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
    aux_rows = [r for r in rows if r.get("aux/kl_after")]
    assert len(aux_rows) == 3
    assert all(bool(r.get("aux/dynamics_loss")) == (name not in ("dcpg", "sdcpg")) for r in aux_rows)
    assert all(bool(r.get("aux/separate_value_loss")) == (name == "sdcpg") for r in aux_rows)


def _tiny_procgen() -> list[str]:
    return ["progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=4", "params.num_minibatches=2",
            "params.num_policy_iterations=2", "params.aux_epochs=1", "params.aux_num_minibatches=1", "total_steps=16"]


@pytest.mark.parametrize("name", ["ddcpg"] + [pytest.param(n, marks=pytest.mark.slow)
                                              for n in ("dcpg", "sdcpg", "dcpg-f", "dcpg-i", "dcpg-fi")])
def test_variants_train_end_to_end_on_tiny_procgen(tmp_path, name):
    config = make_config(name, "procgen:bigfish", overrides=_tiny_procgen())
    summary = train(config, tmp_path / name)
    assert summary["status"] == "finished" and summary["steps"] == 16
    state = load_latest_checkpoint(tmp_path / name / "checkpoints")["algo"]
    assert state["num_aux_phases"] == 1 and state["buffer"]["obs"].dtype == torch.uint8


@pytest.mark.parametrize("name", ["ddcpg", "sdcpg"])
def test_resume_mid_phase_equals_uninterrupted(tmp_path, name):
    overrides = [*TINY, "total_steps=1664", "params.num_policy_iterations=3", "params.aux_epochs=2",
                 "checkpoint_every_iterations=2", "params.log_value_bias=true"]
    train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "full")
    first = train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "split", stop_after_iterations=4)
    assert first["status"] == "interrupted"
    assert load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]["buffer"]["size"] == 1
    train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "split", resume=True)
    assert_resumed_like_uninterrupted(tmp_path / "full", tmp_path / "split")


@pytest.mark.parametrize("name", ["dcpg", "sdcpg"])
def test_training_analyses_do_not_change_training(name):
    """Stiffness goes through torch.func.functional_call, which replaces the Parameter objects of a submodule
    registered under two names (the shared torso is both policy_encoder and value_encoder): measured on the
    live network, the optimiser would silently stop training the torso. The analyses measure a copy."""
    nets = []
    for extra in ([], ["params.log_value_bias=true", "params.stiffness_every=2", "params.stiffness_states=32"]):
        _, envs, algo = _algo(name, [*TINY, "params.num_policy_iterations=2", "params.aux_epochs=1", *extra])
        measured = [("stiffness/cosine" in algo.iterate(envs)) for _ in range(3)]
        assert measured == ([True, False, True] if extra else [False] * 3)
        optimised = {id(q) for group in algo.policy_optimizer.param_groups for q in group["params"]}
        assert all(id(q) in optimised for q in algo.net.parameters())
        nets.append(algo.net.state_dict())
    for key in nets[0]:
        assert torch.equal(nets[0][key], nets[1][key]), key


def test_value_parameter_selection_leaves_stiffness_unchanged():
    """Only the value path's parameters are differentiated; the others would contribute exact zeros."""
    from aclab.algos.phasic import ValueFunction, value_parameter_names
    from aclab.analysis.stiffness import value_stiffness
    from aclab.core.distributions import Categorical
    from aclab.nets.agents import ActorCritic, FusedMLPActorCritic

    torch.manual_seed(0)
    states, targets = torch.randn(12, 4), torch.randn(12)
    nets = [FusedMLPActorCritic(4, Categorical(2), hidden_sizes=(8,)),
            ActorCritic((4,), Categorical(2), hidden_sizes=(8,), shared=False),
            ActorCritic((4,), Categorical(2), hidden_sizes=(8,), shared=True)]
    for net in nets:
        module = ValueFunction(net)
        names = value_parameter_names(module)
        assert not any("policy_head" in n for n in names)
        selected = value_stiffness(module, states, targets, params=names, sign="exact")
        everything = value_stiffness(module, states, targets, sign="exact")
        assert selected.cosine == pytest.approx(everything.cosine, abs=1e-6)
        assert selected.sign == everything.sign


def test_analysis_functions_on_a_run_directory(tmp_path):
    config = make_config("ddcpg", "CartPole-v1", overrides=[*TINY, "total_steps=1024", "params.num_policy_iterations=2",
                                                            "params.aux_epochs=2", "env.normalize_reward=true"])
    train(config, tmp_path / "run")
    stiffness = run_analysis.run_stiffness(tmp_path / "run", num_states=64, sign="exact")
    assert stiffness["num_states"] == 64 and stiffness["num_sign_pairs"] == 64 * 63 // 2
    assert -1 <= stiffness["cosine"] <= 1 and -1 <= stiffness["sign"] <= 1
    assert -1 <= stiffness["cosine_grad_v"] <= 1 and -1 <= stiffness["sign_grad_v"] <= 1
    # the wiring equals a direct call of the pure tool on the same states
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    again = run_analysis.run_stiffness(ckpt, num_states=64, sign="exact")
    assert again["cosine"] == pytest.approx(stiffness["cosine"]) and again["step"] == 1024
    bias = run_analysis.run_value_bias(tmp_path / "run", episodes=6)
    assert bias["num_episodes"] + bias["num_truncated_excluded"] == 6
    pairs = np.array([bias["values"], bias["returns"]])
    assert pairs.shape[1] == bias["num_episodes"] > 0
    assert bias["bias"] == pytest.approx(float((pairs[0] - pairs[1]).mean()))
    ood = run_analysis.run_ood_actions(tmp_path / "run", num_transitions=100)
    hist = np.array(ood["histogram"])  # counts 0 or 1 wrong actions judged real, with 2 actions
    assert ood["num_transitions"] == 100 and hist.sum() == 100 and hist.shape == (2,)
    counts = np.repeat(np.arange(2), hist)
    assert ood["mean"] == pytest.approx(counts.mean()) and ood["std"] == pytest.approx(counts.std(ddof=1))
    # CartPole's two actions are distinct: both counts agree
    assert ood["num_distinct_actions"] == 2 and ood["mean_distinct"] == ood["mean"]
    with pytest.raises(ValueError, match="no dynamics"):
        train(make_config("dcpg", "CartPole-v1", overrides=[*TINY, "total_steps=128"]), tmp_path / "plain")
        run_analysis.run_ood_actions(tmp_path / "plain", num_transitions=10)


def test_analysis_works_for_ppo_runs_too(tmp_path):
    train(make_config("ppo", "CartPole-v1", overrides=[*TINY, "total_steps=256"]), tmp_path / "ppo")
    result = run_analysis.run_stiffness(tmp_path / "ppo", num_states=32, sign="off")
    assert math.isfinite(result["cosine"]) and math.isnan(result["sign"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcpg", "ddcpg"])
def test_learns_cartpole(tmp_path, name):
    config = make_config(name, "CartPole-v1", overrides=[*FAST, "total_steps=150000"])
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] >= 300, summary
