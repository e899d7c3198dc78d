"""PEARL (Rakelly et al. 2019, Algorithms 1 and 2): off-policy meta-RL with SAC and a probabilistic
context encoder, and Hyper-PEARL (Sarafian et al. 2021, hypernetwork paper, Sections 3 and 5.3).

Networks (latent z of ``latent_dim``):

* encoder ``phi``: an MLP on each context transition ``c_n = (s, a, r[, s'])`` -> ``(mu_n, sigma_n^2)``
  (``softplus`` variance); posterior = product of the factors (PEARL Eq. 5/9):
  ``sigma^2 = 1 / sum_n 1/sigma_n^2``, ``mu = sigma^2 sum_n mu_n / sigma_n^2``; ``z ~ N(mu, sigma^2)``
  (reparameterised); prior ``N(0, I)``;
* SAC (Haarnoja et al. 2018, the V-function version PEARL uses): twin ``Q(s, a, z)``, ``V(s, z)`` with a
  Polyak target ``V'``, tanh-Gaussian policy ``pi(a | s, z)`` (log std clamped to [-20, 2]).

Losses for a meta-batch of K training tasks, RL batch ``(s, a, r, s', d)`` and context ``c`` per task:

    L_Q   = sum_k mean (Q_k(s, a, z) - (reward_scale r + (1 - d) gamma V'(s', z)))^2
            + kl_lambda sum_tasks KL(q(z | c) || N(0, I))        -> Q networks and the encoder
    L_V   = mean (V(s, z) - [min_k Q_k(s, a~, z) - log pi(a~ | s, z)])^2,   a~ ~ pi(. | s, z)
    L_pi  = mean (log pi(a~ | s, z) - min_k Q_k(s, a~, z)) + 1e-3 mean mu^2 + 1e-3 mean log_std^2
z is detached everywhere except in L_Q (the encoder learns from the critic and the KL only).

Models (``params.model``): ``"mlp"``: the inputs concatenated (PEARL); ``"hyper"`` (Hyper-PEARL, the
spec's wiring): policy ``f_{w(z)}(s)`` (z -> primary, state -> dynamic), ``Q = f_{w(s)}([a, z])``,
``V = f_{w(s)}(z)`` (the context as a base variable, hypernetwork paper, Section 3 end), with the learning rates of
the paper (Q/V 5e-5, policy 1e-4).

Data (PEARL Algorithm 1): per-task replay buffers for the RL batch and separate per-task encoder buffers
for the context. Each iteration, for ``num_tasks_sample`` training tasks: the task's encoder buffer is
cleared; episodes with z from the prior (``num_steps_prior``, into both buffers), episodes with z
from the posterior of that fresh context (``num_steps_posterior``, both buffers;
``num_extra_rl_steps_posterior``, RL buffer only); then ``num_train_steps_per_itr`` gradient steps.
Step counts are rounded up to whole episodes. Meta-test (PEARL Algorithm 2, posterior sampling):
per task, z from the prior for the first ``num_exp_traj_eval`` episodes, then z sampled from the
posterior of all transitions seen so far in the task, deterministic actions; logged as
``test/return_first`` (first episode) and ``test/return_final`` (last episode), also for
``num_eval_train_tasks`` training tasks (``train/...``).

Env handling as MAML (:mod:`aclab.algos.maml`): the task family comes from the loop's env id; the loop's
``envs`` are not used. ``act(obs)`` drops the loop env's oracle context and acts with z = 0 (the prior
mean): the loop's plain evaluation is a no-adaptation number; the meta-test returns are the metrics.
Actions are normalised to [-1, 1] (replay, context) and scaled to the action bounds for the env.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from aclab.algos.common import Entry, check_finite
from aclab.algos.maml import shared_dynamic_forward
from aclab.algos.offpolicy import TanhGaussianActor, bound_log_std, freeze, polyak_update
from aclab.config import Config, require
from aclab.core.distributions import normal_kl, normal_split, tanh_normal_sample_and_log_prob
from aclab.envs.meta import BatchTaskEnv, Trajectories, family_for_env_spec, rollout
from aclab.nets.critics import HyperCritic, make_critic
from aclab.nets.hyper import HYPER_INITS, DynamicLayer, HyperPolicy
from aclab.runs import check_stop

MODELS = ("mlp", "hyper")


@dataclass
class PEARLConfig:
    """PEARL hyperparameters (defaults: the PEARL code's ``configs/default.py``; HalfCheetah-Vel)."""

    model: Literal["mlp", "hyper"] = "mlp"
    num_train_tasks: int = 100
    num_test_tasks: int = 30
    latent_dim: int = 5
    hidden_sizes: tuple[int, ...] = (300, 300, 300)
    encoder_hidden: tuple[int, ...] = (200, 200, 200)
    meta_batch: int = 16
    num_initial_steps: int = 2000
    num_tasks_sample: int = 5
    num_steps_prior: int = 400
    num_steps_posterior: int = 0
    num_extra_rl_steps_posterior: int = 400
    num_train_steps_per_itr: int = 2000
    batch_size: int = 256
    embedding_batch_size: int = 64
    gamma: float = 0.99
    tau: float = 0.005
    policy_lr: float = 3e-4
    qf_lr: float = 3e-4
    vf_lr: float = 3e-4
    context_lr: float = 3e-4
    hyper_policy_lr: float = 1e-4  # hypernetwork paper, Section 5 / spec: Hyper-PEARL policy lr
    hyper_critic_lr: float = 5e-5  # Hyper-PEARL Q and V lr
    reward_scale: float = 5.0
    kl_lambda: float = 0.1
    use_information_bottleneck: bool = True
    use_next_obs_in_context: bool = False
    update_post_train: int = 1  # episodes between posterior updates while collecting
    num_exp_traj_eval: int = 1
    num_steps_per_eval: int = 600
    num_eval_train_tasks: int = 5
    eval_every: int = 5  # iterations between meta-test evaluations (0: never)
    replay_size: int = 100_000  # per task
    policy_mean_reg: float = 1e-3
    policy_std_reg: float = 1e-3
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    hyper_dynamic_hidden: tuple[int, ...] = (256,)
    hyper_primary_widths: tuple[int, ...] = (256, 512, 1024)
    hyper_blocks_per_stage: int = 2
    hyper_init: Literal["kaiming", "authors"] = "kaiming"
    adam_eps: float = 1e-8

    def validate(self) -> None:
        require(self.model in MODELS, "params.model", self.model, "one of " + ", ".join(MODELS))
        for name in ("num_train_tasks", "num_test_tasks", "latent_dim", "meta_batch", "num_tasks_sample",
                     "batch_size", "embedding_batch_size", "update_post_train", "num_exp_traj_eval",
                     "num_steps_per_eval", "replay_size", "hyper_blocks_per_stage", "num_initial_steps"):
            require(getattr(self, name) >= 1, f"params.{name}", getattr(self, name), "an integer >= 1")
        for name in ("num_steps_prior", "num_steps_posterior", "num_extra_rl_steps_posterior",
                     "num_train_steps_per_itr", "num_eval_train_tasks", "eval_every"):
            require(getattr(self, name) >= 0, f"params.{name}", getattr(self, name), "an integer >= 0")
        for name in ("policy_lr", "qf_lr", "vf_lr", "context_lr", "hyper_policy_lr", "hyper_critic_lr", "reward_scale",
                     "adam_eps"):
            require(getattr(self, name) > 0, f"params.{name}", getattr(self, name), "a number > 0")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 < self.tau <= 1.0, "params.tau", self.tau, "a number in (0, 1]")
        require(self.kl_lambda >= 0, "params.kl_lambda", self.kl_lambda, "a number >= 0")
        require(self.log_std_min < self.log_std_max, "params.log_std_min", self.log_std_min,
                f"a number < params.log_std_max ({self.log_std_max})")
        require(self.hyper_init in HYPER_INITS, "params.hyper_init", self.hyper_init, " or ".join(HYPER_INITS))


# ----------------------------------------------------------------------------------------------
# The probabilistic context encoder (PEARL Section 4.1)
# ----------------------------------------------------------------------------------------------
def product_of_gaussians(means: Tensor, variances: Tensor, mask: Tensor | None = None,
                         min_variance: float = 1e-7) -> tuple[Tensor, Tensor]:
    """The (normalised) product of N Gaussian factors per task: ``means``, ``variances`` ``[K, N, Z]``,
    optional ``mask`` ``[K, N]`` (1 = use the factor) -> ``(mean, variance)`` ``[K, Z]``:
    ``var = 1 / sum_n 1/var_n``, ``mean = var sum_n mean_n / var_n`` (variances clamped to
    ``min_variance``, the PEARL code). A task whose factors are all masked gets ``N(0, 1)``."""
    precision = 1.0 / variances.clamp_min(min_variance)
    if mask is not None:
        precision = precision * mask.unsqueeze(-1).to(precision.dtype)
    total = precision.sum(1)
    empty = total <= 0
    variance = 1.0 / torch.where(empty, torch.ones_like(total), total)
    mean = variance * (precision * means).sum(1)
    return torch.where(empty, torch.zeros_like(mean), mean), variance


def kl_to_unit_gaussian(mean: Tensor, variance: Tensor) -> Tensor:
    """``KL(N(mean, variance) || N(0, I))`` summed over the last dimension: ``[..., Z] -> [...]``."""
    params = torch.cat([mean, 0.5 * variance.log()], dim=-1)
    return normal_kl(params, torch.zeros_like(params))


class ContextEncoder(nn.Module):
    """``phi(c_n)``: ReLU MLP on one transition -> ``(mu_n [Z], sigma_n^2 [Z])`` (softplus), or only
    ``mu_n`` (deterministic encoder: the posterior is then the mean of the ``mu_n``)."""

    def __init__(self, in_dim: int, latent_dim: int, hidden_sizes: Sequence[int] = (200, 200, 200),
                 probabilistic: bool = True) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.probabilistic = probabilistic
        dims = [in_dim, *[int(h) for h in hidden_sizes], 2 * latent_dim if probabilistic else latent_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``context`` ``[K, N, in]`` -> posterior ``(mean, variance)`` ``[K, Z]`` (variance 0 when not
        probabilistic)."""
        x = context
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        out = self.layers[-1](x)
        if not self.probabilistic:
            weights = torch.ones(out.shape[:2], device=out.device) if mask is None else mask.to(out.dtype)
            mean = (out * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
            return mean, torch.zeros_like(mean)
        mu, raw = out.split(self.latent_dim, dim=-1)
        return product_of_gaussians(mu, nn.functional.softplus(raw), mask)


# ----------------------------------------------------------------------------------------------
# Policies and critics conditioned on z
# ----------------------------------------------------------------------------------------------
class ZPolicy(nn.Module):
    """``pi(a | s, z)`` -> tanh-Gaussian params ``cat(mean, log_std)``. ``obs`` ``[K, B, D]`` with one z per
    task ``z`` ``[K, Z]``; ``"mlp"``: an MLP on ``[s, z]``; ``"hyper"``: ``f_{w(z)}(s)`` with the dynamic
    weights generated once per task (:class:`aclab.nets.hyper.HyperPolicy`)."""

    def __init__(self, model: str, obs_dim: int, latent_dim: int, action_dim: int, hidden_sizes: Sequence[int],
                 log_std_min: float, log_std_max: float, **hyper_kwargs) -> None:
        super().__init__()
        self.model = model
        self.action_dim = action_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        if model == "hyper":
            self.net = HyperPolicy(latent_dim, obs_dim, action_dim, output="tanh_gaussian", state_dependent_std=True,
                                   **hyper_kwargs)
        else:
            self.net = TanhGaussianActor(obs_dim + latent_dim, action_dim, hidden_sizes, log_std_min, log_std_max)

    def forward(self, obs: Tensor, z: Tensor) -> Tensor:
        if self.model != "hyper":
            return self.net(torch.cat([obs, z.unsqueeze(1).expand(*obs.shape[:2], z.shape[-1])], dim=-1))
        layers = self.net.net.dynamic_layers(z)  # [1, K, ...]
        out = shared_dynamic_forward([DynamicLayer(x.weight[0], x.bias[0], x.gain[0]) for x in layers], obs)
        mean, raw = out.split(self.action_dim, dim=-1)
        return torch.cat([mean, bound_log_std(raw, self.log_std_min, self.log_std_max, "clamp")], dim=-1)


class ZCritic(nn.Module):
    """``Q(s, a, z)`` (``action_dim > 0``, twin ensemble ``[2, N]``) or ``V(s, z)`` (``action_dim = 0``,
    ``[1, N]``) over flat batches ``[N, ...]``, built from :mod:`aclab.nets.critics`: ``"mlp"`` on
    ``[s, z, a]``; ``"hyper"``: state -> primary, ``[a, z]`` -> dynamic network."""

    def __init__(self, model: str, obs_dim: int, latent_dim: int, action_dim: int, hidden_sizes: Sequence[int],
                 **hyper_kwargs) -> None:
        super().__init__()
        self.model = model
        members = 2 if action_dim else 1
        base_dim = action_dim + latent_dim
        if model == "hyper":
            self.net = HyperCritic(obs_dim, base_dim, meta="state", ensemble_size=members, **hyper_kwargs)
        else:
            self.net = make_critic("mlp", obs_dim, base_dim, members, hidden_sizes=tuple(hidden_sizes))

    def forward(self, obs: Tensor, z: Tensor, actions: Tensor | None = None) -> Tensor:
        base = z if actions is None else torch.cat([actions, z], dim=-1)
        return self.net(obs, base)

    def q_for_actor(self, obs: Tensor, z: Tensor, actions: Tensor) -> Tensor:
        """Q for the policy loss (only ``grad_a Q`` is needed: the hyper critic skips the primary's graph)."""
        return self.net.q_for_actor(obs, torch.cat([actions, z], dim=-1))


# ----------------------------------------------------------------------------------------------
# Per-task replay
# ----------------------------------------------------------------------------------------------
class TaskReplay:
    """One ring buffer per task in shared arrays ``[num_tasks, capacity, ...]`` (lazily committed memory),
    so that a meta-batch ``[K, B]`` is one gather. Fields: ``obs`` / ``next_obs`` ``[.., D]``, ``actions``
    ``[.., A]`` (normalised), ``rewards`` / ``terminated`` ``[..]`` float32. (aclab.data.replay's
    ReplayBuffer is a single ring without per-task batched sampling or clearing.)"""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, action_dim: int) -> None:
        self.num_tasks, self.capacity = int(num_tasks), int(capacity)
        self.obs = np.zeros((num_tasks, capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((num_tasks, capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((num_tasks, capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros((num_tasks, capacity), dtype=np.float32)
        self.terminated = np.zeros((num_tasks, capacity), dtype=np.float32)
        self.pos = np.zeros(num_tasks, dtype=np.int64)
        self.size = np.zeros(num_tasks, dtype=np.int64)

    def clear(self, task: int) -> None:
        self.pos[task] = 0
        self.size[task] = 0

    def add_trajectories(self, task_ids: Sequence[int], traj: Trajectories, actions: np.ndarray) -> None:
        """Append the valid steps of episode ``i`` of ``traj`` to task ``task_ids[i]``; ``actions``
        ``[T, N, A]`` are the normalised actions."""
        for i, task in enumerate(task_ids):
            keep = traj.valid[:, i]
            n = int(keep.sum())
            rows = (self.pos[task] + np.arange(n)) % self.capacity
            self.obs[task, rows] = traj.obs[keep, i]
            self.actions[task, rows] = actions[keep, i]
            self.rewards[task, rows] = traj.rewards[keep, i]
            self.next_obs[task, rows] = traj.next_obs[keep, i]
            self.terminated[task, rows] = traj.terminated[keep, i]
            self.pos[task] = (self.pos[task] + n) % self.capacity
            self.size[task] = min(self.size[task] + n, self.capacity)

    def sample(self, task_ids: np.ndarray, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Uniform rows (with replacement) of each task: fields ``[K, batch_size, ...]``."""
        sizes = self.size[task_ids]
        if (sizes == 0).any():
            raise RuntimeError(f"PEARL: no data for task(s) {task_ids[sizes == 0].tolist()}")
        rows = (rng.random((len(task_ids), batch_size)) * sizes[:, None]).astype(np.int64)
        tasks = np.asarray(task_ids)[:, None]
        return {name: getattr(self, name)[tasks, rows] for name in self.FIELDS}

    def state_dict(self) -> dict:
        state = {"pos": self.pos.copy(), "size": self.size.copy()}
        for name in self.FIELDS:
            data = getattr(self, name)
            state[name] = [torch.from_numpy(data[t, : self.size[t]].copy()) for t in range(self.num_tasks)]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pos[:] = state["pos"]
        self.size[:] = state["size"]
        for name in self.FIELDS:
            for t, data in enumerate(state[name]):
                getattr(self, name)[t, : len(data)] = data.numpy()


def context_tensor(batch: dict[str, np.ndarray], use_next_obs: bool) -> np.ndarray:
    """Context transitions ``[K, N, D + A + 1 (+ D)]``: ``(s, a, r[, s'])``."""
    parts = [batch["obs"], batch["actions"], batch["rewards"][..., None]]
    if use_next_obs:
        parts.append(batch["next_obs"])
    return np.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
class PEARL:
    Config = PEARLConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: PEARLConfig = config.params
        self.device = device
        p = self.params
        self.family = f = family_for_env_spec(config.env.id, config.env.options, env_spec)
        low, high = f.action_low.astype(np.float32), f.action_high.astype(np.float32)
        self.action_scale, self.action_offset = (high - low) / 2.0, (high + low) / 2.0
        hyper = dict(dynamic_hidden=p.hyper_dynamic_hidden, primary_widths=p.hyper_primary_widths,
                     blocks_per_stage=p.hyper_blocks_per_stage, init=p.hyper_init)
        hyper_kwargs = hyper if p.model == "hyper" else {}
        z_dim, obs_dim, act_dim = p.latent_dim, f.obs_dim, f.action_dim
        context_dim = obs_dim + act_dim + 1 + (obs_dim if p.use_next_obs_in_context else 0)
        self.encoder = ContextEncoder(context_dim, z_dim, p.encoder_hidden, p.use_information_bottleneck).to(device)
        self.policy = ZPolicy(p.model, obs_dim, z_dim, act_dim, p.hidden_sizes, p.log_std_min, p.log_std_max,
                              **hyper_kwargs).to(device)
        self.qf = ZCritic(p.model, obs_dim, z_dim, act_dim, p.hidden_sizes, **hyper_kwargs).to(device)
        self.vf = ZCritic(p.model, obs_dim, z_dim, 0, p.hidden_sizes, **hyper_kwargs).to(device)
        self.vf_target = freeze(copy.deepcopy(self.vf))
        critic_lr = p.hyper_critic_lr if p.model == "hyper" else None
        policy_lr = p.hyper_policy_lr if p.model == "hyper" else p.policy_lr
        adam = {"eps": p.adam_eps, "foreach": True}
        self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=policy_lr, **adam)
        self.qf_optimizer = torch.optim.Adam(self.qf.parameters(), lr=critic_lr or p.qf_lr, **adam)
        self.vf_optimizer = torch.optim.Adam(self.vf.parameters(), lr=critic_lr or p.vf_lr, **adam)
        self.context_optimizer = torch.optim.Adam(self.encoder.parameters(), lr=p.context_lr, **adam)
        self._policy_params = list(self.policy.parameters())
        self._vf_params = list(self.vf.parameters())
        self._vf_target_params = list(self.vf_target.parameters())

        self.rng = np.random.default_rng(config.seed)
        self.eval_rng = np.random.default_rng([config.seed, 1])
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        pool_rng = np.random.default_rng([config.seed, 2])
        self.train_tasks = f.sample_tasks(p.num_train_tasks, pool_rng, "train")
        self.test_tasks = f.sample_tasks(p.num_test_tasks, pool_rng, "test")
        self.replay = TaskReplay(p.num_train_tasks, p.replay_size, obs_dim, act_dim)
        enc_capacity = max(p.num_initial_steps, p.num_steps_prior + p.num_steps_posterior) + f.horizon
        self.enc_replay = TaskReplay(p.num_train_tasks, enc_capacity, obs_dim, act_dim)
        self._batch_envs: dict[int, BatchTaskEnv] = {}
        self.steps = 0
        self.iteration = 0
        self.updates = 0
        self.initialized = False
        self.last_episode_returns = np.zeros(0)

    # ------------------------------------------------------------------ posterior and acting
    def posterior(self, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.encoder(context, mask)

    def sample_z(self, mean: Tensor, variance: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.params.use_information_bottleneck:
            return mean
        noise = torch.randn(mean.shape, generator=generator or self.generator, device=self.device)
        return mean + variance.sqrt() * noise

    def prior_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        zeros = torch.zeros(n, self.params.latent_dim, device=self.device)
        return self.sample_z(zeros, torch.ones_like(zeros), generator)

    @torch.no_grad()
    def policy_actions(self, obs: np.ndarray, z: Tensor, deterministic: bool,
                       generator: torch.Generator | None = None) -> np.ndarray:
        """Normalised actions ``[N, A]`` in [-1, 1] for ``obs`` ``[N, D]`` with per-env ``z`` ``[N, Z]``."""
        o = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device).unsqueeze(1)
        params = self.policy(o, z).squeeze(1)
        if deterministic:
            return torch.tanh(normal_split(params)[0]).cpu().numpy()
        actions, _ = tanh_normal_sample_and_log_prob(params, generator or self.generator)
        return actions.cpu().numpy()

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The loop's plain evaluation: z = 0 (prior mean), the oracle context in ``obs`` is dropped."""
        states = np.asarray(obs, dtype=np.float32)[:, : self.family.obs_dim]
        z = torch.zeros(len(states), self.params.latent_dim, device=self.device)
        return self.policy_actions(states, z, deterministic) * self.action_scale + self.action_offset

    def _batch_env(self, n: int) -> BatchTaskEnv:
        if n not in self._batch_envs:
            self._batch_envs[n] = self.family.make_batch_env(n)
        return self._batch_envs[n]

    def run_episodes(self, tasks: np.ndarray, z: Tensor, deterministic: bool, rng: np.random.Generator,
                     generator: torch.Generator | None = None) -> tuple[Trajectories, np.ndarray]:
        """One episode per task (``z`` ``[N, Z]`` fixed during it); returns the trajectories and the
        normalised actions ``[T, N, A]`` (``traj.actions`` holds the env-scaled ones)."""
        f = self.family
        normalised: list[np.ndarray] = []

        def act(obs: np.ndarray, t: int) -> np.ndarray:
            check_stop()
            a = self.policy_actions(obs, z, deterministic, generator)
            normalised.append(a)
            return a * self.action_scale + self.action_offset

        seeds = rng.integers(0, 2**31 - 1, size=len(tasks))
        traj = rollout(self._batch_env(len(tasks)), tasks, act, f.horizon, seeds, f.action_dim)
        actions = np.zeros_like(traj.actions)
        actions[: len(normalised)] = np.stack(normalised)
        return traj, actions

    def _context_from_buffer(self, task_ids: np.ndarray, rng: np.random.Generator) -> Tensor:
        batch = self.enc_replay.sample(task_ids, self.params.embedding_batch_size, rng)
        return torch.as_tensor(context_tensor(batch, self.params.use_next_obs_in_context), device=self.device)

    # ------------------------------------------------------------------ data collection (Algorithm 1)
    def collect(self, task_ids: np.ndarray, num_steps: int, posterior_every: int | None, to_encoder: bool) -> int:
        """Episodes on the training tasks ``task_ids`` (in parallel) until each has ``num_steps`` steps
        (whole episodes): z from the prior, resampled every episode when ``posterior_every`` is None,
        else the posterior of a context from the task's encoder buffer every ``posterior_every`` episodes
        (the first episode uses the prior). Returns the env steps taken."""
        if num_steps <= 0:
            return 0
        episodes = math.ceil(num_steps / self.family.horizon)
        tasks = self.train_tasks[task_ids]
        z = self.prior_z(len(task_ids))
        total = 0
        returns = []
        for episode in range(episodes):
            if posterior_every is None:
                z = self.prior_z(len(task_ids))
            traj, actions = self.run_episodes(tasks, z, False, self.rng)
            self.replay.add_trajectories(task_ids, traj, actions)
            if to_encoder:
                self.enc_replay.add_trajectories(task_ids, traj, actions)
            total += traj.num_steps
            returns.append(traj.returns)
            if posterior_every is not None and (episode + 1) % posterior_every == 0:
                with torch.no_grad():
                    z = self.sample_z(*self.posterior(self._context_from_buffer(task_ids, self.rng)))
        self._collected_returns.append(np.concatenate(returns))
        return total

    # ------------------------------------------------------------------ one gradient step
    def update(self, task_ids: np.ndarray) -> Tensor:
        """One PEARL/SAC step on a meta-batch; returns the losses as a tensor (no host sync)."""
        p = self.params
        dev = self.device
        batch = self.replay.sample(task_ids, p.batch_size, self.rng)
        context = self._context_from_buffer(task_ids, self.rng)
        k, b = len(task_ids), p.batch_size
        obs = torch.as_tensor(batch["obs"], device=dev)  # [K, B, D]
        actions = torch.as_tensor(batch["actions"], device=dev)
        rewards = torch.as_tensor(batch["rewards"], device=dev).reshape(-1)
        next_obs = torch.as_tensor(batch["next_obs"], device=dev).reshape(k * b, -1)
        terminated = torch.as_tensor(batch["terminated"], device=dev).reshape(-1)

        mean, variance = self.posterior(context)
        z = self.sample_z(mean, variance)  # [K, Z], differentiable in the encoder
        z_flat = z.unsqueeze(1).expand(k, b, z.shape[-1]).reshape(k * b, -1)
        z_detached = z_flat.detach()
        obs_flat, actions_flat = obs.reshape(k * b, -1), actions.reshape(k * b, -1)

        # Q networks and the encoder: Bellman error through z, plus the KL to the prior
        with torch.no_grad():
            target_v = self.vf_target(next_obs, z_detached)[0]
            q_target = p.reward_scale * rewards + (1.0 - terminated) * p.gamma * target_v
        q = self.qf(obs_flat, z_flat, actions_flat)  # [2, K*B]
        qf_loss = (q - q_target).pow(2).mean(dim=1).sum()
        kl = kl_to_unit_gaussian(mean, variance).sum() if p.use_information_bottleneck else torch.zeros((), device=dev)
        self.qf_optimizer.zero_grad(set_to_none=True)
        self.context_optimizer.zero_grad(set_to_none=True)
        (qf_loss + p.kl_lambda * kl).backward()
        self.qf_optimizer.step()
        self.context_optimizer.step()

        # policy sample (z detached), V target and V step
        policy_params = self.policy(obs, z.detach()).reshape(k * b, -1)
        new_actions, log_pi = tanh_normal_sample_and_log_prob(policy_params, self.generator)
        min_q_new = self.qf.q_for_actor(obs_flat, z_detached, new_actions).min(dim=0).values
        v = self.vf(obs_flat, z_detached)[0]
        vf_loss = (v - (min_q_new - log_pi).detach()).pow(2).mean()
        self.vf_optimizer.zero_grad(set_to_none=True)
        vf_loss.backward()
        self.vf_optimizer.step()
        polyak_update(self._vf_target_params, self._vf_params, p.tau)

        # policy step
        policy_mean, policy_log_std = normal_split(policy_params)
        policy_loss = (log_pi - min_q_new).mean()
        policy_loss = policy_loss + p.policy_mean_reg * policy_mean.pow(2).mean() \
            + p.policy_std_reg * policy_log_std.pow(2).mean()
        grads = torch.autograd.grad(policy_loss, self._policy_params)
        for param, g in zip(self._policy_params, grads):
            param.grad = g
        self.policy_optimizer.step()
        self.updates += 1
        return torch.stack([qf_loss.detach(), vf_loss.detach(), policy_loss.detach(), kl.detach(),
                            q.detach().mean(), -log_pi.detach().mean(), variance.detach().mean()])

    # ------------------------------------------------------------------ meta-test (Algorithm 2)
    @torch.no_grad()
    def evaluate_tasks(self, tasks: np.ndarray, num_steps: int | None = None, seed: int | None = None
                       ) -> dict[str, float]:
        """Posterior sampling on ``tasks`` (in parallel): z from the prior for the first
        ``num_exp_traj_eval`` episodes, then from the posterior of every transition seen so far in the
        task; deterministic actions. Returns the mean first- and final-episode returns and the mean
        over all episodes."""
        p = self.params
        episodes = max(math.ceil((num_steps or p.num_steps_per_eval) / self.family.horizon), 1)
        if seed is None:
            rng, generator = self.eval_rng, None
        else:
            rng, generator = np.random.default_rng(seed), torch.Generator(device=self.device).manual_seed(seed)
        n = len(tasks)
        z = self.prior_z(n, generator)
        contexts: list[Tensor] = []
        masks: list[Tensor] = []
        returns = []
        for episode in range(episodes):
            traj, actions = self.run_episodes(tasks, z, True, rng, generator)
            returns.append(traj.returns)
            batch = {"obs": traj.obs, "actions": actions, "rewards": traj.rewards, "next_obs": traj.next_obs}
            ctx = context_tensor({k: np.swapaxes(v, 0, 1) for k, v in batch.items()}, p.use_next_obs_in_context)
            contexts.append(torch.as_tensor(ctx, device=self.device))
            masks.append(torch.as_tensor(traj.valid.T, device=self.device))
            if episode + 1 >= p.num_exp_traj_eval:
                z = self.sample_z(*self.posterior(torch.cat(contexts, 1), torch.cat(masks, 1)), generator)
        table = np.stack(returns)  # [episodes, N]
        return {"return_first": float(table[0].mean()), "return_final": float(table[-1].mean()),
                "return_online": float(table.mean())}

    # ------------------------------------------------------------------ one iteration
    def next_iteration_steps(self) -> int:
        """The most env steps the next :meth:`iterate` can collect (whole episodes of ``horizon`` steps):
        the first one adds the initial data of every training task (``num_initial_steps`` each)."""
        p, horizon = self.params, self.family.horizon

        def whole(n: int) -> int:
            return math.ceil(n / horizon) * horizon if n > 0 else 0

        steps = p.num_tasks_sample * (whole(p.num_steps_prior) + whole(p.num_steps_posterior)
                                      + whole(p.num_extra_rl_steps_posterior))
        return steps + (0 if self.initialized else p.num_train_tasks * whole(p.num_initial_steps))

    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        self._collected_returns: list[np.ndarray] = []
        steps = 0
        if not self.initialized:
            all_tasks = np.arange(p.num_train_tasks)
            steps += self.collect(all_tasks, p.num_initial_steps, None, True)
            self.initialized = True
        sampled = self.rng.integers(0, p.num_train_tasks, size=p.num_tasks_sample)  # with replacement (PEARL)
        if p.num_steps_prior + p.num_steps_posterior > 0:
            for task in np.unique(sampled):
                self.enc_replay.clear(int(task))
        steps += self.collect(sampled, p.num_steps_prior, None, True)
        steps += self.collect(sampled, p.num_steps_posterior, p.update_post_train, True)
        steps += self.collect(sampled, p.num_extra_rl_steps_posterior, p.update_post_train, False)
        stats = []
        for _ in range(p.num_train_steps_per_itr):
            check_stop()
            stats.append(self.update(self.rng.choice(p.num_train_tasks, size=p.meta_batch)))
        self.steps += steps
        self.iteration += 1
        returns = np.concatenate(self._collected_returns) if self._collected_returns else np.zeros(0)
        self.last_episode_returns = returns
        metrics: dict[str, float] = {"updates": float(len(stats))}
        if returns.size:
            metrics.update(episode_return=float(returns.mean()), episodes=float(returns.size))
        if stats:
            table = torch.stack(stats)
            names = ["loss/qf", "loss/vf", "loss/policy", "kl", "q_mean", "entropy", "z_variance"]
            check_finite(dict(zip(names[:4], table[:, :4].sum(0))), f"PEARL iteration {self.iteration}")
            metrics.update(dict(zip(names, table.mean(0).tolist())))
        if p.eval_every and self.iteration % p.eval_every == 0:
            metrics.update({f"test/{k}": v for k, v in self.evaluate_tasks(self.test_tasks).items()})
            if p.num_eval_train_tasks:
                chosen = self.train_tasks[: p.num_eval_train_tasks]
                metrics.update({f"train/{k}": v for k, v in self.evaluate_tasks(chosen).items()})
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "policy": self.policy.state_dict(),
            "qf": self.qf.state_dict(),
            "vf": self.vf.state_dict(),
            "vf_target": self.vf_target.state_dict(),
            "policy_optimizer": self.policy_optimizer.state_dict(),
            "qf_optimizer": self.qf_optimizer.state_dict(),
            "vf_optimizer": self.vf_optimizer.state_dict(),
            "context_optimizer": self.context_optimizer.state_dict(),
            "replay": self.replay.state_dict(),
            "enc_replay": self.enc_replay.state_dict(),
            "rng": self.rng.bit_generator.state,
            "eval_rng": self.eval_rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "train_tasks": self.train_tasks,
            "test_tasks": self.test_tasks,
            "steps": self.steps,
            "iteration": self.iteration,
            "updates": self.updates,
            "initialized": self.initialized,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("encoder", "policy", "qf", "vf", "vf_target", "policy_optimizer", "qf_optimizer", "vf_optimizer",
                     "context_optimizer", "replay", "enc_replay"):
            getattr(self, name).load_state_dict(state[name])
        self.rng.bit_generator.state = state["rng"]
        self.eval_rng.bit_generator.state = state["eval_rng"]
        self.generator.set_state(state["generator"])
        self.train_tasks = state["train_tasks"]
        self.test_tasks = state["test_tasks"]
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])
        self.updates = int(state["updates"])
        self.initialized = bool(state["initialized"])


ALGORITHMS = {
    "pearl": Entry(PEARL, "PEARL: SAC with a probabilistic context encoder (Rakelly et al. 2019); env: a meta task "
                          "family id such as gym:aclab/MetaPointNav-v0", defaults={"model": "mlp"}),
    "pearl-hyper": Entry(PEARL, "Hyper-PEARL (Sarafian et al. 2021): hypernetwork policy (z -> primary) and critics "
                                "(state -> primary, [a, z] -> dynamic); Q/V lr 5e-5, policy lr 1e-4",
                         defaults={"model": "hyper"}, preset_prefix="pearl"),
}
