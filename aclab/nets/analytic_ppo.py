"""PPO's minibatch loss and its gradient in closed form for :class:`FusedMLPActorCritic` (no autograd).

On CPU a PPO minibatch of CartPole or MuJoCo on two 64-unit MLPs is bound by per-operation overhead:
autograd records ~30 graph nodes in the forward pass and the engine walks them back, which costs more
than the arithmetic. This module computes the same loss and writes the same gradients into ``p.grad``
with a few dozen plain tensor operations and no graph: the loss's derivative with respect to the network outputs
in closed form, then the backward pass of the fused MLP by hand (one ``bmm`` per weight gradient and
per hidden-layer input gradient). :class:`aclab.algos.ppo.PPO` uses it where it applies
(``params.gradients``: ``"auto"`` picks it on CPU for a fused MLP in one process); the tests compare
every gradient with autograd's on the loss written with :mod:`aclab.core.losses`.

Loss (Schulman et al. 2017, Eq. 9 with the signs of a loss to minimise), over a minibatch of N items:

* ``L = L_clip + c_v L_V - c_e H`` with ``L_clip = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A))``,
  ``r = exp(log pi(a) - log pi_old(a))``;
* ``L_V = 0.5 mean((V - R)^2)``, or with value clipping ``0.5 mean(max((V - R)^2, (V_clip - R)^2))``,
  ``V_clip = V_old + clip(V - V_old, -c, c)``;
* ``H`` the mean entropy of the policy.

Derivatives with respect to the network outputs (per item, before the ``1 / N`` of the means):

* ``dL_clip / d log pi(a) = -A r`` where ``r A <= clip(r) A`` (the unclipped term is the minimum), else 0;
* categorical logits z: ``d log pi(a) / dz = onehot(a) - softmax(z)``, ``dH / dz = -p (log p + H)``;
* diagonal Gaussian (mean mu, state-independent log sigma): ``d log pi / d mu = (a - mu) / sigma^2``,
  ``d log pi / d log sigma = ((a - mu) / sigma)^2 - 1``, ``dH / d log sigma = 1``;
* ``dL_V / dV = V - R``; clipped: the derivative of whichever square is larger (``V_clip - R`` times
  ``1[|V - V_old| <= c]`` for the clipped one), half of each where the two are equal (as autograd's
  ``maximum``), likewise for the ``minimum`` of the surrogate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aclab.core.distributions import _LOG_SQRT_2PI, Categorical, DiagGaussian
from aclab.nets.agents import FusedMLPActorCritic


def supports(net) -> bool:
    """Whether :func:`ppo_loss_and_grads` handles ``net``: a fused MLP (tanh or ReLU layers, a Gaussian's log
    std state-independent) with a categorical or diagonal Gaussian policy (not the tanh-squashed one)."""
    return isinstance(net, FusedMLPActorCritic) and type(net.dist) in (Categorical, DiagGaussian)


@torch.no_grad()
def ppo_loss_and_grads(
    net: FusedMLPActorCritic,
    obs: Tensor,
    actions: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    returns: Tensor,
    old_values: Tensor,
    *,
    clip_coef: float,
    value_clip: float | None,
    vf_coef: float,
    ent_coef: float,
) -> Tensor:
    """PPO's loss on one minibatch; sets ``p.grad`` of every parameter of ``net`` to ``dL/dp``.

    Shapes: obs [N, D]; actions [N] int64 (categorical) or [N, A] float (Gaussian); old_log_probs,
    advantages (already normalised if the caller normalises), returns, old_values [N].
    Returns the statistics ``[pg_loss, v_loss, entropy, approx_kl, clip_fraction]`` (a [5] tensor), the
    values :func:`aclab.core.losses.clipped_surrogate_loss`, :func:`aclab.core.losses.value_loss` and the
    distribution's mean entropy give; the loss is ``pg_loss + vf_coef * v_loss - ent_coef * entropy``.
    Every step is one tensor operation where one suffices: at this size each costs a few microseconds.
    """
    n = obs.shape[0]
    # ---- forward pass, keeping every layer's output (index 0: policy MLP, 1: value MLP)
    tanh = net.activation_name == "tanh"
    hiddens = net.layer_outputs(obs)
    out = torch.baddbmm(net.head_bias, hiddens[-1], net.head_weight)  # [2, N, P']
    head, values = out[0], out[1, :, 0]

    # ---- log pi(a) [N] and the mean entropy
    if net.discrete:
        log_p = torch.log_softmax(head, dim=-1)  # [N, A]
        probs = log_p.exp()
        log_probs = log_p.gather(1, actions.unsqueeze(1)).squeeze(1)
        neg_entropy_items = (probs * log_p).sum(-1)  # -H per item
        entropy = -neg_entropy_items.mean()
    else:
        log_std = net.log_std  # [A]
        inv_std = torch.exp(-log_std)
        z = (actions - head) * inv_std  # [N, A]
        z_squared = z * z
        log_std_sum = log_std.sum()
        log_probs = (z_squared.sum(-1) * -0.5).sub_(log_std_sum + log_std.numel() * _LOG_SQRT_2PI)
        entropy = log_std_sum + log_std.numel() * (0.5 + _LOG_SQRT_2PI)

    # ---- clipped surrogate: loss, and g = -n dL_clip/d log pi(a) = A r where the unclipped term is the minimum
    # (r A <= clip(r) A; where the two are equal inside the clip range autograd's minimum gives half to each
    # branch, which adds up to the same A r; outside it they are equal only when A = 0)
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef).mul_(advantages)
    pg_loss = -torch.minimum(unclipped, clipped).mean()
    g = torch.where(unclipped <= clipped, unclipped, 0.0)  # [N]

    # ---- value loss and d_v = n dL_V/dV
    error = values - returns
    squared = error.square()
    if value_clip is None:
        v_loss = squared.mean() * 0.5
        d_v = error
    else:
        delta = values - old_values
        clipped_error = delta.clamp(-value_clip, value_clip).add_(old_values).sub_(returns)
        clipped_squared = clipped_error.square()
        v_loss = torch.maximum(squared, clipped_squared).mean() * 0.5
        clipped_grad = torch.where(delta.abs() <= value_clip, clipped_error, 0.0)  # zero where the clip binds
        # the larger square's derivative; half of each where they are equal (autograd's maximum)
        d_v = torch.where(squared > clipped_squared, error,
                          torch.where(clipped_squared > squared, clipped_grad, (error + clipped_grad) * 0.5))

    # ---- dL/d(head output) [2, N, P']: slice 0 the policy head, slice 1 column 0 the value
    grad_out = torch.zeros_like(out)
    if net.discrete:
        # n dL/dz = -g (onehot(a) - p) - c_e n dH/dz,  n dH/dz = -p (log p + H) = -p (log p - neg_entropy)
        policy_grad = probs * g.unsqueeze(1)
        policy_grad.scatter_add_(1, actions.unsqueeze(1), -g.unsqueeze(1))  # g (p - onehot(a))
        entropy_grad = probs * (log_p - neg_entropy_items.unsqueeze(1))  # -n dH/dz
        torch.add(policy_grad, entropy_grad, alpha=ent_coef, out=grad_out[0]).div_(n)
    else:
        # n dL/d mu = -g z / sigma;  dL/d log sigma = -(1/n) sum_i g_i (z_i^2 - 1) - c_e
        torch.mul(z * inv_std, g.unsqueeze(1), out=grad_out[0]).div_(-n)
        log_std.grad = (torch.mv(z_squared.T, g) - g.sum()).div_(-n).sub_(ent_coef)
    torch.mul(d_v, vf_coef / n, out=grad_out[1, :, 0])

    # ---- backward through the fused MLP
    net.head_weight.grad = torch.bmm(hiddens[-1].transpose(1, 2), grad_out)
    net.head_bias.grad = grad_out.sum(1, keepdim=True)
    grad_h = torch.bmm(grad_out, net.head_weight.transpose(1, 2))
    for k in range(len(net.weights) - 1, -1, -1):
        h = hiddens[k + 1]
        grad_pre = torch.ops.aten.tanh_backward(grad_h, h) if tanh else torch.where(h > 0, grad_h, 0.0)
        net.weights[k].grad = torch.bmm(hiddens[k].transpose(1, 2), grad_pre)
        net.biases[k].grad = grad_pre.sum(1, keepdim=True)
        if k:
            grad_h = torch.bmm(grad_pre, net.weights[k].transpose(1, 2))

    approx_kl = ((ratio - 1.0) - log_ratio).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return torch.stack([pg_loss, v_loss, entropy, approx_kl, clip_fraction])
