"""Small pieces every algorithm uses: devices, RNG state, finite-loss checks, LR schedules.

The algorithm contract (duck-typed, no base class)::

    algo = Algo(config, env_spec, device)   # config: aclab.config.Config, params in config.params
    algo.steps                              # env steps consumed so far
    metrics = algo.iterate(envs)            # collect what it needs, update; dict of floats
    algo.last_episode_returns               # raw returns of the episodes finished in that iterate()
    actions = algo.act(obs, deterministic)  # numpy obs batch -> numpy actions (evaluation)
    algo.state_dict() / algo.load_state_dict(state)   # everything needed to continue exactly
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from aclab import distributed
from aclab.config import ConfigError


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf: the run stops and keeps its last good checkpoint."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("invalid value device='cuda': no CUDA GPU is available here "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(name)


def check_finite(named_values: dict[str, torch.Tensor], where: str) -> None:
    """Raise NonFiniteLossError naming every non-finite entry (one host sync for all of them). In a
    data-parallel run every rank raises when one rank's values are not finite (they stop together)."""
    names = list(named_values)
    stacked = torch.stack([v.detach().float().reshape(()) for v in named_values.values()])
    finite = torch.isfinite(stacked)
    message = None
    if not bool(finite.all()):
        bad = [f"{n}={stacked[i].item()}" for i, n in enumerate(names) if not bool(finite[i])]
        message = f"non-finite loss in {where}: {', '.join(bad)}"
    if distributed.current().any(message is not None):
        raise NonFiniteLossError(message or f"non-finite loss in {where} on another rank")


def make_adam(params, lr: float, eps: float = 1e-8, **kwargs) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): one call updates every parameter tensor.

    Measured on the 2-core CPU for PPO's CartPole actor-critic (6 tensors): fused 52 us per step,
    foreach 437 us, single-tensor 245 us.
    """
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=True, **kwargs)


@torch.no_grad()
def adam_step(optimizer: torch.optim.Adam) -> None:
    """``optimizer.step()`` for an Adam of :func:`make_adam` (fused, one parameter group): the same kernel
    (``torch._fused_adam_``, after adding 1 to every step count, as ``torch.optim.Adam`` does) without
    ``Optimizer.step``'s per-call Python (hooks, profiling scopes, grouping tensors by device): in PPO's
    CartPole update 53 us instead of 148 us per step (``benchmarks/ppo_minibatch_anatomy.py``). Falls back
    to ``optimizer.step()`` where that would do anything else: several groups, AMSGrad, decoupled weight
    decay, a parameter without a gradient or without state yet (the first step creates it)."""
    group = optimizer.param_groups[0]
    params = group["params"]
    state = optimizer.state
    if (len(optimizer.param_groups) != 1 or not group.get("fused") or group["amsgrad"]
            or group.get("decoupled_weight_decay") or any(p.grad is None or p not in state for p in params)):
        optimizer.step()
        return
    states = [state[p] for p in params]
    steps = [s["step"] for s in states]
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                       beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` (those with a ``.grad``, on one device and dtype) so that their global
    L2 norm is at most ``max_norm``; return the norm before clipping (a 0-d tensor). The same arithmetic as
    ``torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)``: ``coef = min(max_norm / (norm +
    1e-6), 1)``, without its per-call grouping of tensors by device (PPO on CartPole: 66 us per minibatch
    instead of 150, ``benchmarks/ppo_minibatch_anatomy.py``)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@torch.no_grad()
def policy_actions(dist, params: torch.Tensor, deterministic: bool, generator: torch.Generator) -> np.ndarray:
    """Actions for evaluation from distribution parameters ``[N, P]``: the mode when ``deterministic``,
    else a sample from ``generator``; as a NumPy array ``[N, ...]``."""
    actions = dist.mode(params) if deterministic else dist.sample(params, generator)
    return actions.cpu().numpy()


def linear_schedule(start: float, end: float, progress: float) -> float:
    """Linear interpolation from ``start`` (progress 0) to ``end`` (progress 1), clamped."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress


def global_rng_state() -> dict:
    """Python, NumPy and torch global RNG states (restored on resume)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Entry:
    """One selectable algorithm name."""

    cls: type
    description: str
    defaults: dict = field(default_factory=dict)  # params.<key> values this name fixes
    preset_prefix: str | None = None  # presets are looked up as <prefix>-<family>; default: the name
