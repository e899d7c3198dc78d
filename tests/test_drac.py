"""DrAC and UCB-DrAC: the sliding-window UCB bandit against its formula and on synthetic rewards, the
regularisers G_pi and G_V against slow references, DrAC with alpha_r = 0 equal to PPO bit for bit, presets,
validation, exact resume and a tiny Procgen run."""

from __future__ import annotations

import math

import image_env
import numpy as np
import pytest
import torch
from run_rows import assert_resumed_like_uninterrupted

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.algos.drac import SlidingWindowUCB, drac_regularizers
from aclab.config import ConfigError
from aclab.core.distributions import Categorical
from aclab.envs import build_envs
from aclab.train import make_config, train

IMAGE_ENV = f"gym:{image_env.ENV_ID}"
TINY = ["progress=false", "eval.episodes=0", "env.num_envs=2", "params.num_steps=8", "params.num_minibatches=2",
        "params.num_epochs=1", "env.normalize_reward=false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ bandit
def _reference_choice(history: list[tuple[int, float]], num_arms: int, c: float, window: int, init: str) -> int:
    """UCB choice after ``history`` (arm, reward) pulls, straight from the formula."""
    start = 1 if init == "authors" else 0
    counts = [start + sum(1 for a, _ in history if a == i) for i in range(num_arms)]
    t = start + len(history)
    best, best_score = 0, -math.inf
    for i in range(num_arms):
        rewards = [r for a, r in history if a == i][-window:]
        if counts[i] == 0:
            score = math.inf
        else:
            q = sum(rewards) / len(rewards) if rewards else 0.0
            score = q + c * math.sqrt(math.log(max(t, 1)) / counts[i])
        if score > best_score:
            best, best_score = i, score
    return best


@pytest.mark.parametrize("init", ["try_each", "authors"])
def test_bandit_follows_the_ucb_formula(init):
    rng = np.random.default_rng(0)
    bandit = SlidingWindowUCB(4, coef=0.3, window=3, init=init)
    history = []
    for _ in range(60):
        arm = bandit.select()
        assert arm == _reference_choice(history, 4, 0.3, 3, init)
        reward = float(rng.normal([0.1, 0.4, 0.2, 0.3][arm], 0.2))
        bandit.update(arm, reward)
        history.append((arm, reward))
    assert bandit.total == len(history) + (1 if init == "authors" else 0)


def test_bandit_tries_each_arm_first_then_picks_the_best():
    rng = np.random.default_rng(1)
    means = [0.2, 0.5, 0.8, 0.3]
    bandit = SlidingWindowUCB(4, coef=0.1, window=10)
    pulls = []
    for _ in range(400):
        arm = bandit.select()
        pulls.append(arm)
        bandit.update(arm, float(rng.random() < means[arm]))
    assert pulls[:4] == [0, 1, 2, 3]
    assert np.bincount(pulls[-100:], minlength=4).argmax() == 2 and pulls[-100:].count(2) >= 70


def test_sliding_window_tracks_a_change_of_the_best_arm():
    """Arm 0 is best for 200 pulls, then arm 1: the window of K = 10 forgets arm 0's past within a few pulls;
    a window of all pulls keeps arm 0's old mean and stays on it."""

    def last_choices(window):
        bandit = SlidingWindowUCB(2, coef=0.1, window=window)
        pulls = []
        for t in range(400):
            arm = bandit.select()
            pulls.append(arm)
            means = (1.0, 0.5) if t < 200 else (0.0, 0.5)
            bandit.update(arm, means[arm])
        return pulls[-100:]

    assert last_choices(10).count(1) >= 90
    assert last_choices(10**6).count(1) <= 60


def test_bandit_exploration_term_revisits_arms():
    """Arm 1 is slightly worse: the exploration bonus c sqrt(log t / N) still sends pulls to it."""
    bandit = SlidingWindowUCB(2, coef=0.5, window=10)
    pulls = []
    for _ in range(300):
        arm = bandit.select()
        pulls.append(arm)
        bandit.update(arm, (1.0, 0.9)[arm])
    assert 5 <= pulls.count(1) <= 150


# ------------------------------------------------------------------------------------------------ regularisers
def test_regularisers_match_slow_references():
    g = torch.Generator().manual_seed(0)
    dist = Categorical(5)
    params, aug_params = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    values, aug_values = torch.randn(7, generator=g), torch.randn(7, generator=g)
    p = torch.softmax(params, -1).numpy()
    q = torch.softmax(aug_params, -1).numpy()
    kl = np.mean([sum(p[i, a] * math.log(p[i, a] / q[i, a]) for a in range(5)) for i in range(7)])
    g_pi, g_v = drac_regularizers(dist, params, values, aug_params, aug_values, "paper", g)
    assert g_pi.item() == pytest.approx(kl, rel=1e-5)
    assert g_v.item() == pytest.approx(float(np.mean((values.numpy() - aug_values.numpy()) ** 2)), rel=1e-5)
    state = g.get_state()
    g_pi, g_v = drac_regularizers(dist, params, values, aug_params, aug_values, "authors", g)
    actions = dist.sample(params, torch.Generator().set_state(state))
    nll = -np.mean([math.log(q[i, int(actions[i])]) for i in range(7)])
    assert g_pi.item() == pytest.approx(nll, rel=1e-5)
    assert g_v.item() == pytest.approx(0.5 * float(np.mean((values.numpy() - aug_values.numpy()) ** 2)), rel=1e-5)


@pytest.mark.parametrize("kind", ["paper", "authors"])
def test_regularisers_train_only_the_augmented_branch(kind):
    dist = Categorical(3)
    params = torch.randn(4, 3, requires_grad=True)
    values = torch.randn(4, requires_grad=True)
    aug_params = torch.randn(4, 3, requires_grad=True)
    aug_values = torch.randn(4, requires_grad=True)
    g_pi, g_v = drac_regularizers(dist, params, values, aug_params, aug_values, kind, torch.Generator())
    (g_pi + g_v).backward()
    assert params.grad is None and values.grad is None
    assert aug_params.grad.abs().sum() > 0 and aug_values.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ algorithm
def _algo(name, overrides, env_id=IMAGE_ENV):
    config = make_config(name, env_id, preset="drac-procgen", overrides=[*TINY, *overrides])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return config, envs, registry.build(config, envs.spec, resolve_device("cpu"))


def test_drac_with_zero_coefficient_equals_ppo_bit_for_bit():
    overrides = ["env.options={}"]
    _, envs_a, drac = _algo("ucb-drac", [*overrides, "params.aug_coef=0"])
    config = make_config("ppo", IMAGE_ENV, preset="ppo-procgen", overrides=[*TINY, *overrides])
    envs_b = build_envs(config)
    envs_b.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    ppo = registry.build(config, envs_b.spec, resolve_device("cpu"))
    for _ in range(3):
        drac.iterate(envs_a)
        ppo.iterate(envs_b)
    for (name, a), b in zip(drac.net.state_dict().items(), ppo.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_ucb_drac_rewards_the_previous_arm_with_the_rollout_return():
    _, envs, algo = _algo("ucb-drac", ["env.options={}"])
    seen = []
    choose = algo.choose_augmentation

    def spy(rollout_return):
        seen.append(rollout_return)
        return choose(rollout_return)

    algo.choose_augmentation = spy
    arms = [int(algo.iterate(envs)["drac/arm"]) for _ in range(10)]
    assert arms[:8] == list(range(8))  # try each augmentation once, in the authors' order
    assert algo.bandit.total == 9 and algo.bandit.counts.sum() == 9
    for k in range(9):  # the return of rollout k + 1 rewards the arm of update k
        assert seen[k + 1] in algo.bandit.rewards[arms[k]]
    assert len(set(seen)) == 10
    other = (algo.bandit.select() + 1) % 8  # an arm other than the one the bandit would pick next
    algo.current_arm = other
    algo.choose_augmentation(123.0)
    assert 123.0 in algo.bandit.rewards[other]


def test_presets_and_validation():
    config = make_config("ucb-drac", "procgen:bigfish")
    p = config.params
    assert config.preset == "drac-procgen" and p.selection == "ucb"
    assert (p.aug_coef, p.ucb_coef, p.ucb_window, p.num_epochs, p.num_minibatches, p.vf_coef) == (0.1, 0.1, 10, 3, 8,
                                                                                                   0.5)
    assert make_config("drac", "procgen:bigfish").params.selection == "fixed"
    assert registry.default_preset("ucb-drac", "procgen", True) == "drac-procgen"
    config = make_config("drac", "CartPole-v1", preset="drac-procgen", overrides=[*TINY, "env.options={}"])
    envs = build_envs(config)
    with pytest.raises(ConfigError, match="RGB image observations"):
        registry.build(config, envs.spec, resolve_device("cpu"))
    with pytest.raises(ConfigError, match="params.augmentations"):
        make_config("ucb-drac", "procgen:bigfish", overrides=["params.augmentations=[\"blur\"]"])


def test_resume_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "env.options={}", "total_steps=112", "checkpoint_every_iterations=3"]
    train(make_config("ucb-drac", IMAGE_ENV, preset="drac-procgen", overrides=overrides), tmp_path / "full")
    first = train(make_config("ucb-drac", IMAGE_ENV, preset="drac-procgen", overrides=overrides), tmp_path / "split",
                  stop_after_iterations=4)
    assert first["status"] == "interrupted"
    resumed = train(make_config("ucb-drac", IMAGE_ENV, preset="drac-procgen", overrides=overrides),
                    tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    assert_resumed_like_uninterrupted(tmp_path / "full", tmp_path / "split")  # the bandit's counts and arm too


def test_ucb_drac_runs_on_tiny_procgen(tmp_path):
    config = make_config("ucb-drac", "procgen:bigfish", overrides=[*TINY, "total_steps=32"])
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 32
