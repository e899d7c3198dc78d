"""Thread settings: the automatic defaults, --threads on every entry point, passive OpenMP waiting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import aclab.core.threads as threads
from aclab import sweep as sw
from aclab.cli import main
from aclab.core.threads import available_cores, default_threads, set_threads


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_default_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads((4,)) == 1                       # MLPs: a second thread loses on a busy machine
    assert default_threads(None) == 1
    assert default_threads((3, 64, 64)) == available_cores()  # convolutions: all cores pay
    assert default_threads((3, 64, 64), device="meta") == 1   # a device: the host only feeds it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                # a sweep's budget per run
    assert default_threads((3, 64, 64)) == 1


def test_default_threads_for_images_read_a_positive_omp_budget_and_else_take_every_core(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 7)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_threads((3, 64, 64)) == 7 and threads.default_threads((4,)) == 1
    for budget, expected in (("1", 1), ("3", 3), ("0", 7), ("", 7), ("two", 7), ("-2", 7)):
        monkeypatch.setenv("OMP_NUM_THREADS", budget)
        assert threads.default_threads((3, 64, 64)) == expected, budget
        assert threads.default_threads((64, 64)) == 1 and threads.default_threads((1, 3, 8, 8)) == 1


def test_available_cores_counts_the_affinity_mask_and_else_the_cpu_count(monkeypatch):
    """The cores this process may run on (a container or `taskset` narrows them), at least 1; where the
    OS has no affinity call, os.cpu_count(), and 1 when that is unknown."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert threads.available_cores() == 3
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(), raising=False)
    assert threads.available_cores() == 1
    monkeypatch.delattr(threads.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 6)
    assert threads.available_cores() == 6
    monkeypatch.setattr(threads.os, "cpu_count", lambda: None)
    assert threads.available_cores() == 1


def test_restore_process_default_gives_back_torchs_count_from_import_time(monkeypatch):
    monkeypatch.setattr(threads, "_PROCESS_DEFAULT", 3)
    torch.set_num_threads(1)
    threads.restore_process_default()
    assert torch.get_num_threads() == 3


def test_set_threads_uses_a_positive_request_and_else_the_default():
    torch.set_num_threads(2)
    assert set_threads(0, obs_shape=(4,)) == 1 and torch.get_num_threads() == 1
    assert set_threads(3, obs_shape=(4,)) == 3 and torch.get_num_threads() == 3
    with pytest.raises(ValueError, match=r"threads must be >= 1 or 0/None for the default, got -1"):
        set_threads(-1)


def test_set_threads_passes_the_observation_shape_and_the_device_to_the_default(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert threads.set_threads(None, obs_shape=(3, 8, 8)) == 3 and torch.get_num_threads() == 3
    assert threads.set_threads(0, obs_shape=(3, 8, 8), device="meta") == 1 and torch.get_num_threads() == 1
    assert threads.set_threads(None) == 1


def test_every_entry_point_sets_threads(tmp_path, capsys):
    run = tmp_path / "run"
    torch.set_num_threads(2)
    assert main(["train", "ppo", "--env", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512",
                 "--quiet", "--set", "eval.episodes=0", "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3
    torch.set_num_threads(2)
    assert main(["eval", str(run), "--episodes", "1", "--no-log"]) == 0  # the run's torch_threads (3)
    assert torch.get_num_threads() == 3
    assert main(["eval", str(run), "--episodes", "1", "--no-log", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["analyze", "value-bias", str(run), "--episodes", "1", "--device", "cpu", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--reps", "20"]) == 0
    assert torch.get_num_threads() == 1
    capsys.readouterr()


def test_negative_threads_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "nowhere", "--threads", "-1"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_sweep_passes_threads_to_every_run(tmp_path):
    spec = tmp_path / "grid.toml"
    spec.write_text(f'out_dir = "{tmp_path / "out"}"\nalgos = ["ppo"]\nenvs = ["CartPole-v1"]\nseeds = [1, 2]\n')
    jobs = sw.plan_sweep(sw.load_sweep_spec(spec), threads=2)
    assert len(jobs) == 2 and all(job.command[-2:] == ["--threads", "2"] for job in jobs)
    assert all("--threads" not in job.command for job in sw.plan_sweep(sw.load_sweep_spec(spec)))


@pytest.mark.parametrize("torch_first,expected", [(False, "PASSIVE"), (True, "unset")])
def test_importing_aclab_first_makes_openmp_wait_passively(torch_first, expected):
    imports = "import torch, aclab" if torch_first else "import aclab, torch"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"{imports}; import os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
