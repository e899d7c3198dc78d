"""Value-function analyses of a trained run or checkpoint (the ``aclab analyze ...`` commands).

Each function takes a run directory (its latest checkpoint is used) or a checkpoint file
(``RUN_DIR/checkpoints/ckpt_<step>.pt``), rebuilds the algorithm from the run's ``config.json``, collects
fresh experience with the trained policy (sampled actions) on new instances of the run's training
environments, and applies the pure tools of :mod:`aclab.analysis`:

* :func:`run_stiffness`: value-network stiffness over ``num_states`` states with their value targets
  ``R_hat = GAE + V`` (DCPG paper, Appendix A; the paper uses 2^14 states);
* :func:`run_value_bias`: ``V(s_0)`` against the discounted return at the first state of ``episodes``
  training episodes (DCPG paper, Appendix C); each env contributes its first episodes, so short episodes are not
  over-represented;
* :func:`run_ood_actions`: the OOD-action count of a trained dynamics discriminator (DCPG paper, Table 8);
* :func:`run_gradient_accuracy`: cosine similarity of a TD3/SAC critic's action-gradient with the
  rollout-estimated true gradient (hypernetwork paper, Section 3.2);
* :func:`run_gradient_noise`: the spread of returns after independent MAML meta-updates (hypernetwork
  paper Section 4.2, Figure 5).

Reward and observation normalisation statistics are restored from the checkpoint and frozen, so values and
returns are in the units the critic was trained in. Every function returns a JSON-ready dict.
Critics are chosen by name (``value="value"``): an algorithm may list several in ``value_functions()``
(Separate DCPG: ``value`` = V_theta, ``separate_value`` = V_phi); algorithms without that method (PPO, ...)
offer their ``net.value`` as ``value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aclab import registry
from aclab.algos.common import resolve_device
from aclab.algos.phasic import ValueFunction, canonical_action_map, ood_action_counts, value_parameter_names
from aclab.analysis.stiffness import value_stiffness
from aclab.analysis.value_bias import EpisodeStartTracker, value_bias_from_starts
from aclab.config import Config
from aclab.core.returns import gae
from aclab.core.threads import flush_denormals, set_threads
from aclab.data.rollout import RolloutCollector
from aclab.envs import build_envs
from aclab.runs import CHECKPOINT_RE, list_checkpoints
from aclab.train import load_run_config

ANALYSIS_SEED_OFFSET = 2_000_003


@dataclass
class LoadedRun:
    """A rebuilt algorithm with its checkpoint: ``algo``, ``config``, ``run_dir``, ``checkpoint`` (file),
    ``step`` (env steps at the checkpoint) and ``env_state`` (the training envs' state, for normalisers)."""

    algo: object
    config: Config
    run_dir: Path
    checkpoint: Path
    step: int
    env_state: dict | None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint file) for a run directory (its newest checkpoint) or a checkpoint file."""
    path = Path(path)
    if path.is_file():
        if not CHECKPOINT_RE.search(path.name):
            raise ValueError(f"{path} is not a checkpoint file (expected .../checkpoints/ckpt_<step>.pt)")
        return path.parent.parent, path
    checkpoints = list_checkpoints(path / "checkpoints")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a run directory (no config.json)")
    if not checkpoints:
        raise FileNotFoundError(f"{path} has no checkpoint to analyse")
    return path, checkpoints[-1]


def load_algorithm(path: str | Path, device: str = "auto", threads: int | None = None) -> LoadedRun:
    """Rebuild the algorithm of a run directory or checkpoint file and load the checkpoint's weights.

    Sets torch's threads (:func:`aclab.core.threads.set_threads`): ``threads`` when > 0, else the run's
    ``torch_threads``, else the automatic default for its observations; and the run's ``flush_denormal``
    mode (:func:`aclab.core.threads.flush_denormals`)."""
    run_dir, checkpoint_path = resolve_checkpoint(path)
    config = load_run_config(run_dir)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    envs = build_envs(config, num_envs=1)  # only for the spec; sizes come from the config
    try:
        spec = envs.spec
    finally:
        envs.close()
    torch_device = resolve_device(device)
    set_threads(threads or config.torch_threads, obs_shape=spec.obs_shape, device=torch_device)
    flush_denormals(config.flush_denormal)
    algo = registry.build(config, spec, torch_device)
    algo.load_state_dict(checkpoint["algo"])
    return LoadedRun(algo, config, run_dir, checkpoint_path, int(checkpoint.get("step", getattr(algo, "steps", 0))),
                     checkpoint.get("envs"))


def make_analysis_envs(loaded: LoadedRun, num_envs: int, seed: int | None = None):
    """New training-distribution envs with the checkpoint's normalisation statistics, frozen; reset."""
    seed = loaded.config.seed + ANALYSIS_SEED_OFFSET if seed is None else seed
    envs = build_envs(loaded.config, num_envs=num_envs, seed=seed)
    state = loaded.env_state or {}
    if envs.obs_normalizer is not None and state.get("obs_normalizer") is not None:
        envs.obs_normalizer.load_state_dict(state["obs_normalizer"])
    if envs.reward_scaler is not None and state.get("reward_scaler") is not None:
        envs.reward_scaler.load_state_dict(state["reward_scaler"], restore_returns=False)
    envs.set_normalization_update(False)
    envs.reset(seed=seed)
    return envs


def value_functions_of(algo) -> dict[str, nn.Module]:
    """Critics of ``algo`` by name, each with ``.value(obs [N, ...]) -> [N]`` (or callable that way)."""
    if hasattr(algo, "value_functions"):
        return dict(algo.value_functions())
    net = getattr(algo, "net", None)
    if net is not None and hasattr(net, "value"):
        return {"value": net}
    raise TypeError(f"{type(algo).__name__} exposes no value function (no value_functions() and no net.value)")


def _pick_value(algo, value: str) -> nn.Module:
    critics = value_functions_of(algo)
    if value not in critics:
        raise KeyError(f"unknown critic {value!r}; this algorithm has {sorted(critics)}")
    return critics[value]


def _discounting(config: Config) -> tuple[float, float]:
    return float(getattr(config.params, "gamma", 0.99)), float(getattr(config.params, "gae_lambda", 0.95))


def collect_with_policy(algo, envs, num_steps: int, value_module: nn.Module, device: torch.device):
    """A rollout of ``num_steps`` steps with ``algo.act`` (sampled actions) and ``value_module``'s values
    (log-probabilities and distribution parameters are not recorded). Returns (Rollout, next obs [B, ...])."""
    value_fn = ValueFunction(value_module)

    @torch.no_grad()
    def values_of(obs: torch.Tensor) -> np.ndarray:
        return value_fn(obs.to(device)).float().cpu().numpy()

    def act_fn(obs: torch.Tensor):
        actions = algo.act(obs.cpu().numpy(), False)
        zeros = np.zeros(obs.shape[0], dtype=np.float32)
        return actions, zeros, values_of(obs), zeros[:, None]

    collector = RolloutCollector(envs, num_steps, 1, torch.device("cpu"))
    rollout, _, _ = collector.collect(envs, act_fn, values_of)
    return rollout, torch.as_tensor(np.array(envs.obs, copy=True))


def _header(loaded: LoadedRun, analysis: str) -> dict:
    return {"analysis": analysis, "algo": loaded.config.algo, "env_id": loaded.config.env.id,
            "run_dir": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint), "step": loaded.step}


def run_stiffness(path: str | Path, *, num_states: int = 2 ** 14, value: str = "value", num_envs: int | None = None,
                  sign: str = "subset", sign_subset_size: int = 2048, chunk_size: int = 256,
                  seed: int | None = None, device: str = "auto",
                  threads: int | None = None) -> dict:
    """Stiffness of critic ``value`` over ``num_states`` valid states of fresh training rollouts.

    Rollouts of ``ceil(num_states / num_envs)`` steps from ``num_envs`` envs (default: the run's); targets
    ``R_hat = GAE(gamma, lambda) + V`` with the run's gamma and lambda; the first ``num_states`` valid
    states (time-major order) are used. Returns cosine and sign stiffness of the value-loss gradients (the
    paper's quantity) and of ``grad V`` (``cosine_grad_v``, ``sign_grad_v``: without the residuals' signs;
    see :func:`aclab.analysis.value_stiffness`; ``sign`` = ``"exact"``, ``"subset"`` or ``"off"``).
    """
    loaded = load_algorithm(path, device, threads)
    num_envs = num_envs or loaded.config.env.num_envs
    module = _pick_value(loaded.algo, value)
    gamma, lam = _discounting(loaded.config)
    envs = make_analysis_envs(loaded, num_envs, seed)
    try:
        num_steps = math.ceil(num_states / num_envs) + 1
        states, targets = [], []
        have = 0
        while have < num_states:
            rollout, _ = collect_with_policy(loaded.algo, envs, num_steps, module, resolve_device(device))
            advantages = gae(rollout.rewards, rollout.values, rollout.discounts(gamma), lam, episode_ends=rollout.ends)
            idx = torch.nonzero(rollout.valid.reshape(-1)).squeeze(1)
            states.append(rollout.obs.reshape(-1, *rollout.obs.shape[2:])[idx].clone())
            targets.append((advantages + rollout.values[:-1]).reshape(-1)[idx].clone())
            have += idx.numel()
    finally:
        envs.close()
    states_t, targets_t = torch.cat(states)[:num_states], torch.cat(targets)[:num_states]
    value_fn = ValueFunction(module)
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    result = value_stiffness(value_fn, states_t, targets_t, params=value_parameter_names(value_fn), sign=sign,
                             sign_subset_size=sign_subset_size, chunk_size=chunk_size, generator=generator)
    return {**_header(loaded, "stiffness"), "value": value, "num_states": result.num_states,
            "cosine": result.cosine, "sign": result.sign, "cosine_grad_v": result.cosine_grad_v,
            "sign_grad_v": result.sign_grad_v, "sign_method": result.sign_method,
            "num_sign_pairs": result.num_sign_pairs, "num_zero_gradients": result.num_zero_gradients}


def run_value_bias(path: str | Path, *, episodes: int = 100, value: str = "value", num_envs: int | None = None,
                   truncation: str = "bootstrap", seed: int | None = None, device: str = "auto",
                   threads: int | None = None, max_steps: int = 1_000_000) -> dict:
    """``V(s_0)`` against the discounted return ``G_0`` (the run's gamma, trained-on rewards) over
    ``episodes`` fresh training episodes. ``num_envs`` defaults to ``episodes`` (capped at 128); each env
    contributes its first ``ceil(episodes / num_envs)`` episodes. Truncated episodes (time-outs) count with
    the bootstrapped value at the cut ``gamma^L V(s_L)`` (``truncation = "bootstrap"``), their partial
    return (``"partial"``, the DCPG authors' logging) or not at all (``"exclude"``; they still use up their
    env's quota); see :mod:`aclab.analysis.value_bias`."""
    loaded = load_algorithm(path, device, threads)
    num_envs = num_envs or min(episodes, 128)
    per_env = math.ceil(episodes / num_envs)
    module = ValueFunction(_pick_value(loaded.algo, value))
    gamma, _ = _discounting(loaded.config)
    torch_device = resolve_device(device)
    envs = make_analysis_envs(loaded, num_envs, seed)
    tracker = EpisodeStartTracker(num_envs, gamma, fresh_envs=True)
    per_env_starts: list[list] = [[] for _ in range(num_envs)]

    @torch.no_grad()
    def values_of(obs) -> np.ndarray:
        return module(torch.as_tensor(obs, device=torch_device)).float().cpu().numpy()

    try:
        values = values_of(envs.obs)
        for _ in range(max_steps):
            valid = ~envs.next_is_dummy
            result = envs.step(loaded.algo.act(envs.obs, False))
            next_values = values_of(result.obs)  # a truncation's final observation: its bootstrap
            ends = result.terminated | result.truncated
            for start in tracker.step(values, result.reward, ends, valid, result.terminated, next_values):
                if len(per_env_starts[start.env_index]) < per_env:
                    per_env_starts[start.env_index].append(start)
            values = next_values
            if sum(len(s) for s in per_env_starts) >= num_envs * per_env:
                break
    finally:
        envs.close()
    starts = [s for k in range(per_env) for env_starts in per_env_starts for s in env_starts[k:k + 1]][:episodes]
    bias = value_bias_from_starts(starts, truncation=truncation)
    return {**_header(loaded, "value_bias"), "value": value, "gamma": gamma, "truncation": truncation,
            "bias": bias.bias, "predicted": bias.mean_value, "true": bias.mean_return,
            "num_episodes": bias.num_episodes, "num_truncated": bias.num_truncated,
            "num_truncated_excluded": bias.num_truncated_excluded, "values": bias.values.tolist(),
            "returns": bias.returns.tolist()}


def run_ood_actions(path: str | Path, *, num_transitions: int = 4096, num_envs: int | None = None,
                    seed: int | None = None, device: str = "auto", chunk_size: int = 1024,
                    threads: int | None = None) -> dict:
    """DCPG paper, Table 8: per transition ``(s, a, s')`` of fresh training rollouts, the number of actions
    ``a_hat != a`` that the trained (forward) discriminator accepts, ``f(s, a_hat, s') > 0.5``.

    Needs an algorithm with a dynamics model (ddcpg, dcpg-f, dcpg-i, dcpg-fi, dppg). Transitions that cross
    an episode reset (autoreset dummies) are left out. Counted two ways: over the raw actions (``mean``,
    ``std``, ``histogram`` over ``[0, A - 1]``) and over the distinct actions of the game (``*_distinct``:
    one canonical action per action-equivalence class, the true action's class left out; Procgen classes
    from :func:`aclab.analysis.action_classes.procgen_action_classes`, BigFish has 9, the paper's count).
    """
    loaded = load_algorithm(path, device, threads)
    algo = loaded.algo
    dynamics = getattr(algo, "dynamics", None)
    if dynamics is None:
        raise ValueError(f"{loaded.config.algo!r} has no dynamics discriminator (use ddcpg, dcpg-f, dcpg-i, "
                         "dcpg-fi or dppg)")
    num_envs = num_envs or loaded.config.env.num_envs
    torch_device = resolve_device(device)
    envs = make_analysis_envs(loaded, num_envs, seed)
    canonical = canonical_action_map(loaded.config.env.id, loaded.config.env.options, dynamics.num_actions)
    counts: list[torch.Tensor] = []
    distinct: list[torch.Tensor] = []
    have = 0
    try:
        num_steps = math.ceil(num_transitions / num_envs) + 1
        first_value = next(iter(value_functions_of(algo).values()))
        while have < num_transitions:
            rollout, next_obs = collect_with_policy(algo, envs, num_steps, first_value, torch_device)
            frames = torch.cat([rollout.obs, next_obs.unsqueeze(0)])  # [T + 1, B, ...]
            with torch.no_grad():
                flat = frames.reshape(-1, *frames.shape[2:])
                features = torch.cat([algo.encode(flat[s:s + chunk_size].to(torch_device))
                                      for s in range(0, flat.shape[0], chunk_size)])
            features = features.view(frames.shape[0], num_envs, -1)
            idx = torch.nonzero(rollout.valid.reshape(-1)).squeeze(1).to(torch_device)
            dim = features.shape[-1]
            args = (dynamics.discriminator, features[:-1].reshape(-1, dim)[idx],
                    rollout.actions.reshape(-1).to(torch_device)[idx], features[1:].reshape(-1, dim)[idx])
            counts.append(ood_action_counts(*args).cpu())
            distinct.append(ood_action_counts(*args, canonical=canonical).cpu())
            have += idx.numel()
    finally:
        envs.close()
    all_counts = torch.cat(counts)[:num_transitions].double()
    distinct_counts = torch.cat(distinct)[:num_transitions].double()
    num_actions = dynamics.num_actions
    num_distinct = int((canonical == torch.arange(num_actions)).sum())
    return {**_header(loaded, "ood_actions"), "num_transitions": int(all_counts.numel()),
            "num_actions": num_actions, "mean": float(all_counts.mean()), "std": float(all_counts.std()),
            "histogram": torch.bincount(all_counts.long(), minlength=num_actions).tolist(),
            "num_distinct_actions": num_distinct, "canonical_actions": canonical.tolist(),
            "mean_distinct": float(distinct_counts.mean()), "std_distinct": float(distinct_counts.std()),
            "histogram_distinct": torch.bincount(distinct_counts.long(), minlength=num_distinct).tolist()}


def run_gradient_accuracy(path: str | Path, *, num_states: int = 15, num_actions: int = 15, horizon: int = 0,
                          independent_states: bool | None = None, num_envs: int | None = None,
                          seed: int | None = None, device: str = "auto", threads: int | None = None) -> dict:
    """Hypernetwork paper Section 3.2 / Figure 3 on a TD3 or SAC checkpoint: cosine similarity between the
    critic's action-gradient and the least-squares "true" gradient from repeated-action rollouts
    (:func:`aclab.analysis.grad_accuracy.measure_gradient_accuracy`; MuJoCo envs, which save and restore
    state; the env is built with the run's ``env.options``). ``horizon = 0`` rolls out to the time limit
    (the authors' choice); ``independent_states`` (None: the run's
    ``params.grad_accuracy_independent_states``) draws each state from its own reset."""
    from aclab.algos.offpolicy import make_analysis_env
    from aclab.analysis.grad_accuracy import measure_gradient_accuracy

    del num_envs  # one Gymnasium env with saved simulator state
    loaded = load_algorithm(path, device, threads)
    if not hasattr(loaded.algo, "gradient_probe"):
        raise ValueError(f"gradient-accuracy needs an off-policy actor-critic run (td3, sac); this run is "
                         f"{loaded.config.algo!r}")
    seed = loaded.config.seed + ANALYSIS_SEED_OFFSET if seed is None else seed
    if independent_states is None:
        independent_states = bool(getattr(loaded.config.params, "grad_accuracy_independent_states", True))
    envs = make_analysis_envs(loaded, num_envs=1, seed=seed)  # carries the run's frozen obs normalisation
    env = make_analysis_env(loaded.config.env.id, loaded.config.env.options)
    try:
        result = measure_gradient_accuracy(
            env, loaded.algo.gradient_probe(envs), num_states=num_states, num_actions=num_actions,
            gamma=float(loaded.config.params.gamma), horizon=horizon or None, independent_states=independent_states,
            rng=np.random.default_rng(seed))
    finally:
        env.close()
        envs.close()
    return {**_header(loaded, "gradient_accuracy"), "independent_states": independent_states, **result.metrics(),
            "cosines": [float(c) for c in result.cosine]}


def run_gradient_noise(path: str | Path, *, updates: int = 50, episodes: int | None = None,
                       num_envs: int | None = None, seed: int | None = None, device: str = "auto",
                       threads: int | None = None) -> dict:
    """Hypernetwork paper Section 4.2 / Figure 5 on a MAML checkpoint: ``updates`` independent meta-updates
    from the checkpoint, each from fresh episodes, and the returns of every updated policy on the same
    held-out tasks before and after adaptation (:func:`aclab.algos.maml.gradient_noise`)."""
    from aclab.algos.maml import MAML, gradient_noise

    del num_envs  # MAML samples its own episodes
    loaded = load_algorithm(path, device, threads)
    if not isinstance(loaded.algo, MAML):
        raise ValueError(f"gradient-noise needs a MAML run (maml, maml-context, maml-hyper); this run is "
                         f"{loaded.config.algo!r}")
    result = gradient_noise(loaded.algo, updates, eval_episodes=episodes, eval_seed=0 if seed is None else seed)
    out = {**_header(loaded, "gradient_noise"), "updates": updates}
    for key in ("return_pre", "return_post"):
        values = np.asarray(result[key], dtype=np.float64)
        out[key] = values.tolist()
        out[f"{key}_mean"], out[f"{key}_std"] = float(values.mean()), float(values.std())
        out[f"{key}_before_update"] = float(result["baseline_" + key[len("return_"):]])
    return out
