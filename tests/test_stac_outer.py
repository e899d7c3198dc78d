"""STAC's outer loss uses the fixed outer hyperparameters, V-trace with alpha = 1 (STAC paper, Section 3.1,
Table 3), whatever params.alpha_rho / alpha_c say; and alpha's initialisation (Table 3 vs Section 3.1)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aclab.algos.impala import outer_weights
from aclab.algos.stac import ALPHA_OUTER, Stac, stac_outer_weights
from aclab.config import ConfigError
from aclab.envs import build_envs
from aclab.train import make_config

FAST = ["progress=false", "eval.episodes=0", "env.backend=gymnasium", "env.num_envs=4", "params.num_steps=10"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _make(algo: str = "stac", *overrides: str):
    meta = ["params.meta_lr=0.01"] if algo != "impala" else []
    return make_config(algo, "CartPole-v1", overrides=[*FAST, *meta, "total_steps=400", *overrides])


def _algo(config):
    envs = build_envs(config)
    envs.reset(seed=config.seed)
    torch.manual_seed(config.seed)
    return Stac(config, envs.spec, torch.device("cpu")), envs


def test_an_alpha_override_is_rejected_for_stac():
    for key in ("alpha_rho", "alpha_c"):
        with pytest.raises(ConfigError, match=f"params.{key}"):
            _make("stac", f"params.{key}=0.5")
    _make("impala", "params.alpha_rho=0.5")  # IMPALA's leaky V-trace keeps its alpha


def test_the_outer_loss_is_vtrace_whatever_the_config_says():
    """Even when params.alpha_rho / alpha_c are changed behind validation's back, the outer loss (and the
    fixed inner alpha when alpha is not tuned) stays V-trace: two runs match bit for bit. At theta' the
    ratios pi_theta' / mu differ from 1, so an outer alpha below 1 would change the meta-gradient."""
    p = _make().params
    w = stac_outer_weights(dataclasses.replace(p, alpha_rho=0.3, alpha_c=0.2))
    assert (w.alpha_rho, w.alpha_c) == (ALPHA_OUTER, ALPHA_OUTER) == (1.0, 1.0)
    o = outer_weights(p)
    assert (w.gamma, w.trace_lambda, w.g_v, w.g_p, w.g_e) == (o.gamma, o.trace_lambda, o.g_v, o.g_p, o.g_e)

    runs = []
    for alphas in ((1.0, 1.0), (0.3, 0.2)):
        config = _make("stac", 'params.self_tune=["gamma","lambda","g_v"]')
        config.params.alpha_rho, config.params.alpha_c = alphas  # bypasses validation on purpose
        algo, envs = _algo(config)
        rows = [algo.iterate(envs) for _ in range(3)]
        runs.append((algo.logits.detach().clone(), rows))
        envs.close()
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1][-1]["loss/outer"] == runs[1][1][-1]["loss/outer"]
    assert not torch.all(runs[0][0] == 4.6)  # the metaparameters did move


def test_alpha_starts_at_table_3s_value_and_section_3_1s_alpha_1_is_reachable():
    default, envs = _algo(_make())
    assert torch.all(default.logits == 4.6)
    envs.close()
    config = _make("stac", "params.alpha_init=0.995")
    algo, envs = _algo(config)
    k = algo.names.index("alpha")
    assert float(algo.logits.detach()[0, k]) == pytest.approx(math.log(0.995 / 0.005))
    assert algo.metaparameter_values()["meta/alpha"] == pytest.approx(0.995)
    envs.close()

    # STACX: heads 2 and 3 learn off-policy, so their alphas get a meta-gradient and move from 0.990;
    # started at exactly 1 (a logit of +inf) alpha stays V-trace, while the other metaparameters move.
    moved = {}
    for alpha_init in (None, 1.0):
        extra = [] if alpha_init is None else [f"params.alpha_init={alpha_init}"]
        algo, envs = _algo(_make("stacx", *extra))
        for _ in range(4):
            metrics = algo.iterate(envs)
        assert all(math.isfinite(v) for v in metrics.values())
        moved[alpha_init] = metrics, algo.logits.detach().clone(), algo.names.index("alpha")
        envs.close()
    metrics, logits, k = moved[None]
    assert (logits[1:, k] - 4.6).abs().min() > 1e-5  # the auxiliary heads' alphas moved off 0.990
    metrics, logits, k = moved[1.0]
    for head in ("meta/alpha", "meta/head2/alpha", "meta/head3/alpha"):
        assert metrics[head] == 1.0
    assert torch.all(torch.isinf(logits[:, k]))
    assert (logits[1:, algo.names.index("gamma")] - 4.6).abs().min() > 1e-4  # the others still move
    with pytest.raises(ConfigError, match="params.alpha_init"):
        _make("stac", "params.alpha_init=0")
