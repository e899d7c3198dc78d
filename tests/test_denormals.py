"""Flush-to-zero mode (``flush_denormal``): what it does to float32 arithmetic, and that the run's setting
reaches training, evaluation and the analyses, survives a resume and is off for runs saved before it existed."""

from __future__ import annotations

import json
import platform

import pytest
import torch

from aclab.cli import main
from aclab.config import ConfigError
from aclab.core.threads import denormals_flushed, flush_denormals
from aclab.train import load_run_config, make_config, resume_config, train

# x86-64 (SSE's FTZ/DAZ bits) and 64-bit ARM (FPCR.FZ) have the mode
HAS_FLUSH_MODE = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")
pytestmark = pytest.mark.skipif(not HAS_FLUSH_MODE, reason="no flush-to-zero mode on this CPU")

DENORMAL_BITS = 1 << 19  # float32 2**-130 (smallest normal 2**-126)


def _float32(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def _bits(x: torch.Tensor) -> list[int]:
    return x.view(torch.int32).tolist()


def test_the_mode_flushes_denormal_results_and_operands_and_leaves_normal_numbers_alone():
    one = 0x3F800000  # 1.0
    smallest_normal = 0x00800000  # 2**-126
    x = _float32([DENORMAL_BITS, one, smallest_normal])
    flush_denormals(True)
    assert _bits(x * 1.0) == [0, one, smallest_normal]          # a denormal operand reads as 0
    assert _bits(_float32([smallest_normal]) * 0.5) == [0]       # a denormal result is written as 0
    assert denormals_flushed()
    flush_denormals(False)
    assert _bits(x * 1.0) == [DENORMAL_BITS, one, smallest_normal]  # IEEE: exact
    assert _bits(_float32([smallest_normal]) * 0.5) == [smallest_normal >> 1]
    assert not denormals_flushed()


def test_adams_moments_of_a_weight_without_gradient_decay_to_zero_instead_of_into_denormals():
    """Why the mode exists: a weight whose gradient stays 0 (a dead ReLU unit) keeps multiplying its first
    moment by beta1 = 0.9; from 1e-37 that takes it below 2**-126 within 30 steps. With the mode it is 0;
    without it a denormal (the slow path)."""
    from aclab.algos.common import adam_step, make_adam

    for flush in (False, True):
        flush_denormals(flush)
        weight = torch.nn.Parameter(torch.zeros(4))
        optimizer = make_adam([weight], lr=1e-3)
        weight.grad = torch.full((4,), 1e-36)
        optimizer.step()  # creates the state: exp_avg = 1e-37 (normal)
        weight.grad = torch.zeros(4)
        for _ in range(30):
            adam_step(optimizer)
        exp_avg = optimizer.state[weight]["exp_avg"]
        bits = _bits(exp_avg)
        expected_value = 1e-37 * 0.9**30  # ~4.2e-39, below 2**-126 ~ 1.18e-38
        if flush:
            assert bits == [0] * 4
        else:
            assert all(0 < b < 0x00800000 for b in bits)  # denormal, not zero
            assert abs(float(exp_avg.double()[0]) - expected_value) < 1e-3 * expected_value


class _RecordMode:
    def __init__(self):
        self.seen = []

    def on_iteration(self, info):
        self.seen.append(denormals_flushed())


@pytest.mark.parametrize("flush", [True, False])
def test_training_runs_with_the_configs_mode(tmp_path, flush):
    flush_denormals(not flush)
    config = make_config("ppo", "CartPole-v1", overrides=[f"flush_denormal={str(flush).lower()}", "total_steps=1024",
                                                          "progress=false", "eval.episodes=0"])
    recorder = _RecordMode()
    train(config, tmp_path / "run", callbacks=[recorder])
    assert recorder.seen and all(mode == flush for mode in recorder.seen)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["flush_denormal"] is flush


def test_the_default_is_on_and_a_run_saved_before_the_key_existed_keeps_ieee_denormals(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512",
                 "--quiet", "--set", "eval.episodes=0"]) == 0
    assert denormals_flushed() and load_run_config(run).flush_denormal is True
    saved = json.loads((run / "config.json").read_text())
    del saved["flush_denormal"]
    (run / "config.json").write_text(json.dumps(saved))
    assert load_run_config(run).flush_denormal is False
    assert resume_config(run, ["total_steps=1024"]).flush_denormal is False
    with pytest.raises(ConfigError, match="flush_denormal"):  # it changes the arithmetic: fixed on resume
        resume_config(run, ["flush_denormal=true"])


def test_evaluation_and_the_analyses_use_the_runs_mode(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512",
                 "--quiet", "--set", "eval.episodes=0", "--set", "flush_denormal=false"]) == 0
    assert not denormals_flushed()
    for flush in (False, True):
        saved = json.loads((run / "config.json").read_text())
        saved["flush_denormal"] = flush
        (run / "config.json").write_text(json.dumps(saved))
        flush_denormals(not flush)
        assert main(["eval", str(run), "--episodes", "1", "--no-log"]) == 0
        assert denormals_flushed() is flush
        flush_denormals(not flush)
        assert main(["analyze", "value-bias", str(run), "--episodes", "1", "--device", "cpu"]) == 0
        assert denormals_flushed() is flush
    capsys.readouterr()


class _ClosedChannel:
    """The learner's end of an actor's channel, closed at once: the actor announces itself and stops."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)

    def recv(self):
        return None

    def close(self):
        pass


@pytest.mark.parametrize("flush", [True, False])
def test_actor_processes_compute_in_the_runs_mode(flush):
    """IMPALA / STAC actors act in their own processes (local or Ray): each sets the run's mode when it
    starts, as the learner does. Both start functions are run here, in the test's thread."""
    from aclab.algos.impala import make_acting_policy
    from aclab.data.actors import _local_actor_main, _RayActor, make_actor_specs

    config = make_config("impala", "CartPole-v1", overrides=[
        "progress=false", "eval.episodes=0", "env.backend=gymnasium", "env.num_envs=2", "params.num_steps=8",
        "params.hidden_sizes=[16]", f"flush_denormal={str(flush).lower()}"])
    (spec,) = make_actor_specs(config, make_acting_policy, 1, 2, 8, 0)
    previous = torch.get_num_threads()
    try:
        flush_denormals(not flush)
        channel = _ClosedChannel()
        _local_actor_main(spec, None, channel, is_process=True)
        assert channel.sent and channel.sent[0][0] == "ready"
        assert denormals_flushed() is flush
        flush_denormals(not flush)
        _RayActor(spec)
        assert denormals_flushed() is flush
    finally:
        torch.set_num_threads(previous)
