"""The sweep specs that reproduce the DCPG paper's Tables 4 and 5 at full scale: every column, game and
seed is in the grid, every run resolves to the paper's preset, and the commands are what `aclab train` takes."""

from __future__ import annotations

from pathlib import Path

from aclab import sweep
from aclab.train import make_config

SWEEPS = Path(__file__).resolve().parents[1] / "docs" / "results" / "phasic" / "sweeps"
GAMES = ["bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot", "heist",
         "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot"]
PRESETS = {"ppo": "ppo-procgen", "ucb-drac": "drac-procgen", "plr": "plr-procgen", "daac": "daac-procgen",
           "idaac": "daac-procgen", "ppg": "ppg-procgen", "dcpg": "dcpg-procgen", "ddcpg": "dcpg-procgen"}


def test_table5_and_table4_sweeps_cover_the_tables(tmp_path):
    table5 = sweep.load_sweep_spec(SWEEPS / "table5_all.toml")
    assert table5.algos == ["ppo", "ucb-drac", "plr", "daac", "ppg", "dcpg", "ddcpg"]  # Table 5's columns
    table4 = sweep.load_sweep_spec(SWEEPS / "table4_daac_idaac.toml")
    assert table4.algos == ["ppo", "daac", "idaac"]
    main = sweep.load_sweep_spec(SWEEPS / "table5_main.toml")
    for spec in (table5, table4):
        assert spec.envs == [f"procgen:{g}" for g in GAMES] and spec.seeds == list(range(10))
        assert spec.out_dir == main.out_dir  # runs shared with the other table sweeps
        jobs = sweep.plan_sweep(spec, command_prefix=["aclab"])
        assert len(jobs) == len(spec.algos) * 16 * 10 and {j.action for j in jobs} == {"train"}
    for algo in table5.algos + ["idaac"]:
        overrides = [*main.overrides, *table5.algo_overrides.get(algo, [])]
        config = make_config(algo, "procgen:bigfish", overrides=overrides)
        assert config.preset == PRESETS[algo] and config.total_steps == 25_000_000, algo
        assert config.env.num_envs == 64 and config.env.options["levels"] == "train", algo
        assert config.device == "cuda"
