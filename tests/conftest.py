"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run the test with one torch thread (as a torchrun worker here, and so that a test's
    tiny tensors do not pay for thread start-up on a 2-core machine), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
