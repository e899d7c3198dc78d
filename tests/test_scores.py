"""Score normalisations against hand-computed values, the spec's check values and the papers' tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aclab.evaluate import scores as sc

# The spec's Procgen table (shared/specs/evaluation.md), transcribed a second time for the check.
SPEC_PROCGEN_TABLE = """
coinrun 5 10 5 10
starpilot 2.5 64 1.5 35
caveflyer 3.5 12 2 13.4
dodgeball 1.5 19 1.5 19
fruitbot -1.5 32.4 -0.5 27.2
chaser 0.5 13 0.5 14.2
miner 1.5 13 1.5 20
jumper 1 10 1 10
leaper 1.5 10 1.5 10
maze 5 10 4 10
bigfish 1 40 0 40
heist 3.5 10 2 10
climber 2 12.6 1 12.6
plunder 4.5 30 3 30
ninja 3.5 10 2 10
bossfight 0.5 13 0.5 13
"""

# DNA (Aitchison et al.), Table 9: Random and Human columns as printed (rounded). Zaxxon is not in it.
DNA_TABLE_9 = """
Alien 228 7,128
Amidar 5.8 1,720
Assault 222 742
Asterix 210 8,503
Asteroids 719 47,389
Atlantis 12,850 29,028
BankHeist 14.2 753
BattleZone 2,360 37,188
BeamRider 364 16,926
Berzerk 124 2,630
Bowling 23.1 161
Boxing 0.1 12.1
Breakout 1.7 30.5
Centipede 2,091 12,017
ChopperCommand 811 7,388
CrazyClimber 10,780 35,829
Defender 2,874 18,689
DemonAttack 152 1,971
DoubleDunk -18.6 -16.4
Enduro 0.0 860
FishingDerby -91.7 -38.7
Freeway 0.0 29.6
Frostbite 65.2 4,335
Gopher 258 2,412
Gravitar 173 3,351
Hero 1,027 30,826
IceHockey -11.2 0.9
Jamesbond 29.0 303
Kangaroo 52.0 3,035
Krull 1,598 2,666
KungFuMaster 258 22,736
MontezumaRevenge 0.0 4,753
MsPacman 307 6,952
NameThisGame 2,292 8,049
Phoenix 761 7,243
Pitfall -229.4 6,464
Pong -20.7 14.6
PrivateEye 24.9 69,571
Qbert 164 13,455
Riverraid 1,338 17,118
RoadRunner 11.5 7,845
Robotank 2.2 11.9
Seaquest 68.4 42,055
Skiing -17098.1 -4336.9
Solaris 1,236 12,327
SpaceInvaders 148 1,669
StarGunner 664 10,250
Surround -10.0 6.5
Tennis -23.8 -8.3
TimePilot 3,568 5,229
Tutankham 11.4 168
UpNDown 533 11,693
Venture 0.0 1,188
VideoPinball 0.0 17,668
WizardOfWor 564 4,756
YarsRevenge 3,093 54,577
"""


def _printed_tolerance(text: str) -> float:
    """Half a unit of the last printed digit, plus rounding slack (e.g. 16926.5 printed as 16,926)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10.0 ** (-decimals) + 1e-9


# ----------------------------------------------------------------------------------------------
# Procgen
# ----------------------------------------------------------------------------------------------
def test_procgen_table_matches_spec():
    rows = [line.split() for line in SPEC_PROCGEN_TABLE.strip().splitlines()]
    assert len(rows) == 16 == len(sc.PROCGEN_MINMAX)
    for game, e_min, e_max, h_min, h_max in rows:
        assert sc.PROCGEN_MINMAX[game]["easy"] == (float(e_min), float(e_max))
        assert sc.PROCGEN_MINMAX[game]["hard"] == (float(h_min), float(h_max))


def test_procgen_minmax_hand_values():
    assert sc.procgen_minmax("bigfish", 20.5) == pytest.approx(0.5)  # (20.5 - 1) / 39
    assert sc.procgen_minmax("bigfish", 20.0, mode="hard") == pytest.approx(0.5)  # (20 - 0) / 40
    assert sc.procgen_minmax("coinrun", 7.5) == pytest.approx(0.5)
    assert sc.procgen_minmax("fruitbot", -1.5) == pytest.approx(0.0)
    assert sc.procgen_minmax("fruitbot", 32.4) == pytest.approx(1.0)
    assert sc.procgen_minmax("starpilot", 35.0, mode="hard") == pytest.approx(1.0)
    assert sc.procgen_minmax("starpilot", 35.0, mode="easy") == pytest.approx((35 - 2.5) / 61.5)
    assert isinstance(sc.procgen_minmax("maze", 10), float)


def test_procgen_minmax_vectorised_and_unclipped():
    x = np.array([[1.0, 40.0], [79.0, -38.0]])
    out = sc.procgen_minmax("BigFish", x)
    assert isinstance(out, np.ndarray) and out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 1.0], [2.0, -1.0]])
    np.testing.assert_allclose(sc.procgen_minmax("bigfish", [1.0, 40.0]), [0.0, 1.0])


def test_procgen_name_variants():
    for name in ("bigfish", "BigFish", "BIGFISH", "procgen-bigfish-v0", "procgen:bigfish"):
        assert sc.canonical_procgen_game(name) == "bigfish"


def test_procgen_unknown_game_and_mode():
    with pytest.raises(ValueError, match=r"unknown Procgen game 'pacman'.*coinrun.*bossfight"):
        sc.procgen_minmax("pacman", 1.0)
    with pytest.raises(ValueError, match="unknown Procgen mode 'extreme'"):
        sc.procgen_minmax("coinrun", 1.0, mode="extreme")


# ----------------------------------------------------------------------------------------------
# Atari
# ----------------------------------------------------------------------------------------------
def test_atari_table_has_57_games_and_matches_dna_table_9():
    assert len(sc.ATARI_RANDOM_HUMAN) == 57
    rows = [line.split() for line in DNA_TABLE_9.strip().splitlines()]
    assert len(rows) == 56  # the paper's table lacks Zaxxon
    for game, random_text, human_text in rows:
        random, human = sc.ATARI_RANDOM_HUMAN[game]
        for ours, printed in ((random, random_text), (human, human_text)):
            value = float(printed.replace(",", ""))
            assert abs(ours - value) <= _printed_tolerance(printed) + 0.05, (game, ours, printed)
    assert sc.ATARI_RANDOM_HUMAN["Zaxxon"] == (32.5, 9173.3)


def test_atari5_games_use_the_spec_values():
    spec = {
        "BattleZone": (2360, 37187.5),
        "DoubleDunk": (-18.55, -16.4),
        "NameThisGame": (2292.35, 8049),
        "Phoenix": (761.4, 7242.6),
        "Qbert": (163.88, 13455),
    }
    for game, pair in spec.items():
        assert sc.ATARI_RANDOM_HUMAN[game] == pair


def test_human_normalized_hand_values():
    assert sc.atari_human_normalized("Breakout", 1.7) == pytest.approx(0.0)
    assert sc.atari_human_normalized("Breakout", 30.5) == pytest.approx(100.0)
    assert sc.atari_human_normalized("Breakout", 418.0) == pytest.approx(100 * (418 - 1.7) / (30.5 - 1.7))
    assert sc.atari_human_normalized("Pong", 20.9) == pytest.approx(100 * (20.9 + 20.7) / 35.3)
    assert sc.atari_human_normalized("Skiing", -4336.9) == pytest.approx(100.0)
    out = sc.atari_human_normalized("Qbert", np.array([163.88, 13455.0]))
    np.testing.assert_allclose(out, [0.0, 100.0])


@pytest.mark.parametrize(
    "name",
    ["Breakout", "breakout", "BREAKOUT", "ALE/Breakout-v5", "BreakoutNoFrameskip-v4", "atari:Breakout"],
)
def test_atari_name_variants(name):
    assert sc.canonical_atari_game(name) == "Breakout"


def test_atari_name_with_underscores():
    assert sc.canonical_atari_game("montezuma_revenge") == "MontezumaRevenge"
    assert sc.canonical_atari_game("MontezumaRevenge") == "MontezumaRevenge"


def test_atari_unknown_game():
    with pytest.raises(ValueError, match=r"unknown Atari game 'Tetris'.*Alien.*Zaxxon"):
        sc.atari_human_normalized("Tetris", 1.0)


def test_atari5_spec_check_value():
    value = sc.atari5(dict.fromkeys(sc.ATARI5_WEIGHTS, 100.0))
    assert value == pytest.approx(85.05, abs=0.01)
    assert value == pytest.approx(101.0 ** sum(sc.ATARI5_WEIGHTS.values()) - 1.0)


def test_atari5_reference_and_clipping():
    hns = {
        "BattleZone": 250.0,
        "DoubleDunk": -40.0,
        "NameThisGame": 180.0,
        "Phoenix": 900.0,
        "Qbert": 60.0,
        "Pong": 1e6,
    }  # extra game ignored
    expected = (
        10
        ** (
            0.3819751 * math.log10(251)
            + 0.0679099 * math.log10(1)
            + 0.3108041 * math.log10(181)
            + 0.1241262 * math.log10(901)
            + 0.0804852 * math.log10(61)
        )
        - 1
    )
    assert sc.atari5(hns) == pytest.approx(expected)
    assert sc.atari5(dict.fromkeys(sc.ATARI5_WEIGHTS, 0.0)) == pytest.approx(0.0)
    assert sc.atari5(dict.fromkeys(sc.ATARI5_WEIGHTS, -50.0)) == pytest.approx(0.0)


def test_atari5_vectorised_and_missing_games():
    per_run = {g: np.array([0.0, 100.0]) for g in sc.ATARI5_WEIGHTS}
    np.testing.assert_allclose(sc.atari5(per_run), [0.0, 101.0 ** sum(sc.ATARI5_WEIGHTS.values()) - 1])
    with pytest.raises(ValueError, match="missing: Qbert"):
        sc.atari5({g: 1.0 for g in sc.ATARI5_WEIGHTS if g != "Qbert"})


def test_atari3():
    value = sc.atari3({"assault": 100.0, "MsPacman": 100.0, "YarsRevenge": 100.0})
    assert value == pytest.approx(101.0 ** (0.3352530 + 0.4236380 + 0.1916185) - 1.0)
    with pytest.raises(ValueError, match="Atari-3"):
        sc.atari3({"Assault": 1.0})


# ----------------------------------------------------------------------------------------------
# PPO-normalised
# ----------------------------------------------------------------------------------------------
def test_ppo_normalized_hand_values():
    assert sc.ppo_normalized({"a": 10.0, "b": 30.0}, {"a": 10.0, "b": 20.0}) == pytest.approx(125.0)
    per_run = sc.ppo_normalized({"a": np.array([10.0, 20.0]), "b": np.array([20.0, 40.0])}, {"a": 10.0, "b": 20.0})
    np.testing.assert_allclose(per_run, [100.0, 200.0])
    per_game = sc.ppo_normalized({"a": 5.0, "b": 30.0}, {"a": 10.0, "b": 20.0}, average=False)
    assert per_game == {"a": pytest.approx(50.0), "b": pytest.approx(150.0)}


def test_ppo_normalized_errors():
    with pytest.raises(ValueError, match="missing PPO scores for: \\['c'\\]"):
        sc.ppo_normalized({"a": 1.0, "c": 1.0}, {"a": 1.0})
    with pytest.raises(ValueError, match="'a' is 0"):
        sc.ppo_normalized({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="matching shapes"):
        sc.ppo_normalized({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, {"a": 1.0, "b": 1.0})


# ----------------------------------------------------------------------------------------------
# aclab env ids
# ----------------------------------------------------------------------------------------------
def test_parse_env_id():
    assert sc.parse_env_id("procgen:bigfish") == ("procgen", "bigfish")
    assert sc.parse_env_id("atari:Breakout") == ("atari", "Breakout")
    assert sc.parse_env_id("ALE/Pong-v5") == ("atari", "Pong-v5")
    assert sc.parse_env_id("mujoco:HalfCheetah-v4") == ("mujoco", "HalfCheetah-v4")
    assert sc.parse_env_id("CartPole-v1") == ("gym", "CartPole-v1")


def test_normalize_auto():
    assert sc.normalize("procgen:bigfish", 20.5) == pytest.approx(0.5)
    assert sc.normalize("procgen:bigfish", 20.0, mode="hard") == pytest.approx(0.5)
    assert sc.normalize("atari:Breakout", 30.5) == pytest.approx(100.0)
    assert sc.normalize("ALE/Breakout-v5", 1.7) == pytest.approx(0.0)
    assert sc.normalize("dmc:cheetah-run", 512.0) == 512.0
    assert sc.normalize("mujoco:HalfCheetah-v4", -3.0) == -3.0
    np.testing.assert_allclose(sc.normalize("CartPole-v1", np.array([1.0, 500.0])), [1.0, 500.0])
    assert sc.resolve_scheme("procgen:coinrun") == "procgen_minmax"
    assert sc.resolve_scheme("atari:Pong") == "atari_hns"
    assert sc.resolve_scheme("dmc:walker-walk") == "none"


def test_normalize_explicit_schemes_and_errors():
    assert sc.normalize("procgen:bigfish", 20.5, scheme="none") == 20.5
    assert sc.normalize("bigfish", 20.5, scheme="procgen_minmax") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown Atari game 'bigfish'"):
        sc.normalize("procgen:bigfish", 1.0, scheme="atari_hns")
    with pytest.raises(ValueError, match="unknown normalisation 'zscore'"):
        sc.normalize("procgen:bigfish", 1.0, scheme="zscore")
    with pytest.raises(ValueError, match="unknown Atari game 'NotAGame'"):
        sc.normalize("atari:NotAGame", 1.0)
