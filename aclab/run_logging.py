"""What the training loop logs besides metrics: finished episodes, plain progress lines, Weights & Biases.

* :class:`EpisodeRecorder` turns the episodes the training envs finish during an iteration into
  ``episodes.csv`` rows (env step at the episode's end, env index, return, length, level, task).
* :class:`PlainProgress`: when the output is not a terminal (nohup, batch jobs), one line every
  ``every_s`` seconds instead of a progress bar.
* :class:`WandbSink`: mirrors a run's metrics and evaluations to Weights & Biases (optional extra).
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EpisodeRecorder", "PlainProgress", "WandbSink", "format_duration"]


class EpisodeRecorder:
    """Collects the training episodes of one iteration.

    The loop calls :meth:`begin` before ``algo.iterate(envs)`` and :meth:`rows` after it. Episodes that the
    loop's own envs finished are recorded by the envs (:meth:`aclab.envs.VecEnv.record_episodes`) with
    their env index, level and task, and the env step at which they ended: ``steps_before + (calls since
    begin) * num_envs``, capped at the iteration's last step. Algorithms that collect elsewhere (actor
    processes, meta-RL task envs) give only ``algo.last_episode_returns`` (and, when they have them,
    ``last_episode_lengths`` / ``last_episode_tasks``): those rows carry the iteration's last step and no
    env index.
    """

    def __init__(self, envs):
        self.envs = envs
        envs.record_episodes(True)
        self._calls = 0
        self._steps = 0

    def begin(self, steps: int) -> None:
        self.envs.episode_log.clear()
        self._calls = self.envs.step_calls
        self._steps = int(steps)

    def rows(self, algo) -> list[dict[str, Any]]:
        end = int(algo.steps)
        logged = list(self.envs.episode_log)
        self.envs.episode_log.clear()
        if logged:
            n = self.envs.num_envs
            return [{"step": min(end, self._steps + (call - self._calls) * n), "env": env, "return": ret,
                     "length": length, "level": level, "task": task}
                    for call, env, ret, length, level, task in logged]
        returns = np.asarray(getattr(algo, "last_episode_returns", ()), dtype=np.float64).reshape(-1)
        lengths = _optional(algo, "last_episode_lengths", returns.size)
        tasks = _optional(algo, "last_episode_tasks", returns.size)
        return [{"step": end, "env": None, "return": float(r), "length": None if lengths is None else int(lengths[i]),
                 "level": None, "task": None if tasks is None else tasks[i]} for i, r in enumerate(returns)]

    def close(self) -> None:
        self.envs.record_episodes(False)


def _optional(algo, name: str, size: int) -> list | None:
    value = getattr(algo, name, None)
    if value is None:
        return None
    array = np.asarray(value).reshape(-1)
    return array.tolist() if array.size == size else None


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Plain progress lines (for logs): ``train step 12,288/100,000 (12%) | 2,345 steps/s | return 45.2
    (last 100 episodes) | elapsed 0:00:05 | eta 0:00:37``, one every ``every_s`` seconds, plus the first
    iteration's and the last one's."""

    def __init__(self, total: int, start_steps: int, every_s: float, file=None, clock=time.monotonic):
        self.total = int(total)
        self.start_steps = int(start_steps)
        self.every_s = float(every_s)
        self.file = file if file is not None else sys.stdout
        self.clock = clock
        self._start = clock()
        self._last_line: float | None = None
        self._printed_steps: int | None = None
        self._last = None

    def __enter__(self):
        return self

    def update(self, steps: int, metrics: dict, recent) -> None:
        now = self.clock()
        self._last = (steps, metrics, list(recent))
        if self._last_line is None or now - self._last_line >= self.every_s:
            self._print(steps, metrics, recent, now)

    def _print(self, steps, metrics, recent, now) -> None:
        self._last_line = now
        self._printed_steps = steps
        elapsed = now - self._start
        done = steps - self.start_steps
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - steps) / rate if rate > 0 else float("nan")
        parts = [f"train step {steps:,}/{self.total:,} ({100.0 * steps / max(self.total, 1):.0f}%)",
                 f"{metrics.get('steps_per_s', rate):,.0f} steps/s"]
        if len(recent):
            parts.append(f"return {np.mean(recent):.4g} (last {len(recent)} episodes)")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if np.isfinite(eta):
            parts.append(f"eta {format_duration(eta)}")
        print(" | ".join(parts), file=self.file, flush=True)

    def __exit__(self, *exc):
        if self._last is not None and self._last[0] != self._printed_steps:
            steps, metrics, recent = self._last
            self._print(steps, metrics, recent, self.clock())
        return None


class WandbSink:
    """Mirror of a run's logs in Weights & Biases: metrics (per iteration), evaluations, the config.

    ``mode="offline"`` writes W&B's files under ``RUN_DIR/wandb`` (upload later with ``wandb sync``). A
    resumed run continues the same W&B run (its id is kept in ``RUN_DIR/wandb_run_id``).
    """

    def __init__(self, run_dir: Path, config: dict, *, project: str, entity: str | None = None,
                 group: str | None = None, mode: str = "online", name: str | None = None):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("logging.wandb = true needs the wandb package: pip install 'aclab[wandb]'") from exc
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, entity=entity, group=group, mode=mode, dir=str(run_dir),
                               id=run_id, resume="allow", config=config, name=name or run_dir.name,
                               settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in values.items()
                 if v is not None and isinstance(v, (int, float)) and np.isfinite(float(v))}
        if clean:
            self._run.log(clean, step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
