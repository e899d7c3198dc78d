"""Uniform experience replay for off-policy algorithms (TD3, SAC): host NumPy storage, torch batches.

Storage is preallocated at ``capacity`` when the buffer is built, one array per field, so its size
never changes while training (:attr:`ReplayBuffer.nbytes` is the full footprint; the OS commits the
pages as they are first written, so resident memory grows to ``nbytes`` as the buffer fills and no
further). Fields, row ``i`` being one transition:

* ``obs`` ``[C, *obs_shape]`` (the env's observation dtype: float32 vectors, uint8 images),
* ``actions`` ``[C, action_dim]`` float32 (the agent's normalised action, see the algorithms),
* ``rewards`` ``[C]`` float32,
* ``next_obs`` ``[C, *obs_shape]``: the observation the step returned -- with next-step autoreset
  this is the *true final* observation when the episode ended, so a truncated transition can
  bootstrap from it,
* ``terminated`` ``[C]`` float32 (1.0 for a true termination): the only flag the TD target uses,
  ``y = r + gamma * (1 - terminated) * Q'(s', a')``; a truncation (time limit) bootstraps.

Memory of 1e6 transitions of HalfCheetah (obs 17, actions 6): 2 x 68 MB (obs, next_obs) + 24 MB
(actions) + 4 + 4 MB (rewards, terminated) = 168 MB (see :func:`replay_nbytes`).

Dummy transitions of next-step autoreset (the step after an episode ended: action ignored, reward 0,
observation of the new episode) must not be stored: :meth:`ReplayBuffer.add` takes the ``valid``
mask (``~envs.next_is_dummy`` taken *before* the step) and drops invalid rows.

Checkpoints: :meth:`ReplayBuffer.state_dict` holds the filled rows only (as tensors, so
``torch.save`` writes them without a pickle copy) plus the write position; :meth:`load_state_dict`
restores them into the preallocated arrays and refuses a state whose shapes or capacity differ, so a
resumed run never silently starts from an empty or mismatched buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")
_STATE_FORMAT = 1


@dataclass(slots=True)
class ReplayBatch:
    """A sampled minibatch, batch-first: ``obs`` / ``next_obs`` ``[N, *obs_shape]``, ``actions``
    ``[N, A]``, ``rewards`` / ``terminated`` ``[N]`` (float32)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


def replay_nbytes(capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, action_dim: int) -> int:
    """Bytes a :class:`ReplayBuffer` of this size holds (obs twice, float32 actions/rewards/flags)."""
    obs_bytes = math.prod(obs_shape) * np.dtype(obs_dtype).itemsize
    return int(capacity) * (2 * obs_bytes + 4 * action_dim + 4 + 4)


class ReplayBuffer:
    """A ring buffer of ``capacity`` transitions with uniform sampling (with replacement).

    Args:
        capacity: the most transitions kept; the oldest are overwritten first.
        obs_shape, obs_dtype: one observation's shape and dtype.
        action_dim: size of the flat continuous action.
    """

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any, action_dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.action_dim = int(action_dim)
        self.obs = np.zeros((self.capacity, *self.obs_shape), dtype=self.obs_dtype)
        self.next_obs = np.zeros((self.capacity, *self.obs_shape), dtype=self.obs_dtype)
        self.actions = np.zeros((self.capacity, self.action_dim), dtype=np.float32)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.terminated = np.zeros(self.capacity, dtype=np.float32)
        self.pos = 0  # next row to write
        self.size = 0  # rows filled
        self.added = 0  # transitions added over the buffer's life (including overwritten ones)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage (independent of how much is filled)."""
        return sum(getattr(self, name).nbytes for name in _FIELDS)

    # ------------------------------------------------------------------ writing
    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        valid: np.ndarray | None = None,
    ) -> int:
        """Append a batch of transitions ``[B, ...]``; rows with ``valid[b] == False`` are skipped.

        Returns the number of rows stored. ``terminated`` is the env's termination flag (bool or
        float); truncation is *not* passed here: truncated transitions bootstrap.
        """
        if valid is not None and not valid.all():
            keep = np.flatnonzero(valid)
            obs, actions, rewards = obs[keep], actions[keep], rewards[keep]
            next_obs, terminated = next_obs[keep], terminated[keep]
        n = len(obs)
        if n == 0:
            return 0
        if n > self.capacity:  # keep the newest capacity rows
            cut = n - self.capacity
            obs, actions, rewards = obs[cut:], actions[cut:], rewards[cut:]
            next_obs, terminated = next_obs[cut:], terminated[cut:]
            self.added += cut
            self.pos = (self.pos + cut) % self.capacity  # as if the dropped rows had been written
            n = self.capacity
        start = self.pos
        end = start + n
        if end <= self.capacity:
            self._write(slice(start, end), obs, actions, rewards, next_obs, terminated)
        else:  # wrap around
            first = self.capacity - start
            self._write(slice(start, self.capacity), obs[:first], actions[:first], rewards[:first],
                        next_obs[:first], terminated[:first])
            self._write(slice(0, n - first), obs[first:], actions[first:], rewards[first:], next_obs[first:],
                        terminated[first:])
        self.pos = end % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.added += n
        return n

    def _write(self, rows: slice, obs, actions, rewards, next_obs, terminated) -> None:
        self.obs[rows] = obs
        self.actions[rows] = actions
        self.rewards[rows] = rewards
        self.next_obs[rows] = next_obs
        self.terminated[rows] = terminated

    # ------------------------------------------------------------------ sampling
    def sample_indices(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """``batch_size`` row indices drawn uniformly with replacement from the filled rows."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        return rng.integers(0, self.size, size=batch_size)

    def gather(self, indices: np.ndarray, device: torch.device | None = None) -> ReplayBatch:
        """The rows ``indices`` as a :class:`ReplayBatch` of tensors (CPU: zero-copy views of the
        gathered NumPy arrays; other devices: copied there)."""
        arrays = (self.obs[indices], self.actions[indices], self.rewards[indices], self.next_obs[indices],
                  self.terminated[indices])
        tensors = [torch.from_numpy(a) for a in arrays]
        if device is not None and device.type != "cpu":
            tensors = [t.to(device, non_blocking=True) for t in tensors]
        return ReplayBatch(*tensors)

    def sample(self, batch_size: int, rng: np.random.Generator, device: torch.device | None = None) -> ReplayBatch:
        """A uniform minibatch of ``batch_size`` transitions."""
        return self.gather(self.sample_indices(batch_size, rng), device)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The filled rows (tensors sharing memory with the buffer) and the ring position."""
        state: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "capacity": self.capacity,
            "obs_shape": self.obs_shape,
            "obs_dtype": self.obs_dtype.str,
            "action_dim": self.action_dim,
            "pos": self.pos,
            "size": self.size,
            "added": self.added,
        }
        for name in _FIELDS:
            state[name] = torch.from_numpy(getattr(self, name)[: self.size])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; raises ValueError if it does not fit this buffer."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported replay buffer state format {state.get('format')!r}")
        expected = (self.capacity, self.obs_shape, self.obs_dtype.str, self.action_dim)
        found = (int(state["capacity"]), tuple(state["obs_shape"]), state["obs_dtype"], int(state["action_dim"]))
        if found != expected:
            raise ValueError(
                f"replay state (capacity, obs_shape, obs_dtype, action_dim) = {found} does not match this buffer's "
                f"{expected}"
            )
        size = int(state["size"])
        for name in _FIELDS:
            data = state[name]
            data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            if len(data) != size:
                raise ValueError(f"replay state field {name!r} has {len(data)} rows, expected {size}")
            getattr(self, name)[:size] = data
        self.size = size
        self.pos = int(state["pos"])
        self.added = int(state.get("added", size))
