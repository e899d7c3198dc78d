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
        (["train", "ppo"], "missing --env"),
        (["train", "ppo", "--env", "corridor:Corridor-v0"], "'gym:corridor:Corridor-v0'"),
        (["train", "ppo", "--env", "gym:no_such_module_x:X-v0"], "cannot import module 'no_such_module_x'"),
        (["train", "ppo", "--env", "factory:json:no_such_fn"], "has no attribute 'no_such_fn'"),
        (["train", "ppo", "--env", "CartPole-v1", "--import", "no_such_module_y"], "env.imports"),
        (["train", "ppo", "--env", "CartPole-v1", "--set", "logging.progress_every_s=-1"],
         "logging.progress_every_s"),
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


def test_analyze_gradient_accuracy_of_a_td3_run(tmp_path, capsys):
    import json

    run = tmp_path / "td3"
    assert main(["train", "td3", "--env", "mujoco:InvertedPendulum-v4", "--run-dir", str(run), "--total-steps",
                 "300", "--quiet", "--set", "eval.episodes=0", "--set", "params.learning_starts=100",
                 "--set", "params.steps_per_iteration=100", "--set", "params.batch_size=16",
                 "--set", "params.actor_hidden=[16,16]", "--set", 'params.critic_options={"hidden_sizes":[16,16]}',
                 "--set", "env.num_envs=1", "--set", "torch_threads=1"]) == 0
    capsys.readouterr()
    out_file = tmp_path / "acc.json"
    assert main(["analyze", "gradient-accuracy", str(run), "--num-states", "3", "--horizon", "5",
                 "--device", "cpu", "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert result["analysis"] == "gradient_accuracy" and result["step"] == 300
    cosines = [c for c in result["cosines"] if c == c]  # NaN: a zero gradient has no cosine
    assert len(result["cosines"]) == 3 and all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cosines)
    assert 0.0 <= result["grad_cs/frac_gt_0.5"] <= result["grad_cs/frac_gt_0"] <= 1.0


def test_analyze_gradient_noise_of_a_maml_run_and_wrong_algorithm(tmp_path, capsys):
    import json

    run = tmp_path / "maml"
    assert main(["train", "maml", "--env", "gym:aclab/MetaPointNav-v0", "--run-dir", str(run), "--total-steps",
                 "200", "--quiet", "--set", "eval.episodes=0", "--set", "params.meta_batch_size=2",
                 "--set", "params.episodes_per_task=2", "--set", "params.num_train_tasks=4",
                 "--set", "params.num_test_tasks=2", "--set", "params.hidden_sizes=[8,8]",
                 "--set", 'env.options={"horizon": 8}', "--set", "params.eval_every=0"]) == 0
    capsys.readouterr()
    out_file = tmp_path / "noise.json"
    assert main(["analyze", "gradient-noise", str(run), "--updates", "3", "--episodes", "2", "--device", "cpu",
                 "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert len(result["return_pre"]) == len(result["return_post"]) == 3
    assert result["return_post_std"] >= 0.0 and result["return_post_mean"] == pytest.approx(
        sum(result["return_post"]) / 3)
    ppo = tmp_path / "ppo"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(ppo), "--total-steps", "512", "--quiet",
                 "--set", "eval.episodes=0"]) == 0
    capsys.readouterr()
    assert main(["analyze", "gradient-noise", str(ppo), "--device", "cpu"]) == 2
    assert "needs a MAML run" in capsys.readouterr().err
    assert main(["analyze", "gradient-accuracy", str(ppo), "--device", "cpu"]) == 2
    assert "needs an off-policy actor-critic run" in capsys.readouterr().err
