"""``make_env``: one entry point from an env id (or a factory) to a :class:`~aclab.envs.vec.VecEnv`.

Default backends (``backend="auto"``), measured on the 2-core CPU machine, us per step of the raw backend
(CartPole, random actions, best of 7 runs; the machine was shared, so +-20%):

| family | default backend | measured |
| --- | --- | --- |
| classic, CartPole | Gymnasium ``CartPoleVectorEnv`` | 4 envs: 38 us (EnvPool 1 thread 33-47, 0 threads 59-62); |
| | (numpy-vectorised) | 64 envs: 42 us (EnvPool 85-158) |
| classic, others | EnvPool, ``num_threads=1`` | Pendulum / Acrobot 16 envs: 100 / 96 us vs SyncVectorEnv 193 / 534 |
| mujoco with <= 2 envs | Gymnasium (direct MuJoCo) | HalfCheetah 1 env: ~70 us vs EnvPool ~185 us |
| procgen, atari, mujoco, dmc, metaworld | EnvPool, min(B, cores) threads | only EnvPool has them; 2 threads |
| | | beat 1 by 1.4-1.7x (bigfish 64 envs: 82k vs 48k steps/s) |
| gym:<id>, gym:<module>:<id>, factory:<module>:<fn>, callables | Gymnasium ``SyncVectorEnv`` | generic |

:class:`VecEnv` adds ~7 us per step on top of the backend (4 envs; no normalisation); observation plus
reward normalisation add ~25-30 us more.

Family options (``options=``; unknown keys raise :class:`EnvIdError` listing the allowed ones):

* classic / gym: ``max_episode_steps`` and (Gymnasium backend) the env constructor's keyword arguments;
  EnvPool backend: EnvPool's config keys.
* factory: the factory's keyword arguments (``options={"length": 8}`` calls ``factory(length=8)``).
* procgen: ``levels`` = ``"train"`` (default; levels ``[0, 200)``: ``num_levels=200, start_level=0``),
  ``"test"`` (the full distribution, ``num_levels=0``), ``"test-unseen"`` (levels ``>= 200`` only:
  ``start_level=200, num_levels=2**31-1-200``, EnvPool draws level seeds uniformly in
  ``[start_level, start_level + num_levels)``); ``distribution_mode`` (``"easy"`` default, ``"hard"``, and
  the game's extra modes); explicit ``num_levels`` / ``start_level`` override ``levels``; EnvPool's
  Procgen flags (``use_backgrounds``, ``restrict_themes``, ``paint_vel_info``, ...). Episode length is
  Procgen's own per-game timeout (EnvPool ignores ``max_episode_steps`` for Procgen).
* atari: ``setting`` = ``"hard"`` (default; DNA's main results: no life-loss terminal, full 18 actions,
  sticky actions 0.25), ``"easy"`` (life loss terminal, minimal action set, no sticky actions) or
  ``"envpool"`` (EnvPool's own defaults). easy / hard share: 84x84 grayscale, frame stack 4, frame skip
  4 (max over the last two frames), no reward clipping, 1-30 no-op starts (``noop_max=30``), a 108K-frame
  cap (``max_episode_steps = 108000 // frame_skip`` agent steps) and no automatic FIRE after reset /
  life loss (``use_fire_reset=False``; DNA's footnote 18 has the agent press it). Every EnvPool Atari key
  can be overridden. ``action_marker`` / ``progress_bar`` (default False) draw DNA's previous-action
  blocks and time bar into the frames (:mod:`aclab.envs.atari_marks`). With ``episodic_life`` the
  statistics cover the whole game (EnvPool's ``info["terminated"]`` marks the game over); caveat: after a
  life loss EnvPool's dummy step plays 1-30 no-op frames whose rewards it discards (zero in most games).
* mujoco, dmc, metaworld: EnvPool's config keys (``max_episode_steps``, ``frame_skip``, reward weights,
  ...); MuJoCo with ``backend="gymnasium"`` takes the Gymnasium constructor's keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from aclab.envs import registry
from aclab.envs.atari_marks import AtariFrameMarks
from aclab.envs.backends import EnvPoolBackend, GymnasiumBackend, default_num_threads, derive_env_seeds
from aclab.envs.levels import GymnasiumLevelBackend, ProcgenLevelBackend
from aclab.envs.normalize import ObsNormalizer, RewardScaler
from aclab.envs.registry import EnvIdError, check_option_keys, coerce_option, parse_env_id, resolve_env_factory
from aclab.envs.spec import EnvSpec
from aclab.envs.vec import VecEnv

__all__ = ["make_env", "resolve_backend", "check_level_control", "ATARI_SETTING_CONFIGS", "BACKENDS"]

BACKENDS = ("auto", "envpool", "gymnasium")
_ATARI_FRAME_CAP = 108_000

_ATARI_COMMON = {
    "gray_scale": True,
    "img_height": 84,
    "img_width": 84,
    "stack_num": 4,
    "frame_skip": 4,
    "reward_clip": False,
    "noop_max": 30,
    "use_fire_reset": False,
}
# DNA paper, Table 3.
ATARI_SETTING_CONFIGS: dict[str, dict[str, Any]] = {
    "easy": {**_ATARI_COMMON, "episodic_life": True, "full_action_space": False, "repeat_action_probability": 0.0},
    "hard": {**_ATARI_COMMON, "episodic_life": False, "full_action_space": True, "repeat_action_probability": 0.25},
    "envpool": {},
}
_ATARI_EXTRA_OPTIONS = ("setting", "action_marker", "progress_bar")
_PROCGEN_EXTRA_OPTIONS = ("levels", "distribution_mode", "num_levels", "start_level")


@dataclass
class _Plan:
    """How to build one env: which backend, with which EnvPool task / Gymnasium id and config."""

    family: str
    env_id: str
    backend: str
    task_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    game_over_from_info: bool = False
    marks: dict[str, Any] | None = None
    factory: Callable[[], gymnasium.Env] | None = None
    render_only_sync: bool = False  # frames: one Gymnasium env per slot (not a numpy-vectorised env)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _envpool_options(env_id: str, task_id: str, options: dict[str, Any], exclude: tuple[str, ...] = ()) -> dict:
    """Validate ``options`` against EnvPool's config for ``task_id`` and coerce their types."""
    defaults = registry.envpool_config_defaults(task_id)
    for key in exclude:
        defaults.pop(key, None)
    check_option_keys(env_id, options, defaults)
    return {k: coerce_option(env_id, k, v, defaults[k]) for k, v in options.items()}


def _gym_options(env_id: str, gym_id: str, options: dict[str, Any]) -> dict[str, Any]:
    keys, var_kw = registry.gym_constructor_keys(gym_id)
    keys |= {"max_episode_steps"}
    if not var_kw:
        check_option_keys(env_id, options, keys)
    if "max_episode_steps" in options:
        options["max_episode_steps"] = _check_int("max_episode_steps", options["max_episode_steps"], 1)
    return options


def _plan_classic_or_gym(env_id: str, family: str, name: str, options: dict, backend: str) -> _Plan:
    if backend == "auto":
        if family == "gym":
            backend = "gymnasium"
        else:
            has_vector = name in registry._gym_registry() and registry._gym_registry()[name].vector_entry_point
            backend = "gymnasium" if has_vector else "envpool"
    if backend == "envpool":
        if family == "gym":
            raise EnvIdError(f"{env_id!r}: the 'gym:' prefix forces the Gymnasium backend; drop backend='envpool'")
        config = _envpool_options(env_id, name, options)
        return _Plan(family, env_id, "envpool", task_id=name, config=config)
    if name not in registry._gym_registry():
        raise EnvIdError(f"{env_id!r} is not registered in Gymnasium here; use backend='envpool' or 'auto'")
    return _Plan(family, env_id, "gymnasium", task_id=name, config=_gym_options(env_id, name, options))


def _plan_procgen(env_id: str, game: str, options: dict, backend: str) -> _Plan:
    if backend == "gymnasium":
        raise EnvIdError(f"{env_id!r}: Procgen is only available through EnvPool; use backend='auto' or 'envpool'")
    modes = registry.PROCGEN_DISTRIBUTION_MODES[game]
    mode = options.pop("distribution_mode", "easy")
    if mode not in modes:
        raise EnvIdError(f"distribution_mode={mode!r} for {env_id!r}; valid for {game}: {', '.join(modes)}")
    try:
        level_range = registry.procgen_level_range(options)
    except EnvIdError as exc:
        raise EnvIdError(f"{env_id!r}: {exc}") from None
    for key in ("levels", "start_level", "num_levels"):
        options.pop(key, None)
    task_id = f"{game.capitalize()}{mode.capitalize()}-v0"
    allowed = set(registry.envpool_config_defaults(task_id)) - {"max_episode_steps"}
    check_option_keys(env_id, options, allowed | set(_PROCGEN_EXTRA_OPTIONS))
    config = _envpool_options(env_id, task_id, options, exclude=("max_episode_steps",))
    config.update(level_range.options())
    return _Plan("procgen", env_id, "envpool", task_id=task_id, config=config)


def _plan_atari(env_id: str, task_id: str, options: dict, backend: str) -> _Plan:
    if backend == "gymnasium":
        raise EnvIdError(f"{env_id!r}: Atari is only available through EnvPool; use backend='auto' or 'envpool'")
    setting = options.pop("setting", "hard")
    if setting not in ATARI_SETTING_CONFIGS:
        raise EnvIdError(f"setting={setting!r} for {env_id!r}; valid: {', '.join(registry.ATARI_SETTINGS)}")
    marks = {k: bool(options.pop(k, False)) for k in ("action_marker", "progress_bar")}
    defaults = registry.envpool_config_defaults(task_id)
    check_option_keys(env_id, options, set(defaults) | set(_ATARI_EXTRA_OPTIONS))
    user = {k: coerce_option(env_id, k, v, defaults[k]) for k, v in options.items()}
    config = {**ATARI_SETTING_CONFIGS[setting], **user}
    if setting != "envpool" and "max_episode_steps" not in user:
        config["max_episode_steps"] = _ATARI_FRAME_CAP // config["frame_skip"]
    merged = {**defaults, **config}
    if any(marks.values()) and not merged["gray_scale"]:
        raise EnvIdError(f"{env_id!r}: action_marker / progress_bar need gray_scale=True")
    return _Plan(
        "atari",
        env_id,
        "envpool",
        task_id=task_id,
        config=config,
        game_over_from_info=bool(merged["episodic_life"]),
        marks=marks if any(marks.values()) else None,
    )


# EnvPool's thread hand-off costs more than a single MuJoCo step: HalfCheetah-v4 with 1 env measured
# ~180-190 us per step through EnvPool (0 or 1 threads) vs ~65-80 us with Gymnasium's env directly.
GYMNASIUM_MUJOCO_MAX_ENVS = 2


def _plan_simulated(env_id: str, family: str, task_id: str, options: dict, backend: str, num_envs: int) -> _Plan:
    few_envs = (num_envs <= GYMNASIUM_MUJOCO_MAX_ENVS and task_id in registry._gym_registry()
                and set(options) <= {"max_episode_steps"})  # EnvPool's option keys are validated up front
    if backend == "gymnasium" or (
        backend == "auto" and family == "mujoco" and (few_envs or task_id not in registry._mujoco_ids())
    ):
        if family != "mujoco":
            raise EnvIdError(f"{env_id!r}: {family} is only available through EnvPool; use backend='auto' or 'envpool'")
        if task_id not in registry._gym_registry():
            raise EnvIdError(f"{env_id!r}: {task_id} is not registered in Gymnasium; use backend='envpool'")
        return _Plan(family, env_id, "gymnasium", task_id=task_id, config=_gym_options(env_id, task_id, options))
    if task_id not in registry.envpool_ids(f"envpool.mujoco.{'gym' if family == 'mujoco' else family}"):
        raise EnvIdError(f"{env_id!r}: {task_id} is not available in EnvPool; try backend='gymnasium'")
    return _Plan(family, env_id, "envpool", task_id=task_id, config=_envpool_options(env_id, task_id, options))


def _plan_factory(env_id: str, path: str, options: dict[str, Any], backend: str) -> _Plan:
    if backend == "envpool":
        raise EnvIdError(f"{env_id!r}: an env factory runs on the Gymnasium backend; use backend='auto' or 'gymnasium'")
    factory = resolve_env_factory(path)
    if options:
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as exc:
            raise EnvIdError(f"options {sorted(options)} for {env_id!r} do not fit the factory's arguments: "
                             f"{exc}") from exc
        except ValueError:  # no signature (a builtin): let the call decide
            pass
        kwargs = dict(options)
        factory = functools.partial(factory, **kwargs)
    return _Plan("factory", env_id, "gymnasium", factory=factory)


def _plan(env_id: str, options: dict[str, Any], backend: str, num_envs: int = 1) -> _Plan:
    family, name = parse_env_id(env_id)
    if family == "factory":
        return _plan_factory(env_id, name, options, backend)
    if family in ("classic", "gym"):
        return _plan_classic_or_gym(env_id, family, name, options, backend)
    if family == "procgen":
        return _plan_procgen(env_id, name, options, backend)
    if family == "atari":
        return _plan_atari(env_id, name, options, backend)
    return _plan_simulated(env_id, family, name, options, backend, num_envs)


def resolve_backend(env_id: str | Callable[[], gymnasium.Env], num_envs: int, backend: str = "auto",
                    options: dict[str, Any] | None = None) -> str:
    """The backend (``"envpool"`` or ``"gymnasium"``) that ``make_env(env_id, num_envs, ..., backend=backend,
    options=options)`` builds. ``"auto"`` can pick differently for different ``num_envs`` (MuJoCo: Gymnasium
    up to ``GYMNASIUM_MUJOCO_MAX_ENVS`` envs, else EnvPool), so :func:`aclab.envs.build_envs` gives
    evaluation and analysis envs the training envs' backend: the same simulator, and no second backend
    imported (EnvPool alone adds ~120 MB of RSS to a MuJoCo run on Gymnasium)."""
    if callable(env_id) and not isinstance(env_id, str):
        return "gymnasium"
    return _plan(env_id, dict(options or {}), backend, num_envs).backend


def _vector_entry_accepts(gym_id: str, kwargs: dict[str, Any]) -> bool:
    from gymnasium.envs.registration import load_env_creator

    entry = registry._gym_registry()[gym_id].vector_entry_point
    if entry is None:
        return False
    creator = load_env_creator(entry) if isinstance(entry, str) else entry
    params = inspect.signature(creator).parameters
    return all(k in params for k in kwargs)


def _single_env_max_steps(env: gymnasium.Env) -> int | None:
    """The episode cap of a single Gymnasium env: its registered spec, else a TimeLimit in its chain."""
    spec = getattr(env, "spec", None)
    if spec is not None and spec.max_episode_steps is not None:
        return int(spec.max_episode_steps)
    layer = env
    for _ in range(64):
        if isinstance(layer, gymnasium.wrappers.TimeLimit):
            return int(layer._max_episode_steps)
        if not hasattr(layer, "env"):
            return None
        layer = layer.env
    return None


def _plan_rendering(plan: _Plan) -> None:
    """Ask the backend for RGB frames (``render_mode="rgb_array"``); EnvIdError where there are none."""
    if plan.backend == "envpool":
        if plan.family in ("mujoco", "dmc", "metaworld"):
            raise EnvIdError(
                f"{plan.env_id!r}: no frames: EnvPool's MuJoCo renderer cannot create a GL context on this machine"
                + (" (use backend='gymnasium' for MuJoCo)" if plan.family == "mujoco" else
                   "; DM Control and Meta-World have no other renderer here"))
        plan.config["render_mode"] = "rgb_array"
    elif plan.factory is not None:
        try:
            takes = "render_mode" in inspect.signature(plan.factory).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            plan.factory = functools.partial(plan.factory, render_mode="rgb_array")
    else:
        plan.config["render_mode"] = "rgb_array"
        plan.render_only_sync = True


def _build_gymnasium(plan: _Plan, num_envs: int, seeds: list[int]) -> tuple[GymnasiumBackend, int | None]:
    if plan.factory is not None:
        factory = plan.factory
        backend = GymnasiumBackend(
            lambda: gymnasium.vector.SyncVectorEnv(
                [factory] * num_envs, copy=False, autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP
            ),
            num_envs,
            seeds,
            per_env_seeds=True,
        )
        return backend, _single_env_max_steps(backend.env.envs[0])
    gym_id, kwargs = plan.task_id, dict(plan.config)
    if not plan.render_only_sync and _vector_entry_accepts(gym_id, kwargs):
        backend = GymnasiumBackend(
            lambda: gymnasium.make_vec(gym_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs),
            num_envs,
            seeds,
            per_env_seeds=False,
        )
        max_steps = kwargs.get("max_episode_steps", registry._gym_registry()[gym_id].max_episode_steps)
        return backend, max_steps
    backend = GymnasiumBackend(
        lambda: gymnasium.vector.SyncVectorEnv(
            [lambda: gymnasium.make(gym_id, **kwargs)] * num_envs,
            copy=False,
            autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP,
        ),
        num_envs,
        seeds,
        per_env_seeds=True,
    )
    return backend, _single_env_max_steps(backend.env.envs[0])


def _single_action_space(space: spaces.Space, env_id: str) -> spaces.Space:
    if isinstance(space, spaces.Discrete):
        if space.start != 0:
            raise EnvIdError(f"{env_id!r}: Discrete action spaces must start at 0, got start={space.start}")
        return spaces.Discrete(int(space.n))
    if isinstance(space, spaces.Box):
        return spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32)
    raise EnvIdError(f"{env_id!r}: unsupported action space {space}; aclab supports Discrete and Box")


LEVEL_CONTROL_DEFAULT_LEVELS = 200  # Gymnasium envs under level control: reset seeds [0, 200) unless set


def _plan_level_control(env_id, options: dict, backend: str, num_envs: int) -> tuple[_Plan, list[int]]:
    """The plan and the finite level set of an env whose level is chosen per episode (see :mod:`.levels`):
    Procgen's training range ``[start_level, start_level + num_levels)``; for Gymnasium envs (ids or factories)
    the reset seeds ``[start_level, start_level + num_levels)`` (options ``start_level`` / ``num_levels``,
    default ``[0, 200)``)."""
    if callable(env_id) and not isinstance(env_id, str):
        start = _check_int("start_level", options.pop("start_level", 0), 0)
        num = _check_int("num_levels", options.pop("num_levels", LEVEL_CONTROL_DEFAULT_LEVELS), 1)
        if options:
            raise EnvIdError(f"options {sorted(options)} are not used with a factory callable; configure the factory")
        name = getattr(env_id, "__name__", type(env_id).__name__)
        return _Plan("gym", f"callable:{name}", "gymnasium", factory=env_id), list(range(start, start + num))
    family, _ = parse_env_id(env_id)
    if family == "procgen":
        plan = _plan(env_id, options, backend, num_envs)
        start, num = plan.config["start_level"], plan.config["num_levels"]
        if num < 1:
            raise EnvIdError(f"{env_id!r}: per-episode level choice needs a finite set of training levels "
                             "(num_levels >= 1, e.g. levels='train'), not the full distribution")
        return plan, list(range(start, start + num))
    if family not in ("classic", "gym", "mujoco", "factory"):
        raise EnvIdError(f"{env_id!r}: per-episode level choice supports Procgen and Gymnasium envs, not {family}")
    if backend == "envpool":
        raise EnvIdError(f"{env_id!r}: per-episode level choice on non-Procgen envs uses Gymnasium; drop "
                         "backend='envpool'")
    start = _check_int("start_level", options.pop("start_level", 0), 0)
    num = _check_int("num_levels", options.pop("num_levels", LEVEL_CONTROL_DEFAULT_LEVELS), 1)
    return _plan(env_id, options, "gymnasium", num_envs), list(range(start, start + num))


def check_level_control(env_id: str, options: dict | None = None, backend: str = "auto",
                        num_envs: int = 1) -> list[int]:
    """The training levels ``make_env(env_id, ..., level_control=True)`` would use; raises :class:`EnvIdError`
    for an env or option set that cannot choose levels per episode. Builds nothing."""
    return _plan_level_control(env_id, dict(options or {}), backend, num_envs)[1]


def _build_level_backend(plan: _Plan, num_envs: int, seeds: list[int], levels: list[int]):
    if plan.family == "procgen":
        return ProcgenLevelBackend(plan.task_id, num_envs, seeds, plan.config, levels), None
    if plan.factory is not None:
        make_single = plan.factory
    else:
        gym_id, kwargs = plan.task_id, dict(plan.config)

        def make_single():
            return gymnasium.make(gym_id, **kwargs)

    backend = GymnasiumLevelBackend(make_single, num_envs, seeds, levels)
    return backend, _single_env_max_steps(backend.envs[0])


def make_env(
    env_id: str | Callable[[], gymnasium.Env],
    num_envs: int,
    seed: int,
    *,
    backend: str = "auto",
    num_threads: int | None = None,
    options: dict | None = None,
    normalize_obs: bool = False,
    obs_clip: float = 10.0,
    normalize_reward: bool = False,
    reward_gamma: float = 0.99,
    reward_clip: float = 10.0,
    obs_scale: float = 1.0,
    level_control: bool = False,
    render: bool = False,
) -> VecEnv:
    """Build ``num_envs`` copies of an environment as one :class:`VecEnv` (not yet reset).

    Args:
        env_id: an aclab id (see :mod:`aclab.envs.registry`: ``"CartPole-v1"``, ``"procgen:bigfish"``,
            ``"atari:Breakout"``, ``"mujoco:HalfCheetah-v4"``, ``"dmc:cheetah-run"``,
            ``"metaworld:reach-v3"``, ``"gym:<Gymnasium id>"``) or a zero-argument factory returning a
            ``gymnasium.Env`` (run in a Gymnasium ``SyncVectorEnv``).
        num_envs: batch size B >= 1.
        seed: master seed (>= 0); per-env seeds are derived from it with ``np.random.SeedSequence``.
        backend: ``"auto"`` (the measured fastest per family, see the module table), ``"envpool"`` or
            ``"gymnasium"``.
        num_threads: EnvPool worker threads (default 1 for classic control, else min(B, cores)).
        options: family options, validated (see the module docstring).
        normalize_obs: per-element running observation normalisation, clipped to ``+-obs_clip``.
        obs_clip: the observation clip (with ``normalize_obs``).
        obs_scale: multiplies the clipped normalised observations (DNA authors' code: clip 5, times 3).
        normalize_reward: reward scaling by the running std of the discounted return with discount
            ``reward_gamma``, clipped to ``+-reward_clip``.
        reward_gamma: the discount of that return.
        reward_clip: the reward clip (with ``normalize_reward``).
        render: make env 0 give RGB frames (:meth:`VecEnv.render`): EnvPool's renderer for classic
            control (then on EnvPool), Atari and Procgen; Gymnasium's ``render_mode="rgb_array"`` for
            Gymnasium ids and MuJoCo (which then runs on the Gymnasium backend); a factory gets
            ``render_mode="rgb_array"`` when it takes that argument. DM Control and Meta-World give no
            frames here (EnvPool's MuJoCo renderer cannot create a GL context on CPU machines).
        level_control: each env plays a level chosen per episode (``VecEnv.set_next_level``; prioritised level
            replay): Procgen over its finite training range, Gymnasium envs with the level as reset seed
            (options ``start_level`` / ``num_levels``, default ``[0, 200)``). See :mod:`aclab.envs.levels`.

    Raises :class:`EnvIdError` (a ValueError) for unknown ids, families, options or backends, and
    ValueError for a bad ``num_envs`` / ``seed`` -- before any env is built.
    """
    num_envs = _check_int("num_envs", num_envs, 1)
    seed = _check_int("seed", seed, 0)
    if backend not in BACKENDS:
        raise EnvIdError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if num_threads is not None:
        num_threads = _check_int("num_threads", num_threads, 0)
    if options is not None and not isinstance(options, dict):
        raise EnvIdError(f"options must be a dict, got {type(options).__name__}")
    options = dict(options or {})

    levels = None
    if level_control and render:
        raise EnvIdError("render=True and level_control=True cannot be combined: make the env for frames without "
                         "level control")
    if level_control:
        plan, levels = _plan_level_control(env_id, options, backend, num_envs)
    elif callable(env_id) and not isinstance(env_id, str):
        if backend == "envpool":
            raise EnvIdError("a factory callable runs on the Gymnasium backend; use backend='auto' or 'gymnasium'")
        if options:
            raise EnvIdError(f"options {sorted(options)} are not used with a factory callable; configure the factory")
        name = getattr(env_id, "__name__", type(env_id).__name__)
        plan = _Plan("gym", f"callable:{name}", "gymnasium", factory=env_id)
    else:
        family = parse_env_id(env_id)[0] if render and backend == "auto" else None
        if family == "mujoco":
            backend = "gymnasium"  # EnvPool's MuJoCo renderer needs a GL context it cannot create on CPUs
        elif family == "classic":
            backend = "envpool"  # renders without pygame (which Gymnasium's classic control needs)
        plan = _plan(env_id, options, backend, num_envs)
    if render:
        _plan_rendering(plan)

    seeds = derive_env_seeds(seed, num_envs)
    if levels is not None:
        backend_obj, max_steps = _build_level_backend(plan, num_envs, seeds, levels)
        if max_steps is None and plan.family == "procgen":
            max_steps = {**registry.envpool_config_defaults(plan.task_id), **plan.config}.get("max_episode_steps")
    elif plan.backend == "envpool":
        threads = default_num_threads(plan.family, num_envs) if num_threads is None else num_threads
        backend_obj: Any = EnvPoolBackend(
            plan.task_id, num_envs, seeds, threads, plan.config, game_over_from_info=plan.game_over_from_info
        )
        max_steps = {**registry.envpool_config_defaults(plan.task_id), **plan.config}.get("max_episode_steps")
    else:
        backend_obj, max_steps = _build_gymnasium(plan, num_envs, seeds)

    try:
        action_space = _single_action_space(backend_obj.single_action_space, plan.env_id)
        obs_space = backend_obj.adapter.observation_space
        obs_shape = tuple(obs_space.shape)
        obs_dtype = backend_obj.adapter.dtype
        obs_normalizer = reward_scaler = None
        if normalize_obs:
            obs_normalizer = ObsNormalizer(obs_shape, clip=obs_clip, scale=obs_scale)
            bound = float(obs_clip) * float(obs_scale)
            obs_space = spaces.Box(-bound, bound, obs_shape, np.float32)
            obs_dtype = np.dtype(np.float32)
        if normalize_reward:
            reward_scaler = RewardScaler(num_envs, gamma=reward_gamma, clip=reward_clip)
        marks = None
        if plan.marks is not None:
            marks = AtariFrameMarks(
                num_envs,
                stack=obs_shape[0],
                num_actions=int(action_space.n),
                max_episode_steps=int(max_steps),
                **plan.marks,
            )
            marks.check_frame_shape(obs_shape[-2], obs_shape[-1])
        spec = EnvSpec(
            env_id=plan.env_id,
            family=plan.family,
            obs_shape=obs_shape,
            obs_dtype=np.dtype(obs_dtype),
            action_space=action_space,
            observation_space=obs_space,
            max_episode_steps=None if max_steps is None else int(max_steps),
            levels=None if levels is None else tuple(levels),
        )
        return VecEnv(backend_obj, spec, seed, obs_normalizer=obs_normalizer, reward_scaler=reward_scaler, marks=marks)
    except Exception:
        backend_obj.close()
        raise
