"""FixPO (aclab.algos.fixpo): losses against hand computations, the beta multiplier's dynamics, the
trust-region postcondition on every update of runs whose primary phase overshoots, the ablation
switches, three action distributions, resume equality and learning on small tasks."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from grad_clip_check import assert_step_clips_to
from run_rows import metric_rows
from torch import distributions as td

from aclab.algos.common import resolve_device
from aclab.algos.fixpo import (
    FixPO,
    TrustRegionViolation,
    beta_loss,
    importance_weighted_policy_loss,
    kl_statistic,
    primary_loss,
    squared_error_value_loss,
)
from aclab.config import ConfigError
from aclab.core.distributions import Categorical, DiagGaussian
from aclab.core.distributions_extra import Beta
from aclab.envs import build_envs
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

CPU = resolve_device("cpu")
FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
# a primary phase that overshoots: high lr, beta starting at 0, small trust region, many epochs
OVERSHOOT = ["env.num_envs=4", "params.num_steps=64", "params.minibatch_size=64", "params.fixup_minibatch_size=128",
             "params.num_epochs=8", "params.lr=0.01", "params.anneal_lr=false", "params.beta_init=0",
             "params.eps_kl=0.05"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config(*overrides: str, algo: str = "fixpo", env: str = "CartPole-v1", total: int = 256 * 4):
    return make_config(algo, env, overrides=[*FAST, *OVERSHOOT, f"total_steps={total}", *overrides])


def _build(config):
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return FixPO(config, envs.spec, CPU), envs


# ---------------------------------------------------------------------------------------------- losses
def test_losses_match_hand_computation():
    log_probs = torch.tensor([-0.2, -1.0, -0.5])
    old_log_probs = torch.tensor([-0.4, -0.9, -0.5])
    advantages = torch.tensor([2.0, -1.0, 0.5])
    ratios = [math.exp(0.2), math.exp(-0.1), 1.0]
    surrogate = -(ratios[0] * 2.0 - ratios[1] * 1.0 + 0.5) / 3  # no clipping, whatever the ratio
    assert float(importance_weighted_policy_loss(log_probs, old_log_probs, advantages)) == pytest.approx(surrogate)
    values, returns = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    assert float(squared_error_value_loss(values, returns)) == pytest.approx((1 + 0.25) / 3)
    old_values = torch.tensor([0.5, 0.0, 2.0])  # clip 0.2: V_clip = (0.7, 0, 2) -> (0.49, 0.25, 0) vs (1, 0.25, 0)
    assert float(squared_error_value_loss(values, returns, old_values, 0.2)) == pytest.approx((1 + 0.25) / 3)
    assert float(squared_error_value_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.5]), 0.2)) == \
        pytest.approx(1.0)  # max(1, (1.3 - 1)^2)
    kl = torch.tensor([0.1, 0.4, 0.2])
    entropy = torch.tensor([1.0, 0.8, 0.6])
    beta = torch.tensor(3.0, requires_grad=True)
    total, policy_loss = primary_loss(log_probs, old_log_probs, advantages, torch.tensor(0.7), entropy, kl, beta,
                                      vf_coef=0.1, ent_coef=0.01)
    assert float(policy_loss) == pytest.approx(surrogate)
    assert float(total) == pytest.approx(surrogate + 0.1 * 0.7 - 0.01 * 0.8 + 3.0 * 0.7 / 3)
    assert not total.requires_grad  # beta's gradient is stopped in L_theta
    assert float(kl_statistic(kl, "max")) == pytest.approx(0.4)
    assert float(kl_statistic(kl, "mean")) == pytest.approx(0.7 / 3)


def test_beta_loss_gradient_raises_beta_above_the_target_and_lowers_it_below():
    beta = torch.tensor(2.0, requires_grad=True)
    beta_loss(beta, torch.tensor(0.3), eps_kl=0.5, c_beta=3.0).backward()
    assert float(beta.grad) == pytest.approx(0.5 - 0.9)  # negative: a descent step increases beta
    beta.grad = None
    beta_loss(beta, torch.tensor(0.1), eps_kl=0.5, c_beta=3.0).backward()
    assert float(beta.grad) == pytest.approx(0.5 - 0.3)  # positive: beta decreases
    kl = torch.tensor(0.2, requires_grad=True)
    beta_loss(beta, kl, 0.5, 3.0).backward()
    assert kl.grad is None  # the policy is not trained by L_beta


def test_beta_is_clamped_at_zero_and_at_the_optional_cap():
    algo, envs = _build(_config("params.beta_init=0.001", "params.beta_lr=0.5", "params.beta_max=1.2"))
    algo._beta_step(torch.tensor(0.0))  # C D << eps: beta would go negative
    assert float(algo.beta.detach()) == 0.0
    for _ in range(10):
        algo._beta_step(torch.tensor(10.0))
    assert float(algo.beta.detach()) == pytest.approx(1.2)
    envs.close()


# ---------------------------------------------------------------------------------------------- postcondition
def _independent_batch_kl(algo: FixPO, rollout_copy: dict) -> torch.Tensor:
    """KL(pi_old || pi) from torch.distributions, one state at a time in one pass."""
    with torch.no_grad():
        new = algo.net.dist_params(rollout_copy["obs"])
    return _independent_kl(algo, rollout_copy["old_params"], new)


def _independent_kl(algo: FixPO, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) [N] per state from torch.distributions' closed forms."""
    if isinstance(algo.dist, Categorical):
        return td.kl_divergence(td.Categorical(logits=old), td.Categorical(logits=new))
    if isinstance(algo.dist, DiagGaussian):
        d = old.shape[-1] // 2
        p = td.Independent(td.Normal(old[:, :d], old[:, d:].exp()), 1)
        q = td.Independent(td.Normal(new[:, :d], new[:, d:].exp()), 1)
        return td.kl_divergence(p, q)
    pa, pb = algo.dist.concentrations(old)
    qa, qb = algo.dist.concentrations(new)
    return td.kl_divergence(td.Independent(td.Beta(pa, pb), 1), td.Independent(td.Beta(qa, qb), 1))


@pytest.mark.parametrize("env, extra", [("CartPole-v1", []), ("Pendulum-v1", []),
                                        ("Pendulum-v1", ["params.action_dist=beta"])])
def test_postcondition_holds_on_every_update_of_an_overshooting_run(monkeypatch, env, extra):
    config = _config(*extra, env=env)
    algo, envs = _build(config)
    expected_dist = {"CartPole-v1": Categorical, "Pendulum-v1": Beta if extra else DiagGaussian}[env]
    assert isinstance(algo.dist, expected_dist)
    captured = {}
    real_update = algo.update

    def update(rollout, advantages, returns):
        valid = rollout.valid.reshape(-1)
        captured["obs"] = rollout.obs.reshape(-1, *rollout.obs.shape[2:])[valid].clone()
        captured["old_params"] = rollout.dist_params.reshape(-1, rollout.dist_params.shape[-1])[valid].clone()
        return real_update(rollout, advantages, returns)

    monkeypatch.setattr(algo, "update", update)
    fixup_steps, primary_kls = 0, []
    for _ in range(4):
        metrics = algo.iterate(envs)
        kl = _independent_batch_kl(algo, captured)
        assert float(kl.max()) <= 0.05 * (1 + 1e-4)
        assert metrics["trust_region/final_max_kl"] == pytest.approx(float(kl.max()), rel=1e-3, abs=1e-6)
        assert metrics["trust_region/max_kl"] <= 0.05 * (1 + 1e-4) and metrics["trust_region/violations"] == 0
        fixup_steps += metrics["fixup/steps"]
        primary_kls.append(metrics["kl/max_primary"])
    assert fixup_steps > 0 and max(primary_kls) > 0.05  # the primary phase did overshoot; the fixup repaired it
    envs.close()


def test_without_the_fixup_phase_the_same_run_breaks_the_trust_region():
    """The check can fail: with the fixup phase off, the postcondition check (forced on) raises."""
    algo, envs = _build(_config("params.fixup=off", "params.trust_region_check=raise"))
    with pytest.raises(TrustRegionViolation, match="trust region violated"):
        for _ in range(4):
            algo.iterate(envs)
    envs.close()
    algo, envs = _build(_config("params.fixup=off"))  # the ablation itself only logs
    metrics = [algo.iterate(envs) for _ in range(3)]
    assert max(m["trust_region/max_kl"] for m in metrics) > 0.05
    assert sum(m["trust_region/violations"] for m in metrics) >= 1
    envs.close()


@pytest.mark.parametrize("target", ["max", "mean"])
def test_one_state_outside_the_trust_region_is_a_violation_of_the_max_constraint(target):
    """The postcondition bounds every state's KL (FixPO's max_s D(s)): one state far outside eps_KL among
    63 unchanged ones violates it, though the mean KL stays inside; the mean-KL ablation bounds the mean."""
    algo, envs = _build(_config("params.trust_region_check=raise", f"params.kl_target={target}"))
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(64, 4)), dtype=torch.float32)
    with torch.no_grad():
        old = algo.net.dist_params(obs).clone()
    old[0] += torch.tensor([3.0, -3.0])  # KL about 2.6 at this state, 0 elsewhere: mean about 0.04 < 0.05
    kl = _independent_kl(algo, old, algo.net.dist_params(obs).detach())
    assert float(kl.max()) > 0.05 > float(kl.mean())
    batch = {"obs": obs, "old_params": old}
    if target == "max":
        with pytest.raises(TrustRegionViolation, match="trust region violated"):
            algo._check_trust_region(batch)
    else:
        max_kl, mean_kl = algo._check_trust_region(batch)
        assert (max_kl, mean_kl) == pytest.approx((float(kl.max()), float(kl.mean())), rel=1e-4)
    envs.close()


def test_fixup_that_cannot_terminate_raises():
    algo, envs = _build(_config("params.max_fixup_steps=3", "params.on_fixup_failure=raise"))
    with pytest.raises(TrustRegionViolation, match="did not terminate"):
        for _ in range(4):
            algo.iterate(envs)
    envs.close()


def test_fixup_steps_on_the_kl_alone_so_it_works_even_with_beta_zero():
    """The FixPO paper's fixup loss is L_KL; the spec's sg(beta) L_KL has no gradient while beta = 0."""
    algo, envs = _build(_config("params.beta_lr=0"))  # beta stays at 0
    for _ in range(2):
        metrics = algo.iterate(envs)
        assert metrics["beta"] == 0.0 and metrics["trust_region/max_kl"] <= 0.05 * (1 + 1e-4)
    assert metrics["fixup/steps"] > 0
    envs.close()
    algo, envs = _build(_config("params.beta_lr=0", "params.fixup_loss=beta_kl", "params.max_fixup_steps=50",
                                "params.on_fixup_failure=raise"))
    with pytest.raises(TrustRegionViolation, match="did not terminate"):
        algo.iterate(envs)
    envs.close()


# ---------------------------------------------------------------------------------------------- the phases' wiring
def _watch_minibatches(monkeypatch, algo: FixPO, on_minibatch) -> None:
    """Call ``on_minibatch(mb)`` for every primary-phase minibatch, before the step taken on it."""
    real = algo.dp.minibatches

    def minibatches(batch, num_minibatches, generator, valid):
        for mb in real(batch, num_minibatches, generator, valid):
            on_minibatch(mb)
            yield mb

    monkeypatch.setattr(algo.dp, "minibatches", minibatches)


@pytest.mark.parametrize("target", ["max", "mean"])
def test_primary_beta_step_sees_the_minibatch_kl_statistic(monkeypatch, target):
    """L_beta's D is max_s KL(pi_old || pi) over the minibatch (the mean in the mean-KL ablation),
    measured on the policy the theta step starts from (FixPO paper, Algorithm 1)."""
    algo, envs = _build(_config("params.fixup=off", "params.trust_region_check=log", f"params.kl_target={target}"))
    expected, seen = [], []

    def on_minibatch(mb):
        with torch.no_grad():
            kl = _independent_kl(algo, mb["old_params"], algo.net.dist_params(mb["obs"]))
        expected.append(float(kl.max() if target == "max" else kl.mean()))

    _watch_minibatches(monkeypatch, algo, on_minibatch)
    real_beta_step = algo._beta_step
    monkeypatch.setattr(algo, "_beta_step", lambda stat: (seen.append(float(stat)), real_beta_step(stat))[1])
    for _ in range(2):
        algo.iterate(envs)
    envs.close()
    assert len(seen) == len(expected) == 2 * 8 * 4
    # abs: a KL near 0 (the first minibatch of an iteration, pi = pi_old) is float32 rounding, ~1e-7
    assert seen == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert max(expected) > 0.05  # the statistic moved past eps_KL, so max and mean differ in what beta does


@pytest.mark.parametrize("mode", ["every_epoch", "last_epoch"])
def test_fixup_phase_runs_when_due_steps_beta_and_leaves_the_critic_alone(monkeypatch, mode):
    """FixPO paper, Algorithm 1: after each epoch (after the last only, in the ablation) the fixup phase
    takes, per violating minibatch, one step on the KL and one on L_beta; it never trains V."""
    algo, envs = _build(_config(f"params.fixup={mode}"))
    state = {"minibatches": 0, "in_fixup": False, "beta_stats": []}
    calls = []  # per fixup phase: (primary minibatches so far, fixup steps, its L_beta statistics, V moved)

    def on_minibatch(mb):
        state["minibatches"] += 1

    _watch_minibatches(monkeypatch, algo, on_minibatch)
    real_beta_step, real_fixup = algo._beta_step, algo._fixup_phase

    def beta_step(stat):
        if state["in_fixup"]:
            state["beta_stats"].append(float(stat))
        return real_beta_step(stat)

    def fixup_phase(batch, steps_so_far, valid=None):
        with torch.no_grad():
            values = algo.net.value(batch["obs"])
        state["in_fixup"], state["beta_stats"] = True, []
        steps, terminated = real_fixup(batch, steps_so_far, valid)
        state["in_fixup"] = False
        with torch.no_grad():
            moved = float((algo.net.value(batch["obs"]) - values).abs().max())
        calls.append((state["minibatches"], steps, state["beta_stats"], moved))
        return steps, terminated

    monkeypatch.setattr(algo, "_beta_step", beta_step)
    monkeypatch.setattr(algo, "_fixup_phase", fixup_phase)
    for _ in range(2):
        algo.iterate(envs)
    envs.close()
    per_epoch = 4
    due = [per_epoch * (e + 1) for e in range(8)] if mode == "every_epoch" else [8 * per_epoch]
    assert [c[0] for c in calls] == due + [8 * per_epoch + d for d in due]
    assert sum(c[1] for c in calls) > 0  # the overshooting primary phase needed repairs
    for _, steps, beta_stats, moved in calls:
        assert len(beta_stats) == steps and all(stat > 0.05 for stat in beta_stats)
        assert moved == 0.0  # the critic is not part of the fixup loss


def test_train_loop_records_the_guarantee_in_every_row(tmp_path):
    """With the check only logging (no raise to enforce it), every row of an overshooting run still shows
    the trust region kept, and shows that it took fixup steps to keep it."""
    summary = train(_config("params.trust_region_check=log", total=256 * 3), tmp_path / "run")
    assert summary["status"] == "finished"
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 3
    for row in rows:
        assert float(row["trust_region/max_kl"]) <= 0.05 * (1 + 1e-4)
        assert float(row["trust_region/violations"]) == 0
        assert float(row["fixup/primary_steps"]) == 8 * 4
        assert float(row["fixup/overhead_percent"]) == pytest.approx(100 * float(row["fixup/steps"]) / 32)
    assert any(float(r["kl/max_primary"]) > 0.05 and float(r["fixup/steps"]) > 0 for r in rows)


# ---------------------------------------------------------------------------------------------- ablations
def test_ablation_variants_and_their_behaviour():
    assert make_config("fixpo-no-fixup", "CartPole-v1", overrides=FAST).params.fixup == "off"
    assert make_config("fixpo-mean-kl", "CartPole-v1", overrides=FAST).params.kl_target == "mean"
    assert make_config("fixpo-cbeta1", "CartPole-v1", overrides=FAST).params.c_beta == 1.0
    assert make_config("fixpo-last-epoch-fixup", "CartPole-v1", overrides=FAST).params.fixup == "last_epoch"
    const = make_config("fixpo-const-beta", "CartPole-v1", overrides=FAST).params
    assert (const.beta_lr, const.beta_init) == (0.0, 10.0)
    assert make_config("fixpo", "CartPole-v1", overrides=FAST).preset == "fixpo-classic"
    assert make_config("fixpo", "mujoco:Hopper-v4", overrides=FAST).preset == "fixpo-mujoco"

    # constant beta never moves; the postcondition still holds
    algo, envs = _build(_config("params.beta_init=10", algo="fixpo-const-beta"))
    for _ in range(2):
        metrics = algo.iterate(envs)
        assert metrics["beta"] == 10.0 and metrics["trust_region/max_kl"] <= 0.05 * (1 + 1e-4)
    envs.close()
    # mean-KL: the exit test and the check use the batch mean, which stays within eps_KL
    algo, envs = _build(_config(algo="fixpo-mean-kl"))
    for _ in range(3):
        metrics = algo.iterate(envs)
        assert metrics["trust_region/final_mean_kl"] <= 0.05 * (1 + 1e-4)
    envs.close()
    # fixup only after the last epoch: test_fixup_phase_runs_when_due_steps_beta_and_leaves_the_critic_alone


def test_config_validation():
    with pytest.raises(ConfigError, match="params.c_beta"):
        _config("params.c_beta=0.5")
    with pytest.raises(ConfigError, match="params.action_dist"):
        config = _config("params.action_dist=gaussian")
        envs = build_envs(config)
        try:
            FixPO(config, envs.spec, CPU)
        finally:
            envs.close()


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_equals_uninterrupted(tmp_path):
    options = ["checkpoint_every_iterations=2", "env.normalize_obs=true", "env.normalize_reward=true"]
    total = 256 * 5
    train(_config(*options, total=total), tmp_path / "full")
    assert train(_config(*options, total=total), tmp_path / "split", stop_after_iterations=2)["status"] == "interrupted"
    assert train(_config(*options, total=total), tmp_path / "split", resume=True)["status"] == "finished"
    a = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]
    b = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    assert torch.equal(a["beta"], b["beta"])
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_fixpo_learns_cartpole(tmp_path):
    summary = train(make_config("fixpo", "CartPole-v1", overrides=[*FAST, "total_steps=100000"]), tmp_path / "run")
    assert summary["final_return"] > 400, summary
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert max(float(r["trust_region/max_kl"]) for r in rows) <= 0.5 * (1 + 1e-4)


@pytest.mark.slow
def test_fixpo_learns_inverted_pendulum(tmp_path):
    config = make_config("fixpo", "mujoco:InvertedPendulum-v4",
                         overrides=["progress=false", "eval.episodes=0", "total_steps=150000"])
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 400, summary
    assert np.isfinite(summary["final_return"])


def test_theta_step_clips_the_gradient_to_max_grad_norm():
    """A loss whose gradient is known by hand (1e3 sum p^2 -> 2e3 p): the step returns the norm before
    clipping, and the gradient it stepped with is that direction rescaled to max_grad_norm."""
    algo, envs = _build(_config("params.max_grad_norm=0.5"))
    envs.close()
    parameters = list(algo.net.parameters())
    assert_step_clips_to(lambda loss: algo._theta_step(loss, parameters), parameters, 0.5)
