"""Backends whose envs play a level chosen per episode (prioritised level replay needs this).

Both backends follow the interface of :mod:`aclab.envs.backends` (next-step autoreset included) and add:

* ``levels``: int64 ``[L]``, the finite set of training levels;
* ``current_levels``: int64 ``[B]``, the level each env is playing (it changes on the dummy step that starts
  the next episode);
* ``set_next_level(b, level)``: the level env ``b`` starts on at its next reset. An env whose next level was not
  set draws one uniformly from ``levels`` (the backend's own generator); the first reset plays levels
  ``levels[b % L]`` in order (as the PLR authors' code).

:class:`ProcgenLevelBackend` runs Procgen through EnvPool, the maintained Procgen engine available here:
EnvPool draws a level at every reset from ``[start_level, start_level + num_levels)`` with its own generator and
has no call that sets the next level of one env. So each env is a one-env EnvPool pool built with
``num_levels=1, start_level=level`` (Procgen seeds all of an episode's randomness with its level seed), and
the dummy step that starts env ``b``'s next episode replaces its pool by one for the chosen level. The cost
(a pool build and reset per episode, slower stepping than one batched pool) is measured by
``docs/results/baselines/level_control_speed.py``.
:class:`GymnasiumLevelBackend` runs single Gymnasium envs and uses the level as the reset seed (the level then
fixes the episode's initial state and randomness); its state pickles exactly (exact resume).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium
import numpy as np

from aclab.envs.backends import ObsAdapter, _is_exactly_picklable


class _LevelChoice:
    """The level bookkeeping both backends share."""

    def _init_levels(self, levels: Sequence[int], num_envs: int, seed: int) -> None:
        self.levels = np.asarray(levels, dtype=np.int64)
        if self.levels.ndim != 1 or len(self.levels) == 0:
            raise ValueError("level control needs a non-empty set of levels")
        self._level_set = set(self.levels.tolist())
        self.current_levels = np.zeros(num_envs, dtype=np.int64)
        self._next = np.full(num_envs, -1, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._rng = np.random.default_rng(seed)

    def set_next_level(self, env_index: int, level: int) -> None:
        if int(level) not in self._level_set:
            raise ValueError(f"level {level} is not one of this env's {len(self.levels)} training levels")
        self._next[env_index] = int(level)

    def _take_level(self, b: int, initial: bool) -> int:
        if self._next[b] >= 0:
            level = int(self._next[b])
        elif initial:
            level = int(self.levels[b % len(self.levels)])
        else:
            level = int(self.levels[self._rng.integers(len(self.levels))])
        self._next[b] = -1
        self.current_levels[b] = level
        return level

    def _level_state(self) -> dict:
        return {"current": self.current_levels.copy(), "next": self._next.copy(),
                "needs_reset": self._needs_reset.copy(), "rng": self._rng.bit_generator.state}

    def _set_level_state(self, state: dict) -> None:
        self.current_levels = np.array(state["current"], dtype=np.int64)
        self._next = np.array(state["next"], dtype=np.int64)
        self._needs_reset = np.array(state["needs_reset"], dtype=bool)
        self._rng.bit_generator.state = state["rng"]


class GymnasiumLevelBackend(_LevelChoice):
    """``num_envs`` single Gymnasium envs; level = reset seed."""

    name = "gymnasium-levels"

    def __init__(self, make_single: Callable[[], gymnasium.Env], num_envs: int, env_seeds: Sequence[int],
                 levels: Sequence[int]) -> None:
        self.envs = [make_single() for _ in range(num_envs)]
        self.num_envs = num_envs
        self._init_levels(levels, num_envs, int(env_seeds[0]))
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.adapter = ObsAdapter(self.single_observation_space)
        self.exact_state = all(_is_exactly_picklable(e) for e in self.envs)
        self.info: dict[str, Any] = {}

    def reset(self, seeds: Sequence[int] | None) -> np.ndarray:
        if seeds is not None:
            self._rng = np.random.default_rng(int(seeds[0]))
        obs = [env.reset(seed=self._take_level(b, initial=True))[0] for b, env in enumerate(self.envs)]
        self._needs_reset[:] = False
        self.info = {"level": self.current_levels.copy()}
        return self.adapter(np.stack(obs))

    def step(self, actions: np.ndarray):
        B = self.num_envs
        obs, rewards = [None] * B, np.zeros(B, dtype=np.float32)
        terminated, truncated = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool)
        for b, env in enumerate(self.envs):
            if self._needs_reset[b]:
                obs[b] = env.reset(seed=self._take_level(b, initial=False))[0]
            else:
                obs[b], reward, terminated[b], truncated[b], _ = env.step(actions[b])
                rewards[b] = reward
        self._needs_reset = terminated | truncated
        self.info = {"level": self.current_levels.copy()}
        return self.adapter(np.stack(obs)), rewards, terminated, truncated, None

    def get_state(self) -> bytes | None:
        if not self.exact_state:
            return None
        try:
            return pickle.dumps({"envs": self.envs, "levels": self._level_state()})
        except Exception:  # an unpicklable member: no exact state
            return None

    def set_state(self, blob: bytes) -> bool:
        payload = pickle.loads(blob)
        if len(payload.get("envs", [])) != self.num_envs:
            return False
        for env in self.envs:
            env.close()
        self.envs = list(payload["envs"])
        self._set_level_state(payload["levels"])
        return True

    def close(self) -> None:
        for env in self.envs:
            env.close()


class ProcgenLevelBackend(_LevelChoice):
    """``num_envs`` one-env EnvPool Procgen pools, each rebuilt for the level of its next episode."""

    name = "envpool-levels"

    def __init__(self, task_id: str, num_envs: int, env_seeds: Sequence[int], config: dict[str, Any],
                 levels: Sequence[int]) -> None:
        self.task_id, self.num_envs = task_id, num_envs
        self.config = {k: v for k, v in config.items() if k not in ("num_levels", "start_level")}
        self._seeds = [int(s) for s in env_seeds]
        self._init_levels(levels, num_envs, self._seeds[0])
        self.pools: list[Any] = [None] * num_envs
        probe = self._make(int(self.levels[0]), self._seeds[0])
        self.single_observation_space = probe.observation_space
        self.single_action_space = probe.action_space
        probe.close()
        self.adapter = ObsAdapter(self.single_observation_space)
        self.info: dict[str, Any] = {}
        self._env_id = np.zeros(1, dtype=np.int32)

    def _make(self, level: int, seed: int):
        import envpool

        return envpool.make(self.task_id, env_type="gymnasium", num_envs=1, batch_size=1, num_threads=1, seed=seed,
                            num_levels=1, start_level=int(level), **self.config)

    def _start(self, b: int, initial: bool) -> np.ndarray:
        if self.pools[b] is not None:
            self.pools[b].close()
        self.pools[b] = self._make(self._take_level(b, initial), self._seeds[b])
        return self.pools[b].reset()[0][0]

    def reset(self, seeds: Sequence[int] | None) -> np.ndarray:
        if seeds is not None:
            self._seeds = [int(s) for s in seeds]
            self._rng = np.random.default_rng(self._seeds[0])
        obs = [self._start(b, initial=True) for b in range(self.num_envs)]
        self._needs_reset[:] = False
        self.info = {"level_seed": self.current_levels.copy()}
        return self.adapter(np.stack(obs))

    def step(self, actions: np.ndarray):
        B = self.num_envs
        actions = np.asarray(actions, dtype=np.int32)
        stepping = np.flatnonzero(~self._needs_reset)
        for b in stepping:  # every pool steps on its own thread; collect after starting the new episodes
            self.pools[b].send(actions[b:b + 1], self._env_id)
        obs = [None] * B
        rewards = np.zeros(B, dtype=np.float32)
        terminated, truncated = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool)
        for b in np.flatnonzero(self._needs_reset):
            obs[b] = self._start(b, initial=False)
        for b in stepping:
            o, r, term, trunc, _ = self.pools[b].recv()
            obs[b], rewards[b], terminated[b], truncated[b] = o[0], r[0], term[0], trunc[0]
        self._needs_reset = terminated | truncated
        self.info = {"level_seed": self.current_levels.copy()}
        return self.adapter(np.stack(obs)), rewards, terminated, truncated, None

    def get_state(self) -> bytes | None:
        return None  # EnvPool's simulators cannot be serialised

    def set_state(self, blob: bytes) -> bool:
        return False

    def close(self) -> None:
        for pool in self.pools:
            if pool is not None:
                pool.close()
        self.pools = [None] * self.num_envs
