"""Algorithm names -> classes (imported lazily) and the default preset for an env family."""

from __future__ import annotations

import difflib
import importlib

from aclab.config import ConfigError, list_presets

# name -> (module, class, one-line description)
ALGORITHMS: dict[str, tuple[str, str, str]] = {
    "ppo": ("aclab.algos.ppo", "PPO", "Proximal Policy Optimization (clipped surrogate), the papers' baseline"),
}

# env family -> preset suffix used when no --preset is given
FAMILY_PRESET = {
    "classic": "classic",
    "gym": "classic",
    "mujoco": "mujoco",
    "dmc": "mujoco",
    "metaworld": "mujoco",
    "procgen": "procgen",
    "atari": "atari",
}


def get_algorithm(name: str) -> type:
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown algorithm {name!r}{hint}; valid algorithms: {', '.join(ALGORITHMS)}")
    module, cls, _ = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)


def default_preset(algo: str, family: str, discrete: bool) -> str | None:
    """``<algo>-<family>`` when such a preset exists (classic control with continuous actions
    uses the MuJoCo preset), else None."""
    suffix = FAMILY_PRESET.get(family)
    if family in ("classic", "gym") and not discrete:
        suffix = "mujoco"
    name = f"{algo}-{suffix}"
    return name if name in list_presets() else None


def build(config, env_spec, device):
    return get_algorithm(config.algo)(config, env_spec, device)
