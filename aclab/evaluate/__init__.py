"""Evaluation and reporting: score normalisations, RLiable statistics, run-directory IO, reports.

* :mod:`aclab.evaluate.scores`: Procgen min-max, Atari human-normalised, Atari-5/3, PPO-normalised.
* :mod:`aclab.evaluate.stats`: aggregates (median, IQM, mean, optimality gap), P(X > Y), performance
  profiles with stratified-bootstrap CIs (thin wrappers over ``rliable``).
* :mod:`aclab.evaluate.runs_io`: load run directories, final scores, synthetic run directories.
* :mod:`aclab.evaluate.report`: :func:`build_report` writes ``report.md`` with PNG figures.

The names below are imported lazily, so ``import aclab.evaluate.scores`` does not pull in matplotlib
or rliable. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_report": "report",
    "ReportError": "report",
    "RunDirError": "runs_io",
    "RunRecord": "runs_io",
    "final_score": "runs_io",
    "group_runs": "runs_io",
    "load_run": "runs_io",
    "load_runs": "runs_io",
    "write_synthetic_run": "runs_io",
    "atari3": "scores",
    "atari5": "scores",
    "atari_human_normalized": "scores",
    "normalize": "scores",
    "ppo_normalized": "scores",
    "procgen_minmax": "scores",
    "Interval": "stats",
    "StatsError": "stats",
    "aggregate_intervals": "stats",
    "aggregate_point_estimates": "stats",
    "performance_profiles": "stats",
    "probability_of_improvement": "stats",
    "probability_of_improvement_intervals": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aclab.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aclab.evaluate.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
