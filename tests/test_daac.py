"""DAAC and IDAAC: presets, the episode pairs of IDAAC against a slow loop, the losses against per-sample
references, the phase schedule (E_pi, E_V, N_pi), the value network as the critic, exact resume and runs on
CartPole and a tiny Procgen configuration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from run_rows import assert_resumed_like_uninterrupted

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.algos.daac import advantage_loss, episode_pairs, order_classifier_loss, order_confusion_loss
from aclab.core.returns import gae
from aclab.envs import build_envs
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
TINY = [*FAST, "env.num_envs=4", "params.num_steps=32", "params.num_minibatches=4", "params.gamma=0.99"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _algo(name, overrides, env_id="CartPole-v1"):
    config = make_config(name, env_id, overrides=overrides)
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return config, envs, registry.build(config, envs.spec, resolve_device("cpu"))


def test_names_and_presets():
    config = make_config("daac", preset="daac-procgen")
    p = config.params  # DCPG paper, Table 2 and Appendix D
    assert (p.policy_epochs, p.value_epochs, p.value_every, p.adv_coef, p.order_coef) == (1, 9, 1, 0.25, 0.0)
    assert (p.num_steps, p.num_minibatches, p.lr, p.ent_coef, p.gamma, config.env.num_envs) == (256, 8, 5e-4, 0.01,
                                                                                                0.999, 64)
    idaac = make_config("idaac", preset="daac-procgen").params
    assert idaac.order_coef == 0.001 and idaac.order_hidden_sizes == ()
    assert registry.default_preset("idaac", "procgen", True) == "daac-procgen"
    assert registry.default_preset("idaac", "classic", True) == "daac-classic"


# ------------------------------------------------------------------------------------------------ pairs
def test_episode_pairs_stay_in_their_episode_segment():
    rng = np.random.default_rng(0)
    T, B = 40, 5
    ends = rng.random((T, B)) < 0.1
    valid = np.ones((T, B), bool)
    valid[1:] &= ~ends[:-1]  # the step after an end is the autoreset dummy
    valid[0, 2] = False
    generator = torch.Generator().manual_seed(1)
    partner, label, mask = episode_pairs(torch.as_tensor(valid), torch.as_tensor(ends), generator)
    # slow reference: segment id of every (t, b) by walking each env's column
    seg = -np.ones((T, B), int)
    next_id = 0
    for b in range(B):
        current = None
        for t in range(T):
            if not valid[t, b]:
                current = None
                continue
            if current is None:
                current, next_id = next_id, next_id + 1
            seg[t, b] = current
            if ends[t, b]:
                current = None
    for flat in range(T * B):
        t, b = divmod(flat, B)
        assert bool(mask[flat]) == valid[t, b]
        if not valid[t, b]:
            continue
        pt, pb = divmod(int(partner[flat]), B)
        assert pb == b and seg[pt, pb] == seg[t, b]
        assert label[flat] == float(pt < t)


def test_episode_pairs_are_uniform_over_the_segment():
    valid = torch.ones(6, 1, dtype=torch.bool)
    ends = torch.zeros(6, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(6)
    for _ in range(3000):
        partner, _, _ = episode_pairs(valid, ends, g)
        counts[int(partner[3])] += 1
    assert counts.min() > 400 and counts.max() < 600


# ------------------------------------------------------------------------------------------------ losses
def test_small_losses_against_their_formulas():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(9, generator=g), torch.randn(9, generator=g)
    assert advantage_loss(pred, target).item() == pytest.approx(float(np.mean((pred - target).numpy() ** 2)))
    z, y = torch.randn(9, generator=g), (torch.rand(9, generator=g) < 0.5).float()
    s = 1 / (1 + np.exp(-z.numpy()))
    ref = -np.mean(y.numpy() * np.log(s) + (1 - y.numpy()) * np.log(1 - s))
    assert order_classifier_loss(z, y).item() == pytest.approx(ref, rel=1e-5)
    assert order_confusion_loss(z).item() == pytest.approx(float(-np.mean(0.5 * np.log(s) + 0.5 * np.log(1 - s))),
                                                           rel=1e-5)
    assert order_confusion_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("name", ["daac", "idaac"])
def test_policy_loss_matches_a_per_sample_reference(name):
    _, envs, algo = _algo(name, TINY)
    algo.iterate(envs)  # moves the networks off their initialisation
    rollout, _, _ = algo._collector.collect(envs, algo._act, algo._value)
    adv = gae(rollout.rewards, rollout.values, rollout.discounts(0.99), 0.95, episode_ends=rollout.ends)
    batch = algo.make_batch(rollout, adv, adv + rollout.values[:-1])
    mb = {k: v[:16] for k, v in batch.items()}
    loss, parts = algo.policy_loss(mb)
    p = algo.params
    terms = []
    for i in range(16):
        logits, feat = algo.policy(mb["obs"][i:i + 1])
        logp = torch.log_softmax(logits[0], -1)
        ratio = torch.exp(logp[mb["actions"][i]] - mb["old_log_probs"][i])
        a = mb["advantages"][i]
        clip = -torch.min(ratio * a, ratio.clamp(1 - p.clip_coef, 1 + p.clip_coef) * a)
        entropy = -(logp.exp() * logp).sum()
        onehot = torch.zeros(2)
        onehot[mb["actions"][i]] = 1.0
        w, bias = algo.policy.advantage_head.weight[0], algo.policy.advantage_head.bias[0]
        a_pred = torch.dot(w, torch.cat([feat[0], onehot])) + bias
        term = clip - p.ent_coef * entropy + p.adv_coef * (a_pred - a) ** 2
        if name == "idaac":
            other = algo.policy(mb["other_obs"][i:i + 1])[1]
            z = algo.discriminator(feat, other)[0]  # D after this minibatch's discriminator step
            term = term + p.order_coef * -(0.5 * torch.log(torch.sigmoid(z)) + 0.5 * torch.log(1 - torch.sigmoid(z)))
        terms.append(term)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5, abs=1e-7)
    assert parts[2].item() > 0


def test_idaac_discriminator_learns_the_order_it_is_trained_on():
    """A discriminator step on detached embeddings lowers its own BCE on the same pairs."""
    _, envs, algo = _algo("idaac", [*TINY, "params.order_coef=0.001"])
    algo.iterate(envs)
    rollout, _, _ = algo._collector.collect(envs, algo._act, algo._value)
    batch = algo.make_batch(rollout, torch.zeros_like(rollout.rewards), torch.zeros_like(rollout.rewards))
    with torch.no_grad():
        feats, other = algo.policy.encoder(batch["obs"]), algo.policy.encoder(batch["other_obs"])
        before = order_classifier_loss(algo.discriminator(feats, other), batch["order"]).item()
    for _ in range(30):
        algo.policy_loss(batch)
    with torch.no_grad():
        after = order_classifier_loss(algo.discriminator(feats, other), batch["order"]).item()
    assert after < before


# ------------------------------------------------------------------------------------------------ schedule
def _adam_steps(optimizer) -> int:
    state = next(iter(optimizer.state.values()), None)
    return 0 if state is None else int(state["step"])


def test_phase_schedule_counts_policy_and_value_epochs():
    _, envs, algo = _algo("daac", [*TINY, "params.policy_epochs=2", "params.value_epochs=3", "params.value_every=2"])
    algo.iterate(envs)
    assert _adam_steps(algo.policy_optimizer) == 2 * 4 and _adam_steps(algo.value_optimizer) == 3 * 4
    algo.iterate(envs)  # iteration 1: no value phase with N_pi = 2
    assert _adam_steps(algo.policy_optimizer) == 16 and _adam_steps(algo.value_optimizer) == 12
    algo.iterate(envs)
    assert _adam_steps(algo.value_optimizer) == 24


def test_the_critic_is_the_value_network_and_the_policy_phase_leaves_it_alone():
    _, envs, algo = _algo("daac", TINY)
    obs = torch.as_tensor(envs.obs)
    _, _, values, _ = algo._act(obs)
    np.testing.assert_allclose(values, algo.value_net(obs).detach().numpy(), rtol=1e-6)
    before = [q.detach().clone() for q in algo.value_net.parameters()]
    algo.params.value_every = 10**6
    algo.iteration = 1
    algo.iterate(envs)
    assert all(torch.equal(a, b) for a, b in zip(before, algo.value_net.parameters()))


# ------------------------------------------------------------------------------------------------ runs
def test_resume_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "total_steps=768", "checkpoint_every_iterations=2"]
    train(make_config("idaac", "CartPole-v1", overrides=overrides), tmp_path / "full")
    first = train(make_config("idaac", "CartPole-v1", overrides=overrides), tmp_path / "split", stop_after_iterations=3)
    assert first["status"] == "interrupted"
    resumed = train(make_config("idaac", "CartPole-v1", overrides=overrides), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    assert_resumed_like_uninterrupted(tmp_path / "full", tmp_path / "split")


def test_idaac_runs_on_tiny_procgen(tmp_path):
    config = make_config("idaac", "procgen:bigfish", overrides=[
        "progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=8", "params.num_minibatches=2",
        "params.value_epochs=2", "total_steps=32"])
    assert config.params.encoder == "impala"
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 32


@pytest.mark.slow
def test_daac_learns_cartpole(tmp_path):
    summary = train(make_config("daac", "CartPole-v1", overrides=[*FAST, "total_steps=100000"]), tmp_path / "run")
    assert summary["final_return"] >= 150, summary


def test_procgen_presets_build_the_dcpg_authors_torso():
    """daac-procgen / drac-procgen use the DCPG authors' IMPALA torso (Xavier-uniform convolutions), like
    ppo-procgen and dcpg-procgen, in DAAC's policy and value networks alike: Table 5 compares like with like."""
    for name in ("daac", "idaac", "ucb-drac", "plr", "ppo", "dcpg"):
        assert make_config(name, "procgen:bigfish").params.encoder_init == "xavier", name
    assert make_config("daac", "CartPole-v1").params.encoder_init == "orthogonal"
    config = make_config("idaac", "procgen:bigfish")
    envs = build_envs(config, num_envs=1)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    envs.close()
    for net in (algo.policy.encoder, algo.value_net.encoder):
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 15
        for conv in convs:  # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out)); orthogonal sqrt(2) exceeds it
            bound = math.sqrt(6.0 / ((conv.in_channels + conv.out_channels) * 9))
            assert conv.weight.abs().max().item() <= bound
    orthogonal = make_config("idaac", "procgen:bigfish", overrides=["params.encoder_init=orthogonal"])
    algo = registry.build(orthogonal, envs.spec, resolve_device("cpu"))
    for net in (algo.policy.encoder, algo.value_net.encoder):
        assert any(m.weight.abs().max().item() > math.sqrt(6.0 / ((m.in_channels + m.out_channels) * 9))
                   for m in net.modules() if isinstance(m, torch.nn.Conv2d))
