"""IMPALA: the loss against a slow reference, masking of autoreset dummies, RMSProp, the Table 2 network
(squashed Gaussian, LSTM), end-to-end runs, policy lag and exact resume."""

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from run_rows import metric_rows

from aclab.algos.impala import (
    Batch,
    Impala,
    ImpalaActingPolicy,
    ImpalaNet,
    LossSettings,
    LossWeights,
    flat_state,
    head_loss,
    kl_to_standard_normal,
    load_flat_state,
    rmsprop_step,
)
from aclab.config import ConfigError
from aclab.core.distributions import Categorical, TanhGaussian, tanh_normal_log_prob
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# The loss (STAC Eq. 1 / Algorithm 1) against python loops
# ----------------------------------------------------------------------------------------------
def _random_batch(T=7, B=3, A=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T + 1, B, A, generator=g, dtype=dtype) * 1.5
    values = torch.randn(T + 1, B, generator=g, dtype=dtype)
    actions = torch.randint(0, A, (T, B), generator=g)
    behaviour_logits = torch.randn(T, B, A, generator=g, dtype=dtype) * 1.5
    mu = torch.log_softmax(behaviour_logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    rewards = torch.randn(T, B, generator=g, dtype=dtype)
    terminated = torch.zeros(T, B, dtype=torch.bool)
    ends = torch.zeros(T, B, dtype=torch.bool)
    valid = torch.ones(T, B, dtype=torch.bool)
    terminated[2, 0] = ends[2, 0] = True  # termination, then a dummy step
    valid[3, 0] = False
    ends[4, 1] = True  # truncation (bootstraps), then a dummy
    valid[5, 1] = False
    batch = Batch(
        obs=torch.zeros(T + 1, B, 1),
        actions=actions,
        behaviour_log_probs=mu,
        rewards=rewards,
        not_terminated=(~terminated).to(dtype),
        ends=ends,
        weights=valid.to(dtype),
        first=torch.zeros(T + 1, B, dtype=dtype),
        core_state=None,
        versions=torch.zeros(T, B),
    )
    return logits, values, batch


def _reference_loss(logits, values, batch, w, rho_bar=1.0, c_bar=1.0, log_rho_clip=None):
    logits, values = logits.numpy(), values.numpy()
    T, B = batch.rewards.shape
    log_pi_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    a = batch.actions.numpy()
    log_pi = np.take_along_axis(log_pi_all[:-1], a[..., None], -1)[..., 0]
    valid = batch.weights.numpy() > 0
    log_ratio = log_pi - batch.behaviour_log_probs.numpy()
    if log_rho_clip is not None:
        log_ratio = np.clip(log_ratio, -log_rho_clip, log_rho_clip)
    ratio = np.where(valid, np.exp(log_ratio), 1.0)
    rho = w.alpha_rho * np.minimum(rho_bar, ratio) + (1 - w.alpha_rho) * ratio
    c = w.trace_lambda * (w.alpha_c * np.minimum(c_bar, ratio) + (1 - w.alpha_c) * ratio)
    r, ends = batch.rewards.numpy(), batch.ends.numpy()
    disc = w.gamma * batch.not_terminated.numpy()
    vs = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            total, trace = 0.0, 1.0
            for t in range(s, T):
                total += trace * rho[t, b] * (r[t, b] + disc[t, b] * values[t + 1, b] - values[t, b])
                if ends[t, b]:
                    break
                trace *= disc[t, b] * c[t, b]
            vs[s, b] = values[s, b] + total
    value_loss = policy_loss = entropy = 0.0
    for b in range(B):
        for s in range(T):
            if not valid[s, b]:
                continue
            if ends[s, b]:
                nxt = values[s + 1, b]
            elif s == T - 1:
                nxt = values[T, b]
            else:
                nxt = vs[s + 1, b]
            advantage = rho[s, b] * (r[s, b] + disc[s, b] * nxt - values[s, b])
            value_loss += (vs[s, b] - values[s, b]) ** 2
            policy_loss -= log_pi[s, b] * advantage
            p = np.exp(log_pi_all[s, b])
            entropy += -(p * log_pi_all[s, b]).sum()
    return w.g_v * value_loss + w.g_p * policy_loss - w.g_e * entropy


@pytest.mark.parametrize("alphas,lam", [((1.0, 1.0), 1.0), ((0.4, 0.7), 0.8)])
def test_head_loss_matches_reference(alphas, lam):
    logits, values, batch = _random_batch()
    w = LossWeights(
        gamma=0.9, trace_lambda=lam, alpha_rho=alphas[0], alpha_c=alphas[1], g_v=0.25, g_p=1.0, g_e=0.05
    )
    loss, stats, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings())
    ratios = torch.exp(
        torch.log_softmax(logits[:-1], -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        - batch.behaviour_log_probs
    )
    assert ratios.min() < 0.3 and ratios.max() > 3  # clipping is exercised
    assert stats["is_clipped_fraction"] > 0
    np.testing.assert_allclose(loss.item(), _reference_loss(logits, values, batch, w), rtol=1e-10)
    mean_loss, _, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings(reduction="mean"))
    np.testing.assert_allclose(mean_loss.item(), loss.item() / batch.weights.sum().item(), rtol=1e-12)


def test_log_rho_clip_bounds_the_leaky_importance_weights():
    logits, values, batch = _random_batch(seed=3)
    w = LossWeights(0.9, 1.0, alpha_rho=0.0, alpha_c=0.0, g_v=0.25, g_p=1.0, g_e=0.01)  # pure IS: unbounded
    settings = LossSettings(log_rho_clip=0.5)
    loss, stats, _ = head_loss(Categorical(3), logits, values, batch, w, settings)
    np.testing.assert_allclose(
        loss.item(), _reference_loss(logits, values, batch, w, log_rho_clip=0.5), rtol=1e-10
    )
    unclipped, _, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings())
    assert loss.item() != unclipped.item()


def test_value_targets_and_advantages_are_constants_for_theta():
    logits, values, batch = _random_batch(seed=1)
    logits.requires_grad_(True)
    values.requires_grad_(True)
    w = LossWeights(0.95, 1.0, 1.0, 1.0, g_v=0.25, g_p=1.0, g_e=0.0)
    loss, _, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings())
    grad_logits, grad_values = torch.autograd.grad(loss, [logits, values])
    # value loss only: d/dV_s = -2 g_v (v_s - V_s) on valid steps, nothing through the targets or V_T
    with torch.no_grad():
        vs_minus_v = _targets_minus_values(logits, values, batch, w)
    np.testing.assert_allclose(
        grad_values[:-1].numpy(), (-2 * 0.25 * vs_minus_v * batch.weights).numpy(), rtol=1e-10, atol=1e-12
    )
    assert torch.all(grad_values[-1] == 0) and torch.all(grad_logits[-1] == 0)
    assert torch.all(grad_logits[3, 0] == 0) and torch.all(
        grad_logits[5, 1] == 0
    )  # dummies carry no gradient


def _targets_minus_values(logits, values, batch, w):
    from aclab.core.returns import leaky_vtrace

    log_pi = torch.log_softmax(logits[:-1], -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    log_rhos = torch.where(batch.weights > 0, log_pi - batch.behaviour_log_probs, torch.zeros_like(log_pi))
    vt = leaky_vtrace(
        log_rhos,
        batch.rewards,
        values,
        w.gamma * batch.not_terminated,
        lambda_=w.trace_lambda,
        episode_ends=batch.ends,
    )
    return vt.vs - values[:-1]


def test_dummy_steps_do_not_change_the_loss_even_with_extreme_ratios():
    logits, values, batch = _random_batch(seed=2)
    w = LossWeights(0.9, 0.9, 0.5, 0.5, 0.25, 1.0, 0.01)
    reference, _, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings())
    batch.behaviour_log_probs[3, 0] = -500.0  # exp(+500) would overflow without masking
    batch.rewards[3, 0] = 1e6
    batch.actions[5, 1] = (batch.actions[5, 1] + 1) % 3
    loss, _, _ = head_loss(Categorical(3), logits, values, batch, w, LossSettings())
    assert torch.isfinite(loss)
    assert loss.item() == reference.item()


def test_kl_to_standard_normal_closed_form():
    mean, log_std = torch.tensor([[0.3, -1.2]]), torch.tensor([[-0.5, 0.4]])
    expected = (0.5 * (torch.exp(2 * log_std) + mean**2 - 1) - log_std).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(torch.cat([mean, log_std], -1)), expected)


# ----------------------------------------------------------------------------------------------
# RMSProp
# ----------------------------------------------------------------------------------------------
def test_rmsprop_step_matches_torch_and_optax_conventions():
    torch.manual_seed(0)
    param = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    # torch.optim.RMSprop: sqrt(ms) + eps, ms starting at 0
    reference = param.clone().requires_grad_(True)
    optimizer = torch.optim.RMSprop([reference], lr=0.01, alpha=0.99, eps=0.1)
    ours, ms = [param.clone()], [torch.zeros(5, dtype=torch.float64)]
    for g in grads:
        reference.grad = g.clone()
        optimizer.step()
        ours, ms = rmsprop_step(ours, [g], ms, 0.01, 0.99, 0.1, eps_inside_sqrt=False)
    torch.testing.assert_close(ours[0], reference.detach(), rtol=1e-12, atol=1e-12)
    # optax scale_by_rms: g / sqrt(ms + eps), by hand
    p, s = param.clone(), torch.zeros(5, dtype=torch.float64)
    ours, ms = [param.clone()], [torch.zeros(5, dtype=torch.float64)]
    for g in grads:
        s = 0.99 * s + 0.01 * g * g
        p = p - 0.01 * g / torch.sqrt(s + 0.1)
        ours, ms = rmsprop_step(ours, [g], ms, 0.01, 0.99, 0.1, eps_inside_sqrt=True)
    torch.testing.assert_close(ours[0], p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ms[0], s, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Network (Table 2)
# ----------------------------------------------------------------------------------------------
def test_squashed_gaussian_head_acting_and_log_probs():
    torch.manual_seed(0)
    dist = TanhGaussian(2)
    net = ImpalaNet((3,), dist, hidden_sizes=(16,), head_hidden=8, log_std_bounds=(-3.0, 1.0))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8.0)  # saturate the heads
    obs = torch.randn(64, 3)
    with torch.no_grad():
        params, _ = net.step(obs, torch.zeros(64), None)
    mean, log_std = params.chunk(2, -1)
    assert mean.abs().max() <= 1.0 and mean.abs().max() > 0.9
    assert log_std.min() >= -3.0 and log_std.max() <= 1.0 and (log_std.max() - log_std.min()) > 3.0
    space = spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    policy = ImpalaActingPolicy(net, torch.Generator().manual_seed(1), space)
    env_actions, stored, log_probs, _ = policy.act(obs.numpy(), np.zeros(64, bool), None)
    assert (env_actions[:, 0] >= -2).all() and (env_actions[:, 0] <= 2).all()
    assert (env_actions[:, 1] >= 0).all() and (env_actions[:, 1] <= 1).all()
    np.testing.assert_allclose(env_actions, np.tanh(stored) * [2.0, 0.5] + [0.0, 0.5], rtol=1e-5, atol=1e-6)
    expected = tanh_normal_log_prob(
        params, torch.tanh(torch.from_numpy(stored)), pre_tanh=torch.from_numpy(stored)
    )
    np.testing.assert_allclose(log_probs, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_lstm_unroll_equals_stepping_with_resets():
    torch.manual_seed(0)
    net = ImpalaNet((4,), Categorical(2), hidden_sizes=(8,), lstm_size=6, head_hidden=0, num_heads=2)
    T1, B = 6, 3
    obs, first = torch.randn(T1, B, 4), torch.zeros(T1, B)
    first[2, 0] = first[4, 2] = 1.0
    state0 = torch.randn(B, 12)
    params, values = net(obs, first, state0)
    assert params.shape == (2, T1, B, 2) and values.shape == (2, T1, B)
    state = state0
    for t in range(T1):
        step_params, state = net.step(obs[t], first[t], state)
        torch.testing.assert_close(step_params, params[0, t])
    # a reset makes the output independent of the state before it
    other = net(obs, first, torch.randn(B, 12))[0]
    torch.testing.assert_close(other[0, 2:, 0], params[0, 2:, 0])
    assert not torch.allclose(other[0, :2, 0], params[0, :2, 0])


def test_flat_state_round_trip():
    torch.manual_seed(0)
    a = ImpalaNet((4,), Categorical(2), hidden_sizes=(8,), lstm_size=4, num_heads=3, gamma_embedding=2)
    torch.manual_seed(1)
    b = ImpalaNet((4,), Categorical(2), hidden_sizes=(8,), lstm_size=4, num_heads=3, gamma_embedding=2)
    a.gamma_input.fill_(0.5)
    load_flat_state(b, flat_state(a))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def _config(total_steps, *extra, algo="impala", env="CartPole-v1"):
    return make_config(
        algo,
        env,
        overrides=[
            *FAST,
            f"total_steps={total_steps}",
            "env.backend=gymnasium",
            "env.num_envs=4",
            "params.num_steps=8",
            "params.hidden_sizes=[16]",
            "params.head_hidden=8",
            "checkpoint_every_iterations=2",
            *extra,
        ],
    )


def test_sync_run_is_on_policy_without_overlap_and_lags_with_overlap(tmp_path):
    summary = train(_config(320), tmp_path / "plain")
    assert summary["status"] == "finished" and summary["steps"] == 320
    rows = metric_rows(tmp_path / "plain")
    assert len(rows) == 10
    for r in rows:
        assert float(r["policy_lag_max"]) == 0
        assert abs(float(r["is_ratio_mean"]) - 1) < 1e-5  # learner and actor see the same policy
    train(_config(32 + 9 * 8, "params.overlap=6"), tmp_path / "overlap")  # n = 8: 2 new steps per update
    rows = metric_rows(tmp_path / "overlap")
    assert len(rows) == 10 and [int(r["step"]) for r in rows][:2] == [32, 40]
    assert float(rows[-1]["policy_lag_max"]) == 3  # the 6 kept steps come from the 3 previous versions
    assert 1.2 < float(rows[-1]["policy_lag_mean"]) < 1.8  # 1.5 unless dummy steps are excluded
    assert float(rows[-1]["is_ratio_mean"]) != 1.0


@pytest.mark.parametrize("extra", [("params.overlap=3", "params.lstm_size=8"), ("params.num_heads=3",)])
def test_resume_equals_uninterrupted(tmp_path, extra):
    total = 32 + 11 * 20 if "params.overlap=3" in extra else 12 * 32
    train(_config(total, *extra), tmp_path / "full")
    first = train(_config(total, *extra), tmp_path / "split", stop_after_iterations=5)
    assert first["status"] == "interrupted"
    resumed = train(_config(total, *extra), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    a = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]
    b = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    for x, y in zip(a["square_avgs"], b["square_avgs"]):
        assert torch.equal(x, y)
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")


def test_policy_lag_is_measured_over_the_real_transitions():
    """policy_lag_mean is the mean of (learner version - acting version) over the valid (non-dummy)
    transitions of each batch, recomputed here from the chunks; dummies (lag 0 in a lagging window) would
    pull it down."""
    from aclab.envs import build_envs

    config = _config(32 + 20 * 8, "params.overlap=6", 'env.options={"max_episode_steps": 12}')
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    algo = Impala(config, envs.spec, torch.device("cpu"))
    chunks = []
    real_next_chunk = algo.next_chunk

    def next_chunk(e):
        chunks.append(real_next_chunk(e))
        return chunks[-1]

    algo.next_chunk = next_chunk
    differs = False
    for _ in range(20):
        iteration = algo.iteration
        metrics = algo.iterate(envs)
        lag = iteration - chunks[-1].versions
        valid = chunks[-1].valid
        assert metrics["policy_lag_mean"] == pytest.approx(float(lag[valid].mean()), abs=1e-9)
        assert metrics["policy_lag_max"] == float(lag.max())
        differs |= abs(float(lag[valid].mean()) - float(lag.mean())) > 1e-3
    envs.close()
    assert differs  # some batch held dummy steps whose lag differs from the real transitions'


def test_continuous_run_end_to_end(tmp_path):
    config = _config(320, "params.lstm_size=8", "params.overlap=0", env="Pendulum-v1")
    summary = train(config, tmp_path / "pendulum")
    assert summary["status"] == "finished"
    rows = metric_rows(tmp_path / "pendulum")
    assert all(math.isfinite(float(r["loss/total"])) for r in rows)
    assert float(rows[-1]["regularizer"]) >= 0  # KL(pi || N(0, I)) replaces the entropy bonus


def test_async_modes_reject_normalisation_and_bad_actor_splits():
    from aclab.algos.impala import Impala
    from aclab.envs import build_envs

    config = _config(320, "params.actor_mode=thread", "env.normalize_obs=true")
    envs = build_envs(config)
    with pytest.raises(ConfigError, match="normalize_obs"):
        Impala(config, envs.spec, torch.device("cpu"))
    config = _config(
        320,
        "params.actor_mode=thread",
        "params.envs_per_actor=3",
        "env.normalize_obs=false",
        "env.normalize_reward=false",
    )
    with pytest.raises(ConfigError, match="envs_per_actor"):
        Impala(config, envs.spec, torch.device("cpu"))
    envs.close()


# ----------------------------------------------------------------------------------------------
# Learning (slow; run in a session: pytest -m slow tests/test_impala.py)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_impala_learns_cartpole_sync(tmp_path):
    config = make_config("impala", "CartPole-v1", overrides=[*FAST, "total_steps=200000"])
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 150, summary


@pytest.mark.slow
def test_impala_learns_inverted_pendulum_sync(tmp_path):
    config = make_config(
        "impala",
        "mujoco:InvertedPendulum-v4",
        preset="impala-control-cpu",
        overrides=[*FAST, "total_steps=200000"],
    )
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 500, summary
