"""PPO's closed-form minibatch gradient (aclab.nets.analytic_ppo) against autograd, its wiring into PPO,
and the lean global-norm gradient clip against torch's."""

import pytest
import torch

from aclab import registry
from aclab.algos.common import clip_grad_norm, resolve_device
from aclab.config import ConfigError
from aclab.core import losses
from aclab.core.distributions import Categorical, DiagGaussian, TanhGaussian
from aclab.envs import build_envs
from aclab.nets import analytic_ppo
from aclab.nets.agents import ActorCritic, FusedMLPActorCritic
from aclab.train import make_config


def _autograd_reference(net, batch, clip_coef, value_clip, vf_coef, ent_coef):
    """The loss as PPO's autograd path writes it (aclab.core.losses, the distribution's functions)."""
    net.zero_grad(set_to_none=True)
    params, values = net(batch["obs"])
    log_probs = net.dist.log_prob(params, batch["actions"])
    pg, approx_kl, clip_frac = losses.clipped_surrogate_loss(log_probs, batch["old_log_probs"], batch["advantages"],
                                                             clip_coef)
    v_loss = losses.value_loss(values, batch["returns"], batch["old_values"], value_clip)
    entropy = net.dist.entropy(params).mean()
    (pg + vf_coef * v_loss - ent_coef * entropy).backward()
    stats = torch.stack([pg.detach(), v_loss.detach(), entropy.detach(), approx_kl, clip_frac])
    return stats, {name: p.grad.clone() for name, p in net.named_parameters()}


def _batch(net, n, obs_dim, seed, spread=0.4):
    """A minibatch where some ratios and some values leave their clip ranges (``spread`` > 0) or, with
    ``spread=0``, where the old log-probs and values are the current ones (every clip term ties)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    with torch.no_grad():
        params, values = net(obs)
        actions = net.dist.sample(params, g)
        log_probs = net.dist.log_prob(params, actions)
    return {"obs": obs, "actions": actions,
            "old_log_probs": log_probs + spread * torch.randn(n, generator=g),
            "advantages": torch.randn(n, generator=g), "returns": values + torch.randn(n, generator=g),
            "old_values": values + spread * torch.randn(n, generator=g)}


def _net(discrete, activation, hidden_sizes, obs_dim, seed=0):
    torch.manual_seed(seed)
    dist = Categorical(3) if discrete else DiagGaussian(4)
    net = FusedMLPActorCritic(obs_dim, dist, hidden_sizes=hidden_sizes, activation=activation, log_std_init=-0.3)
    with torch.no_grad():  # a policy and value head that are not near zero, so every term matters
        net.head_weight.mul_(30.0)
    return net


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
@pytest.mark.parametrize("value_clip", [None, 0.2], ids=["vloss", "clipped-vloss"])
@pytest.mark.parametrize("activation,hidden_sizes", [("tanh", (64, 64)), ("relu", (16,)), ("tanh", (8, 16, 8))])
def test_gradients_and_statistics_equal_autograd(discrete, value_clip, activation, hidden_sizes):
    net = _net(discrete, activation, hidden_sizes, obs_dim=5)
    batch = _batch(net, 96, 5, seed=1)
    coefs = dict(clip_coef=0.2, value_clip=value_clip, vf_coef=0.7, ent_coef=0.05)
    expected_stats, expected = _autograd_reference(net, batch, **coefs)
    assert 0.1 < float(expected_stats[4]) < 0.9  # some ratios are clipped, some not
    if value_clip is not None:
        clipped = ((net(batch["obs"])[1] - batch["old_values"]).abs() > value_clip).float().mean()
        assert 0.1 < float(clipped) < 0.9
    net.zero_grad(set_to_none=True)
    stats = analytic_ppo.ppo_loss_and_grads(net, **batch, **coefs)
    torch.testing.assert_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("discrete", [True, False], ids=["categorical", "gaussian"])
def test_ties_in_the_minimum_and_maximum_split_like_autograd(discrete):
    """At the rollout's own parameters r = 1 and V = V_old: both surrogate terms and both value squares are
    equal, where autograd gives each branch half the gradient."""
    net = _net(discrete, "tanh", (32, 32), obs_dim=3)
    batch = _batch(net, 64, 3, seed=2, spread=0.0)
    coefs = dict(clip_coef=0.1, value_clip=0.1, vf_coef=0.5, ent_coef=0.01)
    expected_stats, expected = _autograd_reference(net, batch, **coefs)
    net.zero_grad(set_to_none=True)
    stats = analytic_ppo.ppo_loss_and_grads(net, **batch, **coefs)
    torch.testing.assert_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_supported_networks():
    assert analytic_ppo.supports(FusedMLPActorCritic(4, Categorical(2)))
    assert analytic_ppo.supports(FusedMLPActorCritic(4, DiagGaussian(2), activation="relu"))
    assert not analytic_ppo.supports(FusedMLPActorCritic(4, TanhGaussian(2)))
    assert not analytic_ppo.supports(ActorCritic((4,), Categorical(2), shared=True))


def _ppo(env_id, overrides):
    config = make_config("ppo", env_id, overrides=["progress=false", "eval.episodes=0", "env.num_envs=2",
                                                   "params.num_steps=32", *overrides])
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)  # the same initial network for every build
    return envs, registry.build(config, envs.spec, resolve_device("cpu"))


@pytest.mark.parametrize("env_id,extra", [
    ("CartPole-v1", ["params.lr=0.01"]),
    ("Pendulum-v1", ["params.clip_value_loss=false", "params.norm_adv=batch", "params.activation=relu"]),
], ids=["cartpole", "pendulum"])
def test_ppo_learns_the_same_with_analytic_and_autograd_gradients(env_id, extra):
    """Two PPO iterations (2 x 4 epochs x 4 minibatches of Adam steps) from the same seed give the same
    parameters and metrics to float precision whichever way the gradients are computed; "auto" picks the
    closed form on CPU for these networks."""
    runs = {}
    for mode in ("analytic", "autograd"):
        envs, algo = _ppo(env_id, [f"params.gradients={mode}", "params.ent_coef=0.05", *extra])
        assert algo.analytic == (mode == "analytic")
        metrics = [algo.iterate(envs) for _ in range(2)]
        envs.close()
        runs[mode] = (metrics, {k: v.clone() for k, v in algo.net.state_dict().items()})
    for key in ("loss/policy", "loss/value", "entropy", "approx_kl", "clip_fraction", "grad_norm"):
        for a, b in zip(runs["analytic"][0], runs["autograd"][0]):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for name, value in runs["analytic"][1].items():
        torch.testing.assert_close(value, runs["autograd"][1][name], rtol=1e-5, atol=1e-6, msg=name)
    assert runs["analytic"][0][-1]["clip_fraction"] > 0
    envs, algo = _ppo(env_id, [e for e in extra if "lr" not in e])
    assert algo.params.gradients == "auto" and algo.analytic
    envs.close()


def test_analytic_gradients_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="params.gradients"):
        make_config("ppo", "CartPole-v1", overrides=["params.gradients=analytic", "params.shared_network=true"])
    with pytest.raises(ConfigError, match="params.gradients"):
        make_config("ppo", "Pendulum-v1", overrides=["params.gradients=analytic", "params.action_dist=tanh_gaussian"])
    envs, algo = _ppo("CartPole-v1", ["params.gradients=autograd"])
    assert not algo.analytic
    envs.close()


@pytest.mark.parametrize("scale", [0.01, 100.0], ids=["below-max", "above-max"])
def test_clip_grad_norm_matches_torch(scale):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in params:
        p.grad = scale * torch.randn_like(p)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference):
        q.grad = p.grad.clone()
    norm = clip_grad_norm(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.5)
    torch.testing.assert_close(norm, expected)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.grad, q.grad)
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert float(total) == pytest.approx(min(float(expected), 0.5), rel=1e-5)


def test_adam_step_equals_torch_adam_through_lr_changes_and_a_reload():
    """adam_step takes the fused kernel directly: parameters and moments equal torch.optim.Adam's bit for bit
    over steps with an annealed learning rate, weight decay, and after loading a saved optimizer state."""
    from aclab.algos.common import adam_step, make_adam

    torch.manual_seed(0)
    shapes = ((3, 4), (5,), (2, 2, 2))
    mine = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    opt_mine = make_adam(mine, lr=0.01, eps=1e-5, weight_decay=0.1)
    opt_ref = make_adam(ref, lr=0.01, eps=1e-5, weight_decay=0.1)
    for step in range(6):
        if step == 3:  # a resumed run: fresh optimizer objects loading the saved state
            saved = opt_mine.state_dict()
            opt_mine = make_adam(mine, lr=0.01, eps=1e-5, weight_decay=0.1)
            opt_mine.load_state_dict(saved)
        for opt in (opt_mine, opt_ref):
            opt.param_groups[0]["lr"] = 0.01 * (1 - step / 6)
        grads = [torch.randn(s) * (step + 1) for s in shapes]
        for p, q, g in zip(mine, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        adam_step(opt_mine)
        opt_ref.step()
        for p, q in zip(mine, ref):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt_mine.state[p][key], opt_ref.state[q][key]), key
    assert float(opt_mine.state[mine[0]]["step"]) == 6
