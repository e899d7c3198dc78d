"""Gradient noise scale (McCandlish et al. 2018) as measured by DNA (DNA paper, Section 3.2, Appendix N, Alg. 2).

The simple noise scale of a loss is ``B_simple = tr(Sigma) / |G|^2`` (DNA paper, Eq. 3 / 20), where ``G`` is the
true (expected) gradient and ``Sigma`` the per-sample gradient covariance. With ``G_B`` the mean gradient
of a minibatch of ``B`` samples, ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, so two batch sizes give the
unbiased estimators (DNA paper, Eqs. 4, 5)::

    |G|^2_est = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S_est     = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)      (E[S_est] = tr(Sigma))

``|G_small|^2`` is the mean of the squared norms of ``N`` small-batch gradients (Algorithm 2, lines 4-7).
The ratio of the two estimates is biased, so they are smoothed over calls with exponential moving averages
before dividing; ``sigma = sqrt(B_simple)`` is the noise-to-signal ratio the paper plots.

Smoothing (what the paper leaves open, and our defaults): Algorithm 2 smooths only ``|G|^2``,
``|G|^2 <- alpha |G|^2_old + (1 - alpha) |G|^2_new``, and does not give ``alpha``. We default to
``g2_smoothing = 0.95`` (about a 20-call horizon; the authors' later code uses ``1 - 1 / horizon`` with a
horizon of 1M environment steps per ``|G|^2`` estimate, which is 0.95 for Atari's 16384-step rollouts
measured every third update) and ``s_smoothing = 0.0`` (no smoothing of ``S``, as in Algorithm 2;
McCandlish et al. and the authors' later code also smooth ``S``). The first call initialises each average
with its estimate (no zero-initialisation bias). ``alpha = 0`` disables smoothing.

The DNA authors' code (``estimate_noise_level`` in maitchison/PPO, DNA branch) differs in three ways, each
an option here: 16 small batches; it averages the small batches' gradient *norms* and squares the average
(``small_average="norms"``: ``|G_small|^2 = (mean_i |g_i|)^2``, not Algorithm 2's ``mean_i |g_i|^2``, line 7);
it smooths both ``S`` and ``|G|^2`` with an EMA of 0.9 (first value as initial average); and it divides by
``max(|G|^2, 1e-4)`` (``g2_floor``) so a negative smoothed ``|G|^2`` does not flip the sign. Its big batch is
the whole rollout (here: ``b_big`` = the data set size). By Jensen, ``(mean |g_i|)^2 <= mean |g_i|^2``, so the
norms average lowers ``S`` and raises ``|G|^2`` against Algorithm 2: its noise scale is biased low.

Sampling: Algorithm 2 draws the big batch and each of the ``N`` small batches independently, each without
replacement from the data ``D``. With a finite ``D`` of ``M`` samples the estimators stay unbiased for the
finite population: ``E|G_B|^2 = |G_D|^2 + (1/B - 1/M) s^2`` with ``s^2`` the Bessel-corrected trace of the
per-sample covariance over ``D``, so ``E[S_est] = s^2`` exactly and ``E[|G|^2_est] = |G_D|^2 - s^2 / M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_SMALL_BATCH_MODES = ("independent", "partition")
_SMALL_AVERAGES = ("squares", "norms")


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """One call's raw estimates and the smoothed noise scale.

    g_small_sq: mean over the small batches of ``|G_small|^2``. g_big_sq: ``|G_big|^2``. g2, s: the raw
    estimates of ``|G|^2`` (Eq. 4) and ``tr(Sigma)`` (Eq. 5) from this call. g2_smoothed, s_smoothed: their
    moving averages. b_simple: ``s_smoothed / g2_smoothed`` (``inf`` when ``g2_smoothed <= 0``).
    sigma: ``sqrt(max(b_simple, 0))``.
    """

    g_small_sq: float
    g_big_sq: float
    g2: float
    s: float
    g2_smoothed: float
    s_smoothed: float
    b_simple: float
    sigma: float
    b_small: int
    b_big: int
    num_small_batches: int

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for a logger, e.g. ``{prefix + "sigma": ...}``."""
        keys = ("g2", "s", "g2_smoothed", "s_smoothed", "b_simple", "sigma")
        return {f"{prefix}{key}": float(getattr(self, key)) for key in keys}


def true_gradient_sq_estimate(g_small_sq: float, g_big_sq: float, b_small: int, b_big: int) -> float:
    """Unbiased estimate of ``|G|^2`` (DNA paper, Eq. 4)."""
    _check_batch_sizes(b_small, b_big)
    return (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)


def trace_covariance_estimate(g_small_sq: float, g_big_sq: float, b_small: int, b_big: int) -> float:
    """Unbiased estimate ``S`` of ``tr(Sigma)`` (DNA paper, Eq. 5)."""
    _check_batch_sizes(b_small, b_big)
    return (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)


def _check_batch_sizes(b_small: int, b_big: int) -> None:
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")


def _check_smoothing(alpha: float, name: str) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {alpha}")


class GradientNoiseScale:
    """Running simple-noise-scale estimator for one loss (keep one per loss: policy, value, distil).

    ``b_small``, ``b_big``: default batch sizes (paper: 32 and 16384); ``b_big=None`` means "the whole
    data set" in :func:`measure_noise_scale`. ``g2_smoothing``, ``s_smoothing``: EMA constants ``alpha``
    for ``|G|^2`` and ``S`` (module docstring). ``small_average``: ``"squares"`` (Algorithm 2, line 7) or
    ``"norms"`` (the authors' code: the square of the mean norm). ``g2_floor``: divide by
    ``max(|G|^2_smoothed, g2_floor)`` (the authors' 1e-4); None: ``inf`` when ``|G|^2_smoothed <= 0``.
    ``state_dict``/``load_state_dict`` carry the averages through checkpoints.
    """

    def __init__(
        self,
        b_small: int = 32,
        b_big: int | None = 16384,
        g2_smoothing: float = 0.95,
        s_smoothing: float = 0.0,
        small_average: str = "squares",
        g2_floor: float | None = None,
    ) -> None:
        if b_big is not None:
            _check_batch_sizes(b_small, b_big)
        _check_smoothing(g2_smoothing, "g2_smoothing")
        _check_smoothing(s_smoothing, "s_smoothing")
        if small_average not in _SMALL_AVERAGES:
            raise ValueError(f"small_average must be one of {_SMALL_AVERAGES}, got {small_average!r}")
        if g2_floor is not None and not g2_floor > 0:
            raise ValueError(f"g2_floor must be None or > 0, got {g2_floor}")
        self.b_small = b_small
        self.b_big = b_big
        self.g2_smoothing = g2_smoothing
        self.s_smoothing = s_smoothing
        self.small_average = small_average
        self.g2_floor = g2_floor
        self.g2_smoothed: float | None = None
        self.s_smoothed: float | None = None
        self.num_updates = 0

    def update(
        self,
        g_small_sq_norms: Sequence[float] | Tensor | float,
        g_big_sq_norm: float | Tensor,
        b_small: int | None = None,
        b_big: int | None = None,
    ) -> NoiseScaleEstimate:
        """Feed the squared gradient norms of ``N`` small batches and of one big batch (Algorithm 2, 8-12).

        ``b_small``/``b_big`` default to the constructor's. Returns this call's estimate.
        """
        b_small = self.b_small if b_small is None else b_small
        b_big = self.b_big if b_big is None else b_big
        if b_big is None:
            raise ValueError("b_big is needed (the estimator was built with b_big=None)")
        small = torch.as_tensor(g_small_sq_norms, dtype=torch.float64).reshape(-1)
        if small.numel() == 0:
            raise ValueError("need at least one small-batch gradient norm")
        if self.small_average == "squares":
            g_small_sq = float(small.mean())  # Algorithm 2, line 7: the mean of the squared norms
        else:
            g_small_sq = float(small.clamp_min(0.0).sqrt().mean()) ** 2  # the authors': the squared mean norm
        g_big_sq = float(torch.as_tensor(g_big_sq_norm, dtype=torch.float64))
        g2 = true_gradient_sq_estimate(g_small_sq, g_big_sq, b_small, b_big)
        s = trace_covariance_estimate(g_small_sq, g_big_sq, b_small, b_big)
        self.g2_smoothed = _ema(self.g2_smoothed, g2, self.g2_smoothing)
        self.s_smoothed = _ema(self.s_smoothed, s, self.s_smoothing)
        self.num_updates += 1
        if self.g2_floor is not None:
            b_simple = self.s_smoothed / max(self.g2_smoothed, self.g2_floor)
        else:
            b_simple = self.s_smoothed / self.g2_smoothed if self.g2_smoothed > 0 else math.inf
        return NoiseScaleEstimate(
            g_small_sq=g_small_sq,
            g_big_sq=g_big_sq,
            g2=g2,
            s=s,
            g2_smoothed=self.g2_smoothed,
            s_smoothed=self.s_smoothed,
            b_simple=b_simple,
            sigma=math.sqrt(max(b_simple, 0.0)),
            b_small=b_small,
            b_big=b_big,
            num_small_batches=small.numel(),
        )

    def reset(self) -> None:
        self.g2_smoothed = self.s_smoothed = None
        self.num_updates = 0

    def state_dict(self) -> dict[str, float | int | None]:
        return {"g2_smoothed": self.g2_smoothed, "s_smoothed": self.s_smoothed, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.g2_smoothed = state["g2_smoothed"]
        self.s_smoothed = state["s_smoothed"]
        self.num_updates = int(state["num_updates"])


def _ema(previous: float | None, new: float, alpha: float) -> float:
    return new if previous is None else alpha * previous + (1.0 - alpha) * new


# ---------------------------------------------------------------------------------------------------------
# Gradients of a minibatch loss
# ---------------------------------------------------------------------------------------------------------
LossOfIndices = Callable[[Tensor], Tensor]


def batch_gradient(
    loss_fn: LossOfIndices,
    params: Sequence[Tensor],
    indices: Tensor,
    max_chunk_size: int | None = None,
) -> list[Tensor]:
    """Gradient (float64, one tensor per parameter) of the mean loss over ``indices [B]``.

    ``loss_fn(indices) -> scalar`` must be the **mean** of per-sample losses over those samples (that is
    what the noise-scale formulas assume). With ``max_chunk_size`` the batch is split into chunks whose
    gradients are combined with weights ``len(chunk) / B``, which equals the full-batch gradient for such
    a loss and bounds memory. Parameters the loss does not reach get zero gradients. Uses
    ``torch.autograd.grad``: no ``.grad`` is written and nothing is stepped.
    """
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    batch = indices.shape[0]
    chunk = batch if max_chunk_size is None else max_chunk_size
    for begin in range(0, batch, chunk):
        part = indices[begin : begin + chunk]
        with torch.enable_grad():  # callers may sit inside torch.no_grad()
            loss = loss_fn(part)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        weight = part.shape[0] / batch
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g.detach().to(torch.float64), alpha=weight)
    return total


def squared_norm(tensors: Iterable[Tensor]) -> float:
    """``sum_k |t_k|^2`` over a list of tensors, in float64."""
    return float(sum(t.to(torch.float64).pow(2).sum() for t in tensors))


def measure_noise_scale(
    estimator: GradientNoiseScale,
    loss_fn: LossOfIndices,
    params: Iterable[Tensor],
    dataset_size: int,
    *,
    num_small_batches: int = 32,
    max_chunk_size: int | None = 2048,
    small_batches: str = "independent",
    generator: torch.Generator | None = None,
) -> NoiseScaleEstimate:
    """Algorithm 2 on any loss: draw the batches, compute the gradients, update ``estimator``.

    ``loss_fn(indices [B] int64 on CPU) -> scalar``: the mean loss over those samples of the data set
    (``0 <= index < dataset_size``), for example a rollout's policy, value or distillation loss. It must not
    normalise within the minibatch (e.g. per-minibatch advantage normalisation) for the estimate to be
    exact: normalise over the whole data set beforehand. ``params``: the parameters whose gradient counts
    (e.g. the value network's). No optimiser step is taken and ``.grad`` is left untouched.

    ``small_batches``: ``"independent"`` (Algorithm 2): the big batch and ``num_small_batches`` small
    batches are each drawn without replacement from the data set. ``"partition"`` (the authors' later
    code): the big batch is split into ``b_big / b_small`` disjoint small batches, whose gradients give
    both ``|G_small|^2`` (all of them; ``num_small_batches`` is ignored) and, averaged, ``G_big``.
    ``max_chunk_size`` bounds the samples per backward pass for the big batch. Batch sizes come from
    ``estimator``; ``estimator.b_big = None`` uses the whole data set as the big batch.
    """
    if small_batches not in _SMALL_BATCH_MODES:
        raise ValueError(f"unknown small_batches {small_batches!r}; expected one of {_SMALL_BATCH_MODES}")
    params = list(params)
    b_small = estimator.b_small
    b_big = dataset_size if estimator.b_big is None else estimator.b_big
    _check_batch_sizes(b_small, b_big)
    if b_big > dataset_size:
        raise ValueError(f"b_big={b_big} exceeds the data set size {dataset_size}; lower b_big")

    def draw(size: int) -> Tensor:
        return torch.randperm(dataset_size, generator=generator)[:size]

    if small_batches == "independent":
        big = batch_gradient(loss_fn, params, draw(b_big), max_chunk_size)
        small_sq = [squared_norm(batch_gradient(loss_fn, params, draw(b_small))) for _ in range(num_small_batches)]
    else:
        if b_big % b_small:
            raise ValueError(f"partition mode needs b_small ({b_small}) to divide b_big ({b_big})")
        big_indices = draw(b_big)
        big = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        small_sq = []
        num_parts = b_big // b_small
        for part in big_indices.reshape(num_parts, b_small):
            grads = batch_gradient(loss_fn, params, part)
            small_sq.append(squared_norm(grads))
            for acc, g in zip(big, grads):
                acc.add_(g, alpha=1.0 / num_parts)
    return estimator.update(small_sq, squared_norm(big), b_small=b_small, b_big=b_big)
