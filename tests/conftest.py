"""Fixtures shared by the test modules."""

import pytest
import torch

from aclab.core.threads import flush_denormals


@pytest.fixture(autouse=True)
def ieee_denormals_after_each_test():
    """``aclab.train.train`` (and eval, analyze) turn on the run's flush-to-zero mode for the process; every
    test starts from IEEE denormals again, so that no test's arithmetic depends on the tests before it."""
    yield
    flush_denormals(False)


@pytest.fixture
def one_torch_thread():
    """Small networks on a shared 2-core machine are bound by per-call overhead: one intra-op thread, as
    the training loop's automatic setting uses for them (a second thread only adds contention). Modules
    of small-network tests apply it to every test with ``pytestmark = pytest.mark.usefixtures(...)``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
