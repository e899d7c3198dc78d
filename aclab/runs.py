"""Run directories: resolved config, metrics (CSV, JSONL, TensorBoard), atomic checkpoints, summary.

Layout of a run directory::

    RUN_DIR/
      config.json          the full resolved configuration
      metrics.csv          one row per logged iteration: step, time_s, then metric columns
      metrics.jsonl        the same rows as JSON lines
      evals.csv            step, split, mean_return, std_return, num_episodes, returns (space-separated)
      episodes.csv         one row per finished training episode: step, env, return, length, level, task
      summary.json         algo, env_id, seed, steps, wall_time_s, steps_per_s, final_return, status, ...
      checkpoints/ckpt_<step>.pt   written atomically (temporary file, fsync, rename)
      checkpoints/best.pt  the checkpoint of the best evaluation so far (best.json: its step and score)
      tb/                  TensorBoard event files
      learning_curve.png   episode return against env steps

Resuming truncates every log to the step of the checkpoint it resumes from, so a killed run that is
resumed has exactly the rows of an uninterrupted one (TensorBoard uses ``purge_step`` for the same).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"ckpt_(\d+)\.pt$")
BEST_CHECKPOINT, BEST_INFO = "best.pt", "best.json"
EVAL_COLUMNS = ["step", "split", "mean_return", "std_return", "num_episodes", "returns"]
# step: env steps when the episode ended; env: index of the env in the batch (empty when the algorithm
# collected it elsewhere, e.g. actor processes); level: Procgen level seed; task: Meta-World / meta-RL task.
EPISODE_COLUMNS = ["step", "env", "return", "length", "level", "task"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Run:
    """One run directory. Create with :meth:`create`, reopen with :meth:`resume`."""

    def __init__(self, path: Path, config_dict: dict, start_step: int = 0):
        self.path = Path(path)
        self.config_dict = config_dict
        self.checkpoint_dir = self.path / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] = []
        self._rows_cache: list[dict] | None = None
        self._tb = None
        self._tb_purge_step = start_step if start_step > 0 else None
        self.started = time.time()
        self.sinks: list = []  # mirrors of the logs (e.g. Weights & Biases): log(step, dict), close()

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(cls, path: Path, config_dict: dict, *, overwrite: bool = False) -> Run:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"run directory {path} already exists and is not empty; resume it with "
                    f"'aclab train --resume {path}', pass --overwrite, or choose another --run-dir"
                )
            if not (path / "config.json").exists():
                raise FileExistsError(f"{path} is not empty and is not a run directory: refusing to overwrite it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(config_dict, indent=2, default=list))
        run = cls(path, config_dict)
        run.write_summary({"status": "running"})
        return run

    @classmethod
    def resume(cls, path: Path) -> tuple[Run, dict | None]:
        """Reopen ``path``; return the run and its latest checkpoint (None if it has none)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
        config_dict = json.loads((path / "config.json").read_text())
        checkpoint = load_latest_checkpoint(path / "checkpoints")
        step = int(checkpoint["step"]) if checkpoint is not None else 0
        run = cls(path, config_dict, start_step=step)
        run._truncate_logs(step)
        return run, checkpoint

    @classmethod
    def resume_readonly(cls, path: Path) -> tuple[Run, dict | None]:
        """Open ``path`` to append evaluations without truncating its training logs."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
        config_dict = json.loads((path / "config.json").read_text())
        return cls(path, config_dict), load_latest_checkpoint(path / "checkpoints")

    # ---------------------------------------------------------------- metrics
    def _truncate_logs(self, step: int) -> None:
        """Drop log rows written after ``step`` (they belong to work that the resume repeats)."""
        metrics_csv = self.path / "metrics.csv"
        if metrics_csv.exists():
            rows = list(csv.DictReader(metrics_csv.open()))
            keep = [r for r in rows if int(float(r["step"])) <= step]
            self._columns = list(rows[0].keys()) if rows else []
            self._rewrite_csv(keep)
        jsonl = self.path / "metrics.jsonl"
        if jsonl.exists():
            lines = [ln for ln in jsonl.read_text().splitlines() if ln.strip()]
            keep_lines = [ln for ln in lines if json.loads(ln)["step"] <= step]
            atomic_write_text(jsonl, "".join(ln + "\n" for ln in keep_lines))
        self._drop_best_after(step)
        for name, columns in (("evals.csv", EVAL_COLUMNS), ("episodes.csv", EPISODE_COLUMNS)):
            path = self.path / name
            if path.exists():
                rows = list(csv.DictReader(path.open()))
                keep = [r for r in rows if int(float(r["step"])) <= step]
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=columns)
                writer.writeheader()
                writer.writerows(keep)
                atomic_write_text(path, buf.getvalue())

    def _drop_best_after(self, step: int) -> None:
        info = self.best_checkpoint_info()
        if info is not None and info["step"] > step:  # found by work that the resume repeats
            (self.checkpoint_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
            (self.checkpoint_dir / BEST_INFO).unlink(missing_ok=True)

    def _rewrite_csv(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in self._columns})
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one row (``step`` = env steps so far) to metrics.csv, metrics.jsonl and TensorBoard."""
        row = {"step": int(step), "time_s": round(time.time() - self.started, 3)}
        row.update({k: (float(v) if v is not None else None) for k, v in metrics.items()})
        new_columns = [k for k in row if k not in self._columns]
        metrics_csv = self.path / "metrics.csv"
        if new_columns:
            old_rows = list(csv.DictReader(metrics_csv.open())) if metrics_csv.exists() else []
            self._columns = self._columns + new_columns
            self._rewrite_csv(old_rows)
        with open(metrics_csv, "a", newline="") as f:
            csv.writer(f).writerow([_format(row.get(k)) for k in self._columns])
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            for k, v in metrics.items():
                if v is not None and math.isfinite(float(v)):
                    tb.add_scalar(k, float(v), int(step))
        for sink in self.sinks:
            sink.log(int(step), {k: v for k, v in clean.items() if k != "step"})

    def log_episodes(self, rows: list[dict]) -> None:
        """Append finished training episodes (dicts with :data:`EPISODE_COLUMNS` keys) to episodes.csv."""
        if not rows:
            return
        path = self.path / "episodes.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPISODE_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: (f"{v:.8g}" if isinstance(v, float) else _format(v)) for k, v in
                              ((k, row.get(k)) for k in EPISODE_COLUMNS)} for row in rows)

    def log_eval(self, step: int, split: str, returns: list[float]) -> dict:
        """Append an evaluation (per-episode raw returns) to evals.csv and TensorBoard."""
        import numpy as np

        arr = np.asarray(returns, dtype=np.float64)
        record = {
            "step": int(step),
            "split": split,
            "mean_return": float(arr.mean()) if arr.size else float("nan"),
            "std_return": float(arr.std()) if arr.size else float("nan"),
            "num_episodes": int(arr.size),
            "returns": " ".join(f"{r:.6g}" for r in arr),
        }
        path = self.path / "evals.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EVAL_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: _format(v) for k, v in record.items()})
        tb = self.tensorboard()
        if tb is not None and arr.size:
            tb.add_scalar(f"eval/{split}_return", record["mean_return"], int(step))
        if arr.size:
            for sink in self.sinks:
                sink.log(int(step), {f"eval/{split}_return": record["mean_return"],
                                     f"eval/{split}_return_std": record["std_return"]})
        return record

    def tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV/JSONL still written
                return None
            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=self._tb_purge_step)
        return self._tb

    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.csv"
        return list(csv.DictReader(path.open())) if path.exists() else []

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, state: dict, keep: int = 2) -> Path:
        """Atomically write ``checkpoints/ckpt_<step>.pt`` and keep the newest ``keep`` of them."""
        state = dict(state, step=int(step))
        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.checkpoint_dir / f"ckpt_{int(step):012d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        for old in list_checkpoints(self.checkpoint_dir)[:-keep]:
            old.unlink(missing_ok=True)
        if self._tb is not None:
            self._tb.flush()
        return path

    def best_checkpoint_info(self) -> dict | None:
        """``{"step", "score", "split"}`` of ``checkpoints/best.pt``, or None when there is none."""
        path = self.checkpoint_dir / BEST_INFO
        if not path.exists() or not (self.checkpoint_dir / BEST_CHECKPOINT).exists():
            return None
        return json.loads(path.read_text())

    def save_best_checkpoint(self, step: int, state: dict, score: float, split: str) -> bool:
        """Write ``checkpoints/best.pt`` when ``score`` (an evaluation's mean return) beats the best so far."""
        info = self.best_checkpoint_info()
        if info is not None and not score > info["score"]:
            return False
        buf = io.BytesIO()
        torch.save(dict(state, step=int(step)), buf)
        atomic_write_bytes(self.checkpoint_dir / BEST_CHECKPOINT, buf.getvalue())
        atomic_write_text(self.checkpoint_dir / BEST_INFO,
                          json.dumps({"step": int(step), "score": float(score), "split": split}))
        return True

    # ---------------------------------------------------------------- summary
    def write_summary(self, summary: dict) -> None:
        path = self.path / "summary.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(summary)
        atomic_write_text(path, json.dumps(current, indent=2, default=float))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory`` sorted by step (oldest first)."""
    if not Path(directory).exists():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest_checkpoint(directory: Path) -> dict | None:
    """Load the newest readable checkpoint (a torn or corrupt newest file falls back to the previous)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped, the older one used
            continue
    return None
