"""Fixtures the test modules share (a module opts in with `pytestmark = pytest.mark.usefixtures(...)`)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The models are tiny: a second intra-op thread buys nothing, and on a loaded machine every parallel region
    waits for it (20 ms per op instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
