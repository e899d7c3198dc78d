"""DNA against the paper's Appendix A and its authors' code (maitchison/PPO, DNA branch 2bc0db8): the
repeated-action count, Appendix A for the PPO (2x) baseline, the authors' distillation loss, their
noise-scale estimator, and the MuJoCo options (per-dimension ratio clip, time limits as terminal,
observation scaling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aclab.algos import dna as dna_module
from aclab.algos import ppo as ppo_module
from aclab.algos.common import resolve_device
from aclab.algos.dna import DNA, PPO2x, distil_phase_loss, policy_phase_loss, repeated_action_mask
from aclab.analysis.noise_scale import GradientNoiseScale
from aclab.config import ConfigError
from aclab.core.distributions import Categorical, DiagGaussian
from aclab.envs import build_envs
from aclab.envs.normalize import ObsNormalizer
from aclab.train import make_config

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium"]
CPU = resolve_device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ------------------------------------------------------------------ Appendix A: the repeated-action penalty
def _authors_counter(actions: np.ndarray, limit: int) -> np.ndarray:
    """VecRepeatedActionPenalty.step of the authors' wrappers.py, one env: ``duplicate_counter`` counts
    *repeats* (an action equal to the previous one) and the penalty applies while it exceeds ``limit``."""
    prev, counter, out = None, 0, []
    for a in actions:
        counter = counter + 1 if a == prev else 0
        out.append(counter > limit)
        prev = a
    return np.array(out)


def test_the_penalty_starts_once_an_action_was_repeated_more_than_100_times():
    """DNA paper, Appendix A: "if the agent repeated the same action more than 100 times": the 101st take
    of an action is its 100th repeat (no penalty), the 102nd its 101st (penalty)."""
    actions = np.array([3] * 105 + [1] * 2 + [3] * 103)[:, None]
    ones = np.ones(actions.shape, dtype=bool)
    mask, _, _ = repeated_action_mask(actions, ones, ~ones, np.array([-1]), np.array([0]), limit=100)
    expected = _authors_counter(actions[:, 0], 100)
    np.testing.assert_array_equal(mask[:, 0], expected)
    assert not mask[100, 0] and mask[101, 0] and mask[:, 0].sum() == 4 + 2


# ------------------------------------------------------------------ presets
def test_atari_presets_use_appendix_a_for_dna_and_for_the_ppo_2x_baseline():
    for algo in ("dna", "ppo2x"):
        config = make_config(algo, "atari:Assault", overrides=FAST)
        p, options = config.params, config.env.options
        assert options["action_marker"] is True and options["progress_bar"] is True
        assert (p.repeat_action_penalty, p.repeat_action_limit, p.warmup_max_steps) == (0.25, 100, 1000)
        assert config.env.obs_clip == 3.0 and config.env.reward_clip == 5.0
    ppo2x = make_config("ppo2x", "atari:Assault", overrides=FAST).params
    assert ppo2x.vf_coef * 0.5 == 0.5 and not ppo2x.clip_value_loss  # 0.5 (V - R)^2 with aclab's own 1/2


def test_authors_presets():
    a = make_config("dna", "atari:Assault", preset="dna-atari-authors", overrides=FAST)
    assert (a.params.value_loss_coef, a.params.distil_value_coef, a.params.distil_constraint) == (0.5, 0.5,
                                                                                                  "logit_mse")
    assert (a.env.obs_clip, a.env.obs_scale, a.env.reward_clip, a.params.time_limit) == (5.0, 3.0, 10.0, "terminal")
    assert (a.params.lambda_pi, a.params.policy_epochs, a.params.value_epochs) == (0.8, 2, 1)
    m = make_config("dna", "mujoco:Hopper-v4", preset="dna-mujoco-authors", overrides=FAST).params
    assert (m.ratio_clip, m.ent_coef, m.distil_constraint, m.distil_value_coef, m.time_limit) == (
        "per_dim", 0.0, "scaled_mean_mse", 0.5, "terminal")
    noise = make_config("dna", "atari:Assault", preset="dna-atari-noise", overrides=FAST).params
    assert (noise.lambda_pi, noise.lambda_v, noise.policy_epochs, noise.value_epochs, noise.distil_epochs,
            noise.noise_scale_every, noise.noise_b_big) == (0.95, 0.95, 2, 2, 2, 1, 16384)
    authors = make_config("dna", "atari:Assault", preset="dna-atari-noise-authors", overrides=FAST).params
    assert (authors.noise_num_small_batches, authors.noise_small_average, authors.noise_g2_smoothing,
            authors.noise_s_smoothing, authors.noise_g2_floor) == (16, "norms", 0.9, 0.9, 1e-4)


# ------------------------------------------------------------------ PPO (2x) with Appendix A
def test_ppo2x_applies_the_penalty_and_the_warm_up(monkeypatch):
    config = make_config("ppo2x", "CartPole-v1", overrides=[
        *FAST, "env.num_envs=2", "params.num_steps=32", "total_steps=256", "params.repeat_action_penalty=0.3",
        "params.repeat_action_limit=1", "params.warmup_max_steps=5"])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    algo = PPO2x(config, envs.spec, CPU)
    seen = {}
    real_gae = ppo_module.gae

    def spy(rewards, *args, **kwargs):
        seen["rewards"] = rewards.clone()
        return real_gae(rewards, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "gae", spy)
    expected_warmup = np.random.default_rng(config.seed).integers(1, 6, size=2).max()
    metrics = algo.iterate(envs)
    assert metrics["warmup_steps"] == 2 * expected_warmup and algo.steps == 2 * expected_warmup + 64
    collector = algo._collector
    penalised = np.zeros((32, 2), dtype=bool)
    for b in range(2):  # an independent count per env: repeats of the same action since the last episode end
        prev, repeats = None, 0
        for t in range(32):
            if not collector.valid[t, b]:
                continue
            a = collector.actions[t, b]
            repeats = repeats + 1 if a == prev else 0
            penalised[t, b] = repeats > 1
            prev = a
            if collector.ends[t, b]:
                prev, repeats = None, 0
    assert penalised.any() and metrics["repeat_penalty_fraction"] == pytest.approx(penalised[collector.valid].mean())
    torch.testing.assert_close(seen["rewards"], torch.from_numpy(collector.rewards) - 0.3 * torch.from_numpy(
        penalised).float())
    state = algo.state_dict()
    assert state["warmed_up"] and np.array_equal(state["repeat_run_length"], algo.repeat_run_length)
    algo.iterate(envs)
    assert algo.steps == 2 * expected_warmup + 128  # warms up once
    envs.close()


# ------------------------------------------------------------------ the authors' distillation loss
def test_the_authors_distillation_loss():
    """train_distil_minibatch: 0.5 (V_pi - V_V)^2 + beta * 0.5 * mean over actions (z_old - z)^2 (Atari), and
    beta * 0.5 * mean_d (mu_old - mu)^2 / (2 sigma_d^2 + 1e-5) with a detached sigma (MuJoCo)."""
    values, targets = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 2.5, 0.0])
    old, new = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor(
        [[0.5, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    loss, _, _ = distil_phase_loss(values, targets, Categorical(3), old, new, beta=2.0, kind="logit_mse",
                                   value_coef=0.5)
    mse = np.mean([0.25, 0.25, 1.0])
    logit = np.mean([np.mean([0.25, 0.0, 1.0]), np.mean([0.0, 1.0, 0.0]), np.mean([0.0, 4.0, 0.0])])
    assert float(loss) == pytest.approx(0.5 * mse + 2.0 * 0.5 * logit)

    mu_old, mu_new = np.array([[0.0, 1.0]]), np.array([[1.0, -1.0]])
    log_std = np.array([[0.0, math.log(0.5)]])
    new_params = torch.tensor(np.concatenate([mu_new, log_std], -1), requires_grad=True)
    old_params = torch.tensor(np.concatenate([mu_old, log_std + 1.0], -1))  # the old std must not matter
    loss, _, constraint = distil_phase_loss(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                            DiagGaussian(2), old_params, new_params, beta=1.0,
                                            kind="scaled_mean_mse", value_coef=0.5)
    expected = 0.5 * np.mean((mu_old - mu_new) ** 2 / (2 * np.exp(2 * log_std) + 1e-5))
    assert float(constraint.detach()) == pytest.approx(expected)
    loss.backward()
    assert torch.all(new_params.grad[:, 2:] == 0) and torch.all(new_params.grad[:, :2] != 0)  # sg(sigma)


def test_dna_wires_the_authors_distillation_value_coefficient(monkeypatch):
    seen = []
    real = dna_module.distil_phase_loss

    def spy(*args, **kwargs):
        seen.append(args[7] if len(args) > 7 else kwargs.get("value_coef"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dna_module, "distil_phase_loss", spy)
    config = make_config("dna", "CartPole-v1", overrides=[*FAST, "env.num_envs=2", "params.num_steps=32",
                                                          "total_steps=64", "params.distil_value_coef=0.5",
                                                          "params.distil_constraint=logit_mse"])
    envs = build_envs(config)
    envs.reset(seed=0)
    DNA(config, envs.spec, CPU).iterate(envs)
    assert seen and set(seen) == {0.5}
    envs.close()


# ------------------------------------------------------------------ MuJoCo options
def test_per_dimension_ratio_clipping_is_the_authors_formula():
    """gain = mean_d min(rho_d A, clip(rho_d, 1 +- eps) A), rho_d = exp(log pi_d - log pi_old,d)."""
    rng = np.random.default_rng(0)
    mean_old, mean_new = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 0.3
    log_std = np.full((5, 3), -0.5)
    actions = mean_old + rng.normal(size=(5, 3)) * np.exp(log_std)
    adv = rng.normal(size=5)

    def logp(mu):
        return -0.5 * ((actions - mu) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)

    ratio = np.exp(logp(mean_new) - logp(mean_old))
    gain = np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None]).mean(-1)
    new = torch.tensor(np.concatenate([mean_new, log_std], -1))
    old = torch.tensor(np.concatenate([mean_old, log_std], -1))
    dist = DiagGaussian(3)
    loss, _ = policy_phase_loss(dist, new, torch.tensor(actions), dist.log_prob(old, torch.tensor(actions)),
                                torch.tensor(adv), 0.2, 0.0, old_params=old)
    assert float(loss) == pytest.approx(-gain.mean())
    joint, _ = policy_phase_loss(dist, new, torch.tensor(actions), dist.log_prob(old, torch.tensor(actions)),
                                 torch.tensor(adv), 0.2, 0.0)
    assert float(joint) != pytest.approx(float(loss))


def test_dna_runs_with_the_mujoco_options_and_treats_time_limits_as_terminal(monkeypatch):
    captured = []
    real_gae = dna_module.gae

    def spy(rewards, values, discounts, *args, **kwargs):
        captured.append(discounts.clone())
        return real_gae(rewards, values, discounts, *args, **kwargs)

    monkeypatch.setattr(dna_module, "gae", spy)
    ends = {}
    for mode in ("bootstrap", "terminal"):
        config = make_config("dna", "Pendulum-v1", preset="dna-mujoco-authors", overrides=[
            *FAST, "env.num_envs=2", "params.num_steps=120", "total_steps=240", "params.policy_minibatch_size=60",
            "params.value_minibatch_size=60", "params.distil_minibatch_size=60", "params.policy_epochs=1",
            "params.value_epochs=1", "params.distil_epochs=1", f"params.time_limit={mode}",
            "env.options={\"max_episode_steps\": 50}"])
        envs = build_envs(config)
        envs.reset(seed=0)
        algo = DNA(config, envs.spec, CPU)
        metrics = algo.iterate(envs)
        assert math.isfinite(metrics["loss/distil_constraint"]) and math.isfinite(metrics["loss/policy"])
        rollout = algo._collector
        truncated = rollout.ends & ~rollout.terminated & rollout.valid
        assert truncated.any()  # Pendulum only ever truncates
        ends[mode] = captured[-1].numpy()[truncated]
        envs.close()
    assert np.all(ends["bootstrap"] == pytest.approx(0.99)) and np.all(ends["terminal"] == 0.0)
    with pytest.raises(ConfigError, match="params.ratio_clip"):
        config = make_config("dna", "CartPole-v1", overrides=[*FAST, "params.ratio_clip=per_dim"])
        envs = build_envs(config)
        try:
            DNA(config, envs.spec, CPU)
        finally:
            envs.close()


def test_observation_scaling_after_clipping():
    """The authors' normaliser: clip((s - mu) / sigma, -5, 5) * 3."""
    rng = np.random.default_rng(1)
    batch = rng.normal(2.0, 3.0, size=(64, 4))
    batch[0] = 1e3  # an outlier that hits the clip
    norm = ObsNormalizer((4,), clip=5.0, scale=3.0)
    out = norm(batch)
    expected = 3.0 * np.clip((batch - batch.mean(0)) / np.sqrt(batch.var(0) + 1e-8), -5, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(out).max() == pytest.approx(15.0)
    config = make_config("dna", "Pendulum-v1", preset="dna-mujoco-authors", overrides=FAST)
    envs = build_envs(config)
    assert envs.obs_normalizer.scale == 3.0 and envs.spec.observation_space.high[0] == 15.0
    envs.close()


# ------------------------------------------------------------------ the authors' noise-scale estimator
def test_the_authors_noise_scale_estimator():
    """estimate_noise_level of the authors' rollout.py: |G_small|^2 = (mean of 16 norms)^2, EMA 0.9 on S and
    |G|^2 (first value as the start), ratio S / max(|G|^2, 1e-4)."""
    rng = np.random.default_rng(2)
    b_small, b_big = 32, 4096
    estimator = GradientNoiseScale(b_small, b_big, g2_smoothing=0.9, s_smoothing=0.9, small_average="norms",
                                   g2_floor=1e-4)
    stats = {}
    for _ in range(4):
        norms = rng.uniform(0.5, 2.0, size=16)
        big_norm = rng.uniform(0.05, 0.4)
        g_small_sq = 0.0
        for n in norms:
            g_small_sq += n / 16
        g_small_sq *= g_small_sq
        g_big_sq = big_norm ** 2
        g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        s = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
        stats["s"] = 0.9 * stats.get("s", s) + 0.1 * s
        stats["g2"] = 0.9 * stats.get("g2", g2) + 0.1 * g2
        ratio = stats["s"] / np.clip(stats["g2"], 1e-4, np.inf)
        estimate = estimator.update(norms ** 2, g_big_sq)
        assert estimate.b_simple == pytest.approx(ratio, rel=1e-9)
    paper = GradientNoiseScale(b_small, b_big).update(norms ** 2, g_big_sq)
    assert paper.g_small_sq > estimate.g_small_sq  # Jensen: the mean of squares exceeds the squared mean


def test_the_authors_noise_scale_floors_a_vanishing_true_gradient_estimate():
    """Pure-noise gradients (true gradient G = 0): the smoothed |G|^2 estimate falls below the authors' 1e-4
    floor, so the noise scale is S / 1e-4 (finite, positive), as in estimate_noise_level of their rollout.py,
    not S / |G|^2 (huge or sign-flipped). Reference: a slow loop over per-sample gradients in NumPy."""
    rng = np.random.default_rng(5)
    dim, size, b_small, n_small = 8, 4096, 32, 16
    estimator = GradientNoiseScale(b_small, size, g2_smoothing=0.9, s_smoothing=0.9, small_average="norms",
                                   g2_floor=1e-4)
    s_avg = g2_avg = None
    floored = 0
    for _ in range(5):
        per_sample = 0.1 * rng.standard_normal((size, dim))  # zero-mean per-sample gradients
        small_norms = []
        for _ in range(n_small):
            idx = rng.choice(size, b_small, replace=False)
            mean_grad = [sum(per_sample[i, k] for i in idx) / b_small for k in range(dim)]
            small_norms.append(math.sqrt(sum(g * g for g in mean_grad)))
        big_grad = per_sample.mean(axis=0)
        g_big_sq = float(sum(g * g for g in big_grad))
        g_small_sq = (sum(small_norms) / n_small) ** 2
        g2 = (size * g_big_sq - b_small * g_small_sq) / (size - b_small)
        s = (g_small_sq - g_big_sq) / (1 / b_small - 1 / size)
        s_avg = s if s_avg is None else 0.9 * s_avg + 0.1 * s
        g2_avg = g2 if g2_avg is None else 0.9 * g2_avg + 0.1 * g2
        floored += g2_avg < 1e-4
        expected = s_avg / max(g2_avg, 1e-4)
        estimate = estimator.update(np.square(small_norms), g_big_sq)
        assert estimate.g2_smoothed == pytest.approx(g2_avg, rel=1e-9, abs=1e-15)
        assert estimate.b_simple == pytest.approx(expected, rel=1e-9)
        assert 0 < estimate.b_simple <= estimate.s_smoothed / 1e-4 * (1 + 1e-12)
    assert floored == 5  # the case the floor exists for: every smoothed |G|^2 is below it
