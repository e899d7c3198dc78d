"""The data-parallel learner: two gloo ranks with N/2 envs each make the update one process makes with N
envs on the same data (every on-policy family, IMPALA with summed and averaged losses, STAC's
meta-gradient), the normalisers' statistics merge to the single process's, and the single-process
helpers of aclab.distributed are the plain operations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_cases import CASES, build, normaliser_batches, record, run_case, run_normaliser

from aclab import distributed
from aclab.data.rollout import shuffled_minibatches

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CASES_SCRIPT = Path(__file__).with_name("distributed_cases.py")


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` (as ``python -m torch.distributed.run``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results]) for every case."""
    tmp = tmp_path_factory.mktemp("ddp")
    data, reference = {}, {}
    for name in CASES:
        items = record(name)
        generator_state = build(name).generator.get_state()
        data[name] = (items, generator_state)
        reference[name] = run_case(name, items, generator_state)
    reference["normaliser"] = run_normaliser(0, 1, None)
    torch.save({"cases": data}, tmp / "data.pt")
    torchrun(2, str(CASES_SCRIPT), str(tmp / "data.pt"), str(tmp))
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return reference, ranks


def _flat(state) -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) state as ``path -> float64 tensor``."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value.detach().double()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = torch.tensor(float(value), dtype=torch.float64)

    walk("", state)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_make_the_single_process_update(updates, name):
    reference, ranks = updates
    assert ranks[0]["world_size"] == 2
    expected = _flat({k: v for k, v in reference[name].items() if k != "meta_grad"})
    initial = _flat({k: v for k, v in build(name).state_dict().items() if k in reference[name]})
    moved = [k for k in initial if k in expected and not torch.equal(initial[k], expected[k])]
    assert moved, "the update changed nothing: the case tests nothing"
    for rank, got in enumerate(ranks):
        got = _flat({k: v for k, v in got[name].items() if k != "meta_grad"})
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=2e-4, atol=2e-5,
                                       msg=lambda m, key=key, rank=rank: f"{name} rank {rank} {key}: {m}")


def test_stac_meta_gradient_sees_the_whole_batch_gradient(updates):
    """STAC's meta-gradient differentiates the outer loss through theta' = RMSProp(theta, g), where g must be
    the whole batch's inner gradient (the all-reduce inside the graph): each rank's eta-gradient equals the
    single learner's (STAC paper, Section 8: the learner's gradients are averaged with an all-reduce)."""
    reference, ranks = updates
    expected = reference["stac"]["meta_grad"]
    assert expected is not None and expected.abs().max() > 0
    for got in ranks:
        torch.testing.assert_close(got["stac"]["meta_grad"], expected, rtol=1e-3, atol=1e-7)


def test_normaliser_statistics_merge_to_the_single_process_ones(updates):
    reference, ranks = updates
    for got in ranks:
        assert got["normaliser"]["count"] == reference["normaliser"]["count"]
        np.testing.assert_allclose(got["normaliser"]["mean"], reference["normaliser"]["mean"], rtol=1e-12)
        np.testing.assert_allclose(got["normaliser"]["var"], reference["normaliser"]["var"], rtol=1e-12)
    valid = np.concatenate([v for _, v in normaliser_batches()])
    assert reference["normaliser"]["count"] == valid.sum()


# ------------------------------------------------------------------------------------------------ one process
def test_single_process_context_is_the_plain_operation():
    dp = distributed.DataParallel()
    assert not dp.enabled and dp.is_main and dp.local_envs(6) == 6 and dp.rank_seed(3) == 3
    x = torch.randn(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dp.normalize(x), (x - x.mean()) / (x.std() + 1e-8))
    assert torch.equal(dp.max(x), x.max()) and torch.equal(dp.mean(x), x.mean())
    assert dp.share(5) == 1.0 and dp.sum_int(4) == 4 and dp.any(True) and not dp.any(False)
    batch = {"a": torch.arange(10.0), "b": torch.arange(10) * 2}
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours = list(dp.minibatches(batch, 3, g1, valid=torch.ones(2, 5, dtype=torch.bool)))
    plain = list(shuffled_minibatches(batch, 3, g2))
    assert [mb.weight for mb in ours] == [1.0] * 3
    for a, b in zip(ours, plain):
        assert all(torch.equal(a[k], b[k]) for k in batch)
    with pytest.raises(ValueError, match="not a multiple of the world size 2"):
        distributed.DataParallel(2, 0).local_envs(5)


# ------------------------------------------------------------------------------------------------ torchrun
RUN = ["ppo", "--env", "CartPole-v1", "--quiet", "--set", "env.num_envs=4", "--set", "params.num_steps=32",
       "--set", "env.backend=gymnasium", "--set", "env.normalize_obs=true", "--set", "env.normalize_reward=true",
       "--set", "checkpoint_every_iterations=2", "--set", "eval.episodes=2", "--set", "torch_threads=1"]


def _checkpoint(run_dir: Path) -> dict:
    from aclab.runs import load_latest_checkpoint

    return load_latest_checkpoint(run_dir / "checkpoints")


def test_torchrun_trains_with_two_ranks_rank_0_writes_and_the_run_resumes(tmp_path):
    """``torchrun --nproc-per-node 2 -m aclab train``: the config records world_size 2, rank 0 alone writes
    the logs (one row per iteration, episodes of all 4 envs) and evaluates, the checkpoint holds both ranks'
    states with identical networks and merged normaliser statistics but their own envs; resuming needs
    the same world size and continues the run."""
    import json

    from run_rows import metric_rows

    run_dir = tmp_path / "run"
    torchrun(2, "-m", "aclab", "train", *RUN, "--run-dir", str(run_dir), "--set", "total_steps=640")
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 640 and summary["world_size"] == 2
    assert [int(r["step"]) for r in metric_rows(run_dir)] == [128, 256, 384, 512, 640]
    envs_seen = {row.split(",")[1] for row in (run_dir / "episodes.csv").read_text().splitlines()[1:]}
    assert envs_seen == {"0", "1", "2", "3"}
    assert len((run_dir / "evals.csv").read_text().splitlines()) == 2  # header + rank 0's final evaluation

    checkpoint = _checkpoint(run_dir)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 1
    other = checkpoint["ranks"][0]
    for name, value in checkpoint["algo"]["net"].items():
        assert torch.equal(value, other["algo"]["net"][name]), name
    for norm in ("obs_normalizer", "reward_scaler"):
        mine, theirs = checkpoint["envs"][norm]["rms"], other["envs"][norm]["rms"]
        assert mine["count"] == theirs["count"] > 0
        np.testing.assert_array_equal(mine["mean"], theirs["mean"])
        np.testing.assert_array_equal(mine["var"], theirs["var"])
    assert not np.array_equal(checkpoint["envs"]["obs"], other["envs"]["obs"])  # each rank its own envs
    assert checkpoint["envs"]["obs_normalizer"]["rms"]["count"] == 4 + 640  # reset + every step of 4 envs

    alone = subprocess.run([sys.executable, "-m", "aclab", "train", "--resume", str(run_dir)], capture_output=True,
                           text=True)
    assert alone.returncode == 2 and "world_size=2" in alone.stderr and "torchrun --nproc-per-node 2" in alone.stderr
    torchrun(2, "-m", "aclab", "train", "--resume", str(run_dir), "--set", "total_steps=1280")
    assert [int(r["step"]) for r in metric_rows(run_dir)] == [128 * k for k in range(1, 11)]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1280


@pytest.mark.slow
def test_torchrun_run_stopped_by_sigterm_resumes_exactly(tmp_path):
    """SIGTERM to torchrun reaches every rank: they stop together after a checkpoint (status interrupted).
    Every rank's envs (Gymnasium simulators), RNGs and the shared minibatch generator are in that
    checkpoint: stopped-and-resumed equals uninterrupted, row for row."""
    import json
    import signal
    import time

    from run_rows import metric_rows

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    settings = [*RUN, "--set", "eval.episodes=0", "--set", "total_steps=2560"]
    torchrun(2, "-m", "aclab", "train", *settings, "--run-dir", str(whole))
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                              "--nproc-per-node", "2", "-m", "aclab", "train", *settings, "--run-dir", str(parts)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((parts / "metrics.csv").exists()
                                               and len(metric_rows(parts)) >= 3):
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=120)
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 3 <= len(metric_rows(parts)) < 20, summary
    torchrun(2, "-m", "aclab", "train", "--resume", str(parts))
    assert metric_rows(parts) == metric_rows(whole)
    a, b = _checkpoint(whole), _checkpoint(parts)
    for name, value in a["algo"]["net"].items():
        assert torch.equal(value, b["algo"]["net"][name]), name
