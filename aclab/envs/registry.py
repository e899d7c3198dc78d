"""Environment ids, families and option validation (pure functions; no env is built here).

Id grammar (see :func:`parse_env_id`):

* ``"CartPole-v1"``, ``"Pendulum-v1"``, ... (a bare classic-control name) -> family ``classic``;
  a bare EnvPool MuJoCo id (``"HalfCheetah-v4"``) -> ``mujoco``; any other bare id registered in
  Gymnasium -> ``gym``.
* ``"classic:CartPole-v1"``, ``"procgen:bigfish"``, ``"atari:Breakout"``, ``"mujoco:HalfCheetah-v4"``,
  ``"dmc:cheetah-run"``, ``"metaworld:reach-v3"``, ``"gym:<registered Gymnasium id>"``.
* Your own environments: ``"gym:<module>:<EnvId>"`` (Gymnasium's ``module:EnvId`` form: ``module`` is
  imported first, so the env registers itself), or ``"factory:<module>:<function>"`` (a zero-argument
  callable returning a ``gymnasium.Env``; ``env.options`` are passed to it as keyword arguments). Modules
  are imported like ``python -m`` does: from ``sys.path``, then from the current directory.
  :func:`import_env_modules` imports a config's ``env.imports`` list (modules that register ids).

Errors are :class:`EnvIdError` (a ``ValueError``) whose message names the bad id or option and lists the
valid choices.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_FAMILIES",
    "EnvIdError",
    "PROCGEN_GAMES",
    "PROCGEN_DISTRIBUTION_MODES",
    "PROCGEN_LEVEL_SETS",
    "PROCGEN_TRAIN_LEVELS",
    "CLASSIC_IDS",
    "ATARI_SETTINGS",
    "EVAL_LEVEL_SETS",
    "LevelRange",
    "parse_env_id",
    "import_env_modules",
    "procgen_eval_levels",
    "procgen_level_range",
    "register_env_factory",
    "resolve_env_factory",
]

ENV_FAMILIES = ("classic", "procgen", "atari", "mujoco", "dmc", "metaworld", "gym", "factory")


class EnvIdError(ValueError):
    """A bad environment id, option name or option value. The message lists the valid choices."""


# The 16 Procgen games and the distribution modes each supports (Cobbe et al. 2020; EnvPool registry).
PROCGEN_DISTRIBUTION_MODES: dict[str, tuple[str, ...]] = {
    "bigfish": ("easy", "hard"),
    "bossfight": ("easy", "hard"),
    "caveflyer": ("easy", "hard", "memory", "exploration"),
    "chaser": ("easy", "hard", "extreme"),
    "climber": ("easy", "hard", "exploration"),
    "coinrun": ("easy", "hard", "exploration"),
    "dodgeball": ("easy", "hard", "extreme", "memory"),
    "fruitbot": ("easy", "hard"),
    "heist": ("easy", "hard", "memory", "exploration"),
    "jumper": ("easy", "hard", "memory", "exploration"),
    "leaper": ("easy", "hard", "extreme", "exploration"),
    "maze": ("easy", "hard", "memory", "exploration"),
    "miner": ("easy", "hard", "memory"),
    "ninja": ("easy", "hard", "exploration"),
    "plunder": ("easy", "hard"),
    "starpilot": ("easy", "hard", "extreme"),
}
PROCGEN_GAMES = tuple(PROCGEN_DISTRIBUTION_MODES)
# Level sets: "train" = levels [0, 200) (the DCPG/PPG protocol), "test" = the full level distribution
# (num_levels=0, what the DCPG authors' code evaluates on), "test-unseen" = levels >= 200 only.
PROCGEN_TRAIN_LEVELS = 200
PROCGEN_LEVEL_SETS = ("train", "test", "test-unseen")
PROCGEN_MAX_LEVEL = 2**31 - 1  # EnvPool draws level seeds in [start_level, start_level + num_levels) <= 2**31 - 1
# Evaluation level sets (relative to a run's training range): "train" = the training range, "test" = the
# full distribution (num_levels = 0, Cobbe et al. 2020 and the DCPG authors' code), "unseen" = levels
# outside the training range only.
EVAL_LEVEL_SETS = ("train", "test", "unseen")


@dataclass(frozen=True)
class LevelRange:
    """Procgen levels ``[start, start + num)``; ``num == 0`` is the full distribution (EnvPool then draws
    any level seed in ``[0, 2**31)`` and ignores ``start``)."""

    start: int
    num: int

    @property
    def full(self) -> bool:
        return self.num == 0

    def contains(self, level: int) -> bool:
        return self.full or self.start <= level < self.start + self.num

    def options(self) -> dict[str, int]:
        """The env options that select exactly this range."""
        return {"start_level": self.start, "num_levels": self.num}

    def __str__(self) -> str:
        return "all levels" if self.full else f"[{self.start}, {self.start + self.num})"


def _level_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EnvIdError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def procgen_level_range(options: dict[str, Any]) -> LevelRange:
    """The levels a Procgen env built with ``options`` plays: ``levels = "train"`` (default) ``[0, 200)``,
    ``"test"`` all levels, ``"test-unseen"`` ``[200, 2**31 - 1)``; explicit ``start_level`` /
    ``num_levels`` override the set's values. Raises :class:`EnvIdError` for bad values."""
    levels = options.get("levels", "train")
    if levels not in PROCGEN_LEVEL_SETS:
        raise EnvIdError(f"levels={levels!r} for Procgen; valid: {', '.join(PROCGEN_LEVEL_SETS)}")
    start = _level_int("start_level", options.get("start_level", PROCGEN_TRAIN_LEVELS if levels == "test-unseen"
                                                       else 0))
    default_num = {"train": PROCGEN_TRAIN_LEVELS, "test": 0, "test-unseen": max(PROCGEN_MAX_LEVEL - start, 0)}
    num = _level_int("num_levels", options.get("num_levels", default_num[levels]))
    if start + num > PROCGEN_MAX_LEVEL:
        raise EnvIdError(f"start_level + num_levels must be <= 2**31-1 for Procgen, got {start} + {num}")
    return LevelRange(start, num)


def procgen_eval_levels(train_options: dict[str, Any], which: str) -> LevelRange:
    """The evaluation level set ``which`` for a run trained with env options ``train_options``.

    ``"train"``: the training range itself. ``"test"``: the full distribution (``num_levels = 0``), the
    protocol of Cobbe et al. (2020) and the DCPG authors' code: it contains the training levels (a
    fraction ``n / 2**31`` of the draws). ``"unseen"``: levels guaranteed outside the training range
    ``[s, s + n)``: ``[s + n, 2**31 - 1)``, or ``[0, s)`` when the range reaches the top. A run trained on
    the full distribution has no unseen level: :class:`EnvIdError`.
    """
    if which not in EVAL_LEVEL_SETS:
        raise EnvIdError(f"evaluation levels {which!r}; valid: {', '.join(EVAL_LEVEL_SETS)}")
    train = procgen_level_range(train_options)
    if which == "train":
        return train
    if which == "test":
        return LevelRange(0, 0)
    if train.full:
        raise EnvIdError("evaluation levels 'unseen': the run trains on the full level distribution "
                         "(num_levels = 0), so no level is unseen; use eval.levels = 'test'")
    end = train.start + train.num
    if end < PROCGEN_MAX_LEVEL:
        return LevelRange(end, PROCGEN_MAX_LEVEL - end)
    return LevelRange(0, train.start)

# Classic-control ids served by EnvPool (always) and Gymnasium (LunarLander needs Box2D there).
CLASSIC_IDS = (
    "CartPole-v0",
    "CartPole-v1",
    "Pendulum-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "LunarLander-v3",
    "LunarLanderContinuous-v3",
)

ATARI_SETTINGS = ("easy", "hard", "envpool")

# EnvPool config keys that the env layer sets itself (never user options).
_ENVPOOL_RESERVED_KEYS = frozenset(
    {
        "num_envs",
        "batch_size",
        "num_threads",
        "max_num_players",
        "thread_affinity_offset",
        "base_path",
        "seed",
        "env_seed",
        "gym_reset_return_info",
        "env_name",
        "channel_first",
        "task",
        "task_name",
        "reward_threshold",
    }
)


def _choices(values: Any, limit: int = 0) -> str:
    values = list(values)
    if limit and len(values) > limit:
        return ", ".join(map(str, values[:limit])) + f", ... ({len(values)} in all)"
    return ", ".join(map(str, values))


def _closest(name: str, values: Any) -> str:
    close = difflib.get_close_matches(name, list(values), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _squash(name: str) -> str:
    """Lower-case and drop separators: 'ball_in_cup-catch' -> 'ballincupcatch'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def envpool_ids(import_path: str) -> tuple[str, ...]:
    """EnvPool task ids registered by one EnvPool module (e.g. 'envpool.mujoco.dmc'), in registry order."""
    try:
        from envpool.registration import registry
    except ImportError:  # pragma: no cover - envpool is a hard dependency
        return ()
    return tuple(task for task, (path, _, _) in registry.specs.items() if path == import_path)


@functools.cache
def _atari_games() -> dict[str, str]:
    """lower-case game name -> EnvPool task id ('breakout' -> 'Breakout-v5')."""
    return {task[: -len("-v5")].lower(): task for task in envpool_ids("envpool.atari") if task.endswith("-v5")}


@functools.cache
def _mujoco_ids() -> tuple[str, ...]:
    return envpool_ids("envpool.mujoco.gym")


@functools.cache
def _dmc_ids() -> dict[str, str]:
    """squashed 'domaintask' -> EnvPool id ('cheetahrun' -> 'CheetahRun-v1')."""
    return {_squash(task[: -len("-v1")]): task for task in envpool_ids("envpool.mujoco.dmc")}


@functools.cache
def _metaworld_ids() -> dict[str, str]:
    """squashed 'taskv3' -> EnvPool id ('reachv3' -> 'MetaWorld/Reach-v3')."""
    return {_squash(task.split("/", 1)[1]): task for task in envpool_ids("envpool.mujoco.metaworld")}


def _gym_registry() -> dict[str, Any]:
    import gymnasium

    return gymnasium.registry


def _dmc_display(task: str) -> str:
    """'CheetahRun-v1' -> 'CheetahRun' (for error listings)."""
    return task[: -len("-v1")]


def parse_env_id(env_id: str) -> tuple[str, str]:
    """Split an aclab env id into ``(family, name)`` and validate it; raises :class:`EnvIdError`.

    ``name`` is the canonical backend name: the Procgen game ('bigfish'), EnvPool's task id for Atari
    ('Breakout-v5'), MuJoCo ('HalfCheetah-v4'), DM Control ('CheetahRun-v1') and Meta-World
    ('MetaWorld/Reach-v3'), and the Gymnasium id for 'classic' and 'gym'.
    """
    if not isinstance(env_id, str) or not env_id.strip():
        raise EnvIdError(f"env id must be a non-empty string, got {env_id!r}")
    env_id = env_id.strip()
    if ":" not in env_id:
        return _parse_bare(env_id)
    family, _, name = env_id.partition(":")
    family = family.strip().lower()
    name = name.strip()
    if family not in ENV_FAMILIES:
        raise EnvIdError(
            f"unknown env family {family!r} in {env_id!r}; valid families: {_choices(ENV_FAMILIES)}"
            f" (e.g. 'procgen:bigfish', 'atari:Breakout', 'dmc:cheetah-run'; your own env in module"
            f" {env_id.partition(':')[0]!r}: 'gym:{env_id}')"
        )
    if not name:
        raise EnvIdError(f"env id {env_id!r} names no environment after '{family}:'")
    return family, _PARSERS[family](name)


def _parse_bare(name: str) -> tuple[str, str]:
    if name in CLASSIC_IDS:
        return "classic", name
    if name in _mujoco_ids():
        return "mujoco", name
    if name in _gym_registry():
        return "gym", name
    candidates = list(CLASSIC_IDS) + list(_mujoco_ids())
    raise EnvIdError(
        f"unknown env id {name!r}: not a classic-control name ({_choices(CLASSIC_IDS)}), not an EnvPool MuJoCo"
        f" id and not a registered Gymnasium id.{_closest(name, candidates)} Other families use a prefix:"
        f" {_choices(f + ':' for f in ENV_FAMILIES)}"
    )


def _parse_classic(name: str) -> str:
    if name in CLASSIC_IDS:
        return name
    raise EnvIdError(
        f"unknown classic-control id {name!r}; valid: {_choices(CLASSIC_IDS)}.{_closest(name, CLASSIC_IDS)}"
    )


def _parse_procgen(name: str) -> str:
    game = name.lower()
    if game in PROCGEN_GAMES:
        return game
    raise EnvIdError(
        f"unknown Procgen game {name!r}; the 16 Procgen games are: {_choices(PROCGEN_GAMES)}."
        f"{_closest(game, PROCGEN_GAMES)} (choose the level set and difficulty with options"
        f" levels=..., distribution_mode=...)"
    )


def _parse_atari(name: str) -> str:
    games = _atari_games()
    key = name.lower()
    if key.endswith("-v5"):
        key = key[: -len("-v5")]
    if key in games:
        return games[key]
    display = sorted(task[: -len("-v5")] for task in games.values())
    raise EnvIdError(f"unknown Atari game {name!r}.{_closest(name, display)} Valid games: {_choices(display)}")


def _parse_mujoco(name: str) -> str:
    # an exact Gymnasium MuJoCo id needs no EnvPool import (~115 MB of resident memory with its other
    # families' modules): a run of <= 2 envs never loads EnvPool at all
    if name in _gym_registry() and "mujoco" in str(_gym_registry()[name].entry_point):
        return name
    ids = _mujoco_ids()
    if name in ids:
        return name
    versions = sorted(task for task in ids if task.lower().startswith(name.lower() + "-v"))
    if versions and "-v" not in name:
        preferred = [task for task in versions if task.endswith("-v4")]
        return preferred[0] if preferred else versions[-1]
    raise EnvIdError(f"unknown MuJoCo id {name!r}.{_closest(name, ids)} Valid: {_choices(ids)}")


def _parse_dmc(name: str) -> str:
    ids = _dmc_ids()
    key = _squash(name[: -len("-v1")] if name.lower().endswith("-v1") else name)
    if key in ids:
        return ids[key]
    display = [_dmc_display(task) for task in ids.values()]
    raise EnvIdError(
        f"unknown DM Control task {name!r} (write 'domain-task', e.g. 'cheetah-run', 'ball_in_cup-catch')."
        f"{_closest(name, display)} Valid: {_choices(display)}"
    )


def _parse_metaworld(name: str) -> str:
    ids = _metaworld_ids()
    key = _squash(name)
    if key in ids:
        return ids[key]
    if key + "v3" in ids:
        return ids[key + "v3"]
    display = [task.split("/", 1)[1] for task in ids.values()]
    raise EnvIdError(
        f"unknown Meta-World task {name!r} (e.g. 'reach-v3', 'button-press-topdown-v3')."
        f"{_closest(name, display)} Valid: {_choices(display)}"
    )


def _parse_gym(name: str) -> str:
    """``EnvId`` or Gymnasium's ``module:EnvId`` (``module`` is imported first); returns ``EnvId``."""
    if ":" in name:
        module, _, name = name.partition(":")
        import_env_modules([module], what=f"'gym:{module}:{name}'")
    registry = _gym_registry()
    if name in registry:
        return name
    raise EnvIdError(
        f"{name!r} is not a registered Gymnasium id. Name the module that registers it: 'gym:<module>:{name}'"
        f" or env.imports = ['<module>'] (an env registered in a script cannot be re-created by"
        f" 'aclab eval' or '--resume').{_closest(name, registry.keys())}"
    )


# ----------------------------------------------------------------------------------------------------
# Your own environments: imported modules and env factories
# ----------------------------------------------------------------------------------------------------
# Factories that cannot be imported by path (a lambda, a function of a script run as __main__): usable
# in this process only, under the id "factory:<module>:<qualname>".
_LOCAL_FACTORIES: dict[str, Callable[..., Any]] = {}


def _import(module: str, what: str):
    """Import ``module`` from ``sys.path``, else from the current directory (as ``python -m`` would)."""
    if not isinstance(module, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
        raise EnvIdError(f"{what}: {module!r} is not a module name (e.g. 'corridor' or 'mypackage.envs')")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        cwd = os.getcwd()
        if exc.name != top or cwd in sys.path or not (
            os.path.exists(os.path.join(cwd, top + ".py")) or os.path.isdir(os.path.join(cwd, top))
        ):
            raise EnvIdError(
                f"{what}: cannot import module {module!r} ({exc}); install it or put its folder on PYTHONPATH"
            ) from exc
    sys.path.append(cwd)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EnvIdError(f"{what}: cannot import module {module!r} ({exc})") from exc


def import_env_modules(modules: Iterable[str], what: str = "env.imports") -> None:
    """Import each module (e.g. ``env.imports``) so that the Gymnasium ids it registers can be made.

    Raises :class:`EnvIdError` naming ``what`` and the module when one cannot be imported.
    """
    for module in modules or ():
        _import(module, what)


def _qualified(obj: Any) -> str | None:
    """``"module:qualname"`` when ``obj`` can be imported back by that path, else None."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is obj else None


def register_env_factory(factory: Callable[..., Any]) -> str:
    """The env id ``"factory:<module>:<qualname>"`` of a zero-argument callable returning a ``gymnasium.Env``.

    A module-level function (or class) of an importable module is found again by that path in any process
    (``aclab eval``, ``--resume``, actor processes). Anything else (a lambda, a closure, a function of a
    script run as ``__main__``) is remembered in this process only: later commands on the run need the
    same factory again (``train(..., env_factory=...)``).
    """
    if not callable(factory):
        raise EnvIdError(f"an env factory must be callable, got {type(factory).__name__}")
    path = _qualified(factory)
    if path is None:
        module = getattr(factory, "__module__", None) or "__main__"
        name = getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or type(factory).__name__
        path = f"{module}:{name}"
        _LOCAL_FACTORIES[path] = factory
    return f"factory:{path}"


def resolve_env_factory(path: str) -> Callable[..., Any]:
    """The callable of a ``"module:qualname"`` factory path (see :func:`register_env_factory`)."""
    if path in _LOCAL_FACTORIES:
        return _LOCAL_FACTORIES[path]
    module, sep, qualname = path.partition(":")
    if not sep or not qualname:
        raise EnvIdError(f"env factory {path!r}: expected 'factory:<module>:<function>', e.g. 'factory:corridor:make'")
    if module == "__main__" or "<" in qualname:
        raise EnvIdError(
            f"env factory {path!r} was defined in a script or as a lambda and cannot be imported here: pass it"
            " again (train(..., env_factory=...)) or move it to a module and use 'factory:<module>:<function>'"
        )
    found: Any = _import(module, f"'factory:{path}'")
    for part in qualname.split("."):
        if not hasattr(found, part):
            raise EnvIdError(f"env factory 'factory:{path}': module {module!r} has no attribute {qualname!r}")
        found = getattr(found, part)
    if not callable(found):
        raise EnvIdError(f"env factory 'factory:{path}' is not callable ({type(found).__name__})")
    return found


def _parse_factory(name: str) -> str:
    resolve_env_factory(name)
    return name


_PARSERS = {
    "classic": _parse_classic,
    "procgen": _parse_procgen,
    "atari": _parse_atari,
    "mujoco": _parse_mujoco,
    "dmc": _parse_dmc,
    "metaworld": _parse_metaworld,
    "gym": _parse_gym,
    "factory": _parse_factory,
}


# ----------------------------------------------------------------------------------------------------
# Option validation
# ----------------------------------------------------------------------------------------------------


def envpool_config_defaults(task_id: str) -> dict[str, Any]:
    """EnvPool's default config for ``task_id`` minus the keys the env layer controls."""
    import envpool

    config = envpool.make_spec(task_id).config
    items = config._asdict() if hasattr(config, "_asdict") else dict(config)
    return {k: v for k, v in items.items() if k not in _ENVPOOL_RESERVED_KEYS}


def check_option_keys(env_id: str, options: dict[str, Any], allowed: Any) -> None:
    """Raise :class:`EnvIdError` naming each unknown key and listing the allowed ones."""
    allowed = sorted(set(allowed))
    unknown = [k for k in options if k not in allowed]
    if unknown:
        hints = "".join(_closest(k, allowed) for k in unknown)
        raise EnvIdError(f"unknown option(s) {unknown} for {env_id!r}; allowed options: {_choices(allowed)}.{hints}")


def coerce_option(env_id: str, key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of EnvPool's ``default`` (bool/int/float/str) or raise EnvIdError."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
    elif kind is int:
        if isinstance(value, (int,)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise EnvIdError(f"option {key}={value!r} for {env_id!r} must be of type {kind.__name__} (default {default!r})")


def gym_constructor_keys(gym_id: str) -> tuple[set[str], bool]:
    """Keyword arguments accepted by a Gymnasium id's constructor, and whether it takes ``**kwargs``."""
    from gymnasium.envs.registration import load_env_creator

    spec = _gym_registry()[gym_id]
    keys = set(spec.kwargs)
    try:
        creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
        signature = inspect.signature(creator)
    except Exception:  # entry point not importable here (missing extra): accept only the spec's own kwargs
        return keys, False
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    keys.update(
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and name != "self"
    )
    return keys, var_kw
