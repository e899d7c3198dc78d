"""The command line: bad input gives one clear line and exit code 2; train/eval/list work."""

import subprocess
import sys

import pytest

from aclab.cli import main


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "ppq", "--env", "CartPole-v1"], "unknown algorithm 'ppq'"),
        (["train", "ppo", "--env", "CartPol-v1"], "CartPol-v1"),
        (["train", "ppo", "--env", "procgen:bigfsh"], "bigfish"),
        (["train", "ppo", "--env", "nosuchfamily:x"], "nosuchfamily"),
        (["train", "ppo", "--env", "CartPole-v1", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "ppo", "--env", "CartPole-v1", "--set", "params.lr=fast"], "params.lr='fast'"),
        (["train", "ppo", "--env", "CartPole-v1", "--set", "params.bogus=1"], "unknown config key 'params.bogus'"),
        (["train", "ppo", "--env", "CartPole-v1", "--set", "env.num_envs=-3"], "env.num_envs=-3"),
        (["train"], "missing algorithm"),
        (["eval", "/nonexistent/run"], "not a run directory"),
        (["train", "--resume", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aclab: error:"), err
    assert fragment in err[0]


def test_bad_input_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "aclab", "train", "ppo", "--env", "CartPole-v1", "--set", "lr=x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "params.lr='x'" in proc.stderr


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("ppo", "procgen", "ppo-procgen", "ppo-classic", "atari"):
        assert word in out


def test_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "1024",
                 "--quiet", "--set", "eval.episodes=2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "final_return" in out
    assert main(["eval", str(run), "--episodes", "4", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "over 4 episodes" in out
    evals = (run / "evals.csv").read_text().strip().splitlines()
    assert len(evals) == 3  # header, end-of-training eval, the eval command


def test_analyze_value_bias_and_wrong_analysis(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "1024",
                 "--quiet", "--set", "eval.episodes=0"]) == 0
    capsys.readouterr()
    out_file = tmp_path / "bias.json"
    assert main(["analyze", "value-bias", str(run), "--episodes", "6", "--device", "cpu",
                 "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert result["num_episodes"] + result["num_truncated_excluded"] == 6
    assert main(["analyze", "ood-actions", str(run), "--device", "cpu"]) == 2
    assert "no dynamics discriminator" in capsys.readouterr().err
