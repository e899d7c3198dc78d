"""FixPO against its authors' code (uscresl/stabilized-rl, Tianshou 0.5.0): target-only return
normalisation, the authors' presets, goal-observable Meta-World, the fixup fallback and the KL the
primary phase leaves before the fixup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fixpo import CPU, FAST, OVERSHOOT  # a primary phase that overshoots (high lr, beta 0, small eps_KL)
from torch import distributions as td

from aclab.algos.fixpo import FixPO, normalized_value_targets
from aclab.envs import build_envs
from aclab.envs.normalize import RunningMeanStd
from aclab.train import make_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _build(*overrides: str, env: str = "CartPole-v1", total: int = 256 * 4):
    config = make_config("fixpo", env, overrides=[*FAST, *OVERSHOOT, f"total_steps={total}", *overrides])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return FixPO(config, envs.spec, CPU), envs


# ------------------------------------------------------------------ target-only return normalisation
def _tianshou_reference(rewards, critic, terminated, ends, gamma, lam, seen_returns):
    """Tianshou 0.5.0's A2CPolicy._compute_returns with rew_norm, as a slow per-env loop in float64.

    ``seen_returns``: every unnormalised return the running statistics absorbed before (their
    population variance is ret_rms.var; 1 before any update). Returns (advantages, targets, returns)."""
    var = np.var(np.concatenate(seen_returns)) if seen_returns else 1.0
    scale = np.sqrt(var + 1e-8)
    v = critic * scale  # "unnormalize v_s & v_s_"
    T, B = rewards.shape
    adv = np.zeros((T, B))
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            v_next = 0.0 if terminated[t, b] else v[t + 1, b]  # value_mask: no bootstrap after termination
            delta = rewards[t, b] + gamma * v_next - v[t, b]
            running = delta + gamma * lam * (0.0 if ends[t, b] else running)  # end_flag cuts the trace
            adv[t, b] = running
    returns = adv + v[:-1]
    return adv, returns / scale, returns


def test_target_only_normalisation_matches_tianshous_rew_norm():
    rng = np.random.default_rng(0)
    T, B, gamma, lam = 9, 3, 0.97, 0.9
    rms = RunningMeanStd()
    seen = []
    for batch in range(3):  # three batches: the statistics from the earlier ones scale the later ones
        rewards = rng.normal(3.0, 4.0, (T, B))
        critic = rng.normal(0.0, 1.0, (T + 1, B))
        terminated = rng.random((T, B)) < 0.15
        truncated = ~terminated & (rng.random((T, B)) < 0.1)
        ends = terminated | truncated
        ref_adv, ref_targets, ref_returns = _tianshou_reference(rewards, critic, terminated, ends, gamma, lam, seen)
        as_t = lambda x, dtype=torch.float64: torch.as_tensor(x, dtype=dtype)  # noqa: E731
        discounts = gamma * (~as_t(terminated, torch.bool)).double()
        adv, targets = normalized_value_targets(as_t(rewards), as_t(critic), discounts, lam,
                                                as_t(ends, torch.bool), torch.ones(T, B, dtype=torch.bool), rms)
        np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(targets.numpy(), ref_targets, rtol=1e-10, atol=1e-10)
        seen.append(ref_returns.ravel())
        np.testing.assert_allclose(rms.var, np.var(np.concatenate(seen)), rtol=1e-10)
        if batch > 0:  # the advantages are in raw reward units: not divided by the return scale
            assert not np.allclose(adv.numpy(), ref_adv / np.sqrt(rms.var))


def test_fixpo_with_target_normalisation_keeps_raw_rewards_and_advantages():
    """Through FixPO.iterate: the advantages are GAE on the *raw* rewards with s * V (a NumPy loop)."""
    algo, envs = _build("params.return_norm=targets", "env.normalize_reward=false")
    captured = {}

    def capture(rollout, advantages, returns):
        captured.update(rewards=rollout.rewards.clone(), values=rollout.values.clone(), ends=rollout.ends.clone(),
                        terminated=rollout.terminated.clone(), valid=rollout.valid.clone(),
                        adv=advantages.clone(), targets=returns.clone())
        return {}

    algo.update = capture
    seen = []
    for _ in range(2):
        algo.iterate(envs)
        c = {k: v.double().numpy() if v.dtype != torch.bool else v.numpy() for k, v in captured.items()}
        assert set(np.unique(c["rewards"][c["valid"]])) == {1.0}  # CartPole's raw rewards
        ref_adv, ref_targets, ref_returns = _tianshou_reference(
            c["rewards"], c["values"], c["terminated"], c["ends"], 0.99, 0.95, seen)
        valid = c["valid"]
        np.testing.assert_allclose(c["adv"][valid], ref_adv[valid], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(c["targets"][valid], ref_targets[valid], rtol=1e-4, atol=1e-4)
        seen.append(ref_returns[valid])
    assert algo.return_rms.var == pytest.approx(np.var(np.concatenate(seen)), rel=1e-5)
    assert algo.return_rms.var > 4.0  # CartPole returns spread well beyond 1: the scale matters
    envs.close()


# ------------------------------------------------------------------ presets
AUTHORS_MUJOCO = {  # src/mujoco_fixpo_tianshou.py defaults + exps_tianshou.py (target_coeff=3, 10M requested)
    "num_steps": 128, "num_epochs": 10, "minibatch_size": 512, "fixup_minibatch_size": 1024, "lr": 3e-4,
    "anneal_lr": True, "adam_eps": 1e-8, "max_grad_norm": 0.5, "vf_coef": 0.1, "ent_coef": 0.0,
    "clip_value_loss": True, "value_clip_coef": 0.2, "norm_adv": "off", "return_norm": "targets",
    "eps_kl": 0.5, "c_beta": 3.0, "beta_lr": 0.01, "beta_init": 1.0, "fixup_loss": "beta_kl",
    "kl_target": "max", "fixup": "every_epoch", "hidden_sizes": (64, 64), "activation": "tanh",
    "log_std_init": -0.5, "gamma": 0.99, "gae_lambda": 0.95,
}
AUTHORS_METAWORLD = {**AUTHORS_MUJOCO, "num_steps": 1000, "minibatch_size": 500, "fixup_minibatch_size": 5000,
                     "vf_coef": 0.25, "hidden_sizes": (128, 128)}


@pytest.mark.parametrize("preset,env,num_envs,total,expected", [
    ("fixpo-mujoco-authors", "mujoco:Hopper-v4", 64, 500 * 3 * 8192, AUTHORS_MUJOCO),
    ("fixpo-metaworld-authors", "metaworld:reach-v3", 10, 500 * 4 * 10_000, AUTHORS_METAWORLD),
])
def test_authors_presets_are_their_code(preset, env, num_envs, total, expected):
    config = make_config("fixpo", env, preset=preset, overrides=FAST)
    for key, value in expected.items():
        assert getattr(config.params, key) == value, key
    assert config.env.num_envs == num_envs and config.total_steps == total
    assert config.env.normalize_obs and config.env.obs_clip == 10.0 and not config.env.normalize_reward


def test_metaworld_presets_observe_the_goal():
    """EnvPool's Meta-World hides the goal (zeros) unless partially_observable = false; the FixPO paper's
    tasks have randomised goals, which the policy must see."""
    for preset in ("fixpo-metaworld", "fixpo-metaworld-authors"):
        config = make_config("fixpo", "metaworld:reach-v3", preset=preset,
                             overrides=["env.num_envs=2", "env.normalize_obs=false"])
        assert config.preset == preset and config.env.options["partially_observable"] is False
        envs = build_envs(config)
        obs = envs.reset(seed=3)
        goal = obs[:, -3:]
        assert (np.abs(goal).max(axis=1) > 0.05).all() and not np.allclose(goal[0], goal[1])  # seen, random per env
        envs.close()
    assert make_config("fixpo", "metaworld:push-v3", overrides=FAST).preset == "fixpo-metaworld"


# ------------------------------------------------------------------ fixup fallback
def test_a_fixup_that_does_not_terminate_falls_back_to_pi_old_and_the_run_goes_on(tmp_path):
    algo, envs = _build("params.max_fixup_steps=3")  # too few steps for this overshooting setting
    fallbacks = 0
    for _ in range(4):
        before = {k: v.clone() for k, v in algo.net.state_dict().items()}
        adam_before = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)}
                       for k, s in algo.optimizer.state_dict()["state"].items()}
        metrics = algo.iterate(envs)
        same = all(torch.equal(before[k], v) for k, v in algo.net.state_dict().items())
        if metrics["fixup/fallback"]:
            fallbacks += 1
            assert same  # the update was dropped: pi_old (and the critic) are back, bit for bit
            for k, s in algo.optimizer.state_dict()["state"].items():
                for n, t in adam_before.get(k, {}).items():
                    assert torch.equal(s[n], t)
            # KL(pi_old || pi_old): the rollout's stored parameters against the same network evaluated on the
            # minibatch, zero up to float32 rounding (a different batch size may take another kernel)
            assert metrics["trust_region/final_max_kl"] <= 1e-6 and metrics["trust_region/violations"] == 0
            assert metrics["fixup/steps"] == 3
        else:
            assert not same
    assert fallbacks >= 1 and metrics["fixup/fallbacks_total"] == fallbacks
    envs.close()
    config = make_config("fixpo", "CartPole-v1",
                         overrides=[*FAST, *OVERSHOOT, "total_steps=1024", "params.max_fixup_steps=3"])
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished"


# ------------------------------------------------------------------ KL before the fixup
@pytest.mark.parametrize("lr,expect_needed", [("0.01", {1.0}), ("0.0003", {0.0, 1.0})])
def test_the_kl_before_the_fixup_is_logged_and_the_fixup_acts_exactly_when_it_exceeds_eps(lr, expect_needed):
    """``kl/pre_fixup_max`` equals a torch.distributions recomputation made just before each fixup phase,
    and the fixup takes steps in an update exactly when that KL exceeds eps_KL (not true by construction:
    the postcondition only ever sees the repaired policy). At lr 3e-4 some updates need no fixup."""
    algo, envs = _build(f"params.lr={lr}")
    recorded: list[float] = []
    original = algo._fixup_phase

    def spy(batch, steps_so_far, valid=None):
        with torch.no_grad():
            logits = algo.net.dist_params(batch["obs"])
            kl = td.kl_divergence(td.Categorical(logits=batch["old_params"]), td.Categorical(logits=logits))
        recorded.append(float(kl.max()))
        return original(batch, steps_so_far, valid)

    algo._fixup_phase = spy
    needed = []
    for _ in range(4):
        recorded.clear()
        metrics = algo.iterate(envs)
        assert metrics["kl/pre_fixup_max"] == pytest.approx(max(recorded), rel=1e-4)
        assert metrics["kl/pre_fixup_violations"] == sum(k > 0.05 for k in recorded)
        assert metrics["fixup/needed"] == float(metrics["fixup/steps"] > 0) == float(max(recorded) > 0.05)
        assert metrics["trust_region/final_max_kl"] <= 0.05 * (1 + 1e-4)
        needed.append(metrics["fixup/needed"])
    assert set(needed) == expect_needed  # the primary phase left the trust region (at lr 3e-4 not always)
    assert metrics["fixup/needed_total"] == sum(needed)
    envs.close()


def test_the_mt50_sweep_is_the_authors_metaworld_run():
    """exps_tianshou.py: FixPO and PPO on the 50 MT50 tasks x seeds 0-2, 20M steps, goal observable."""
    from pathlib import Path

    from aclab.envs import parse_env_id
    from aclab.sweep import load_sweep_spec

    spec = load_sweep_spec(Path(__file__).parents[1] / "docs/results/fixpo/sweeps/metaworld_mt50.toml")
    assert len(set(spec.envs)) == 50 and spec.seeds == [0, 1, 2] and spec.algos == ["fixpo", "ppo"]
    for env in spec.envs:
        parse_env_id(env)  # every task exists in EnvPool's Meta-World v3
    assert "total_steps=20000000" in spec.overrides and spec.presets["fixpo"] == "fixpo-metaworld"
    assert any("partially_observable" in o for o in spec.algo_overrides["ppo"])
