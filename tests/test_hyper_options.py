"""The hypernetwork paper's TD3/SAC settings against the authors' code (issue: the hypernetwork family
true to the paper and the code): head initialisation calibrated on real states when learning starts,
the primary's and the baselines' initialisations, ResNet Features, the td3-hyper / sac-hyper / Ant
presets, SAC's raw-mean evaluation and soft gradient probe, and the gradient-accuracy options."""

import math

import numpy as np
import pytest
import torch
from offpolicy_common import FAST, build_algo

from aclab.algos.offpolicy import (
    OffPolicyConfig,
    build_critic,
    calibrate_critic_on_replay,
    make_analysis_env,
)
from aclab.analysis.grad_accuracy import GradientProbe, LinearQEnv, rollout_return, save_env_state
from aclab.config import ConfigError
from aclab.core.distributions import tanh_normal_log_prob
from aclab.envs import build_envs
from aclab.envs.backends import derive_env_seeds
from aclab.nets.critics import ResNetFeaturesCritic, make_critic
from aclab.nets.hyper import EnsembleLinear, PrimaryResNet
from aclab.train import make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_HYPER = 'params.critic_options={"primary_widths":[16,32],"dynamic_hidden":[16],"probe_size":256}'


def _cheetah_config(algo: str, *extra: str):
    """``algo`` on HalfCheetah through Gymnasium: 300 random warm-up steps and exactly one gradient step."""
    return make_config(algo, "mujoco:HalfCheetah-v4", overrides=[
        *FAST, "env.backend=gymnasium", "env.num_envs=1", "total_steps=301", "params.learning_starts=301",
        "params.steps_per_iteration=301", "params.batch_size=16", "params.actor_hidden=[16,16]", SMALL_HYPER,
        *extra])


def _w1_std_ratio(critic, obs: torch.Tensor, actions: torch.Tensor) -> float:
    """Std of the generated first-layer weights over these inputs / nn.Linear's 1/sqrt(3 fan_in)."""
    net = critic.net
    with torch.no_grad():
        w1 = net.dynamic_layers(obs if critic.meta == "state" else actions)[0].weight
    fan_in = net.layer_dims[0][0]
    return float(w1.std() * math.sqrt(3.0 * fan_in))


@pytest.mark.parametrize("algo,critic", [("td3-hyper", "sa_hyper"), ("sac-hyper", "sa_hyper"),
                                         ("td3-hyper", "as_hyper")])
def test_kaiming_heads_are_calibrated_on_the_warm_up_data_before_the_first_update(algo, critic):
    """The paper's init (Section 5.2) on the states the critic sees: the generated layer-1 weights have
    nn.Linear's std on the replay data, for the critic and its target (the standard-normal placeholder
    calibration gives ~1.6x that on HalfCheetah's states)."""
    algo_, envs = build_algo(_cheetah_config(algo, f"params.critic={critic}"))
    probe_only, probe_envs = build_algo(_cheetah_config(algo, f"params.critic={critic}",
                                                        "params.hyper_calibration=probe"))
    algo_.iterate(envs)
    probe_only.iterate(probe_envs)
    assert algo_.critic_updates == 1
    batch = algo_.loop.buffer.gather(np.arange(len(algo_.loop.buffer)))
    assert abs(_w1_std_ratio(algo_.critic_target, batch.obs, batch.actions) - 1.0) < 0.1
    assert abs(_w1_std_ratio(algo_.critic, batch.obs, batch.actions) - 1.0) < 0.1  # one Adam step later
    if critic == "sa_hyper":  # HalfCheetah's states are not standard normal (AS-Hyper's actions are close to it)
        assert abs(_w1_std_ratio(probe_only.critic, batch.obs, batch.actions) - 1.0) > 0.3
    envs.close()
    probe_envs.close()


def test_calibration_leaves_authors_heads_and_other_critics_alone():
    algo, envs = build_algo(_cheetah_config("td3-hyper", "params.hyper_init=authors"))
    heads = algo.critic.net.heads.weight.detach().clone()
    algo.iterate(envs)  # fills the buffer and does one update
    params = algo.params
    assert not calibrate_critic_on_replay(params, algo.critic, algo.critic_target, algo.loop.buffer, algo.device)
    # one Adam step at lr 5e-5 moves each head weight by at most ~5e-5: the fixed bounds were kept
    assert (algo.critic.net.heads.weight - heads).abs().max() < 1e-4
    assert algo.critic_target.net.heads.weight.abs().max() <= 0.05 + 1e-6
    mlp, envs2 = build_algo(_cheetah_config("td3", "params.critic=mlp", 'params.critic_options={}'))
    mlp.iterate(envs2)
    assert not calibrate_critic_on_replay(mlp.params, mlp.critic, mlp.critic_target, mlp.loop.buffer, mlp.device)
    envs.close()
    envs2.close()


@pytest.mark.parametrize("primary_init,bound", [("td3", lambda n: 1 / (2 * math.sqrt(n))),
                                                ("sac", lambda n: 1 / math.sqrt(2 * n))])
def test_primary_init_bounds_of_the_authors_td3_and_sac_code(primary_init, bound):
    torch.manual_seed(0)
    primary = PrimaryResNet(17, (64, 128), 1, ensemble_size=2, primary_init=primary_init)
    for layer in primary.modules():
        if isinstance(layer, EnsembleLinear):
            b = bound(layer.in_features)
            assert layer.weight.abs().max() <= b and layer.weight.abs().max() > 0.95 * b
    params = OffPolicyConfig(critic="sa_hyper", primary_init=primary_init,
                             critic_options={"primary_widths": [32, 64], "probe_size": 64})
    critic = build_critic(params, 11, 3, torch.device("cpu"))
    first = critic.net.primary.layers[0].weight
    assert first.abs().max() <= bound(11) and first.abs().max() > 0.9 * bound(11)


@pytest.mark.parametrize("kind", ["mlp", "d2rl", "res35", "resnet_features"])
def test_xavier_baseline_init_of_the_authors_sac_code(kind):
    torch.manual_seed(1)
    small = {"res35": {"num_blocks": 2, "width": 32}, "resnet_features": {"primary_widths": (32, 64)}}.get(kind, {})
    xavier = make_critic(kind, 11, 3, init="xavier", **small)
    layers = [m for m in xavier.modules() if isinstance(m, EnsembleLinear)]
    for layer in layers:
        b = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= b and layer.weight.abs().max() > 0.9 * b
        assert torch.count_nonzero(layer.bias) == 0
    default = make_critic(kind, 11, 3, **small)
    assert any(torch.count_nonzero(m.bias) > 0 for m in default.modules() if isinstance(m, EnsembleLinear))
    with pytest.raises(ValueError, match="unknown critic init"):
        make_critic(kind, 11, 3, init="orthogonal", **small)


def test_resnet_features_is_footnote_4_with_the_authors_bottleneck_as_an_option():
    """Default: 1024 features ++ a -> 256 -> 1 (the action-gradient model of MLP-Small, footnote 4);
    feature_dim=10: the authors' SAC code's Linear(1024, 10) first. Checked against a manual forward."""
    torch.manual_seed(2)
    paper = ResNetFeaturesCritic(11, 3, primary_widths=(32, 1024), blocks_per_stage=1)
    assert [(l.in_features, l.out_features) for l in paper.head] == [(1024 + 3, 256), (256, 1)]
    assert paper.bottleneck is None
    authors = ResNetFeaturesCritic(11, 3, primary_widths=(32, 1024), blocks_per_stage=1, feature_dim=10)
    assert (authors.bottleneck.in_features, authors.bottleneck.out_features) == (1024, 10)
    assert [(l.in_features, l.out_features) for l in authors.head] == [(10 + 3, 256), (256, 1)]
    obs, actions = torch.randn(5, 11), torch.randn(5, 3)
    member = 1
    e = authors.encoder(obs, member)[0]
    z = e @ authors.bottleneck.weight[member] + authors.bottleneck.bias[member, 0]
    h = torch.relu(torch.cat([z, actions], -1) @ authors.head[0].weight[member] + authors.head[0].bias[member, 0])
    q = (h @ authors.head[1].weight[member] + authors.head[1].bias[member, 0]).squeeze(-1)
    torch.testing.assert_close(authors(obs, actions)[member], q)
    params = OffPolicyConfig(critic="resnet_features", resnet_feature_dim=10, baseline_init="xavier",
                             critic_options={"primary_widths": [32, 64]})
    built = build_critic(params, 11, 3, torch.device("cpu"))
    assert built.bottleneck.out_features == 10 and torch.count_nonzero(built.bottleneck.bias) == 0


def test_td3_hyper_and_sac_hyper_default_to_the_paper_settings_for_hyper_and_mlp_alike():
    td3 = make_config("td3-hyper", "mujoco:Hopper-v4", overrides=FAST)
    assert td3.preset == "td3-hyper-mujoco" and td3.params.critic == "sa_hyper"
    assert (td3.params.batch_size, td3.params.learning_starts, td3.params.hyper_init) == (100, 1000, "kaiming")
    mlp = make_config("td3-hyper", "mujoco:Hopper-v4", overrides=[*FAST, "params.critic=mlp"])
    assert (mlp.params.critic, mlp.params.batch_size, mlp.params.learning_starts) == ("mlp", 100, 1000)
    sac = make_config("sac-hyper", "mujoco:Hopper-v4", overrides=FAST)
    p = sac.params
    assert sac.preset == "sac-hyper-mujoco"
    assert (p.batch_size, p.learning_starts, p.autotune, p.alpha, p.actor_lr, p.critic_lr) == (256, 1000, False, 0.2,
                                                                                               3e-4, 3e-4)
    assert p.eval_action == "tanh_mean"
    # the authors' code in the -hyperrl- presets
    authors = make_config("sac", preset="sac-hyperrl-mujoco", overrides=FAST).params
    assert (authors.hyper_init, authors.primary_init, authors.baseline_init, authors.actor_init,
            authors.resnet_feature_dim, authors.eval_action) == ("authors", "sac", "xavier", "xavier", 10, "raw_mean")
    td3_authors = make_config("td3", preset="td3-hyperrl-mujoco", overrides=FAST).params
    assert (td3_authors.hyper_init, td3_authors.primary_init) == ("authors", "td3")
    with pytest.raises(ConfigError, match="params.hyper_calibration"):
        make_config("td3-hyper", "mujoco:Hopper-v4", overrides=[*FAST, "params.hyper_calibration=none"])


def test_authors_sac_actor_init_is_xavier_with_zero_biases():
    config = _cheetah_config("sac-hyper", "params.actor_init=xavier")
    algo, envs = build_algo(config)
    for layer in algo.actor.layers:
        b = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= b and torch.count_nonzero(layer.bias) == 0
    default, _ = build_algo(_cheetah_config("sac-hyper"))
    assert torch.count_nonzero(default.actor.layers[0].bias) > 0
    envs.close()


def test_sac_raw_mean_evaluation_acts_with_the_pre_tanh_mean():
    algo, envs = build_algo(_cheetah_config("sac-hyper", "params.eval_action=raw_mean"))
    with torch.no_grad():
        algo.actor.layers[-1].bias[: algo.actor.action_dim] = 2.0  # means beyond the tanh range
    obs = np.asarray(envs.obs, dtype=np.float32)
    with torch.no_grad():
        mean = algo.actor(torch.as_tensor(obs))[:, : algo.actor.action_dim].numpy()
    np.testing.assert_allclose(algo.act(obs, deterministic=True), algo.loop.to_env(mean), rtol=1e-5, atol=1e-5)
    algo.params.eval_action = "tanh_mean"
    np.testing.assert_allclose(algo.act(obs, deterministic=True), algo.loop.to_env(np.tanh(mean)), rtol=1e-5,
                               atol=1e-5)
    envs.close()


@pytest.mark.parametrize("preset,ctrl", [("td3-hyper-ant", 0.005), ("sac-hyperrl-ant", 0.0)])
def test_ant_presets_have_contact_forces_and_the_analysis_env_gets_the_same_options(preset, ctrl):
    """111-d observations (gym Ant-v2's, contact forces included) and the control cost of the paper
    (0.005) or the authors' code (0); the gradient-accuracy env is built with the same options, so its
    rewards are the training env's."""
    algo = "td3-hyper" if preset.startswith("td3") else "sac-hyper"
    config = make_config(algo if "hyperrl" not in preset else algo.split("-")[0], preset=preset,
                         overrides=[*FAST, "env.num_envs=1"])
    assert config.env.options["ctrl_cost_weight"] == ctrl
    envs = build_envs(config, num_envs=1, seed=0)
    analysis = make_analysis_env(config.env.id, config.env.options)
    try:
        assert envs.spec.obs_shape == (111,) and analysis.observation_space.shape == (111,)
        obs = envs.reset(seed=3)
        a_obs, _ = analysis.reset(seed=derive_env_seeds(3, 1)[0])  # the VecEnv's seed for its env 0
        np.testing.assert_allclose(obs[0], a_obs, atol=1e-5)
        rng = np.random.default_rng(0)
        for _ in range(5):
            action = rng.uniform(-1, 1, (1, 8)).astype(np.float32)
            result = envs.step(action)
            _, reward, _, _, info = analysis.step(action[0])
            assert result.reward[0] == pytest.approx(reward, rel=1e-5, abs=1e-5)
            contact = 5e-4 * float(np.sum(np.square(np.clip(analysis.unwrapped.data.cfrc_ext, -1, 1))))
            expected = (info["reward_forward"] + info["reward_survive"] - ctrl * float(np.sum(action**2)) - contact)
            assert reward == pytest.approx(expected, rel=1e-5, abs=1e-5)  # (Ant-v4's info["reward_ctrl"] is not it)
    finally:
        envs.close()
        analysis.close()
    with pytest.raises(ValueError, match="env.backend='gymnasium'"):
        make_analysis_env("mujoco:Ant-v4", {"use_contact_force": True})  # an EnvPool key


def test_independent_states_reach_the_estimator_from_config_and_cli(monkeypatch):
    import aclab.algos.offpolicy as offpolicy

    seen = {}

    def fake_measure(env, probe, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    config = make_config("td3", "mujoco:Hopper-v4", overrides=[*FAST, "env.backend=gymnasium", "env.num_envs=1"])
    assert config.params.grad_accuracy_independent_states is True  # the authors' procedure by default
    monkeypatch.setattr(offpolicy, "measure_gradient_accuracy", fake_measure)
    for value in (True, False):
        config.params.grad_accuracy_independent_states = value
        algo, envs = build_algo(config)
        with pytest.raises(RuntimeError, match="stop"):
            algo.loop.measure_gradient_accuracy(algo.gradient_probe(envs))
        assert seen["independent_states"] is value
        envs.close()

    import aclab.analyze as analyze
    from aclab.cli import main

    calls = []
    monkeypatch.setattr(analyze, "run_gradient_accuracy", lambda path, **kw: calls.append(kw) or {"ok": 1})
    for flag, expected in (([], None), (["--independent-states"], True), (["--no-independent-states"], False)):
        assert main(["analyze", "gradient-accuracy", "RUN", *flag]) == 0
        assert calls[-1]["independent_states"] is expected


def test_rollout_policy_bonus_enters_the_discounted_return():
    """Soft rollouts: after the repeated action, each step's reward plus the rollout policy's bonus."""
    env = LinearQEnv(obs_dim=3, action_dim=2, episode_length=8, seed=4)
    obs, _ = env.reset(seed=0)
    state = save_env_state(env, obs)

    def zero_policy(o):
        return np.zeros((len(o), 2))

    plain = GradientProbe(policy=zero_policy, critic_gradient=lambda o, a: a)
    bonus = GradientProbe(policy=zero_policy, critic_gradient=lambda o, a: a,
                          rollout_policy=lambda o: (np.zeros((len(o), 2)), np.full(len(o), 0.5)))
    action = np.array([0.3, -0.2])
    base = rollout_return(env, state, action, plain, repeat=3, gamma=0.9)
    soft = rollout_return(env, state, action, bonus, repeat=3, gamma=0.9)
    expected_bonus = sum(0.5 * 0.9**t for t in range(3, 8))
    assert soft - base == pytest.approx(expected_bonus, rel=1e-9)


def test_sac_soft_probe_samples_the_policy_and_adds_minus_alpha_log_pi():
    algo, envs = build_algo(_cheetah_config("sac-hyper", "params.grad_accuracy_soft=true", "params.alpha=0.3"))
    probe = algo.gradient_probe(envs)
    assert probe.rollout_policy is not None
    obs = np.repeat(np.asarray(envs.obs, dtype=np.float32), 4, axis=0)
    actions, bonus = probe.rollout_policy(obs)
    assert actions.shape == (4, 6) and np.abs(actions).max() < 1.0 and len(np.unique(actions[:, 0])) == 4
    with torch.no_grad():
        log_prob = tanh_normal_log_prob(algo.actor(torch.as_tensor(obs)), torch.as_tensor(actions)).numpy()
    np.testing.assert_allclose(bonus, -0.3 * log_prob, rtol=1e-3, atol=1e-3)
    plain, _ = build_algo(_cheetah_config("sac-hyper"))
    assert plain.gradient_probe(envs).rollout_policy is None
    envs.close()


def test_logged_fractions_include_the_papers_figure_3bc_thresholds():
    """Figure 3b-c plots the fraction of states with CS > 0.25 and > 0.75: both are logged columns,
    computed as strict fractions over the states with a defined cosine (NaN: below every threshold)."""
    from aclab.analysis.grad_accuracy import GradientAccuracyResult

    cosine = np.array([0.2, 0.3, 0.8, 0.74, np.nan])
    empty = np.zeros((5, 1))
    metrics = GradientAccuracyResult(cosine=cosine, true_gradient=empty, critic_gradient=empty, actions=empty,
                                     returns=empty, obs=empty).metrics()
    assert metrics["grad_cs/frac_gt_0.25"] == pytest.approx(3 / 5)
    assert metrics["grad_cs/frac_gt_0.75"] == pytest.approx(1 / 5)
    assert metrics["grad_cs/mean"] == pytest.approx(np.mean([0.2, 0.3, 0.8, 0.74]))
