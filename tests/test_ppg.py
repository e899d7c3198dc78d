"""PPG (and the phasic machinery it shares with DCPG): the PPO identity, the auxiliary buffer, pi_old,
the auxiliary loss against a slow reference, the KL the auxiliary phase keeps, PPG+DR / PPG+AR, resume,
training-time analyses, end-to-end runs on CartPole and a tiny Procgen configuration, learning."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from run_rows import assert_resumed_like_uninterrupted, assert_same_state, metric_rows

from aclab import registry
from aclab.algos import phasic
from aclab.algos.common import resolve_device, seed_everything
from aclab.algos.phasic import AuxBuffer, masked_mean, state_rows
from aclab.config import ConfigError
from aclab.envs import build_envs
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
TINY = [*FAST, "env.num_envs=4", "params.num_steps=32", "params.num_minibatches=4", "params.gamma=0.99"]
PPG_VARIANTS = ["ppg", "ppg-dr", "ppg-ar", "dppg"]



pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

def _algo(name: str, overrides: list[str], env_id: str = "CartPole-v1"):
    config = make_config(name, env_id, overrides=overrides)
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return config, envs, registry.build(config, envs.spec, resolve_device("cpu"))


def _net_params(run_dir: Path) -> dict:
    return load_latest_checkpoint(run_dir / "checkpoints")["algo"]["net"]


# ------------------------------------------------------------------------------------------------ identity
def _trained_net(name: str, overrides: list[str], iterations: int) -> dict:
    """The network after ``iterations`` iterations, built and seeded as aclab.train.train does."""
    config = make_config(name, "CartPole-v1", overrides=overrides)
    seed_everything(config.seed)
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    algo = registry.build(config, envs.spec, resolve_device("cpu"))
    for _ in range(iterations):
        algo.iterate(envs)
    return {k: v.clone() for k, v in algo.net.state_dict().items()}


def test_ppg_without_auxiliary_phase_equals_ppo_bit_for_bit():
    """E_aux = 0: PPG's policy phase is PPO with separate networks, 1 epoch, whole-rollout advantage
    normalisation, unclipped value loss with weight 1 (same seed, same envs, annealed lr). PPO computes its
    gradients with autograd here, as PPG does (its closed-form path equals autograd only to float rounding)."""
    common = [*TINY, "total_steps=1280", "env.normalize_reward=true", "params.lr=1e-3", "params.anneal_lr=true",
              "params.gae_lambda=0.95", "params.clip_coef=0.2", "params.ent_coef=0.01", "params.vf_coef=1.0",
              "params.max_grad_norm=0.5", "params.adam_eps=1e-5", "params.norm_adv=batch",
              "params.hidden_sizes=[64,64]", "params.activation=tanh"]
    ppo = _trained_net("ppo", [*common, "params.num_epochs=1", "params.clip_value_loss=false",
                               "params.shared_network=false", "params.gradients=autograd"], 6)
    ppg = _trained_net("ppg", [*common, "params.aux_epochs=0", "params.policy_epochs=1", "params.value_epochs=1"], 6)
    assert ppo.keys() == ppg.keys()
    for key in ppo:
        assert torch.equal(ppo[key], ppg[key]), key
    # the comparison is not vacuous: the auxiliary phase does change the result
    with_aux = _trained_net("ppg", [*common, "params.aux_epochs=1", "params.num_policy_iterations=2"], 6)
    assert any(not torch.equal(ppo[key], with_aux[key]) for key in ppo)


def test_forward_with_features_matches_forward_and_an_explicit_torso():
    from aclab.core.distributions import Categorical
    from aclab.nets.agents import ActorCritic, FusedMLPActorCritic

    torch.manual_seed(0)
    obs = torch.randn(5, 4)
    fused = FusedMLPActorCritic(4, Categorical(3), hidden_sizes=(8, 6))
    params, value, features = fused.forward_with_features(obs)
    expected_params, expected_value = fused(obs)
    assert torch.equal(params, expected_params) and torch.equal(value, expected_value)
    h = obs
    for weight, bias in zip(fused.weights, fused.biases):  # the policy MLP (slice 0), layer by layer
        h = torch.tanh(h @ weight[0] + bias[0, 0])
    torch.testing.assert_close(features, h)
    for shared in (False, True):
        net = ActorCritic((4,), Categorical(3), hidden_sizes=(8,), shared=shared)
        params, value, features = net.forward_with_features(obs)
        expected_params, expected_value = net(obs)
        assert torch.equal(params, expected_params) and torch.equal(value, expected_value)
        assert torch.equal(features, net.policy_encoder(obs))


# ------------------------------------------------------------------------------------------------ buffer
def test_aux_buffer_keeps_uint8_and_gathers_whole_trajectories():
    K, T, B = 3, 5, 4
    buffer = AuxBuffer(K, T, B, (3, 8, 8), torch.uint8, {"returns": ((), torch.float32)}, torch.device("cpu"))
    assert buffer.obs.dtype == torch.uint8 and buffer.obs.shape == (K, T + 1, B, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for _ in range(K):
        obs = torch.randint(0, 256, (T, B, 3, 8, 8), dtype=torch.uint8, generator=g)
        nxt = torch.randint(0, 256, (B, 3, 8, 8), dtype=torch.uint8, generator=g)
        valid = torch.rand(T, B, generator=g) > 0.2
        returns = torch.randn(T, B, generator=g)
        buffer.add(obs, nxt, valid, returns=returns)
        rollouts.append((obs, nxt, valid, returns))
    assert buffer.full
    with pytest.raises(RuntimeError, match="full"):
        buffer.add(*rollouts[0][:3])
    seen = []
    for ids in buffer.trajectory_minibatches(2, g):
        mb = buffer.gather(ids, ("returns",), torch.device("cpu"), with_next_obs=True)
        assert mb["obs"].shape == (2, T + 1, 3, 8, 8) and mb["valid"].shape == (2, T)
        for row, flat_id in enumerate(ids.tolist()):
            k, b = divmod(flat_id, B)
            obs, nxt, valid, returns = rollouts[k]
            assert torch.equal(mb["obs"][row, :T], obs[:, b]) and torch.equal(mb["obs"][row, T], nxt[b])
            assert torch.equal(mb["valid"][row], valid[:, b]) and torch.equal(mb["returns"][row], returns[:, b])
            seen.append(flat_id)
    assert sorted(seen) == list(range(K * B))  # every trajectory exactly once per epoch (12 = 6 x 2)
    without_next = buffer.gather(torch.tensor([0]), (), torch.device("cpu"))
    assert without_next["obs"].shape == (1, T, 3, 8, 8)
    restored = AuxBuffer(K, T, B, (3, 8, 8), torch.uint8, {"returns": ((), torch.float32)}, torch.device("cpu"))
    restored.load_state_dict(buffer.state_dict())
    assert restored.size == K and torch.equal(restored.obs, buffer.obs)
    assert torch.equal(restored.fields["returns"], buffer.fields["returns"])
    # 32 Procgen rollouts of 256 x 64 frames as uint8: ~6.5 GB instead of ~26 GB as float32
    assert 32 * 257 * 64 * 3 * 64 * 64 < 7e9


def test_masked_mean_and_state_rows():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert masked_mean(x, torch.tensor([True, True, True, False])).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    flat = torch.arange(2 * 4).float()  # two trajectories of T + 1 = 4 frames
    assert state_rows(flat, 2, 3).tolist() == [0, 1, 2, 4, 5, 6]
    assert state_rows(flat, 2, 4) is flat


# ------------------------------------------------------------------------------------------------ aux phase
def _filled_ppg(overrides: list[str], name: str = "ppg"):
    """A PPG whose buffer holds N_pi - 1 rollouts; the next iterate() runs the auxiliary phase."""
    config, envs, algo = _algo(name, [*TINY, "params.num_policy_iterations=3", "params.aux_num_minibatches=2",
                                      *overrides])
    for _ in range(2):
        algo.iterate(envs)
    return config, envs, algo


def test_pi_old_is_the_policy_at_the_end_of_the_policy_phase(monkeypatch):
    _, envs, algo = _filled_ppg(["params.aux_epochs=2"])
    recorded = {}
    real = phasic.dist_params_over_buffer

    def spy(policy_fn, buffer, name, chunk, device):
        real(policy_fn, buffer, name, chunk, device)
        frames = buffer.obs[:, :-1].reshape(-1, *buffer.obs.shape[3:])
        with torch.no_grad():
            recorded["now"] = algo.net.dist_params(frames).view_as(buffer.fields[name])
        recorded["stored"] = buffer.fields[name].clone()

    import aclab.algos.ppg as ppg_module
    monkeypatch.setattr(ppg_module, "dist_params_over_buffer", spy)
    metrics = algo.iterate(envs)
    assert "aux/kl_after" in metrics and len(algo.buffer) == 0
    torch.testing.assert_close(recorded["stored"], recorded["now"], rtol=1e-5, atol=1e-6)
    # so the clone term starts at zero: the first auxiliary minibatch's KL(pi_old || pi) is ~0
    first_kl = algo.last_aux_phase_stats[0, 2].item()
    assert 0.0 <= first_kl < 1e-7


def _reference_aux_loss(algo, mb) -> torch.Tensor:
    """Per state, with python loops: 0.5 (V_aux - R)^2 + 0.5 (V_phi - R)^2 + alpha V_phi^2 + beta KL(old || new)
    over valid states, KL as sum_a p_old(a) (log p_old(a) - log p(a)); alpha > 0 for PPG+AR (DCPG paper,
    Appendix B: the activation penalty applies in both phases)."""
    n, T = mb["valid"].shape
    beta, alpha = algo.params.clone_coef, algo.params.value_reg_coef
    total, count = 0.0, 0
    for i in range(n):
        for t in range(T):
            if not bool(mb["valid"][i, t]):
                continue
            obs = mb["obs"][i, t].unsqueeze(0)
            params, value, features = algo.net.forward_with_features(obs)
            aux_value = algo.aux_value_head(features).squeeze()
            ret = mb["returns"][i, t]
            log_p = torch.log_softmax(params[0], -1)
            log_old = torch.log_softmax(mb["old_params"][i, t], -1)
            kl = (log_old.exp() * (log_old - log_p)).sum()
            total = total + 0.5 * (aux_value - ret) ** 2 + 0.5 * (value.squeeze() - ret) ** 2 + beta * kl
            total = total + alpha * value.squeeze() ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("name", ["ppg", "ppg-ar"])
def test_aux_loss_matches_a_slow_reference(name):
    _, _, algo = _filled_ppg(["params.aux_epochs=1", "params.clone_coef=0.7"], name=name)
    assert algo.params.value_reg_coef == (0.05 if name == "ppg-ar" else 0.0)
    buffer = algo.buffer
    phasic.dist_params_over_buffer(algo.net.dist_params, buffer, "old_params", 64, torch.device("cpu"))
    with torch.no_grad():  # a policy far from pi_old, so the KL term is large and its direction matters
        algo.net.head_weight.add_(2.0 * torch.randn_like(algo.net.head_weight))
    ids = torch.tensor([0, 5, 6])
    mb = buffer.gather(ids, ("returns", "old_params"), torch.device("cpu"))
    mb["valid"][0, 3] = False  # a masked state must not count
    loss, parts = algo.aux_loss(mb)
    reference = _reference_aux_loss(algo, mb)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert parts[2].item() > 1e-5


def test_auxiliary_phase_keeps_the_policy_within_its_kl():
    """With beta_pi = 1 the mean KL(pi_old || pi) over the buffer stays below 1e-5 nats after E_aux = 6
    epochs; without the clone term the auxiliary value head drags the policy torso (and so a confident
    policy) far further. The policy head is scaled up first: a fresh near-uniform policy (head gain 0.01)
    hardly reacts to torso changes, which would make the comparison empty."""
    kls = {}
    for beta in (1.0, 0.0):
        _, envs, algo = _filled_ppg(["params.aux_epochs=6", f"params.clone_coef={beta}"])
        with torch.no_grad():
            algo.net.head_weight[0].mul_(30.0)
        kls[beta] = algo.iterate(envs)["aux/kl_after"]
    assert 0.0 <= kls[1.0] < 1e-5, kls
    assert kls[0.0] > 30 * kls[1.0], kls


# ------------------------------------------------------------------------------------------------ DR / AR
def _capture_rollout(algo, envs) -> dict:
    """Collect the next rollout through the algorithm's own collector and keep copies."""
    collector = algo._collector_for(envs)
    real = collector.collect
    kept = {}

    def collect(*args):
        rollout, returns, lengths = real(*args)
        kept.update({k: getattr(rollout, k).clone() for k in ("rewards", "values", "terminated", "ends", "valid")})
        return rollout, returns, lengths

    collector.collect = collect
    return kept


def _slow_gae(rewards, values, terminated, ends, gamma, lam):
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


def test_ppg_dr_value_targets_use_gamma_prime():
    _, envs, algo = _algo("ppg-dr", [*TINY, "params.num_policy_iterations=3",
                                     "env.options={\"max_episode_steps\": 20}"])
    # gamma' keeps the paper's horizon ratio (1000 -> 200 steps): 0.99 -> 0.95 here, 0.999 -> 0.995 on Procgen
    assert algo.params.gamma == 0.99 and algo.params.target_gamma() == pytest.approx(0.95)
    kept = _capture_rollout(algo, envs)
    seen = {}
    real_phase = algo.policy_phase

    def policy_phase(rollout, advantages, targets):
        seen["advantages"] = advantages.double().numpy().copy()
        return real_phase(rollout, advantages, targets)

    algo.policy_phase = policy_phase
    algo.iterate(envs)
    r = {k: v.double().numpy() for k, v in kept.items()}
    stored = algo.buffer.fields["returns"][0].double().numpy()
    expected = _slow_gae(r["rewards"], r["values"], r["terminated"], r["ends"], 0.95, 0.95) + r["values"][:-1]
    plain = _slow_gae(r["rewards"], r["values"], r["terminated"], r["ends"], 0.99, 0.95) + r["values"][:-1]
    valid = r["valid"].astype(bool)
    np.testing.assert_allclose(stored[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert np.abs(stored[valid] - plain[valid]).max() > 1e-2
    # the advantages keep gamma (only the value targets use gamma')
    advantages = _slow_gae(r["rewards"], r["values"], r["terminated"], r["ends"], 0.99, 0.95)
    np.testing.assert_allclose(seen["advantages"][valid], advantages[valid], rtol=1e-4, atol=1e-4)


def test_ppg_dr_gamma_prime_is_derived_from_gamma_and_below_it():
    from aclab.algos.ppg import PPGConfig, discount_regularised_gamma

    assert discount_regularised_gamma(0.999, 0.2) == pytest.approx(0.995)  # DCPG paper, Appendix B
    assert PPGConfig(gamma=0.999, value_horizon_ratio=0.2).target_gamma() == pytest.approx(0.995)
    assert PPGConfig(gamma=0.999, value_horizon_ratio=0.2, value_gamma=0.99).target_gamma() == 0.99  # explicit wins
    assert PPGConfig(gamma=0.97).target_gamma() == 0.97  # plain PPG
    for overrides, key in ((["params.value_gamma=0.995"], "params.value_gamma"),  # 0.995 > ppg-classic's 0.99
                           (["params.value_gamma=0.99"], "params.value_gamma"),
                           (["params.value_horizon_ratio=1.5"], "params.value_horizon_ratio"),
                           (["params.gamma=0.5"], "params.value_horizon_ratio")):  # gamma' = -1.5
        with pytest.raises(ConfigError, match=key):
            make_config("ppg-dr", "CartPole-v1", overrides=overrides)
    assert make_config("ppg-dr", "CartPole-v1", overrides=["params.value_gamma=0.98"]).params.target_gamma() == 0.98


def test_ppg_ar_adds_alpha_times_mean_squared_value():
    outs = {}
    for name in ("ppg", "ppg-ar"):
        _, envs, algo = _algo(name, [*TINY, "params.num_minibatches=1"])
        outs[name] = algo.iterate(envs)
    plain, ar = outs["ppg"], outs["ppg-ar"]
    assert plain["value_activation"] == pytest.approx(ar["value_activation"], rel=1e-6)
    assert ar["loss/value"] == pytest.approx(plain["loss/value"] + 0.05 * ar["value_activation"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ analyses
def test_training_analyses_are_logged_and_do_not_change_training(tmp_path):
    base = [*TINY, "total_steps=1536", "params.num_policy_iterations=4", "params.aux_epochs=1",
            "env.options={\"max_episode_steps\": 30}"]
    train(make_config("ppg", "CartPole-v1", overrides=base), tmp_path / "plain")
    train(make_config("ppg", "CartPole-v1", overrides=[*base, "params.log_value_bias=true",
                                                       "params.stiffness_every=4", "params.stiffness_states=64",
                                                       "params.value_bias_episodes=20"]), tmp_path / "analysed")
    a, b = _net_params(tmp_path / "plain"), _net_params(tmp_path / "analysed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader((tmp_path / "analysed" / "metrics.csv").open()))
    biased = [r for r in rows if r.get("value_bias/bias")]
    assert biased and all(math.isfinite(float(r["value_bias/bias"])) for r in biased)
    last = biased[-1]
    assert float(last["value_bias/bias"]) == pytest.approx(
        float(last["value_bias/predicted"]) - float(last["value_bias/true"]), abs=1e-4)
    # episodes cut at 30 steps count (with the bootstrapped value at the cut), not only early short ones
    assert float(last["value_bias/truncated"]) > 0
    stiff = [r for r in rows if r.get("stiffness/cosine")]
    assert len(stiff) == 3  # iterations 0, 4, 8 of 12
    assert all(-1.0 <= float(r["stiffness/cosine"]) <= 1.0 and -1.0 <= float(r["stiffness/sign"]) <= 1.0
               for r in stiff)
    assert all(-1.0 <= float(r["stiffness/cosine_grad_v"]) <= 1.0 and -1.0 <= float(r["stiffness/sign_grad_v"]) <= 1.0
               for r in stiff)


@pytest.mark.parametrize("name", ["ppg", "dcpg"])
def test_training_analyses_resume_exactly(name, tmp_path):
    """A run with the value-bias analysis on, stopped after 5 iterations (inside a phase: 3 policy iterations per
    auxiliary phase) and resumed, ends with the uninterrupted run's whole algorithm state bit for bit (networks,
    optimisers, buffer, the trackers' open episodes, the finished episodes behind the bias) and metric rows."""
    overrides = [*TINY, "total_steps=1024", "params.num_policy_iterations=3", "params.aux_epochs=1",
                 "params.log_value_bias=true", "params.value_bias_episodes=200", "checkpoint_every_iterations=0",
                 "env.options={\"max_episode_steps\": 40}"]
    train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "full")
    split = train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "split", stop_after_iterations=5)
    assert split["checkpoint_step"] == 5 * 128
    train(make_config(name, "CartPole-v1", overrides=overrides), tmp_path / "split", resume=True)
    assert any(row.get("value_bias/bias") for row in metric_rows(tmp_path / "full"))
    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "full")
    full, resumed = (load_latest_checkpoint(tmp_path / run / "checkpoints")["algo"] for run in ("full", "split"))
    assert_same_state(full, resumed)
    tracker = full["analyses"]["trackers"]["value"]
    assert tracker["active"].all() and tracker["length"].max() > 0  # episodes open at the end
    assert len(full["analyses"]["starts"]["value"]) > 20


def test_training_analyses_measure_the_rollouts_value_bias_and_stiffness_on_r_hat(monkeypatch):
    """The logged value bias is mean(V(s_0) - sum_t gamma^t r_t) over the finished (terminated) episodes
    (``value_bias_truncation = exclude``; the bootstrap of truncated ones is pinned in test_value_bias.py),
    recomputed here with a loop over the rollouts; stiffness is measured against R_hat of the states it
    draws (DCPG paper, Appendices A and C)."""
    _, envs, algo = _algo("ppg", [*TINY, "params.num_policy_iterations=8", "params.log_value_bias=true",
                                  "params.value_bias_episodes=1000", "params.value_bias_truncation=exclude",
                                  "params.stiffness_every=1",
                                  "params.stiffness_states=16", "env.options={\"max_episode_steps\": 40}"])
    seen = []
    real_stiffness = phasic.value_stiffness

    def stiffness(module, states, targets, **kwargs):
        seen.append((states.clone(), targets.clone()))
        return real_stiffness(module, states, targets, **kwargs)

    monkeypatch.setattr(phasic, "value_stiffness", stiffness)
    collector = algo._collector_for(envs)
    real_collect, rollouts = collector.collect, []

    def collect(*args):
        rollout, returns, lengths = real_collect(*args)
        rollouts.append({k: getattr(rollout, k).clone().double() for k in
                         ("obs", "rewards", "values", "terminated", "ends", "valid")})
        return rollout, returns, lengths

    collector.collect = collect
    for _ in range(3):
        metrics = algo.iterate(envs)
        # stiffness: each drawn state's target is its R_hat (GAE(gamma, lambda) + V), found by its observation
        r = {k: v.numpy() for k, v in rollouts[-1].items()}
        r_hat = _slow_gae(r["rewards"], r["values"], r["terminated"], r["ends"], 0.99, 0.95) + r["values"][:-1]
        obs = rollouts[-1]["obs"].reshape(-1, 4)
        states, targets = seen[-1]
        for state, target in zip(states.double(), targets):
            match = torch.nonzero((obs == state).all(1)).squeeze(1)
            assert match.numel() >= 1
            assert float(target) == pytest.approx(float(r_hat.reshape(-1)[int(match[0])]), rel=1e-4, abs=1e-4)
    envs.close()
    # value bias: V(s_0) - discounted return of every episode that terminated, over the concatenated rollouts
    cat = {k: np.concatenate([r[k][:-1].numpy() if k == "values" else r[k].numpy() for r in rollouts])
           for k in ("rewards", "values", "terminated", "ends", "valid")}
    biases = []
    for b in range(cat["rewards"].shape[1]):
        start, ret, discount = None, 0.0, 1.0
        for t in range(cat["rewards"].shape[0]):
            if not cat["valid"][t, b]:
                continue
            if start is None:
                start, ret, discount = cat["values"][t, b], 0.0, 1.0
            ret += discount * cat["rewards"][t, b]
            discount *= 0.99
            if cat["ends"][t, b]:
                if cat["terminated"][t, b]:
                    biases.append(start - ret)
                start = None
    # the first episode of each env starts at t = 0 of the first rollout, so every counted episode is whole
    assert len(biases) >= 3
    assert metrics["value_bias/bias"] == pytest.approx(float(np.mean(biases)), rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_mid_phase_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "total_steps=1664", "params.num_policy_iterations=3", "params.aux_epochs=2",
                 "checkpoint_every_iterations=2", "params.log_value_bias=true", "params.stiffness_every=5",
                 "params.stiffness_states=32"]
    config = make_config("dppg", "CartPole-v1", overrides=overrides)
    train(config, tmp_path / "full")
    first = train(make_config("dppg", "CartPole-v1", overrides=overrides), tmp_path / "split",
                  stop_after_iterations=5)  # 5 = mid-phase: the checkpoint holds two buffered rollouts
    assert first["status"] == "interrupted"
    state = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]
    assert state["buffer"]["size"] == 2
    resumed = train(make_config("dppg", "CartPole-v1", overrides=overrides), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    assert_resumed_like_uninterrupted(tmp_path / "full", tmp_path / "split")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name", PPG_VARIANTS)
def test_variants_train_end_to_end_on_cartpole(tmp_path, name):
    config = make_config(name, "CartPole-v1", overrides=[*TINY, "total_steps=768", "params.num_policy_iterations=2",
                                                         "params.aux_epochs=1", "eval.episodes=2"])
    summary = train(config, tmp_path / name)
    assert summary["status"] == "finished" and summary["steps"] == 768 and "eval_test_return" in summary
    rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("aux/kl_after")) == 3
    if name == "dppg":
        assert all(float(r["aux/dynamics_loss"]) > 0 for r in rows if r.get("aux/dynamics_loss"))


def _tiny_procgen() -> list[str]:
    return ["progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=4", "params.num_minibatches=2",
            "params.num_policy_iterations=2", "params.aux_epochs=1", "params.aux_num_minibatches=1", "total_steps=16"]


@pytest.mark.parametrize("name", ["ppg"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("ppg-dr", "ppg-ar",
                                                                                              "dppg")])
def test_variants_train_end_to_end_on_tiny_procgen(tmp_path, name):
    config = make_config(name, "procgen:bigfish", overrides=_tiny_procgen())
    assert config.params.encoder == "impala"
    summary = train(config, tmp_path / name)
    assert summary["status"] == "finished" and summary["steps"] == 16
    state = load_latest_checkpoint(tmp_path / name / "checkpoints")["algo"]
    assert state["num_aux_phases"] == 1 and state["buffer"]["obs"].dtype == torch.uint8


@pytest.mark.slow
def test_ppg_learns_cartpole(tmp_path):
    config = make_config("ppg", "CartPole-v1", overrides=[*FAST, "total_steps=150000"])
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] >= 300, summary
