"""Typed run configuration, presets and ``key=value`` overrides with clear validation errors.

A run's configuration has three parts:

* top-level fields (:class:`Config`): algorithm name, seed, step budget, device, logging;
* ``env``: which environment and how it is wrapped (:class:`EnvConfig`);
* ``eval``: periodic and final evaluation (:class:`EvalConfig`); ``logging``: episodes.csv, progress
  lines, Weights & Biases (:class:`LoggingConfig`);
* ``divergence``: warnings for a blown-up run (:class:`DivergenceConfig`);
* ``params``: the algorithm's own dataclass (e.g. :class:`aclab.algos.ppo.PPOConfig`).

Presets are TOML files in ``aclab/presets/`` holding the papers' hyperparameter tables. Overrides use
dotted keys (``env.num_envs=8``, ``params.lr=3e-4``, ``env.options.levels=test`` for an entry of a
nested table); a bare key (``lr=3e-4``) is looked up at the top
level, then in ``params``, then in ``env``. Every unknown key, unknown preset or invalid value raises
:class:`ConfigError` with one line naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = ("env", "eval", "logging", "divergence", "params")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    """A configuration problem: the message names the key and the valid choices."""


@dataclass
class EnvConfig:
    """Which environment to train on and how it is wrapped (see :func:`aclab.envs.make_env`).

    ``imports``: modules imported before the env is made (modules that register your own Gymnasium ids),
    saved with the run so that ``--resume``, ``aclab eval`` and ``aclab analyze`` find the env again.
    """

    id: str = "CartPole-v1"
    imports: list[str] = field(default_factory=list)
    num_envs: int = 4
    backend: Literal["auto", "envpool", "gymnasium"] = "auto"
    num_threads: int | None = None
    options: dict = field(default_factory=dict)
    normalize_obs: bool = False
    obs_clip: float = 10.0
    obs_scale: float = 1.0  # normalised observations: clip(., +-obs_clip) * obs_scale (DNA authors: 5 and 3)
    normalize_reward: bool = False
    reward_gamma: float = 0.99
    reward_clip: float = 10.0

    def validate(self) -> None:
        require(self.num_envs >= 1, "env.num_envs", self.num_envs, "an integer >= 1")
        for module in self.imports:
            require(bool(_MODULE_NAME.fullmatch(module)), "env.imports", self.imports,
                    "a list of module names, e.g. ['corridor', 'mypackage.envs']")
        require(self.obs_clip > 0, "env.obs_clip", self.obs_clip, "a number > 0")
        require(self.obs_scale > 0, "env.obs_scale", self.obs_scale, "a number > 0")
        require(self.reward_clip > 0, "env.reward_clip", self.reward_clip, "a number > 0")
        require(0.0 <= self.reward_gamma <= 1.0, "env.reward_gamma", self.reward_gamma, "a number in [0, 1]")
        require(self.num_threads is None or self.num_threads >= 0, "env.num_threads", self.num_threads,
                "an integer >= 0 or None")


@dataclass
class EvalConfig:
    """Periodic and final evaluation on separate env instances (see :mod:`aclab.evaluate.policy`).

    ``every_steps`` / ``every_iterations``: evaluate when that many env steps have passed since the last
    evaluation / at every that many-th iteration (0: off; either can trigger; the DCPG authors evaluate
    every 10 updates); there is always a final evaluation. ``split``: ``train`` (Procgen: the training
    levels), ``test`` (held-out) or ``both``. ``levels``: the held-out Procgen levels of the test split,
    ``"test"`` = the full distribution (Cobbe et al. 2020; the DCPG authors' code) or ``"unseen"`` =
    levels outside the training range only. ``seeding``: ``"fixed"`` (the same env seeds, so the same
    Procgen levels, at every evaluation) or ``"fresh"`` (new ones each time, the DCPG authors' curves).
    """

    every_steps: int = 0
    every_iterations: int = 0
    episodes: int = 10
    num_envs: int = 8
    split: Literal["test", "train", "both"] = "test"
    levels: Literal["test", "unseen"] = "test"
    seeding: Literal["fixed", "fresh"] = "fixed"
    deterministic: bool = False

    def validate(self) -> None:
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "an integer >= 0 (0: only at the end)")
        require(self.every_iterations >= 0, "eval.every_iterations", self.every_iterations,
                "an integer >= 0 (0: off)")
        require(self.episodes >= 0, "eval.episodes", self.episodes, "an integer >= 0 (0: no evaluation)")
        require(self.num_envs >= 1, "eval.num_envs", self.num_envs, "an integer >= 1")


@dataclass
class DivergenceConfig:
    """Warnings for a run whose training has blown up (checked on every logged row; 0 turns a check off):
    a value/critic loss above ``value_loss_max``, a policy KL (``approx_kl`` / ``kl``) above ``kl_max``,
    or, with discrete actions, a policy entropy below ``entropy_min`` (a collapsed policy). ``stop``
    ends the run as ``failed`` instead of only warning."""

    value_loss_max: float = 1e10
    kl_max: float = 100.0
    entropy_min: float = 1e-4
    stop: bool = False

    def validate(self) -> None:
        for name in ("value_loss_max", "kl_max", "entropy_min"):
            require(getattr(self, name) >= 0, f"divergence.{name}", getattr(self, name), "a number >= 0 (0: off)")


@dataclass
class LoggingConfig:
    """What a run logs besides metrics.csv / metrics.jsonl / evals.csv / TensorBoard.

    ``episodes``: write ``episodes.csv``, one row per finished training episode. ``progress_every_s``: when
    the output is not a terminal (nohup, batch jobs), print a plain progress line this often (0: every
    iteration). ``wandb``: mirror metrics and evaluations to Weights & Biases (``pip install 'aclab[wandb]'``);
    ``wandb_mode = "offline"`` writes the W&B files under the run directory without a network.
    ``learning_curve``: draw ``learning_curve.png`` when the run ends (matplotlib: ~27 MB more resident memory
    at the end of a MuJoCo run; ``aclab.plots.plot_learning_curve(run_dir)`` draws it later).
    """

    episodes: bool = True
    learning_curve: bool = True
    progress_every_s: float = 30.0
    wandb: bool = False
    wandb_project: str = "aclab"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_mode: Literal["online", "offline"] = "online"

    def validate(self) -> None:
        require(self.progress_every_s >= 0, "logging.progress_every_s", self.progress_every_s,
                "a number of seconds >= 0 (0: a line every iteration)")
        require(bool(self.wandb_project), "logging.wandb_project", self.wandb_project, "a non-empty project name")


@dataclass
class Config:
    """The full, resolved configuration of one run (saved as ``config.json`` in the run directory).

    ``torch_threads = 0`` is automatic (:func:`aclab.core.threads.default_threads`): one thread, all
    cores for image observations on CPU. A checkpoint is written every ``checkpoint_every_iterations``
    iterations and, for long iterations, at the first iteration boundary ``checkpoint_every_minutes``
    after the last one (0 turns either off; the end of the run is always checkpointed).
    ``world_size``: the number of data-parallel ranks the run trains with (recorded from the ``torchrun``
    launch; a run keeps it when resumed). ``flush_denormal`` (default true): compute on the CPU with
    numbers below float32's smallest normal (1.2e-38) flushed to zero
    (:func:`aclab.core.threads.flush_denormals`): Adam's moments of weights whose gradient stays 0 decay into
    that range, where the CPU is many times slower (docs/performance.md, "Denormal numbers"); false keeps
    IEEE denormals. A run keeps it when resumed (runs saved before the key existed resume with false).
    """

    algo: str = "ppo"
    preset: str | None = None
    seed: int = 1
    total_steps: int = 100_000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = 0
    deterministic_torch: bool = False
    flush_denormal: bool = True
    log_every_iterations: int = 1
    checkpoint_every_iterations: int = 10
    checkpoint_every_minutes: float = 10.0
    keep_checkpoints: int = 2
    progress: bool = True
    world_size: int = 1  # data-parallel ranks (set by a torchrun launch, see aclab.distributed)
    env: EnvConfig = field(default_factory=EnvConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    params: Any = None

    def validate(self) -> None:
        require(self.total_steps >= 1, "total_steps", self.total_steps, "an integer >= 1")
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        require(self.torch_threads >= 0, "torch_threads", self.torch_threads, "an integer >= 0 (0: automatic)")
        require(self.log_every_iterations >= 1, "log_every_iterations", self.log_every_iterations, "an integer >= 1")
        require(self.checkpoint_every_iterations >= 0, "checkpoint_every_iterations",
                self.checkpoint_every_iterations, "an integer >= 0 (0: only at the end)")
        require(self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", self.checkpoint_every_minutes,
                "a number >= 0 (0: off)")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        require(self.world_size >= 1, "world_size", self.world_size, "an integer >= 1 (set by torchrun)")
        self.env.validate()
        self.eval.validate()
        self.divergence.validate()
        self.logging.validate()
        if self.params is not None and hasattr(self.params, "validate"):
            self.params.validate()
        if self.params is not None and hasattr(self.params, "validate_with"):  # checks across sections
            self.params.validate_with(self)
        num_minibatches = getattr(self.params, "num_minibatches", None)
        num_steps = getattr(self.params, "num_steps", None)
        if isinstance(num_minibatches, int) and isinstance(num_steps, int):
            batch = num_steps * self.env.num_envs
            require(num_minibatches <= batch, "params.num_minibatches", num_minibatches,
                    f"at most the batch of params.num_steps x env.num_envs = {num_steps} x {self.env.num_envs} = "
                    f"{batch} transitions")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=list)


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` ``"key=value is invalid: expected <allowed>"`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"invalid value {key}={value!r}: expected {allowed}")


# ----------------------------------------------------------------------------------------------
# Coercion of values against dataclass field types
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (a parsed TOML value or a command-line string) to field type ``tp``.

    Supports bool, int, float, str, None, Literal, unions with None, tuple[...] and list[...] and dict.
    Raises ConfigError naming ``key`` and the expected type or allowed values.
    """
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"invalid value {key}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"invalid value {key}={value!r}: expected {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"invalid value {key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value {key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"invalid value {key}={value!r}: expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"invalid value {key}={value!r}: expected a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"invalid value {key}={value!r}: expected a string")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            if not text.startswith("["):
                text = "[" + text + "]"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                args = typing.get_args(tp)
                if not (args and args[0] is str):
                    raise ConfigError(f"invalid value {key}={value!r}: expected a list like [64, 64]") from exc
                value = [item.strip() for item in text[1:-1].split(",") if item.strip()]  # [a, b] unquoted
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid value {key}={value!r}: expected a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [coerce(f"{key}[{i}]", v, item_tp) if item_tp is not Any else v for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"invalid value {key}={value!r}: expected a JSON object") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value {key}={value!r}: expected a table/object")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _fields(obj_or_cls: Any) -> dict[str, Any]:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, section: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f" in [{section}]" if section else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}; valid keys: {', '.join(sorted(valid))}")


def apply_table(obj: Any, table: dict, section: str = "") -> None:
    """Set fields of dataclass ``obj`` from a (nested) dict, validating every key and value."""
    fields = _fields(obj)
    for name, value in table.items():
        full = f"{section}.{name}" if section else name
        if name not in fields:
            raise _unknown_key(full, section, list(fields))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, dict):
                raise ConfigError(f"invalid value {full}={value!r}: expected a table of keys")
            apply_table(current, value, full)
        else:
            setattr(obj, name, coerce(full, value, fields[name]))


def set_key(config: Config, key: str, raw_value: Any) -> None:
    """Apply one override ``key=value`` (``key`` dotted or bare) to ``config`` in place."""
    parts = key.split(".")
    if len(parts) == 1:
        for target, section in ((config, ""), (config.params, "params"), (config.env, "env"), (config.eval, "eval"),
                                (config.logging, "logging"), (config.divergence, "divergence")):
            if target is not None and key in _fields(target) and not dataclasses.is_dataclass(getattr(target, key)):
                apply_table(target, {key: raw_value}, section)
                return
        valid = [k for k, v in _fields(config).items() if not dataclasses.is_dataclass(getattr(config, k))]
        valid = [k for k in valid if k != "params"]
        valid += [f"params.{k}" for k in _fields(config.params)] if config.params is not None else []
        valid += [f"env.{k}" for k in _fields(config.env)] + [f"eval.{k}" for k in _fields(config.eval)]
        valid += [f"logging.{k}" for k in _fields(config.logging)]
        valid += [f"divergence.{k}" for k in _fields(config.divergence)]
        raise _unknown_key(key, "", valid)
    head = parts[0]
    if head not in SECTIONS:
        raise ConfigError(f"unknown config section {head!r} in {key!r}; valid sections: {', '.join(SECTIONS)}")
    target = getattr(config, head)
    if target is None:
        raise ConfigError(f"{key!r}: this algorithm has no parameters")
    section = head
    for depth, name in enumerate(parts[1:-1], start=1):  # walk down to the parent of the last part
        if isinstance(target, dict):
            child = target.get(name)
            if child is None:
                child = target[name] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{key!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a table")
            target = child
        else:
            fields = _fields(target)
            if name not in fields:
                raise _unknown_key(".".join(parts[:depth + 1]), section, list(fields))
            child = getattr(target, name)
            if not (isinstance(child, dict) or (dataclasses.is_dataclass(child) and not isinstance(child, type))):
                raise ConfigError(f"{key!r}: {'.'.join(parts[:depth + 1])} is a value, not a table")
            target = child
        section = ".".join(parts[:depth + 1])
    if isinstance(target, dict):  # a free-form table (env.options): scalars from the command line are parsed
        target[parts[-1]] = parse_scalar(raw_value)
        return
    apply_table(target, {parts[-1]: raw_value}, section)


def parse_scalar(value: Any) -> Any:
    """A command-line string for a free-form table entry as TOML would read it: ``200`` -> int,
    ``0.5`` -> float, ``true`` -> bool, ``[1, 2]`` / ``{...}`` -> JSON; anything else stays a string
    (``test``). Non-strings (from a preset or a dict of overrides) are returned unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return value


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"key=value"``; raise ConfigError for anything else."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: expected key=value, e.g. params.lr=3e-4")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"invalid override {text!r}: empty key")
    return key, value.strip()


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
def list_presets() -> dict[str, dict]:
    """All presets: name -> {"algo", "description", "path"}."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.toml")):
        try:
            data = load_toml(path)
        except ConfigError as exc:  # one unreadable file must not break every other preset
            out[path.stem] = {"algo": None, "description": f"unreadable: {exc}", "path": path}
            continue
        out[path.stem] = {"algo": data.get("algo"), "description": data.get("description", ""), "path": path}
    return out


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc


def load_preset(name_or_path: str) -> tuple[str, dict]:
    """Return (preset name, table) for a preset name or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path.stem, load_toml(path)
    presets = list_presets()
    if name_or_path not in presets:
        close = difflib.get_close_matches(name_or_path, list(presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name_or_path!r}{hint}; valid presets: {', '.join(presets)}")
    return name_or_path, load_toml(presets[name_or_path]["path"])


def config_from_table(table: dict, params_cls: type) -> Config:
    """Build a Config from a preset-like table (``algo``, top-level keys, [env], [eval], [params])."""
    table = dict(table)
    table.pop("description", None)
    params = params_cls()
    config = Config(params=params)
    params_table = table.pop("params", {})
    apply_table(config, table)
    apply_table(params, params_table, "params")
    return config


def config_from_dict(data: dict, params_cls: type) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. a run directory's config.json)."""
    return config_from_table(data, params_cls)


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------
# Keys a resume may change: they do not alter what the checkpoint's state means (a section name covers
# all of its keys). Everything else (algo, seed, env, params, device) is fixed by the checkpoint.
RESUMABLE_KEYS = ("total_steps", "torch_threads", "progress", "log_every_iterations", "checkpoint_every_iterations",
                  "checkpoint_every_minutes", "keep_checkpoints", "env.num_threads", "eval", "divergence", "logging")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name.split(".")[0] in SECTIONS and name != "env.options":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_resume_changes(saved: Config, new: Config) -> list[str]:
    """The keys that differ between the saved and the resumed config; ConfigError if one of them cannot
    change on resume (names it and the keys that can)."""
    before, after = _flatten(json.loads(saved.to_json())), _flatten(json.loads(new.to_json()))
    changed = [k for k in after if before.get(k) != after[k]]
    fixed = [k for k in changed if k not in RESUMABLE_KEYS and k.split(".")[0] not in RESUMABLE_KEYS]
    if fixed:
        raise ConfigError(
            f"cannot change {', '.join(fixed)} on resume: the checkpoint holds state trained with the saved "
            f"value; keys that may change: {', '.join(k + ('.*' if k in SECTIONS else '') for k in RESUMABLE_KEYS)}")
    return changed
