"""Fixtures shared by the test files."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (make test) each core runs a worker of its own: one torch thread each, and
# one for the processes the tests start, else their OpenMP threads spin-wait on each other's
# cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture()
def one_thread():
    """Run the test with one torch thread (as a torchrun worker here, and so that a test's
    tiny tensors do not pay for thread start-up on a 2-core machine), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tiny random diffusers pipelines (bns.integrations.diffusers.tiny), built once per session and
# shared by the test files that run them; diffusers is imported only when one is asked for.
# Tests that swap a pipeline's scheduler put it back.
@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A folder holding the tiny CLIP tokenizer's files."""
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="session")
def sd(tok):
    from bns.integrations.diffusers import tiny

    return tiny.sd(tok)


@pytest.fixture(scope="session")
def sdxl(tok):
    from bns.integrations.diffusers import tiny

    return tiny.sdxl(tok)


@pytest.fixture(scope="session")
def sd3(tok):
    from bns.integrations.diffusers import tiny

    return tiny.sd3(tok)


# The files of multi-process jobs take a third of the suite: collected first, so that make
# test's workers (which take whole files, in this order with --no-loadscope-reorder) start
# them at once and share the rest, instead of one of them starting one at the end.
FIRST = ("test_benchmarks.py", "test_distributed.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order
