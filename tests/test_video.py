"""``aclab eval RUN --video DIR``: MP4s (imageio-ffmpeg's own ffmpeg) and GIFs of evaluation episodes, from
the final or the best checkpoint, for classic control, Procgen, Atari and MuJoCo."""

from __future__ import annotations

import csv
import json
import re

import imageio.v2 as imageio
import numpy as np
import pytest

from aclab.cli import main
from aclab.envs import EnvIdError, make_env
from aclab.evaluate.video import enlarge, record_videos
from aclab.runs import Run
from aclab.train import make_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frames(path) -> list[np.ndarray]:
    with imageio.get_reader(str(path)) as reader:
        return [np.asarray(frame) for frame in reader]


def test_eval_video_mp4_and_gif_of_the_final_and_best_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "3072", "--quiet",
                 "--set", "eval.every_steps=1024", "--set", "eval.episodes=3", "--seed", "2"]) == 0
    capsys.readouterr()
    evals = [r for r in csv.DictReader((run / "evals.csv").open()) if r["split"] == "test"]
    best = max(evals, key=lambda r: float(r["mean_return"]))  # the first of equal bests is kept
    best_steps = [int(r["step"]) for r in evals if float(r["mean_return"]) == float(best["mean_return"])]
    info = json.loads((run / "checkpoints" / "best.json").read_text())
    assert info["step"] == best_steps[0] and info["score"] == pytest.approx(float(best["mean_return"]))

    assert main(["eval", str(run), "--video", str(tmp_path / "v"), "--episodes", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("final checkpoint, step 3072" in line for line in lines)
    for line in lines:
        path, length = re.match(r"(\S+\.mp4): return [\d.]+, (\d+) steps", line).groups()
        frames = _frames(path)
        assert len(frames) == int(length) + 1  # the first observation, then one frame per step
        assert frames[0].shape == (400, 600, 3) and not np.array_equal(frames[0], frames[-1])

    assert main(["eval", str(run), "--video", str(tmp_path / "g"), "--gif", "--checkpoint", "best"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"best checkpoint, step {info['step']}" in line
    path, length = re.match(r"(\S+\.gif): return [\d.]+, (\d+) steps", line).groups()
    # Pillow merges identical consecutive frames (a CartPole cart that moves less than a pixel), so a GIF can
    # hold fewer frames than the episode's steps; how many depends on the episode the checkpoint plays.
    assert 2 <= len(_frames(path)) <= int(length) + 1
    assert main(["eval", str(run), "--checkpoint", "best", "--episodes", "2"]) == 0
    assert f"best checkpoint, step {info['step']}" in capsys.readouterr().out


class RandomPolicy:
    def __init__(self, spec):
        self.spec, self.rng = spec, np.random.default_rng(0)

    def act(self, obs, deterministic):
        if self.spec.discrete:
            return self.rng.integers(0, self.spec.num_actions, len(obs))
        return self.rng.uniform(-1, 1, (len(obs), self.spec.action_dim)).astype(np.float32)


@pytest.mark.parametrize("env_id, shape", [("procgen:bigfish", (256, 256, 3)), ("atari:Breakout", (420, 320, 3)),
                                           ("mujoco:HalfCheetah-v4", (480, 480, 3))])
def test_frames_of_each_family(tmp_path, env_id, shape):
    config = make_config("ppo", env_id, overrides=["env.num_envs=1"])
    probe = make_env(env_id, 1, 0)
    policy = RandomPolicy(probe.spec)
    probe.close()
    (path, _, _), = record_videos(policy, config, tmp_path, max_steps=6)
    frames = _frames(path)
    assert len(frames) == 7 and frames[0].shape == shape
    assert frames[0].std() > 5  # a picture, not a blank frame


def test_dm_control_says_why_there_is_no_video():
    with pytest.raises(EnvIdError, match="no frames"):
        make_env("dmc:cheetah-run", 1, 0, render=True)


def test_enlarge_repeats_pixels_to_even_sizes():
    frame = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    big = enlarge(frame, min_side=12)
    assert big.shape == (20, 12, 3)  # factor 4 (3 -> 12); 20 and 12 are even
    assert np.array_equal(big[::4, ::4], frame)
    assert enlarge(np.zeros((7, 300, 3), np.uint8), min_side=5).shape == (8, 300, 3)  # padded to even


def test_resume_drops_a_best_checkpoint_from_after_the_resumed_step(tmp_path):
    run = Run.create(tmp_path / "r", {"algo": "ppo"})
    run.save_checkpoint(200, {"algo": {"x": 1}})
    assert run.save_best_checkpoint(100, {"algo": {"x": 1}}, 5.0, "test")
    assert not run.save_best_checkpoint(150, {"algo": {"x": 2}}, 4.0, "test")  # worse: kept the old one
    assert run.save_best_checkpoint(300, {"algo": {"x": 3}}, 9.0, "test")
    run.close()  # one writer at a time: the first process ends before the resume
    reopened, _ = Run.resume(tmp_path / "r")  # continues from step 200: the best of step 300 is not yet found
    assert reopened.best_checkpoint_info() is None
    reopened.close()
