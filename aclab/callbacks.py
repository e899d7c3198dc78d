"""Callbacks for :func:`aclab.train.train`: watch a run, and stop it, from Python.

    from aclab.callbacks import Callback, StopOnReturn
    from aclab.train import make_config, train

    class PrintLoss(Callback):
        def on_iteration(self, info):
            print(info.step, info.metrics.get("loss"))

    train(make_config("ppo", "CartPole-v1"), "runs/cp", callbacks=[PrintLoss(), StopOnReturn(475.0)])

A callback is any object with some of these methods (a missing one is skipped):

* ``on_iteration(info: IterationInfo)``: after every training iteration, with its metrics. Returning
  ``False`` stops the run at this iteration boundary (a checkpoint, then the final evaluation; the summary
  says ``status: "stopped"`` and ``stop_reason``). ``None`` or ``True`` go on.
* ``on_evaluation(info: EvaluationInfo)``: after each evaluation (periodic and final), with the raw
  episode returns. Returning ``False`` stops the run, as above.
* ``on_checkpoint(step: int, path: Path)``: after each checkpoint is written.

Raising :class:`StopTraining` from any of them stops the run too, and can skip the final evaluation
(``StopTraining(reason, final_eval=False)``; what a pruned tuning trial does).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Callback", "EvaluationInfo", "IterationInfo", "LambdaCallback", "StopOnReturn", "StopTraining"]


class StopTraining(Exception):
    """Raised by a callback to stop the run after a clean checkpoint (``final_eval=False``: without the
    final evaluation)."""

    def __init__(self, reason: str = "stopped by a callback", final_eval: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.final_eval = final_eval


@dataclass
class IterationInfo:
    """One training iteration: ``step`` (env steps so far), ``iteration`` (1-based), ``metrics`` (the
    iteration's metrics, as in metrics.csv), ``episode_returns`` (raw returns of the training episodes that
    finished in it), ``run_dir``, ``config`` and ``algo`` (the live algorithm object; read, don't mutate)."""

    step: int
    iteration: int
    metrics: dict[str, float]
    episode_returns: np.ndarray
    run_dir: Path
    config: Any = None
    algo: Any = None


@dataclass
class EvaluationInfo:
    """One evaluation: ``step``, ``split`` ("train" / "test"), ``returns`` (raw episode returns), ``final``
    (the evaluation after training), ``run_dir``."""

    step: int
    split: str
    returns: list[float]
    final: bool
    run_dir: Path

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns)) if len(self.returns) else float("nan")


class Callback:
    """Base class with no-op hooks; override the ones you need (subclassing is optional)."""

    def on_iteration(self, info: IterationInfo) -> bool | None:
        return None

    def on_evaluation(self, info: EvaluationInfo) -> bool | None:
        return None

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None


class LambdaCallback(Callback):
    """A callback from plain functions: ``LambdaCallback(on_iteration=lambda info: info.step < 5000)``."""

    def __init__(self, on_iteration: Callable[[IterationInfo], Any] | None = None,
                 on_evaluation: Callable[[EvaluationInfo], Any] | None = None,
                 on_checkpoint: Callable[[int, Path], Any] | None = None):
        self.on_iteration_fn, self.on_evaluation_fn, self.on_checkpoint_fn = on_iteration, on_evaluation, on_checkpoint

    def on_iteration(self, info):
        return self.on_iteration_fn(info) if self.on_iteration_fn else None

    def on_evaluation(self, info):
        return self.on_evaluation_fn(info) if self.on_evaluation_fn else None

    def on_checkpoint(self, step, path):
        return self.on_checkpoint_fn(step, path) if self.on_checkpoint_fn else None


@dataclass
class StopOnReturn(Callback):
    """Stop once the mean raw return reaches ``threshold``: over the last ``window`` training episodes
    (``source="train"``, checked every iteration once ``window`` episodes have finished), or of an
    evaluation of that split (``source="test"`` / ``"train-eval"``)."""

    threshold: float
    window: int = 100
    source: str = "train"
    _recent: collections.deque = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.source not in ("train", "test", "train-eval"):
            raise ValueError(f"StopOnReturn source={self.source!r}: expected 'train', 'test' or 'train-eval'")
        if self.window < 1:
            raise ValueError(f"StopOnReturn window={self.window}: expected an integer >= 1")
        self._recent = collections.deque(maxlen=self.window)

    def on_iteration(self, info: IterationInfo) -> bool | None:
        if self.source != "train":
            return None
        self._recent.extend(float(r) for r in info.episode_returns)
        if len(self._recent) == self.window and np.mean(self._recent) >= self.threshold:
            raise StopTraining(f"mean return of the last {self.window} training episodes "
                               f"{np.mean(self._recent):.4g} >= {self.threshold:g}")
        return None

    def on_evaluation(self, info: EvaluationInfo) -> bool | None:
        split = "train" if self.source == "train-eval" else "test"
        if self.source != "train" and info.split == split and info.mean_return >= self.threshold:
            raise StopTraining(f"{split} evaluation mean return {info.mean_return:.4g} >= {self.threshold:g}")
        return None


class CallbackList:
    """Calls every callback's hook in order; records the first stop request (:attr:`stop`)."""

    def __init__(self, callbacks: Sequence[Any] = ()):
        for cb in callbacks:
            if not any(hasattr(cb, name) for name in ("on_iteration", "on_evaluation", "on_checkpoint")):
                raise TypeError(f"{cb!r} is not a callback: it has none of on_iteration, on_evaluation, "
                                "on_checkpoint")
        self.callbacks = list(callbacks)
        self.stop: StopTraining | None = None

    def _call(self, name: str, *args) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if hook is None:
                continue
            try:
                result = hook(*args)
            except StopTraining as exc:
                result, request = False, exc
            else:
                request = StopTraining(f"{type(cb).__name__}.{name} returned False")
            if result is False and self.stop is None:
                self.stop = request

    def on_iteration(self, info: IterationInfo) -> None:
        self._call("on_iteration", info)

    def on_evaluation(self, info: EvaluationInfo) -> None:
        self._call("on_evaluation", info)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._call("on_checkpoint", step, path)
