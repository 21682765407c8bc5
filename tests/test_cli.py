"""The command line: `otprune info` and `otprune demo` (run as `python -m otprune` subprocesses)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "otprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_info_lists_backends(tmp_path):
    r = _run("info", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "usable" in r.stdout
    assert "auto on cpu:" in r.stdout
    # Each backend on one line, naming the device types it targets.
    listed = [line.split()[0] for line in r.stdout.split("backends")[1].splitlines()[1:] if line.startswith("  ")]
    assert sorted(listed) == sorted(["cuda", "triton", "cpu", "torch"]), r.stdout
    torch_line = next(line for line in r.stdout.splitlines() if line.startswith("  torch "))
    assert "cpu" in torch_line and "cuda" in torch_line, torch_line


def test_demo_writes_png(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo.png"
    r = _run("demo", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # OTPrune's set has a larger log-det than the random and grid baselines on the photo.
    logdets = {}
    for line in r.stdout.splitlines():
        if "log det L[T,T] =" in line:
            name = line.split("log det")[0].strip()
            logdets[name] = float(line.split("=")[1].split(",")[0])
    assert set(logdets) == {"OTPrune", "random", "uniform grid"}
    assert logdets["OTPrune"] > logdets["random"] and logdets["OTPrune"] > logdets["uniform grid"]


def test_unknown_subcommand_fails_cleanly(tmp_path):
    r = _run("bogus", cwd=tmp_path)
    assert r.returncode != 0
    assert "invalid choice" in r.stderr
