"""Shared pytest setup.

Without a GPU, Triton kernels run in the interpreter; the variable must be set before any
kernel module is imported, hence here at the top.
"""

import os
import sys

import pytest

if not os.environ.get("OTPRUNE_TEST_NO_INTERPRET"):
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/hf_tiny.py, ...
# bench/ (the release's loop transcribed, the harness) is a source-checkout folder, not installed.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(config, items):
    import torch

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
