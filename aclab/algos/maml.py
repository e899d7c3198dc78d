"""MAML for RL (Finn et al. 2017, Algorithm 3) with a TRPO meta-update, and the three policy models of
the hypernetwork paper (Sarafian et al. 2021, hypernetwork paper, Section 4, Eqs. 15-18): Vanilla-MAML (state),
Context-MAML (state + oracle context) and Hyper-MAML (context -> primary network, state -> dynamic
network, Eq. 16).

One iteration (``iterate``), for a meta-batch of K tasks T_i drawn from the training task pool:

    1. D_i  = E episodes of pi_theta on T_i (pre-adaptation);
    2. advantages A_i: linear feature baseline fitted to the discounted returns of D_i, GAE(gamma,
       lambda = 1), normalised per task;
    3. inner step (Eq. 15): theta_i = theta - alpha grad_theta L_in(theta; D_i),
       L_in = -mean_t log pi_theta(a_t | s_t) A_t (vanilla policy gradient, ``inner_steps`` times on D_i);
    4. D'_i = E episodes of pi_{theta_i} on T_i (post-adaptation), advantages A'_i as in 2;
    5. outer step: TRPO (:mod:`aclab.algos.trpo`) on
       L_out(theta) = mean_i -mean_t [pi_{theta_i(theta)}(a|s) / pi_{theta_i(theta_old)}(a|s)] A'_t
       subject to mean_i mean_t KL(pi_{theta_i(theta_old)} || pi_{theta_i(theta)}) <= max_kl; the Fisher
       matrix and the line search go through the inner step as well.

``first_order = false`` (default): the exact meta-gradient, differentiating through the inner
gradient (``torch.func.grad`` inside ``vmap`` over tasks, second order); ``true``: first-order MAML
(the inner gradient is treated as a constant).

Env handling: MAML owns its task sampling and per-task envs. The task family comes from the loop's
env id (``gym:aclab/Meta...-v0``, :mod:`aclab.envs.meta`, with ``env.options`` as family options); the
loop's ``envs`` are used for nothing else. ``act(obs)`` takes the loop env's ``[state, context]``
observations and acts with the *pre-adaptation* meta-policy (the loop's plain evaluation therefore
measures returns without adaptation on test tasks); the meta-test numbers (pre- and post-adaptation
on held-out tasks) are logged by ``iterate`` as ``test/return_pre`` and ``test/return_post`` every
``eval_every`` iterations.

Conventions: trajectories are stored time-major ``[T, N]`` by the rollout and regrouped per task as
``[K, S]`` with ``S = E * T`` sample slots (``mask`` marks the valid ones) for the losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from aclab.algos.common import Entry, check_finite
from aclab.algos.trpo import TRPOStats, trpo_step
from aclab.config import Config, require
from aclab.core.distributions import normal_kl, normal_log_prob
from aclab.core.returns import discounted_returns, gae
from aclab.envs.meta import BatchTaskEnv, TaskFamily, Trajectories, family_for_env_spec, rollout
from aclab.nets.hyper import HYPER_INITS, DynamicLayer, HyperPolicy
from aclab.runs import check_stop

MIN_LOG_STD = math.log(1e-6)
POLICY_KINDS = ("vanilla", "context", "hyper")


@dataclass
class MAMLConfig:
    """MAML-TRPO hyperparameters (defaults: the hypernetwork paper's MAML setup, hypernetwork paper, Section 4 and the
    authors' code: 40 tasks x 20 episodes, one inner step, TRPO with max KL 0.01)."""

    policy: Literal["vanilla", "context", "hyper"] = "vanilla"
    meta_batch_size: int = 40
    episodes_per_task: int = 20
    num_train_tasks: int = 100  # fixed pool of training tasks (0: fresh tasks every iteration)
    num_test_tasks: int = 20
    inner_steps: int = 1
    inner_lr: float = 0.1  # MLP policies 0.1, hypernetwork policies 5e-5 (hypernetwork paper, Section 4)
    first_order: bool = False
    gamma: float = 0.95  # the authors' code (Finn et al. use 0.99)
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    line_search_steps: int = 15
    line_search_backtrack: float = 0.8
    baseline_reg: float = 1e-5
    hidden_sizes: tuple[int, ...] = (100, 100)
    activation: Literal["relu", "tanh"] = "relu"
    log_std_init: float = 0.0
    hyper_dynamic_hidden: tuple[int, ...] = (256,)
    hyper_primary_widths: tuple[int, ...] = (256, 512, 1024)
    hyper_blocks_per_stage: int = 2
    hyper_init: Literal["kaiming", "authors"] = "kaiming"
    eval_every: int = 10  # iterations between meta-test evaluations (0: never)
    eval_episodes_per_task: int = 0  # 0: episodes_per_task

    def validate(self) -> None:
        require(self.policy in POLICY_KINDS, "params.policy", self.policy, "one of " + ", ".join(POLICY_KINDS))
        for name in ("meta_batch_size", "episodes_per_task", "num_test_tasks", "inner_steps", "cg_iterations",
                     "line_search_steps", "hyper_blocks_per_stage"):
            require(getattr(self, name) >= 1, f"params.{name}", getattr(self, name), "an integer >= 1")
        require(self.num_train_tasks >= 0, "params.num_train_tasks", self.num_train_tasks,
                "an integer >= 0 (0: fresh tasks every iteration)")
        require(self.inner_lr >= 0, "params.inner_lr", self.inner_lr, "a number >= 0")
        require(0.0 <= self.gamma <= 1.0, "params.gamma", self.gamma, "a number in [0, 1]")
        require(0.0 <= self.gae_lambda <= 1.0, "params.gae_lambda", self.gae_lambda, "a number in [0, 1]")
        require(self.max_kl > 0, "params.max_kl", self.max_kl, "a number > 0")
        require(self.cg_damping >= 0, "params.cg_damping", self.cg_damping, "a number >= 0")
        require(0.0 < self.line_search_backtrack < 1.0, "params.line_search_backtrack", self.line_search_backtrack,
                "a number in (0, 1)")
        require(self.baseline_reg > 0, "params.baseline_reg", self.baseline_reg, "a number > 0")
        require(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes), "params.hidden_sizes",
                self.hidden_sizes, "a non-empty list of positive integers")
        require(len(self.hyper_primary_widths) >= 1, "params.hyper_primary_widths", self.hyper_primary_widths,
                "a non-empty list of positive integers")
        require(self.hyper_init in HYPER_INITS, "params.hyper_init", self.hyper_init, " or ".join(HYPER_INITS))
        require(self.eval_every >= 0, "params.eval_every", self.eval_every, "an integer >= 0 (0: never)")
        require(self.eval_episodes_per_task >= 0, "params.eval_episodes_per_task", self.eval_episodes_per_task,
                "an integer >= 0 (0: episodes_per_task)")


# ----------------------------------------------------------------------------------------------
# Meta-policies: forward(obs [M, D], context [C]) -> Gaussian params [M, 2A] for ONE task
# (vmapped over tasks, so that adapted parameters can differ per task)
# ----------------------------------------------------------------------------------------------
class MLPMetaPolicy(nn.Module):
    """Gaussian MLP policy with a state-independent log std (Vanilla-MAML with ``context_dim = 0``,
    Context-MAML: the context concatenated to the state). Xavier-uniform weights, zero biases (MAML
    code)."""

    def __init__(self, obs_dim: int, context_dim: int, action_dim: int, hidden_sizes=(100, 100),
                 activation: str = "relu", log_std_init: float = 0.0) -> None:
        super().__init__()
        self.context_dim = int(context_dim)
        dims = [obs_dim + self.context_dim, *[int(h) for h in hidden_sizes], action_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.activation = torch.relu if activation == "relu" else torch.tanh
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def forward(self, obs: Tensor, context: Tensor) -> Tensor:
        x = obs
        if self.context_dim:
            x = torch.cat([obs, context.expand(*obs.shape[:-1], self.context_dim)], dim=-1)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        mean = self.layers[-1](x)
        return torch.cat([mean, self.log_std.clamp_min(MIN_LOG_STD).expand_as(mean)], dim=-1)


class HyperMetaPolicy(nn.Module):
    """Hyper-MAML's policy (hypernetwork paper, Eq. 16): the context drives the primary network, which generates the
    dynamic network that maps the state to the action mean; state-independent log std.

    Wraps :class:`aclab.nets.hyper.HyperPolicy`; the dynamic weights are generated once per task (one
    context) and applied to all of the task's states. ``forward(None, context)`` returns the generated
    dynamic-layer tensors ``(weight, bias, gain)`` per layer (for acting without regenerating them).
    """

    def __init__(self, obs_dim: int, context_dim: int, action_dim: int, log_std_init: float = 0.0,
                 **hyper_kwargs) -> None:
        super().__init__()
        self.hyper = HyperPolicy(context_dim, obs_dim, action_dim, output="gaussian", log_std_init=log_std_init,
                                 **hyper_kwargs)

    def forward(self, obs: Tensor | None, context: Tensor):
        layers = self.hyper.net.dynamic_layers(context.reshape(1, -1))  # [1, 1, ...] per tensor
        layers = [DynamicLayer(layer.weight[0], layer.bias[0], layer.gain[0]) for layer in layers]  # one task
        if obs is None:
            return tuple(t[0] for layer in layers for t in (layer.weight, layer.bias, layer.gain))
        mean = shared_dynamic_forward(layers, obs.unsqueeze(0)).squeeze(0)
        return torch.cat([mean, self.hyper.log_std.clamp_min(MIN_LOG_STD).expand_as(mean)], dim=-1)


def shared_dynamic_forward(layers: list[DynamicLayer], x: Tensor) -> Tensor:
    """Eq. 1 when one set of dynamic weights serves many states: ``weight`` ``[K, in, out]``, ``bias`` /
    ``gain`` ``[K, out]`` and ``x`` ``[K, S, in]`` -> ``[K, S, out]`` (one batched matmul per layer).
    :func:`aclab.nets.hyper.dynamic_forward` takes per-sample weights; broadcasting per-task weights
    through it materialises a copy per state (measured ~2x slower MAML iterations)."""
    for index, layer in enumerate(layers):
        x = layer.gain.unsqueeze(-2) * torch.bmm(x, layer.weight) + layer.bias.unsqueeze(-2)
        if index < len(layers) - 1:
            x = torch.relu(x)
    return x


def build_meta_policy(p: MAMLConfig, family: TaskFamily) -> nn.Module:
    if p.policy == "hyper":
        return HyperMetaPolicy(family.obs_dim, family.context_dim, family.action_dim, p.log_std_init,
                               dynamic_hidden=p.hyper_dynamic_hidden, primary_widths=p.hyper_primary_widths,
                               blocks_per_stage=p.hyper_blocks_per_stage, init=p.hyper_init)
    context_dim = family.context_dim if p.policy == "context" else 0
    return MLPMetaPolicy(family.obs_dim, context_dim, family.action_dim, p.hidden_sizes, p.activation, p.log_std_init)


def task_dist_params(policy: nn.Module, params: dict[str, Tensor], obs: Tensor, contexts: Tensor,
                     per_task: bool) -> Tensor:
    """Gaussian params ``[K, M, 2A]`` for states ``obs`` ``[K, M, D]`` of K tasks with ``contexts``
    ``[K, C]``; ``params`` are shared (``per_task=False``) or stacked per task ``[K, ...]``."""
    def call(p: dict[str, Tensor], o: Tensor, c: Tensor) -> Tensor:
        return functional_call(policy, p, (o, c))

    return vmap(call, in_dims=(0 if per_task else None, 0, 0))(params, obs, contexts)


def make_task_actor(policy: nn.Module, params: dict[str, Tensor], contexts: Tensor, per_task: bool
                    ) -> Callable[[Tensor], Tensor]:
    """``obs [K, E, D] -> Gaussian params [K, E, 2A]`` for acting with fixed parameters; the hypernetwork's
    dynamic weights are generated once here, not at every step."""
    if not isinstance(policy, HyperMetaPolicy):
        return lambda obs: task_dist_params(policy, params, obs, contexts, per_task)
    flat = vmap(lambda p, c: functional_call(policy, p, (None, c)), in_dims=(0 if per_task else None, 0))(
        params, contexts)
    k = contexts.shape[0]
    layers = [DynamicLayer(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]  # [K, ...]
    log_std = params["hyper.log_std"].clamp_min(MIN_LOG_STD)
    log_std = log_std.reshape(k if per_task else 1, 1, -1)

    def actor(obs: Tensor) -> Tensor:
        mean = shared_dynamic_forward(layers, obs)
        return torch.cat([mean, log_std.expand_as(mean)], dim=-1)

    return actor


# ----------------------------------------------------------------------------------------------
# Linear feature baseline and advantages
# ----------------------------------------------------------------------------------------------
def linear_baseline_features(obs: Tensor, valid: Tensor) -> Tensor:
    """rllab's linear feature baseline features ``[T, N, 2D + 4]``: ``[s, s^2, t, t^2, t^3, 1]`` with
    ``s`` clipped to +-10 and ``t = step / 100``; zero on invalid steps. obs ``[T, N, D]``, valid ``[T, N]``."""
    steps, n = valid.shape
    o = obs.clamp(-10.0, 10.0)
    t = (torch.arange(steps, dtype=obs.dtype, device=obs.device) / 100.0).view(steps, 1, 1).expand(steps, n, 1)
    features = torch.cat([o, o.square(), t, t.square(), t.pow(3), torch.ones_like(t)], dim=-1)
    return features * valid.unsqueeze(-1).to(obs.dtype)


def fit_linear_baseline(features: Tensor, targets: Tensor, reg: float = 1e-5, attempts: int = 5) -> Tensor:
    """Ridge regression per group: ``w_k = (X_k^T X_k + reg I)^{-1} X_k^T y_k``, ``features`` ``[K, S, F]``,
    ``targets`` ``[K, S]`` -> ``[K, F]`` (float64). ``reg`` grows 10x while the solution is not finite
    (rllab)."""
    x = features.double()
    y = targets.double()
    xtx = x.transpose(1, 2) @ x
    xty = (x.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    weights = torch.zeros_like(xty)
    for _ in range(attempts):
        weights = torch.linalg.solve(xtx + reg * eye, xty)
        if bool(torch.isfinite(weights).all()):
            break
        reg *= 10.0
    return weights


def masked_normalize(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per row: ``(x - mean) / (std + eps)`` over the entries with ``mask = 1``; masked entries -> 0.
    ``x``, ``mask`` ``[K, S]`` (the MAML code's ``weighted_normalize``, population std)."""
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(-1, keepdim=True) / count
    var = ((x - mean).square() * mask).sum(-1, keepdim=True) / count
    return (x - mean) / (var.sqrt() + eps) * mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per row mean over the masked entries: ``[K, S] -> [K]``."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


@dataclass
class TaskBatch:
    """One phase's data regrouped per task: ``obs`` ``[K, S, D]``, ``actions`` ``[K, S, A]``,
    ``advantages`` / ``mask`` ``[K, S]``, ``contexts`` ``[K, C]``, ``episode_returns`` ``[K, E]`` (NumPy),
    ``old_params`` ``[K, S, 2A]`` the sampling policy's distribution (post-adaptation batches)."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor
    contexts: Tensor
    episode_returns: np.ndarray
    old_params: Tensor | None = None


def per_task(x: np.ndarray, num_tasks: int) -> Tensor:
    """``[T, K*E, ...]`` -> ``[K, E*T, ...]`` (episode-major within each task)."""
    steps, n = x.shape[:2]
    e = n // num_tasks
    t = torch.as_tensor(x).reshape(steps, num_tasks, e, *x.shape[2:])
    return t.movedim(0, 2).reshape(num_tasks, e * steps, *x.shape[2:])


def task_advantages(traj: Trajectories, num_tasks: int, gamma: float, gae_lambda: float, reg: float) -> Tensor:
    """Normalised GAE advantages ``[K, S]`` with a linear feature baseline fitted per task to the
    discounted returns of that task's episodes (no bootstrap at the horizon, as MAML)."""
    valid = torch.as_tensor(traj.valid, dtype=torch.float64)
    rewards = torch.as_tensor(traj.rewards, dtype=torch.float64) * valid
    discounts = gamma * (1.0 - torch.as_tensor(traj.terminated, dtype=torch.float64)) * valid
    returns = discounted_returns(rewards, discounts, torch.zeros(rewards.shape[1], dtype=torch.float64))
    features = linear_baseline_features(torch.as_tensor(traj.obs, dtype=torch.float64), valid)
    k = num_tasks
    weights = fit_linear_baseline(per_task(features.numpy(), k), per_task(returns.numpy(), k), reg)  # [K, F]
    steps, n = valid.shape
    values = (features.reshape(steps, k, n // k, -1) * weights.view(1, k, 1, -1)).sum(-1).reshape(steps, n)
    values = torch.cat([values * valid, torch.zeros(1, n, dtype=values.dtype)])
    adv = gae(rewards, values, discounts, gae_lambda) * valid
    return masked_normalize(per_task(adv.numpy(), k), per_task(traj.valid.astype(np.float64), k)).float()


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------
class MAML:
    Config = MAMLConfig

    def __init__(self, config: Config, env_spec, device: torch.device):
        self.config = config
        self.params: MAMLConfig = config.params
        self.device = device
        p = self.params
        self.family = f = family_for_env_spec(config.env.id, config.env.options, env_spec)
        self.policy = build_meta_policy(p, f).to(device)
        self.param_names = [name for name, _ in self.policy.named_parameters()]
        self.rng = np.random.default_rng(config.seed)
        self.eval_rng = np.random.default_rng([config.seed, 1])
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.eval_generator = torch.Generator(device=device)
        self.eval_generator.manual_seed(config.seed + 1)
        pool_rng = np.random.default_rng([config.seed, 2])
        self.train_tasks = f.sample_tasks(p.num_train_tasks, pool_rng, "train") if p.num_train_tasks else None
        self.test_tasks = f.sample_tasks(p.num_test_tasks, pool_rng, "test")
        self._batch_envs: dict[int, BatchTaskEnv] = {}
        self.steps = 0
        self.iteration = 0
        self.last_episode_returns = np.zeros(0)
        self.last_trpo: TRPOStats | None = None

    # ------------------------------------------------------------------ parameters
    def named_params(self) -> dict[str, Tensor]:
        return dict(self.policy.named_parameters())

    def contexts_of(self, tasks: np.ndarray) -> Tensor:
        return torch.as_tensor(self.family.context(tasks), device=self.device)

    def sample_train_tasks(self, n: int) -> np.ndarray:
        if self.train_tasks is None:
            return self.family.sample_tasks(n, self.rng, "train")
        return self.train_tasks[self.rng.integers(0, len(self.train_tasks), size=n)]

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Pre-adaptation meta-policy on the loop env's ``[state, context]`` observations ``[B, D + C]``."""
        f = self.family
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        states, contexts = obs_t[:, : f.obs_dim], obs_t[:, f.obs_dim :]
        dist = task_dist_params(self.policy, self.named_params(), states.unsqueeze(1), contexts, False).squeeze(1)
        mean, log_std = dist.chunk(2, dim=-1)
        if deterministic:
            return mean.cpu().numpy()
        noise = torch.randn(mean.shape, generator=self.generator, device=self.device)
        return (mean + log_std.exp() * noise).cpu().numpy()

    def _batch_env(self, n: int) -> BatchTaskEnv:
        if n not in self._batch_envs:
            self._batch_envs[n] = self.family.make_batch_env(n)
        return self._batch_envs[n]

    @torch.no_grad()
    def sample_episodes(self, tasks: np.ndarray, episodes: int, params: dict[str, Tensor], per_task_params: bool,
                        rng: np.random.Generator, generator: torch.Generator | None = None,
                        deterministic: bool = False) -> tuple[Trajectories, Tensor]:
        """``episodes`` episodes of each task with the given (shared or per-task) parameters; env seeds from
        ``rng``, action noise from ``generator`` (default: the algorithm's). Returns the trajectories (env
        index ``k * episodes + e``) and the Gaussian params ``[T, K*E, 2A]`` used."""
        f = self.family
        generator = self.generator if generator is None else generator
        k = len(tasks)
        n = k * episodes
        contexts = self.contexts_of(tasks)
        actor = make_task_actor(self.policy, params, contexts, per_task_params)
        dists: list[Tensor] = []

        def act(obs: np.ndarray, t: int) -> np.ndarray:
            check_stop()
            o = torch.as_tensor(obs, device=self.device).reshape(k, episodes, -1)
            dist = actor(o).reshape(n, -1)
            dists.append(dist)
            mean, log_std = dist.chunk(2, dim=-1)
            if deterministic:
                return mean.cpu().numpy()
            noise = torch.randn(mean.shape, generator=generator, device=self.device)
            return (mean + log_std.exp() * noise).cpu().numpy()

        seeds = rng.integers(0, 2**31 - 1, size=n)
        traj = rollout(self._batch_env(n), np.repeat(tasks, episodes, axis=0), act, f.horizon, seeds, f.action_dim)
        dist_t = torch.stack(dists)
        if dist_t.shape[0] < f.horizon:  # every episode terminated early
            pad = dist_t[-1:].expand(f.horizon - dist_t.shape[0], *dist_t.shape[1:])
            dist_t = torch.cat([dist_t, pad])
        return traj, dist_t

    def task_batch(self, traj: Trajectories, tasks: np.ndarray, dist: Tensor | None = None) -> TaskBatch:
        k = len(tasks)
        p = self.params
        dev = self.device
        adv = task_advantages(traj, k, p.gamma, p.gae_lambda, p.baseline_reg)
        return TaskBatch(
            obs=per_task(traj.obs, k).to(dev),
            actions=per_task(traj.actions, k).to(dev),
            advantages=adv.to(dev),
            mask=per_task(traj.valid.astype(np.float32), k).to(dev),
            contexts=self.contexts_of(tasks),
            episode_returns=traj.returns.reshape(k, -1),
            old_params=None if dist is None else per_task(dist.cpu().numpy(), k).to(dev),
        )

    # ------------------------------------------------------------------ the inner step
    def inner_loss(self, params: dict[str, Tensor], obs: Tensor, context: Tensor, actions: Tensor,
                   advantages: Tensor, mask: Tensor) -> Tensor:
        """One task's vanilla policy-gradient loss ``-mean_t log pi(a_t|s_t) A_t`` (obs ``[S, D]``)."""
        log_probs = normal_log_prob(functional_call(self.policy, params, (obs, context)), actions)
        return -(log_probs * advantages * mask).sum() / mask.sum().clamp_min(1.0)

    def adapt(self, params: dict[str, Tensor], batch: TaskBatch, first_order: bool | None = None
              ) -> dict[str, Tensor]:
        """The adapted parameters ``theta_i`` of every task, stacked ``[K, ...]`` (Eq. 15). Differentiable
        in ``params`` through the inner gradient unless ``first_order``."""
        p = self.params
        first_order = p.first_order if first_order is None else first_order
        inner_grad = vmap(grad(self.inner_loss), in_dims=(None, 0, 0, 0, 0, 0))
        per_task_grad = vmap(grad(self.inner_loss), in_dims=(0, 0, 0, 0, 0, 0))
        adapted = params
        for step in range(p.inner_steps):
            fn = inner_grad if step == 0 else per_task_grad
            grads = fn(adapted, batch.obs, batch.contexts, batch.actions, batch.advantages, batch.mask)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            adapted = {name: (value.unsqueeze(0) if step == 0 else value) - p.inner_lr * grads[name]
                       for name, value in adapted.items()}
        return adapted

    def meta_loss_and_kl(self, pre: TaskBatch, post: TaskBatch) -> Callable[[], tuple[Tensor, Tensor]]:
        """The TRPO closure: ``(L_out, mean KL)`` at the policy's current parameters (module docstring)."""
        old_log_probs = normal_log_prob(post.old_params, post.actions)

        def loss_and_kl() -> tuple[Tensor, Tensor]:
            adapted = self.adapt(self.named_params(), pre)
            dist = task_dist_params(self.policy, adapted, post.obs, post.contexts, True)
            ratio = torch.exp(normal_log_prob(dist, post.actions) - old_log_probs)
            loss = -masked_mean(ratio * post.advantages, post.mask).mean()
            kl = masked_mean(normal_kl(post.old_params, dist), post.mask).mean()
            return loss, kl

        return loss_and_kl

    # ------------------------------------------------------------------ one meta-batch
    def sample_meta_batch(self, tasks: np.ndarray, episodes: int, rng: np.random.Generator,
                          generator: torch.Generator | None = None) -> tuple[TaskBatch, TaskBatch, int]:
        """Pre-adaptation episodes, the inner step, post-adaptation episodes; returns both batches and
        the number of env steps simulated."""
        params = self.named_params()
        pre_traj, _ = self.sample_episodes(tasks, episodes, params, False, rng, generator)
        pre = self.task_batch(pre_traj, tasks)
        with torch.no_grad():
            adapted = self.adapt(params, pre, first_order=True)
        post_traj, dist = self.sample_episodes(tasks, episodes, adapted, True, rng, generator)
        post = self.task_batch(post_traj, tasks, dist)
        return pre, post, pre_traj.num_steps + post_traj.num_steps

    def meta_update(self, pre: TaskBatch, post: TaskBatch) -> TRPOStats:
        p = self.params
        stats = trpo_step(list(self.policy.parameters()), self.meta_loss_and_kl(pre, post), max_kl=p.max_kl,
                          cg_iterations=p.cg_iterations, cg_damping=p.cg_damping,
                          backtrack_ratio=p.line_search_backtrack, max_backtracks=p.line_search_steps)
        check_finite({"loss/meta_before": torch.tensor(stats.loss_before),
                      "loss/meta_after": torch.tensor(stats.loss_after)}, f"MAML iteration {self.iteration}")
        return stats

    def evaluate_tasks(self, tasks: np.ndarray, episodes: int | None = None, seed: int | None = None
                       ) -> dict[str, float]:
        """Mean pre- and post-adaptation episode returns on ``tasks`` (the inner step from fresh episodes).
        Env seeds and action noise come from ``seed`` when given (a repeatable evaluation), else from
        the evaluation generators."""
        episodes = episodes or self.params.eval_episodes_per_task or self.params.episodes_per_task
        if seed is None:
            rng, generator = self.eval_rng, self.eval_generator
        else:
            rng, generator = np.random.default_rng(seed), torch.Generator(device=self.device).manual_seed(seed)
        pre, post, _ = self.sample_meta_batch(tasks, episodes, rng, generator)
        return {"return_pre": float(pre.episode_returns.mean()), "return_post": float(post.episode_returns.mean())}

    def iterate(self, envs) -> dict[str, float]:
        p = self.params
        tasks = self.sample_train_tasks(p.meta_batch_size)
        pre, post, steps = self.sample_meta_batch(tasks, p.episodes_per_task, self.rng)
        stats = self.meta_update(pre, post)
        self.last_trpo = stats
        self.steps += steps
        self.iteration += 1
        self.last_episode_returns = post.episode_returns.reshape(-1)
        per_task = post.episode_returns.shape[1]  # episodes.csv: the task of each post-adaptation episode
        self.last_episode_tasks = [np.array2string(np.asarray(t), precision=4) for t in tasks for _ in range(per_task)]
        metrics = {"episode_return": float(post.episode_returns.mean()),
                   "return_pre": float(pre.episode_returns.mean()), "return_post": float(post.episode_returns.mean()),
                   "episode_length": float(post.mask.sum() / post.episode_returns.size),
                   "episodes": float(post.episode_returns.size), **stats.metrics()}
        if p.eval_every and self.iteration % p.eval_every == 0:
            metrics.update({f"test/{k}": v for k, v in self.evaluate_tasks(self.test_tasks).items()})
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "rng": self.rng.bit_generator.state,
            "eval_rng": self.eval_rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "eval_generator": self.eval_generator.get_state(),
            "train_tasks": self.train_tasks,
            "test_tasks": self.test_tasks,
            "steps": self.steps,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.rng.bit_generator.state = state["rng"]
        self.eval_rng.bit_generator.state = state["eval_rng"]
        self.generator.set_state(state["generator"])
        self.eval_generator.set_state(state["eval_generator"])
        self.train_tasks = state["train_tasks"]
        self.test_tasks = state["test_tasks"]
        self.steps = int(state["steps"])
        self.iteration = int(state["iteration"])


# ----------------------------------------------------------------------------------------------
# Gradient-noise analysis (hypernetwork paper, Section 4.2, Figure 5)
# ----------------------------------------------------------------------------------------------
def gradient_noise(algo: MAML, num_updates: int = 50, eval_tasks: np.ndarray | None = None,
                   eval_episodes: int | None = None, eval_seed: int = 0) -> dict[str, np.ndarray]:
    """From the algorithm's current parameters, ``num_updates`` independent meta-updates, each from its
    own meta-batch of fresh episodes; every updated policy is evaluated on the same ``eval_tasks`` with
    the same evaluation seed (so the spread measures the update, not the evaluation). Returns
    ``return_pre`` / ``return_post`` ``[num_updates]`` of the updated policies and the ``baseline``
    (the starting policy's returns). The algorithm's state is restored afterwards."""
    saved = algo.state_dict()
    start_params = {k: v.clone() for k, v in saved["policy"].items()}
    tasks = algo.test_tasks if eval_tasks is None else eval_tasks
    pre, post = [], []
    try:
        start = algo.evaluate_tasks(tasks, eval_episodes, eval_seed)
        for _ in range(num_updates):
            algo.policy.load_state_dict(start_params)  # same start; the data generators keep advancing
            batch = algo.sample_train_tasks(algo.params.meta_batch_size)
            pre_b, post_b, _ = algo.sample_meta_batch(batch, algo.params.episodes_per_task, algo.rng)
            algo.meta_update(pre_b, post_b)
            result = algo.evaluate_tasks(tasks, eval_episodes, eval_seed)
            pre.append(result["return_pre"])
            post.append(result["return_post"])
    finally:
        algo.load_state_dict(saved | {"policy": start_params})
    return {"return_pre": np.array(pre), "return_post": np.array(post),
            "baseline_pre": np.array(start["return_pre"]), "baseline_post": np.array(start["return_post"])}


ALGORITHMS = {
    "maml": Entry(MAML, "MAML-TRPO with a Gaussian MLP policy on the state (Vanilla-MAML); env: a meta task family "
                        "id such as gym:aclab/MetaPointNav-v0", defaults={"policy": "vanilla", "inner_lr": 0.1}),
    "maml-context": Entry(MAML, "Context-MAML: the MLP policy sees the state and the oracle context",
                          defaults={"policy": "context", "inner_lr": 0.1}, preset_prefix="maml"),
    "maml-hyper": Entry(MAML, "Hyper-MAML (Sarafian et al. 2021): context -> primary network, state -> dynamic "
                              "network; inner step 5e-5", defaults={"policy": "hyper", "inner_lr": 5e-5},
                        preset_prefix="maml"),
}

