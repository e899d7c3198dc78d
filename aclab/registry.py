"""Algorithm names -> classes, and the default preset for an env family.

Each module in :data:`ALGORITHM_MODULES` declares ``ALGORITHMS = {name: Entry(...)}``. A name can
be a variant of a class with fixed parameter defaults (e.g. ``ddcpg`` is ``DCPG`` with its dynamics
discriminator on): the entry's ``defaults`` are applied before presets and overrides.
"""

from __future__ import annotations

import difflib
import importlib

from aclab.algos.common import Entry
from aclab.config import ConfigError, list_presets

ALGORITHM_MODULES = (
    "aclab.algos.ppo",
    "aclab.algos.ppg",
    "aclab.algos.dcpg",
    "aclab.algos.daac",
    "aclab.algos.drac",
    "aclab.algos.plr",
    "aclab.algos.dna",
    "aclab.algos.fixpo",
    "aclab.algos.impala",
    "aclab.algos.stac",
    "aclab.algos.td3",
    "aclab.algos.sac",
    "aclab.algos.maml",
    "aclab.algos.pearl",
)


# env family -> preset suffix used when no --preset is given
FAMILY_PRESET = {
    "classic": "classic",
    "gym": "classic",
    "mujoco": "mujoco",
    "dmc": "mujoco",
    "metaworld": "metaworld",
    "procgen": "procgen",
    "atari": "atari",
}


def all_algorithms() -> dict[str, Entry]:
    """Every registered name (modules not present in this installation are skipped)."""
    found: dict[str, Entry] = {}
    for module_name in ALGORITHM_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        found.update(getattr(module, "ALGORITHMS", {}))
    return found


def get_entry(name: str) -> Entry:
    # import modules in order and stop at the first that declares ``name``: training one algorithm
    # never depends on the others' modules
    for module_name in ALGORITHM_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        if name in getattr(module, "ALGORITHMS", {}):
            return module.ALGORITHMS[name]
    algorithms = all_algorithms()
    if name not in algorithms:
        close = difflib.get_close_matches(name, list(algorithms), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown algorithm {name!r}{hint}; valid algorithms: {', '.join(algorithms)}")
    return algorithms[name]


def get_algorithm(name: str) -> type:
    return get_entry(name).cls


def default_preset(algo: str, family: str, discrete: bool) -> str | None:
    """``<prefix>-<family>`` when such a preset exists, else None. Classic control with continuous
    actions uses the MuJoCo preset; MetaWorld falls back to MuJoCo when it has no preset of its own."""
    prefix = get_entry(algo).preset_prefix or algo
    suffix = FAMILY_PRESET.get(family)
    if family in ("classic", "gym") and not discrete:
        suffix = "mujoco"
    presets = list_presets()
    for candidate in (f"{prefix}-{suffix}", f"{prefix}-mujoco" if suffix == "metaworld" else None):
        if candidate and candidate in presets:
            return candidate
    return None


def build(config, env_spec, device):
    return get_algorithm(config.algo)(config, env_spec, device)
