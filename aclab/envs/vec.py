"""The vectorised environment that every aclab algorithm steps: :class:`VecEnv`.

Conventions (all arrays are batch-first ``[B, ...]``, B = ``num_envs``; collectors stack them
time-major ``[T, B, ...]``):

* **Next-step autoreset.** The step that ends an episode returns the true final observation with
  ``terminated`` or ``truncated`` set, so a truncated episode can bootstrap from ``V(final obs)``. The
  *following* step of that env is a dummy: its action is ignored, its reward is 0, both flags are
  False and its observation is the first one of the new episode. ``next_is_dummy[b]`` is True exactly
  when the next call to :meth:`VecEnv.step` will be a dummy for env ``b``. A collector stores
  ``valid_t = ~env.next_is_dummy`` *before* stepping and drops invalid transitions from returns,
  advantages, losses and statistics. (EnvPool and Gymnasium >= 1.0 both work this way.)
* **Episode statistics** use raw rewards, never count dummy steps, and are reported at the step where a
  *full* episode ends: ``episode_return[b]`` (float64, NaN elsewhere) and ``episode_length[b]`` (int64,
  0 elsewhere). Envs whose info has a ``success`` flag (Meta-World) also report ``episode_success[b]``:
  1.0 if ``success`` was set at *any* real step of the episode, else 0.0 (NaN where no episode ends);
  the flags of finished episodes queue up for :meth:`VecEnv.pop_episode_successes`. For Atari with
  ``episodic_life`` a life loss sets ``terminated`` (a training signal) but the statistics accumulate
  over the whole game.
* **Actions**: int64 ``[B]`` for Discrete spaces; float32 ``[B, *shape]`` for Box spaces, clipped to the
  space's bounds here (EnvPool's MuJoCo envs would otherwise charge control costs on out-of-range
  actions). The clipped action is what the simulator sees; the agent should store its unclipped
  sample for the log-probability.
* **Observations**: float32 for vectors (dicts flattened), uint8 for images, float32 after
  observation normalisation.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces

from aclab.envs.atari_marks import AtariFrameMarks
from aclab.envs.backends import derive_env_seeds
from aclab.envs.normalize import ObsNormalizer, RewardScaler
from aclab.envs.spec import EnvSpec

__all__ = ["StepResult", "VecEnv", "copy_normalization"]

_STATE_FORMAT = 1


@dataclass(slots=True)
class StepResult:
    """One batched transition; every field is ``[B]`` except ``obs`` (``[B, *obs_shape]``).

    ``reward``: float32 after reward normalisation (equal to ``raw_reward`` when it is off; 0 on dummy
    steps). ``terminated`` / ``truncated``: bool. ``raw_reward``: float32, before normalisation.
    ``episode_return``: float64 raw undiscounted return of the episode that ended at this step, NaN
    elsewhere. ``episode_length``: int64 number of real (non-dummy) steps of that episode, 0 elsewhere.
    ``episode_success``: float64, for envs with a ``success`` info flag, 1.0 / 0.0 where an episode ended
    (success at any of its real steps) and NaN elsewhere; None for other envs.
    """

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    raw_reward: np.ndarray
    episode_return: np.ndarray
    episode_length: np.ndarray
    episode_success: np.ndarray | None = None


_SUCCESS_QUEUE = 100_000  # finished-episode success flags kept until popped


class VecEnv:
    """A batch of ``num_envs`` environments with next-step autoreset, normalisation and statistics.

    Built by :func:`aclab.envs.make_env`; it composes a backend (EnvPool or Gymnasium, see
    :mod:`aclab.envs.backends`) with optional :class:`ObsNormalizer` / :class:`RewardScaler` /
    Atari frame marks. Attributes: ``num_envs``, ``spec``, ``obs`` (current observation, set by
    :meth:`reset` / :meth:`step`), ``next_is_dummy`` (bool ``[B]``), ``info`` (the backend's last raw
    info dict, e.g. Atari ``lives``, Procgen ``level_seed``, Meta-World ``success``),
    ``obs_normalizer`` and ``reward_scaler`` (or None), ``backend_name``.
    """

    def __init__(
        self,
        backend: Any,
        spec: EnvSpec,
        seed: int,
        *,
        obs_normalizer: ObsNormalizer | None = None,
        reward_scaler: RewardScaler | None = None,
        marks: AtariFrameMarks | None = None,
    ) -> None:
        self._backend = backend
        self.spec = spec
        self.num_envs = int(backend.num_envs)
        self.seed = int(seed)
        self.obs_normalizer = obs_normalizer
        self.reward_scaler = reward_scaler
        self._marks = marks
        self.backend_name: str = backend.name
        # Calls to step() so far, and (when set to a list) a record of every finished episode:
        # (step call number, env index, return, length, level or None, task or None). See record_episodes.
        self.step_calls = 0
        self.episode_log: list[tuple] | None = None
        b = self.num_envs
        self.obs: np.ndarray | None = None
        self.next_is_dummy = np.zeros(b, dtype=bool)
        self._any_dummy = False
        self._has_reset = False
        self._ep_return = np.zeros(b, dtype=np.float64)
        self._ep_length = np.zeros(b, dtype=np.int64)
        self._ep_success = np.zeros(b, dtype=bool)
        self._finished_successes: collections.deque[float] = collections.deque(maxlen=_SUCCESS_QUEUE)
        self._nan = np.full(b, np.nan, dtype=np.float64)
        backend_action_space = backend.single_action_space
        if isinstance(spec.action_space, spaces.Discrete):
            self._action_shape: tuple[int, ...] = (b,)
            self._prepare = self._prepare_discrete
        else:
            self._action_shape = (b, *spec.action_space.shape)
            self._action_dtype = backend_action_space.dtype
            self._low = np.asarray(backend_action_space.low, dtype=np.float64)
            self._high = np.asarray(backend_action_space.high, dtype=np.float64)
            self._bounded = bool(np.isfinite(self._low).any() or np.isfinite(self._high).any())
            self._prepare = self._prepare_box

    # ------------------------------------------------------------------ actions
    def _prepare_discrete(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != self._action_shape or a.dtype.kind not in "iu":
            raise ValueError(f"expected integer actions of shape {self._action_shape}, got {a.dtype} {a.shape}")
        return a

    def _prepare_box(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != self._action_shape:
            raise ValueError(f"expected float actions of shape {self._action_shape}, got {a.shape}")
        if self._bounded:
            a = np.clip(a, self._low, self._high)
        return a.astype(self._action_dtype, copy=False)

    # ------------------------------------------------------------------ core API
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env and return the first observations ``[B, *obs_shape]``.

        ``seed=None`` on the first call uses the seed given to :func:`make_env`; later calls with
        ``seed=None`` continue the envs' random streams. A given seed reseeds every env (per-env seeds
        derived with ``np.random.SeedSequence``).
        """
        if seed is None and not self._has_reset:
            seed = self.seed
        seeds = None if seed is None else derive_env_seeds(seed, self.num_envs)
        obs = self._backend.reset(seeds)
        self._has_reset = True
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self._ep_success[:] = False
        self.next_is_dummy = np.zeros(self.num_envs, dtype=bool)
        self._any_dummy = False
        if self.reward_scaler is not None:
            self.reward_scaler.reset_returns()
        if self._marks is not None:
            obs = self._marks.on_reset(obs, self._backend.info["elapsed_step"])
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer(obs)
        self.obs = obs
        return obs

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with ``actions`` (int64 ``[B]`` or float32 ``[B, *action_shape]``)."""
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        dummy = self.next_is_dummy
        prepared = self._prepare(actions)
        obs, raw_reward, terminated, truncated, episode_end = self._backend.step(prepared)
        done = terminated | truncated
        if self._any_dummy:
            raw_reward[dummy] = 0.0  # backends already return 0 here; keep the invariant explicit
            self._ep_length += ~dummy
        else:
            self._ep_length += 1
        self._ep_return += raw_reward
        if episode_end is None:
            episode_end = done
        episode_return = self._nan.copy()
        episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self.step_calls += 1
        info = self._backend.info or {}
        episode_success = None
        if "success" in info:  # Meta-World: success at any real step of the episode
            success = np.asarray(info["success"]).reshape(-1) > 0
            self._ep_success |= success & ~dummy if self._any_dummy else success
            episode_success = self._nan.copy()
        if np.count_nonzero(episode_end):  # (ndarray.any() costs ~1.5 us on tiny arrays)
            episode_return[episode_end] = self._ep_return[episode_end]
            episode_length[episode_end] = self._ep_length[episode_end]
            if self.episode_log is not None:
                self._log_episodes(episode_end, episode_return, episode_length)
            self._ep_return[episode_end] = 0.0
            self._ep_length[episode_end] = 0
            if episode_success is not None:
                episode_success[episode_end] = self._ep_success[episode_end]
                self._finished_successes.extend(episode_success[episode_end].tolist())
                self._ep_success[episode_end] = False
        if self.reward_scaler is not None:
            reward = self.reward_scaler(raw_reward, done, ~dummy if self._any_dummy else None)
        else:
            reward = raw_reward.copy()
        if self._marks is not None:
            obs = self._marks.on_step(obs, prepared, dummy, self._backend.info["elapsed_step"])
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer(obs)
        self.obs = obs
        self.next_is_dummy = done
        self._any_dummy = np.count_nonzero(done) > 0
        return StepResult(obs, reward, terminated, truncated, raw_reward, episode_return, episode_length,
                          episode_success)

    # ------------------------------------------------------------------ per-episode levels
    def set_next_level(self, env_index: int, level: int) -> None:
        """The level env ``env_index`` plays from its next reset (envs built with ``level_control=True``)."""
        if self.spec.levels is None:
            raise RuntimeError("this VecEnv was not built with level_control=True")
        self._backend.set_next_level(env_index, level)

    @property
    def current_levels(self) -> np.ndarray | None:
        """int64 [B]: the level each env is playing (level control), else None."""
        return getattr(self._backend, "current_levels", None)

    def render(self) -> np.ndarray:
        """The current RGB frame ``[H, W, 3]`` uint8 of env 0; the env must be made with
        ``make_env(..., render=True)``."""
        frame = self._backend.render() if hasattr(self._backend, "render") else None
        if frame is None:
            raise RuntimeError(f"{self.spec.env_id}: this env gives no frames (make it with make_env(..., render=True);"
                               " a factory must create its env with render_mode='rgb_array')")
        return frame

    def record_episodes(self, on: bool = True) -> None:
        """Start (or stop) recording finished episodes into :attr:`episode_log` (drained by the caller)."""
        self.episode_log = [] if on else None

    def _log_episodes(self, ended: np.ndarray, returns: np.ndarray, lengths: np.ndarray) -> None:
        info = self._backend.info or {}
        level = _info_column(info, ("level_seed", "level"), self.num_envs)
        task = _info_column(info, ("task_id", "task"), self.num_envs)
        for i in np.nonzero(ended)[0]:
            self.episode_log.append((self.step_calls, int(i), float(returns[i]), int(lengths[i]),
                                     None if level is None else level[i], None if task is None else task[i]))

    @property
    def info(self) -> dict[str, Any]:
        """The backend's last raw info dict (rows aligned with env index)."""
        return self._backend.info

    def pop_episode_successes(self) -> np.ndarray:
        """Success flags (1.0 / 0.0, float64 ``[E]``) of the episodes that ended since the last call, in the
        order they ended; empty for envs without a ``success`` info flag."""
        out = np.fromiter(self._finished_successes, dtype=np.float64, count=len(self._finished_successes))
        self._finished_successes.clear()
        return out

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VecEnv({self.spec.env_id!r}, num_envs={self.num_envs}, backend={self.backend_name!r},"
            f" obs={self.spec.obs_shape} {self.spec.obs_dtype}, actions={self.spec.action_space})"
        )

    # ------------------------------------------------------------------ normalisation helpers
    def set_normalization_update(self, update: bool) -> None:
        """Freeze (False) or unfreeze (True) the observation and reward statistics."""
        for norm in (self.obs_normalizer, self.reward_scaler):
            if norm is not None:
                norm.update = bool(update)

    def set_statistics_reducer(self, reducer) -> None:
        """Merge the normalisers' batch statistics with other processes at every step (``reducer``: see
        :class:`aclab.envs.normalize.RunningMeanStd`; None: this env's batches only)."""
        for norm in (self.obs_normalizer, self.reward_scaler):
            if norm is not None:
                norm.rms.reducer = reducer

    def copy_normalization_from(self, other: VecEnv, freeze: bool = True) -> None:
        """Copy ``other``'s observation / reward statistics into this env (e.g. train -> eval)."""
        copy_normalization(other, self, freeze=freeze)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: normaliser statistics, episode accumulators, ``obs`` /
        ``next_is_dummy``, Atari marks, and the simulator state as pickled bytes when the backend can
        serialise it exactly (Gymnasium envs without EzPickle layers), else None."""
        return {
            "format": _STATE_FORMAT,
            "env_id": self.spec.env_id,
            "num_envs": self.num_envs,
            "backend_name": self.backend_name,
            "has_reset": self._has_reset,
            "obs_normalizer": None if self.obs_normalizer is None else self.obs_normalizer.state_dict(),
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
            "marks": None if self._marks is None else self._marks.state_dict(),
            "episode_return_acc": self._ep_return.copy(),
            "episode_length_acc": self._ep_length.copy(),
            "episode_success_acc": self._ep_success.copy(),
            "obs": None if self.obs is None else self.obs.copy(),
            "next_is_dummy": self.next_is_dummy.copy(),
            "backend": self._backend.get_state() if self._has_reset else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a :meth:`state_dict`. Returns True if the simulators themselves were restored (the run
        continues bit-exactly), False if only the statistics were (the envs were reset instead, with
        fresh episode accumulators)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported VecEnv state format {state.get('format')!r}")
        if state["num_envs"] != self.num_envs or state["env_id"] != self.spec.env_id:
            raise ValueError(
                f"state is for {state['env_id']!r} x {state['num_envs']}, this env is"
                f" {self.spec.env_id!r} x {self.num_envs}"
            )
        for name, norm in (("obs_normalizer", self.obs_normalizer), ("reward_scaler", self.reward_scaler)):
            if (state[name] is None) != (norm is None):
                raise ValueError(f"state {'has' if state[name] is not None else 'lacks'} {name}, this env does not")
        if self.obs_normalizer is not None:
            self.obs_normalizer.load_state_dict(state["obs_normalizer"])
        exact = (
            state["backend"] is not None
            and state["backend_name"] == self.backend_name
            and self._backend.set_state(state["backend"])
        )
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"], restore_returns=exact)
        if not exact:
            self.reset()
            return False
        self._has_reset = bool(state["has_reset"])
        self._ep_return = np.array(state["episode_return_acc"], dtype=np.float64, copy=True)
        self._ep_length = np.array(state["episode_length_acc"], dtype=np.int64, copy=True)
        self._ep_success = np.array(state.get("episode_success_acc", np.zeros(self.num_envs, bool)), dtype=bool,
                                    copy=True)
        self.obs = None if state["obs"] is None else np.array(state["obs"], copy=True)
        self.next_is_dummy = np.array(state["next_is_dummy"], dtype=bool, copy=True)
        self._any_dummy = bool(self.next_is_dummy.any())
        if self._marks is not None and state["marks"] is not None:
            self._marks.load_state_dict(state["marks"])
        return True


def _info_column(info: dict[str, Any], keys: tuple[str, ...], num_envs: int) -> list | None:
    """The first of ``keys`` in a backend's info dict as one plain value per env (e.g. Procgen's
    ``level_seed`` of the episode that just ended, Meta-World's ``task_id``), else None."""
    for key in keys:
        value = info.get(key) if isinstance(info, dict) else None
        if value is None:
            continue
        array = np.asarray(value)
        if array.shape == (num_envs,) and array.dtype.kind in "iufbU":
            return array.tolist()
    return None


def copy_normalization(src: VecEnv, dst: VecEnv, freeze: bool = True) -> None:
    """Copy observation and reward statistics from ``src`` to ``dst`` and optionally freeze ``dst``'s.

    Typical use: before each evaluation, ``copy_normalization(train_env, eval_env)`` so the evaluation
    policy sees observations normalised exactly as in training, without the evaluation data moving
    the statistics.
    """
    if (src.obs_normalizer is None) != (dst.obs_normalizer is None):
        raise ValueError("both envs must have normalize_obs on, or both off")
    if src.obs_normalizer is not None and dst.obs_normalizer is not None:
        dst.obs_normalizer.copy_from(src.obs_normalizer)
    if src.reward_scaler is not None and dst.reward_scaler is not None:
        dst.reward_scaler.copy_from(src.reward_scaler)
    if freeze:
        dst.set_normalization_update(False)
