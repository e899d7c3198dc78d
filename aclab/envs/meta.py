"""Task families for meta-RL (Sarafian et al. 2021, hypernetwork paper, Section 4 and 5.1; MAML; PEARL).

A *task family* is a distribution of tasks that share states and actions and differ in the reward:

* :meth:`TaskFamily.sample_tasks` ``(n, rng, split)`` -> task parameters ``[n, task_dim]`` (float64)
  from the ``"train"`` or ``"test"`` distribution (the same one except for the out-of-distribution
  families);
* :meth:`TaskFamily.context` ``(tasks)`` -> the *oracle context* ``[n, context_dim]`` (float32) that
  Context-MAML and Hyper-MAML condition on;
* :meth:`TaskFamily.make_batch_env` ``(n)`` -> a :class:`BatchTaskEnv` running ``n`` episodes side by
  side, each with its own task (set at :meth:`BatchTaskEnv.reset`);
* :func:`rollout` runs one fixed-horizon episode in every env of a batch with a policy callable.

Families (``FAMILIES``; episodes of 200 steps for MuJoCo, v = forward velocity
``(x_after - x_before) / dt`` as Gymnasium's ``info["x_velocity"]``, a = the action after clipping to
the action bounds):

| name | reward | train tasks | test tasks | oracle context |
| --- | --- | --- | --- | --- |
| ``halfcheetah-fwd-back`` | ``d v - 0.05 ||a||^2`` | d in {-1, +1} | same | ``d`` in {-1, +1} |
| ``halfcheetah-vel`` | ``-|v - v*| - 0.05 ||a||^2`` | v* ~ U[0, 3] | same | ``(v* - 0) / (3 - 0)`` |
| ``halfcheetah-vel-medium`` | as -vel | v* ~ U[0, 2.5] | v* ~ U[2.5, 3] (OOD) | ``v* / 2.5`` (> 1 at test) |
| ``ant-fwd-back`` | ``d v_x - 0.005 ||a||^2 - c + s`` | d in {-1, +1} | same | ``d`` |
| ``ant-vel`` | ``-|v_x - v*| - 0.005 ||a||^2 - c + s`` | v* ~ U[0, 3] | same | ``v* / 3`` |
| ``point-nav`` | ``-||p - g||`` | g ~ U[-0.5, 0.5]^2 | same | ``2 (g - low) / (high - low) - 1`` |

HalfCheetah observation: ``qpos[1:], qvel`` and the torso's centre of mass (20 numbers; the observation
of the PEARL code, whose tasks the hypernetwork paper follows, Section 5.1, of the MAML code and of the
authors' code; ``torso_com_in_observation=False``: Gymnasium's 17).

Ant: ``c = 5e-4 sum clip(cfrc_ext, -1, 1)^2`` (contact cost, Gymnasium's Ant-v5) and ``s`` a survive
bonus paid while the torso height is in [0.2, 1]: ``survive_bonus`` 1.0 on ``ant-fwd-back`` (PEARL's
Ant-Dir) and 1.05 on ``ant-vel`` (MAML's Ant-Vel: ``+1`` on the velocity term and 0.05); the episode
terminates outside that range (Gymnasium's default, as PEARL). The Ant observation is ``qpos[2:], qvel``
(27 numbers, PEARL's; ``include_cfrc_ext_in_observation=True`` adds the contact forces). The control
costs are the reduced ones of PEARL (hypernetwork paper, footnote 3).

Direction tasks (``direction_reward``): ``"forward"`` (default) ``d * v_x`` (PEARL's forward/backward Ant
uses the angles 0 and pi, i.e. exactly this); ``"angle"`` (Ant only, the authors' code): ``d`` is an
angle in radians and the reward is ``(v_x, v_y) . (cos d, sin d)``, so d = +-1 asks for diagonals at
+-57 degrees from the x axis. The authors' survive bonus is 0.05 on both Ant families (``survive_bonus``).

Oracle context (hypernetwork paper, Section 5.1: "a binary indicator" for direction tasks, "a continuous
context ... that maps to the velocities in the training distribution" for velocity tasks): direction
``d`` itself, {-1, +1} (``direction_context="sign"``, the authors' code; ``"binary"``: ``(d + 1) / 2``
in {0, 1}, which feeds a hypernetwork primary an all-zero input for d = -1, so that task's weights are the
primary's biases alone); velocity ``(v* - low) / (high - low)`` over the training range (the authors
normalise by the sampled training tasks' min and max: the same up to sampling).

``point-nav`` (MAML's 2-D navigation, Finn et al. 2017 Section 5.3; PEARL's point robot uses the same
dynamics): the state is the position ``p`` (starts at the origin, or uniform in
``[start_low, start_high]^2``), an action is a displacement clipped to ``[-0.1, 0.1]^2``, the reward is
the negative distance to the goal after the move, 100 steps; options set the goal region, horizon,
start region, and a separate test region (out-of-distribution tests).

Gymnasium ids. Importing this module registers one Gymnasium env per family (``GYM_IDS``, e.g.
``aclab/MetaPointNav-v0``), usable as the training loop's env id ``gym:aclab/MetaPointNav-v0``. Its
observation is ``[state, oracle context]`` and every reset draws a task from ``split`` (default
``"test"``); its keyword arguments are the family options. The meta-RL algorithms take their task
family from that id (see :func:`family_from_env_id`) and run their own per-task envs; the loop's env
serves for the spec and for the loop's plain evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = [
    "BatchTaskEnv",
    "FAMILIES",
    "GYM_IDS",
    "LocomotionFamily",
    "MetaTaskEnv",
    "PointNavFamily",
    "TaskFamily",
    "Trajectories",
    "family_from_env_id",
    "locomotion_reward",
    "make_task_family",
    "point_nav_reward",
    "rollout",
]

SPLITS = ("train", "test")


# ----------------------------------------------------------------------------------------------
# Interfaces
# ----------------------------------------------------------------------------------------------
class BatchTaskEnv(Protocol):
    """``num_envs`` episodes side by side, each with its own task.

    ``reset(tasks [N, task_dim], seeds [N]) -> obs [N, obs_dim]``;
    ``step(actions [N, A], active [N] bool) -> (obs [N, D], rewards [N], terminated [N] bool)``: only the
    ``active`` envs advance (the others keep their observation and get reward 0).
    """

    num_envs: int

    def reset(self, tasks: np.ndarray, seeds: Sequence[int]) -> np.ndarray: ...

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


class TaskFamily(Protocol):
    """A distribution of tasks (see the module docstring)."""

    name: str
    obs_dim: int
    action_dim: int
    context_dim: int
    task_dim: int
    horizon: int
    action_low: np.ndarray
    action_high: np.ndarray

    def sample_tasks(self, n: int, rng: np.random.Generator, split: str = "train") -> np.ndarray: ...

    def context(self, tasks: np.ndarray) -> np.ndarray: ...

    def make_batch_env(self, num_envs: int) -> BatchTaskEnv: ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown task split {split!r}; expected one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------
# Point navigation
# ----------------------------------------------------------------------------------------------
def point_nav_reward(positions: np.ndarray, goals: np.ndarray) -> np.ndarray:
    """``-||p - g||_2`` per row: positions, goals ``[N, 2]`` -> ``[N]``."""
    return -np.sqrt(np.sum(np.square(positions - goals), axis=-1))


@dataclass(frozen=True)
class PointNavFamily:
    """2-D point navigation (MAML 2-D navigation / PEARL point robot); see the module docstring.

    Task parameters: the goal ``[2]``. ``test_low`` / ``test_high`` (default: the training region)
    give a separate test region.
    """

    goal_low: float = -0.5
    goal_high: float = 0.5
    test_low: float | None = None
    test_high: float | None = None
    horizon: int = 100
    max_action: float = 0.1
    start_low: float = 0.0
    start_high: float = 0.0
    name: str = "point-nav"

    obs_dim = 2
    action_dim = 2
    context_dim = 2
    task_dim = 2

    def __post_init__(self) -> None:
        if not self.goal_low < self.goal_high:
            raise ValueError(f"point-nav needs goal_low < goal_high, got {self.goal_low}, {self.goal_high}")
        if (self.test_low is None) != (self.test_high is None):
            raise ValueError("point-nav: set both test_low and test_high, or neither")
        if self.test_low is not None and not self.test_low < self.test_high:
            raise ValueError(f"point-nav needs test_low < test_high, got {self.test_low}, {self.test_high}")
        if self.horizon < 1 or self.max_action <= 0 or self.start_low > self.start_high:
            raise ValueError("point-nav needs horizon >= 1, max_action > 0 and start_low <= start_high")

    @property
    def action_low(self) -> np.ndarray:
        return np.full(2, -self.max_action, dtype=np.float32)

    @property
    def action_high(self) -> np.ndarray:
        return np.full(2, self.max_action, dtype=np.float32)

    def sample_tasks(self, n: int, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        _check_split(split)
        low, high = self.goal_low, self.goal_high
        if split == "test" and self.test_low is not None:
            low, high = self.test_low, self.test_high
        return rng.uniform(low, high, size=(n, 2))

    def context(self, tasks: np.ndarray) -> np.ndarray:
        """Goals rescaled so that the training region maps to ``[-1, 1]^2`` (the authors' code)."""
        tasks = np.asarray(tasks, dtype=np.float64).reshape(-1, 2)
        return (2.0 * (tasks - self.goal_low) / (self.goal_high - self.goal_low) - 1.0).astype(np.float32)

    def make_batch_env(self, num_envs: int) -> PointNavBatch:
        return PointNavBatch(self, num_envs)


class PointNavBatch:
    """NumPy-vectorised :class:`PointNavFamily` episodes (a :class:`BatchTaskEnv`)."""

    def __init__(self, family: PointNavFamily, num_envs: int) -> None:
        self.family = family
        self.num_envs = int(num_envs)
        self.positions = np.zeros((self.num_envs, 2))
        self.goals = np.zeros((self.num_envs, 2))

    def reset(self, tasks: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        tasks = np.asarray(tasks, dtype=np.float64).reshape(self.num_envs, 2)
        self.goals = tasks.copy()
        f = self.family
        if f.start_low == f.start_high:
            self.positions = np.full((self.num_envs, 2), float(f.start_low))
        else:
            self.positions = np.stack([np.random.default_rng(int(s)).uniform(f.start_low, f.start_high, 2)
                                       for s in seeds])
        return self.positions.astype(np.float32)

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        moves = np.clip(np.asarray(actions, dtype=np.float64), -self.family.max_action, self.family.max_action)
        active = np.asarray(active, dtype=bool)
        self.positions = self.positions + moves * active[:, None]
        rewards = np.where(active, point_nav_reward(self.positions, self.goals), 0.0)
        return self.positions.astype(np.float32), rewards.astype(np.float32), np.zeros(self.num_envs, dtype=bool)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# MuJoCo locomotion
# ----------------------------------------------------------------------------------------------
def locomotion_reward(kind: str, task: float, x_velocity: float, action: np.ndarray, ctrl_cost_weight: float,
                      extra: float = 0.0, y_velocity: float = 0.0, direction_reward: str = "forward") -> float:
    """The meta-RL locomotion reward for one step.

    ``kind="direction"``: ``task * v_x`` (``direction_reward="forward"``) or ``(v_x, v_y) . (cos task,
    sin task)`` (``"angle"``, the authors' Ant); ``kind="velocity"``: ``-|v_x - task|``; minus
    ``ctrl_cost_weight * ||action||^2``, plus ``extra`` (Ant: survive bonus minus contact cost).
    """
    if kind == "direction":
        if direction_reward == "forward":
            forward = task * x_velocity
        elif direction_reward == "angle":
            forward = x_velocity * np.cos(task) + y_velocity * np.sin(task)
        else:
            raise ValueError(f"unknown direction_reward {direction_reward!r}; expected 'forward' or 'angle'")
    elif kind == "velocity":
        forward = -abs(x_velocity - task)
    else:
        raise ValueError(f"unknown locomotion task kind {kind!r}")
    return float(forward - ctrl_cost_weight * float(np.sum(np.square(action))) + extra)


@dataclass(frozen=True)
class LocomotionFamily:
    """A Gymnasium MuJoCo robot with direction or target-velocity tasks; see the module docstring.

    Task parameters ``[1]``: the direction ``d`` or the target velocity ``v*``. ``train_range`` /
    ``test_range`` are the uniform ranges of ``v*`` (direction tasks draw ``d`` from {-1, +1}); the
    velocity context maps the training range to [0, 1]. Ant only: ``survive_bonus`` (per healthy step),
    ``direction_reward``, ``include_cfrc_ext_in_observation``; HalfCheetah only:
    ``torso_com_in_observation``. See the module docstring.
    """

    name: str
    gym_id: str
    kind: str  # "direction" or "velocity"
    ctrl_cost_weight: float
    train_range: tuple[float, float] = (0.0, 3.0)
    test_range: tuple[float, float] = (0.0, 3.0)
    horizon: int = 200
    ant_terms: bool = False  # add Gymnasium's Ant contact cost and the survive bonus
    include_cfrc_ext_in_observation: bool = False  # Ant only
    survive_bonus: float = 1.0  # Ant only
    direction_reward: str = "forward"  # "forward" or "angle" (Ant direction tasks)
    direction_context: str = "sign"  # "sign" (d) or "binary" ((d + 1) / 2)
    torso_com_in_observation: bool = False  # HalfCheetah only

    context_dim = 1
    task_dim = 1

    def __post_init__(self) -> None:
        if self.kind not in ("direction", "velocity"):
            raise ValueError(f"unknown locomotion task kind {self.kind!r}; expected direction or velocity")
        if self.horizon < 1:
            raise ValueError(f"{self.name}: horizon must be >= 1, got {self.horizon}")
        for label, (low, high) in (("train_range", self.train_range), ("test_range", self.test_range)):
            if not low <= high:
                raise ValueError(f"{self.name}: {label} must be (low, high) with low <= high, got {(low, high)}")
        if self.direction_reward not in ("forward", "angle"):
            raise ValueError(f"{self.name}: direction_reward must be 'forward' or 'angle', "
                             f"got {self.direction_reward!r}")
        if self.direction_reward == "angle" and not self.gym_id.startswith("Ant"):
            raise ValueError(f"{self.name}: direction_reward='angle' is the authors' Ant reward; "
                             "only Ant families take it")
        if self.direction_context not in ("sign", "binary"):
            raise ValueError(f"{self.name}: direction_context must be 'sign' or 'binary', "
                             f"got {self.direction_context!r}")
        probe = self._make_env()
        com = 3 if self.torso_com_in_observation else 0
        object.__setattr__(self, "obs_dim", int(np.prod(probe.observation_space.shape)) + com)
        object.__setattr__(self, "action_dim", int(np.prod(probe.action_space.shape)))
        object.__setattr__(self, "action_low", np.asarray(probe.action_space.low, dtype=np.float32))
        object.__setattr__(self, "action_high", np.asarray(probe.action_space.high, dtype=np.float32))
        object.__setattr__(self, "dt", float(probe.unwrapped.dt))
        probe.close()

    def _make_env(self) -> gymnasium.Env:
        kwargs: dict[str, Any] = {}
        if self.gym_id.startswith("Ant"):
            kwargs["include_cfrc_ext_in_observation"] = self.include_cfrc_ext_in_observation
        # the raw MuJoCo env: the horizon is enforced by rollout(), actions are clipped here
        return gymnasium.make(self.gym_id, disable_env_checker=True, **kwargs).unwrapped

    def observe(self, env: gymnasium.Env, obs: np.ndarray) -> np.ndarray:
        """The family's observation from the raw env's: with ``torso_com_in_observation``, the torso's
        centre of mass ``[x, y, z]`` appended (``get_body_com("torso")``, the PEARL / MAML code's)."""
        if not self.torso_com_in_observation:
            return obs
        return np.concatenate([obs, env.get_body_com("torso")])

    def sample_tasks(self, n: int, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        _check_split(split)
        if self.kind == "direction":  # balanced: as many -1 as +1 (both directions for n = 2)
            return rng.permutation(np.resize(np.array([-1.0, 1.0]), n)).reshape(n, 1)
        low, high = self.train_range if split == "train" else self.test_range
        return rng.uniform(low, high, size=(n, 1))

    def context(self, tasks: np.ndarray) -> np.ndarray:
        """Oracle context ``[n, 1]``: direction ``d`` (or ``(d + 1) / 2``), velocity ``(v* - low) / (high -
        low)`` over ``train_range`` (module docstring)."""
        tasks = np.asarray(tasks, dtype=np.float64).reshape(-1, 1)
        if self.kind == "direction":
            return (tasks if self.direction_context == "sign" else (tasks + 1.0) / 2.0).astype(np.float32)
        low, high = self.train_range
        return ((tasks - low) / max(high - low, 1e-8)).astype(np.float32)

    def make_batch_env(self, num_envs: int) -> LocomotionBatch:
        return LocomotionBatch(self, num_envs)

    def step_reward(self, task: float, info: dict, action: np.ndarray) -> float:
        """The family's reward from one Gymnasium step's ``info`` and the (clipped) action. Ant: Gymnasium
        pays ``reward_survive`` = 1 on healthy steps (its healthy reward), scaled to ``survive_bonus``."""
        extra = 0.0
        if self.ant_terms:
            extra = self.survive_bonus * float(info["reward_survive"]) + float(info["reward_contact"])
        return locomotion_reward(self.kind, task, float(info["x_velocity"]), action, self.ctrl_cost_weight, extra,
                                 float(info.get("y_velocity", 0.0)), self.direction_reward)


class LocomotionBatch:
    """``num_envs`` Gymnasium MuJoCo envs stepped in a Python loop (a :class:`BatchTaskEnv`)."""

    def __init__(self, family: LocomotionFamily, num_envs: int) -> None:
        self.family = family
        self.num_envs = int(num_envs)
        self.envs = [family._make_env() for _ in range(self.num_envs)]
        self.tasks = np.zeros(self.num_envs)
        self.obs = np.zeros((self.num_envs, family.obs_dim), dtype=np.float32)

    def reset(self, tasks: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        self.tasks = np.asarray(tasks, dtype=np.float64).reshape(self.num_envs)
        for i, (env, seed) in enumerate(zip(self.envs, seeds)):
            self.obs[i] = self.family.observe(env, env.reset(seed=int(seed))[0])
        return self.obs.copy()

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = self.family
        actions = np.clip(np.asarray(actions, dtype=np.float64), f.action_low, f.action_high)
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        terminated = np.zeros(self.num_envs, dtype=bool)
        for i in np.flatnonzero(active):
            obs, _, term, _, info = self.envs[i].step(actions[i])
            self.obs[i] = f.observe(self.envs[i], obs)
            rewards[i] = f.step_reward(self.tasks[i], info, actions[i])
            terminated[i] = term
        return self.obs.copy(), rewards, terminated

    def close(self) -> None:
        for env in self.envs:
            env.close()


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def _halfcheetah(name: str, kind: str, train=(0.0, 3.0), test=(0.0, 3.0), **options) -> LocomotionFamily:
    options.setdefault("torso_com_in_observation", True)
    options.setdefault("train_range", train)
    options.setdefault("test_range", test)
    return LocomotionFamily(name, "HalfCheetah-v5", kind, 0.05, **options)


def _ant(name: str, kind: str, **options) -> LocomotionFamily:
    options.setdefault("survive_bonus", 1.05 if kind == "velocity" else 1.0)
    return LocomotionFamily(name, "Ant-v5", kind, 0.005, ant_terms=True, **options)


FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "point-nav": lambda **o: PointNavFamily(**o),
    "halfcheetah-fwd-back": lambda **o: _halfcheetah("halfcheetah-fwd-back", "direction", **o),
    "halfcheetah-vel": lambda **o: _halfcheetah("halfcheetah-vel", "velocity", **o),
    "halfcheetah-vel-medium": lambda **o: _halfcheetah("halfcheetah-vel-medium", "velocity", (0.0, 2.5),
                                                       (2.5, 3.0), **o),
    "ant-fwd-back": lambda **o: _ant("ant-fwd-back", "direction", **o),
    "ant-vel": lambda **o: _ant("ant-vel", "velocity", **o),
}

GYM_IDS = {
    "point-nav": "aclab/MetaPointNav-v0",
    "halfcheetah-fwd-back": "aclab/MetaHalfCheetahFwdBack-v0",
    "halfcheetah-vel": "aclab/MetaHalfCheetahVel-v0",
    "halfcheetah-vel-medium": "aclab/MetaHalfCheetahVelMedium-v0",
    "ant-fwd-back": "aclab/MetaAntFwdBack-v0",
    "ant-vel": "aclab/MetaAntVel-v0",
}

_OPTION_KEYS = {
    "point-nav": ("goal_low", "goal_high", "test_low", "test_high", "horizon", "max_action", "start_low",
                  "start_high"),
    "halfcheetah-fwd-back": ("horizon", "torso_com_in_observation", "direction_context"),
    "halfcheetah-vel": ("horizon", "train_range", "test_range", "torso_com_in_observation"),
    "halfcheetah-vel-medium": ("horizon", "train_range", "test_range", "torso_com_in_observation"),
    "ant-fwd-back": ("horizon", "include_cfrc_ext_in_observation", "survive_bonus", "direction_reward",
                     "direction_context"),
    "ant-vel": ("horizon", "train_range", "test_range", "include_cfrc_ext_in_observation", "survive_bonus"),
}


def make_task_family(name: str, **options) -> TaskFamily:
    """Build family ``name`` (one of :data:`FAMILIES`) with its options; unknown names or options raise
    ValueError listing the valid ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid: {', '.join(FAMILIES)}")
    unknown = sorted(set(options) - set(_OPTION_KEYS[name]))
    if unknown:
        valid = ", ".join(_OPTION_KEYS[name])
        raise ValueError(f"unknown option(s) {unknown} for task family {name!r}; valid: {valid}")
    for key in ("train_range", "test_range"):
        if key in options:
            options[key] = tuple(float(x) for x in options[key])
    return FAMILIES[name](**options)


def family_from_env_id(env_id: str, options: dict | None = None) -> TaskFamily:
    """The task family behind a meta env id (``"gym:aclab/MetaPointNav-v0"``, ``"aclab/MetaPointNav-v0"``
    or a family name), with the env options (minus ``split`` / ``max_episode_steps``)."""
    name = env_id.split(":", 1)[1] if env_id.startswith("gym:") else env_id
    by_id = {gym_id: family for family, gym_id in GYM_IDS.items()}
    if name in by_id:
        name = by_id[name]
    if name not in FAMILIES:
        raise ValueError(
            f"meta-RL needs a task-family env id, got {env_id!r}; valid: "
            + ", ".join(f"gym:{gym_id}" for gym_id in GYM_IDS.values())
        )
    kwargs = {k: v for k, v in (options or {}).items() if k not in ("split", "max_episode_steps")}
    return make_task_family(name, **kwargs)


def family_for_env_spec(env_id: str, options: dict | None, env_spec) -> TaskFamily:
    """:func:`family_from_env_id`, checked against the spec of the env the training loop built: its
    observations must be ``[state, context]`` and its actions the family's (no normalisation wrappers)."""
    family = family_from_env_id(env_id, options)
    expected = (family.obs_dim + family.context_dim,)
    if tuple(env_spec.obs_shape) != expected or int(np.prod(env_spec.action_space.shape)) != family.action_dim:
        raise ValueError(f"env {env_spec.env_id}: observations {tuple(env_spec.obs_shape)} / actions "
                         f"{env_spec.action_space} do not match task family {family.name} ([state, context] = "
                         f"{expected}, {family.action_dim} actions); use its meta env id without normalisation")
    return family


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """One episode per env, time-major: ``obs`` / ``next_obs`` ``[T, N, D]`` float32, ``actions``
    ``[T, N, A]`` float32 (as the policy returned them, before clipping), ``rewards`` ``[T, N]``
    float32, ``terminated`` / ``valid`` ``[T, N]`` bool (``valid`` is False after a termination).
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    valid: np.ndarray

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted episode returns ``[N]``."""
        return (self.rewards * self.valid).sum(0)

    @property
    def lengths(self) -> np.ndarray:
        return self.valid.sum(0)

    @property
    def num_steps(self) -> int:
        return int(self.valid.sum())


def rollout(env: BatchTaskEnv, tasks: np.ndarray, act: Callable[[np.ndarray, int], np.ndarray], horizon: int,
            seeds: Sequence[int], action_dim: int) -> Trajectories:
    """Run one episode of ``horizon`` steps in each of the ``env.num_envs`` envs (task ``tasks[i]``,
    reset seed ``seeds[i]``); ``act(obs [N, D], t) -> actions [N, A]``. Terminated envs stop (their
    later steps are invalid)."""
    n = env.num_envs
    obs = env.reset(tasks, seeds)
    obs_buf = np.zeros((horizon, n, obs.shape[-1]), dtype=np.float32)
    next_buf = np.zeros_like(obs_buf)
    act_buf = np.zeros((horizon, n, action_dim), dtype=np.float32)
    rew_buf = np.zeros((horizon, n), dtype=np.float32)
    term_buf = np.zeros((horizon, n), dtype=bool)
    valid = np.zeros((horizon, n), dtype=bool)
    active = np.ones(n, dtype=bool)
    for t in range(horizon):
        actions = np.asarray(act(obs, t), dtype=np.float32).reshape(n, action_dim)
        next_obs, rewards, terminated = env.step(actions, active)
        obs_buf[t], act_buf[t], rew_buf[t], next_buf[t] = obs, actions, rewards, next_obs
        term_buf[t] = terminated & active
        valid[t] = active
        active = active & ~terminated
        obs = next_obs
        if not active.any():
            break
    return Trajectories(obs_buf, act_buf, rew_buf, next_buf, term_buf, valid)


# ----------------------------------------------------------------------------------------------
# Gymnasium env (the training loop's env and its plain evaluation)
# ----------------------------------------------------------------------------------------------
class MetaTaskEnv(gymnasium.Env):
    """One episode of a task family per reset: observation ``[state, oracle context]``, a new task from
    ``split`` at every reset (drawn with the env's seeded generator), truncated at the horizon."""

    metadata: dict = {"render_modes": []}

    def __init__(self, family: str, split: str = "test", **family_options) -> None:
        _check_split(split)
        self.family = make_task_family(family, **family_options)
        self.split = split
        f = self.family
        self.observation_space = spaces.Box(-np.inf, np.inf, (f.obs_dim + f.context_dim,), np.float32)
        self.action_space = spaces.Box(f.action_low, f.action_high, dtype=np.float32)
        self._batch = f.make_batch_env(1)
        self._task = np.zeros((1, f.task_dim))
        self._context = np.zeros(f.context_dim, dtype=np.float32)
        self._t = 0

    @property
    def task(self) -> np.ndarray:
        return self._task[0].copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._task = self.family.sample_tasks(1, self.np_random, self.split)
        self._context = self.family.context(self._task)[0]
        obs = self._batch.reset(self._task, [int(self.np_random.integers(2**31 - 1))])[0]
        self._t = 0
        return np.concatenate([obs, self._context]).astype(np.float32), {"task": self.task}

    def step(self, action):
        obs, reward, terminated = self._batch.step(np.asarray(action, dtype=np.float32)[None], np.ones(1, bool))
        self._t += 1
        truncated = self._t >= self.family.horizon and not bool(terminated[0])
        full = np.concatenate([obs[0], self._context]).astype(np.float32)
        return full, float(reward[0]), bool(terminated[0]), truncated, {"task": self.task}

    def close(self) -> None:
        self._batch.close()


def _register() -> None:
    for family, gym_id in GYM_IDS.items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(gym_id, entry_point="aclab.envs.meta:MetaTaskEnv", kwargs={"family": family},
                               disable_env_checker=True)


_register()
