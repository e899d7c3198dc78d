"""Actor-critic assemblies: the fused MLP equals two separate MLPs; the NumPy mirror equals torch."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from aclab.core.distributions import make_distribution
from aclab.nets.agents import ActorCritic, FusedMLPActorCritic, make_actor_critic
from aclab.nets.numpy_policy import NumpyActorCritic

SPACES = [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,))]


def _copy_fused_into_separate(fused: FusedMLPActorCritic, separate: ActorCritic) -> None:
    policy_linears = [m for m in separate.policy_encoder.modules() if isinstance(m, torch.nn.Linear)]
    value_linears = [m for m in separate.value_encoder.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, (w, b) in enumerate(zip(fused.weights, fused.biases)):
            policy_linears[i].weight.copy_(w[0].T)
            policy_linears[i].bias.copy_(b[0, 0])
            value_linears[i].weight.copy_(w[1].T)
            value_linears[i].bias.copy_(b[1, 0])
        separate.policy_head.weight.copy_(fused.head_weight[0].T)
        separate.policy_head.bias.copy_(fused.head_bias[0, 0])
        separate.value_head.weight.copy_(fused.head_weight[1, :, :1].T)
        separate.value_head.bias.copy_(fused.head_bias[1, 0, :1])
        if not fused.discrete:
            separate.log_std.copy_(fused.log_std)


@pytest.mark.parametrize("space", SPACES, ids=["discrete", "box"])
def test_fused_equals_separate_networks_forward_and_gradients(space):
    torch.manual_seed(0)
    dist = make_distribution(space)
    fused = FusedMLPActorCritic(5, dist, hidden_sizes=(16, 8))
    separate = ActorCritic((5,), dist, hidden_sizes=(16, 8), shared=False)
    _copy_fused_into_separate(fused, separate)
    obs = torch.randn(7, 5)
    p1, v1 = fused(obs)
    p2, v2 = separate(obs)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(v1, v2)
    (p1.square().sum() + v1.sum()).backward()
    (p2.square().sum() + v2.sum()).backward()
    torch.testing.assert_close(fused.head_weight.grad[0].T, separate.policy_head.weight.grad)
    first_value_linear = next(m for m in separate.value_encoder.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(fused.weights[0].grad[1].T, first_value_linear.weight.grad)
    # the unused value-head columns never receive gradient
    assert torch.all(fused.head_weight.grad[1, :, 1:] == 0)


def test_fused_init_statistics_match_orthogonal_linear():
    torch.manual_seed(0)
    net = FusedMLPActorCritic(64, make_distribution(gym.spaces.Discrete(4)), hidden_sizes=(64, 64))
    for w in net.weights:
        for k in range(2):
            gram = w[k].T @ w[k]  # [out, out] = W W^T of the nn.Linear orientation
            torch.testing.assert_close(gram, 2.0 * torch.eye(64), atol=1e-4, rtol=1e-4)
    head = net.head_weight
    torch.testing.assert_close(head[0].T @ head[0], 0.01 ** 2 * torch.eye(4), atol=1e-6, rtol=1e-4)
    assert torch.isclose(head[1, :, 0].norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.all(net.biases[0] == 0)


def test_make_actor_critic_picks_fused_only_for_separate_mlps():
    dist = make_distribution(gym.spaces.Discrete(2))
    assert isinstance(make_actor_critic((4,), dist), FusedMLPActorCritic)
    assert isinstance(make_actor_critic((4,), dist, shared=True), ActorCritic)
    assert isinstance(make_actor_critic((3, 64, 64), dist, encoder="impala", shared=True), ActorCritic)


@pytest.mark.parametrize("space", SPACES, ids=["discrete", "box"])
def test_numpy_mirror_matches_torch(space):
    torch.manual_seed(1)
    dist = make_distribution(space)
    net = FusedMLPActorCritic(6, dist, hidden_sizes=(32, 32), log_std_init=-0.3)
    with torch.no_grad():  # make the heads non-trivial
        net.head_weight.mul_(50.0)
    mirror = NumpyActorCritic(net)
    obs = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    actions, log_probs, values, params = mirror.act(obs, np.random.default_rng(0))
    with torch.no_grad():
        t_params, t_values = net(torch.from_numpy(obs))
        t_log_probs = dist.log_prob(t_params, torch.from_numpy(actions))
    np.testing.assert_allclose(params, t_params.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(values, t_values.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(log_probs, t_log_probs.numpy(), rtol=1e-4, atol=1e-4)
    assert actions.dtype == (np.int64 if isinstance(space, gym.spaces.Discrete) else np.float32)
    # after a parameter change, sync() picks it up
    with torch.no_grad():
        net.biases[0].add_(1.0)
    mirror.sync()
    _, values2 = mirror.forward(obs)
    with torch.no_grad():
        np.testing.assert_allclose(values2, net(torch.from_numpy(obs))[1].numpy(), rtol=1e-4, atol=1e-5)


def test_numpy_categorical_sampling_frequencies():
    dist = make_distribution(gym.spaces.Discrete(3))
    net = FusedMLPActorCritic(2, dist, hidden_sizes=(4,))
    with torch.no_grad():
        net.head_weight.zero_()
        net.head_bias[0, 0].copy_(torch.tensor([0.0, 1.0, 2.0]))
    mirror = NumpyActorCritic(net)
    rng = np.random.default_rng(0)
    obs = np.zeros((20000, 2), dtype=np.float32)
    actions, log_probs, _, _ = mirror.act(obs, rng)
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    freq = np.bincount(actions, minlength=3) / len(actions)
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected * (1 - expected) / len(actions)))
    np.testing.assert_allclose(log_probs, np.log(expected)[actions], rtol=1e-5)


def test_numpy_gaussian_sampling_moments():
    dist = make_distribution(gym.spaces.Box(-1, 1, (2,)))
    net = FusedMLPActorCritic(2, dist, hidden_sizes=(4,), log_std_init=np.log(0.5))
    with torch.no_grad():
        net.head_weight.zero_()
        net.head_bias[0, 0].copy_(torch.tensor([1.0, -2.0]))
    mirror = NumpyActorCritic(net)
    actions, _, _, params = mirror.act(np.zeros((20000, 2), dtype=np.float32), np.random.default_rng(0))
    np.testing.assert_allclose(actions.mean(0), [1.0, -2.0], atol=5 * 0.5 / np.sqrt(20000))
    np.testing.assert_allclose(actions.std(0), [0.5, 0.5], rtol=0.03)
    np.testing.assert_allclose(params[0], [1.0, -2.0, np.log(0.5), np.log(0.5)], rtol=1e-6)
