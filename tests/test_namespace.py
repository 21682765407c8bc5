"""otprune's Triton kernels import as ``otprune.triton_kernels`` and never claim the top-level name
``triton_kernels``, which belongs to Triton's own package (vLLM imports it).

Each case runs in a subprocess whose current directory is outside the checkout, with a stand-in
top-level ``triton_kernels`` package (and a submodule, as Triton's has) on PYTHONPATH.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import sys
    import otprune.triton_kernels as ours
    assert ours.__name__ == "otprune.triton_kernels", ours.__name__
    assert callable(ours.similarity) and callable(ours.greedy), dir(ours)
    from otprune.backends import triton_backend
    assert triton_backend.tk is ours
    try:
        import triton_kernels
        from triton_kernels import matmul_ogs
    except ModuleNotFoundError as err:
        print("top-level: none", err)
    else:
        assert not hasattr(triton_kernels, "similarity"), triton_kernels.__file__
        print("top-level:", triton_kernels.WHO, matmul_ogs.WHO)
""")


@pytest.fixture
def standin(tmp_path):
    """A folder holding a stand-in top-level ``triton_kernels`` package with a submodule."""
    pkg = tmp_path / "standin" / "triton_kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'stand-in'\n")
    (pkg / "matmul_ogs.py").write_text("WHO = 'stand-in submodule'\n")
    return str(tmp_path / "standin")


def _run(tmp_path, *path):
    pytest.importorskip("triton", reason="triton is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("checkout_first", [False, True], ids=["standin-first", "checkout-first"])
def test_standin_and_otprune_both_import(tmp_path, standin, checkout_first):
    """Whichever comes first on the path, ``triton_kernels`` is the stand-in and otprune has its own."""
    path = [ROOT, standin] if checkout_first else [standin, ROOT]
    assert "top-level: stand-in stand-in submodule" in _run(tmp_path, *path)


def test_checkout_does_not_provide_top_level_name(tmp_path):
    """With only the checkout on the path, ``import triton_kernels`` fails as if nothing provided it."""
    out = _run(tmp_path, ROOT)
    assert "top-level: none" in out and "otprune.triton_kernels" in out
