"""Return and advantage estimators: discounted, n-step, TD(lambda), GAE, V-trace, leaky V-trace.

Pure torch functions; no ``nn.Module``, no environment knowledge.

Conventions shared by every function here
-----------------------------------------
* Time-major: ``rewards`` ``[T, B]``; ``values`` ``[T + 1, B]`` where row ``T`` is the bootstrap value
  of the observation that follows the last step.
* ``discounts`` ``[T, B]`` is ``gamma * (1 - terminated_t)``: zero where the episode *terminated* at
  step ``t``, ``gamma`` where it continues or was *truncated* (a truncated episode bootstraps).
* ``episode_ends`` ``[T, B]`` (optional, bool or float) is 1 where the episode ended at step ``t`` for
  any reason (terminated or truncated). It cuts the multi-step trace at ``t`` while the one-step
  bootstrap ``discounts_t * values_{t+1}`` stays. This matches next-step autoreset (EnvPool,
  Gymnasium 1.x): the step that ends an episode returns the true final observation, so
  ``values[t + 1]`` is V(final observation); the following transition is a reset dummy whose outputs
  here are meaningless and must be masked by the caller. With ``episode_ends=None`` the trace is cut
  only by zero discounts (the rlax convention).
* ``gamma`` (inside ``discounts``), ``lambda_`` and the leaky-V-trace ``alpha``s may be python floats or
  tensors (scalars or broadcastable to ``[T, B]``) that require grad: gradients flow into them, which
  STAC's meta-gradients need. **Nothing is detached here**: callers apply stop-gradients (for
  example to ``values`` and ``log_rhos``) themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Scalar = float | Tensor


class VTraceOutput(NamedTuple):
    """Outputs of :func:`vtrace` / :func:`leaky_vtrace`, each ``[T, B]``.

    vs: value targets ``v_s``. pg_advantages: ``rho_pg_s * (q_s - V(x_s))``. rhos: the (clipped or
    leaky) importance weights used in the TD errors. cs: the trace coefficients, lambda included.
    """

    vs: Tensor
    pg_advantages: Tensor
    rhos: Tensor
    cs: Tensor


def _not_ended(episode_ends: Tensor | None, like: Tensor) -> Tensor | float:
    """1 - episode_ends in ``like``'s dtype, or the float 1.0 when there are no episode ends."""
    if episode_ends is None:
        return 1.0
    return 1.0 - episode_ends.to(like.dtype)


def _check_shapes(rewards: Tensor, discounts: Tensor, values: Tensor | None = None) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be time-major [T, B], got shape {tuple(rewards.shape)}")
    if discounts.shape != rewards.shape:
        raise ValueError(f"discounts {tuple(discounts.shape)} must match rewards {tuple(rewards.shape)}")
    if values is not None and values.shape != (rewards.shape[0] + 1, rewards.shape[1]):
        expected = (rewards.shape[0] + 1, rewards.shape[1])
        raise ValueError(f"values must be [T + 1, B] = {expected}, got {tuple(values.shape)}")


def _backward_linear_recursion(offsets: Tensor, coefficients: Tensor, last: Tensor) -> Tensor:
    """Solve ``x_t = offsets_t + coefficients_t * x_{t+1}`` backwards from ``x_T = last``.

    offsets, coefficients: [T, B]; last: [B] (or broadcastable). Returns x_0..x_{T-1} as [T, B].
    Written without in-place writes so autograd can differentiate through every input.
    """
    coefficients = torch.broadcast_to(coefficients, offsets.shape)
    next_value = torch.broadcast_to(last, offsets.shape[1:]).to(offsets.dtype)
    outputs: list[Tensor] = [next_value] * offsets.shape[0]
    for t in range(offsets.shape[0] - 1, -1, -1):
        next_value = offsets[t] + coefficients[t] * next_value
        outputs[t] = next_value
    return torch.stack(outputs)


def discounted_returns(
    rewards: Tensor,
    discounts: Tensor,
    bootstrap_value: Tensor,
    episode_ends: Tensor | None = None,
    values: Tensor | None = None,
) -> Tensor:
    """Discounted (Monte-Carlo) returns ``G_t = r_t + discounts_t * G_{t+1}``, ``G_T = bootstrap_value``.

    Shapes: rewards, discounts, episode_ends [T, B]; bootstrap_value [B]; values [T + 1, B]; returns [T, B].

    ``episode_ends`` cuts the sum: where an episode ended at ``t``, ``G_t = r_t`` (the return of a
    truncated episode beyond ``t`` is unknown and no value is available) unless ``values`` is given,
    in which case ``G_t = r_t + discounts_t * values[t + 1]`` (bootstraps from V(final observation)
    after a truncation; after a termination ``discounts_t = 0`` and both forms give ``r_t``).
    Nothing is detached.
    """
    _check_shapes(rewards, discounts, values)
    not_ended = _not_ended(episode_ends, rewards)
    offsets = rewards
    if values is not None and episode_ends is not None:
        offsets = rewards + (1.0 - not_ended) * discounts * values[1:]
    return _backward_linear_recursion(offsets, discounts * not_ended, bootstrap_value)


def n_step_returns(
    rewards: Tensor,
    values: Tensor,
    discounts: Tensor,
    n: int,
    episode_ends: Tensor | None = None,
) -> Tensor:
    """n-step bootstrapped returns.

    ``G_t = sum_{k<m} (prod_{j<k} d_{t+j}) r_{t+k} + (prod_{j<m} d_{t+j}) V_{t+m}`` with
    ``m = min(n, T - t, first k with episode_ends_{t+k} = 1, plus one)``: the sum stops at the end of
    the trajectory (bootstrapping from ``values[T]``) and at an episode end (bootstrapping from
    ``discounts * values[t + k + 1]``, i.e. zero after a termination). Zero discounts cut the sum
    by themselves. Shapes: rewards, discounts, episode_ends [T, B]; values [T + 1, B]; returns [T, B].
    Vectorised over t and B; loops over k < min(n, T). Nothing is detached.
    """
    _check_shapes(rewards, discounts, values)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    horizon = rewards.shape[0]
    ended = torch.zeros_like(rewards) if episode_ends is None else episode_ends.to(rewards.dtype)
    # is_last_row[k][t] = 1 where t + k == T - 1 (the trajectory ends after this step).
    positions = torch.arange(horizon, device=rewards.device)
    returns = torch.zeros_like(rewards)
    discount_product = torch.ones_like(rewards)
    still_summing = torch.ones_like(rewards)
    for k in range(min(n, horizon)):
        # Rows t + k for t in [0, T - k); rows past the end are padded and masked by `still_summing`.
        pad = rewards.new_zeros((k, rewards.shape[1]))
        reward_k = torch.cat([rewards[k:], pad])
        discount_k = torch.cat([discounts[k:], pad])
        ended_k = torch.cat([ended[k:], pad])
        next_value_k = torch.cat([values[k + 1 :], pad])
        returns = returns + still_summing * discount_product * reward_k
        discount_product = discount_product * discount_k
        at_trajectory_end = (positions + k == horizon - 1).to(rewards.dtype).unsqueeze(-1)
        stop_here = still_summing * torch.clamp(ended_k + at_trajectory_end + float(k == n - 1), max=1.0)
        returns = returns + stop_here * discount_product * next_value_k
        still_summing = still_summing - stop_here
    return returns


def td_lambda_returns(
    rewards: Tensor,
    values: Tensor,
    discounts: Tensor,
    lambda_: Scalar,
    episode_ends: Tensor | None = None,
) -> Tensor:
    """TD(lambda) (lambda-) returns.

    ``G_t = r_t + d_t * ((1 - lambda) V_{t+1} + lambda G_{t+1})`` with ``G_T := V_T``; where the episode
    ended at ``t``: ``G_t = r_t + d_t V_{t+1}``. Shapes: rewards, discounts, episode_ends [T, B];
    values [T + 1, B]; lambda_ float or tensor broadcastable to [T, B]; returns [T, B].
    Identity (DNA paper, Appendix E): ``gae(...) == td_lambda_returns(...) - values[:-1]``.
    Nothing is detached.
    """
    _check_shapes(rewards, discounts, values)
    trace = lambda_ * _not_ended(episode_ends, rewards)
    offsets = rewards + discounts * (1.0 - trace) * values[1:]
    return _backward_linear_recursion(offsets, discounts * trace, values[-1])


def gae(
    rewards: Tensor,
    values: Tensor,
    discounts: Tensor,
    lambda_: Scalar,
    episode_ends: Tensor | None = None,
) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016).

    ``delta_t = r_t + d_t V_{t+1} - V_t``; ``A_t = delta_t + d_t * lambda * (1 - end_t) * A_{t+1}``,
    ``A_T = 0``. Shapes: rewards, discounts, episode_ends [T, B]; values [T + 1, B]; lambda_ float or
    tensor broadcastable to [T, B]; returns advantages [T, B]. Nothing is detached.
    """
    _check_shapes(rewards, discounts, values)
    deltas = rewards + discounts * values[1:] - values[:-1]
    coefficients = discounts * lambda_ * _not_ended(episode_ends, rewards)
    return _backward_linear_recursion(deltas, coefficients, torch.zeros_like(values[-1]))


def _leaky_clip(importance_weights: Tensor, clip: float, alpha: Scalar) -> Tensor:
    """``alpha * min(clip, IS) + (1 - alpha) * IS`` (STAC Eq. 5); alpha = 1 is the V-trace clip."""
    return alpha * torch.clamp(importance_weights, max=clip) + (1.0 - alpha) * importance_weights


def leaky_vtrace(
    log_rhos: Tensor,
    rewards: Tensor,
    values: Tensor,
    discounts: Tensor,
    lambda_: Scalar = 1.0,
    alpha_rho: Scalar = 1.0,
    alpha_c: Scalar = 1.0,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    rho_bar_pg: float = 1.0,
    episode_ends: Tensor | None = None,
    pg_lambda_mix: bool = False,
) -> VTraceOutput:
    """Leaky V-trace targets and policy-gradient advantages (STAC Eq. 5, Algorithm 1 lines 2-16).

    With ``IS_s = exp(log_rhos_s)``:
    ``rho_s = alpha_rho * min(rho_bar, IS_s) + (1 - alpha_rho) * IS_s``,
    ``c_s = lambda * (alpha_c * min(c_bar, IS_s) + (1 - alpha_c) * IS_s)``,
    ``delta_s = rho_s (r_s + d_s V_{s+1} - V_s)``, ``e_s = delta_s + d_s c_s (1 - end_s) e_{s+1}``
    (``e_T = 0``), ``vs = V + e``; equivalently the sum form
    ``v_s = V_s + sum_{t>=s} (prod_{s<=i<t} d_i c_i) delta_t``.

    Policy-gradient advantage (Algorithm 1 line 20/22): ``rho_pg_s * (q_s - V_s)`` with
    ``rho_pg_s = alpha_rho * min(rho_bar_pg, IS_s) + (1 - alpha_rho) * IS_s`` and, by default (the
    paper's form), ``q_s = r_s + d_s vs_{s+1}``. ``pg_lambda_mix=True`` uses rlax's
    ``q_s = r_s + d_s (lambda vs_{s+1} + (1 - lambda) V_{s+1})`` instead. ``vs_T := V_T`` (bootstrap), and
    where the episode ended at ``s`` the next row belongs to another episode, so ``V_{s+1}`` (the value
    of the final observation) replaces ``vs_{s+1}``.

    alpha_rho = alpha_c = 1 is V-trace (Eq. 2); 0 is full importance sampling. Theorem 1 (contraction
    to the value of ``pi_{rho_bar, alpha_rho}``) is stated for ``alpha_rho >= alpha_c`` and
    ``rho_bar >= c_bar``, but its proof needs the leaky ``rho_t >= c_t``, and
    ``rho_t - c_t = alpha_c (IS_t - c_bar)^+ - alpha_rho (IS_t - rho_bar)^+`` (lambda aside) is non-negative for
    every ratio only when ``alpha_rho <= alpha_c``: the condition runs the other way.
    ``tests/test_returns.py`` checks the contraction and the fixed point for ``alpha_rho <= alpha_c`` (STAC's
    single ``alpha`` included) and exhibits a contraction failure with ``alpha_rho = 1 > alpha_c = 0``.

    Shapes: log_rhos (= log pi - log mu), rewards, discounts, episode_ends [T, B]; values [T + 1, B];
    lambda_, alpha_rho, alpha_c floats or tensors broadcastable to [T, B]. Nothing is detached: the
    paper stops gradients of the importance ratios and values (callers pass ``log_rhos.detach()``,
    ``values.detach()``) while gamma, lambda and alpha stay live for STAC's meta-gradient.
    """
    _check_shapes(rewards, discounts, values)
    if log_rhos.shape != rewards.shape:
        raise ValueError(f"log_rhos {tuple(log_rhos.shape)} must match rewards {tuple(rewards.shape)}")
    importance_weights = torch.exp(log_rhos)
    rhos = _leaky_clip(importance_weights, rho_bar, alpha_rho)
    cs = lambda_ * _leaky_clip(importance_weights, c_bar, alpha_c)
    rhos = torch.broadcast_to(rhos, rewards.shape)
    cs = torch.broadcast_to(cs, rewards.shape)
    not_ended = _not_ended(episode_ends, rewards)

    next_values = values[1:]
    deltas = rhos * (rewards + discounts * next_values - values[:-1])
    errors = _backward_linear_recursion(deltas, discounts * cs * not_ended, torch.zeros_like(values[-1]))
    vs = values[:-1] + errors

    vs_next = torch.cat([vs[1:], values[-1:]])
    if episode_ends is not None:
        vs_next = torch.where(episode_ends.bool(), next_values, vs_next)
    if pg_lambda_mix:
        vs_next = lambda_ * vs_next + (1.0 - lambda_) * next_values
    rhos_pg = _leaky_clip(importance_weights, rho_bar_pg, alpha_rho)
    pg_advantages = rhos_pg * (rewards + discounts * vs_next - values[:-1])
    return VTraceOutput(vs=vs, pg_advantages=pg_advantages, rhos=rhos, cs=cs)


def vtrace(
    log_rhos: Tensor,
    rewards: Tensor,
    values: Tensor,
    discounts: Tensor,
    lambda_: Scalar = 1.0,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    rho_bar_pg: float = 1.0,
    episode_ends: Tensor | None = None,
    pg_lambda_mix: bool = False,
) -> VTraceOutput:
    """V-trace (IMPALA; STAC Eq. 2): :func:`leaky_vtrace` with ``alpha_rho = alpha_c = 1``.

    ``rho_s = min(rho_bar, IS_s)``, ``c_s = lambda * min(c_bar, IS_s)``; see :func:`leaky_vtrace` for
    the recursion, the policy-gradient advantage, shapes and the (absent) stop-gradients.
    """
    return leaky_vtrace(
        log_rhos,
        rewards,
        values,
        discounts,
        lambda_=lambda_,
        alpha_rho=1.0,
        alpha_c=1.0,
        rho_bar=rho_bar,
        c_bar=c_bar,
        rho_bar_pg=rho_bar_pg,
        episode_ends=episode_ends,
        pg_lambda_mix=pg_lambda_mix,
    )
