"""Run directories: resolved config, metrics (CSV, JSONL, TensorBoard), atomic checkpoints, summary,
the run-directory lock and the stop requests that signals raise.

Layout of a run directory::

    RUN_DIR/
      config.json          the full resolved configuration (rewritten when a resume changes a key)
      metrics.csv          one row per logged iteration: step, time_s (cumulative wall time), then metrics
      metrics.jsonl        the same rows as JSON lines
      evals.csv            the training loop's evaluations: step, split, mean_return, std_return,
                           num_episodes, returns (space-separated), levels (the Procgen level range
                           played, e.g. "[0, 200)" or "all levels"; empty for other envs)
      evals_adhoc.csv      ``aclab eval`` results (not part of the run's record; the report ignores them
                           unless asked)
      episodes.csv         one row per finished training episode: step, env, return, length, level, task
      summary.json         algo, env_id, seed, steps, wall_time_s, steps_per_s, final_return, status, ...
      checkpoints/ckpt_<step>.pt   written atomically (temporary file, fsync, rename)
      checkpoints/best.pt  the checkpoint of the best evaluation so far (best.json: its step and score)
      tb/                  TensorBoard event files
      learning_curve.png   episode return against env steps
      .lock                held (``filelock``) by the one process that writes the run

Guarantees:

* **One writer.** :meth:`Run.create` and :meth:`Run.resume` take an exclusive lock on ``RUN_DIR/.lock``
  before they touch anything; a second writer gets :class:`RunInUseError` naming the holder.
* **Exact logs after a resume.** Every log is truncated to the checkpoint it resumes from: metric rows
  after its step, evaluation rows written after it (the checkpoint records how many existed; a final
  evaluation completed after the final checkpoint is kept, see :meth:`Run.mark_final_eval`), and
  TensorBoard events after its step (``purge_step = step + 1``). ``time_s`` continues from the
  checkpoint's wall time.
* **No silent loss.** An unreadable newest checkpoint is renamed ``*.unreadable`` and the newest readable
  one is used, with a warning; if checkpoints exist but none is readable, resuming refuses
  (:class:`UnreadableCheckpointsError`) unless ``start_over=True``, which moves the old logs into
  ``RUN_DIR/discarded-<time>/``. Retention keeps the newest ``keep`` checkpoints *that load*. Torn
  temporary files (``.*.tmp<pid>``) of a process killed mid-write are removed at create and resume.

Stopping: the training loop's signal handler calls :func:`request_stop`. An iteration that ends within
``STOP_GRACE_S`` seconds (default 3; environment variable ``ACLAB_STOP_GRACE_S``) of the request is
completed and checkpointed; a longer one is abandoned: the loops inside an iteration (env steps,
minibatches, evaluation episodes) call :func:`check_stop`, which then raises :class:`StopRequested` in
the main thread. The state inside an iteration is not checkpointed (it is not consistent); the run
resumes from its latest checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import socket
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"ckpt_(\d+)\.pt$")
BEST_CHECKPOINT, BEST_INFO = "best.pt", "best.json"
EVAL_COLUMNS = ["step", "split", "mean_return", "std_return", "num_episodes", "returns", "levels"]
ADHOC_EVAL_COLUMNS = [*EVAL_COLUMNS, "deterministic"]
EVALS_FILE = "evals.csv"
ADHOC_EVALS_FILE = "evals_adhoc.csv"
LOCK_FILE = ".lock"
EPISODES_FILE = "episodes.csv"
LOG_FILES = ("metrics.csv", "metrics.jsonl", EVALS_FILE, EPISODES_FILE, "summary.json", "learning_curve.png", "tb")
_TEMP_RE = re.compile(r"^\..+\.tmp\d+$")
# step: env steps when the episode ended; env: index of the env in the batch (empty when the algorithm
# collected it elsewhere, e.g. actor processes); level: Procgen level seed; task: Meta-World / meta-RL task.
EPISODE_COLUMNS = ["step", "env", "return", "length", "level", "task"]


class RunError(ValueError):
    """A run directory cannot be used as asked; the message says why and what to do."""


class RunInUseError(RunError):
    """Another process holds the run directory's lock."""


class UnreadableCheckpointsError(RunError):
    """Checkpoints exist but none of them can be read."""


# ---------------------------------------------------------------------------------------------
# Stop requests (set by the training loop's signal handler, checked inside iterations)
# ---------------------------------------------------------------------------------------------
class StopRequested(Exception):
    """Raised by :func:`check_stop` inside an iteration after SIGINT/SIGTERM."""


STOP_GRACE_S = float(os.environ.get("ACLAB_STOP_GRACE_S", "3"))
_stop = threading.Event()
_stop_time = [0.0]


def request_stop() -> None:
    if not _stop.is_set():
        _stop_time[0] = time.monotonic()
    _stop.set()


def clear_stop() -> None:
    _stop.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def check_stop() -> None:
    """Raise :class:`StopRequested` once a stop was requested more than ``STOP_GRACE_S`` seconds ago (main
    thread only: actor threads go on until the learner stops them). Costs ~0.1 us; call it between env
    steps and between minibatches."""
    if (_stop.is_set() and time.monotonic() - _stop_time[0] >= STOP_GRACE_S
            and threading.current_thread() is threading.main_thread()):
        raise StopRequested("stop requested")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
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


def remove_temp_files(path: Path) -> list[Path]:
    """Delete the torn temporary files (``.<name>.tmp<pid>``) of an atomic write that was killed, in ``path``
    and ``path/checkpoints``; return them. Only call it while holding the run's lock."""
    removed = []
    for folder in (Path(path), Path(path) / "checkpoints"):
        if folder.is_dir():
            for item in folder.iterdir():
                if _TEMP_RE.match(item.name) and item.is_file():
                    item.unlink(missing_ok=True)
                    removed.append(item)
    return removed


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(header, complete rows) of a CSV file; a torn last line (fewer cells than the header) is dropped."""
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if None not in r.values() and None not in r]
        return list(reader.fieldnames or []), rows


def _row_step(row: dict) -> int | None:
    try:
        return int(float(row["step"]))
    except (TypeError, ValueError):
        return None


def read_run_config(path: Path) -> dict:
    """The dict of ``path/config.json``; RunError if the folder is not a run directory or the file is
    empty, truncated or lacks ``algo``."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a run directory" + (" (it is a file)" if path.exists() else ""))
    config_path = path / "config.json"
    if not config_path.exists():
        raise RunError(f"{path} is not a run directory (no config.json)")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{config_path} is unreadable ({type(exc).__name__}: {exc}); the run cannot be "
                       "rebuilt from it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("algo"), str):
        raise RunError(f"{config_path} has no 'algo' entry; it is not an aclab run configuration")
    return data


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive, non-blocking lock on ``RUN_DIR/.lock`` (``filelock``; released when the process dies,
    so a killed run never leaves a stale lock). ``RUN_DIR/.lock.owner`` names the holder."""

    def __init__(self, path: Path):
        from filelock import FileLock

        self.path = Path(path)
        self._lock = FileLock(str(self.path / LOCK_FILE), timeout=0)

    def acquire(self) -> RunLock:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = ""
            try:
                owner = json.loads((self.path / f"{LOCK_FILE}.owner").read_text())
                holder = f" (pid {owner['pid']} on {owner['host']}, since {owner['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            raise RunInUseError(f"run directory {self.path} is in use by another aclab process{holder}; "
                                "stop it first, or choose another --run-dir") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(self.path / f"{LOCK_FILE}.owner", json.dumps(owner))
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.path / f"{LOCK_FILE}.owner").unlink(missing_ok=True)
            self._lock.release(force=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """What :meth:`Run.resume` found: the checkpoint (None: none yet), notes for the console (fallbacks,
    cleaned files) and whether the final evaluation at the checkpoint's step was already completed."""

    checkpoint: dict | None
    notes: list[str]
    final_eval_done: bool = False


class Run:
    """One run directory. Create with :meth:`create`, reopen with :meth:`resume`; :meth:`close` releases
    the lock."""

    def __init__(self, path: Path, config_dict: dict, start_step: int = 0, lock: RunLock | None = None):
        self.path = Path(path)
        self.config_dict = config_dict
        self.checkpoint_dir = self.path / "checkpoints"
        self._lock = lock
        if lock is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] = []
        self._tb = None
        self._tb_purge_step = start_step + 1 if start_step > 0 else None  # events after the checkpoint
        self._time_offset = 0.0
        self.started = time.time()
        self._readable: set[str] = set()  # checkpoint file names known to load (written or read here)
        self.sinks: list = []  # mirrors of the logs (e.g. Weights & Biases): log(step, dict), close()

    # ---------------------------------------------------------------- construction
    @staticmethod
    def check_new(path: Path, overwrite: bool = False) -> None:
        """Raise (FileExistsError / RunError) if a new run cannot be created at ``path``; creates nothing."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"--run-dir {path} is a file, not a directory; choose another --run-dir")
        if path.exists() and any(p.name not in (LOCK_FILE, f"{LOCK_FILE}.owner") for p in path.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"run directory {path} already exists and is not empty; resume it with "
                    f"'aclab train --resume {path}', pass --overwrite, or choose another --run-dir"
                )
            if not (path / "config.json").exists():
                raise FileExistsError(f"{path} is not empty and is not a run directory: refusing to overwrite it")

    @classmethod
    def create(cls, path: Path, config_dict: dict, *, overwrite: bool = False) -> Run:
        path = Path(path)
        cls.check_new(path, overwrite)
        path.mkdir(parents=True, exist_ok=True)
        lock = RunLock(path).acquire()
        try:
            cls.check_new(path, overwrite)  # again, now that no other writer can change it
            for item in path.iterdir():
                if item.name in (LOCK_FILE, f"{LOCK_FILE}.owner"):
                    continue
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            atomic_write_text(path / "config.json", json.dumps(config_dict, indent=2, default=list))
            run = cls(path, config_dict, lock=lock)
            run.write_summary({"status": "running"})
        except BaseException:
            lock.release()
            raise
        return run

    @classmethod
    def resume(cls, path: Path, *, start_over: bool = False) -> tuple[Run, ResumePoint]:
        """Lock ``path``, find its newest readable checkpoint and truncate the logs to it.

        Unreadable checkpoints newer than it are renamed ``*.unreadable`` (a note says so). With checkpoints
        but none readable: :class:`UnreadableCheckpointsError`, or with ``start_over`` the old logs and
        checkpoints move to ``discarded-<time>/`` and the run restarts from step 0.
        """
        path = Path(path)
        config_dict = read_run_config(path)
        lock = RunLock(path).acquire()
        try:
            notes = [f"removed {len(removed)} torn temporary file(s) of an interrupted write"
                     for removed in [remove_temp_files(path)] if removed]
            checkpoint, checkpoint_path, unreadable = find_readable_checkpoint(path / "checkpoints")
            if checkpoint is None and unreadable:
                names = ", ".join(p.name for p in unreadable)
                if not start_over:
                    raise UnreadableCheckpointsError(
                        f"{path}: no checkpoint can be read ({names}); resuming would restart from step 0 and "
                        f"discard the logs. Pass --start-over to restart, the old logs moved aside")
                aside = _move_aside(path)
                notes.append(f"no readable checkpoint ({names}): starting over; the old logs are in {aside}")
            elif unreadable:
                for bad in unreadable:
                    bad.rename(bad.with_name(bad.name + ".unreadable"))
                notes.append(f"checkpoint(s) {', '.join(p.name for p in unreadable)} cannot be read (renamed "
                             f"*.unreadable); resuming from the older {checkpoint_path.name}")
            step = int(checkpoint["step"]) if checkpoint is not None else 0
            run = cls(path, config_dict, start_step=step, lock=lock)
            if checkpoint_path is not None:
                run._readable.add(checkpoint_path.name)
            final_eval_done = run._truncate_logs(step, checkpoint)
        except BaseException:
            lock.release()
            raise
        return run, ResumePoint(checkpoint, notes, final_eval_done)

    def write_config(self, config_dict: dict) -> None:
        """Replace config.json (a resume that changed e.g. ``total_steps`` records it for later resumes)."""
        self.config_dict = config_dict
        atomic_write_text(self.path / "config.json", json.dumps(config_dict, indent=2, default=list))

    def start_clock(self, offset_s: float = 0.0) -> None:
        """``time_s`` of later rows = ``offset_s`` (the wall time before this process) + time since now."""
        self._time_offset = float(offset_s)
        self.started = time.time()

    def elapsed(self) -> float:
        """Cumulative wall time of the run's surviving work, in seconds."""
        return self._time_offset + (time.time() - self.started)

    # ---------------------------------------------------------------- metrics
    def _truncate_logs(self, step: int, checkpoint: dict | None) -> bool:
        """Drop log rows written after the checkpoint at ``step`` (the resume repeats that work); return
        whether the final evaluation at ``step`` was completed (its rows are then kept)."""
        header, rows = _csv_rows(self.path / "metrics.csv")
        self._columns = header
        if header:
            self._rewrite_csv([r for r in rows if (_row_step(r) or 0) <= step and _row_step(r) is not None])
        jsonl = self.path / "metrics.jsonl"
        if jsonl.exists():
            keep_lines = []
            for line in jsonl.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        keep_lines.append(line)
                except (ValueError, KeyError, TypeError):  # a torn last line
                    continue
            atomic_write_text(jsonl, "".join(ln + "\n" for ln in keep_lines))
        self._drop_best_after(step)
        episodes = self.path / EPISODES_FILE
        if episodes.exists():
            _, rows = _csv_rows(episodes)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=EPISODE_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if _row_step(r) is not None and _row_step(r) <= step)
            atomic_write_text(episodes, buf.getvalue())
        final = self.read_summary().get("final_eval") or {}
        final_done = checkpoint is not None and final.get("step") == step
        evals = self.path / EVALS_FILE
        if evals.exists():
            _, rows = _csv_rows(evals)
            rows = [r for r in rows if _row_step(r) is not None and _row_step(r) <= step]
            logs = (checkpoint or {}).get("logs")
            if logs is not None:  # the rows that existed when the checkpoint was written (+ a completed final)
                rows = rows[: int(final["rows"]) if final_done else int(logs["eval_rows"])]
            elif checkpoint is None:
                rows = []
            self._write_evals(rows)
        return final_done

    def _write_evals(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / EVALS_FILE, buf.getvalue())

    def eval_rows(self) -> int:
        """Rows in evals.csv (recorded in each checkpoint)."""
        return len(_csv_rows(self.path / EVALS_FILE)[1])

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
        row = {"step": int(step), "time_s": round(self.elapsed(), 3)}
        row.update({k: (float(v) if v is not None else None) for k, v in metrics.items()})
        new_columns = [k for k in row if k not in self._columns]
        metrics_csv = self.path / "metrics.csv"
        if new_columns:
            old_rows = _csv_rows(metrics_csv)[1]
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

    def log_eval(self, step: int, split: str, returns: list[float], levels: str = "") -> dict:
        """Append an evaluation (per-episode raw returns; ``levels`` the Procgen level range, "" for other
        envs) to evals.csv and TensorBoard."""
        record = eval_record(step, split, returns, levels=levels)
        append_eval(self.path / EVALS_FILE, record)
        tb = self.tensorboard()
        if tb is not None and record["num_episodes"]:
            tb.add_scalar(f"eval/{split}_return", record["mean_return"], int(step))
        if record["num_episodes"]:
            for sink in self.sinks:
                sink.log(int(step), {f"eval/{split}_return": record["mean_return"],
                                     f"eval/{split}_return_std": record["std_return"]})
        return record

    def mark_final_eval(self, step: int) -> None:
        """Record in summary.json that the final evaluation at ``step`` is complete (a resume keeps it)."""
        self.write_summary({"final_eval": {"step": int(step), "rows": self.eval_rows()}})

    def tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV/JSONL still written
                return None
            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=self._tb_purge_step)
        return self._tb

    def read_metrics(self) -> list[dict]:
        return _csv_rows(self.path / "metrics.csv")[1]

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, state: dict, keep: int = 2) -> Path:
        """Atomically write ``checkpoints/ckpt_<step>.pt`` and keep the newest ``keep`` readable ones."""
        state = dict(state, step=int(step))
        buf = io.BytesIO()
        torch.save(state, buf)
        path = self.checkpoint_dir / f"ckpt_{int(step):012d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        self._readable.add(path.name)
        self._prune_checkpoints(keep)
        if self._tb is not None:
            self._tb.flush()
        return path

    def _prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints that load; an unreadable one is renamed aside and
        not counted (so a corrupt file never displaces a good one)."""
        kept = 0
        for path in reversed(list_checkpoints(self.checkpoint_dir)):
            if kept >= keep:
                path.unlink(missing_ok=True)
            elif path.name in self._readable or checkpoint_is_intact(path):
                self._readable.add(path.name)
                kept += 1
            else:
                path.rename(path.with_name(path.name + ".unreadable"))

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
    def read_summary(self) -> dict:
        try:
            data = json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_summary(self, summary: dict) -> None:
        current = self.read_summary()
        current.update(summary)
        atomic_write_text(self.path / "summary.json", json.dumps(current, indent=2, default=float))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _move_aside(path: Path) -> Path:
    """Move the logs and checkpoints of ``path`` into ``path/discarded-<time>/``; return that folder."""
    aside = path / time.strftime("discarded-%Y%m%d-%H%M%S")
    aside.mkdir()
    for name in (*LOG_FILES, "checkpoints"):
        if (path / name).exists():
            shutil.move(str(path / name), str(aside / name))
    return aside


# ---------------------------------------------------------------------------------------------
# Evaluation records
# ---------------------------------------------------------------------------------------------
def eval_record(step: int, split: str, returns: list[float], **extra: Any) -> dict:
    import numpy as np

    arr = np.asarray(returns, dtype=np.float64)
    return {
        "step": int(step),
        "split": split,
        "mean_return": float(arr.mean()) if arr.size else float("nan"),
        "std_return": float(arr.std()) if arr.size else float("nan"),
        "num_episodes": int(arr.size),
        "returns": " ".join(f"{r:.6g}" for r in arr),
        **extra,
    }


def append_eval(path: Path, record: dict) -> None:
    """Append one evaluation record to a CSV file (header written when the file is new)."""
    columns = EVAL_COLUMNS + [k for k in record if k not in EVAL_COLUMNS]
    new = not Path(path).exists()
    if not new:  # a file written before a column was added keeps its header
        with open(path, newline="") as f:
            columns = next(csv.reader(f), None) or columns
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _format(v) for k, v in record.items()})


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------
def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory`` sorted by step (oldest first)."""
    if not Path(directory).exists():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint; ValueError if it cannot be read or is not an aclab checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torn zip, pickle errors, EOF: all mean "unreadable"
        raise ValueError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state or "algo" not in state:
        raise ValueError(f"{path.name}: not an aclab checkpoint")
    return state


def checkpoint_is_intact(path: Path) -> bool:
    """Whether a checkpoint file is a complete zip archive with matching checksums (cheaper than loading)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def find_readable_checkpoint(directory: Path) -> tuple[dict | None, Path | None, list[Path]]:
    """(newest readable checkpoint, its path, the newer unreadable files), newest first."""
    unreadable: list[Path] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), path, unreadable
        except ValueError:
            unreadable.append(path)
    return None, None, unreadable


def load_latest_checkpoint(directory: Path) -> dict | None:
    """Load the newest readable checkpoint (a torn or corrupt newest file falls back to the previous)."""
    return find_readable_checkpoint(directory)[0]


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------
VALUE_LOSS_KEYS = ("loss/value", "loss/critic", "loss/vf", "loss/qf", "loss/separate_value")
KL_KEYS = ("approx_kl", "kl")


class DivergenceMonitor:
    """Flags a diverged run from its logged metrics (each kind once): a value/critic loss above
    ``value_loss_max``, a policy KL (``approx_kl`` / ``kl``) above ``kl_max``, or, for discrete actions, a
    policy entropy below ``entropy_min`` (a collapsed policy). A threshold of 0 turns its check off."""

    def __init__(self, value_loss_max: float, kl_max: float, entropy_min: float, discrete: bool):
        self.value_loss_max, self.kl_max = value_loss_max, kl_max
        self.entropy_min = entropy_min if discrete else 0.0
        self.flagged: dict[str, str] = {}

    def check(self, step: int, metrics: dict[str, float]) -> list[str]:
        """New warnings (one line each) for ``metrics`` logged at ``step``."""
        found = []

        def flag(kind: str, message: str) -> None:
            if kind not in self.flagged:
                self.flagged[kind] = message
                found.append(message)

        for key in VALUE_LOSS_KEYS:
            value = metrics.get(key)
            if self.value_loss_max and value is not None and abs(float(value)) > self.value_loss_max:
                flag("value_loss", f"diverging at step {step}: {key} = {float(value):.3g} > "
                                   f"divergence.value_loss_max = {self.value_loss_max:g}")
        for key in KL_KEYS:
            value = metrics.get(key)
            if self.kl_max and value is not None and float(value) > self.kl_max:
                flag("kl", f"diverging at step {step}: {key} = {float(value):.3g} > divergence.kl_max = "
                           f"{self.kl_max:g}")
        entropy = metrics.get("entropy")
        if self.entropy_min and entropy is not None and float(entropy) < self.entropy_min:
            flag("entropy", f"policy collapse at step {step}: entropy = {float(entropy):.3g} < "
                            f"divergence.entropy_min = {self.entropy_min:g}")
        return found

    def state_dict(self) -> dict:
        return dict(self.flagged)

    def load_state_dict(self, state: dict) -> None:
        self.flagged = dict(state)


# ---------------------------------------------------------------------------------------------
# What the training loop carries across a resume
# ---------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """The training loop's own state, saved in every checkpoint as ``checkpoint["loop"]``: the recent
    episode returns (the summary's ``final_return``), the wall time so far, the evaluation schedule
    (step of the last evaluation) and the divergence warnings already given."""

    recent_returns: list[float]
    wall_time_s: float = 0.0
    last_eval_step: int = 0
    divergence: dict | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict | None) -> LoopState:
        if checkpoint is None:
            return cls([])
        loop = checkpoint.get("loop")
        if loop is None:  # a checkpoint written before the loop state existed
            return cls(list(checkpoint.get("recent_returns", [])), float(checkpoint.get("wall_time_s", 0.0)),
                       int(checkpoint["step"]))
        return cls(list(loop["recent_returns"]), float(loop["wall_time_s"]), int(loop["last_eval_step"]),
                   loop.get("divergence"))

    def state_dict(self) -> dict:
        return {"recent_returns": list(self.recent_returns), "wall_time_s": float(self.wall_time_s),
                "last_eval_step": int(self.last_eval_step), "divergence": self.divergence}
