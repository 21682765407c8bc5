"""setup.py's CUDA toolkit lookup: CUDA_HOME from the toolkit nvcc reports, for a wrapper nvcc.

torch's own guess (two folders above the first nvcc on PATH) is wrong for a wrapper script such as
/usr/local/bin/nvcc, and the CUDA build then fails on a missing cuda_runtime_api.h. The function is
taken from setup.py's source (running setup.py would build the package) and run against a fake nvcc.
"""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


def _lookup():
    tree = ast.parse(SETUP.read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.FunctionDef) and n.name == "_cuda_home_from_nvcc")]
    ns: dict = {}
    exec(compile(ast.Module(keep, []), str(SETUP), "exec"), ns)
    return ns["_cuda_home_from_nvcc"]


def _toolkit(tmp_path: Path, headers: bool) -> Path:
    """A toolkit folder (with or without include/cuda_runtime_api.h) and a wrapper nvcc elsewhere
    on PATH that reports it as nvcc -v --dryrun does."""
    kit = tmp_path / "cuda-13.0"
    (kit / "bin").mkdir(parents=True)
    if headers:
        (kit / "include").mkdir()
        (kit / "include" / "cuda_runtime_api.h").write_text("")
    wrapper = tmp_path / "wrapper-bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={kit}/bin/..' >&2\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return kit


@pytest.fixture
def clean(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "wrapper-bin"))


def test_wrapper_nvcc_gives_its_toolkit(clean, tmp_path):
    kit = _toolkit(tmp_path, headers=True)
    _lookup()()
    assert os.environ["CUDA_HOME"] == os.path.realpath(kit)


def test_toolkit_without_headers_is_not_taken(clean, tmp_path):
    _toolkit(tmp_path, headers=False)
    _lookup()()
    assert "CUDA_HOME" not in os.environ


def test_a_set_cuda_home_wins(clean, tmp_path, monkeypatch):
    _toolkit(tmp_path, headers=True)
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    _lookup()()
    assert os.environ["CUDA_HOME"] == "/opt/my-cuda"
