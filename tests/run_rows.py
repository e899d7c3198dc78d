"""Reading a run's metrics.csv in tests (resume and determinism checks compare these rows)."""

import csv
from pathlib import Path

import numpy as np
import torch

TIMING_COLUMNS = ("time_s", "steps_per_s")


def metric_rows(run_dir: Path, drop: tuple[str, ...] = TIMING_COLUMNS) -> list[dict]:
    """The rows of ``run_dir/metrics.csv`` as dicts, without the wall-clock columns (which differ between
    otherwise identical runs)."""
    with (Path(run_dir) / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def assert_same_state(a, b, path: str = "algo") -> None:
    """``a`` and ``b`` (nested dicts / lists / tensors / arrays / numbers, as in a checkpoint) are equal bit for
    bit, NaN equal to NaN; the assertion names the first path that differs."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path


def assert_resumed_like_uninterrupted(full_dir: Path, split_dir: Path) -> None:
    """An interrupted-then-resumed run (``split_dir``) ends exactly as the uninterrupted one (``full_dir``):
    the whole algorithm state of the last checkpoints (networks, optimisers, buffers, RNGs, schedules) bit for
    bit, and the same metrics rows."""
    from aclab.runs import load_latest_checkpoint

    full = load_latest_checkpoint(Path(full_dir) / "checkpoints")["algo"]
    split = load_latest_checkpoint(Path(split_dir) / "checkpoints")["algo"]
    assert_same_state(full, split)
    assert metric_rows(full_dir) == metric_rows(split_dir)
