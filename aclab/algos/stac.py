"""STAC and STACX (Zahavy et al. 2020): IMPALA whose loss hyperparameters tune themselves by meta-gradients.

Metaparameters (Section 3, Algorithm 2): ``eta = {gamma, lambda, g_v, g_p, g_e, alpha}`` per head, each an
unconstrained logit used through a sigmoid: ``gamma = sig(eta_gamma)``, ``lambda = sig(eta_lambda)``,
``alpha = sig(eta_alpha)`` (leaky V-trace, Eq. 5, alpha_rho = alpha_c), ``g_x = sig(eta_x) * g_x_outer``;
every logit starts at 4.6 (sigma = 0.99; Table 3's eta_init). A metaparameter that is not self-tuned keeps
its outer value; for alpha that is alpha_outer = 1 (V-trace).

alpha's initial value: Section 3.1 says "we initialise alpha = 1", Table 3 gives eta_init = 4.6 for every
metaparameter (alpha = 0.990) and Section 4.3 / Figure 4(c) vary alpha_init with the others in 0.99-0.999.
We follow Table 3 (``alpha_init = None``): through a sigmoid, alpha = 1 exactly is a logit of +inf, whose
meta-gradient ``sig'(eta) = 0`` is zero for good, so alpha would never be tuned. ``alpha_init = 1.0``
reaches Section 3.1's literal setting (exactly V-trace, frozen); any value in (0, 1) starts alpha there.

One learner step on a batch T (Algorithm 2, lines 9-15):
    1. inner loss ``L(theta; zeta(eta))`` averaged over heads (line 11): leaky V-trace targets from
       sg(V) and sg(pi / mu) but live gamma, lambda, alpha; the policy term keeps the advantage's
       dependence on eta (Algorithm 1 line 20);
    2. ``theta' = RMSProp(theta, grad_theta L_inner)`` as a differentiable function of eta (line 12;
       ``optimizer_stats="exact"`` differentiates the new mean square too, ``"frozen"`` treats it as a
       constant);
    3. outer loss on the *same* batch at theta', head 1 only, with the fixed outer hyperparameters
       (V-trace: alpha_outer = 1 whatever ``params.alpha_rho`` / ``alpha_c`` say, Section 3.1;
       :func:`stac_outer_weights`), a stop-gradient advantage (line 22) and
       ``g_kl * sum KL(pi_theta' || sg pi_theta)`` (lines 13-14);
    4. ``eta <- Adam(eta, grad_eta L_outer)`` (lr 1e-3, b1 0.9, b2 0.999, eps 1e-4; line 15);
    5. theta' (detached) and the new RMSProp statistics are committed: the same update IMPALA would make
       with the inner hyperparameters zeta(eta_t).

STACX (Section 3.2): ``num_heads = 3`` policy/value heads on a shared torso, each with its own eta; head 1
acts, heads 2..P learn off-policy through their own leaky V-trace; the outer loss uses head 1 only.

Every self-tuned metaparameter is logged each step as ``meta/<name>`` (head 1) and ``meta/head<i>/<name>``,
after the sigmoid and, for the loss coefficients, *unscaled* (as the paper's Figure 5 shows them);
:func:`plot_metaparameters` draws Figure 5-style panels from run directories.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call

from aclab.algos.common import Entry, check_finite
from aclab.algos.impala import (
    Batch,
    Impala,
    ImpalaConfig,
    LossSettings,
    LossWeights,
    StopGradientInputs,
    clip_by_global_norm,
    head_loss,
    multi_head_loss,
    outer_weights,
    rmsprop_step,
)
from aclab.config import require

ETA_NAMES = ("gamma", "lambda", "g_v", "g_p", "g_e", "alpha")
ETA_NAMES_SEPARATE_ALPHAS = ("gamma", "lambda", "g_v", "g_p", "g_e", "alpha_rho", "alpha_c")


@dataclass
class StacConfig(ImpalaConfig):
    """STAC hyperparameters: IMPALA's (the outer loss) plus the meta-learning settings of Table 3."""

    self_tune: tuple[str, ...] = ETA_NAMES
    separate_alphas: bool = False  # learn alpha_rho and alpha_c separately (Fig. 5(b))
    eta_init: float = 4.6
    alpha_init: float | None = None  # None: sig(eta_init) (Table 3); 1.0: exactly V-trace (frozen, Sec. 3.1)
    meta_lr: float = 1e-3
    meta_beta1: float = 0.9
    meta_beta2: float = 0.999
    meta_eps: float = 1e-4
    kl_coef: float = 1.0  # g_kl
    optimizer_stats: Literal["exact", "frozen"] = "exact"
    gamma_embedding: int = 0  # > 0: embed each head's gamma into its input (Xu et al. 2018), this width

    def validate(self) -> None:
        super().validate()
        names = ETA_NAMES_SEPARATE_ALPHAS if self.separate_alphas else ETA_NAMES
        allowed = set(names) | {"alpha"}
        require(
            all(n in allowed for n in self.self_tune) and len(set(self.self_tune)) == len(self.self_tune),
            "params.self_tune",
            self.self_tune,
            f"distinct names from {sorted(allowed)}",
        )
        require(self.meta_lr >= 0, "params.meta_lr", self.meta_lr, "a number >= 0")
        require(0 <= self.meta_beta1 < 1, "params.meta_beta1", self.meta_beta1, "a number in [0, 1)")
        require(0 <= self.meta_beta2 < 1, "params.meta_beta2", self.meta_beta2, "a number in [0, 1)")
        require(self.meta_eps > 0, "params.meta_eps", self.meta_eps, "a number > 0")
        require(self.kl_coef >= 0, "params.kl_coef", self.kl_coef, "a number >= 0")
        require(self.gamma_embedding >= 0, "params.gamma_embedding", self.gamma_embedding, "an integer >= 0")
        require(self.alpha_init is None or 0.0 < self.alpha_init <= 1.0, "params.alpha_init", self.alpha_init,
                "None (sigmoid(params.eta_init), Table 3) or a number in (0, 1] (1: exactly V-trace)")
        for key in ("alpha_rho", "alpha_c"):
            require(getattr(self, key) == 1.0, f"params.{key}", getattr(self, key),
                    "1.0: STAC's outer loss is V-trace (alpha_outer = 1, STAC paper Section 3.1); the inner alpha "
                    "is a metaparameter (params.self_tune, params.alpha_init)")


ALPHA_OUTER = 1.0  # STAC paper, Section 3.1 / Table 3: the outer loss is V-trace


def stac_outer_weights(p: StacConfig) -> LossWeights:
    """The outer loss's fixed hyperparameters zeta (Table 3): IMPALA's loss settings with alpha_outer = 1."""
    w = outer_weights(p)
    return LossWeights(w.gamma, w.trace_lambda, ALPHA_OUTER, ALPHA_OUTER, w.g_v, w.g_p, w.g_e)


def initial_logits(p: StacConfig, names: tuple[str, ...]) -> torch.Tensor:
    """eta at the start [P, K]: ``eta_init`` everywhere, alpha's entries from ``alpha_init`` when given
    (``logit(alpha_init)``; +inf for 1.0)."""
    logits = torch.full((p.num_heads, len(names)), float(p.eta_init))
    if p.alpha_init is not None:
        a = float(p.alpha_init)
        value = math.inf if a >= 1.0 else math.log(a / (1.0 - a))
        for k, name in enumerate(names):
            if name.startswith("alpha"):
                logits[:, k] = value
    return logits


def eta_names(separate_alphas: bool) -> tuple[str, ...]:
    return ETA_NAMES_SEPARATE_ALPHAS if separate_alphas else ETA_NAMES


def tuned_mask(self_tune: tuple[str, ...], separate_alphas: bool) -> tuple[bool, ...]:
    """Which entries of :func:`eta_names` are self-tuned ("alpha" selects both alphas when they are split)."""
    chosen = set(self_tune)
    if separate_alphas and "alpha" in chosen:
        chosen |= {"alpha_rho", "alpha_c"}
    return tuple(name in chosen for name in eta_names(separate_alphas))


def inner_loss_weights(
    logits: Tensor, names: tuple[str, ...], tuned: tuple[bool, ...], outer: LossWeights
) -> list[LossWeights]:
    """zeta(eta) per head (Algorithm 2 line 10). logits [P, K] -> P LossWeights.

    Tuned: ``sig(logit)`` for gamma, lambda, alpha(s); ``sig(logit) * g_outer`` for the coefficients.
    Not tuned: the outer value (a float).
    """
    scale = {"g_v": outer.g_v, "g_p": outer.g_p, "g_e": outer.g_e}
    fixed = {
        "gamma": outer.gamma,
        "lambda": outer.trace_lambda,
        "g_v": outer.g_v,
        "g_p": outer.g_p,
        "g_e": outer.g_e,
        "alpha": outer.alpha_rho,
        "alpha_rho": outer.alpha_rho,
        "alpha_c": outer.alpha_c,
    }
    heads = []
    sig = torch.sigmoid(logits)
    for h in range(logits.shape[0]):
        value = {}
        for k, name in enumerate(names):
            if tuned[k]:
                value[name] = sig[h, k] * scale[name] if name in scale else sig[h, k]
            else:
                value[name] = fixed[name]
        alpha_rho = value["alpha"] if "alpha" in value else value["alpha_rho"]
        alpha_c = value["alpha"] if "alpha" in value else value["alpha_c"]
        heads.append(
            LossWeights(
                value["gamma"], value["lambda"], alpha_rho, alpha_c, value["g_v"], value["g_p"], value["g_e"]
            )
        )
    return heads


@dataclass(frozen=True)
class MetaSettings:
    """Everything the meta-objective needs besides tensors (built from :class:`StacConfig`)."""

    loss: LossSettings
    outer: LossWeights
    names: tuple[str, ...]
    tuned: tuple[bool, ...]
    kl_coef: float
    decay: float
    eps: float
    eps_inside_sqrt: bool
    freeze_stats: bool
    max_grad_norm: float | None
    gamma_embedding: bool


class HeldConstants(NamedTuple):
    """The quantities the meta-objective treats as constants: the inner loss's stop-gradient inputs per head,
    the outer loss's (at theta'), and the KL target pi_theta (head 1's dist params [T, B, P])."""

    inner: list[StopGradientInputs]
    outer: StopGradientInputs
    kl_target: Tensor


class MetaResult(NamedTuple):
    outer_loss: Tensor | None
    new_params: dict[str, Tensor]
    new_square_avgs: list[Tensor]
    inner_stats: dict[str, Tensor]
    outer_stats: dict[str, Tensor]
    held: HeldConstants | None


def meta_objective(
    net,
    params: dict[str, Tensor],
    square_avgs: list[Tensor],
    logits: Tensor,
    batch: Batch,
    lr: float,
    s: MetaSettings,
    create_graph: bool = True,
    held: HeldConstants | None = None,
    reduce_grads=None,
) -> MetaResult:
    """The outer loss after one differentiable inner step (Algorithm 2 lines 10-14), as a function of eta.

    ``params`` maps ``net``'s parameter names to tensors that require grad (theta); ``logits`` [P, K] (eta).
    ``outer_loss`` is differentiable in ``logits`` (when ``create_graph``); ``new_params`` /
    ``new_square_avgs`` are the inner RMSProp step (commit them detached).

    Stop-gradients (Algorithm 1): sg(V) and sg(pi / mu) in both losses and pi_theta in the KL term are
    constants. They depend on eta only through a gamma embedding (inner loss) or through theta' (outer
    loss); autograd ignores that dependence. Passing ``held`` (a previous result's ``held``) fixes them
    at those values, which makes the outer loss an ordinary function of eta whose derivative is the
    meta-gradient: the float64 finite-difference test uses this.

    ``reduce_grads`` (a data-parallel learner): maps this rank's inner gradient to the batch's (the sum
    over ranks, differentiably), so that ``theta'`` is the single learner's (see :mod:`aclab.distributed`).
    """
    buffers = dict(net.named_buffers())
    weights = inner_loss_weights(logits, s.names, s.tuned, s.outer)
    inner_gamma = None
    if s.gamma_embedding:
        inner_gamma = torch.stack(
            [torch.as_tensor(w.gamma, dtype=logits.dtype, device=logits.device) for w in weights]
        )
    dist_params, values = functional_call(
        net, {**params, **buffers}, (batch.obs, batch.first, batch.core_state), {"gamma": inner_gamma}
    )
    inner_loss, inner_stats, inner_held = multi_head_loss(
        net.dist,
        dist_params,
        values,
        batch,
        weights,
        s.loss,
        stop_advantage=False,
        held=None if held is None else held.inner,
    )
    names = list(params)
    grads = torch.autograd.grad(inner_loss, [params[n] for n in names], create_graph=create_graph)
    if reduce_grads is not None:
        grads = reduce_grads(list(grads))
    grads, grad_norm = clip_by_global_norm(list(grads), s.max_grad_norm)
    new_list, new_avgs = rmsprop_step(
        [params[n] for n in names],
        grads,
        square_avgs,
        lr,
        s.decay,
        s.eps,
        s.eps_inside_sqrt,
        differentiate_stats=not s.freeze_stats,
    )
    new_params = dict(zip(names, new_list))
    inner_stats = {"loss/inner": inner_loss.detach(), **inner_stats, "grad_norm": grad_norm.detach()}
    if not create_graph:
        return MetaResult(None, new_params, new_avgs, inner_stats, {}, None)

    outer_gamma = None
    if s.gamma_embedding:
        outer_gamma = torch.full(
            (dist_params.shape[0],), float(s.outer.gamma), dtype=logits.dtype, device=logits.device
        )
    new_dist_params, new_values = functional_call(
        net, {**new_params, **buffers}, (batch.obs, batch.first, batch.core_state), {"gamma": outer_gamma}
    )
    outer_loss, outer_stats, outer_held = head_loss(
        net.dist,
        new_dist_params[0],
        new_values[0],
        batch,
        s.outer,
        s.loss,
        stop_advantage=True,
        held=None if held is None else held.outer,
    )
    kl_target = dist_params[0, :-1].detach() if held is None else held.kl_target
    kl = net.dist.kl(new_dist_params[0, :-1], kl_target)
    count = batch.weights.sum().clamp_min(1.0)
    kl_sum = (batch.weights * kl).sum()
    if s.loss.reduction == "mean":
        kl_sum = kl_sum / count
    outer_total = outer_loss + s.kl_coef * kl_sum
    outer_stats = {
        "loss/outer": outer_total.detach(),
        "outer/kl": (batch.weights * kl).sum().detach() / count,
        "outer/loss_value": outer_stats["loss/value"],
        "outer/loss_policy": outer_stats["loss/policy"],
    }
    return MetaResult(
        outer_total,
        new_params,
        new_avgs,
        inner_stats,
        outer_stats,
        HeldConstants(inner_held, outer_held, kl_target),
    )


class Stac(Impala):
    """STAC (``num_heads = 1``) and STACX (``num_heads = 3``); acting and data as :class:`Impala`."""

    Config = StacConfig

    def __init__(self, config, env_spec, device: torch.device):
        super().__init__(config, env_spec, device)
        p: StacConfig = config.params
        self.names = eta_names(p.separate_alphas)
        self.tuned = tuned_mask(tuple(p.self_tune), p.separate_alphas)
        self.logits = initial_logits(p, self.names).to(device).requires_grad_(True)
        self.meta_optimizer = torch.optim.Adam(
            [self.logits], lr=p.meta_lr, betas=(p.meta_beta1, p.meta_beta2), eps=p.meta_eps
        )
        self.meta = MetaSettings(
            loss=self.loss_settings,
            outer=stac_outer_weights(p),
            names=self.names,
            tuned=self.tuned,
            kl_coef=p.kl_coef,
            decay=p.rmsprop_decay,
            eps=p.rmsprop_eps,
            eps_inside_sqrt=p.rmsprop_eps_placement == "inside",
            freeze_stats=p.optimizer_stats == "frozen",
            max_grad_norm=p.max_grad_norm,
            gamma_embedding=p.gamma_embedding > 0,
        )
        self.last_meta_grad: torch.Tensor | None = None  # grad_eta of the outer loss at the latest update
        self._sync_gamma_input()

    def _sync_gamma_input(self) -> None:
        """Acting with a gamma embedding uses each head's current inner gamma."""
        with torch.no_grad():
            weights = inner_loss_weights(self.logits, self.names, self.tuned, self.meta.outer)
            self.net.gamma_input.copy_(torch.tensor([float(w.gamma) for w in weights]))

    def metaparameter_values(self) -> dict[str, float]:
        """Self-tuned metaparameters after the sigmoid, unscaled: ``meta/<name>``, ``meta/head<i>/<name>``."""
        values = torch.sigmoid(self.logits.detach()).cpu().tolist()
        out = {}
        for h, row in enumerate(values):
            prefix = "meta/" if h == 0 else f"meta/head{h + 1}/"
            for k, name in enumerate(self.names):
                if self.tuned[k]:
                    out[prefix + name] = row[k]
        return out

    def learner_step(self, batch: Batch, lr: float) -> dict[str, float]:
        any_tuned = any(self.tuned)
        params = {name: q.detach().requires_grad_(True) for name, q in self.net.named_parameters()}
        share, reduce_grads = self.gradient_share(batch), None
        if self.dp.enabled:  # theta' from the whole batch's inner gradient, differentiably in eta
            like = list(params.values())

            def reduce_grads(grads):
                return self.dp.reduce_gradients(grads, like, share, differentiable=True)

        outer_loss, new_params, new_avgs, inner_stats, outer_stats, _ = meta_objective(
            self.net, params, self.square_avgs, self.logits, batch, lr, self.meta, create_graph=any_tuned,
            reduce_grads=reduce_grads,
        )
        stats = {**inner_stats, **outer_stats}
        if any_tuned:
            (meta_grad,) = torch.autograd.grad(outer_loss if share == 1.0 else share * outer_loss, self.logits)
            meta_grad = self.dp.all_sum(meta_grad)  # the whole batch's outer loss is the sum of the ranks'
            self.last_meta_grad = meta_grad.detach()
            stats["meta_grad_norm"] = meta_grad.norm()
            check_finite(stats, f"STAC update {self.iteration}")
            self.meta_optimizer.zero_grad(set_to_none=True)
            self.logits.grad = meta_grad
            self.meta_optimizer.step()
            self.logits.grad = None
        else:
            check_finite(stats, f"STAC update {self.iteration}")
        with torch.no_grad():
            for name, param in self.net.named_parameters():
                param.copy_(new_params[name])
        self.square_avgs = [s.detach() for s in new_avgs]
        self._sync_gamma_input()
        out = dict(zip(stats, torch.stack([v.detach().reshape(()) for v in stats.values()]).tolist()))
        out.update(self.metaparameter_values())
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["logits"] = self.logits.detach().clone()
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self._sync_gamma_input()
        super().load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Figure 5-style plot
# ----------------------------------------------------------------------------------------------
HEAD_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:pink",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:gray",
)


def _read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def plot_metaparameters(
    run_dirs: list[str | Path],
    out_path: str | Path,
    title: str | None = None,
    smooth: int = 10,
    dpi: int = 80,
) -> Path:
    """Metaparameters through training (STAC Figure 5): one panel per metaparameter and one for the
    episode return; one line per head (head 1 blue) and run (thin lines, same colour). Values are
    after the sigmoid, loss coefficients unscaled. ``smooth``: moving-average window in logged rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [_read_metrics(Path(d)) for d in run_dirs]
    columns = [c for c in runs[0][0] if c.startswith("meta/")] if runs and runs[0] else []
    names: list[str] = []
    for column in columns:
        name = column.split("/")[-1]
        if name not in names:
            names.append(name)
    panels = [*names, "episode_return"]
    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)

    def series(rows_, column):
        pts = [(float(r["step"]), float(r[column])) for r in rows_ if r.get(column) not in (None, "")]
        if not pts:
            return None, None
        x, y = map(np.asarray, zip(*pts))
        if smooth > 1 and y.size >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1 :]
        return x, y

    for index, panel in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for rows_ in runs:
            if panel == "episode_return":
                x, y = series(rows_, panel)
                if x is not None:
                    ax.plot(x, y, color="black", linewidth=0.8, alpha=0.7)
                continue
            head = 1
            while True:
                column = f"meta/{panel}" if head == 1 else f"meta/head{head}/{panel}"
                if column not in rows_[0]:
                    break
                x, y = series(rows_, column)
                if x is not None:
                    ax.plot(
                        x,
                        y,
                        color=HEAD_COLOURS[(head - 1) % len(HEAD_COLOURS)],
                        linewidth=0.8,
                        alpha=0.8,
                        label=f"head {head}" if rows_ is runs[0] else None,
                    )
                head += 1
        ax.set_title(panel, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("env steps", fontsize=7)
    for index in range(len(panels), rows * cols):
        axes[index // cols][index % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path


ALGORITHMS = {
    "stac": Entry(Stac, "STAC: IMPALA self-tuning {gamma, lambda, g_v, g_p, g_e, alpha} by meta-gradients"),
    "stacx": Entry(
        Stac,
        "STACX: STAC with 3 self-tuned policy/value heads on a shared torso (head 1 acts)",
        defaults={"num_heads": 3},
        preset_prefix="stacx",
    ),
}
