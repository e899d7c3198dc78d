"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Small networks on a shared 2-core machine are bound by per-call overhead: one intra-op thread, as
    the training loop's automatic setting uses for them (a second thread only adds contention). Modules
    of small-network tests apply it to every test with ``pytestmark = pytest.mark.usefixtures(...)``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
