"""A third action distribution with an exact KL: the Beta policy on a bounded box (Chou et al. 2017).

FixPO's trust region works for any distribution whose per-state KL is exact (FixPO seed, "More
Policy Architectures"); this module adds one beyond the categorical and diagonal Gaussian of
:mod:`aclab.core.distributions`, with the same single-tensor convention:

* ``params = cat([raw_alpha, raw_beta], -1)`` ``[..., 2D]``; the concentrations are
  ``alpha = c_min + softplus(raw_alpha)``, ``beta = c_min + softplus(raw_beta)`` (``c_min = 1`` by
  default: unimodal densities, Chou et al.'s choice).
* Actions live on the box ``[low, high]`` ``[..., D]``: ``a = low + (high - low) x`` with
  ``x ~ Beta(alpha, beta)`` per dimension, independent across dimensions. The affine map keeps the
  KL unchanged and adds ``sum_d log(high_d - low_d)`` to the entropy and subtracts it from the
  log density.

Exact formulas (``B`` the Beta function, ``psi`` the digamma function), per dimension, summed:

* ``log p(x) = (alpha - 1) log x + (beta - 1) log(1 - x) - log B(alpha, beta)``
* ``H = log B(alpha, beta) - (alpha - 1) psi(alpha) - (beta - 1) psi(beta) + (alpha + beta - 2) psi(alpha + beta)``
* ``KL(p || q) = log B(a_q, b_q) - log B(a_p, b_p) + (a_p - a_q) psi(a_p) + (b_p - b_q) psi(b_p)
  + (a_q - a_p + b_q - b_p) psi(a_p + b_p)``

Sampling draws two Gamma variates with Marsaglia & Tsang's (2000) rejection method driven by a
``torch.Generator`` (reproducible; ``torch._standard_gamma`` cannot take one) and returns
``G_a / (G_a + G_b)``. Samples are not reparameterised (on-policy methods do not need it).
"""

from __future__ import annotations

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Beta",
    "beta_concentrations",
    "beta_entropy",
    "beta_kl",
    "beta_log_prob",
    "beta_mode",
    "beta_sample_unit",
    "gamma_sample",
    "make_extra_distribution",
]


def beta_concentrations(params: Tensor, min_concentration: float = 1.0) -> tuple[Tensor, Tensor]:
    """``[..., 2D]`` params -> ``(alpha, beta)``, each ``[..., D]``, both ``> min_concentration``."""
    if params.shape[-1] % 2:
        raise ValueError(f"Beta params need an even last dimension [raw_alpha, raw_beta], got {params.shape}")
    raw_alpha, raw_beta = params.chunk(2, dim=-1)
    return min_concentration + F.softplus(raw_alpha), min_concentration + F.softplus(raw_beta)


def _log_beta_function(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)


def _unit_clamp(x: Tensor) -> Tensor:
    """Keep ``x`` strictly inside (0, 1) in its dtype so that both logs stay finite."""
    eps = torch.finfo(x.dtype).eps
    return x.clamp(eps, 1.0 - eps)


def beta_log_prob(alpha: Tensor, beta: Tensor, x: Tensor) -> Tensor:
    """log density ``[...]`` of ``x`` ``[..., D]`` in (0, 1), summed over the last dimension."""
    x = _unit_clamp(x)
    per_dim = (alpha - 1.0) * torch.log(x) + (beta - 1.0) * torch.log1p(-x) - _log_beta_function(alpha, beta)
    return per_dim.sum(-1)


def beta_entropy(alpha: Tensor, beta: Tensor) -> Tensor:
    """Differential entropy ``[...]`` on (0, 1), summed over the last dimension."""
    total = alpha + beta
    per_dim = (
        _log_beta_function(alpha, beta)
        - (alpha - 1.0) * torch.digamma(alpha)
        - (beta - 1.0) * torch.digamma(beta)
        + (total - 2.0) * torch.digamma(total)
    )
    return per_dim.sum(-1)


def beta_kl(p_alpha: Tensor, p_beta: Tensor, q_alpha: Tensor, q_beta: Tensor) -> Tensor:
    """Exact ``KL(p || q)`` ``[...]`` between products of Betas, summed over the last dimension."""
    p_total = p_alpha + p_beta
    per_dim = (
        _log_beta_function(q_alpha, q_beta)
        - _log_beta_function(p_alpha, p_beta)
        + (p_alpha - q_alpha) * torch.digamma(p_alpha)
        + (p_beta - q_beta) * torch.digamma(p_beta)
        + (q_alpha - p_alpha + q_beta - p_beta) * torch.digamma(p_total)
    )
    return per_dim.sum(-1)


def beta_mode(alpha: Tensor, beta: Tensor) -> Tensor:
    """``(alpha - 1) / (alpha + beta - 2)`` where both exceed 1 (a unique interior mode), else the mean."""
    interior = (alpha > 1.0) & (beta > 1.0)
    mode = (alpha - 1.0) / (alpha + beta - 2.0).clamp_min(torch.finfo(alpha.dtype).tiny)
    return torch.where(interior, mode, alpha / (alpha + beta))


def gamma_sample(concentration: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gamma(concentration, 1) samples of ``concentration``'s shape (Marsaglia & Tsang 2000).

    For ``k >= 1``: ``d = k - 1/3``, ``c = 1 / sqrt(9 d)``; draw ``z ~ N(0, 1)``, ``u ~ U(0, 1)``,
    ``v = (1 + c z)^3``; accept ``d v`` when ``v > 0`` and ``log u < z^2 / 2 + d - d v + d log v``.
    For ``k < 1`` the sample of ``k + 1`` is multiplied by ``u^(1/k)``. Vectorised: all pending
    elements draw together until every one is accepted (acceptance >= 95% per round). Computed in
    float64, returned in ``concentration``'s dtype. Not differentiable.
    """
    k = concentration.detach().to(torch.float64)
    boosted = k < 1.0
    k_eff = torch.where(boosted, k + 1.0, k)
    d = k_eff - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    result = torch.zeros_like(k)
    pending = torch.ones_like(k, dtype=torch.bool)
    while bool(pending.any()):
        z = torch.randn(k.shape, generator=generator, device=k.device, dtype=k.dtype)
        u = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
        v = (1.0 + c * z) ** 3
        safe_v = v.clamp_min(torch.finfo(k.dtype).tiny)
        accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * safe_v + d * torch.log(safe_v))
        newly = pending & accept
        result = torch.where(newly, d * safe_v, result)
        pending = pending & ~accept
    if bool(boosted.any()):
        u = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
        result = torch.where(boosted, result * u.pow(1.0 / k), result)
    return result.to(concentration.dtype)


def beta_sample_unit(alpha: Tensor, beta: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Samples in (0, 1) ``[..., D]`` as ``G_a / (G_a + G_b)`` with Gamma variates, clamped inside."""
    g_alpha = gamma_sample(alpha.to(torch.float64), generator)
    g_beta = gamma_sample(beta.to(torch.float64), generator)
    return _unit_clamp((g_alpha / (g_alpha + g_beta)).to(alpha.dtype))


class Beta:
    """Independent Betas rescaled to the box ``[low, high]`` ``[D]``; params ``[..., 2D]`` (see module doc).

    Same interface as the adapters of :mod:`aclab.core.distributions` (``param_dim``,
    ``action_shape``, ``sample``, ``log_prob``, ``entropy``, ``kl``, ``mode``). ``low``/``high`` must
    be finite.
    """

    def __init__(self, action_dim: int, low=-1.0, high=1.0, min_concentration: float = 1.0) -> None:
        self.action_dim = int(action_dim)
        low_np = np.broadcast_to(np.asarray(low, dtype=np.float64), (self.action_dim,)).copy()
        high_np = np.broadcast_to(np.asarray(high, dtype=np.float64), (self.action_dim,)).copy()
        if not (np.isfinite(low_np).all() and np.isfinite(high_np).all() and (high_np > low_np).all()):
            raise ValueError(f"Beta needs finite bounds with high > low, got low={low_np}, high={high_np}")
        self.min_concentration = float(min_concentration)
        self._low = torch.as_tensor(low_np, dtype=torch.float32)
        self._scale = torch.as_tensor(high_np - low_np, dtype=torch.float32)
        self._log_volume = float(np.log(high_np - low_np).sum())

    @property
    def param_dim(self) -> int:
        return 2 * self.action_dim

    @property
    def action_shape(self) -> tuple[int, ...]:
        return (self.action_dim,)

    def _bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._low.to(like.device, like.dtype), self._scale.to(like.device, like.dtype)

    def concentrations(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return beta_concentrations(params, self.min_concentration)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        low, scale = self._bounds(params)
        return low + scale * beta_sample_unit(*self.concentrations(params), generator)

    def log_prob(self, params: Tensor, actions: Tensor) -> Tensor:
        low, scale = self._bounds(params)
        return beta_log_prob(*self.concentrations(params), (actions - low) / scale) - self._log_volume

    def entropy(self, params: Tensor) -> Tensor:
        return beta_entropy(*self.concentrations(params)) + self._log_volume

    def kl(self, p_params: Tensor, q_params: Tensor) -> Tensor:
        return beta_kl(*self.concentrations(p_params), *self.concentrations(q_params))

    def mode(self, params: Tensor) -> Tensor:
        low, scale = self._bounds(params)
        return low + scale * beta_mode(*self.concentrations(params))

    def __repr__(self) -> str:
        return f"Beta(action_dim={self.action_dim}, min_concentration={self.min_concentration})"


def make_extra_distribution(action_space: gymnasium.spaces.Space, kind: str) -> Beta:
    """``kind="beta"``: a :class:`Beta` on a 1-D Box with finite bounds; anything else raises ValueError."""
    if kind != "beta":
        raise ValueError(f"unknown extra distribution kind {kind!r}; expected 'beta'")
    if not isinstance(action_space, gymnasium.spaces.Box) or len(action_space.shape) != 1:
        raise ValueError(f"the Beta policy needs a 1-D Box action space, got {action_space!r}")
    return Beta(int(action_space.shape[0]), action_space.low, action_space.high)
