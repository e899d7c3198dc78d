"""Score normalisations of the papers: Procgen min-max, Atari human-normalised, Atari-5/3, PPO-normalised.

Every function here is vectorised: ``score`` may be a Python number (a float comes back) or any
array-like (a float64 ``np.ndarray`` of the same shape comes back). Game names are looked up
case-insensitively, ignoring ``_``, ``-`` and spaces, and (for Atari) ALE/Gym decorations such as
``ALE/``, ``NoFrameskip`` and ``-v5``; an unknown game raises :class:`ValueError` naming it and listing
the valid names.

Sources of the constants (see ``docs/evaluation.md``):

* Procgen min-max: Cobbe et al. 2020 (Procgen), as tabulated in ``shared/specs/evaluation.md``.
* Atari random / human: the standard 57-game table of DQN-era evaluations (Mnih 2015 / Wang 2016 /
  Badia 2020), as listed in DNA's Table 9 (rounded there), with the Atari-5 games at the precision the
  spec gives (Aitchison et al. 2022).
* Atari-5 / Atari-3 weights: Aitchison, Sweetser, Hutter 2022, as given in the spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
PROCGEN_MINMAX: dict[str, dict[str, tuple[float, float]]] = {
    # game: {mode: (R_min, R_max)}
    "coinrun": {"easy": (5.0, 10.0), "hard": (5.0, 10.0)},
    "starpilot": {"easy": (2.5, 64.0), "hard": (1.5, 35.0)},
    "caveflyer": {"easy": (3.5, 12.0), "hard": (2.0, 13.4)},
    "dodgeball": {"easy": (1.5, 19.0), "hard": (1.5, 19.0)},
    "fruitbot": {"easy": (-1.5, 32.4), "hard": (-0.5, 27.2)},
    "chaser": {"easy": (0.5, 13.0), "hard": (0.5, 14.2)},
    "miner": {"easy": (1.5, 13.0), "hard": (1.5, 20.0)},
    "jumper": {"easy": (1.0, 10.0), "hard": (1.0, 10.0)},
    "leaper": {"easy": (1.5, 10.0), "hard": (1.5, 10.0)},
    "maze": {"easy": (5.0, 10.0), "hard": (4.0, 10.0)},
    "bigfish": {"easy": (1.0, 40.0), "hard": (0.0, 40.0)},
    "heist": {"easy": (3.5, 10.0), "hard": (2.0, 10.0)},
    "climber": {"easy": (2.0, 12.6), "hard": (1.0, 12.6)},
    "plunder": {"easy": (4.5, 30.0), "hard": (3.0, 30.0)},
    "ninja": {"easy": (3.5, 10.0), "hard": (2.0, 10.0)},
    "bossfight": {"easy": (0.5, 13.0), "hard": (0.5, 13.0)},
}
PROCGEN_GAMES: tuple[str, ...] = tuple(PROCGEN_MINMAX)
PROCGEN_MODES: tuple[str, ...] = ("easy", "hard")

# game: (random, human). One-decimal values of the standard table; DNA's Table 9 prints the same values
# rounded to 3-4 significant digits. Atari-5 games use the spec's (Atari-5 paper's) precision.
ATARI_RANDOM_HUMAN: dict[str, tuple[float, float]] = {
    "Alien": (227.8, 7127.7),
    "Amidar": (5.8, 1719.5),
    "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3),
    "Asteroids": (719.1, 47388.7),
    "Atlantis": (12850.0, 29028.1),
    "BankHeist": (14.2, 753.1),
    "BattleZone": (2360.0, 37187.5),
    "BeamRider": (363.9, 16926.5),
    "Berzerk": (123.7, 2630.4),
    "Bowling": (23.1, 160.7),
    "Boxing": (0.1, 12.1),
    "Breakout": (1.7, 30.5),
    "Centipede": (2090.9, 12017.0),
    "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4),
    "Defender": (2874.5, 18688.9),
    "DemonAttack": (152.1, 1971.0),
    "DoubleDunk": (-18.55, -16.4),
    "Enduro": (0.0, 860.5),
    "FishingDerby": (-91.7, -38.7),
    "Freeway": (0.0, 29.6),
    "Frostbite": (65.2, 4334.7),
    "Gopher": (257.6, 2412.5),
    "Gravitar": (173.0, 3351.4),
    "Hero": (1027.0, 30826.4),
    "IceHockey": (-11.2, 0.9),
    "Jamesbond": (29.0, 302.8),
    "Kangaroo": (52.0, 3035.0),
    "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3),
    "MontezumaRevenge": (0.0, 4753.3),
    "MsPacman": (307.3, 6951.6),
    "NameThisGame": (2292.35, 8049.0),
    "Phoenix": (761.4, 7242.6),
    "Pitfall": (-229.4, 6463.7),
    "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3),
    "Qbert": (163.88, 13455.0),
    "Riverraid": (1338.5, 17118.0),
    "RoadRunner": (11.5, 7845.0),
    "Robotank": (2.2, 11.9),
    "Seaquest": (68.4, 42054.7),
    "Skiing": (-17098.1, -4336.9),
    "Solaris": (1236.3, 12326.7),
    "SpaceInvaders": (148.0, 1668.7),
    "StarGunner": (664.0, 10250.0),
    "Surround": (-10.0, 6.5),
    "Tennis": (-23.8, -8.3),
    "TimePilot": (3568.0, 5229.2),
    "Tutankham": (11.4, 167.6),
    "UpNDown": (533.4, 11693.2),
    "Venture": (0.0, 1187.5),
    # Random 0.0 as in DNA's Table 9 (and R2D2/Agent57); DQN-era Nature tables use 16256.9 instead.
    "VideoPinball": (0.0, 17667.9),
    "WizardOfWor": (563.5, 4756.5),
    "YarsRevenge": (3092.9, 54576.9),
    # Not in DNA's Table 9 (its table stops at YarsRevenge: 56 rows); standard value.
    "Zaxxon": (32.5, 9173.3),
}
ATARI_GAMES: tuple[str, ...] = tuple(ATARI_RANDOM_HUMAN)

# Atari-5 (Aitchison et al. 2022): weights of log10(1 + HNS%) per game, no intercept.
ATARI5_WEIGHTS: dict[str, float] = {
    "BattleZone": 0.3819751,
    "DoubleDunk": 0.0679099,
    "NameThisGame": 0.3108041,
    "Phoenix": 0.1241262,
    "Qbert": 0.0804852,
}
# Atari-3 validation games (same formula).
ATARI3_WEIGHTS: dict[str, float] = {
    "Assault": 0.3352530,
    "MsPacman": 0.4236380,
    "YarsRevenge": 0.1916185,
}

SCHEMES: tuple[str, ...] = ("auto", "none", "procgen_minmax", "atari_hns")
SCHEME_LABELS: dict[str, str] = {
    "none": "raw return",
    "procgen_minmax": "min-max normalised score",
    "atari_hns": "human-normalised score (%)",
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_PROCGEN_BY_KEY = {_key(g): g for g in PROCGEN_GAMES}
_ATARI_BY_KEY = {_key(g): g for g in ATARI_GAMES}


def _as_output(x: np.ndarray, like: Any) -> float | np.ndarray:
    """Return a Python float for scalar input, an ndarray otherwise."""
    return float(x) if np.ndim(like) == 0 and not isinstance(like, np.ndarray) else x


def _unknown(kind: str, game: str, valid: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} game {game!r}; valid games: {', '.join(valid)}")


def canonical_procgen_game(game: str) -> str:
    """``"BigFish"``, ``"bigfish"``, ``"procgen-bigfish-v0"`` -> ``"bigfish"``; ValueError if unknown."""
    name = game.split(":")[-1]
    name = re.sub(r"^procgen[-_]?", "", name, flags=re.IGNORECASE)
    name = re.sub(r"-v\d+$", "", name)
    found = _PROCGEN_BY_KEY.get(_key(name))
    if found is None:
        raise _unknown("Procgen", game, PROCGEN_GAMES)
    return found


def canonical_atari_game(game: str) -> str:
    """``"breakout"``, ``"ALE/Breakout-v5"``, ``"BreakoutNoFrameskip-v4"`` -> ``"Breakout"``."""
    name = game.split(":")[-1].split("/")[-1]
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    found = _ATARI_BY_KEY.get(_key(name))
    if found is None:
        raise _unknown("Atari", game, ATARI_GAMES)
    return found


# ----------------------------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------------------------
def procgen_minmax(game: str, score: Any, mode: str = "easy") -> float | np.ndarray:
    """Procgen min-max normalised score ``(R - R_min) / (R_max - R_min)`` (1.0 = R_max; not clipped).

    ``mode`` is Procgen's distribution mode, ``"easy"`` or ``"hard"`` (the constants differ).
    """
    if mode not in PROCGEN_MODES:
        raise ValueError(f"unknown Procgen mode {mode!r}; valid modes: {', '.join(PROCGEN_MODES)}")
    r_min, r_max = PROCGEN_MINMAX[canonical_procgen_game(game)][mode]
    x = np.asarray(score, dtype=np.float64)
    return _as_output((x - r_min) / (r_max - r_min), score)


def atari_human_normalized(game: str, score: Any) -> float | np.ndarray:
    """Human-normalised score in percent: ``100 * (score - random) / (human - random)``."""
    random, human = ATARI_RANDOM_HUMAN[canonical_atari_game(game)]
    x = np.asarray(score, dtype=np.float64)
    return _as_output(100.0 * (x - random) / (human - random), score)


def _weighted_log_score(hns_by_game: Mapping[str, Any], weights: Mapping[str, float], name: str):
    by_key = {canonical_atari_game(g): v for g, v in hns_by_game.items()}
    missing = [g for g in weights if g not in by_key]
    if missing:
        raise ValueError(
            f"{name} needs human-normalised scores for {', '.join(weights)}; missing: {', '.join(missing)}"
        )
    total = 0.0
    for game, w in weights.items():
        hns = np.asarray(by_key[game], dtype=np.float64)
        total = total + w * np.log10(1.0 + np.maximum(0.0, hns))
    first = by_key[next(iter(weights))]
    return _as_output(np.asarray(10.0**total - 1.0), first)


def atari5(hns_by_game: Mapping[str, Any]) -> float | np.ndarray:
    """Atari-5 estimate of the 57-game median HNS (percent) from five games' HNS (percent).

    ``Atari5 = 10 ** (sum_g w_g * log10(1 + max(0, HNS_g))) - 1`` with the weights of
    :data:`ATARI5_WEIGHTS` (no intercept). Extra games in ``hns_by_game`` are ignored; values may be
    arrays (e.g. one entry per run) and broadcast. Five scores of 100 give about 85.05.
    """
    return _weighted_log_score(hns_by_game, ATARI5_WEIGHTS, "Atari-5")


def atari3(hns_by_game: Mapping[str, Any]) -> float | np.ndarray:
    """Atari-3 (validation set: Assault, MsPacman, YarsRevenge), same formula as :func:`atari5`."""
    return _weighted_log_score(hns_by_game, ATARI3_WEIGHTS, "Atari-3")


def ppo_normalized(
    scores_by_game: Mapping[str, Any], ppo_scores_by_game: Mapping[str, Any], *, average: bool = True
) -> float | np.ndarray | dict[str, float | np.ndarray]:
    """PPO-normalised score (DCPG tables): ``100 * score_alg / score_PPO`` per game, averaged over games.

    ``scores_by_game[g]`` may be a number or an array (e.g. one score per run); ``ppo_scores_by_game[g]``
    is the PPO reference under the same protocol (usually PPO's mean over runs). With ``average=False``
    the per-game percentages come back as a dict. Games must match exactly; a PPO score of 0 is an error.
    """
    games, ref_games = set(scores_by_game), set(ppo_scores_by_game)
    if games != ref_games:
        raise ValueError(
            "PPO normalisation needs the same games on both sides; "
            f"missing PPO scores for: {sorted(games - ref_games)}; "
            f"missing scores for: {sorted(ref_games - games)}"
        )
    if not games:
        raise ValueError("PPO normalisation needs at least one game")
    per_game = {}
    for game, score in scores_by_game.items():
        ref = np.asarray(ppo_scores_by_game[game], dtype=np.float64)
        if np.any(ref == 0):
            raise ValueError(f"PPO reference score for {game!r} is 0: the PPO-normalised score is undefined")
        per_game[game] = _as_output(100.0 * np.asarray(score, dtype=np.float64) / ref, score)
    if not average:
        return per_game
    try:
        arrays = np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in per_game.values()])
    except ValueError as exc:
        shapes = {g: np.shape(v) for g, v in per_game.items()}
        raise ValueError(f"per-game scores must have matching shapes (one entry per run): {shapes}") from exc
    stacked = np.stack(arrays)
    first = next(iter(scores_by_game.values()))
    return _as_output(stacked.mean(axis=0), first)


# ----------------------------------------------------------------------------------------------
# aclab env ids
# ----------------------------------------------------------------------------------------------
def parse_env_id(env_id: str) -> tuple[str, str]:
    """Split an aclab env id into (suite, task).

    ``"procgen:bigfish"`` -> ``("procgen", "bigfish")``, ``"atari:Breakout"`` -> ``("atari", "Breakout")``,
    ``"ALE/Breakout-v5"`` -> ``("atari", "Breakout-v5")``, ``"dmc:cheetah-run"`` -> ``("dmc", ...)``,
    ``"CartPole-v1"`` -> ``("gym", "CartPole-v1")``.
    """
    if ":" in env_id:
        suite, task = env_id.split(":", 1)
        return suite.lower(), task
    if env_id.startswith("ALE/"):
        return "atari", env_id[4:]
    if env_id.lower().startswith("procgen-"):
        return "procgen", env_id
    return "gym", env_id


def resolve_scheme(env_id: str, scheme: str = "auto") -> str:
    """The concrete normalisation for ``env_id``: ``auto`` picks by suite (procgen -> min-max, atari -> HNS,
    anything else, e.g. dmc/mujoco/gym -> none)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown normalisation {scheme!r}; valid: {', '.join(SCHEMES)}")
    if scheme != "auto":
        return scheme
    suite, _ = parse_env_id(env_id)
    return {"procgen": "procgen_minmax", "atari": "atari_hns"}.get(suite, "none")


def normalize(env_id: str, score: Any, scheme: str = "auto", *, mode: str = "easy") -> float | np.ndarray:
    """Normalise raw ``score`` of aclab env ``env_id`` with ``scheme`` (see :func:`resolve_scheme`).

    ``mode`` is the Procgen distribution mode (only used by ``procgen_minmax``).
    """
    concrete = resolve_scheme(env_id, scheme)
    _, task = parse_env_id(env_id)
    if concrete == "none":
        x = np.asarray(score, dtype=np.float64)
        return _as_output(x.copy(), score)
    if concrete == "procgen_minmax":
        return procgen_minmax(task, score, mode=mode)
    return atari_human_normalized(task, score)
