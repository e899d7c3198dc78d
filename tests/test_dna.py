"""DNA (aclab.algos.dna): phase losses against hand computations, returns from the value network,
equivalence with aclab's PPO when distillation is off and lambda_pi = lambda_V, penalty / warm-up /
noise-scale options, resume equality, PPO (2x), and learning on CartPole."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from grad_clip_check import assert_step_clips_to
from run_rows import metric_rows

from aclab import distributed
from aclab.algos import dna as dna_module
from aclab.algos import ppo as ppo_module
from aclab.algos.common import resolve_device
from aclab.algos.dna import (
    DNA,
    PPO2x,
    distil_constraint,
    distil_phase_loss,
    policy_phase_loss,
    repeated_action_mask,
    value_phase_loss,
)
from aclab.config import Config, ConfigError
from aclab.core.distributions import Categorical, DiagGaussian
from aclab.core.returns import gae, td_lambda_returns
from aclab.data.rollout import RolloutCollector
from aclab.envs import build_envs
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
SMALL = ["env.num_envs=2", "params.num_steps=32", "params.policy_minibatch_size=32",
         "params.value_minibatch_size=16", "params.distil_minibatch_size=16"]
CPU = resolve_device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config(*overrides: str, algo: str = "dna", env: str = "CartPole-v1", total: int = 512):
    return make_config(algo, env, overrides=[*FAST, *SMALL, f"total_steps={total}", *overrides])


def _build(config):
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return DNA(config, envs.spec, CPU), envs


# ---------------------------------------------------------------------------------------------- losses
def test_policy_phase_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    actions = torch.tensor([1, 0, 1])
    old_log_probs = torch.tensor([-0.5, -0.3, -0.9])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = policy_phase_loss(Categorical(2), logits, actions, old_log_probs, advantages, 0.2, 0.01)
    terms, entropies = [], []
    for z, a, old, adv in zip(logits.tolist(), actions.tolist(), old_log_probs.tolist(), advantages.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        ratio = math.exp(z[a] - log_norm - old)
        terms.append(min(ratio * adv, min(max(ratio, 0.8), 1.2) * adv))
        probs = [math.exp(v - log_norm) for v in z]
        entropies.append(-sum(q * math.log(q) for q in probs))
    expected = -sum(terms) / 3 - 0.01 * sum(entropies) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(stats["entropy"]) == pytest.approx(sum(entropies) / 3, rel=1e-6)
    assert float(stats["loss/policy"]) == pytest.approx(-sum(terms) / 3, rel=1e-6)


def test_value_phase_loss_is_eq_12():
    values, targets = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 4.0, -1.5])
    assert float(value_phase_loss(values, targets)) == pytest.approx((1 + 4 + 0.25) / 3)
    assert float(value_phase_loss(values, targets, 0.5)) == pytest.approx(0.5 * (1 + 4 + 0.25) / 3)


def test_distil_loss_and_constraints_match_hand_computation():
    old = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.0]])
    new = torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 1.0]])
    kl = []
    for p_row, q_row in zip(old.tolist(), new.tolist()):
        p = np.exp(p_row) / np.exp(p_row).sum()
        q = np.exp(q_row) / np.exp(q_row).sum()
        kl.append(float((p * (np.log(p) - np.log(q))).sum()))
    dist = Categorical(3)
    assert float(distil_constraint("kl", dist, old, new)) == pytest.approx(np.mean(kl), rel=1e-5)
    logit_sq = ((old - new) ** 2).numpy()
    assert float(distil_constraint("logit_mse", dist, old, new)) == pytest.approx(0.5 * logit_sq.mean(), rel=1e-6)
    v_pi, v_v = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 1.0])
    loss, mse, constraint = distil_phase_loss(v_pi, v_v, dist, old, new, beta=2.0, kind="kl")
    assert float(mse) == pytest.approx((0.25 + 4.0) / 2)
    assert float(loss) == pytest.approx((0.25 + 4.0) / 2 + 2.0 * np.mean(kl), rel=1e-5)
    # Gaussian: squared error between the means only (log std changes are not constrained)
    g_old = torch.tensor([[0.0, 1.0, -0.5, 0.0]])  # mean (0, 1), log std (-0.5, 0)
    g_new = torch.tensor([[0.5, 0.0, 3.0, 3.0]])
    assert float(distil_constraint("mean_mse", DiagGaussian(2), g_old, g_new)) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError, match="unknown distil constraint"):
        distil_constraint("feature", dist, old, new)


def test_repeated_action_mask_counts_runs_and_carries_over_rollouts():
    # one env, limit 2: penalise once the action has been repeated more than twice (its 4th take in a row)
    actions = np.array([[1], [1], [1], [1], [0], [0], [0], [5], [0]])
    valid = np.ones((9, 1), dtype=bool)
    valid[7] = False  # a dummy step (its action is ignored): changes nothing
    ends = np.zeros((9, 1), dtype=bool)
    mask, last, run = repeated_action_mask(actions, valid, ends, np.array([-1]), np.array([0]), limit=2)
    assert mask[:, 0].tolist() == [False, False, False, True, False, False, False, False, True]
    assert (last[0], run[0]) == (0, 4)
    # carried into the next rollout; an episode end clears the run
    mask2, last2, run2 = repeated_action_mask(np.array([[0], [0], [0]]), np.ones((3, 1), bool),
                                              np.array([[False], [True], [False]]), last, run, limit=2)
    assert mask2[:, 0].tolist() == [True, True, False] and (last2[0], run2[0]) == (0, 1)


# ---------------------------------------------------------------------------------------------- returns
def test_advantages_and_targets_come_from_the_value_network(monkeypatch):
    config = _config("params.lambda_pi=0.7", "params.lambda_v=0.9", "params.gamma=0.95")
    algo, envs = _build(config)
    captured = {}

    def capture(rollout, advantages, targets):
        captured.update(rollout=rollout, advantages=advantages.clone(), targets=targets.clone(),
                        values=rollout.values.clone(), obs=rollout.obs.clone(), valid=rollout.valid.clone())
        return {}

    monkeypatch.setattr(algo, "update", capture)
    algo.iterate(envs)
    rollout = captured["rollout"]
    with torch.no_grad():
        v_value = algo.value_net(captured["obs"].reshape(-1, 4)).reshape(32, 2)
        v_policy = algo.policy_net(captured["obs"].reshape(-1, 4))[1].reshape(32, 2)
    valid = captured["valid"]
    assert torch.allclose(captured["values"][:-1][valid], v_value[valid], atol=1e-6)
    assert not torch.allclose(captured["values"][:-1][valid], v_policy[valid], atol=1e-3)
    discounts = rollout.discounts(0.95)
    expected_adv = gae(rollout.rewards, captured["values"], discounts, 0.7, episode_ends=rollout.ends)
    expected_targets = td_lambda_returns(rollout.rewards, captured["values"], discounts, 0.9,
                                         episode_ends=rollout.ends)
    assert torch.allclose(captured["advantages"], expected_adv)
    assert torch.allclose(captured["targets"], expected_targets)
    envs.close()


# ---------------------------------------------------------------------------------------------- PPO equivalence
def _fixed_order_minibatches(batch, num_minibatches, generator):
    """Deterministic stand-in for shuffled_minibatches: contiguous parts in data order."""
    n = next(iter(batch.values())).shape[0]
    size = max(n // num_minibatches, 1)
    for i in range(min(num_minibatches, n)):
        yield {k: v[i * size:(i + 1) * size] for k, v in batch.items()}


def _copy_fused_into_dna(fused, algo: DNA) -> None:
    """Slice 0 of each fused layer -> the policy network, slice 1 -> the value network."""
    policy_linears = [m for m in algo.policy_net.policy_encoder.layers if isinstance(m, torch.nn.Linear)]
    value_linears = [m for m in algo.value_net.encoder.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, (weight, bias) in enumerate(zip(fused.weights, fused.biases)):
            policy_linears[i].weight.copy_(weight[0].T)
            policy_linears[i].bias.copy_(bias[0, 0])
            value_linears[i].weight.copy_(weight[1].T)
            value_linears[i].bias.copy_(bias[1, 0])
        algo.policy_net.policy_head.weight.copy_(fused.head_weight[0].T)
        algo.policy_net.policy_head.bias.copy_(fused.head_bias[0, 0])
        algo.value_net.head.weight.copy_(fused.head_weight[1][:, :1].T)
        algo.value_net.head.bias.copy_(fused.head_bias[1, 0, :1])


def test_without_distillation_and_with_equal_lambdas_dna_is_ppo_with_separate_networks(monkeypatch):
    """Separate networks make PPO's joint loss split into DNA's policy and value phases: Adam is per
    element, so one optimiser over both networks equals one per network; with the same minibatch order
    and no gradient clipping the updated networks agree to float rounding."""
    monkeypatch.setattr(distributed, "shuffled_minibatches", _fixed_order_minibatches)  # PPO's and DNA's
    common = ["env.num_envs=4", "params.num_steps=64", "params.gamma=0.99", "params.lr=1e-3"]
    ppo_config = make_config("ppo", "CartPole-v1", overrides=[
        *FAST, *common, "params.gae_lambda=0.9", "params.num_epochs=3", "params.num_minibatches=4",
        "params.norm_adv=batch", "params.clip_value_loss=false", "params.vf_coef=1.0", "params.ent_coef=0.01",
        "params.max_grad_norm=1e9", "params.acting=torch"])
    dna_config = make_config("dna", "CartPole-v1", overrides=[
        *FAST, *common, "params.lambda_pi=0.9", "params.lambda_v=0.9", "params.distil_epochs=0",
        "params.policy_epochs=3", "params.value_epochs=3", "params.policy_minibatch_size=64",
        "params.value_minibatch_size=64", "params.value_loss_coef=0.5", "params.ent_coef=0.01",
        "params.max_grad_norm=1e9"])
    envs = build_envs(ppo_config)
    envs.reset(seed=3)
    torch.manual_seed(0)
    ppo = ppo_module.PPO(ppo_config, envs.spec, CPU)
    algo = DNA(dna_config, envs.spec, CPU)
    _copy_fused_into_dna(ppo.net, algo)
    for _ in range(2):  # two iterations: the second starts from the updated networks and Adam states
        collector = RolloutCollector(envs, 64, 2, CPU)
        rollout, _, _ = collector.collect(envs, ppo._act, ppo._value)
        with torch.no_grad():
            v_dna = algo.value_net(rollout.obs.reshape(-1, 4)).reshape(64, 4)
        assert torch.allclose(v_dna, rollout.values[:-1], atol=1e-5)  # same critic
        discounts = rollout.discounts(0.99)
        advantages = gae(rollout.rewards, rollout.values, discounts, ppo.params.gae_lambda, episode_ends=rollout.ends)
        ppo.update(rollout, advantages, advantages + rollout.values[:-1])
        # DNA's own estimators, as in DNA.iterate: GAE(lambda_pi) and TD(lambda_V) from the value network
        dna_advantages = gae(rollout.rewards, rollout.values, discounts, algo.params.lambda_pi,
                             episode_ends=rollout.ends)
        targets = td_lambda_returns(rollout.rewards, rollout.values, discounts, algo.params.lambda_v,
                                    episode_ends=rollout.ends)
        algo.update(rollout, dna_advantages, targets)
        obs = rollout.obs.reshape(-1, 4)
        with torch.no_grad():
            ppo_params, ppo_values = ppo.net(obs)
            dna_params = algo.policy_net.dist_params(obs)
            dna_values = algo.value_net(obs)
        assert not torch.allclose(ppo_params, rollout.dist_params.reshape(-1, 2), atol=1e-3)  # it did learn
        assert torch.allclose(ppo_params, dna_params, atol=2e-5)
        assert torch.allclose(ppo_values, dna_values, atol=2e-4 * max(1.0, float(ppo_values.abs().max())))
    envs.close()


def test_distillation_trains_only_the_policy_network():
    config = _config("params.distil_epochs=3", "params.distil_beta=0.5")
    algo, envs = _build(config)
    collector = RolloutCollector(envs, 32, 2, CPU)
    rollout, _, _ = collector.collect(envs, algo._act, algo._value)
    idx = torch.nonzero(rollout.valid.reshape(-1)).squeeze(1)
    batch = {"obs": rollout.obs.reshape(-1, 4)[idx]}
    value_before = [p.detach().clone() for p in algo.value_net.parameters()]
    policy_before = [p.detach().clone() for p in algo.policy_net.parameters()]
    with torch.no_grad():
        targets = algo.value_net(batch["obs"])
        gap_before = float((algo.policy_net.value(batch["obs"]) - targets).square().mean())
    algo._distil_phase(batch, measure_noise=False)
    assert all(torch.equal(a, b) for a, b in zip(value_before, algo.value_net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(policy_before, algo.policy_net.parameters()))
    with torch.no_grad():  # V_pi moved towards V_V (Eq. 10's first term), measured on the whole batch
        gap_after = float((algo.policy_net.value(batch["obs"]) - targets).square().mean())
    assert gap_after < 0.9 * gap_before, (gap_before, gap_after)
    envs.close()


def test_each_phase_steps_its_own_adam_in_the_papers_order(monkeypatch):
    """DNA paper, Algorithm 1: policy, then value, then distillation, each with its own optimiser; the
    distillation targets come from the value network as the value phase left it."""
    algo, envs = _build(_config())
    order, value_at_distil = [], []
    for name in ("policy", "value", "distil"):
        real = getattr(algo, f"_{name}_phase")

        def phase(batch, measure_noise, valid, name=name, real=real):
            order.append(name)
            if name == "distil":
                value_at_distil.append([p.detach().clone() for p in algo.value_net.parameters()])
            return real(batch, measure_noise, valid)

        monkeypatch.setattr(algo, f"_{name}_phase", phase)
    algo.iterate(envs)
    envs.close()
    assert order == ["policy", "value", "distil"]
    assert all(torch.equal(a, b) for a, b in zip(value_at_distil[0], algo.value_net.parameters()))
    p, batch = algo.params, 2 * 32  # SMALL: 2 envs x 32 steps; minibatches of 32 / 16 / 16
    expected_steps = {"policy": p.policy_epochs * (batch // 32), "value": p.value_epochs * (batch // 16),
                      "distil": p.distil_epochs * (batch // 16)}
    for name, optimizer in algo.optimizers.items():
        steps = {float(state["step"]) for state in optimizer.state.values()}
        assert steps == {expected_steps[name]}, (name, steps)


# ---------------------------------------------------------------------------------------------- options
def test_repeated_action_penalty_is_applied_after_the_normaliser(monkeypatch):
    """The penalty lowers the rewards the advantages see, but the env's reward statistics are the same
    as without it (the penalty is outside the normaliser)."""
    seen = {}
    real_gae = dna_module.gae

    def spy(rewards, *args, **kwargs):
        seen["rewards"] = rewards.clone()
        return real_gae(rewards, *args, **kwargs)

    monkeypatch.setattr(dna_module, "gae", spy)
    stats = []
    for penalty in (0.0, 0.3):
        config = _config("env.normalize_reward=true", f"params.repeat_action_penalty={penalty}",
                         "params.repeat_action_limit=1")
        algo, envs = _build(config)
        algo.iterate(envs)
        stats.append(envs.reward_scaler.state_dict())
        if penalty:
            rollout = algo._collector
            actions, valid, ends = rollout.actions, rollout.valid, rollout.ends
            mask, _, _ = repeated_action_mask(actions, valid, ends, np.full(2, -1), np.zeros(2, np.int64), 1)
            assert mask.any()
            expected = torch.from_numpy(rollout.rewards) - 0.3 * torch.from_numpy(mask).float()
            assert torch.allclose(seen["rewards"], expected)
        envs.close()
    for key in stats[0]:
        assert np.array_equal(np.asarray(stats[0][key]), np.asarray(stats[1][key])), key


def test_warmup_takes_random_actions_for_u_1_w_steps_per_env(monkeypatch):
    config = _config("params.warmup_max_steps=7", "env.num_envs=3")
    algo, envs = _build(config)
    expected_lengths = np.random.default_rng(config.seed).integers(1, 8, size=3)
    recorded = []
    real_step = envs.step

    def record(actions):
        recorded.append(np.array(actions))
        return real_step(actions)

    monkeypatch.setattr(envs, "step", record)
    monkeypatch.setattr(algo, "_random_actions", lambda: np.zeros(3, dtype=np.int64))
    real_act = algo._act
    monkeypatch.setattr(algo, "_act", lambda obs: (np.ones(3, dtype=np.int64), *real_act(obs)[1:]))
    metrics = algo.iterate(envs)
    warm = np.stack(recorded[: expected_lengths.max()])
    for b in range(3):
        assert (warm[: expected_lengths[b], b] == 0).all() and (warm[expected_lengths[b]:, b] == 1).all()
    assert metrics["warmup_steps"] == 3 * expected_lengths.max()
    assert algo.steps == 3 * expected_lengths.max() + 3 * 32 and algo.warmed_up
    algo.iterate(envs)  # no second warm-up
    assert algo.steps == 3 * expected_lengths.max() + 2 * 3 * 32
    envs.close()


def test_noise_scale_is_measured_every_k_iterations_for_all_three_losses():
    config = _config("params.noise_scale_every=2", "params.noise_b_small=4", "params.noise_b_big=48",
                     "params.noise_num_small_batches=3")
    algo, envs = _build(config)
    rows = [algo.iterate(envs) for _ in range(3)]
    for name in ("policy", "value", "distil"):
        for key in ("sigma", "b_simple", "g2", "s", "g2_smoothed", "s_smoothed"):
            assert f"noise/{name}/{key}" in rows[0] and f"noise/{name}/{key}" in rows[2]
            assert f"noise/{name}/{key}" not in rows[1]
        assert algo.noise_estimators[name].num_updates == 2
        assert math.isfinite(rows[0][f"noise/{name}/s"])
    envs.close()


def test_noise_scale_measures_each_loss_on_its_own_network_at_the_phase_start(monkeypatch):
    """With B_big = the whole rollout, G_big is the full-batch gradient, and |G_big|^2 = g2 + s / B_big
    (Eqs. 4-5 combined); it must equal the gradient of each phase's loss with respect to the network that
    phase trains, at the parameters the phase starts from, computed here directly."""
    config = _config("params.noise_scale_every=1", "params.noise_b_small=4", "params.noise_b_big=100000",
                     "params.noise_num_small_batches=2")
    algo, envs = _build(config)
    p = algo.params
    expected = {}

    def full_gradient_sq(loss, net):
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        return sum(float(g.double().square().sum()) for g in grads if g is not None)

    for name in ("policy", "value", "distil"):
        real = getattr(algo, f"_{name}_phase")

        def phase(batch, measure_noise, valid, name=name, real=real):
            obs = batch["obs"]
            if name == "policy":
                loss = policy_phase_loss(algo.dist, algo.policy_net.dist_params(obs), batch["actions"],
                                         batch["old_log_probs"], batch["advantages"], p.clip_coef, p.ent_coef)[0]
                expected[name] = (full_gradient_sq(loss, algo.policy_net), obs.shape[0])
            elif name == "value":
                loss = value_phase_loss(algo.value_net(obs), batch["value_targets"], p.value_loss_coef)
                expected[name] = (full_gradient_sq(loss, algo.value_net), obs.shape[0])
            else:
                with torch.no_grad():
                    old, targets = algo.policy_net.dist_params(obs), algo.value_net(obs)
                params, values = algo.policy_net(obs)
                loss = distil_phase_loss(values, targets, algo.dist, old, params, p.distil_beta)[0]
                expected[name] = (full_gradient_sq(loss, algo.policy_net), obs.shape[0])
            return real(batch, measure_noise, valid)

        monkeypatch.setattr(algo, f"_{name}_phase", phase)
    metrics = algo.iterate(envs)
    envs.close()
    for name, (g_sq, b_big) in expected.items():
        measured = metrics[f"noise/{name}/g2"] + metrics[f"noise/{name}/s"] / b_big
        assert g_sq > 0 and measured == pytest.approx(g_sq, rel=1e-4), name


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="params.distil_constraint"):
        config = _config("params.distil_constraint=logit_mse", env="Pendulum-v1")
        envs = build_envs(config)
        try:
            DNA(config, envs.spec, CPU)
        finally:
            envs.close()
    with pytest.raises(ConfigError, match="params.lambda_pi"):
        _config("params.lambda_pi=1.5")
    with pytest.raises(ConfigError, match="params.noise_b_big"):
        _config("params.noise_b_big=8", "params.noise_b_small=8")


def test_ablation_variants_fix_their_switches():
    assert make_config("dna-no-distil", "CartPole-v1", overrides=FAST).params.distil_epochs == 0
    mb = make_config("dna-mb512", "CartPole-v1", overrides=FAST).params
    assert mb.minibatch_sizes() == {"policy": 512, "value": 512, "distil": 512}
    same = make_config("dna-same-lambda", "CartPole-v1", overrides=FAST).params
    assert same.lambda_pi == same.lambda_v == 0.95
    assert make_config("dna", "CartPole-v1", overrides=FAST).preset == "dna-classic"


def test_gaussian_policy_with_mean_mse_constraint_trains():
    config = _config("params.distil_constraint=mean_mse", env="Pendulum-v1", total=128)
    assert config.preset == "dna-mujoco"
    algo, envs = _build(config)
    assert isinstance(algo.dist, DiagGaussian)
    metrics = algo.iterate(envs)
    assert math.isfinite(metrics["loss/distil_constraint"]) and metrics["loss/distil_constraint"] > 0
    envs.close()


# ---------------------------------------------------------------------------------------------- training loop
def test_resume_equals_uninterrupted_with_every_option_on(tmp_path):
    options = ["params.warmup_max_steps=10", "params.repeat_action_penalty=0.1", "params.repeat_action_limit=3",
               "params.noise_scale_every=2", "params.noise_b_small=4", "params.noise_b_big=32",
               "params.noise_num_small_batches=2", "checkpoint_every_iterations=2", "env.normalize_reward=true"]
    total = 64 * 7
    train(_config(*options, total=total), tmp_path / "full")
    first = train(_config(*options, total=total), tmp_path / "split", stop_after_iterations=3)
    assert first["status"] == "interrupted"
    resumed = train(_config(*options, total=total), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    a = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]
    b = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]
    for net in ("policy_net", "value_net"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")


# ---------------------------------------------------------------------------------------------- PPO (2x)
def test_ppo2x_doubles_the_nature_cnn_channels():
    import gymnasium

    from aclab.envs.spec import EnvSpec

    spec = EnvSpec("atari:Fake", "atari", (4, 84, 84), np.dtype(np.uint8), gymnasium.spaces.Discrete(18),
                   gymnasium.spaces.Box(0, 255, (4, 84, 84), np.uint8), None)
    params = PPO2x.Config(encoder="nature_cnn", shared_network=True)
    algo = PPO2x(Config(algo="ppo2x", params=params), spec, CPU)
    convs = [m for m in algo.net.policy_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128]
    unique = {id(p): p.numel() for p in algo.net.parameters()}
    assert 3.4e6 < sum(unique.values()) < 3.7e6  # DNA paper, Section 5: ~3.5M, as DNA's two networks
    assert {id(p) for p in algo.optimizer.param_groups[0]["params"]} == set(unique)
    actions = algo.act(np.zeros((2, 4, 84, 84), np.uint8))
    assert actions.shape == (2,)
    # vector observations: the MLP hidden sizes are multiplied instead
    config = make_config("ppo2x", "CartPole-v1", overrides=FAST)
    envs = build_envs(config)
    vec = PPO2x(config, envs.spec, CPU)
    assert vec.net.weights[0].shape[-1] == 128 and config.params.hidden_sizes == (64, 64)
    envs.close()


@pytest.mark.slow
def test_dna_learns_inverted_pendulum(tmp_path):
    """Continuous actions (Gaussian policy, mean-MSE constraint), a cheaper batch than dna-mujoco: ~40 s."""
    config = make_config("dna", "mujoco:InvertedPendulum-v4", overrides=[
        "progress=false", "eval.episodes=0", "total_steps=100000", "env.num_envs=8", "params.num_steps=256",
        "params.policy_minibatch_size=256", "params.value_minibatch_size=256", "params.distil_minibatch_size=256",
        "params.policy_epochs=5", "params.value_epochs=5", "params.distil_epochs=5"])
    assert config.params.distil_constraint == "mean_mse"
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 400, summary


@pytest.mark.slow
def test_dna_learns_cartpole(tmp_path):
    summary = train(make_config("dna", "CartPole-v1", overrides=[*FAST, "total_steps=150000"]), tmp_path / "run")
    assert summary["final_return"] > 450, summary  # dna-classic: 500 on 5/5 seeds here


def test_atari_smoke_with_every_appendix_a_option(tmp_path):
    """Nature-CNN networks, warm-up, repeated-action penalty, noise scale and the frame marks, end to end."""
    config = make_config("dna", "atari:Pong", overrides=[
        "progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=8", "total_steps=16",
        "params.policy_minibatch_size=8", "params.value_minibatch_size=4", "params.distil_minibatch_size=4",
        "params.warmup_max_steps=5", "params.noise_scale_every=1", "params.noise_b_small=2",
        "params.noise_num_small_batches=2", 'env.options={"setting": "hard", "action_marker": true}'])
    assert config.preset == "dna-atari" and config.params.repeat_action_penalty == 0.25
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished"
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert float(rows[0]["warmup_steps"]) >= 2 and "noise/value/sigma" in rows[0]
    state = load_latest_checkpoint(tmp_path / "run" / "checkpoints")["algo"]
    assert any("convs" in k for k in state["value_net"])


@pytest.mark.parametrize("phase", ["policy", "value", "distil"])
def test_each_phase_step_clips_the_gradient_to_max_grad_norm(phase):
    """A loss whose gradient is known by hand (1e3 sum p^2 -> 2e3 p): the step returns the norm before
    clipping, and the gradient it stepped with is that direction rescaled to max_grad_norm."""
    algo, envs = _build(_config("params.max_grad_norm=0.5"))
    envs.close()
    parameters = list((algo.value_net if phase == "value" else algo.policy_net).parameters())
    assert_step_clips_to(lambda loss: algo._step(phase, loss, parameters), parameters, 0.5)
