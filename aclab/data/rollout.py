"""On-policy rollout storage and collection with autoreset-dummy masking.

EnvPool and Gymnasium 1.x vector envs use next-step autoreset: the step after an episode ends
ignores the action and returns the reset observation with reward 0. The collector stores
``valid[t] = not envs.next_is_dummy`` before each step, so such dummy transitions are kept out of
returns, advantages, losses and episode statistics. Because the observation stored after an
episode's last step is its true final observation, ``values[t + 1]`` is V(final obs) and a
time-limit truncation bootstraps from it (``discounts[t] = gamma``), while a termination does not
(``discounts[t] = 0``); ``ends[t]`` cuts the lambda-trace in both cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from aclab.runs import check_stop


@dataclass
class Rollout:
    """Time-major rollout of T steps from B envs (all tensors on the learner's device).

    obs [T, B, *obs_shape]; actions [T, B] (int64) or [T, B, D] (float32); log_probs [T, B];
    values [T + 1, B] (the last row bootstraps); rewards [T, B]; terminated, ends, valid [T, B] bool;
    dist_params [T, B, P] (the behaviour policy's parameters, for KL terms and V-trace).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    ends: torch.Tensor
    valid: torch.Tensor
    dist_params: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_envs(self) -> int:
        return self.rewards.shape[1]

    def discounts(self, gamma: float) -> torch.Tensor:
        """gamma * (1 - terminated) [T, B]: zero only where an episode terminated (not truncated)."""
        return gamma * (~self.terminated).to(self.rewards.dtype)


# act_fn(obs [B, *obs_shape] torch, on the learner's device) -> NumPy arrays on the host:
#   (actions [B, ...], log_probs [B], values [B], dist_params [B, P])
ActFn = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class RolloutCollector:
    """Preallocated host storage plus the loop that fills it from a :class:`aclab.envs.VecEnv`.

    Storage is NumPy on the host (writing one step into a NumPy array costs ~0.3 us, into a torch
    tensor ~4 us); on CPU the returned :class:`Rollout` holds zero-copy torch views of it, on a GPU
    one transfer per array per rollout. The returned tensors are overwritten by the next
    :meth:`collect`: clone what must outlive it.
    """

    def __init__(self, envs, num_steps: int, param_dim: int, device: torch.device):
        spec = envs.spec
        T, B = num_steps, envs.num_envs
        self.device = device
        self.obs = np.zeros((T, B, *envs.obs.shape[1:]), dtype=envs.obs.dtype)
        if spec.discrete:
            self.actions = np.zeros((T, B), dtype=np.int64)
        else:
            self.actions = np.zeros((T, B, spec.action_dim), dtype=np.float32)
        self.log_probs = np.zeros((T, B), dtype=np.float32)
        self.values = np.zeros((T + 1, B), dtype=np.float32)
        self.dist_params = np.zeros((T, B, param_dim), dtype=np.float32)
        self.rewards = np.zeros((T, B), dtype=np.float32)
        self.terminated = np.zeros((T, B), dtype=bool)
        self.ends = np.zeros((T, B), dtype=bool)
        self.valid = np.zeros((T, B), dtype=bool)
        self.num_steps = T
        self._on_cpu = device.type == "cpu"

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array) if self._on_cpu else torch.as_tensor(array, device=self.device)

    def collect(self, envs, act_fn: ActFn, value_fn: Callable[[torch.Tensor], np.ndarray]):
        """Run T steps; return (Rollout, finished-episode raw returns [E], lengths [E])."""
        episode_returns: list[np.ndarray] = []
        episode_lengths: list[np.ndarray] = []
        obs_buf, actions_buf, log_probs_buf, values_buf = self.obs, self.actions, self.log_probs, self.values
        params_buf, rewards_buf, terminated_buf, ends_buf = self.dist_params, self.rewards, self.terminated, self.ends
        for t in range(self.num_steps):
            check_stop()
            np.logical_not(envs.next_is_dummy, out=self.valid[t])
            obs_buf[t] = envs.obs
            actions, log_probs_buf[t], values_buf[t], params_buf[t] = act_fn(self._tensor(obs_buf[t]))
            actions_buf[t] = actions
            result = envs.step(actions)
            rewards_buf[t] = result.reward
            terminated_buf[t] = result.terminated
            np.logical_or(result.terminated, result.truncated, out=ends_buf[t])
            if ends_buf[t].any():
                done = result.episode_length > 0
                episode_returns.append(result.episode_return[done])
                episode_lengths.append(result.episode_length[done])
        values_buf[self.num_steps] = value_fn(self._tensor(np.ascontiguousarray(envs.obs)))
        rollout = Rollout(
            obs=self._tensor(self.obs),
            actions=self._tensor(self.actions),
            log_probs=self._tensor(self.log_probs),
            values=self._tensor(self.values),
            rewards=self._tensor(self.rewards),
            terminated=self._tensor(self.terminated),
            ends=self._tensor(self.ends),
            valid=self._tensor(self.valid),
            dist_params=self._tensor(self.dist_params),
        )
        returns = np.concatenate(episode_returns) if episode_returns else np.zeros(0)
        lengths = np.concatenate(episode_lengths) if episode_lengths else np.zeros(0, dtype=np.int64)
        return rollout, returns, lengths


def valid_transitions(valid: torch.Tensor, **per_step: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch an update trains on: each ``[T, B, ...]`` tensor of ``per_step`` flattened time-major to
    ``[N, ...]``, keeping only the N real transitions (``valid`` [T, B] True). Dummy autoreset steps
    never enter a loss. Pass ``values[:-1]`` (not the bootstrap row) for rollout-time values."""
    idx = torch.nonzero(valid.reshape(-1)).squeeze(1)
    return {name: x.reshape(-1, *x.shape[2:])[idx] for name, x in per_step.items()}


LARGE_ITEM_ELEMENTS = 1024  # items from this size on are gathered per minibatch (see shuffled_minibatches)


def shuffled_minibatches(
    batch: dict[str, torch.Tensor], num_minibatches: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch over ``batch`` (tensors sharing their first dim N) in ``num_minibatches`` random parts.

    Minibatch ``i`` holds the items ``perm[i * size:(i + 1) * size]`` of one random permutation per epoch.
    Small items (fewer than :data:`LARGE_ITEM_ELEMENTS` elements: actions, log-probs, vector observations)
    are shuffled once per epoch (one gather per tensor) and sliced (views), which costs far fewer kernel
    calls than gathering every minibatch; large items (image observations) are gathered per minibatch, so
    that no shuffled copy of the whole rollout's frames is ever held (DNA's Procgen rollout of normalised
    float frames: 3.2 GB per copy). Both give the same minibatches. Parts have N // num_minibatches items;
    the remainder N mod num_minibatches is left out of this epoch (a different subset each epoch).
    """
    n = next(iter(batch.values())).shape[0]
    perm = torch.randperm(n, generator=generator, device=generator.device)
    large = {k for k, v in batch.items() if v[:1].numel() >= LARGE_ITEM_ELEMENTS}
    shuffled = {k: v[perm] for k, v in batch.items() if k not in large}
    size = max(n // num_minibatches, 1)
    for i in range(min(num_minibatches, n)):
        check_stop()
        part = perm[i * size:(i + 1) * size]
        yield {k: v[part] if k in large else shuffled[k][i * size:(i + 1) * size] for k, v in batch.items()}
