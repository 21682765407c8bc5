"""Packaging: `python -m build` makes an sdist and a wheel; the wheel installs in a clean venv (no
system site-packages, torch pinned to the CPU build) where `otprune info` works and, with the
[demo] extra, `otprune demo` writes its PNG. The Triton kernels ship inside otprune's namespace only.

Runs in the clients' own venv (make test-clients): it needs `build` and a few minutes of installing.
"""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"  # the CPU build CI installs (requirements-test.txt)
BACKENDS = ("cuda", "triton", "cpu", "torch")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OTPRUNE_SKIP_EXT="1")  # a pure-Python wheel: any machine with torch installs it
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT], env=env)
    (sdist,) = out.glob("otprune-*.tar.gz")
    (wheel,) = out.glob("otprune-*.whl")
    return sdist, wheel


def test_sdist_holds_the_sources(dist):
    with tarfile.open(dist[0]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("setup.py", "MANIFEST.in", "README.md", "otprune_autopatch.pth", "_otprune_autopatch.py",
                 "triton_kernels/__init__.py", "triton_kernels/greedy.py", "csrc/bindings.cpp",
                 "otprune/api.py"):
        assert need in names, need


def test_wheel_puts_triton_kernels_inside_otprune(dist):
    with zipfile.ZipFile(dist[1]) as whl:
        names = whl.namelist()
        top = {n.split("/")[0] for n in names}
        top_level = whl.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    assert "otprune/triton_kernels/__init__.py" in names and "otprune/triton_kernels/greedy.py" in names
    assert "triton_kernels" not in top and "triton_kernels" not in top_level
    assert "otprune_autopatch.pth" in names


def test_wheel_in_clean_venv(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py, exe = str(venv / "bin" / "python"), str(venv / "bin" / "otprune")
    _run([py, "-m", "pip", "install", "-q", TORCH, f"{dist[1]}[demo]"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    info = _run([exe, "info"], cwd=tmp_path, env=env)
    listed = [line.split()[0] for line in info.split("backends")[1].splitlines()[1:] if line.startswith("  ")]
    assert sorted(listed) == sorted(BACKENDS), info
    assert "torch   cpu: usable" in info and "auto on cpu: torch" in info, info
    out = tmp_path / "demo.png"
    _run([exe, "demo", "--out", str(out)], cwd=tmp_path, env=env)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
