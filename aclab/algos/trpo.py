"""Trust-region policy optimisation pieces (Schulman et al. 2015, TRPO, Section 6 and Appendix C):
conjugate gradient, Fisher-vector products of a mean-KL function, and the backtracking line search.

The natural-gradient step for ``min_theta L(theta)`` subject to ``KL(theta_old, theta) <= delta``:

    g = grad L(theta_old),  F = Hessian of the mean KL at theta_old (the Fisher information)
    x ~= F^{-1} g   (``cg_iterations`` steps of conjugate gradient on ``(F + damping I) x = g``)
    full step  s = sqrt(2 delta / (x^T F x)) x   (so that the quadratic KL model 1/2 s^T F s = delta)
    theta = theta_old - frac * s, frac = 1, r, r^2, ... until L decreased and KL <= delta
    (TRPO Appendix C; the MAML code's acceptance test); no acceptable step -> theta_old.

Pure functions over lists of parameter tensors; the caller supplies closures that evaluate its loss
and KL at the parameters' *current* values (MAML's closures include the inner adaptation step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector ``[sum numel]``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (views of ``vector``)."""
    out, start = [], 0
    for t in like:
        out.append(vector[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def flat_grad(output: Tensor, params: Sequence[Tensor], **kwargs) -> Tensor:
    """``d output / d params`` as one flat vector (zeros for parameters ``output`` does not use)."""
    grads = torch.autograd.grad(output, list(params), allow_unused=True, **kwargs)
    return flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given only ``matvec(v) = A v``
    (Hestenes-Stiefel; TRPO Appendix C). Starts at ``x = 0``; stops after ``iterations`` steps or when
    ``r^T r < residual_tol``. Exact after ``dim`` iterations in exact arithmetic."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(iterations):
        if float(rr) < residual_tol:
            break
        ap = matvec(p)
        alpha = rr / torch.dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product_fn(kl_fn: Callable[[], Tensor], params: Sequence[Tensor], damping: float = 0.0
                             ) -> Callable[[Tensor], Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of ``kl_fn()`` w.r.t. ``params`` (Pearlmutter's
    trick: the gradient of ``grad(KL) . v``). At ``theta_old`` (KL = 0, minimal) ``H`` is the Fisher
    information matrix of the policy. The first-order graph is built once and reused by every product."""
    params = list(params)
    grad_kl = flat_grad(kl_fn(), params, create_graph=True)

    def product(vector: Tensor) -> Tensor:
        hv = flat_grad(torch.dot(grad_kl, vector.detach()), params, retain_graph=True)
        return hv + damping * vector

    return product


@dataclass
class TRPOStats:
    """What one :func:`trpo_step` did: the surrogate before/after, the mean KL of the accepted step,
    the accepted fraction of the full step (0 when rejected), the number of backtracking steps, and
    the improvement the linear model predicted for the full step."""

    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float
    backtracks: int
    expected_improvement: float
    step_norm: float

    @property
    def accepted(self) -> bool:
        return self.step_fraction > 0.0

    def metrics(self, prefix: str = "trpo/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


def trpo_step(params: Sequence[Tensor], loss_and_kl: Callable[[], tuple[Tensor, Tensor]],
              kl_fn: Callable[[], Tensor] | None = None, *, max_kl: float = 0.01, cg_iterations: int = 10,
              cg_damping: float = 1e-5, backtrack_ratio: float = 0.8, max_backtracks: int = 15) -> TRPOStats:
    """One TRPO update of ``params`` in place (see the module docstring).

    Args:
        params: leaf tensors with ``requires_grad`` (updated in place).
        loss_and_kl: evaluates ``(surrogate loss to minimise, mean KL(pi_old || pi_current))`` at the
            current values of ``params``; it must be differentiable in ``params``.
        kl_fn: the KL for the Fisher matrix (default: ``loss_and_kl()[1]``).
    """
    params = list(params)
    kl_fn = kl_fn or (lambda: loss_and_kl()[1])
    loss, _ = loss_and_kl()
    loss_before = float(loss.detach())
    gradient = flat_grad(loss, params)
    fvp = fisher_vector_product_fn(kl_fn, params, cg_damping)
    direction = conjugate_gradient(fvp, gradient, cg_iterations)
    shs = 0.5 * float(torch.dot(direction, fvp(direction)))
    old = [p.detach().clone() for p in params]
    if not math.isfinite(shs) or shs <= 0.0:
        return TRPOStats(loss_before, loss_before, 0.0, 0.0, 0, 0.0, 0.0)
    full_step = direction * math.sqrt(max_kl / shs)
    expected = float(torch.dot(gradient, full_step))
    steps = unflatten(full_step, params)
    fraction = 1.0
    for backtrack in range(max_backtracks):
        with torch.no_grad():
            for p, p0, s in zip(params, old, steps):
                p.copy_(p0 - fraction * s)
        with torch.no_grad():  # values only (torch.func.grad inside the closure still works)
            new_loss, kl = loss_and_kl()
        new_loss, kl = float(new_loss), float(kl)
        if new_loss < loss_before and kl <= max_kl and math.isfinite(new_loss):
            return TRPOStats(loss_before, new_loss, kl, fraction, backtrack, expected, float(full_step.norm()))
        fraction *= backtrack_ratio
    with torch.no_grad():
        for p, p0 in zip(params, old):
            p.copy_(p0)
    return TRPOStats(loss_before, loss_before, 0.0, 0.0, max_backtracks, expected, float(full_step.norm()))
