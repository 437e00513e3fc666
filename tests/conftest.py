"""Test setup: Triton runs in its CPU interpreter when no GPU is visible.

TRITON_INTERPRET must be set before triton is first imported, which is why it happens here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# SIGTERM stops the run like Ctrl-C: the summary and --junitxml still come out (benchmarks/gpu_session.sh
# stops its steps with SIGTERM at its deadline).
from llama_fast.testing import stop_on_sigterm  # noqa: E402

stop_on_sigterm()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Data the trainer prepares goes to a cache of the test session, not the user's ~/.cache/llama_fast."""
    os.environ.setdefault("LLAMA_FAST_CACHE", str(tmp_path_factory.mktemp("llama_fast_cache")))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
