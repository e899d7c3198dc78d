"""MAML (aclab.algos.maml): baseline and advantage math against slow references, the exact second-order
meta-gradient against finite differences, the policies, end-to-end training, resume, learning."""


import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from run_rows import metric_rows
from torch.func import functional_call

import aclab
from aclab.algos.maml import (
    MAML,
    HyperMetaPolicy,
    fit_linear_baseline,
    gradient_noise,
    linear_baseline_features,
    make_task_actor,
    masked_normalize,
    task_advantages,
    task_dist_params,
)
from aclab.algos.trpo import fisher_vector_product_fn, flatten, unflatten
from aclab.envs import make_env
from aclab.envs.meta import Trajectories
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

ENV = "gym:aclab/MetaPointNav-v0"
TINY = {"params.meta_batch_size": 3, "params.episodes_per_task": 4, "params.num_train_tasks": 10,
        "params.num_test_tasks": 3, "params.hidden_sizes": [16, 16], "params.hyper_primary_widths": [16, 32],
        "params.hyper_dynamic_hidden": [16], "params.eval_every": 2, "env.options": {"horizon": 8},
        "env.num_envs": 1, "progress": False, "eval.episodes": 2, "eval.num_envs": 1}


def _algo(name="maml", **overrides) -> MAML:
    config = make_config(name, ENV, overrides={**TINY, **overrides})
    envs = make_env(ENV, 1, 0, options=config.env.options)
    try:
        return MAML(config, envs.spec, torch.device("cpu"))
    finally:
        envs.close()


# ----------------------------------------------------------------------------------------------
# baseline and advantages
# ----------------------------------------------------------------------------------------------
def test_linear_baseline_features_and_ridge_fit_match_numpy():
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.normal(size=(5, 3, 2)) * 8)
    valid = torch.ones(5, 3)
    valid[3:, 1] = 0
    f = linear_baseline_features(obs, valid)
    assert f.shape == (5, 3, 2 * 2 + 4)
    o = np.clip(obs.numpy()[4, 0], -10, 10)
    np.testing.assert_allclose(f[4, 0].numpy(), [*o, *o**2, 0.04, 0.04**2, 0.04**3, 1.0])
    assert torch.all(f[3:, 1] == 0)
    x = rng.normal(size=(2, 30, 4))
    y = rng.normal(size=(2, 30))
    w = fit_linear_baseline(torch.as_tensor(x), torch.as_tensor(y), reg=1e-3)
    for k in range(2):
        expected = np.linalg.solve(x[k].T @ x[k] + 1e-3 * np.eye(4), x[k].T @ y[k])
        np.testing.assert_allclose(w[k].numpy(), expected, rtol=1e-10)


def test_masked_normalize_uses_only_valid_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 4.0, 6.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    out = masked_normalize(x, mask, eps=0.0)
    np.testing.assert_allclose(out[0].numpy(), [-np.sqrt(1.5), 0.0, np.sqrt(1.5), 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [-1, -1, 1, 1], rtol=1e-6)


def test_task_advantages_are_returns_minus_a_per_task_linear_baseline():
    """With lambda = 1, GAE = discounted return - baseline; normalised per task (slow reference)."""
    rng = np.random.default_rng(1)
    steps, tasks, episodes, gamma = 6, 2, 3, 0.9
    n = tasks * episodes
    valid = np.ones((steps, n), bool)
    valid[4:, 2] = False
    terminated = np.zeros((steps, n), bool)
    terminated[3, 2] = True
    traj = Trajectories(obs=rng.normal(size=(steps, n, 2)).astype(np.float32),
                        actions=np.zeros((steps, n, 2), np.float32),
                        rewards=(rng.normal(size=(steps, n)) * valid).astype(np.float32),
                        next_obs=np.zeros((steps, n, 2), np.float32), terminated=terminated, valid=valid)
    adv = task_advantages(traj, tasks, gamma, 1.0, 1e-5).numpy()
    for k in range(tasks):
        feats, rets, masks = [], [], []
        for e in range(episodes):
            i = k * episodes + e
            g = 0.0
            episode_returns = np.zeros(steps)
            for t in reversed(range(steps)):
                g = (traj.rewards[t, i] + gamma * g * (not terminated[t, i])) * valid[t, i]
                episode_returns[t] = g
            for t in range(steps):
                o = np.clip(traj.obs[t, i].astype(np.float64), -10, 10)
                tt = t / 100
                feats.append(np.r_[o, o**2, tt, tt**2, tt**3, 1.0] * valid[t, i])
                rets.append(episode_returns[t])
                masks.append(valid[t, i])
        x, y, m = np.array(feats), np.array(rets), np.array(masks, float)
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
        raw = (y - x @ w) * m
        mean = raw[m > 0].mean()
        expected = (raw - mean) / (raw[m > 0].std() + 1e-8) * m
        np.testing.assert_allclose(adv[k], expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# meta-gradients
# ----------------------------------------------------------------------------------------------
def _double_batches(algo: MAML):
    tasks = algo.sample_train_tasks(2)
    pre, post, _ = algo.sample_meta_batch(tasks, 3, algo.rng)
    algo.policy.double()
    for batch in (pre, post):
        for name in ("obs", "actions", "advantages", "mask", "contexts", "old_params"):
            value = getattr(batch, name)
            if value is not None:
                setattr(batch, name, value.double())
    return pre, post


def _finite_difference(fn, params, direction, eps=1e-6):
    flat = flatten([p.detach() for p in params])
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, v in zip(params, unflatten(flat + sign * eps * direction, params)):
                p.copy_(v)
        values.append(float(fn().detach()))
    with torch.no_grad():
        for p, v in zip(params, unflatten(flat, params)):
            p.copy_(v)
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("name", ["maml", "maml-context", "maml-hyper"])
def test_second_order_meta_gradient_matches_finite_differences(name):
    algo = _algo(name, **{"params.inner_lr": 0.5 if name != "maml-hyper" else 5e-2, "params.inner_steps": 2})
    pre, post = _double_batches(algo)
    loss_and_kl = algo.meta_loss_and_kl(pre, post)
    params = list(algo.policy.parameters())
    # move away from theta_old so that the ratio and the KL are not at their stationary point
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    loss = loss_and_kl()[0]
    grads = torch.autograd.grad(loss, params)
    direction = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(4),
                            dtype=torch.float64)
    exact = float(flatten(grads) @ direction)
    numeric = _finite_difference(lambda: loss_and_kl()[0], params, direction)
    assert exact == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    algo.params.first_order = True  # first-order MAML drops the inner Hessian: a different direction
    first = float(flatten(torch.autograd.grad(loss_and_kl()[0], params)) @ direction)
    assert abs(first - numeric) > 1e-3 * abs(numeric)


def test_meta_loss_and_kl_are_trpos_surrogate_and_the_kl_from_the_sampling_policy():
    """TRPO's outer objective on the post-adaptation episodes (MAML paper, Section 5.3; TRPO paper, Eq. 14):
    ``-mean_k mean_t ratio A`` and the constraint ``mean_k mean_t KL(pi_old || pi_theta')``, recomputed with
    torch.distributions from the adapted policy's Gaussians. KL is asymmetric, so the reversed direction
    (``KL(pi_theta' || pi_old)``) is checked to be measurably different here."""
    from torch.distributions import Normal, kl_divergence

    algo = _algo("maml", **{"params.inner_lr": 0.5})
    pre, post = _double_batches(algo)
    loss_and_kl = algo.meta_loss_and_kl(pre, post)
    with torch.no_grad():  # move away from theta_old, log-std included, so that the KL is asymmetric
        for p in algo.policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=p.dtype))
    loss, kl = (x.detach() for x in loss_and_kl())
    with torch.no_grad():
        adapted = algo.adapt(algo.named_params(), pre)
        new_mean, new_log_std = task_dist_params(algo.policy, adapted, post.obs, post.contexts, True).chunk(2, -1)
        old_mean, old_log_std = post.old_params.chunk(2, -1)
        new, old = Normal(new_mean, new_log_std.exp()), Normal(old_mean, old_log_std.exp())
        ratio = torch.exp(new.log_prob(post.actions).sum(-1) - old.log_prob(post.actions).sum(-1))
        count = post.mask.sum(-1)
        loss_ref = -((ratio * post.advantages * post.mask).sum(-1) / count).mean()
        kl_ref = ((kl_divergence(old, new).sum(-1) * post.mask).sum(-1) / count).mean()
        kl_reversed = ((kl_divergence(new, old).sum(-1) * post.mask).sum(-1) / count).mean()
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-9)
    assert float(kl) == pytest.approx(float(kl_ref), rel=1e-9)
    assert abs(float(kl_reversed) - float(kl_ref)) > 1e-3 * float(kl_ref) > 0


def test_every_maml_preset_uses_the_exact_second_order_meta_gradient():
    """MAML's meta-gradient differentiates through the inner step (MAML paper, Section 2.2); the
    first-order approximation is an option, off in the defaults and in every preset."""
    from aclab.algos.maml import MAMLConfig
    from aclab.config import load_preset

    assert MAMLConfig().first_order is False
    presets = sorted(path.stem for path in (Path(aclab.__file__).parent / "presets").glob("maml-*.toml"))
    assert len(presets) >= 6
    for name in presets:
        config = make_config(load_preset(name)[1].get("algo", "maml"), ENV, preset=name)
        assert config.params.first_order is False, name


def test_fisher_vector_product_through_the_inner_step_matches_finite_differences():
    # tanh: with ReLU, zero initial biases and every episode starting at the origin, theta_old sits exactly
    # on the ReLU kinks, where the inner gradient (hence the adapted policy) jumps
    algo = _algo("maml", **{"params.inner_lr": 0.5, "params.activation": "tanh"})
    pre, post = _double_batches(algo)
    loss_and_kl = algo.meta_loss_and_kl(pre, post)
    params = list(algo.policy.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hv = fisher_vector_product_fn(lambda: loss_and_kl()[1], params)(v)

    def directional_kl_gradient():
        kl = loss_and_kl()[1]
        return flatten(torch.autograd.grad(kl, params)) @ v

    numeric = _finite_difference(directional_kl_gradient, params, u)
    assert float(hv @ u) == pytest.approx(numeric, rel=1e-4)
    assert float(hv @ v) > 0  # positive semi-definite (the Fisher of the adapted policies)


def test_adapt_is_one_gradient_step_per_task():
    algo = _algo("maml-context", **{"params.inner_lr": 0.3})
    tasks = algo.sample_train_tasks(3)
    pre, _, _ = algo.sample_meta_batch(tasks, 2, algo.rng)
    params = algo.named_params()
    adapted = algo.adapt(params, pre)
    for k in range(3):
        loss = algo.inner_loss(params, pre.obs[k], pre.contexts[k], pre.actions[k], pre.advantages[k], pre.mask[k])
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, value), g in zip(params.items(), grads):
            torch.testing.assert_close(adapted[name][k], value - 0.3 * g, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# policies
# ----------------------------------------------------------------------------------------------
def test_hyper_policy_generates_weights_from_the_context_only():
    algo = _algo("maml-hyper")
    policy: HyperMetaPolicy = algo.policy
    obs = torch.randn(2, 5, 2)
    contexts = torch.randn(2, 2)
    params = algo.named_params()
    out = task_dist_params(policy, params, obs, contexts, False)
    # the wrapped HyperPolicy with the context repeated per state gives the same Gaussian
    for k in range(2):
        ref = policy.hyper(contexts[k].expand(5, 2), obs[k])
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)
    # acting with pre-generated dynamic weights equals the full forward (shared and per-task params)
    torch.testing.assert_close(make_task_actor(policy, params, contexts, False)(obs), out)
    stacked = {k: torch.stack([v, v * 1.01]) for k, v in params.items()}
    torch.testing.assert_close(make_task_actor(policy, stacked, contexts, True)(obs),
                               task_dist_params(policy, stacked, obs, contexts, True), rtol=1e-5, atol=1e-6)
    # Vanilla-MAML ignores the context, Context-MAML does not
    vanilla, context = _algo("maml"), _algo("maml-context")
    a = functional_call(vanilla.policy, vanilla.named_params(), (obs[0], contexts[0]))
    b = functional_call(vanilla.policy, vanilla.named_params(), (obs[0], contexts[1]))
    assert torch.equal(a, b)
    c = functional_call(context.policy, context.named_params(), (obs[0], contexts[0]))
    d = functional_call(context.policy, context.named_params(), (obs[0], contexts[1]))
    assert not torch.equal(c, d)


def test_variants_set_the_policy_and_the_spec_inner_step():
    assert make_config("maml", ENV).params.inner_lr == 0.1
    hyper = make_config("maml-hyper", ENV).params
    assert hyper.policy == "hyper" and hyper.inner_lr == 5e-5
    assert make_config("maml-context", ENV).params.policy == "context"


def test_wrong_env_is_rejected_with_the_valid_ids():
    config = make_config("maml", ENV, overrides=TINY)
    envs = make_env(ENV, 1, 0, options=config.env.options)
    envs.close()
    config.env.id = "Pendulum-v1"
    with pytest.raises(ValueError, match="gym:aclab/MetaPointNav-v0"):
        MAML(config, envs.spec, torch.device("cpu"))
    config.env.id = "gym:aclab/MetaHalfCheetahVel-v0"  # a task family whose shapes differ from the env's
    with pytest.raises(ValueError, match="do not match task family halfcheetah-vel"):
        MAML(config, envs.spec, torch.device("cpu"))




# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["maml", "maml-hyper"])
def test_training_loop_end_to_end(tmp_path, name):
    config = make_config(name, ENV, overrides={**TINY, "total_steps": 3 * 2 * 3 * 4 * 8})
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished" and summary["steps"] == 3 * 2 * 3 * 4 * 8
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 3 and rows[1]["test/return_pre"] and rows[1]["test/return_post"]
    # every meta-update took a real step: a backtracked fraction 0.8^k of the full step, a KL of that step
    # inside (0, max_kl], and a lower surrogate
    accepted = [r for r in rows if float(r["trpo/step_fraction"]) > 0]
    assert accepted
    for r in accepted:
        assert 0.0 < float(r["trpo/kl"]) <= 0.01
        assert float(r["trpo/step_fraction"]) == pytest.approx(0.8 ** float(r["trpo/backtracks"]), rel=1e-5)
        assert float(r["trpo/loss_after"]) < float(r["trpo/loss_before"])
    assert "eval_test_return" in summary
    episodes = list(csv.DictReader((tmp_path / "run" / "episodes.csv").open()))  # post-adaptation episodes
    assert len(episodes) == 3 * 3 * 4 and {e["env"] for e in episodes} == {""}
    for i, row in enumerate(rows):
        mine = episodes[12 * i: 12 * (i + 1)]
        assert {int(e["step"]) for e in mine} == {int(row["step"])}
        assert np.mean([float(e["return"]) for e in mine]) == pytest.approx(float(row["episode_return"]), rel=1e-5)
        tasks = [e["task"] for e in mine]
        assert all(tasks[4 * k: 4 * k + 4] == [tasks[4 * k]] * 4 for k in range(3))  # 4 episodes per task


def test_resume_equals_uninterrupted(tmp_path):
    overrides = {**TINY, "total_steps": 6 * 2 * 3 * 4 * 8, "checkpoint_every_iterations": 2}
    train(make_config("maml", ENV, overrides=overrides), tmp_path / "full")
    first = train(make_config("maml", ENV, overrides=overrides), tmp_path / "split", stop_after_iterations=3)
    assert first["status"] == "interrupted"
    train(make_config("maml", ENV, overrides=overrides), tmp_path / "split", resume=True)
    a = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]["policy"]
    b = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]["policy"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")


def test_gradient_noise_gives_one_return_per_update_and_restores_the_policy():
    algo = _algo("maml")
    before = {k: v.clone() for k, v in algo.policy.state_dict().items()}
    result = gradient_noise(algo, num_updates=3, eval_episodes=2)
    assert result["return_pre"].shape == (3,) and result["return_post"].shape == (3,)
    assert np.unique(result["return_post"]).size > 1  # different updates, different policies
    for key, value in algo.policy.state_dict().items():
        assert torch.equal(value, before[key])


def test_maml_learns_point_navigation_within_a_fixed_budget(one_torch_thread):
    """15 meta-iterations of 10 tasks x 10 episodes of 20 steps (~1.5 s each on this CPU): the
    post-adaptation return of held-out tasks improves by a margin that random updates do not give."""
    algo = _algo("maml", **{"params.meta_batch_size": 10, "params.episodes_per_task": 10,
                            "params.hidden_sizes": [32, 32], "env.options": {"horizon": 20}, "params.eval_every": 0})
    start = algo.evaluate_tasks(algo.test_tasks, 10, seed=0)
    for _ in range(15):
        algo.iterate(None)
    end = algo.evaluate_tasks(algo.test_tasks, 10, seed=0)
    assert end["return_post"] > start["return_post"] + 3.0, (start, end)
    assert end["return_pre"] > start["return_pre"] + 1.0, (start, end)
    assert end["return_post"] > end["return_pre"] + 1.0, (start, end)  # the inner step helps
