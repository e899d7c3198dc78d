"""Loss terms shared by the policy-gradient algorithms (pure functions on tensors).

All inputs are flat minibatches [N]; every function returns a scalar (mean over N).
"""

from __future__ import annotations

import torch


def clipped_surrogate_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss (Schulman et al. 2017, Eq. 7).

    ``L = -mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with ``r = exp(log_probs - old_log_probs)``.
    Returns (loss, approx_kl, clip_fraction); approx_kl is the low-variance estimator
    ``mean((r - 1) - log r)`` of KL(old || new), both diagnostics without gradient.
    """
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return loss, approx_kl, clip_fraction


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_coef: float | None = None,
) -> torch.Tensor:
    """``0.5 * mean((V - R)^2)``, or PPO's clipped form when ``clip_coef`` is given:

    ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``.
    """
    squared = (values - returns).square()
    if clip_coef is None:
        return 0.5 * squared.mean()
    assert old_values is not None, "clipped value loss needs the rollout-time values"
    clipped_values = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
    return 0.5 * torch.maximum(squared, (clipped_values - returns).square()).mean()


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over all elements (unbiased std, as CleanRL and SB3)."""
    return (x - x.mean()) / (x.std() + eps)
