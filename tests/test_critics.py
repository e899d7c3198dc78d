"""The critic zoo: shapes, twin members in one call vs separate networks, reference forward passes,
the paper's sizes, and where SA-Hyper's / AS-Hyper's action gradients flow."""

import math

import pytest
import torch
from torch import nn

from aclab.nets.critics import (
    CRITIC_KINDS,
    D2RLCritic,
    HyperCritic,
    MLPCritic,
    count_parameters,
    make_critic,
)
from aclab.nets.hyper import dynamic_forward

OBS, ACT, N = 5, 3, 11
SMALL_OPTIONS = {
    "mlp": {}, "mlp_small": {}, "mlp_large": {"hidden_sizes": (40, 40)},
    "resnet_features": {"primary_widths": (16, 32)}, "res35": {"width": 16, "num_blocks": 3},
    "d2rl": {"hidden": 16}, "sa_hyper": {"primary_widths": (16, 32), "dynamic_hidden": (8,), "probe_size": 128},
    "as_hyper": {"primary_widths": (16, 32), "dynamic_hidden": (8,), "probe_size": 128},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("kind", CRITIC_KINDS)
def test_every_critic_evaluates_its_twins_in_one_call(kind):
    torch.manual_seed(0)
    critic = make_critic(kind, OBS, ACT, ensemble_size=2, **SMALL_OPTIONS[kind])
    obs, actions = torch.randn(N, OBS), torch.randn(N, ACT)
    q = critic(obs, actions)
    assert q.shape == (2, N)
    for k in range(2):
        torch.testing.assert_close(critic(obs, actions, member=k), q[k : k + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q[0], q[1])  # independently initialised members
    torch.testing.assert_close(critic.q_for_actor(obs, actions, member=0), q[:1], rtol=1e-5, atol=1e-6)
    q.sum().backward()
    assert all(p.grad is not None for p in critic.parameters())
    # a loss on member 1 only leaves member 0's slices untouched
    critic.zero_grad()
    critic(obs, actions)[1].sum().backward()
    for p in critic.parameters():
        assert p.grad[0].abs().sum() == 0 and p.grad[1].abs().sum() > 0


def test_mlp_critic_equals_separate_torch_networks():
    torch.manual_seed(1)
    critic = MLPCritic(OBS, ACT, (7, 6), ensemble_size=2)
    obs, actions = torch.randn(N, OBS), torch.randn(N, ACT)
    q = critic(obs, actions)
    for k in range(2):
        linears = [nn.Linear(layer.in_features, layer.out_features) for layer in critic.layers]
        with torch.no_grad():
            for linear, layer in zip(linears, critic.layers):
                linear.weight.copy_(layer.weight[k].T)
                linear.bias.copy_(layer.bias[k, 0])
        reference = nn.Sequential(linears[0], nn.ReLU(), linears[1], nn.ReLU(), linears[2])
        torch.testing.assert_close(q[k], reference(torch.cat([obs, actions], 1)).squeeze(-1))
    # nn.Linear's default initialisation bounds
    for layer in critic.layers:
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound


def test_d2rl_dense_connections():
    torch.manual_seed(2)
    critic = D2RLCritic(OBS, ACT, hidden=6, num_layers=4, ensemble_size=2)
    obs, actions = torch.randn(N, OBS), torch.randn(N, ACT)
    sa = torch.cat([obs, actions], 1)
    k = 1
    h = torch.relu(sa @ critic.first.weight[k] + critic.first.bias[k])
    for layer in critic.dense:
        assert layer.in_features == 6 + OBS + ACT
        h = torch.relu(torch.cat([h, sa], 1) @ layer.weight[k] + layer.bias[k])
    expected = (h @ critic.out.weight[k] + critic.out.bias[k]).squeeze(-1)
    torch.testing.assert_close(critic(obs, actions)[k], expected)
    assert len(critic.dense) == 3


def test_paper_sizes():
    """MLP-Large ~ the hypernetwork's parameter count (hypernetwork paper, Sec. 5.2: 9M), Res35 ~4.5M,
    ResNet-Features ~6.5M."""
    obs, act = 17, 6
    sizes = {kind: count_parameters(make_critic(kind, obs, act, ensemble_size=1))
             for kind in ("mlp", "mlp_small", "mlp_large", "res35", "d2rl")}
    assert sizes["mlp"] == (23 * 256 + 256) + (256 * 256 + 256) + 257
    assert sizes["mlp_small"] == 23 * 256 + 256 + 257
    assert 8.4e6 < sizes["mlp_large"] < 8.6e6
    assert 4.5e6 < sizes["res35"] < 4.7e6
    assert sizes["d2rl"] == (23 * 256 + 256) + 3 * ((256 + 23) * 256 + 256) + 257


def test_sa_hyper_action_gradient_flows_only_through_the_dynamic_network():
    """Hypernetwork paper, Eq. 14 / Figure 2c: grad_a Q = W1(s) diag((1 + g1) relu'(.)) W2(s) (1 + g2); the primary is a
    constant of the action."""
    torch.manual_seed(3)
    critic = HyperCritic(OBS, ACT, meta="state", ensemble_size=2, primary_widths=(16, 32), dynamic_hidden=(8,),
                         probe_size=128)
    obs = torch.randn(N, OBS)
    actions = torch.randn(N, ACT, requires_grad=True)
    q = critic.q_for_actor(obs, actions, member=0)
    grads = torch.autograd.grad(q.sum(), [actions, *critic.parameters()], allow_unused=True)
    grad_a, param_grads = grads[0], grads[1:]
    assert all(g is None for g in param_grads)  # nothing of the critic is differentiated for the actor
    # the full forward gives the same action gradient (primary included, but it does not depend on a)
    a2 = actions.detach().clone().requires_grad_(True)
    (grad_full,) = torch.autograd.grad(critic(obs, a2, member=0).sum(), a2)
    torch.testing.assert_close(grad_a, grad_full)
    # closed form
    layers = critic.net.dynamic_layers(obs, member=0)
    w1, b1, g1 = layers[0].weight[0], layers[0].bias[0], layers[0].gain[0]
    w2, g2 = layers[1].weight[0], layers[1].gain[0]
    pre = g1 * torch.einsum("ni,nio->no", actions.detach(), w1) + b1
    closed = torch.einsum("nio,no->ni", w1, g1 * (pre > 0).float() * w2[:, :, 0] * g2)
    torch.testing.assert_close(grad_a, closed.detach(), rtol=1e-5, atol=1e-6)


def test_as_hyper_action_gradient_goes_through_the_primary():
    torch.manual_seed(4)
    critic = HyperCritic(OBS, ACT, meta="action", ensemble_size=2, primary_widths=(16, 32), dynamic_hidden=(8,),
                         probe_size=128)
    obs = torch.randn(N, OBS)
    actions = torch.randn(N, ACT, requires_grad=True)
    q = critic.q_for_actor(obs, actions, member=0)
    first_primary = critic.net.primary.layers[0].weight
    grad_a, grad_primary = torch.autograd.grad(q.sum(), [actions, first_primary])
    assert grad_a.abs().sum() > 0 and grad_primary.abs().sum() > 0
    # with the primary's output frozen, the action would have no gradient at all
    with torch.no_grad():
        layers = critic.net.dynamic_layers(actions, member=0)
    frozen = dynamic_forward(layers, obs.expand(1, N, OBS))
    assert not frozen.requires_grad


def test_make_critic_rejects_unknown_kind_and_options():
    with pytest.raises(ValueError, match="unknown critic kind"):
        make_critic("transformer", 3, 1)
    with pytest.raises(TypeError):
        make_critic("mlp", 3, 1, widths=(4,))
