"""Hypernetworks (Sarafian, Keynan & Kraus, ICML 2021; hypernetwork paper, Section 2, Figure 1, Eq. 1) and the
ensemble layers every off-policy network here is built from.

A hypernetwork maps a pair ``(z, x)`` (meta-input, base-input) to ``y``: the *primary* network
``w(z)`` produces the weights of a small *dynamic* network ``f_{w(z)}(x)``:

* primary: ``Linear(meta, 256) -> 2 blocks(256) -> Linear 512 -> 2 blocks(512) -> Linear 1024 ->
  2 blocks(1024)`` = latent ``e`` (1024); blocks are pre-activation ``x + L2(relu(L1(relu(x))))``, no
  normalisation layers;
* heads: for each dynamic layer ``l``, linear maps from ``e`` to its weights ``W_l`` (in_l x out_l),
  bias ``b_l`` and gain ``g_l`` (all heads of all layers are one matrix multiply here);
* dynamic network (Eq. 1): ``x^{l+1} = relu((1 + g_l) * (x^l W_l) + b_l)`` on the hidden layer (one of
  256 by default), no activation on the output; the weights are per sample (batched matmul).

Critic uses: SA-Hyper ``Q(s, a) = f_{w(s)}(a)``, AS-Hyper ``Q(s, a) = f_{w(a)}(s)`` (see
:mod:`aclab.nets.critics`); policy uses: ``pi(a | s, c) = f_{w(c)}(s)`` (Eq. 16, :class:`HyperPolicy`).

**Ensembles.** Every layer here holds ``E`` independent members as one ``[E, in, out]`` weight, so
twin critics are evaluated in one batched call (one ``baddbmm`` per layer instead of two ``linear``
calls). Shapes are ``[E, N, ...]``; an input shared by all members may be given as ``[N, ...]``.
``member=k`` evaluates member ``k`` only (output ``[1, N, ...]``).

**Initialisation.** ``init="kaiming"`` (default, the paper's intent, hypernetwork paper, Section 5.2): the heads are
scaled so that the generated weights and biases of each dynamic layer have the variance of PyTorch's
``nn.Linear`` default (Kaiming-uniform with ``a = sqrt(5)``: ``U(+-1/sqrt(fan_in))``, variance
``1 / (3 fan_in)``), measured by passing a batch of meta-inputs through the primary: with head weights
``U(+-c)`` and zero head biases, ``Var(W_ij) = E||e||^2 c^2 / 3``, so ``c = sqrt(3 target_var / E||e||^2)``.
Gains start at exactly 1 (zero gain-head weights). At construction the batch is standard normal (a
placeholder); :meth:`HyperNetwork.calibrate_heads` re-does it with the real meta-inputs, which the
training code calls when learning starts (TD3 / SAC: the replay buffer's states; MAML: the training
tasks' contexts; PEARL: the initial data's states), because real states are not standard normal
(HalfCheetah's velocities reach ~10: the probe-calibrated layer-1 weights come out ~2x too large).
``init="authors"``: the authors' code constants: head weights ``U(+-0.05)`` for the hidden dynamic
layers and ``U(+-0.008)`` for the output layer (weights, biases and gains alike; a policy's separate
log-std head ``U(+-0.001)``, ``authors_output_bounds``), head biases 0, never re-calibrated.

The primary network's weights are ``U(+-1/(2 sqrt(fan_in)))`` (``primary_init="td3"``: the authors' TD3,
MAML and PEARL code) or ``U(+-1/sqrt(2 fan_in))`` (``"sac"``: the authors' SAC code, 1.41x larger),
torch's default biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

HyperInit = Literal["kaiming", "authors"]
HYPER_INITS = ("kaiming", "authors")
PrimaryInit = Literal["td3", "sac"]
PRIMARY_INITS = ("td3", "sac")
AUTHORS_HIDDEN_HEAD_BOUND = 0.05
AUTHORS_OUTPUT_HEAD_BOUND = 0.008
AUTHORS_LOG_STD_HEAD_BOUND = 0.001  # the authors' Hyper-PEARL policy: a separate log-std head


def primary_weight_bound(fan_in: int, primary_init: str = "td3") -> float:
    """Bound ``b`` of the primary network's ``U(+-b)`` weights: ``1 / (2 sqrt(fan_in))`` (``"td3"``, the
    authors' TD3 / MAML / PEARL ``Meta_Embadding``) or ``1 / sqrt(2 fan_in)`` (``"sac"``, their SAC one)."""
    if primary_init == "td3":
        return 1.0 / (2.0 * math.sqrt(fan_in))
    if primary_init == "sac":
        return 1.0 / math.sqrt(2.0 * fan_in)
    raise ValueError(f"unknown primary_init {primary_init!r}; expected one of {PRIMARY_INITS}")


# ----------------------------------------------------------------------------------------------
# Ensemble building blocks
# ----------------------------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """``E`` independent affine maps ``y_e = x_e W_e + b_e`` in one batched matmul.

    ``weight`` ``[E, in, out]``, ``bias`` ``[E, 1, out]``, each member initialised as ``nn.Linear``
    (weights and biases ``U(+-1/sqrt(in))``). Input ``[E, N, in]`` or ``[N, in]`` (shared by all
    members); output ``[E, N, out]`` (``[1, N, out]`` with ``member``).
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int = 1) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.ensemble_size = int(ensemble_size)
        self.weight = nn.Parameter(torch.empty(self.ensemble_size, self.in_features, self.out_features))
        self.bias = nn.Parameter(torch.empty(self.ensemble_size, 1, self.out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, weight_bound: float | None = None, bias_bound: float | None = None) -> None:
        """Uniform init; bounds default to ``nn.Linear``'s ``1/sqrt(in)``."""
        default = 1.0 / math.sqrt(self.in_features)
        weight_bound = default if weight_bound is None else weight_bound
        bias_bound = default if bias_bound is None else bias_bound
        self.weight.uniform_(-weight_bound, weight_bound)
        self.bias.uniform_(-bias_bound, bias_bound)

    def forward(self, x: Tensor, member: int | None = None) -> Tensor:
        weight, bias = self.weight, self.bias
        if member is not None:
            weight, bias = weight[member : member + 1], bias[member : member + 1]
        if x.dim() == 2:
            x = x.expand(weight.shape[0], *x.shape)
        return torch.baddbmm(bias, x, weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ensemble={self.ensemble_size}"


class EnsembleResidualBlock(nn.Module):
    """Pre-activation residual block ``x + L2(relu(L1(relu(x))))`` of constant width (no normalisation)."""

    def __init__(self, width: int, ensemble_size: int = 1) -> None:
        super().__init__()
        self.fc1 = EnsembleLinear(width, width, ensemble_size)
        self.fc2 = EnsembleLinear(width, width, ensemble_size)

    def forward(self, x: Tensor, member: int | None = None) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(torch.relu(x), member)), member)


class PrimaryResNet(nn.Module):
    """The hypernetwork's primary trunk (hypernetwork paper, Figure 1): per width ``w`` in ``widths``, a Linear to ``w``
    then ``blocks_per_stage`` residual blocks. Input ``[N, in]`` or ``[E, N, in]``; output the latent
    ``[E, N, widths[-1]]`` (no final activation). Weights ``U(+-b)`` with ``b`` from
    :func:`primary_weight_bound` (``primary_init``), torch's default biases."""

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int] = (256, 512, 1024),
        blocks_per_stage: int = 2,
        ensemble_size: int = 1,
        primary_init: PrimaryInit = "td3",
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("PrimaryResNet needs at least one width")
        layers: list[nn.Module] = []
        prev = in_dim
        for width in widths:
            layers.append(EnsembleLinear(prev, width, ensemble_size))
            layers.extend(EnsembleResidualBlock(width, ensemble_size) for _ in range(blocks_per_stage))
            prev = width
        self.layers = nn.ModuleList(layers)
        self.out_dim = int(widths[-1])
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, EnsembleLinear):
                    bound = primary_weight_bound(module.in_features, primary_init)
                    module.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor, member: int | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, member)
        return x


# ----------------------------------------------------------------------------------------------
# Hypernetwork
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicLayer:
    """Per-sample parameters of one dynamic layer: ``weight`` ``[E, N, in, out]``, ``bias`` and
    ``gain`` ``[E, N, out]`` (``gain`` is the full multiplier ``1 + g``)."""

    weight: Tensor
    bias: Tensor
    gain: Tensor


def dynamic_forward(layers: Sequence[DynamicLayer], x: Tensor) -> Tensor:
    """Eq. 1 with per-sample weights: ``x [E, N, in] -> [E, N, out]``; ReLU on all but the last layer."""
    for index, layer in enumerate(layers):
        x = torch.matmul(x.unsqueeze(-2), layer.weight).squeeze(-2)
        x = layer.gain * x + layer.bias
        if index < len(layers) - 1:
            x = torch.relu(x)
    return x


class HyperNetwork(nn.Module):
    """``y = f_{w(meta)}(base)`` (hypernetwork paper, Section 2, Eq. 1). See the module docstring.

    Args:
        meta_dim, base_dim, out_dim: sizes of the meta-input ``z``, base-input ``x`` and output ``y``.
        dynamic_hidden: hidden widths of the dynamic network (paper: one layer of 256).
        primary_widths, blocks_per_stage: the primary ResNet (paper: (256, 512, 1024), 2).
        ensemble_size: ``None`` for one network with ``[N, ...]`` inputs/outputs; an integer ``E`` for
            ``E`` independent networks with ``[E, N, ...]`` outputs (inputs ``[N, ...]`` or ``[E, N, ...]``).
        init: ``"kaiming"`` or ``"authors"`` (module docstring).
        primary_init: ``"td3"`` or ``"sac"``: the primary's weight bound (:func:`primary_weight_bound`).
        authors_output_bounds: with ``init="authors"``, a head bound per output unit of the last dynamic
            layer (its weight, bias and gain columns; default 0.008 for all).
        probe_size: standard-normal meta-inputs used to calibrate ``init="kaiming"`` at construction.
    """

    def __init__(
        self,
        meta_dim: int,
        base_dim: int,
        out_dim: int,
        *,
        dynamic_hidden: Sequence[int] = (256,),
        primary_widths: Sequence[int] = (256, 512, 1024),
        blocks_per_stage: int = 2,
        ensemble_size: int | None = None,
        init: HyperInit = "kaiming",
        primary_init: PrimaryInit = "td3",
        authors_output_bounds: Sequence[float] | None = None,
        probe_size: int = 2048,
    ) -> None:
        super().__init__()
        if init not in HYPER_INITS:
            raise ValueError(f"unknown hypernetwork init {init!r}; expected one of {HYPER_INITS}")
        if authors_output_bounds is not None and len(authors_output_bounds) != int(out_dim):
            raise ValueError(f"authors_output_bounds needs one bound per output ({out_dim}), "
                             f"got {len(authors_output_bounds)}")
        self.meta_dim, self.base_dim, self.out_dim = int(meta_dim), int(base_dim), int(out_dim)
        self.squeeze = ensemble_size is None
        self.ensemble_size = 1 if ensemble_size is None else int(ensemble_size)
        self.init = init
        self.primary = PrimaryResNet(meta_dim, primary_widths, blocks_per_stage, self.ensemble_size, primary_init)
        self.authors_output_bounds = None if authors_output_bounds is None else tuple(map(float, authors_output_bounds))
        dims = [self.base_dim, *[int(h) for h in dynamic_hidden], self.out_dim]
        self.layer_dims: list[tuple[int, int]] = list(zip(dims[:-1], dims[1:]))
        # head columns per layer: [W (in*out) | b (out) | g (out)]
        self.chunk_sizes: list[int] = []
        for fan_in, fan_out in self.layer_dims:
            self.chunk_sizes += [fan_in * fan_out, fan_out, fan_out]
        self.heads = EnsembleLinear(self.primary.out_dim, sum(self.chunk_sizes), self.ensemble_size)
        if init == "authors":
            self._init_heads_authors()
        else:
            probe = torch.randn(probe_size, self.meta_dim, generator=torch.Generator().manual_seed(0))
            self.calibrate_heads(probe)

    # ------------------------------------------------------------------ initialisation
    def _chunk_slices(self) -> list[tuple[slice, slice, slice]]:
        out, start = [], 0
        for fan_in, fan_out in self.layer_dims:
            w = slice(start, start + fan_in * fan_out)
            b = slice(w.stop, w.stop + fan_out)
            g = slice(b.stop, b.stop + fan_out)
            out.append((w, b, g))
            start = g.stop
        return out

    @torch.no_grad()
    def _init_heads_authors(self) -> None:
        weight = self.heads.weight
        last = len(self.layer_dims) - 1
        for index, (w, b, g) in enumerate(self._chunk_slices()):
            bound = AUTHORS_OUTPUT_HEAD_BOUND if index == last else AUTHORS_HIDDEN_HEAD_BOUND
            for cols in (w, b, g):
                weight[:, :, cols].uniform_(-bound, bound)
            if index == last and self.authors_output_bounds is not None:
                fan_in, fan_out = self.layer_dims[index]
                bounds = torch.tensor(self.authors_output_bounds, dtype=weight.dtype, device=weight.device)
                # W is stored flat as [fan_in, fan_out] (column j = output unit j): rescale per unit
                w_block = weight[:, :, w].view(weight.shape[0], weight.shape[1], fan_in, fan_out)
                w_block.uniform_(-1.0, 1.0).mul_(bounds)
                for cols in (b, g):
                    weight[:, :, cols] = torch.empty_like(weight[:, :, cols]).uniform_(-1.0, 1.0) * bounds
        self.heads.bias.zero_()

    @torch.no_grad()
    def calibrate_heads(self, meta_samples: Tensor) -> Tensor:
        """Re-initialise the heads so that, over ``meta_samples`` ``[M, meta_dim]``, each dynamic layer's
        generated weights and biases have variance ``1 / (3 fan_in)`` (``nn.Linear``'s default) and
        its gains are exactly 1. Returns ``E||e||^2`` per member ``[E]`` (the latent's mean square norm).
        Only for ``init="kaiming"`` (the authors' fixed bounds are not data-dependent: ValueError).
        """
        if self.init != "kaiming":
            raise ValueError(f"calibrate_heads is for init='kaiming'; this network uses init={self.init!r}")
        latent = self.primary(meta_samples.to(self.heads.weight))  # [E, M, latent]
        mean_sq_norm = latent.pow(2).sum(-1).mean(-1)  # [E]
        weight = self.heads.weight
        for (fan_in, _), (w, b, g) in zip(self.layer_dims, self._chunk_slices()):
            target_var = 1.0 / (3.0 * fan_in)
            bounds = torch.sqrt(3.0 * target_var / mean_sq_norm.clamp_min(1e-12))  # [E]
            for cols in (w, b):
                block = weight[:, :, cols]
                block.uniform_(-1.0, 1.0)
                block.mul_(bounds.view(-1, 1, 1))
            weight[:, :, g].zero_()
        self.heads.bias.zero_()
        return mean_sq_norm

    # ------------------------------------------------------------------ forward
    def latent(self, meta: Tensor, member: int | None = None) -> Tensor:
        """The primary's output ``e`` ``[E, N, latent]``."""
        return self.primary(meta, member)

    def dynamic_layers(self, meta: Tensor, member: int | None = None, latent: Tensor | None = None
                       ) -> list[DynamicLayer]:
        """The per-sample dynamic parameters produced from ``meta`` (or from a given ``latent``)."""
        e = self.primary(meta, member) if latent is None else latent
        flat = self.heads(e, member)  # [E, N, total]
        lead = flat.shape[:-1]
        parts = torch.split(flat, self.chunk_sizes, dim=-1)
        layers = []
        for index, (fan_in, fan_out) in enumerate(self.layer_dims):
            w, b, g = parts[3 * index : 3 * index + 3]
            layers.append(DynamicLayer(w.reshape(*lead, fan_in, fan_out), b, 1.0 + g))
        return layers

    def forward(self, meta: Tensor, base: Tensor, member: int | None = None) -> Tensor:
        """``meta`` ``[N, meta_dim]`` (or ``[E, N, meta_dim]``), ``base`` ``[N, base_dim]`` (or ``[E, N, ...]``)
        -> ``[E, N, out_dim]`` (``[N, out_dim]`` when ``ensemble_size`` is None)."""
        layers = self.dynamic_layers(meta, member)
        lead = layers[0].bias.shape[:-1]
        if base.dim() == 2:
            base = base.expand(*lead, base.shape[-1])
        out = dynamic_forward(layers, base)
        return out.squeeze(0) if self.squeeze else out


# ----------------------------------------------------------------------------------------------
# Hypernetwork policy (Meta-RL: context -> primary, state -> dynamic)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSplit:
    """Which entries of a flat input vector feed the primary (``meta_index``) and the dynamic network
    (``base_index``); the two may overlap or leave entries out. ``split(x [..., D])`` -> ``(meta, base)``."""

    meta_index: tuple[int, ...]
    base_index: tuple[int, ...]

    @classmethod
    def tail(cls, total_dim: int, meta_dim: int) -> InputSplit:
        """The last ``meta_dim`` entries are the meta-input (e.g. a context appended to the state)."""
        base = total_dim - meta_dim
        return cls(tuple(range(base, total_dim)), tuple(range(base)))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        meta = x[..., list(self.meta_index)]
        base = x[..., list(self.base_index)]
        return meta, base


class HyperPolicy(nn.Module):
    """A policy whose weights are generated from a meta-input: ``pi(a | s, c) = mu_{w(c)}(eps | s)``
    (hypernetwork paper, Eq. 16; Hyper-MAML, Hyper-PEARL).

    ``forward(meta [N, M], base [N, B])`` returns the parameter tensor of an
    :mod:`aclab.core.distributions` adapter: ``cat(mean, log_std)`` ``[N, 2A]`` for ``"gaussian"`` /
    ``"tanh_gaussian"`` (log std state-dependent from the dynamic network, or a free parameter), or the
    action ``[N, A]`` (tanh-squashed) for ``"deterministic"``. With ``split`` set, :meth:`forward_flat`
    takes one flat input and splits it. Other keyword arguments go to :class:`HyperNetwork`.

    A state-dependent log std is the second half of the dynamic network's output layer: the same
    function as a separate log-std head on the hidden layer (the authors' Hyper-PEARL ``last_layer_log``)
    since every output unit has its own generated weights, bias and gain; with ``init="authors"`` its
    head columns get that head's bound ``U(+-0.001)`` (the mean's: ``U(+-0.008)``).
    """

    def __init__(
        self,
        meta_dim: int,
        base_dim: int,
        action_dim: int,
        *,
        output: Literal["gaussian", "tanh_gaussian", "deterministic"] = "gaussian",
        state_dependent_std: bool = False,
        log_std_init: float = 0.0,
        split: InputSplit | None = None,
        **hyper_kwargs,
    ) -> None:
        super().__init__()
        if output not in ("gaussian", "tanh_gaussian", "deterministic"):
            raise ValueError(f"unknown policy output {output!r}; expected gaussian, tanh_gaussian or deterministic")
        self.output = output
        self.action_dim = int(action_dim)
        self.state_dependent_std = state_dependent_std and output != "deterministic"
        out_dim = 2 * self.action_dim if self.state_dependent_std else self.action_dim
        if self.state_dependent_std:
            hyper_kwargs.setdefault("authors_output_bounds", (AUTHORS_OUTPUT_HEAD_BOUND,) * self.action_dim
                                    + (AUTHORS_LOG_STD_HEAD_BOUND,) * self.action_dim)
        self.net = HyperNetwork(meta_dim, base_dim, out_dim, ensemble_size=None, **hyper_kwargs)
        self.split = split
        if output != "deterministic" and not self.state_dependent_std:
            self.log_std = nn.Parameter(torch.full((self.action_dim,), float(log_std_init)))

    def forward(self, meta: Tensor, base: Tensor) -> Tensor:
        out = self.net(meta, base)
        if self.output == "deterministic":
            return torch.tanh(out)
        if self.state_dependent_std:
            return out
        return torch.cat([out, self.log_std.expand_as(out)], dim=-1)

    def forward_flat(self, x: Tensor) -> Tensor:
        if self.split is None:
            raise ValueError("forward_flat needs split=InputSplit(...) at construction")
        meta, base = self.split(x)
        return self.forward(meta, base)
