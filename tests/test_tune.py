"""``aclab tune``: Optuna search spaces from TOML, trials as ``aclab train`` processes through the sweep
backend, pruning on intermediate evaluations, a study in SQLite that a killed tuning resumes, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from aclab.cli import main  # noqa: E402
from aclab.train import train  # noqa: E402
from aclab.tune import (  # noqa: E402
    ask_trial,
    load_tune_spec,
    open_study,
    run_tune,
    trial_command,
)

SPEC = '''
algo = "ppo"
env = "CartPole-v1"
n_trials = {n_trials}
out_dir = "out"
pruner = "{pruner}"
pruner_startup_trials = 1
sampler_seed = 3

[overrides]
total_steps = 512
"eval.every_steps" = 256
"eval.episodes" = 3
"env.num_envs" = 2
"params.num_steps" = 64
"env.backend" = "gymnasium"
torch_threads = 1

[space]
"params.lr" = {{ low = 1e-4, high = 1e-2, log = true }}
"params.num_epochs" = {{ low = 1, high = 4 }}
"params.gae_lambda" = {{ choices = [0.9, 0.95] }}
'''


def _spec(tmp_path: Path, n_trials: int = 2, pruner: str = "median") -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(n_trials=n_trials, pruner=pruner))
    return path


def _evals(run_dir: Path, split: str = "test") -> list[dict]:
    return [r for r in csv.DictReader((run_dir / "evals.csv").open()) if r["split"] == split]


@pytest.mark.parametrize("edit, fragment", [
    (("n_trials = 2", "n_trails = 2"), "unknown tuning spec key 'n_trails' (did you mean 'n_trials'?)"),
    (('"params.lr" = {', '"params.lrr" = {'), "unknown config key 'params.lrr'"),
    (("low = 1e-4, high = 1e-2", "low = 1e-2, high = 1e-4"), "numbers low < high"),
    (("choices = [0.9, 0.95]", "choices = []"), "a non-empty list"),
    (('"eval.every_steps" = 256', ""), "pruning needs intermediate evaluations"),
    (('pruner = "median"', 'pruner = "hyper"'), "pruner='hyper'"),
])
def test_bad_specs_fail_at_once_naming_the_key(tmp_path, capsys, edit, fragment):
    path = _spec(tmp_path)
    path.write_text(path.read_text().replace(*edit))
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "out" / "study.db").exists()


def test_space_types_and_trial_command(tmp_path):
    spec = load_tune_spec(_spec(tmp_path))
    kinds = {p.key: p.kind for p in spec.space}
    assert kinds == {"params.lr": "float", "params.num_epochs": "int", "params.gae_lambda": "categorical"}
    command = trial_command(spec, {"params.lr": 0.001, "params.num_epochs": 3, "params.gae_lambda": 0.95},
                            tmp_path / "t", resume=False, prefix=["aclab"])
    sets = [command[i + 1] for i, c in enumerate(command) if c == "--set"]
    assert sets[-3:] == ["params.lr=0.001", "params.num_epochs=3", "params.gae_lambda=0.95"]
    assert trial_command(spec, {}, tmp_path / "t", resume=True, prefix=["aclab"]) == [
        "aclab", "train", "--resume", str(tmp_path / "t"), "--quiet"]


def test_tune_runs_trials_with_their_parameters_and_reports_the_best(tmp_path, capsys):
    assert main(["tune", str(_spec(tmp_path, n_trials=2, pruner="none"))]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="spec", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        config = json.loads((run_dir / "config.json").read_text())
        assert config["params"]["lr"] == pytest.approx(t.params["params.lr"])  # the trial trained what it says
        assert config["params"]["num_epochs"] == t.params["params.num_epochs"]
        assert config["params"]["gae_lambda"] == t.params["params.gae_lambda"]
        assert t.value == pytest.approx(float(_evals(run_dir)[-1]["mean_return"]))  # the final evaluation
        # periodic evaluations at 256 and 512; the one at total_steps (512) is also the final one (not repeated)
        periodic = [int(r["step"]) for r in _evals(run_dir)]
        assert periodic == [256, 512] and sorted(t.intermediate_values) == periodic  # reported from the trial
        assert t.intermediate_values[256] == pytest.approx(float(_evals(run_dir)[0]["mean_return"]), abs=1e-3)
    best = max(trials, key=lambda t: t.value)
    report = (tmp_path / "out" / "tune_report.md").read_text()
    assert f"Best: trial {best.number}" in report and "## Parameter importances" in report
    assert "`params.lr` |" in report and "tuning report written" in out
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [float(r["value"]) for r in rows] == [pytest.approx(t.value) for t in trials]


def test_a_trial_below_the_median_is_pruned_at_its_evaluation(tmp_path):
    """The study holds one finished trial whose evaluation at step 256 scored 1e9: the median pruner stops
    the new trial after its own evaluation at step 256, with a checkpoint and no final evaluation."""
    spec = load_tune_spec(_spec(tmp_path, n_trials=2))
    study = open_study(spec)
    study.add_trial(optuna.trial.create_trial(
        params={"params.lr": 1e-3, "params.num_epochs": 2, "params.gae_lambda": 0.9},
        distributions={p.key: p.distribution() for p in spec.space}, value=1e9, intermediate_values={256: 1e9}))
    run_tune(spec, log=None)
    trial = study.get_trials()[1]
    assert trial.state.name == "PRUNED"
    run_dir = Path(trial.user_attrs["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 256
    evals = _evals(run_dir)
    assert [int(r["step"]) for r in evals] == [256]  # no final evaluation
    assert trial.intermediate_values == {256: pytest.approx(float(evals[0]["mean_return"]))}


def test_a_killed_tuning_resumes_its_running_trial(tmp_path):
    """A killed session leaves a RUNNING trial whose run stopped at a checkpoint: the next session resumes
    that run (same parameters); the study then has its n_trials (here 2: one new trial)."""
    spec = load_tune_spec(_spec(tmp_path, n_trials=2, pruner="none"))
    study = open_study(spec)
    trial = ask_trial(study, spec)  # what the killed session had started
    run_dir = Path(trial.user_attrs["run_dir"])
    from aclab.train import make_config

    config = make_config("ppo", "CartPole-v1", None, [*spec.overrides, "seed=1", "progress=false", *(
        f"{k}={v}" for k, v in trial.params.items())])
    assert train(config, run_dir, stop_after_iterations=2)["status"] == "interrupted"
    assert study.get_trials()[0].state.name == "RUNNING"

    run_tune(spec, log=None, max_parallel=2)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    log = (tmp_path / "out" / ".logs" / f"{run_dir.name}.log").read_text()
    assert "train --resume" in log
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 512
    assert trials[0].params == trial.params
    assert trials[0].value == pytest.approx(float(_evals(run_dir)[-1]["mean_return"]))


def test_report_only_needs_a_study(tmp_path, capsys):
    assert main(["tune", str(_spec(tmp_path)), "--report-only"]) == 2
    assert "no study yet" in capsys.readouterr().err


@pytest.mark.slow
def test_trials_run_as_ray_tasks(tmp_path):
    pytest.importorskip("ray")
    path = _spec(tmp_path, n_trials=2, pruner="none")
    path.write_text(path.read_text().replace('out_dir = "out"', 'out_dir = "out"\nbackend = "ray"\nmax_parallel = 2'))
    run_tune(path, log=None)
    study = optuna.load_study(study_name="spec", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
