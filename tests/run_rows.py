"""Reading a run's metrics.csv in tests (resume and determinism checks compare these rows)."""

import csv
from pathlib import Path

TIMING_COLUMNS = ("time_s", "steps_per_s")


def metric_rows(run_dir: Path, drop: tuple[str, ...] = TIMING_COLUMNS) -> list[dict]:
    """The rows of ``run_dir/metrics.csv`` as dicts, without the wall-clock columns (which differ between
    otherwise identical runs)."""
    with (Path(run_dir) / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]
