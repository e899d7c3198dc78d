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
