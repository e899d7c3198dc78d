"""Gradient accuracy of a critic's action-gradient (hypernetwork paper, Section 3.2 "Empirical
analysis", Figure 3; the authors' ``bias_test.py``).

Off-policy actors follow ``grad_a Q_theta(s, a)`` (hypernetwork paper, Eq. 5). How well does it point along the true
``grad_a Q^pi(s, a)``? The "true" gradient is estimated without the critic, from the simulator:

1. draw ``N_s`` states from the current policy's state distribution: per state a fresh reset and
   ``U[0, max_start_steps)`` mean-policy steps (``independent_states=True``, the default: the authors'
   ``bias_test.py``, whose appendix description our copy of the paper lacks), or snapshots of one run
   at ``N_s`` random times (``False``: cheaper, but the states are correlated);
2. at each state take the policy's mean action ``a_mu`` and ``N_r - 1`` perturbed actions
   ``clip(a_mu + N(0, sigma^2), low, high)`` (sigma = 0.3);
3. for each action, restore the simulator, apply the action for ``repeat`` (3) steps, then follow the
   mean policy, and record the discounted return ``G`` (gamma 0.99) until the episode ends; a
   truncation (time limit or ``horizon``) adds ``gamma^T V(s_T)`` with a bootstrap value (the target
   critic at ``(s_T, pi(s_T))``);
4. fit ``G ~ c + g . a`` by least squares over the ``N_r`` pairs: ``g`` is the "true" gradient;
5. report the cosine similarity ``cs = g . grad_a Q(s, a_mu) / (|g| |grad_a Q|)`` per state, its mean
   and the fraction of states with ``cs > tau`` for thresholds ``tau`` (hypernetwork paper, Figure 3a-c).

A state where either gradient is exactly zero has an undefined cosine (NaN here): it counts as not
above any threshold and is left out of the mean.

Environments must save and restore their full state: Gymnasium's MuJoCo envs (via
``mujoco.mj_getState`` / ``mj_setState`` with ``mjSTATE_INTEGRATION``, plus the TimeLimit step
counter), or any env whose ``unwrapped`` defines ``get_sim_state()`` / ``set_sim_state(state)`` (e.g.
:class:`LinearQEnv`, a synthetic task with a closed-form gradient used by the tests). EnvPool cannot.

Cost: ``N_s * N_r`` rollouts of up to the episode's remaining length (15 x 15 x <= 1000 steps); a
finite ``horizon`` bounds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np

# 0.0, 0.1, ..., 0.9 and the paper's Figure 3b-c thresholds 0.25 and 0.75
DEFAULT_THRESHOLDS = tuple(sorted({round(0.1 * k, 1) for k in range(10)} | {0.25, 0.75}))


# ----------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------
def fit_linear_gradient(actions: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Least-squares slope ``g`` ``[A]`` of ``returns [R] ~ c + g . actions [R, A]`` (minimum-norm
    solution when the system is under-determined)."""
    actions = np.asarray(actions, dtype=np.float64)
    returns = np.asarray(returns, dtype=np.float64)
    design = np.concatenate([np.ones((len(actions), 1)), actions], axis=1)
    coef, *_ = np.linalg.lstsq(design, returns, rcond=None)
    return coef[1:]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine ``[N]`` of ``a, b [N, A]``; NaN where either row is exactly zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.nan)


def fraction_above(cosines: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Fraction of states ``[T]`` with cosine strictly above each threshold (NaN counts as below)."""
    cosines = np.asarray(cosines, dtype=np.float64)
    if cosines.size == 0:
        return np.full(len(thresholds), np.nan)
    filled = np.where(np.isnan(cosines), -np.inf, cosines)
    return np.array([(filled > t).mean() for t in thresholds])


# ----------------------------------------------------------------------------------------------
# Simulator state save / restore
# ----------------------------------------------------------------------------------------------
def _find_time_limit(env: gymnasium.Env) -> gymnasium.wrappers.TimeLimit | None:
    layer = env
    for _ in range(64):
        if isinstance(layer, gymnasium.wrappers.TimeLimit):
            return layer
        if not hasattr(layer, "env"):
            return None
        layer = layer.env
    return None


@dataclass
class SavedState:
    """A restorable snapshot: the simulator state, the TimeLimit counter and the observation."""

    sim: Any
    elapsed_steps: int | None
    obs: np.ndarray


def save_env_state(env: gymnasium.Env, obs: np.ndarray) -> SavedState:
    """Snapshot ``env`` (whose current observation is ``obs``). Raises TypeError if it cannot."""
    base = env.unwrapped
    if hasattr(base, "get_sim_state"):
        sim = base.get_sim_state()
    elif hasattr(base, "model") and hasattr(base, "data"):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        sim = np.empty(mujoco.mj_stateSize(base.model, spec), dtype=np.float64)
        mujoco.mj_getState(base.model, base.data, sim, spec)
    else:
        raise TypeError(
            f"{type(base).__name__} cannot save its state: gradient accuracy needs Gymnasium MuJoCo envs or an "
            "env with get_sim_state()/set_sim_state() (EnvPool envs cannot be restored)"
        )
    limit = _find_time_limit(env)
    elapsed = None if limit is None else int(limit._elapsed_steps)
    return SavedState(sim, elapsed, np.array(obs, copy=True))


def restore_env_state(env: gymnasium.Env, state: SavedState) -> np.ndarray:
    """Put ``env`` back into ``state``; returns the observation saved with it."""
    base = env.unwrapped
    if hasattr(base, "set_sim_state"):
        base.set_sim_state(state.sim)
    else:
        import mujoco

        mujoco.mj_setState(base.model, base.data, state.sim, mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(base.model, base.data)
    limit = _find_time_limit(env)
    if limit is not None and state.elapsed_steps is not None:
        limit._elapsed_steps = state.elapsed_steps
    return state.obs.copy()


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------
def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass
class GradientProbe:
    """What the estimator needs from an agent (all NumPy, batch-first).

    policy: observations ``[N, D]`` -> mean actions ``[N, A]`` in the critic's action space.
    critic_gradient: ``(obs [N, D], actions [N, A])`` -> ``grad_a Q(s, a)`` ``[N, A]``.
    to_env_action: one critic-space action ``[A]`` -> the env's action (e.g. rescaling to bounds).
    bootstrap_value: ``obs [N, D]`` -> value estimate ``[N]`` added at a truncation (None: no bootstrap).
    obs_transform: raw env observations ``[N, D]`` -> what the networks see (e.g. frozen normalisation).
    action_low, action_high: bounds of the critic's action space for clipping perturbations.
    rollout_policy: optional ``obs [N, D]`` -> ``(actions [N, A], bonus [N])`` used after the repeated
        action instead of the mean policy, its ``bonus`` added to each step's reward (SAC's soft returns:
        sampled actions and ``-alpha log pi(a|s)``); None: the mean policy, no bonus.
    """

    policy: Callable[[np.ndarray], np.ndarray]
    critic_gradient: Callable[[np.ndarray, np.ndarray], np.ndarray]
    to_env_action: Callable[[np.ndarray], np.ndarray] = _identity
    bootstrap_value: Callable[[np.ndarray], np.ndarray] | None = None
    obs_transform: Callable[[np.ndarray], np.ndarray] = _identity
    action_low: float = -1.0
    action_high: float = 1.0
    rollout_policy: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None


@dataclass
class GradientAccuracyResult:
    """One measurement: per state ``cosine [Ns]``, ``true_gradient`` / ``critic_gradient`` ``[Ns, A]``,
    the raw observations ``obs [Ns, D]``; per state and action ``actions [Ns, Nr, A]`` and ``returns``
    ``[Ns, Nr]``."""

    cosine: np.ndarray
    true_gradient: np.ndarray
    critic_gradient: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    obs: np.ndarray
    thresholds: tuple[float, ...] = field(default=DEFAULT_THRESHOLDS)

    @property
    def mean_cosine(self) -> float:
        valid = self.cosine[~np.isnan(self.cosine)]
        return float(valid.mean()) if valid.size else float("nan")

    @property
    def fractions(self) -> np.ndarray:
        return fraction_above(self.cosine, self.thresholds)

    def metrics(self, prefix: str = "grad_cs") -> dict[str, float]:
        """Flat metrics: ``<prefix>/mean`` and ``<prefix>/frac_gt_<tau>`` per threshold."""
        out = {f"{prefix}/mean": self.mean_cosine}
        for tau, frac in zip(self.thresholds, self.fractions):
            out[f"{prefix}/frac_gt_{tau:g}"] = float(frac)
        return out


def sample_policy_states(
    env: gymnasium.Env,
    probe: GradientProbe,
    num_states: int,
    rng: np.random.Generator,
    max_start_steps: int = 1000,
    independent: bool = False,
) -> list[SavedState]:
    """``num_states`` snapshots from the mean policy's state distribution.

    ``independent=False``: one run of ``max_start_steps`` policy steps (resetting when an episode ends)
    with snapshots at ``num_states`` random distinct times (cheap: at most ``max_start_steps`` steps).
    ``independent=True``: a fresh reset and ``U[0, max_start_steps)`` policy steps per state (the authors'
    procedure; ``num_states`` times the cost).
    """
    if independent:
        return [s for _ in range(num_states) for s in sample_policy_states(env, probe, 1, rng, max_start_steps)]
    times = np.sort(rng.choice(max_start_steps, size=min(num_states, max_start_steps), replace=False))
    obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
    saved: list[SavedState] = []
    for t in range(int(times[-1]) + 1):
        if t in times:
            saved.append(save_env_state(env, obs))
        if t == times[-1]:
            break
        action = probe.policy(probe.obs_transform(obs[None]))[0]
        obs, _, terminated, truncated, _ = env.step(probe.to_env_action(action))
        if terminated or truncated:
            obs, _ = env.reset()
    return saved


def rollout_return(
    env: gymnasium.Env,
    state: SavedState,
    action: np.ndarray,
    probe: GradientProbe,
    repeat: int = 3,
    gamma: float = 0.99,
    horizon: int | None = None,
) -> float:
    """Discounted return from ``state``: ``action`` for ``repeat`` steps, then the mean policy (or
    ``probe.rollout_policy``, whose bonus is added to the reward), until termination, truncation or
    ``horizon`` steps; truncation adds ``gamma^T * bootstrap_value(s_T)``."""
    obs = restore_env_state(env, state)
    total, discount = 0.0, 1.0
    limit = horizon if horizon is not None else 1_000_000
    for t in range(limit):
        bonus = 0.0
        if t < repeat:
            a = action
        elif probe.rollout_policy is None:
            a = probe.policy(probe.obs_transform(obs[None]))[0]
        else:
            actions, bonuses = probe.rollout_policy(probe.obs_transform(obs[None]))
            a, bonus = actions[0], float(bonuses[0])
        obs, reward, terminated, truncated, _ = env.step(probe.to_env_action(a))
        total += discount * (float(reward) + bonus)
        discount *= gamma
        if terminated:
            return total
        if truncated:
            break
    if probe.bootstrap_value is not None:
        total += discount * float(probe.bootstrap_value(probe.obs_transform(obs[None]))[0])
    return total


def measure_gradient_accuracy(
    env: gymnasium.Env,
    probe: GradientProbe,
    *,
    num_states: int = 15,
    num_actions: int = 15,
    noise_std: float = 0.3,
    repeat: int = 3,
    gamma: float = 0.99,
    horizon: int | None = None,
    max_start_steps: int = 1000,
    independent_states: bool = True,
    rng: np.random.Generator | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> GradientAccuracyResult:
    """The full estimator (module docstring). ``num_actions`` counts ``a_mu`` itself (``N_r``)."""
    if num_actions < 2:
        raise ValueError(f"num_actions must be >= 2 (a_mu and at least one perturbation), got {num_actions}")
    rng = np.random.default_rng() if rng is None else rng
    states = sample_policy_states(env, probe, num_states, rng, max_start_steps, independent_states)
    raw_obs = np.stack([s.obs for s in states])
    obs = probe.obs_transform(raw_obs)
    mean_actions = np.asarray(probe.policy(obs), dtype=np.float64)  # [Ns, A]
    noise = rng.normal(0.0, noise_std, size=(len(states), num_actions - 1, mean_actions.shape[-1]))
    perturbed = np.clip(mean_actions[:, None, :] + noise, probe.action_low, probe.action_high)
    actions = np.concatenate([mean_actions[:, None, :], perturbed], axis=1)  # [Ns, Nr, A]
    returns = np.array([[rollout_return(env, state, a.astype(np.float32), probe, repeat, gamma, horizon)
                         for a in state_actions] for state, state_actions in zip(states, actions)])
    true_gradient = np.stack([fit_linear_gradient(a, r) for a, r in zip(actions, returns)])
    critic_gradient = np.asarray(probe.critic_gradient(obs, mean_actions.astype(np.float32)), dtype=np.float64)
    return GradientAccuracyResult(cosine_similarity(true_gradient, critic_gradient), true_gradient,
                                  critic_gradient, actions, returns, raw_obs, tuple(thresholds))


# ----------------------------------------------------------------------------------------------
# A synthetic task with a closed-form answer
# ----------------------------------------------------------------------------------------------
class LinearQEnv(gymnasium.Env):
    """State ``s`` ``[D]`` evolves as ``s' = R s`` regardless of the action (``R`` a fixed rotation, or
    the identity with ``rotate=False``); reward ``r(s, a) = (M s) . a`` (``M`` ``[A, D]`` fixed).

    Because the action never affects the state, the return of "action ``a`` for ``k`` steps, then any
    state-dependent policy" is affine in ``a`` with slope ``sum_{t<k} gamma^t M R^t s`` (exact: the
    least-squares fit recovers it), and the one-step ``grad_a Q^pi(s, a) = M s``
    (:meth:`repeated_action_gradient`, :meth:`action_gradient`). Episodes last ``episode_length`` steps
    (truncation). Observations are float32 ``s``; actions are ``[-1, 1]^A``.
    """

    def __init__(self, obs_dim: int = 4, action_dim: int = 2, episode_length: int = 50, rotate: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        gen = np.random.default_rng(seed)
        self.matrix = gen.normal(size=(action_dim, obs_dim))
        if rotate:
            q, _ = np.linalg.qr(gen.normal(size=(obs_dim, obs_dim)))
            self.rotation = q
        else:
            self.rotation = np.eye(obs_dim)
        self.episode_length = int(episode_length)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.state = np.zeros(obs_dim)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = self.np_random.normal(size=self.state.shape)
        self.t = 0
        return self.state.astype(np.float32), {}

    def step(self, action):
        reward = float(self.matrix @ self.state @ np.asarray(action, dtype=np.float64))
        self.state = self.rotation @ self.state
        self.t += 1
        return self.state.astype(np.float32), reward, False, self.t >= self.episode_length, {}

    def get_sim_state(self) -> tuple[np.ndarray, int]:
        return self.state.copy(), self.t

    def set_sim_state(self, sim: tuple[np.ndarray, int]) -> None:
        self.state, self.t = sim[0].copy(), int(sim[1])

    def action_gradient(self, obs: np.ndarray) -> np.ndarray:
        """``grad_a r(s, a) = M s`` ``[N, A]`` for observations ``[N, D]``."""
        return np.asarray(obs, dtype=np.float64) @ self.matrix.T

    def repeated_action_gradient(self, obs: np.ndarray, repeat: int, gamma: float, steps_left: int | None = None
                                 ) -> np.ndarray:
        """Slope ``[A]`` of the return of ``a`` repeated ``repeat`` steps from state ``obs`` ``[D]``
        (``steps_left`` caps it at the episode's end)."""
        k = repeat if steps_left is None else min(repeat, steps_left)
        s = np.asarray(obs, dtype=np.float64)
        total = np.zeros(self.matrix.shape[0])
        for t in range(k):
            total += gamma**t * (self.matrix @ s)
            s = self.rotation @ s
        return total
