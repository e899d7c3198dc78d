"""End-to-end reports on synthetic run directories with known curves, and the report's bad inputs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from aclab.evaluate import report as rp
from aclab.evaluate import scores as sc
from aclab.evaluate.runs_io import RunDirError, expand_run_dirs, final_score, load_run, write_synthetic_run

TOTAL = 20_000
SEEDS = (1, 2, 3)
TEST_BASE = {
    ("ppo", "procgen:bigfish"): 10.0,
    ("ppo", "procgen:coinrun"): 7.0,
    ("dcpg", "procgen:bigfish"): 20.0,
    ("dcpg", "procgen:coinrun"): 8.0,
}


def _test_value(algo: str, task: str, seed: int) -> float:
    return TEST_BASE[(algo, task)] + 2.0 * (seed - 2)  # seeds 1, 2, 3: base -2, base, base +2


def _top(algo: str, task: str) -> float:
    return TEST_BASE[(algo, task)] + 5.0


def write_procgen_runs(root: Path) -> Path:
    """2 algorithms x 2 Procgen games x 3 seeds. Test evals are constant per seed, train evals are
    base + 5, training returns rise linearly to base + 5 over 20 logged points."""
    for algo, task in TEST_BASE:
        for seed in SEEDS:
            test_value = _test_value(algo, task, seed)
            top = _top(algo, task)
            write_synthetic_run(
                root / f"{algo}_{task.split(':')[1]}_{seed}",
                algo=algo,
                env_id=task,
                seed=seed,
                total_steps=TOTAL,
                num_points=20,
                curve=lambda s, top=top: top * s / TOTAL,
                eval_curves={
                    "test": lambda s, v=test_value: v + 0 * s,
                    "train": lambda s, top=top: top + 0 * s,
                },
                num_evals=4,
            )
    return root


def _section(text: str, heading_start: str) -> str:
    start = text.index(heading_start)
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _row(section: str, first_cell: str) -> list[str]:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} in:\n{section}")


def _parse_cell(cell: str) -> tuple[float, float | None, bool]:
    bold = cell.startswith("**")
    parts = cell.strip("*").replace(",", "").split("±")
    return float(parts[0]), (float(parts[1]) if len(parts) > 1 else None), bold


@pytest.fixture(scope="module")
def procgen_report(tmp_path_factory):
    root = write_procgen_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    path = rp.build_report([root], out, last_k=4, last_k_evals=2, reps=60, poi_reps=40, seed=0)
    return root, out, path


def test_report_files_exist_and_are_referenced(procgen_report):
    _, out, path = procgen_report
    assert path == out / "report.md"
    text = path.read_text()
    referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for rel in referenced:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert pngs == set(referenced)
    expected = {"curves_overview.png", "curves/procgen-bigfish.png", "curves/procgen-coinrun.png"}
    for source in ("eval-test", "eval-train", "train_episodes"):
        expected |= {f"aggregates_{source}.png", f"poi_{source}.png", f"profiles_{source}.png"}
    assert pngs == expected
    assert (out / "final_scores.csv").exists() and (out / "aggregates.json").exists()


def test_report_test_split_table_values(procgen_report):
    _, _, path = procgen_report
    section = _section(path.read_text(), "## Final scores: evaluation on the test split")
    assert _row(section, "Task") == ["dcpg", "ppo"]
    assert _row(section, "procgen:bigfish") == ["**20.0 ± 2.0**", "10.0 ± 2.0"]
    assert _row(section, "procgen:coinrun") == ["**8.00 ± 2.00**", "7.00 ± 2.00"]
    # normalised row: per seed the mean over games of the min-max score, then mean ± std over seeds
    cells = _row(section, "*Min-max normalised score (mean over tasks)*")
    for algo, cell in zip(["dcpg", "ppo"], cells):
        per_seed = [
            np.mean(
                [
                    (_test_value(algo, "procgen:bigfish", s) - 1.0) / 39.0,
                    (_test_value(algo, "procgen:coinrun", s) - 5.0) / 5.0,
                ]
            )
            for s in SEEDS
        ]
        mean, std, bold = _parse_cell(cell)
        assert mean == pytest.approx(np.mean(per_seed), abs=6e-4)
        assert std == pytest.approx(np.std(per_seed, ddof=1), abs=6e-4)
        assert bold == (algo == "dcpg")
    assert "measured at steps 20,000" in section


def test_report_train_split_and_training_episode_tables(procgen_report):
    _, _, path = procgen_report
    text = path.read_text()
    train = _section(text, "## Final scores: evaluation on the train split")
    assert _row(train, "procgen:bigfish") == ["**25.0 ± 0.0**", "15.0 ± 0.0"]
    episodes = _section(text, "## Final scores: training episodes")
    # last 4 of 20 points at steps 17/20 .. 20/20 of TOTAL: mean = top * 74 / 80
    mean, std, _ = _parse_cell(_row(episodes, "procgen:bigfish")[1])
    assert mean == pytest.approx(15.0 * 74 / 80, abs=0.05) and std == 0.0


def test_report_csv_and_json_values(procgen_report):
    _, out, _ = procgen_report
    rows = list(csv.DictReader((out / "final_scores.csv").open()))
    assert len(rows) == 3 * len(TEST_BASE) * len(SEEDS)
    for row in rows:
        algo, task, seed = row["algo"], row["env_id"], int(row["seed"])
        expected = {
            "eval/test": _test_value(algo, task, seed),
            "eval/train": _top(algo, task),
            "train_episodes": _top(algo, task) * 74 / 80,
        }[row["source"]]
        assert float(row["score"]) == pytest.approx(expected)
        assert float(row["normalized_score"]) == pytest.approx(sc.normalize(task, expected))
        assert int(row["step"]) == TOTAL
    data = json.loads((out / "aggregates.json").read_text())
    assert data["normalization"] == "procgen_minmax"
    iqm = data["sources"]["eval/test"]["aggregates"]["ppo"]["iqm"]
    pooled = sorted(
        sc.normalize(t, _test_value("ppo", t, s)) for t in ("procgen:bigfish", "procgen:coinrun") for s in SEEDS
    )
    assert iqm["point"] == pytest.approx(np.mean(pooled[1:-1]))  # 6 values: trim 1 at each end
    assert iqm["lower"] <= iqm["point"] <= iqm["upper"]
    poi = data["sources"]["eval/test"]["probability_of_improvement"]["P(dcpg > ppo)"]
    # bigfish: dcpg 18..22 vs ppo 8..12 -> 1; coinrun: dcpg {6,8,10} vs ppo {5,7,9} -> 6/9
    assert poi["point"] == pytest.approx((1.0 + 6 / 9) / 2)


def test_atari_report_with_ppo_baseline(tmp_path):
    games = list(sc.ATARI5_WEIGHTS)
    raw = {}
    for algo, factor in (("ppo", 1.0), ("dna", 2.0)):
        for g, game in enumerate(games):
            random, human = sc.ATARI_RANDOM_HUMAN[game]
            for seed in (0, 1):
                value = random + factor * (0.5 + 0.25 * g + 0.1 * seed) * (human - random)
                raw[(algo, game, seed)] = value
                write_synthetic_run(
                    tmp_path / "runs" / f"{algo}_{game}_{seed}",
                    algo=algo,
                    env_id=f"atari:{game}",
                    seed=seed,
                    num_points=10,
                    curve=lambda s, v=value: v + 0 * s,
                )
    path = rp.build_report([tmp_path / "runs"], tmp_path / "out", ppo_baseline="ppo", reps=40, poi_reps=20)
    section = _section(path.read_text(), "## Final scores: training episodes")
    assert _row(section, "Task") == ["ppo", "dna"]
    ppo_cell = _row(section, "*ppo-normalised score (%)*")[0]
    assert _parse_cell(ppo_cell)[0] == pytest.approx(100.0)
    for algo, col in (("ppo", 0), ("dna", 1)):
        hns = {g: np.array([sc.atari_human_normalized(g, raw[(algo, g, s)]) for s in (0, 1)]) for g in games}
        per_seed_mean = np.mean(np.stack(list(hns.values())), axis=0)
        assert _parse_cell(_row(section, "*Mean HNS (%)*")[col])[0] == pytest.approx(per_seed_mean.mean(), abs=0.05)
        atari5 = sc.atari5(hns)
        assert _parse_cell(_row(section, "*Atari-5 (%)*")[col])[0] == pytest.approx(np.mean(atari5), abs=0.05)
    assert "P(dna > ppo)" in path.read_text()
    assert "Optimality gap threshold γ = 100" in path.read_text()


def test_single_task_raw_report(tmp_path):
    for seed in (0, 1):
        write_synthetic_run(
            tmp_path / "runs" / f"s{seed}",
            algo="ppo",
            env_id="CartPole-v1",
            seed=seed,
            num_points=10,
            curve=lambda s, seed=seed: 100.0 + 50.0 * seed + 0 * s,
        )
    path = rp.build_report([tmp_path / "runs"], tmp_path / "out", reps=30)
    text = path.read_text()
    assert _row(text, "CartPole-v1") == ["125.0 ± 35.4"]
    assert "| ppo | 125 [" in text  # aggregates on raw returns, one task
    assert "Optimality gap" not in text and "Probability of improvement" not in text
    assert not list((tmp_path / "out").glob("poi_*.png"))
    assert (tmp_path / "out" / "curves" / "CartPole-v1.png").exists()


def test_report_uses_the_loops_evaluations_unless_told_and_says_which(tmp_path):
    """An ad-hoc ``aclab eval`` (evals_adhoc.csv) never moves a run's score; ``evals_file`` picks it on request
    and the report names the file it used."""
    for seed in (0, 1):
        run = write_synthetic_run(tmp_path / "runs" / f"s{seed}", seed=seed, num_points=5,
                                  eval_curves={"test": lambda s: 100.0 + 0 * s})
        (run / "evals_adhoc.csv").write_text("step,split,mean_return,std_return,num_episodes,returns,deterministic\n"
                                             "10000,test,500,0,2,500 500,True\n")
    text = rp.build_report([tmp_path / "runs"], tmp_path / "out", reps=30).read_text()
    assert _row(text, "CartPole-v1")[0].startswith("100.0") and "come from `evals.csv`" in text
    adhoc = rp.build_report([tmp_path / "runs"], tmp_path / "adhoc", reps=30, evals_file="evals_adhoc.csv")
    text = adhoc.read_text()
    assert _row(text, "CartPole-v1")[0].startswith("500.0") and "come from `evals_adhoc.csv`" in text


# ----------------------------------------------------------------------------------------------
# Curves helper
# ----------------------------------------------------------------------------------------------
def test_mean_and_standard_error_identical_grids():
    steps = np.array([1.0, 2.0, 3.0])
    curves = [(steps, np.array([1.0, 2.0, 3.0])), (steps, np.array([3.0, 2.0, 5.0]))]
    grid, mean, se, count = rp.mean_and_standard_error(curves)
    np.testing.assert_array_equal(grid, steps)
    np.testing.assert_allclose(mean, [2.0, 2.0, 4.0])
    np.testing.assert_allclose(se, [np.sqrt(2.0) / np.sqrt(2.0), 0.0, np.sqrt(2.0) / np.sqrt(2.0)])
    np.testing.assert_array_equal(count, [2, 2, 2])


def test_mean_and_standard_error_interpolates_on_the_union_of_steps():
    a = (np.array([0.0, 10.0]), np.array([0.0, 10.0]))
    b = (np.array([5.0, 20.0]), np.array([5.0, 20.0]))
    grid, mean, se, count = rp.mean_and_standard_error([a, b], num_points=6)
    np.testing.assert_allclose(grid, [0.0, 5.0, 10.0, 20.0])
    np.testing.assert_allclose(mean, grid)  # both curves are y = x
    np.testing.assert_allclose(se, 0.0)
    np.testing.assert_array_equal(count, [1, 2, 2, 1])
    single, mean1, se1, _ = rp.mean_and_standard_error([a])
    np.testing.assert_allclose(mean1, [0.0, 10.0])
    np.testing.assert_allclose(se1, 0.0)


def test_seeds_of_different_lengths_are_not_cut_at_the_shortest():
    """Three seeds on one log grid, stopped at 10k, 6k and 3k steps: the mean runs to 10k, averaging
    the seeds that reach each step (their values are 1, 2, 3 times step/1000)."""
    curves = [(np.arange(500, total + 1, 500.0), k * np.arange(500, total + 1, 500.0) / 1000)
              for k, total in ((1, 10_000), (2, 6_000), (3, 3_000))]
    grid, mean, se, count = rp.mean_and_standard_error(curves)
    assert grid[-1] == 10_000 and grid.size == 20
    at = {float(s): (float(m), int(c)) for s, m, c in zip(grid, mean, count)}
    assert at[3000.0] == (pytest.approx(6.0), 3)  # (3 + 6 + 9) / 3
    assert at[5000.0] == (pytest.approx(7.5), 2)  # (5 + 10) / 2
    assert at[10000.0] == (pytest.approx(10.0), 1)


def test_padded_limits_keep_points_off_the_axis_edges():
    low, high = rp.padded_limits([0.39, 0.66, 0.39, 0.66])
    assert low < 0.39 and high > 0.66
    low, high = rp.padded_limits([0.5, 0.5])  # one run: zero span
    assert low < 0.5 < high


# ----------------------------------------------------------------------------------------------
# Run directories and bad inputs
# ----------------------------------------------------------------------------------------------
def test_final_score_sources(tmp_path):
    run = load_run(
        write_synthetic_run(
            tmp_path / "r",
            num_points=10,
            total_steps=1000,
            empty_every=5,
            eval_curves={"test": lambda s: s / 100.0},
            num_evals=5,
        )
    )
    assert run.sources() == ["eval/test", "train_episodes"]
    steps, values = run.curve("episode_return")
    assert len(values) == 8  # rows 5 and 10 are empty
    score, step = final_score(run, "train_episodes", last_k=2)
    assert score == pytest.approx((0.8 + 0.9) / 2) and step == 900
    score, step = final_score(run, "eval/test", last_k_evals=2)
    assert score == pytest.approx((8.0 + 10.0) / 2) and step == 1000
    with pytest.raises(RunDirError, match="no 'train' evaluations"):
        final_score(run, "eval/train")


def test_final_score_is_the_mean_of_the_last_n_episodes(tmp_path):
    """episodes.csv gives the training score per episode: the last 10 of 50 episodes with returns 1..50
    average 45.5, whatever the per-iteration means in metrics.csv say; without episodes.csv (or with
    last_episodes=None) the metrics.csv definition is kept."""
    episodes = [(100 * i, float(i)) for i in range(1, 51)]
    run = load_run(write_synthetic_run(tmp_path / "r", num_points=10, total_steps=1000, train_episodes=episodes))
    score, step = final_score(run, "train_episodes", last_k=2, last_episodes=10)
    assert score == pytest.approx(45.5) and step == 5000
    assert final_score(run, "train_episodes", last_k=2, last_episodes=None)[0] == pytest.approx((0.9 + 1.0) / 2)
    old = load_run(write_synthetic_run(tmp_path / "old", num_points=10, total_steps=1000))
    assert final_score(old, "train_episodes", last_k=2, last_episodes=10)[0] == pytest.approx((0.9 + 1.0) / 2)

    path = rp.build_report([tmp_path / "r"], tmp_path / "out", last_episodes=10, reps=30, poi_reps=20)
    rows = csv.DictReader((tmp_path / "out" / "final_scores.csv").open())
    rows = [r for r in rows if r["source"] == "train_episodes"]
    assert [float(r["score"]) for r in rows] == [pytest.approx(45.5)]
    assert "mean return of the last 10 finished training episodes (episodes.csv)" in path.read_text()


def test_one_seed_aggregate_plot_keeps_points_inside_the_axes(tmp_path, monkeypatch):
    """With one run per task every interval is a point: each must lie strictly inside its panel's x range
    (matplotlib's autoscale put them on the edges) and be drawn as a marker."""
    from aclab.evaluate.stats import Interval

    figures = []
    monkeypatch.setattr(rp, "_save", lambda fig, path: figures.append(fig))
    results = {"ppo": {"median": Interval(0.39, 0.39, 0.39), "mean": Interval(0.39, 0.39, 0.39)},
               "dcpg": {"median": Interval(0.66, 0.66, 0.66), "mean": Interval(0.66, 0.66, 0.66)}}
    rp.plot_aggregates(results, ["ppo", "dcpg"], rp._colors(["ppo", "dcpg"]), "score", "t", tmp_path / "a.png")
    for ax in figures[0].axes:
        low, high = ax.get_xlim()
        assert low < 0.39 - 0.01 and high > 0.66 + 0.01
        markers = [line for line in ax.get_lines() if line.get_marker() == "D"]
        assert sorted(line.get_xdata()[0] for line in markers) == [0.39, 0.66]


def test_report_out_must_be_a_folder(tmp_path, capsys):
    from aclab.cli import main

    write_synthetic_run(tmp_path / "runs" / "r", num_points=5)
    (tmp_path / "report.md").write_text("x")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report.md")]) == 2
    err = capsys.readouterr().err
    assert "is a file: give a folder" in err and "Errno" not in err


def test_no_runs(tmp_path):
    with pytest.raises(rp.ReportError, match="no run directories given"):
        rp.build_report([], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(rp.ReportError, match="no run directories"):
        rp.build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(rp.ReportError, match="no such file or directory"):
        rp.build_report([tmp_path / "missing"], tmp_path / "out")


def test_garbled_run_dirs(tmp_path):
    run = write_synthetic_run(tmp_path / "a" / "run", num_points=3)
    (run / "config.json").unlink()
    with pytest.raises(rp.ReportError, match=r"run: missing config.json"):
        rp.build_report([run], tmp_path / "out")
    run = write_synthetic_run(tmp_path / "b", num_points=3)
    (run / "config.json").write_text("{not json")
    with pytest.raises(rp.ReportError, match=r"config.json: not valid JSON"):
        rp.build_report([run], tmp_path / "out")
    run = write_synthetic_run(tmp_path / "c", num_points=3)
    (run / "metrics.csv").write_text("step,time_s,episode_return\n10,0.1,abc\n")
    with pytest.raises(rp.ReportError, match=r"metrics.csv, line 2, column 'episode_return': not a number: 'abc'"):
        rp.build_report([run], tmp_path / "out")
    run = write_synthetic_run(tmp_path / "d", num_points=3)
    (run / "metrics.csv").unlink()
    with pytest.raises(rp.ReportError, match=r"d: missing metrics.csv"):
        rp.build_report([run], tmp_path / "out")
    run = write_synthetic_run(tmp_path / "e", num_points=3)
    (run / "config.json").write_text(json.dumps({"algo": "ppo", "env": {}}))
    with pytest.raises(rp.ReportError, match=r"missing key\(s\) env.id, seed"):
        rp.build_report([run], tmp_path / "out")


def test_mismatched_task_sets(tmp_path):
    for algo, task in (("ppo", "procgen:bigfish"), ("ppo", "procgen:coinrun"), ("dcpg", "procgen:bigfish")):
        write_synthetic_run(tmp_path / f"{algo}_{task[8:]}", algo=algo, env_id=task, num_points=3)
    with pytest.raises(rp.ReportError, match="different task sets \\(dcpg lacks procgen:coinrun\\)"):
        rp.build_report([tmp_path], tmp_path / "out")


def test_unknown_game_and_mixed_normalisations(tmp_path):
    write_synthetic_run(tmp_path / "a" / "r", env_id="atari:NotAGame", num_points=3)
    with pytest.raises(rp.ReportError, match="cannot normalise task 'atari:NotAGame'.*unknown Atari game"):
        rp.build_report([tmp_path / "a"], tmp_path / "out")
    write_synthetic_run(tmp_path / "b" / "r1", env_id="atari:Pong", num_points=3)
    write_synthetic_run(tmp_path / "b" / "r2", env_id="procgen:maze", num_points=3)
    with pytest.raises(rp.ReportError, match="different normalisations"):
        rp.build_report([tmp_path / "b"], tmp_path / "out")
    with pytest.raises(rp.ReportError, match="unknown normalisation 'zscore'"):
        rp.build_report([tmp_path / "b" / "r1"], tmp_path / "out", normalization="zscore")


def test_duplicate_seeds_and_unknown_baseline(tmp_path):
    write_synthetic_run(tmp_path / "r1", seed=3, num_points=3)
    write_synthetic_run(tmp_path / "r2", seed=3, num_points=3)
    with pytest.raises(rp.ReportError, match="duplicate runs for algo 'ppo'.*seed\\(s\\) \\[3\\]"):
        rp.build_report([tmp_path], tmp_path / "out")
    with pytest.raises(rp.ReportError, match="ppo_baseline 'sac' is not among"):
        rp.build_report([tmp_path / "r1"], tmp_path / "out", ppo_baseline="sac")


def test_expand_run_dirs_skips_hidden_and_nested(tmp_path):
    write_synthetic_run(tmp_path / "sweep" / "a", num_points=2)
    write_synthetic_run(tmp_path / "sweep" / "b", seed=1, num_points=2)
    write_synthetic_run(tmp_path / "sweep" / ".logs" / "not_a_run", num_points=2)
    (tmp_path / "sweep" / "a" / "checkpoints").mkdir()
    found = expand_run_dirs([tmp_path / "sweep", tmp_path / "sweep" / "a"])
    assert [p.name for p in found] == ["a", "b"]
    assert all(isinstance(e, ValueError) for e in (rp.ReportError("x"), RunDirError("y")))


def test_partial_sources_and_uneven_seed_counts(tmp_path):
    for algo, task, seeds, evals in (
        ("ppo", "procgen:bigfish", (0, 1, 2), True),
        ("ppo", "procgen:coinrun", (0, 1), True),
        ("dcpg", "procgen:bigfish", (0, 1), False),
        ("dcpg", "procgen:coinrun", (0, 1), False),
    ):
        for seed in seeds:
            write_synthetic_run(
                tmp_path / "runs" / f"{algo}_{task[8:]}_{seed}",
                algo=algo,
                env_id=task,
                seed=seed,
                num_points=4,
                curve=lambda s, seed=seed: 6.0 + seed + 0 * s,
                eval_curves={"test": lambda s: 7.0 + 0 * s} if evals else None,
            )
    path = rp.build_report([tmp_path / "runs"], tmp_path / "out", reps=30, poi_reps=20)
    text = path.read_text()
    test_section = _section(text, "## Final scores: evaluation on the test split")
    assert _row(test_section, "procgen:bigfish") == ["n/a", "7.00 ± 0.00"]
    assert "no aggregate statistics" in test_section
    episodes = _section(text, "## Final scores: training episodes")
    assert _row(episodes, "procgen:bigfish") == ["6.50 ± 0.71", "**7.00 ± 1.00**"]
    assert "ppo has different seed counts across tasks" in episodes
    data = json.loads((tmp_path / "out" / "aggregates.json").read_text())
    assert "aggregates" not in data["sources"]["eval/test"]
    # ppo's matrix uses seeds 0 and 1 of each task: min-max of 6 and 7 on bigfish and coinrun
    expected = np.mean([(6 - 1) / 39, (7 - 1) / 39, (6 - 5) / 5, (7 - 5) / 5])
    assert data["sources"]["train_episodes"]["aggregates"]["ppo"]["mean"]["point"] == pytest.approx(expected)
