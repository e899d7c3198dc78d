"""Meta-RL options of the hypernetwork paper against the authors' code: task-family rewards and
observations (Ant angles and survive bonus, HalfCheetah's 20-d observation), oracle contexts, MAML's
baseline fit and authors' presets, Hyper-MAML's calibrated heads, and Hyper-PEARL's log-std head,
calibration and per-task encoder buffers."""

import math

import numpy as np
import pytest
import torch

from aclab.algos.maml import MAML, task_advantages
from aclab.algos.pearl import PEARL, collection_rounds
from aclab.envs import make_env
from aclab.envs.meta import Trajectories, make_task_family
from aclab.nets.hyper import AUTHORS_LOG_STD_HEAD_BOUND, AUTHORS_OUTPUT_HEAD_BOUND, HyperPolicy
from aclab.train import make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _mujoco_log_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working directory


# ----------------------------------------------------------------------------------------------
# task families
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_ant_angle_direction_reward_of_the_authors_code(direction):
    """direction_reward='angle': (v_x, v_y) . (cos d, sin d) measured from the torso's motion, with the
    authors' survive bonus 0.05; the default is d * v_x (PEARL's forward/backward)."""
    family = make_task_family("ant-fwd-back", direction_reward="angle", survive_bonus=0.05)
    batch = family.make_batch_env(1)
    batch.reset(np.array([[direction]]), [11])
    env = batch.envs[0]
    rng = np.random.default_rng(0)
    for _ in range(4):
        action = rng.uniform(-1.0, 1.0, family.action_dim)
        before = env.data.body("torso").xpos[:2].copy()
        _, reward, terminated = batch.step(action[None], np.ones(1, bool))
        velocity = (env.data.body("torso").xpos[:2] - before) / env.dt
        contact = 5e-4 * np.sum(np.square(np.clip(env.data.cfrc_ext, -1.0, 1.0)))
        healthy = float(0.2 <= env.data.qpos[2] <= 1.0)
        expected = (velocity[0] * math.cos(direction) + velocity[1] * math.sin(direction)
                    - 0.005 * np.sum(action**2) - contact + 0.05 * healthy)
        assert float(reward[0]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="valid: horizon"):
        make_task_family("halfcheetah-fwd-back", direction_reward="angle")


def test_halfcheetah_observation_has_the_torso_centre_of_mass_by_default():
    family = make_task_family("halfcheetah-vel")
    assert family.obs_dim == 20
    batch = family.make_batch_env(1)
    obs = batch.reset(np.array([[1.0]]), [2])
    env = batch.envs[0]
    np.testing.assert_allclose(obs[0, :8], env.data.qpos[1:], atol=1e-6)
    np.testing.assert_allclose(obs[0, 17:], env.data.body("torso").xpos, atol=1e-6)
    obs, _, _ = batch.step(np.full((1, 6), 0.5), np.ones(1, bool))
    np.testing.assert_allclose(obs[0, 17:], env.data.body("torso").xpos, atol=1e-6)
    assert make_task_family("halfcheetah-vel", torso_com_in_observation=False).obs_dim == 17


def test_oracle_contexts_sign_binary_and_the_velocity_range_lower_bound():
    rng = np.random.default_rng(0)
    fwd = make_task_family("halfcheetah-fwd-back")
    d = fwd.sample_tasks(10, rng)
    np.testing.assert_array_equal(fwd.context(d), d)  # the authors' d in {-1, +1}
    np.testing.assert_array_equal(make_task_family("ant-fwd-back", direction_context="binary").context(d), (d + 1) / 2)
    shifted = make_task_family("halfcheetah-vel", train_range=[1.0, 2.0], test_range=[1.0, 2.5])
    np.testing.assert_allclose(shifted.context(np.array([[1.0], [1.5], [2.0], [2.5]])).ravel(), [0, 0.5, 1, 1.5])
    with pytest.raises(ValueError, match="direction_context"):
        make_task_family("ant-fwd-back", direction_context="onehot")


@pytest.mark.parametrize("name,bonus", [("ant-fwd-back", 1.0), ("ant-vel", 1.05)])
def test_survive_bonus_defaults_and_option(name, bonus):
    assert make_task_family(name).survive_bonus == bonus
    low = make_task_family(name, survive_bonus=0.05)
    batch, ref = low.make_batch_env(1), make_task_family(name).make_batch_env(1)
    for b in (batch, ref):
        b.reset(np.array([[1.0]]), [5])
    action = np.zeros((1, 8))
    r_low = batch.step(action, np.ones(1, bool))[1][0]
    r_ref = ref.step(action, np.ones(1, bool))[1][0]
    assert r_ref - r_low == pytest.approx(bonus - 0.05, abs=1e-5)  # healthy at the start


# ----------------------------------------------------------------------------------------------
# MAML
# ----------------------------------------------------------------------------------------------
ENV = "gym:aclab/MetaPointNav-v0"
TINY = {"params.meta_batch_size": 3, "params.episodes_per_task": 4, "params.num_train_tasks": 10,
        "params.num_test_tasks": 3, "params.hidden_sizes": [16, 16], "params.hyper_primary_widths": [16, 32],
        "params.hyper_dynamic_hidden": [16], "params.eval_every": 0, "env.options": {"horizon": 8},
        "env.num_envs": 1, "progress": False, "eval.episodes": 0}


def _maml(name="maml", env=ENV, **overrides) -> MAML:
    config = make_config(name, env, overrides={**TINY, **overrides})
    envs = make_env(env, 1, 0, options=config.env.options)
    try:
        return MAML(config, envs.spec, torch.device("cpu"))
    finally:
        envs.close()


def test_task_advantages_with_a_given_baseline_use_it_instead_of_fitting():
    rng = np.random.default_rng(3)
    steps, tasks, episodes, gamma = 5, 2, 3, 0.9
    n = tasks * episodes
    valid = np.ones((steps, n), bool)
    traj = Trajectories(obs=rng.normal(size=(steps, n, 2)).astype(np.float32),
                        actions=np.zeros((steps, n, 2), np.float32),
                        rewards=rng.normal(size=(steps, n)).astype(np.float32),
                        next_obs=np.zeros((steps, n, 2), np.float32),
                        terminated=np.zeros((steps, n), bool), valid=valid)
    _, fitted = task_advantages(traj, tasks, gamma, 1.0, 1e-5)
    weights = torch.as_tensor(rng.normal(size=fitted.shape))
    adv, used = task_advantages(traj, tasks, gamma, 1.0, 1e-5, baseline_weights=weights)
    torch.testing.assert_close(used, weights.double())
    for k in range(tasks):  # slow reference: normalised (discounted return - features . w)
        raw = []
        for e in range(episodes):
            i = k * episodes + e
            g, returns = 0.0, np.zeros(steps)
            for t in reversed(range(steps)):
                g = traj.rewards[t, i] + gamma * g
                returns[t] = g
            o = np.clip(traj.obs[:, i].astype(np.float64), -10, 10)
            t_ = np.arange(steps)[:, None] / 100.0
            feats = np.concatenate([o, o**2, t_, t_**2, t_**3, np.ones((steps, 1))], 1)
            raw.append(returns - feats @ weights[k].numpy())
        raw = np.concatenate(raw)
        np.testing.assert_allclose(adv[k].numpy(), (raw - raw.mean()) / (raw.std() + 1e-8), rtol=1e-4, atol=1e-4)


def test_baseline_fit_pre_reuses_the_pre_adaptation_baseline_for_the_post_advantages():
    post_fit = _maml("maml-context")
    pre_fit = _maml("maml-context", **{"params.baseline_fit": "pre"})
    pre_fit.policy.load_state_dict(post_fit.policy.state_dict())
    tasks = post_fit.sample_train_tasks(3)
    results = {}
    for name, algo in (("post", post_fit), ("pre", pre_fit)):
        pre, post, _ = algo.sample_meta_batch(tasks, 4, np.random.default_rng(0),
                                              torch.Generator().manual_seed(0))
        results[name] = (pre, post)
    pre, post = results["pre"]
    torch.testing.assert_close(post.baseline_weights, pre.baseline_weights)
    p_pre, p_post = results["post"]
    assert not torch.allclose(p_post.baseline_weights, p_pre.baseline_weights)
    torch.testing.assert_close(post.obs, p_post.obs)  # same episodes, different baselines
    assert not torch.allclose(post.advantages, p_post.advantages)


def test_maml_authors_presets_are_first_order_with_their_settings():
    for family in ("halfcheetah-fwd-back", "halfcheetah-vel", "ant-fwd-back", "ant-vel"):
        paper = make_config("maml-hyper", preset=f"maml-{family}").params
        authors = make_config("maml-hyper", preset=f"maml-hyperrl-{family}")
        p = authors.params
        assert (paper.first_order, paper.line_search_steps, paper.baseline_fit, paper.hyper_init) == (
            False, 15, "post", "kaiming")
        assert (p.first_order, p.line_search_steps, p.baseline_fit, p.hyper_init) == (True, 20, "pre", "authors")
    ant = make_config("maml", preset="maml-hyperrl-ant-fwd-back").env.options
    assert (ant["direction_reward"], ant["survive_bonus"]) == ("angle", 0.05)


def test_hyper_maml_heads_are_calibrated_on_the_training_contexts(monkeypatch):
    """The paper's init on the primary's real inputs: Hyper-MAML calibrates its heads on the training
    tasks' oracle contexts (point navigation: uniform in [-1, 1]^2, not standard normal)."""
    from aclab.nets.hyper import HyperNetwork

    seen = []
    original = HyperNetwork.calibrate_heads

    def recording(self, meta_samples):
        seen.append(meta_samples.clone())
        return original(self, meta_samples)

    monkeypatch.setattr(HyperNetwork, "calibrate_heads", recording)
    algo = _maml("maml-hyper", **{"params.num_train_tasks": 50})
    assert len(seen) == 2  # the standard-normal placeholder at construction, then the contexts
    torch.testing.assert_close(seen[-1], algo.contexts_of(algo.train_tasks))
    assert abs(seen[-1]).max() <= 1.0
    seen.clear()
    authors = _maml("maml-hyper", **{"params.hyper_init": "authors"})
    assert not seen and authors.policy.hyper.net.heads.weight.abs().max() <= 0.05


# ----------------------------------------------------------------------------------------------
# PEARL
# ----------------------------------------------------------------------------------------------
PEARL_TINY = {"params.num_train_tasks": 3, "params.num_test_tasks": 2, "params.meta_batch": 2, "params.batch_size": 16,
              "params.embedding_batch_size": 8, "params.num_initial_steps": 10, "params.num_steps_prior": 20,
              "params.num_extra_rl_steps_posterior": 10, "params.num_train_steps_per_itr": 1,
              "params.num_tasks_sample": 3, "params.hidden_sizes": [16], "params.encoder_hidden": [16],
              "params.eval_every": 0, "params.hyper_primary_widths": [16, 32], "params.hyper_dynamic_hidden": [16],
              "params.replay_size": 500, "env.options": {"horizon": 10}, "env.num_envs": 1, "progress": False,
              "eval.episodes": 0}


def _pearl(name="pearl", **overrides) -> PEARL:
    config = make_config(name, ENV, overrides={**PEARL_TINY, **overrides})
    envs = make_env(ENV, 1, 0, options=config.env.options)
    try:
        return PEARL(config, envs.spec, torch.device("cpu"))
    finally:
        envs.close()


def test_collection_rounds_keep_draw_order_per_task():
    rounds = collection_rounds([3, 5, 3, 7, 3, 5])
    assert [r.tolist() for r in rounds] == [[3, 5, 7], [3, 5], [3]]
    assert collection_rounds([]) == []


def test_a_task_drawn_twice_keeps_only_its_last_collection_in_the_encoder_buffer():
    """PEARL's loop clears a task's encoder buffer before each of its collections: with one training task
    drawn three times, the encoder buffer holds one collection's prior steps (20), the RL buffer all."""
    algo = _pearl(**{"params.num_train_tasks": 1})
    algo.iterate(None)
    assert int(algo.enc_replay.size[0]) == 20
    assert int(algo.replay.size[0]) == 10 + 3 * (20 + 10)


def test_hyper_pearl_log_std_head_bound_and_critic_calibration():
    policy = HyperPolicy(5, 4, 3, output="tanh_gaussian", state_dependent_std=True, init="authors",
                         primary_widths=(16, 32), dynamic_hidden=(8,))
    w, b, g = policy.net._chunk_slices()[-1]
    head = policy.net.heads.weight[0]
    out = head[:, w].reshape(head.shape[0], 8, 6)
    for cols in (out, head[:, b].unsqueeze(1), head[:, g].unsqueeze(1)):
        assert cols[..., :3].abs().max() <= AUTHORS_OUTPUT_HEAD_BOUND
        assert cols[..., :3].abs().max() > 0.5 * AUTHORS_OUTPUT_HEAD_BOUND
        assert cols[..., 3:].abs().max() <= AUTHORS_LOG_STD_HEAD_BOUND
    # the point starts at (20, 20): its states are far from the standard-normal inputs of the construction-time
    # calibration (which leaves layer-1 weights ~8x nn.Linear's scale here), so only a calibration on the
    # initial data gives nn.Linear's std 1 / sqrt(3 fan_in) (up to the random heads' spread: the states are
    # nearly one point, so the std is over ~80 generated weights, ~8% noise; the mutant gives ~8.5x)
    torch.manual_seed(0)
    algo = _pearl("pearl-hyper", **{"env.options": {"horizon": 10, "goal_low": 2.0, "goal_high": 4.0,
                                                     "max_action": 1.0, "start_low": 20.0, "start_high": 20.0}})
    algo.iterate(None)  # initial data, calibration, one gradient step
    states = torch.as_tensor(np.concatenate([algo.replay.obs[t, : algo.replay.size[t]] for t in range(3)]))
    for critic in (algo.vf_target, algo.qf):
        net = critic.net.net
        with torch.no_grad():
            w1 = net.dynamic_layers(states)[0].weight
        assert abs(float(w1.std()) * math.sqrt(3 * net.layer_dims[0][0]) - 1.0) < 0.25
