"""Actor-learner plumbing for IMPALA-style agents: trajectories, actors, parameter broadcast.

IMPALA (Espeholt et al. 2018) decouples acting from learning: actors run a copy of the policy that may
lag the learner by a few updates and send fixed-length trajectories; the learner trains on batches of
them and corrects for the lag with V-trace. Here:

* :class:`TrajectoryCollector` steps one :class:`~aclab.envs.VecEnv` with an acting policy and emits
  :class:`Chunk` s of ``T`` steps (consecutive chunks overlap by ``overlap`` steps, STAC Table 3). It
  is the *one* acting loop: the learner's synchronous mode and every kind of remote actor use it, so a
  chunk depends only on (seed, parameters, parameter versions), never on which mode produced it.
* :class:`LocalActorPool` runs actors as threads or processes on this machine: one channel per actor,
  chunks requested by credits (``inflight`` per actor), parameters broadcast through shared memory (a
  flat float32 vector plus a version, lock-free).
* :class:`RayActorPool` runs actors as Ray actors (one machine or many): parameters are ``ray.put``
  once per learner step and each actor's next chunk is requested with the newest reference.

Every pool has ``publish(flat_params, version)``, ``get(timeout) -> Chunk``, ``wait_ready(timeout)``,
``stats()`` (``actors/alive``, ``actors/restarts``, ``actors/restart_s``), ``pids()`` and ``close()``.

Failures: an actor that dies (killed, its node lost) or raises is replaced and the run goes on: Ray
restarts a dead Ray actor itself (``max_restarts``), local pools spawn a new thread or process; the
replacement is a new *incarnation* of the actor (fresh env seeds) that reads the current parameters
before its first chunk. :class:`FailureBudget` counts failures and raises :class:`ActorFailureLimit`
when too many fall within a time window (the training loop then checkpoints and stops, ``failed``).

Conventions (next-step autoreset, see :mod:`aclab.envs.vec`): ``valid[t] = not envs.next_is_dummy``
before step ``t``; ``first[t]`` marks an observation that starts an episode (recurrent state is reset
there): ``first[0]`` after a reset and ``first[t + 1] = not valid[t]`` (a dummy step returns the reset
observation). ``obs`` has ``T + 1`` rows: the last is the observation after the chunk, for bootstrapping.

Acting policies (see :class:`ActingPolicy`) are duck-typed; remote actors build theirs from a
picklable module-level factory ``factory(config, env_spec, seed) -> ActingPolicy``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from aclab.core.threads import flush_denormals
from aclab.envs import build_envs
from aclab.runs import check_stop

__all__ = [
    "ActingPolicy",
    "ActorError",
    "ActorFailureLimit",
    "ActorSpec",
    "Chunk",
    "FailureBudget",
    "LocalActorPool",
    "RayActorPool",
    "TrajectoryCollector",
    "concat_chunks",
    "make_actor_pool",
    "make_actor_specs",
]


class ActingPolicy(Protocol):
    """What an actor needs from a policy (NumPy in, NumPy out).

    ``state_size``: width of the flat recurrent state (0 for feed-forward policies).
    ``act(obs [B, ...], first [B] bool, state [B, S] | None)`` returns ``(env_actions, stored_actions,
    log_probs [B] float32, new_state [B, S] | None)``: ``env_actions`` go to ``envs.step``;
    ``stored_actions`` are what the learner re-evaluates (e.g. the pre-tanh sample of a squashed
    Gaussian); the policy resets ``state`` where ``first`` is True before using it.
    ``load_flat_params(flat)`` installs broadcast parameters.
    """

    state_size: int

    def act(self, obs: np.ndarray, first: np.ndarray, state: np.ndarray | None) -> tuple: ...

    def load_flat_params(self, flat: np.ndarray) -> None: ...


@dataclass
class Chunk:
    """``T`` steps from ``B`` envs, time-major NumPy arrays (the unit actors send to the learner).

    obs [T + 1, B, *obs_shape]; actions [T, B] int64 or [T, B, D] float32; behaviour_log_probs [T, B]
    float32 (log mu(a|x)); rewards [T, B] float32; terminated, ends, valid [T, B] bool; first
    [T + 1, B] bool; core_state [B, S] float32 (recurrent state before obs[0], None when S = 0);
    versions [T, B] int64 (the parameter version that chose each action); episode_returns /
    episode_lengths [E] (episodes finished during this chunk's *new* steps); env_steps: env steps taken
    for this chunk, summed over envs (``T * B`` for a first chunk, ``(T - overlap) * B`` after);
    actor_id; incarnation (0, then 1, 2... for an actor restarted after failures).
    """

    obs: np.ndarray
    actions: np.ndarray
    behaviour_log_probs: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    ends: np.ndarray
    valid: np.ndarray
    first: np.ndarray
    core_state: np.ndarray | None
    versions: np.ndarray
    episode_returns: np.ndarray
    episode_lengths: np.ndarray
    env_steps: int
    actor_id: int = 0
    incarnation: int = 0  # which of the actor's successive processes collected it (0: the first)

    @property
    def num_envs(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_steps(self) -> int:
        return self.rewards.shape[0]

    @property
    def version(self) -> int:
        """The parameter version that collected this chunk's new steps (overlapped steps keep older ones)."""
        return int(self.versions[-1].min())


_PER_ENV_FIELDS = (
    "obs",
    "actions",
    "behaviour_log_probs",
    "rewards",
    "terminated",
    "ends",
    "valid",
    "first",
    "versions",
)


def concat_chunks(chunks: list[Chunk]) -> Chunk:
    """Stack chunks (same ``T``) along the env axis; episode statistics are concatenated and
    ``env_steps`` summed."""
    if len(chunks) == 1:
        return chunks[0]
    steps = {c.num_steps for c in chunks}
    if len(steps) != 1:
        raise ValueError(f"chunks have different lengths {sorted(steps)}")
    merged: dict[str, Any] = {
        name: np.concatenate([getattr(c, name) for c in chunks], axis=1) for name in _PER_ENV_FIELDS
    }
    states = [c.core_state for c in chunks]
    merged["core_state"] = None if states[0] is None else np.concatenate(states, axis=0)
    merged["episode_returns"] = np.concatenate([c.episode_returns for c in chunks])
    merged["episode_lengths"] = np.concatenate([c.episode_lengths for c in chunks])
    merged["env_steps"] = sum(c.env_steps for c in chunks)
    merged["actor_id"] = -1
    return Chunk(**merged)


class TrajectoryCollector:
    """Steps a VecEnv with an :class:`ActingPolicy` and returns fixed-length, optionally overlapping chunks.

    The first chunk takes ``num_steps`` steps; each later one keeps the last ``overlap`` steps of the
    previous chunk (with their original behaviour log-probs and versions: V-trace corrects for them)
    and takes ``num_steps - overlap`` new steps. Storage is preallocated NumPy; returned chunks are
    copies. ``state_dict`` / ``load_state_dict`` cover the window, recurrent state and counters so that
    a synchronous run resumes exactly.
    """

    def __init__(
        self,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype,
        num_steps: int,
        overlap: int,
        action_shape: tuple[int, ...],
        action_dtype,
        state_size: int = 0,
        actor_id: int = 0,
    ):
        if not 0 <= overlap < num_steps:
            raise ValueError(
                f"overlap must be in [0, num_steps), got overlap={overlap}, num_steps={num_steps}"
            )
        T, B = num_steps, num_envs
        self.num_steps, self.overlap, self.num_envs, self.actor_id = T, overlap, B, actor_id
        self.state_size = state_size
        self.obs = np.zeros((T + 1, B, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros((T, B, *action_shape), dtype=action_dtype)
        self.behaviour_log_probs = np.zeros((T, B), dtype=np.float32)
        self.rewards = np.zeros((T, B), dtype=np.float32)
        self.terminated = np.zeros((T, B), dtype=bool)
        self.ends = np.zeros((T, B), dtype=bool)
        self.valid = np.zeros((T, B), dtype=bool)
        self.first = np.zeros((T + 1, B), dtype=bool)
        self.versions = np.zeros((T, B), dtype=np.int64)
        # states[t] = recurrent state before obs[t] (kept per step so overlapping windows know their start)
        self.states = np.zeros((T + 1, B, state_size), dtype=np.float32) if state_size else None
        self.started = False

    def _shift_window(self) -> int:
        """Move the last ``overlap`` steps to the front; return the first row to fill."""
        T, k = self.num_steps, self.overlap
        if k == 0:
            self.obs[0] = self.obs[T]
            self.first[0] = self.first[T]
            if self.states is not None:
                self.states[0] = self.states[T]
            return 0
        for name in ("actions", "behaviour_log_probs", "rewards", "terminated", "ends", "valid", "versions"):
            array = getattr(self, name)
            array[:k] = array[T - k : T]
        for name in ("obs", "first", "states"):
            array = getattr(self, name)
            if array is not None:
                array[: k + 1] = array[T - k : T + 1]
        return k

    def collect(self, envs, policy: ActingPolicy, version: int) -> Chunk:
        """Step ``envs`` (already reset) until the window is full; return a copy as a :class:`Chunk`."""
        if not self.started:
            self.obs[0] = envs.obs
            self.first[0] = True
            if self.states is not None:
                self.states[0] = 0.0
            start = 0
            self.started = True
        else:
            start = self._shift_window()
        returns: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        state = None if self.states is None else self.states[start].copy()
        for t in range(start, self.num_steps):
            check_stop()
            np.logical_not(envs.next_is_dummy, out=self.valid[t])
            env_actions, self.actions[t], self.behaviour_log_probs[t], state = policy.act(
                self.obs[t], self.first[t], state
            )
            self.versions[t] = version
            result = envs.step(env_actions)
            self.rewards[t] = result.reward
            self.terminated[t] = result.terminated
            np.logical_or(result.terminated, result.truncated, out=self.ends[t])
            self.obs[t + 1] = envs.obs
            np.logical_not(self.valid[t], out=self.first[t + 1])
            if self.states is not None:
                self.states[t + 1] = state
            if self.ends[t].any():
                done = result.episode_length > 0
                returns.append(result.episode_return[done])
                lengths.append(result.episode_length[done])
        return Chunk(
            obs=self.obs.copy(),
            actions=self.actions.copy(),
            behaviour_log_probs=self.behaviour_log_probs.copy(),
            rewards=self.rewards.copy(),
            terminated=self.terminated.copy(),
            ends=self.ends.copy(),
            valid=self.valid.copy(),
            first=self.first.copy(),
            core_state=None if self.states is None else self.states[0].copy(),
            versions=self.versions.copy(),
            episode_returns=np.concatenate(returns) if returns else np.zeros(0),
            episode_lengths=np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
            env_steps=(self.num_steps - start) * self.num_envs,
            actor_id=self.actor_id,
        )

    _STATE_FIELDS = (
        "obs",
        "actions",
        "behaviour_log_probs",
        "rewards",
        "terminated",
        "ends",
        "valid",
        "first",
        "versions",
        "states",
    )

    def state_dict(self) -> dict:
        state = {
            name: None if getattr(self, name) is None else getattr(self, name).copy()
            for name in self._STATE_FIELDS
        }
        state["started"] = self.started
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE_FIELDS:
            if getattr(self, name) is not None:
                getattr(self, name)[...] = state[name]
        self.started = bool(state["started"])


# ----------------------------------------------------------------------------------------------
# Remote actors
# ----------------------------------------------------------------------------------------------
@dataclass
class ActorSpec:
    """A picklable recipe for one actor: it builds its own envs from ``config`` (``num_envs`` of them,
    seeded with ``seed``, plus ``RESTART_SEED_STRIDE * incarnation`` for an actor restarted after a
    failure, so that a replacement does not replay its predecessor's episodes) and its policy with
    ``factory(config, env_spec, seed)``."""

    actor_id: int
    num_envs: int
    seed: int
    config: Any
    factory: Any
    num_steps: int
    overlap: int
    incarnation: int = 0

    @property
    def env_seed(self) -> int:
        return self.seed + RESTART_SEED_STRIDE * self.incarnation

    def restarted(self) -> ActorSpec:
        """The recipe of this actor's replacement (next incarnation)."""
        return dataclasses.replace(self, incarnation=self.incarnation + 1)


ACTOR_SEED_STRIDE = 7919
RESTART_SEED_STRIDE = 104_729


def make_actor_specs(
    config, factory, num_actors: int, envs_per_actor: int, num_steps: int, overlap: int
) -> list[ActorSpec]:
    """Actor ``i`` gets seed ``config.seed + 7919 * (i + 1)`` (distinct from the learner's envs)."""
    return [
        ActorSpec(
            i, envs_per_actor, config.seed + ACTOR_SEED_STRIDE * (i + 1), config, factory, num_steps, overlap
        )
        for i in range(num_actors)
    ]


class ActorWorker:
    """One actor's state: its envs, policy and collector. Used in threads, processes and Ray actors."""

    def __init__(self, spec: ActorSpec):
        self.spec = spec
        seed = spec.env_seed
        self.envs = build_envs(spec.config, num_envs=spec.num_envs, seed=seed)
        self.envs.reset(seed=seed)
        env_spec = self.envs.spec
        self.policy = spec.factory(spec.config, env_spec, seed)
        action_shape = () if env_spec.discrete else (env_spec.action_dim,)
        action_dtype = np.int64 if env_spec.discrete else np.float32
        self.collector = TrajectoryCollector(
            spec.num_envs,
            env_spec.obs_shape,
            env_spec.obs_dtype,
            spec.num_steps,
            spec.overlap,
            action_shape,
            action_dtype,
            self.policy.state_size,
            actor_id=spec.actor_id,
        )
        self.version = -1

    def collect(self, flat_params: np.ndarray | None, version: int) -> Chunk:
        if flat_params is not None and version != self.version:
            self.policy.load_flat_params(flat_params)
            self.version = version
        chunk = self.collector.collect(self.envs, self.policy, self.version)
        chunk.incarnation = self.spec.incarnation
        return chunk

    def close(self) -> None:
        self.envs.close()


class ActorError(RuntimeError):
    """Actors cannot deliver trajectories (none left alive, or none within the timeout)."""


class ActorFailureLimit(ActorError):
    """Too many actor failures within the failure window: the run stops (``status: failed``) after a
    checkpoint, since the learner's own state is intact."""


class FailureBudget:
    """Counts actor failures (a death or an exception in an actor); :meth:`record` raises
    :class:`ActorFailureLimit` when ``limit`` of them fall within ``window_s`` seconds."""

    def __init__(self, limit: int = 5, window_s: float = 300.0, clock=time.monotonic):
        if limit < 1 or window_s <= 0:
            raise ValueError(f"need limit >= 1 and window_s > 0, got {limit}, {window_s}")
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.times: collections.deque[float] = collections.deque()
        self.total = 0

    def record(self, actor_id: int, reason: str) -> None:
        now = self.clock()
        self.total += 1
        self.times.append(now)
        while self.times and self.times[0] < now - self.window_s:
            self.times.popleft()
        reason = reason.strip().splitlines()[-1] if reason.strip() else "unknown"
        if len(self.times) >= self.limit:
            raise ActorFailureLimit(
                f"{len(self.times)} actor failures within {self.window_s:g} s (params.actor_failure_limit="
                f"{self.limit}); the last: actor {actor_id}: {reason}"
            )
        print(f"aclab: warning: actor {actor_id} failed ({reason}); restarting it", file=sys.stderr, flush=True)


class _SharedParameters:
    """A flat float32 parameter vector plus its version, written by the learner and read by threads or
    processes, without a lock: a sequence counter (odd while a write is in progress) lets a reader
    detect a torn copy and retry, so an actor killed in the middle of a read can never block the
    learner (a killed holder of a lock would)."""

    def __init__(self, size: int, context):
        self.size = size
        if context is None:  # threads
            self._raw, self._raw_meta = np.zeros(size, dtype=np.float32), np.array([0, -1], dtype=np.int64)
        else:
            self._raw, self._raw_meta = context.RawArray("f", max(size, 1)), context.RawArray("q", 2)
            np.frombuffer(self._raw_meta, dtype=np.int64)[1] = -1
        self._views()

    def _views(self) -> None:
        self.data = np.frombuffer(self._raw, dtype=np.float32, count=self.size)
        self.meta = np.frombuffer(self._raw_meta, dtype=np.int64)  # [sequence, version]

    def __getstate__(self):
        return {"size": self.size, "_raw": self._raw, "_raw_meta": self._raw_meta}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def write(self, flat: np.ndarray, version: int) -> None:
        """One writer (the learner)."""
        self.meta[0] += 1  # odd: writing
        self.data[:] = flat
        self.meta[1] = version
        self.meta[0] += 1

    def read_if_newer(self, version: int) -> tuple[np.ndarray, int] | None:
        """``(copy, version)`` when the stored version differs from ``version``, else None."""
        while True:
            sequence = int(self.meta[0])
            if sequence % 2:
                time.sleep(0)
                continue
            stored = int(self.meta[1])
            if stored == version:
                return None
            copy = self.data.copy()
            if int(self.meta[0]) == sequence:
                return copy, stored


def _local_actor_main(spec: ActorSpec, shared: _SharedParameters, conn, is_process: bool) -> None:
    """Actor loop for threads and processes. It announces ``("ready", pid)``, then for each credit the
    learner sends collects one chunk with the newest parameters and sends ``("chunk", chunk)``; ``None``
    or a closed channel stops it; an exception is sent as ``("error", traceback)``."""
    worker = None
    try:
        if is_process:
            import torch

            torch.set_num_threads(1)
        flush_denormals(spec.config.flush_denormal)  # the run's arithmetic, as on the learner
        worker = ActorWorker(spec)
        conn.send(("ready", os.getpid() if is_process else None))
        version, flat = -1, None
        while conn.recv() is not None:
            got = shared.read_if_newer(version)
            if got is not None:
                flat, version = got
            conn.send(("chunk", worker.collect(flat, version)))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the learner closed the channel
        pass
    except Exception:  # noqa: BLE001 - forwarded to the learner, which restarts this actor
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
    finally:
        if worker is not None:
            worker.close()
        conn.close()


@dataclass
class _Slot:
    """One actor position of a pool: the current incarnation's spec, worker and channel."""

    spec: ActorSpec
    worker: Any = None  # threading.Thread | multiprocessing.Process | Ray actor handle
    conn: Any = None  # the learner's end of the channel (local pools)
    ready: bool = False  # announced itself and has not failed since
    pid: int | None = None
    credits: int = 0  # chunks requested and not yet received
    failed_at: float | None = None  # when its predecessor's failure was detected


class _PoolStats:
    """What every pool reports: ``actors/alive`` (actors ready and not known to have failed),
    ``actors/restarts`` (failures recovered by a restart) and ``actors/restart_s`` (seconds from detecting
    the latest failure to its replacement being ready)."""

    slots: list[_Slot]
    budget: FailureBudget
    restarts: int = 0
    restart_durations: list[float]

    def stats(self) -> dict[str, float]:
        out = {"actors/alive": float(sum(s.ready for s in self.slots)), "actors/restarts": float(self.restarts)}
        if self.restart_durations:
            out["actors/restart_s"] = self.restart_durations[-1]
        return out

    def _mark_ready(self, slot: _Slot, pid: int) -> None:
        slot.ready, slot.pid = True, pid
        if slot.failed_at is not None:
            self.restart_durations.append(time.monotonic() - slot.failed_at)
            slot.failed_at = None

    def pids(self) -> list[int | None]:
        """Process ids of the actors' current incarnations (None for threads or one not ready yet)."""
        return [s.pid for s in self.slots]


class LocalActorPool(_PoolStats):
    """Actors as daemon threads (``backend="thread"``) or spawned processes (``"process"``) on this machine.

    ``publish`` writes the flat parameter vector into shared memory; an actor copies it when the version
    changed, before each chunk. Each actor has its own channel (a pipe) and collects a chunk per credit:
    ``inflight`` at the first broadcast, one more each time the learner takes one of its chunks (which
    bounds the policy lag as for Ray actors). An actor that dies (its channel closes: killed, crashed)
    or raises is replaced by a new incarnation with fresh env seeds, which reads the current parameters;
    failures are counted by ``budget`` (:class:`FailureBudget`).
    """

    def __init__(self, specs: list[ActorSpec], num_params: int, backend: str = "thread", inflight: int = 2,
                 budget: FailureBudget | None = None):
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")
        self.backend = backend
        self.inflight = inflight
        self.budget = budget or FailureBudget()
        self.restarts, self.restart_durations = 0, []
        self.version = -1
        self._context = None
        if backend == "process":
            import multiprocessing

            self._context = multiprocessing.get_context("spawn")
        self.shared = _SharedParameters(num_params, self._context)
        self.slots: list[_Slot] = []
        self._buffer: collections.deque[Chunk] = collections.deque()
        self._turn = 0
        for spec in specs:
            self.slots.append(self._spawn(spec))
        self._closed = False
        self._finalizer = weakref.finalize(self, LocalActorPool._shutdown, self.slots)

    @property
    def workers(self) -> list[Any]:
        return [s.worker for s in self.slots]

    def _spawn(self, spec: ActorSpec) -> _Slot:
        if self._context is None:
            import multiprocessing

            learner_end, actor_end = multiprocessing.Pipe()
            worker: Any = threading.Thread(target=_local_actor_main, args=(spec, self.shared, actor_end, False),
                                           daemon=True, name=f"aclab-actor-{spec.actor_id}")
        else:
            learner_end, actor_end = self._context.Pipe()
            worker = self._context.Process(target=_local_actor_main, args=(spec, self.shared, actor_end, True),
                                           daemon=True, name=f"aclab-actor-{spec.actor_id}")
        worker.start()
        if self._context is not None:
            actor_end.close()  # the child holds it now: its death closes the channel (EOF for the learner)
        slot = _Slot(spec, worker, learner_end)
        if self.version >= 0:
            self._grant(slot, self.inflight)
        return slot

    def _grant(self, slot: _Slot, count: int) -> None:
        try:
            for _ in range(count):
                slot.conn.send(1)
                slot.credits += 1
        except OSError:  # the actor is gone; the next receive reports it
            pass

    def publish(self, flat_params: np.ndarray, version: int) -> None:
        first = self.version < 0
        self.shared.write(flat_params, version)
        self.version = version
        if first:
            for slot in self.slots:
                self._grant(slot, self.inflight)

    def _fail(self, index: int, reason: str) -> None:
        """Count the failure (may raise ActorFailureLimit), stop what is left of the actor, start its successor."""
        slot = self.slots[index]
        slot.ready = False
        self.budget.record(slot.spec.actor_id, reason)
        LocalActorPool._stop_slot(slot, grace_s=1.0)
        replacement = self._spawn(slot.spec.restarted())
        replacement.failed_at = time.monotonic()
        self.slots[index] = replacement
        self.restarts += 1

    def _receive(self, timeout: float) -> Chunk | None:
        """Handle one message from a ready channel (a chunk is returned), or wait up to ``timeout``."""
        from multiprocessing.connection import wait

        order = self.slots[self._turn :] + self.slots[: self._turn]  # round robin between actors
        self._turn = (self._turn + 1) % len(self.slots)
        for conn in wait([s.conn for s in order], timeout=timeout):
            index = next((i for i, s in enumerate(self.slots) if s.conn is conn), None)
            if index is None:  # the channel of an actor replaced a moment ago
                continue
            slot = self.slots[index]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                self._fail(index, "its channel closed (the actor died)")
                continue
            except Exception as exc:  # noqa: BLE001 - a torn message from an actor killed mid-send
                self._fail(index, f"unreadable message ({type(exc).__name__}: {exc})")
                continue
            if kind == "ready":
                self._mark_ready(slot, payload)
            elif kind == "error":
                self._fail(index, payload)
            else:
                slot.credits -= 1
                self._grant(slot, 1)
                return payload
        return None

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every actor has built its envs and policy (chunks arriving meanwhile are kept)."""
        deadline = time.monotonic() + timeout
        while not all(s.ready for s in self.slots):
            if time.monotonic() > deadline:
                raise TimeoutError(f"actors not ready within {timeout} s")
            chunk = self._receive(min(1.0, max(deadline - time.monotonic(), 0.01)))
            if chunk is not None:
                self._buffer.append(chunk)

    def get(self, timeout: float = 300.0) -> Chunk:
        if self._buffer:
            return self._buffer.popleft()
        deadline = time.monotonic() + timeout
        while True:
            chunk = self._receive(min(1.0, max(deadline - time.monotonic(), 0.01)))
            if chunk is not None:
                return chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"no trajectory from any actor within {timeout} s")

    @staticmethod
    def _stop_slot(slot: _Slot, grace_s: float) -> None:
        try:
            slot.conn.send(None)
        except (OSError, ValueError):
            pass
        slot.conn.close()  # an actor blocked in send sees a broken pipe
        slot.worker.join(timeout=grace_s)
        if slot.worker.is_alive() and hasattr(slot.worker, "terminate"):
            slot.worker.terminate()
            slot.worker.join(timeout=5)

    @staticmethod
    def _shutdown(slots: list[_Slot]) -> None:
        for slot in slots:
            try:
                slot.conn.send(None)
            except (OSError, ValueError):
                pass
        for slot in slots:
            LocalActorPool._stop_slot(slot, grace_s=10.0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()


class RayActorPool(_PoolStats):
    """Actors as Ray actors (``ray.remote(_RayActor)``), on this machine or a Ray cluster.

    Each actor first ``start``s (builds its envs and policy, returns its pid), then has up to ``inflight``
    ``collect`` calls pending; when the learner takes a finished chunk, that actor is asked for another
    one with the newest parameter reference. Fault tolerance is Ray's: actors are created with
    ``max_restarts=-1``, so Ray replaces a dead actor process (on any node); the pool sees the failed
    calls, counts the failure (``budget``), and starts the replacement's next incarnation (fresh env
    seeds) before asking it for chunks with the current parameters. An exception inside an actor is
    handled the same way. A local Ray runtime is started when none is running (``ray_init_kwargs`` go to
    ``ray.init``; ``address="auto"`` joins an existing cluster) and shut down by :meth:`close` only if
    this pool started it.
    """

    def __init__(
        self,
        specs: list[ActorSpec],
        inflight: int = 1,
        num_cpus_per_actor: float = 1.0,
        ray_init_kwargs: dict | None = None,
        budget: FailureBudget | None = None,
    ):
        import ray

        self._ray = ray
        self._owns_runtime = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(ray_init_kwargs or {})}
            ray.init(**kwargs)
            self._owns_runtime = True
        remote_cls = ray.remote(num_cpus=num_cpus_per_actor, max_restarts=-1, max_task_retries=0)(_RayActor)
        self.inflight = inflight
        self.budget = budget or FailureBudget()
        self.restarts, self.restart_durations = 0, []
        self.pending: dict[Any, tuple[int, str, int]] = {}  # ref -> (slot, "start" | "collect", incarnation)
        self._retries: dict[int, float] = {}  # slot -> when to ask a restarting actor to start again
        self.params_ref = None
        self.version = -1
        self.slots = [_Slot(spec, remote_cls.remote(spec)) for spec in specs]
        for index in range(len(self.slots)):
            self._start(index)
        self._buffer: collections.deque[Chunk] = collections.deque()
        self._closed = False

    @property
    def actors(self) -> list[Any]:
        return [s.worker for s in self.slots]

    def _start(self, index: int) -> None:
        slot = self.slots[index]
        self.pending[slot.worker.start.remote(slot.spec.incarnation)] = (index, "start", slot.spec.incarnation)

    def _launch(self, index: int) -> None:
        slot = self.slots[index]
        ref = slot.worker.collect.remote(self.params_ref, self.version)
        self.pending[ref] = (index, "collect", slot.spec.incarnation)
        slot.credits += 1

    def publish(self, flat_params: np.ndarray, version: int) -> None:
        first = self.params_ref is None
        self.params_ref = self._ray.put(flat_params)
        self.version = version
        if first:
            for index, slot in enumerate(self.slots):
                if slot.ready:
                    for _ in range(self.inflight):
                        self._launch(index)

    def _fail(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        slot.ready = False
        self.budget.record(slot.spec.actor_id, reason)
        slot.spec, slot.credits, slot.failed_at = slot.spec.restarted(), 0, time.monotonic()
        self.restarts += 1
        self._start(index)  # Ray runs it once the actor process is back

    def _receive(self, timeout: float) -> Chunk | None:
        now = time.monotonic()
        for index, due in list(self._retries.items()):
            if due <= now:
                del self._retries[index]
                self._start(index)
        if self._retries:
            timeout = min(timeout, max(min(self._retries.values()) - now, 0.01))
        if not self.pending:
            if not self._retries:
                raise RuntimeError("publish parameters before asking for trajectories")
            time.sleep(timeout)
            return None
        ready, _ = self._ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not ready:
            return None
        index, kind, incarnation = self.pending.pop(ready[0])
        slot = self.slots[index]
        if incarnation != slot.spec.incarnation:  # a call to a failed incarnation
            return None
        try:
            value = self._ray.get(ready[0])
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError) as exc:
            if kind == "start" and isinstance(exc, self._ray.exceptions.ActorUnavailableError):
                self._retries[index] = time.monotonic() + 0.5  # Ray is still restarting it: ask again soon
                return None
            self._fail(index, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
            return None
        if kind == "start":
            self._mark_ready(slot, value)
            if self.params_ref is not None:
                for _ in range(self.inflight):
                    self._launch(index)
            return None
        slot.credits -= 1
        self._launch(index)
        return value

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every actor has started (built its envs and policy)."""
        deadline = time.monotonic() + timeout
        while not all(s.ready for s in self.slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"Ray actors not ready within {timeout} s")
            chunk = self._receive(min(1.0, remaining))
            if chunk is not None:
                self._buffer.append(chunk)

    def get(self, timeout: float = 300.0) -> Chunk:
        if self._buffer:
            return self._buffer.popleft()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no trajectory from any Ray actor within {timeout} s")
            chunk = self._receive(min(1.0, remaining))
            if chunk is not None:
                return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self.slots:
            try:
                self._ray.kill(slot.worker, no_restart=True)
            except Exception:  # noqa: BLE001 - the runtime may already be gone
                pass
        self.slots = []
        self.pending = {}
        if self._owns_runtime and self._ray.is_initialized():
            self._ray.shutdown()


class _RayActor:
    """The Ray actor class body (``ray.remote`` is applied lazily). Ray re-runs ``__init__`` in a new
    process when the actor is restarted; ``start`` builds the worker of a given incarnation."""

    def __init__(self, spec: ActorSpec):
        import torch

        torch.set_num_threads(1)
        flush_denormals(spec.config.flush_denormal)
        self.spec = spec
        self.worker: ActorWorker | None = None

    def start(self, incarnation: int) -> int:
        if self.worker is not None:
            self.worker.close()
        self.worker = ActorWorker(dataclasses.replace(self.spec, incarnation=incarnation))
        return os.getpid()

    def collect(self, flat_params: np.ndarray, version: int) -> Chunk:
        if self.worker is None:
            raise RuntimeError("collect before start (a call to a restarted actor)")
        return self.worker.collect(flat_params, version)


def make_actor_pool(
    mode: str,
    specs: list[ActorSpec],
    num_params: int,
    *,
    max_pending_per_actor: int = 2,
    ray_init_kwargs: dict | None = None,
    ray_num_cpus_per_actor: float = 1.0,
    budget: FailureBudget | None = None,
):
    """``mode``: ``thread`` | ``process`` | ``ray``; ``max_pending_per_actor`` chunks requested per actor."""
    if mode in ("thread", "process"):
        return LocalActorPool(specs, num_params, backend=mode, inflight=max_pending_per_actor, budget=budget)
    if mode == "ray":
        return RayActorPool(
            specs,
            inflight=max_pending_per_actor,
            num_cpus_per_actor=ray_num_cpus_per_actor,
            ray_init_kwargs=ray_init_kwargs,
            budget=budget,
        )
    raise ValueError(f"unknown actor mode {mode!r}; expected thread, process or ray")
