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
