"""STAC / STACX: metaparameter transforms, the meta-gradient against central finite differences (float64),
frozen optimiser statistics, equality with IMPALA when nothing is tuned, end-to-end runs, resume, plots."""


import numpy as np
import pytest
import torch
from run_rows import metric_rows
from torch import distributions as td
from torch.func import functional_call

from aclab.algos import stac as stac_module
from aclab.algos.impala import Batch, Impala, ImpalaNet, LossSettings, LossWeights, head_loss
from aclab.algos.stac import (
    ETA_NAMES,
    ETA_NAMES_SEPARATE_ALPHAS,
    MetaSettings,
    Stac,
    inner_loss_weights,
    meta_objective,
    plot_metaparameters,
    tuned_mask,
)
from aclab.core.distributions import Categorical, TanhGaussian
from aclab.envs import build_envs
from aclab.runs import load_latest_checkpoint
from aclab.train import make_config, train

FAST = ["progress=false", "eval.episodes=0"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the training loop does for vector observations: a second intra-op thread only adds contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


OUTER = LossWeights(gamma=0.99, trace_lambda=1.0, alpha_rho=1.0, alpha_c=1.0, g_v=0.25, g_p=1.0, g_e=0.01)


def test_inner_loss_weights_sigmoid_scaling_and_fixed_values():
    logits = torch.full((2, 6), 4.6)
    logits[1, 0] = 0.0
    tuned = tuned_mask(("gamma", "g_v", "alpha"), separate_alphas=False)
    heads = inner_loss_weights(logits, ETA_NAMES, tuned, OUTER)
    sig = torch.sigmoid(torch.tensor(4.6))
    assert abs(float(sig) - 0.99) < 1e-3  # the paper's initialisation
    assert float(heads[0].gamma) == float(sig) and float(heads[1].gamma) == 0.5
    assert float(heads[0].g_v) == float(sig * 0.25)  # coefficients are scaled by the outer value
    assert heads[0].trace_lambda == 1.0 and heads[0].g_p == 1.0 and heads[0].g_e == 0.01  # not tuned: outer
    assert heads[0].alpha_rho is heads[0].alpha_c  # STAC's single alpha
    split = tuned_mask(("alpha",), separate_alphas=True)
    assert split == (False,) * 5 + (True, True)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0]])
    (head,) = inner_loss_weights(logits, ETA_NAMES_SEPARATE_ALPHAS, split, OUTER)
    assert float(head.alpha_rho) == float(torch.sigmoid(torch.tensor(1.0)))
    assert float(head.alpha_c) == float(torch.sigmoid(torch.tensor(-1.0)))


# ----------------------------------------------------------------------------------------------
# The meta-gradient equals central finite differences (float64, exact optimiser statistics)
# ----------------------------------------------------------------------------------------------
def _problem(kind: str, seed: int = 0, embed: bool = True):
    torch.manual_seed(seed)
    T, B, obs_dim = 6, 3, 3
    separate = kind == "stacx"
    num_heads = 3 if kind == "stacx" else 1
    if kind == "continuous":
        dist = TanhGaussian(2)
        net = ImpalaNet((obs_dim,), dist, hidden_sizes=(6,), head_hidden=5, lstm_size=4)
    else:
        dist = Categorical(3)
        net = ImpalaNet(
            (obs_dim,),
            dist,
            hidden_sizes=(6,),
            head_hidden=5,
            num_heads=num_heads,
            gamma_embedding=2 if kind == "stacx" and embed else 0,
        )
    net = net.double()
    obs = torch.randn(T + 1, B, obs_dim, dtype=torch.float64)
    if kind == "continuous":
        actions = torch.randn(T, B, 2, dtype=torch.float64)
    else:
        actions = torch.randint(0, 3, (T, B))
    ends = torch.zeros(T, B, dtype=torch.bool)
    terminated = torch.zeros(T, B, dtype=torch.bool)
    valid = torch.ones(T, B, dtype=torch.bool)
    ends[2, 0] = terminated[2, 0] = True
    valid[3, 0] = False
    ends[3, 2] = True
    valid[4, 2] = False
    first = torch.zeros(T + 1, B, dtype=torch.float64)
    first[4, 0] = first[5, 2] = 1.0
    batch = Batch(
        obs=obs,
        actions=actions,
        behaviour_log_probs=-1.0 + 0.7 * torch.randn(T, B, dtype=torch.float64),
        rewards=torch.randn(T, B, dtype=torch.float64),
        not_terminated=(~terminated).double(),
        ends=ends,
        weights=valid.double(),
        first=first,
        core_state=None,
        versions=torch.zeros(T, B),
    )
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    square_avgs = [0.5 * torch.rand_like(p) for p in params.values()]
    names = ETA_NAMES_SEPARATE_ALPHAS if separate else ETA_NAMES
    logits = (1.0 + torch.rand(num_heads, len(names), dtype=torch.float64)).requires_grad_(True)
    settings = MetaSettings(
        loss=LossSettings(regularizer="kl_standard_normal" if kind == "continuous" else "entropy"),
        outer=OUTER,
        names=names,
        tuned=(True,) * len(names),
        kl_coef=1.0,
        decay=0.99,
        eps=0.1,
        eps_inside_sqrt=True,
        freeze_stats=False,
        max_grad_norm=5.0 if kind == "continuous" else None,
        gamma_embedding=kind == "stacx" and embed,
    )
    return net, params, square_avgs, logits, batch, settings


def _central_differences(function, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    flat, out_flat = x.detach().clone().reshape(-1), out.reshape(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        out_flat[i] = (function(plus.reshape(x.shape)) - function(minus.reshape(x.shape))) / (2 * eps)
    return out


@pytest.mark.parametrize("kind", ["stac", "stacx", "continuous"])
def test_meta_gradient_matches_central_finite_differences(kind):
    net, params, square_avgs, logits, batch, settings = _problem(kind)
    lr = 0.05

    result = meta_objective(net, params, square_avgs, logits, batch, lr, settings)
    (analytic,) = torch.autograd.grad(result.outer_loss, logits)

    def objective(eta):  # the outer loss with its stop-gradient targets held at their values at eta_0
        return meta_objective(
            net, params, square_avgs, eta, batch, lr, settings, held=result.held
        ).outer_loss.detach()

    numeric = _central_differences(objective, logits)
    assert (analytic.abs() > 1e-4).float().mean() > 0.8, analytic  # (almost) every metaparameter matters
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["stac", "stacx"])
def test_inner_and_outer_losses_follow_algorithm_2(kind):
    """STAC Algorithm 2, rebuilt here from its parts: the inner loss is the 1/P average of the heads' IMPALA
    losses with their own zeta(eta) (line 11); the outer loss is head 1's loss at theta' with the outer
    hyperparameters and a stop-gradient advantage, plus g_kl * sum_t KL(pi_theta' || pi_theta) over valid
    steps (lines 13-14; head_loss itself is checked against a loop reference in test_impala.py)."""
    net, params, square_avgs, logits, batch, settings = _problem(kind, embed=False)
    settings = MetaSettings(**{**settings.__dict__, "kl_coef": 0.7})
    result = meta_objective(net, params, square_avgs, logits, batch, 0.05, settings)
    inputs = (batch.obs, batch.first, batch.core_state)
    with torch.no_grad():
        old_params, old_values = functional_call(net, params, inputs)
        new_params, new_values = functional_call(net, result.new_params, inputs)
    weights = inner_loss_weights(logits.detach(), settings.names, settings.tuned, OUTER)
    per_head = [head_loss(net.dist, old_params[h], old_values[h], batch, weights[h], settings.loss, False)[0]
                for h in range(len(weights))]
    assert float(result.inner_stats["loss/inner"]) == pytest.approx(float(sum(per_head)) / len(per_head), rel=1e-9)
    outer_head_one, _, _ = head_loss(net.dist, new_params[0], new_values[0], batch, OUTER, settings.loss, True)
    kl = td.kl_divergence(td.Categorical(logits=new_params[0, :-1]), td.Categorical(logits=old_params[0, :-1]))
    expected = float(outer_head_one) + 0.7 * float((batch.weights * kl).sum())
    assert float(result.outer_loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert float(result.outer_stats["outer/kl"]) == pytest.approx(
        float((batch.weights * kl).sum() / batch.weights.sum()), rel=1e-9)
    if kind == "stacx":  # the heads differ, so the choice of head 1 is visible
        other, _, _ = head_loss(net.dist, new_params[-1], new_values[-1], batch, OUTER, settings.loss, True)
        assert abs(float(other) - float(outer_head_one)) > 1e-3


def test_frozen_statistics_differentiate_a_different_function(monkeypatch):
    net, params, square_avgs, logits, batch, settings = _problem("stac", seed=1)
    frozen = MetaSettings(**{**settings.__dict__, "freeze_stats": True})
    lr = 0.05
    result = meta_objective(net, params, square_avgs, logits, batch, lr, settings)
    (exact,) = torch.autograd.grad(result.outer_loss, logits)
    (approx,) = torch.autograd.grad(
        meta_objective(net, params, square_avgs, logits, batch, lr, frozen).outer_loss, logits
    )
    # The frozen gradient is the exact gradient of the objective whose new mean square is held at eta's value.
    new_avgs = [s.detach() for s in result.new_square_avgs]

    def step_with_fixed_stats(p, g, s, lr_, decay, eps, inside, differentiate_stats=True):
        return [pi - lr_ * gi / torch.sqrt(a + eps) for pi, gi, a in zip(p, g, new_avgs)], new_avgs

    monkeypatch.setattr(stac_module, "rmsprop_step", step_with_fixed_stats)
    numeric = _central_differences(
        lambda eta: meta_objective(
            net, params, square_avgs, eta, batch, lr, settings, held=result.held
        ).outer_loss.detach(),
        logits,
    )
    torch.testing.assert_close(approx, numeric, rtol=1e-5, atol=1e-8)
    relative = (approx - exact).norm() / exact.norm()
    assert relative > 1e-4  # freezing is an approximation, not the same gradient


# ----------------------------------------------------------------------------------------------
# STAC with nothing tuned is IMPALA, step for step
# ----------------------------------------------------------------------------------------------
def _make(algo, *extra):
    return make_config(
        algo,
        "CartPole-v1",
        overrides=[
            *FAST,
            "total_steps=4000",
            "env.backend=gymnasium",
            "env.num_envs=4",
            "params.num_steps=8",
            "params.hidden_sizes=[16]",
            "params.head_hidden=8",
            "params.gamma=0.99",
            *extra,
        ],
    )


def _run_side_by_side(config_a, cls_a, config_b, cls_b, iterations: int = 6):
    algos, envs = [], []
    for config, cls in ((config_a, cls_a), (config_b, cls_b)):
        torch.manual_seed(config.seed)
        e = build_envs(config)
        e.reset(seed=config.seed)
        envs.append(e)
        algos.append(cls(config, e.spec, torch.device("cpu")))
    for _ in range(iterations):
        for algo, e in zip(algos, envs):
            algo.iterate(e)
        for (name, a), b in zip(algos[0].net.named_parameters(), algos[1].net.parameters()):
            assert torch.equal(a, b), (algos[0].iteration, name)
    for e in envs:
        e.close()
    return algos


@pytest.mark.parametrize("num_heads", [1, 3])
def test_stac_tuning_nothing_equals_impala(num_heads):
    _run_side_by_side(
        _make("impala", f"params.num_heads={num_heads}"),
        Impala,
        _make("stac", "params.self_tune=[]", f"params.num_heads={num_heads}"),
        Stac,
    )


def test_stac_with_frozen_metaparameters_equals_impala_with_their_values():
    sig = torch.sigmoid(torch.tensor(4.6))
    overrides = [
        f"params.gamma={float(sig)}",
        f"params.trace_lambda={float(sig)}",
        f"params.alpha_rho={float(sig)}",
        f"params.alpha_c={float(sig)}",
        f"params.vf_coef={float(sig * 0.25)}",
        f"params.pg_coef={float(sig * 1.0)}",
        f"params.ent_coef={float(sig * 0.01)}",
    ]
    _, stac = _run_side_by_side(
        _make("impala", *overrides),
        Impala,
        _make("stac", "params.meta_lr=0", "params.vf_coef=0.25", "params.ent_coef=0.01"),
        Stac,
    )
    assert torch.all(stac.logits == 4.6)


def test_meta_step_moves_only_the_tuned_logits():
    config = _make("stac", 'params.self_tune=["gamma","g_e"]', "params.meta_lr=0.01")
    torch.manual_seed(1)
    envs = build_envs(config)
    envs.reset(seed=1)
    algo = Stac(config, envs.spec, torch.device("cpu"))
    metrics = algo.iterate(envs)
    envs.close()
    moved = (algo.logits.detach() - 4.6).abs()[0]
    # Adam's first step is lr * g / (|g| + eps): ~lr for gamma; g_e's meta-gradient is far below eps = 1e-4
    assert 0.005 < moved[0] <= 0.01 and moved[4] > 0
    assert torch.all(moved[[1, 2, 3, 5]] == 0)
    assert {k for k in metrics if k.startswith("meta/")} == {"meta/gamma", "meta/g_e"}
    assert metrics["meta_grad_norm"] > 0


def test_the_meta_step_descends_the_outer_loss():
    """eta <- Adam(eta, grad_eta L_outer) (Algorithm 2 line 15) lowers the outer loss of that batch (its
    stop-gradient targets held fixed): a small step against the meta-gradient, not along it."""
    config = _make("stac", "params.meta_lr=0.01")
    torch.manual_seed(1)
    envs = build_envs(config)
    envs.reset(seed=1)
    algo = Stac(config, envs.spec, torch.device("cpu"))
    captured = []
    real_step = algo.learner_step

    def learner_step(batch, lr):
        params = {n: q.detach().clone().requires_grad_(True) for n, q in algo.net.named_parameters()}
        captured.append((batch, lr, params, [a.clone() for a in algo.square_avgs], algo.logits.detach().clone()))
        return real_step(batch, lr)

    algo.learner_step = learner_step
    algo.iterate(envs)
    envs.close()
    batch, lr, params, square_avgs, logits = captured[0]
    before = meta_objective(algo.net, params, square_avgs, logits.requires_grad_(True), batch, lr, algo.meta)
    after = meta_objective(algo.net, params, square_avgs, algo.logits.detach(), batch, lr, algo.meta,
                           held=before.held)
    assert not torch.equal(logits, algo.logits.detach())
    assert float(after.outer_loss) < float(before.outer_loss)


# ----------------------------------------------------------------------------------------------
# End to end, resume, plots
# ----------------------------------------------------------------------------------------------
def _tiny(algo, total_steps, *extra):
    return make_config(
        algo,
        "CartPole-v1",
        overrides=[
            *FAST,
            f"total_steps={total_steps}",
            "env.backend=gymnasium",
            "env.num_envs=4",
            "params.num_steps=8",
            "params.hidden_sizes=[16]",
            "params.head_hidden=8",
            "checkpoint_every_iterations=2",
            "params.meta_lr=0.01",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("stac", ("params.gamma_embedding=4", "params.optimizer_stats=frozen")),
        ("stacx", ("params.separate_alphas=true",)),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, algo, extra):
    total = 12 * 32
    train(_tiny(algo, total, *extra), tmp_path / "full")
    train(_tiny(algo, total, *extra), tmp_path / "split", stop_after_iterations=5)
    resumed = train(_tiny(algo, total, *extra), tmp_path / "split", resume=True)
    assert resumed["status"] == "finished" and resumed["resumed_with_exact_env_state"] is True
    a = load_latest_checkpoint(tmp_path / "full" / "checkpoints")["algo"]
    b = load_latest_checkpoint(tmp_path / "split" / "checkpoints")["algo"]
    assert torch.equal(a["logits"], b["logits"]) and not torch.all(a["logits"] == 4.6)
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    assert metric_rows(tmp_path / "full") == metric_rows(tmp_path / "split")
    columns = metric_rows(tmp_path / "full")[0].keys()
    if algo == "stacx":
        assert {"meta/alpha_rho", "meta/alpha_c", "meta/head3/gamma"} <= set(columns)
    else:
        assert {f"meta/{n}" for n in ETA_NAMES} <= set(columns)


def test_continuous_stac_runs_and_figure_5_plot(tmp_path, monkeypatch):
    config = make_config(
        "stacx",
        "Pendulum-v1",
        overrides=[
            *FAST,
            "total_steps=320",
            "env.backend=gymnasium",
            "env.num_envs=4",
            "params.num_steps=8",
            "params.hidden_sizes=[16]",
            "params.head_hidden=0",
            "params.lstm_size=8",
            "params.meta_lr=0.01",
            "params.overlap=2",
        ],
    )
    summary = train(config, tmp_path / "run")
    assert summary["status"] == "finished"
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    out = plot_metaparameters([tmp_path / "run"], tmp_path / "meta.png", title="test", smooth=2)
    monkeypatch.setattr(plt, "close", real_close)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = metric_rows(tmp_path / "run")
    assert np.isfinite([float(r["meta/g_e"]) for r in rows]).all()
    # Figure 5's panels: one per self-tuned metaparameter plus the return; one line per head (STACX: 3),
    # each the 2-row moving average of that head's logged column
    axes = {ax.get_title(): ax for ax in figures[0].axes if ax.get_title()}
    assert set(axes) == {"gamma", "lambda", "g_v", "g_p", "g_e", "alpha_rho", "alpha_c", "episode_return"} or \
        set(axes) == {"gamma", "lambda", "g_v", "g_p", "g_e", "alpha", "episode_return"}
    for name in ("gamma", "g_e"):
        lines = axes[name].get_lines()
        assert len(lines) == 3
        for head, line in enumerate(lines, 1):
            column = f"meta/{name}" if head == 1 else f"meta/head{head}/{name}"
            values = np.array([float(r[column]) for r in rows])
            np.testing.assert_allclose(line.get_ydata(), (values[1:] + values[:-1]) / 2, rtol=1e-6)
    real_close(figures[0])


# ----------------------------------------------------------------------------------------------
# Learning (slow)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["stac", "stacx"])
def test_learns_cartpole_sync(tmp_path, algo):
    config = make_config(algo, "CartPole-v1", overrides=[*FAST, "total_steps=200000"])
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 150, summary


@pytest.mark.slow
def test_stac_learns_inverted_pendulum_sync(tmp_path):
    config = make_config(
        "stac",
        "mujoco:InvertedPendulum-v4",
        preset="stac-control-cpu",
        overrides=[*FAST, "total_steps=200000"],
    )
    summary = train(config, tmp_path / "run")
    assert summary["final_return"] > 500, summary
