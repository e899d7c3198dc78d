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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


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


# act_fn(obs [B, *obs_shape]) -> (actions [B, ...], log_probs [B], values [B], dist_params [B, P])
ActFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class RolloutCollector:
    """Preallocated storage plus the loop that fills it from a :class:`aclab.envs.VecEnv`."""

    def __init__(self, envs, num_steps: int, param_dim: int, device: torch.device):
        spec = envs.spec
        T, B = num_steps, envs.num_envs
        self.device = device
        obs_dtype = torch.from_numpy(np.zeros(0, dtype=envs.obs.dtype)).dtype
        self.obs = torch.zeros((T, B, *envs.obs.shape[1:]), dtype=obs_dtype, device=device)
        if spec.discrete:
            self.actions = torch.zeros((T, B), dtype=torch.int64, device=device)
        else:
            self.actions = torch.zeros((T, B, spec.action_dim), dtype=torch.float32, device=device)
        self.log_probs = torch.zeros((T, B), device=device)
        self.values = torch.zeros((T + 1, B), device=device)
        self.dist_params = torch.zeros((T, B, param_dim), device=device)
        # env outputs are staged on the host and moved once per rollout
        self.rewards = np.zeros((T, B), dtype=np.float32)
        self.terminated = np.zeros((T, B), dtype=bool)
        self.ends = np.zeros((T, B), dtype=bool)
        self.valid = np.zeros((T, B), dtype=bool)
        self.num_steps = T

    def collect(self, envs, act_fn: ActFn, value_fn: Callable[[torch.Tensor], torch.Tensor]):
        """Run T steps; return (Rollout, finished-episode returns list, lengths list)."""
        episode_returns: list[np.ndarray] = []
        episode_lengths: list[np.ndarray] = []
        on_cpu = self.device.type == "cpu"
        for t in range(self.num_steps):
            self.valid[t] = ~envs.next_is_dummy
            obs = torch.from_numpy(envs.obs) if on_cpu else torch.as_tensor(envs.obs, device=self.device)
            self.obs[t] = obs
            actions, log_probs, values, params = act_fn(self.obs[t])
            self.actions[t] = actions
            self.log_probs[t] = log_probs
            self.values[t] = values
            self.dist_params[t] = params
            result = envs.step(actions.numpy() if on_cpu else actions.cpu().numpy())
            self.rewards[t] = result.reward
            self.terminated[t] = result.terminated
            np.logical_or(result.terminated, result.truncated, out=self.ends[t])
            if self.ends[t].any():
                done = result.episode_length > 0
                episode_returns.append(result.episode_return[done])
                episode_lengths.append(result.episode_length[done])
        last_obs = torch.as_tensor(envs.obs, device=self.device)
        self.values[self.num_steps] = value_fn(last_obs)
        to = (lambda a: torch.from_numpy(a)) if on_cpu else (lambda a: torch.as_tensor(a, device=self.device))
        rollout = Rollout(
            obs=self.obs,
            actions=self.actions,
            log_probs=self.log_probs,
            values=self.values,
            rewards=to(self.rewards),
            terminated=to(self.terminated),
            ends=to(self.ends),
            valid=to(self.valid),
            dist_params=self.dist_params,
        )
        returns = np.concatenate(episode_returns) if episode_returns else np.zeros(0)
        lengths = np.concatenate(episode_lengths) if episode_lengths else np.zeros(0, dtype=np.int64)
        return rollout, returns, lengths
