"""Thin adapters that give EnvPool and Gymnasium vector envs one interface.

A backend owns the simulators and returns *raw* batches (time-major is the caller's business):

* ``reset(seeds) -> obs``: ``seeds`` is None (continue the RNG streams) or one seed per env.
* ``step(actions) -> (obs, reward, terminated, truncated, episode_end)``: ``obs`` float32 ``[B, D]``
  for vectors (dict observations flattened in the backend's key order, float64 cast to float32,
  Discrete observations one-hot) or uint8 images; ``reward`` float32 ``[B]``; flags bool ``[B]``;
  ``episode_end`` bool ``[B]`` where a *full* episode ended (differs from ``terminated | truncated``
  only for Atari with ``episodic_life``, where a life loss terminates the training episode but not
  the game) or None when it equals ``terminated | truncated``.
* ``info``: the last raw info dict, rows aligned with env index.
* ``get_state() -> bytes | None`` / ``set_state(bytes) -> bool``: the full simulator state, when the
  backend can save it exactly (Gymnasium envs that pickle exactly, and Gymnasium MuJoCo envs through
  :mod:`aclab.envs.sim_state`; never EnvPool).

Both backends use *next-step* autoreset: the step that ends an episode returns the true final
observation with ``terminated`` or ``truncated`` set; the following step ignores its action and returns
the reset observation with reward 0 and both flags False.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from aclab.envs import sim_state

__all__ = ["EnvPoolBackend", "GymnasiumBackend", "derive_env_seeds", "ObsAdapter"]


def derive_env_seeds(seed: int, num_envs: int) -> list[int]:
    """Independent 31-bit per-env seeds from one master seed (via ``np.random.SeedSequence``).

    Unlike ``seed + i``, runs with neighbouring master seeds share no env streams.
    """
    state = np.random.SeedSequence(int(seed)).generate_state(num_envs, dtype=np.uint32)
    return [int(s) & 0x7FFFFFFF for s in state]


class ObsAdapter:
    """Maps a backend's observation batch to one array: flattens dicts, casts float64, one-hots Discrete.

    ``single_space`` is the backend's per-env observation space; ``observation_space`` the adapted one.
    """

    def __init__(self, single_space: spaces.Space) -> None:
        self.keys: tuple[str, ...] | None = None
        self.one_hot: np.ndarray | None = None
        if isinstance(single_space, spaces.Dict):
            self.keys = tuple(single_space.spaces)
            for key, sub in single_space.spaces.items():
                if not isinstance(sub, spaces.Box):
                    raise TypeError(f"dict observation entry {key!r} is {sub}; only Box entries can be flattened")
            size = sum(int(np.prod(single_space[k].shape)) for k in self.keys)
            self.observation_space: spaces.Space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
            self.dtype = np.dtype(np.float32)
        elif isinstance(single_space, spaces.Discrete):
            self.one_hot = np.eye(int(single_space.n), dtype=np.float32)
            self.start = int(single_space.start)
            self.observation_space = spaces.Box(0.0, 1.0, (int(single_space.n),), np.float32)
            self.dtype = np.dtype(np.float32)
        elif isinstance(single_space, spaces.Box):
            if single_space.dtype == np.uint8:
                self.dtype = np.dtype(np.uint8)
                self.observation_space = single_space
            else:
                self.dtype = np.dtype(np.float32)
                low = np.maximum(single_space.low, np.finfo(np.float32).min).astype(np.float32)
                high = np.minimum(single_space.high, np.finfo(np.float32).max).astype(np.float32)
                low[np.isneginf(single_space.low)] = -np.inf
                high[np.isposinf(single_space.high)] = np.inf
                self.observation_space = spaces.Box(low, high, single_space.shape, np.float32)
        else:
            raise TypeError(f"unsupported observation space {single_space}; use Box, Dict of Box or Discrete")

    def __call__(self, obs: Any) -> np.ndarray:
        if self.keys is not None:
            parts = [np.asarray(obs[k]).reshape(len(obs[k]), -1) for k in self.keys]
            return np.concatenate(parts, axis=1, dtype=np.float32)
        if self.one_hot is not None:
            return self.one_hot[np.asarray(obs) - self.start]
        if obs.dtype != self.dtype:
            return obs.astype(self.dtype)
        return obs


class EnvPoolBackend:
    """EnvPool (gymnasium API, synchronous: batch_size == num_envs, rows ordered by env id)."""

    name = "envpool"

    def __init__(
        self,
        task_id: str,
        num_envs: int,
        env_seeds: Sequence[int],
        num_threads: int,
        config: dict[str, Any],
        game_over_from_info: bool = False,
    ) -> None:
        self.task_id = task_id
        self.num_envs = num_envs
        self.num_threads = num_threads
        self.config = dict(config)
        # Atari with episodic_life: EnvPool's info['terminated'] marks the real game over.
        self.game_over_from_info = game_over_from_info
        self._seeds = [int(s) for s in env_seeds]
        self._pristine = True  # built with self._seeds and not stepped yet: reset(self._seeds) needs no rebuild
        self._pool = self._build(self._seeds)
        self.single_observation_space = self._pool.observation_space
        self.single_action_space = self._pool.action_space
        self.adapter = ObsAdapter(self.single_observation_space)
        self.info: dict[str, Any] = {}

    def _build(self, env_seeds: Sequence[int]) -> Any:
        import envpool

        return envpool.make(
            self.task_id,
            env_type="gymnasium",
            num_envs=self.num_envs,
            batch_size=self.num_envs,
            seed=int(env_seeds[0]),
            env_seed=[int(s) for s in env_seeds],
            num_threads=self.num_threads,
            **self.config,
        )

    def reset(self, seeds: Sequence[int] | None) -> np.ndarray:
        if seeds is not None and not (self._pristine and [int(s) for s in seeds] == self._seeds):
            # EnvPool seeds only at construction: rebuild the pool to reseed.
            self._pool.close()
            self._seeds = [int(s) for s in seeds]
            self._pool = self._build(self._seeds)
        self._pristine = False
        obs, self.info = self._pool.reset()
        return self.adapter(obs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        obs, reward, terminated, truncated, info = self._pool.step(actions)
        self.info = info
        episode_end = None
        if self.game_over_from_info:
            episode_end = truncated | (terminated & info["terminated"].astype(bool))
        return self.adapter(obs), reward, terminated, truncated, episode_end

    def render(self) -> np.ndarray:
        """The RGB frame ``[H, W, 3]`` uint8 of env 0 (needs ``render_mode="rgb_array"`` in the config)."""
        return np.asarray(self._pool.render(env_ids=[0]))[0]

    def get_state(self) -> bytes | None:
        return None  # EnvPool's simulators cannot be serialised.

    def set_state(self, blob: bytes) -> bool:
        return False

    def close(self) -> None:
        self._pool.close()


def _is_exactly_picklable(env: Any) -> bool:
    """False if any layer of a Gymnasium env's wrapper chain pickles by constructor args (EzPickle)."""
    from gymnasium.utils import EzPickle

    layer = env
    for _ in range(64):
        if isinstance(layer, EzPickle):
            return False
        if not hasattr(layer, "env"):
            return True
        layer = layer.env
    return False


class GymnasiumBackend:
    """A Gymnasium vector env in next-step autoreset mode.

    Built either from a registered id with a native vector entry point (numpy-vectorised, e.g.
    CartPole: ``vectorization_mode="vector_entry_point"``) or as a ``SyncVectorEnv`` over single envs
    (``autoreset_mode=NEXT_STEP`` passed explicitly, ``copy=False``).
    """

    name = "gymnasium"

    def __init__(
        self,
        make_vector: Callable[[], gymnasium.vector.VectorEnv],
        num_envs: int,
        env_seeds: Sequence[int],
        per_env_seeds: bool,
    ) -> None:
        from gymnasium.vector import AutoresetMode

        self.env = make_vector()
        self.num_envs = num_envs
        mode = self.env.metadata.get("autoreset_mode")
        if mode is not None and AutoresetMode(mode) != AutoresetMode.NEXT_STEP:
            raise ValueError(f"Gymnasium vector env uses autoreset mode {mode}; aclab needs NEXT_STEP")
        if mode is None:
            raise ValueError("Gymnasium vector env does not declare its autoreset mode; aclab needs NEXT_STEP")
        if self.env.num_envs != num_envs:
            raise ValueError(f"vector env has {self.env.num_envs} envs, expected {num_envs}")
        self.per_env_seeds = per_env_seeds
        self.initial_seeds = list(env_seeds)
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space
        self.adapter = ObsAdapter(self.single_observation_space)
        self.info: dict[str, Any] = {}
        self.is_sync = isinstance(self.env, gymnasium.vector.SyncVectorEnv)
        self.layered_state = False  # per-layer save of MuJoCo envs (which pickle by constructor arguments)
        if self.is_sync:
            self.exact_state = all(_is_exactly_picklable(e) for e in self.env.envs)
            if not self.exact_state and all(sim_state.supports(e) for e in self.env.envs):
                self.exact_state = self.layered_state = True
        else:
            self.exact_state = _is_exactly_picklable(self.env)

    def reset(self, seeds: Sequence[int] | None) -> np.ndarray:
        if seeds is None:
            obs, self.info = self.env.reset()
        elif self.per_env_seeds:
            obs, self.info = self.env.reset(seed=[int(s) for s in seeds])
        else:  # one RNG for the whole (numpy-vectorised) env
            obs, self.info = self.env.reset(seed=int(seeds[0]))
        out = self.adapter(obs)
        return out.copy() if out is obs and self.is_sync else out

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, None]:
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.info = info
        out = self.adapter(obs)
        if out is obs and self.is_sync:
            out = out.copy()  # SyncVectorEnv(copy=False) reuses its observation buffer
        return (
            out,
            np.asarray(reward, dtype=np.float32),
            np.asarray(terminated, dtype=bool),
            np.asarray(truncated, dtype=bool),
            None,
        )

    def render(self) -> np.ndarray | None:
        """The RGB frame of env 0 (its env made with ``render_mode="rgb_array"``), or None."""
        env = self.env.envs[0] if self.is_sync else self.env
        frame = env.render()
        if isinstance(frame, (list, tuple)):  # a vector env's frames
            frame = frame[0] if frame else None
        return None if frame is None else np.asarray(frame)

    def get_state(self) -> bytes | None:
        if not self.exact_state:
            return None
        try:
            if self.layered_state:
                layered = [sim_state.capture(e) for e in self.env.envs]
                if any(blob is None for blob in layered):
                    return None
                payload = {"layered": layered, "autoreset": np.array(self.env._autoreset_envs, copy=True)}
            elif self.is_sync:
                payload = {"envs": self.env.envs, "autoreset": np.array(self.env._autoreset_envs, copy=True)}
            else:
                payload = {"vector_env": self.env}
            return pickle.dumps(payload)
        except Exception:  # an unpicklable member (e.g. a rendering handle): no exact state
            return None

    def set_state(self, blob: bytes) -> bool:
        payload = pickle.loads(blob)
        if "layered" in payload:
            if not self.layered_state or len(payload["layered"]) != self.num_envs:
                return False
            if not all(sim_state.restore(e, b) for e, b in zip(self.env.envs, payload["layered"])):
                return False
            self.env._autoreset_envs = np.array(payload["autoreset"], copy=True)
        elif self.is_sync:
            if "envs" not in payload or len(payload["envs"]) != self.num_envs:
                return False
            for env in self.env.envs:
                env.close()
            self.env.envs = list(payload["envs"])
            self.env._autoreset_envs = np.array(payload["autoreset"], copy=True)
        else:
            if "vector_env" not in payload:
                return False
            self.env.close()
            self.env = payload["vector_env"]
        return True

    def close(self) -> None:
        self.env.close()


def default_num_threads(family: str, num_envs: int) -> int:
    """EnvPool threads: 1 for classic control (thread hand-off costs more than the env), else one per
    core up to ``num_envs``."""
    if family == "classic":
        return 1
    return max(1, min(num_envs, os.cpu_count() or 1))
