"""Stiffness of a value network between states (Fort et al. 2019, as used by DCPG, DCPG paper, Appendix A).

For states ``s_i`` with value targets ``y_i`` let ``g_i = d/dtheta 0.5 * (V_theta(s_i) - y_i)^2`` be the
per-sample gradient of the value loss over the selected parameters ``theta``. Two stiffness measures,
each averaged over all ordered pairs ``i != j`` (equivalently all unordered pairs ``i < j``):

* cosine stiffness ``mean_{i != j} cos(g_i, g_j)``, computed in O(N) memory and time from the unit
  vectors ``u_i = g_i / |g_i|``: ``sum_{i != j} u_i . u_j = |sum_i u_i|^2 - N``, so the mean is
  ``(|sum_i u_i|^2 - N) / (N (N - 1))``;
* sign stiffness ``mean_{i != j} sign(g_i . g_j)``, which needs the pairwise products: computed exactly
  from Gram blocks, or estimated on a random subset of the states (all pairs inside the subset).

These are the paper's quantity: Appendix A takes "the individual gradient of the value objective for
each state". Each such gradient is ``g_i = r_i grad V(s_i)`` with the residual ``r_i = V(s_i) - y_i``, so
``cos(g_i, g_j) = sign(r_i r_j) cos(grad V(s_i), grad V(s_j))``: the residual signs alone move it (a critic
that lags behind its targets everywhere has residuals of one sign and looks stiff, one whose residuals
are balanced looks unstiff, whatever its gradients). The **sign-free variant** measures the same two
statistics on ``grad V(s_i)`` itself (``cosine_grad_v``, ``sign_grad_v``): how much an update on one
state moves the value of another, without the residuals. Both come from one per-sample pass over
``grad V`` (with the default half-squared-error loss the loss gradients are ``sign(r_i) grad V`` up to a
positive factor, which neither statistic sees).

States whose gradient is exactly zero (``V(s_i) == y_i``, or every unit dead) have no direction: they
are left out of the cosine mean (``N`` counts only the non-zero gradients) and reported in
``num_zero_gradients``; in the sign mean they count with ``sign(0) = 0``, as the definition gives.

Per-sample gradients use ``torch.func`` (``functional_call`` + ``vmap(grad)``) over chunks of
``chunk_size`` states, so memory is ``O(chunk_size * P)`` for the cosine and
``O((sign_block_size + chunk_size) * P)`` for the exact sign (``P`` = number of selected parameters).
The module must work on a single state batch ``[1, ...]`` (no batch-statistics layers in train mode).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
ParamSelection = Mapping[str, Tensor] | Sequence[str] | None
_SIGN_METHODS = ("exact", "subset", "off")


class StiffnessResult(NamedTuple):
    """Mean pairwise stiffness over ``num_states`` states.

    cosine: mean over pairs of ``cos(g_i, g_j)`` of the value-loss gradients (pairs of non-zero
    gradients; the paper's quantity). sign: mean over pairs of ``sign(g_i . g_j)`` (``nan`` when
    ``sign_method == "off"``). sign_method: ``"exact"`` (all pairs), ``"subset"`` (all pairs of a uniformly
    random subset of states) or ``"off"``. num_sign_pairs: unordered pairs behind ``sign``.
    num_zero_gradients: states left out of the cosine mean. cosine_grad_v, sign_grad_v,
    num_zero_grad_v: the same on ``grad V(s_i)`` (the sign-free variant; ``nan`` / -1 with a custom
    per-sample loss).
    """

    cosine: float
    sign: float
    num_states: int
    sign_method: str
    num_sign_pairs: int
    num_zero_gradients: int
    cosine_grad_v: float = math.nan
    sign_grad_v: float = math.nan
    num_zero_grad_v: int = -1


def half_squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """The DCPG/PPG per-sample value loss ``0.5 * (V(s) - target)^2`` (scalars in, scalar out)."""
    return 0.5 * (prediction - target) ** 2


def _select_params(module: nn.Module, params: ParamSelection) -> dict[str, Tensor]:
    """Name -> detached tensor of the parameters to differentiate (all of the module's by default)."""
    named = dict(module.named_parameters())
    if params is None:
        selected = {name: p.detach() for name, p in named.items()}
    elif isinstance(params, Mapping):
        selected = {name: torch.as_tensor(value).detach() for name, value in params.items()}
    else:
        names = [params] if isinstance(params, str) else list(params)
        selected = {name: named[name].detach() if name in named else None for name in names}
    unknown = sorted(name for name in selected if name not in named)
    if unknown:
        raise KeyError(f"unknown parameter names {unknown}; the module has {sorted(named)}")
    if not selected:
        raise ValueError("no parameters selected")
    return selected


def per_sample_gradient_fn(
    value_fn: nn.Module,
    params: ParamSelection = None,
    per_sample_loss: PerSampleLoss = half_squared_error,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Build ``f(states [n, ...], targets [n]) -> flat per-sample gradients [n, P]``.

    Row ``i`` is ``d per_sample_loss(V(states[i]), targets[i]) / d theta`` flattened, concatenated over the
    selected parameters in a fixed order (``params``' order, or ``named_parameters()`` order). ``params``:
    ``None`` (all parameters), a sequence of parameter names (their current values), or a mapping
    name -> tensor (those values are used; the module's other parameters and buffers stay as they are and
    are not differentiated). ``value_fn`` maps ``[n, ...] -> [n]`` (or ``[n, 1]``).
    """
    # functional_call on a module registered under two names (a shared torso) can swap that module's
    # Parameter objects, silently detaching them from the caller's optimiser: work on a private copy.
    value_fn = copy.deepcopy(value_fn)
    selected = _select_params(value_fn, params)
    frozen = {name: p.detach() for name, p in value_fn.named_parameters() if name not in selected}
    buffers = dict(value_fn.named_buffers())
    names = list(selected)

    def loss_of_one(theta: dict[str, Tensor], state: Tensor, target: Tensor) -> Tensor:
        prediction = functional_call(value_fn, {**frozen, **buffers, **theta}, (state.unsqueeze(0),))
        if prediction.numel() != 1:
            raise ValueError(f"value_fn must return one value per state, got shape {tuple(prediction.shape)}")
        return per_sample_loss(prediction.reshape(()), target)

    grads_of_chunk = vmap(grad(loss_of_one), in_dims=(None, 0, 0))
    device = next(iter(selected.values())).device

    def flat_grads(states: Tensor, targets: Tensor) -> Tensor:
        states, targets = states.to(device), targets.to(device)
        grads = grads_of_chunk(selected, states, targets)
        return torch.cat([grads[name].reshape(states.shape[0], -1) for name in names], dim=1)

    return flat_grads


def per_sample_value_gradient_fn(
    value_fn: nn.Module, params: ParamSelection = None
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """Build ``f(states [n, ...]) -> (flat grad V per sample [n, P], V [n])`` (parameters and order as in
    :func:`per_sample_gradient_fn`)."""
    value_fn = copy.deepcopy(value_fn)  # see per_sample_gradient_fn
    selected = _select_params(value_fn, params)
    frozen = {name: p.detach() for name, p in value_fn.named_parameters() if name not in selected}
    buffers = dict(value_fn.named_buffers())
    names = list(selected)

    def value_of_one(theta: dict[str, Tensor], state: Tensor) -> Tensor:
        prediction = functional_call(value_fn, {**frozen, **buffers, **theta}, (state.unsqueeze(0),))
        if prediction.numel() != 1:
            raise ValueError(f"value_fn must return one value per state, got shape {tuple(prediction.shape)}")
        return prediction.reshape(())

    grads_of_chunk = vmap(grad_and_value(value_of_one), in_dims=(None, 0))
    device = next(iter(selected.values())).device

    def flat_grads(states: Tensor) -> tuple[Tensor, Tensor]:
        states = states.to(device)
        grads, values = grads_of_chunk(selected, states)
        return torch.cat([grads[name].reshape(states.shape[0], -1) for name in names], dim=1), values

    return flat_grads


def cosine_stiffness_from_gradients(grads: Tensor) -> float:
    """Mean pairwise cosine of the rows of ``grads [N, P]`` via ``(|sum u|^2 - N) / (N (N - 1))``.

    Zero rows are left out. Returns ``nan`` with fewer than two non-zero rows.
    """
    unit_sum, count = _unit_sum(grads)
    return _cosine_from_unit_sum(unit_sum, count)


def sign_stiffness_from_gradients(grads: Tensor) -> float:
    """Mean over pairs ``i < j`` of ``sign(g_i . g_j)`` for the rows of ``grads [N, P]`` (full Gram)."""
    n = grads.shape[0]
    if n < 2:
        return math.nan
    upper = torch.triu(torch.sign(grads @ grads.T), diagonal=1)
    return float(upper.sum(dtype=torch.float64)) / (n * (n - 1) / 2)


def _unit_sum(grads: Tensor) -> tuple[Tensor, int]:
    """(float64 sum of the non-zero rows divided by their norms, number of non-zero rows).

    Works in the gradients' dtype within the chunk (no float64 copy of ``[n, P]``); zero rows stay zero.
    """
    norms = grads.norm(dim=1)
    units = grads / norms.clamp_min(torch.finfo(norms.dtype).tiny).unsqueeze(1)
    return units.sum(dim=0).to(torch.float64), int((norms > 0).sum())


def _cosine_from_unit_sum(unit_sum: Tensor, count: int) -> float:
    if count < 2:
        return math.nan
    return (float(unit_sum.pow(2).sum()) - count) / (count * (count - 1))


def _chunks(start: int, stop: int, size: int) -> Iterator[slice]:
    for begin in range(start, stop, size):
        yield slice(begin, min(begin + size, stop))


GradChunk = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def _exact_sign_sum(
    chunk_grads: GradChunk,
    states: Tensor,
    targets: Tensor,
    chunk_size: int,
    block_size: int,
    on_first_pass: Callable[[Tensor, Tensor | None], None] | None = None,
) -> tuple[float, float]:
    """Sums over unordered pairs ``i < j`` of ``sign(g_i . g_j)`` for the loss gradients and the
    ``grad V`` rows, holding one block of gradients at a time.

    ``chunk_grads(states, targets)`` gives rows ``h_i`` and residual signs ``s_i`` (or None): the loss
    gradients are ``s_i h_i``, so ``sign(g_i . g_j) = s_i s_j sign(h_i . h_j)`` (with None, ``h`` are the
    loss gradients themselves and both sums are the same). For each block of ``block_size`` states the
    later states' gradients are recomputed chunk by chunk, so the first block's pass sees every state
    once: ``on_first_pass`` gets each chunk's ``(h, s)`` then.
    """
    n = states.shape[0]
    loss_total = torch.zeros((), dtype=torch.float64)
    v_total = torch.zeros((), dtype=torch.float64)

    def add(products: Tensor, s_left: Tensor | None, s_right: Tensor | None) -> None:
        nonlocal loss_total, v_total
        signs = torch.sign(products)
        v_total += signs.sum(dtype=torch.float64).cpu()
        if s_left is not None:
            signs = signs * s_left.unsqueeze(1) * s_right.unsqueeze(0)
        loss_total += signs.sum(dtype=torch.float64).cpu()

    for block_start in range(0, n, block_size):
        block_stop = min(block_start + block_size, n)
        parts = [chunk_grads(states[s], targets[s]) for s in _chunks(block_start, block_stop, chunk_size)]
        block = torch.cat([h for h, _ in parts])
        block_signs = None if parts[0][1] is None else torch.cat([sg for _, sg in parts])
        if block_start == 0 and on_first_pass is not None:
            for h, sg in parts:
                on_first_pass(h, sg)
        products = torch.triu(block @ block.T, diagonal=1)
        add(products, block_signs, block_signs)
        for s in _chunks(block_stop, n, chunk_size):
            later, later_signs = chunk_grads(states[s], targets[s])
            if block_start == 0 and on_first_pass is not None:
                on_first_pass(later, later_signs)
            add(block @ later.T, block_signs, later_signs)
        del block
    return float(loss_total), float(v_total)


def value_stiffness(
    value_fn: nn.Module,
    states: Tensor,
    targets: Tensor,
    *,
    params: ParamSelection = None,
    chunk_size: int = 256,
    sign: str = "exact",
    sign_block_size: int = 1024,
    sign_subset_size: int = 2048,
    generator: torch.Generator | None = None,
    per_sample_loss: PerSampleLoss = half_squared_error,
) -> StiffnessResult:
    """Cosine and sign stiffness of the value loss over ``states [N, ...]`` with ``targets [N]``.

    ``value_fn``: an ``nn.Module`` mapping ``[n, ...] -> [n]`` values (wrap an agent's encoder + value
    head in one). ``params`` selects the parameters whose gradients count (see
    :func:`per_sample_gradient_fn`); the others are held fixed. States stay where they are and are moved
    chunk by chunk to the parameters' device (uint8 frames are fine when the module scales them).

    ``sign``: ``"exact"`` averages over all ``N (N - 1) / 2`` pairs; it recomputes gradients once per
    block of ``sign_block_size`` states (about ``N^2 / (2 sign_block_size)`` extra per-sample gradients;
    memory ``(sign_block_size + chunk_size) * P`` floats). ``"subset"`` draws ``sign_subset_size`` states
    uniformly without replacement (``generator``) and averages over all pairs inside the subset: an
    unbiased estimate of the exact mean at a fraction of the cost (use it for large ``N`` on CPU).
    ``"off"`` skips the sign stiffness. The cosine stiffness is always exact over all states.
    The paper (DCPG paper, Appendix A) uses ``N = 2^14`` states and averages over training epochs.
    With the default ``per_sample_loss`` the sign-free variant on ``grad V`` comes with it (same pass).
    """
    if sign not in _SIGN_METHODS:
        raise ValueError(f"unknown sign method {sign!r}; expected one of {_SIGN_METHODS}")
    n = states.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N] = [{n}], got {tuple(targets.shape)}")
    if chunk_size < 1 or sign_block_size < 1:
        raise ValueError("chunk_size and sign_block_size must be positive")
    grad_v = per_sample_loss is half_squared_error  # loss gradients = (V - y) grad V: both from one pass
    if grad_v:
        value_grads = per_sample_value_gradient_fn(value_fn, params)

        def chunk_grads(chunk_states: Tensor, chunk_targets: Tensor) -> tuple[Tensor, Tensor | None]:
            rows, values = value_grads(chunk_states)
            return rows, torch.sign(values - chunk_targets.to(values.device, values.dtype))
    else:
        loss_grads = per_sample_gradient_fn(value_fn, params, per_sample_loss)

        def chunk_grads(chunk_states: Tensor, chunk_targets: Tensor) -> tuple[Tensor, Tensor | None]:
            return loss_grads(chunk_states, chunk_targets), None

    sums: dict[str, Tensor | None] = {"loss": None, "v": None}
    counts = {"loss": 0, "v": 0}

    def accumulate_units(rows: Tensor, signs: Tensor | None) -> None:
        parts = {"loss": rows if signs is None else rows * signs.unsqueeze(1)}
        if signs is not None:
            parts["v"] = rows
        for key, part in parts.items():
            chunk_sum, chunk_count = _unit_sum(part)
            sums[key] = chunk_sum if sums[key] is None else sums[key] + chunk_sum
            counts[key] += chunk_count

    sign_value = sign_v = math.nan
    num_pairs = 0
    if sign == "exact":
        num_pairs = n * (n - 1) // 2
        loss_sum, v_sum = _exact_sign_sum(chunk_grads, states, targets, chunk_size, sign_block_size,
                                          accumulate_units)
        if num_pairs:
            sign_value, sign_v = loss_sum / num_pairs, v_sum / num_pairs
    else:
        for s in _chunks(0, n, chunk_size):
            accumulate_units(*chunk_grads(states[s], targets[s]))
        if sign == "subset":
            m = min(sign_subset_size, n)
            subset = torch.randperm(n, generator=generator)[:m].sort().values
            num_pairs = m * (m - 1) // 2
            sub_states, sub_targets = states[subset.to(states.device)], targets[subset.to(targets.device)]
            loss_sum, v_sum = _exact_sign_sum(chunk_grads, sub_states, sub_targets, chunk_size, sign_block_size)
            if num_pairs:
                sign_value, sign_v = loss_sum / num_pairs, v_sum / num_pairs

    def cosine_of(key: str) -> float:
        return _cosine_from_unit_sum(sums[key], counts[key]) if sums[key] is not None else math.nan

    return StiffnessResult(
        cosine=cosine_of("loss"),
        sign=sign_value,
        num_states=n,
        sign_method=sign,
        num_sign_pairs=num_pairs,
        num_zero_gradients=n - counts["loss"],
        cosine_grad_v=cosine_of("v") if grad_v else math.nan,
        sign_grad_v=sign_v if grad_v else math.nan,
        num_zero_grad_v=n - counts["v"] if grad_v else -1,
    )
