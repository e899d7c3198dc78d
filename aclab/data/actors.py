"""Actor-learner plumbing for IMPALA-style agents: trajectories, actors, parameter broadcast.

IMPALA (Espeholt et al. 2018) decouples acting from learning: actors run a copy of the policy that may
lag the learner by a few updates and send fixed-length trajectories; the learner trains on batches of
them and corrects for the lag with V-trace. Here:

* :class:`TrajectoryCollector` steps one :class:`~aclab.envs.VecEnv` with an acting policy and emits
  :class:`Chunk` s of ``T`` steps (consecutive chunks overlap by ``overlap`` steps, STAC Table 3). It
  is the *one* acting loop: the learner's synchronous mode and every kind of remote actor use it, so a
  chunk depends only on (seed, parameters, parameter versions), never on which mode produced it.
* :class:`LocalActorPool` runs actors as threads or processes on this machine: a bounded trajectory
  queue, parameters broadcast through shared memory (a flat float32 vector plus a version counter).
* :class:`RayActorPool` runs actors as Ray actors (one machine or many): parameters are ``ray.put``
  once per learner step and each actor's next chunk is requested with the newest reference.

Every pool has ``publish(flat_params, version)``, ``get(timeout) -> Chunk`` and ``close()``.

Conventions (next-step autoreset, see :mod:`aclab.envs.vec`): ``valid[t] = not envs.next_is_dummy``
before step ``t``; ``first[t]`` marks an observation that starts an episode (recurrent state is reset
there): ``first[0]`` after a reset and ``first[t + 1] = not valid[t]`` (a dummy step returns the reset
observation). ``obs`` has ``T + 1`` rows: the last is the observation after the chunk, for bootstrapping.

Acting policies (see :class:`ActingPolicy`) are duck-typed; remote actors build theirs from a
picklable module-level factory ``factory(config, env_spec, seed) -> ActingPolicy``.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from aclab.envs import build_envs
from aclab.runs import check_stop

__all__ = [
    "ActingPolicy",
    "ActorSpec",
    "Chunk",
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
    actor_id.
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

    @property
    def num_envs(self) -> int:
        return self.rewards.shape[1]

    @property
    def num_steps(self) -> int:
        return self.rewards.shape[0]


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
    seeded with ``seed``) and its policy with ``factory(config, env_spec, seed)``."""

    actor_id: int
    num_envs: int
    seed: int
    config: Any
    factory: Any
    num_steps: int
    overlap: int


ACTOR_SEED_STRIDE = 7919


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
        self.envs = build_envs(spec.config, num_envs=spec.num_envs, seed=spec.seed)
        self.envs.reset(seed=spec.seed)
        env_spec = self.envs.spec
        self.policy = spec.factory(spec.config, env_spec, spec.seed)
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
        return self.collector.collect(self.envs, self.policy, self.version)

    def close(self) -> None:
        self.envs.close()


class _ActorFailure:
    """Sent through the queue when an actor raises: the learner re-raises it with the traceback."""

    def __init__(self, actor_id: int, text: str):
        self.actor_id = actor_id
        self.text = text


class ActorError(RuntimeError):
    """An actor failed; the message holds its traceback."""


class _SharedParameters:
    """A flat float32 parameter vector plus a version counter, readable by threads or processes."""

    def __init__(self, size: int, context):
        self.size = size
        if context is None:  # threads
            self._raw = np.zeros(size, dtype=np.float32)
            self._version = [-1]
            self.lock = threading.Lock()
        else:
            self._raw = context.RawArray("f", size)
            self._version = context.RawValue("q", -1)
            self.lock = context.Lock()
        self._threads = context is None

    def _array(self) -> np.ndarray:
        return self._raw if self._threads else np.frombuffer(self._raw, dtype=np.float32, count=self.size)

    def _get_version(self) -> int:
        return self._version[0] if self._threads else self._version.value

    def write(self, flat: np.ndarray, version: int) -> None:
        with self.lock:
            self._array()[:] = flat
            if self._threads:
                self._version[0] = version
            else:
                self._version.value = version

    def read_if_newer(self, version: int) -> tuple[np.ndarray, int] | None:
        if self._get_version() == version:
            return None
        with self.lock:
            return self._array().copy(), self._get_version()


def _local_actor_main(
    spec: ActorSpec, shared: _SharedParameters, out_queue, stop_event, is_process: bool
) -> None:
    """Actor loop for threads and processes: pull newer parameters, collect a chunk, queue it."""
    worker = None
    try:
        if is_process:
            import torch

            torch.set_num_threads(1)
        worker = ActorWorker(spec)
        while shared.read_if_newer(-1) is None and not stop_event.is_set():  # wait for the first broadcast
            time.sleep(0.01)
        version = -1
        flat = None
        while not stop_event.is_set():
            got = shared.read_if_newer(version)
            if got is not None:
                flat, version = got
            chunk = worker.collect(flat, version)
            while not stop_event.is_set():
                try:
                    out_queue.put(chunk, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except Exception:  # noqa: BLE001 - forwarded to the learner
        try:
            out_queue.put(_ActorFailure(spec.actor_id, traceback.format_exc()), timeout=5)
        except Exception:  # noqa: BLE001
            pass
    finally:
        if worker is not None:
            worker.close()


class LocalActorPool:
    """Actors as daemon threads (``backend="thread"``) or spawned processes (``"process"``) on this machine.

    ``publish`` writes the flat parameter vector into shared memory; each actor copies it when the
    version changed, before starting its next chunk. Chunks go through a bounded queue of
    ``queue_size`` entries (actors block when it is full, which bounds the policy lag).
    """

    def __init__(self, specs: list[ActorSpec], num_params: int, backend: str = "thread", queue_size: int = 4):
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")
        self.backend = backend
        self.specs = specs
        if backend == "thread":
            self.shared = _SharedParameters(num_params, None)
            self.queue: Any = queue.Queue(maxsize=queue_size)
            self.stop_event: Any = threading.Event()
            self.workers: list[Any] = [
                threading.Thread(
                    target=_local_actor_main,
                    args=(s, self.shared, self.queue, self.stop_event, False),
                    daemon=True,
                    name=f"aclab-actor-{s.actor_id}",
                )
                for s in specs
            ]
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            self.shared = _SharedParameters(num_params, context)
            self.queue = context.Queue(maxsize=queue_size)
            self.stop_event = context.Event()
            self.workers = [
                context.Process(
                    target=_local_actor_main,
                    args=(s, self.shared, self.queue, self.stop_event, True),
                    daemon=True,
                    name=f"aclab-actor-{s.actor_id}",
                )
                for s in specs
            ]
        for worker in self.workers:
            worker.start()
        self._closed = False
        self._finalizer = weakref.finalize(
            self, LocalActorPool._shutdown, self.workers, self.stop_event, self.queue
        )

    def publish(self, flat_params: np.ndarray, version: int) -> None:
        self.shared.write(flat_params, version)

    def get(self, timeout: float = 300.0) -> Chunk:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.queue.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                if not any(w.is_alive() for w in self.workers):
                    raise ActorError("every actor has stopped without sending a trajectory") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no trajectory from any actor within {timeout} s") from None
                continue
            if isinstance(item, _ActorFailure):
                raise ActorError(f"actor {item.actor_id} failed:\n{item.text}")
            return item

    @staticmethod
    def _shutdown(workers, stop_event, out_queue) -> None:
        stop_event.set()
        deadline = time.monotonic() + 10.0
        for worker in workers:
            while worker.is_alive() and time.monotonic() < deadline:
                try:  # drain so that a blocked put can notice the stop flag
                    while True:
                        out_queue.get_nowait()
                except (queue.Empty, OSError, ValueError):
                    pass
                worker.join(timeout=0.1)
            if worker.is_alive() and hasattr(worker, "terminate"):
                worker.terminate()
                worker.join(timeout=5)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()


class RayActorPool:
    """Actors as Ray actors (``ray.remote(ActorWorker)``), on this machine or a Ray cluster.

    Each actor has up to ``inflight`` ``collect`` calls pending; when the learner takes a finished
    chunk, that actor is asked for another one with the newest parameter reference. A local Ray runtime
    is started when none is running (``ray_init_kwargs`` go to ``ray.init``; ``address="auto"`` joins an
    existing cluster) and shut down by :meth:`close` only if this pool started it.
    """

    def __init__(
        self,
        specs: list[ActorSpec],
        inflight: int = 1,
        num_cpus_per_actor: float = 1.0,
        ray_init_kwargs: dict | None = None,
    ):
        import ray

        self._ray = ray
        self._owns_runtime = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(ray_init_kwargs or {})}
            ray.init(**kwargs)
            self._owns_runtime = True
        remote_cls = ray.remote(num_cpus=num_cpus_per_actor)(_RayActor)
        self.actors = [remote_cls.remote(spec) for spec in specs]
        self.inflight = inflight
        self.pending: dict[Any, int] = {}
        self.params_ref = None
        self.version = -1
        self._closed = False

    def publish(self, flat_params: np.ndarray, version: int) -> None:
        self.params_ref = self._ray.put(flat_params)
        self.version = version
        if not self.pending:
            for index in range(len(self.actors)):
                for _ in range(self.inflight):
                    self._launch(index)

    def _launch(self, index: int) -> None:
        ref = self.actors[index].collect.remote(self.params_ref, self.version)
        self.pending[ref] = index

    def get(self, timeout: float = 300.0) -> Chunk:
        if not self.pending:
            raise RuntimeError("publish parameters before asking for trajectories")
        ready, _ = self._ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError(f"no trajectory from any Ray actor within {timeout} s")
        ref = ready[0]
        index = self.pending.pop(ref)
        try:
            chunk = self._ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the actor's traceback
            raise ActorError(f"Ray actor {index} failed: {exc}") from exc
        self._launch(index)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - the runtime may already be gone
                pass
        self.actors = []
        self.pending = {}
        if self._owns_runtime and self._ray.is_initialized():
            self._ray.shutdown()


class _RayActor:
    """The Ray actor class body: a thin wrapper so that ``ray.remote`` is applied lazily."""

    def __init__(self, spec: ActorSpec):
        import torch

        torch.set_num_threads(1)
        self.worker = ActorWorker(spec)

    def collect(self, flat_params: np.ndarray, version: int) -> Chunk:
        return self.worker.collect(flat_params, version)


def make_actor_pool(
    mode: str,
    specs: list[ActorSpec],
    num_params: int,
    *,
    max_pending_per_actor: int = 2,
    ray_init_kwargs: dict | None = None,
    ray_num_cpus_per_actor: float = 1.0,
):
    """``mode``: ``thread`` | ``process`` | ``ray``. Queue / in-flight bound: ``max_pending_per_actor``."""
    if mode in ("thread", "process"):
        return LocalActorPool(specs, num_params, backend=mode, queue_size=max_pending_per_actor * len(specs))
    if mode == "ray":
        return RayActorPool(
            specs,
            inflight=max_pending_per_actor,
            num_cpus_per_actor=ray_num_cpus_per_actor,
            ray_init_kwargs=ray_init_kwargs,
        )
    raise ValueError(f"unknown actor mode {mode!r}; expected thread, process or ray")
