"""The command line: bad input gives one clear line and exit code 2; train/eval/list work."""

import math
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
    assert "over 4 episodes" in out and "evals_adhoc.csv" in out
    evals = (run / "evals.csv").read_text().strip().splitlines()
    assert len(evals) == 2  # header, end-of-training eval: an ad-hoc eval never enters the run's record
    adhoc = (run / "evals_adhoc.csv").read_text().strip().splitlines()
    assert len(adhoc) == 2 and adhoc[0].endswith(",deterministic") and adhoc[1].startswith("1024,test,")
    assert main(["eval", str(run), "--episodes", "2", "--out", str(run / "evals.csv")]) == 2
    assert "evals.csv holds the training loop's own evaluations" in capsys.readouterr().err


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
    # CartPole pays 1 per step, so each G_0 is (1 - gamma^L) / (1 - gamma) for a whole episode length L,
    # with the run's gamma (0.99)
    assert result["gamma"] == 0.99 and len(result["returns"]) == result["num_episodes"] > 0
    for g in result["returns"]:
        length = math.log(1 - 0.01 * g) / math.log(0.99)
        assert length >= 1 and abs(length - round(length)) < 1e-6, g
    bias = sum(v - g for v, g in zip(result["values"], result["returns"])) / len(result["returns"])
    assert result["bias"] == pytest.approx(bias, rel=1e-6)
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


# ---------------------------------------------------------------------------------------------
# Every bad input: exit 2, one to three lines, no traceback, and no run directory created
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished PPO run and broken copies of it."""
    import shutil

    base = tmp_path_factory.mktemp("runs")
    run = base / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "256", "--quiet",
                 "--set", "eval.episodes=0"]) == 0
    variants = {"empty": "", "truncated": run.joinpath("config.json").read_text()[:40], "no_algo": '{"seed": 1}'}
    for name, text in variants.items():
        shutil.copytree(run, base / name)
        (base / name / "config.json").write_text(text)
    shutil.copytree(run, base / "unreadable")
    for path in (base / "unreadable" / "checkpoints").glob("ckpt_*.pt"):
        path.write_bytes(b"torn")
    (base / "a_file").write_text("not a directory")
    return base


NEW = ["--quiet", "--run-dir", "{base}/new"]
BAD_INPUTS = [
    (["train", "ppo", "--env", "CartPole-v1", "--total-steps", "nan", *NEW], "total_steps='nan': expected an integer"),
    (["train", "ppo", "--env", "CartPole-v1", "--total-steps", "inf", *NEW], "total_steps='inf': expected an integer"),
    (["train", "ppo", "--env", "CartPole-v1", "--total-steps", "0", *NEW], "total_steps=0"),
    (["train", "ppo", "--env", "CartPole-v1", "--device", "cuda", *NEW], "no CUDA GPU is available"),
    (["train", "sac", "--env", "CartPole-v1", *NEW], "cannot train sac on CartPole-v1: off-policy"),
    (["train", "td3", "--env", "CartPole-v1", *NEW], "cannot train td3 on CartPole-v1"),
    (["train", "maml", "--env", "CartPole-v1", *NEW], "cannot train maml on CartPole-v1: meta-RL needs"),
    (["train", "pearl", "--env", "CartPole-v1", *NEW], "cannot train pearl on CartPole-v1"),
    (["train", "ppo", "--env", "CartPole-v1", "--set", "params.lr=inf", *NEW], "params.lr='inf': expected a finite"),
    (["train", "ppo", "--env", "CartPole-v1", "--set", "params.lr=nan", *NEW], "params.lr='nan'"),
    (["train", "ppo", "--env", "CartPole-v1", "--set", "params.num_minibatches=1000", *NEW],
     "params.num_minibatches=1000: expected at most the batch"),
    (["train", "ppo", "--env", "CartPole-v1", "--quiet", "--run-dir", "{base}/a_file"], "is a file, not a directory"),
    (["train", "ppo", "--env", "CartPole-v1", "--start-over", *NEW], "--start-over goes with --resume"),
    (["train", "--resume", "{base}/empty"], "config.json is unreadable"),
    (["train", "--resume", "{base}/truncated"], "config.json is unreadable"),
    (["train", "--resume", "{base}/no_algo"], "has no 'algo' entry"),
    (["train", "--resume", "{base}/a_file"], "is not a run directory (it is a file)"),
    (["train", "--resume", "{base}/run", "--set", "params.hidden_sizes=[32]"],
     "cannot change params.hidden_sizes on resume"),
    (["train", "--resume", "{base}/run", "--set", "env.num_envs=8"], "cannot change env.num_envs on resume"),
    (["train", "--resume", "{base}/run", "--seed", "5"], "cannot change seed on resume"),
    (["train", "--resume", "{base}/unreadable"], "no checkpoint can be read"),
    (["eval", "{base}/empty"], "config.json is unreadable"),
    (["eval", "{base}/truncated"], "config.json is unreadable"),
    (["eval", "{base}/no_algo"], "has no 'algo' entry"),
    (["eval", "{base}/run", "--episodes", "0"], "--episodes 0: expected an integer >= 1"),
    (["eval", "{base}/run", "--episodes", "-3"], "--episodes -3: expected an integer >= 1"),
    (["eval", "{base}/unreadable"], "has no readable checkpoint"),
    (["sweep", "{base}/bad_algo.toml", "--dry-run"], "algo='ppq'"),
    (["sweep", "{base}/bad_env.toml", "--dry-run"], "CartPol-v1"),
    (["sweep", "{base}/bad_key.toml", "--dry-run"], "unknown config key 'params.bogus'"),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS, ids=[" ".join(a[:3]) + f" [{i}]" for i, (a, _) in
                                                          enumerate(BAD_INPUTS)])
def test_every_bad_input_is_a_short_error_with_exit_2(argv, fragment, finished_run, capsys):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    for name, text in (("bad_algo", 'algos = ["ppq"]\nenvs = ["CartPole-v1"]'),
                       ("bad_env", 'algos = ["ppo"]\nenvs = ["CartPol-v1"]'),
                       ("bad_key", 'algos = ["ppo"]\nenvs = ["CartPole-v1"]\noverrides = { "params.bogus" = 1 }')):
        (finished_run / f"{name}.toml").write_text(f'{text}\nseeds = [1]\nout_dir = "sweep"\n')
    argv = [a.replace("{base}", str(finished_run)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 <= len(err) <= 3 and err[0].startswith("aclab: error:"), err
    assert fragment in " ".join(err) and "Traceback" not in " ".join(err)
    assert not (finished_run / "new").exists() and not (finished_run / "sweep").exists()


def test_a_locked_run_is_refused_with_exit_2(finished_run, capsys):
    from aclab.runs import Run

    holder, _ = Run.resume(finished_run / "run")
    try:
        assert main(["train", "--resume", str(finished_run / "run")]) == 2
        assert "is in use by another aclab process" in capsys.readouterr().err
    finally:
        holder.close()
