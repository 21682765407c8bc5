"""bench/gpu_check.sh, checked on a CPU: its plan (caps within one 540 s run, at most 8 outputs, the
step order), its steps' commands (the select sweep and the model run on a tiny CPU configuration,
the GPU test files collect, the sanitizer filters name the project's kernels) and its runner
(with stub commands: a failing step does not stop the later ones, a refusing sanitizer is
reported as skipped, nothing lands under $OUT beyond the plan's files)."""

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
ORDER = ["build", "select", "model", "tests", "memcheck", "racecheck", "e2e"]


def _run(*args, env=None, timeout=120):
    full = {**os.environ, "PY": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _plan():
    out = _run("--plan")
    assert out.returncode == 0, out.stderr
    steps, outputs, total = [], [], None
    for line in out.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "STEP":
            steps.append((rest[0], int(rest[1])))
        elif kind == "OUTPUT":
            outputs.append(rest[0])
        else:
            assert kind == "TOTAL" and total is None, line
            total = int(rest[0])
    return steps, outputs, total


def test_plan_fits_one_run():
    steps, outputs, total = _plan()
    assert [s for s, _ in steps] == ORDER
    assert total == sum(c for _, c in steps) <= 540
    assert all(c > 0 for _, c in steps)
    assert len(outputs) <= 8 and len(set(outputs)) == len(outputs)
    assert all("/" not in f for f in outputs)  # directly under $OUT
    assert sum(f.endswith(".log") for f in outputs) == 1
    assert {"select.csv", "model.md"} <= set(outputs)


def test_plan_runs_nothing(tmp_path):
    out = _run("--plan", env={"OUT": str(tmp_path / "out"), "PY": "/nonexistent/python"})
    assert out.returncode == 0 and not (tmp_path / "out").exists()


def _commands():
    out = _run("--dry-run")
    assert out.returncode == 0, out.stderr
    cmds = {}
    for line in out.stdout.splitlines():
        m = re.match(r"STEP (\w+) (\d+): (.*)$", line)
        assert m, line
        cmds[m.group(1)] = m.group(3)
    assert list(cmds) == ORDER
    return cmds


def test_commands_say_what_the_run_needs():
    cmds = _commands()
    assert "OTPRUNE_FORCE_CUDA=1" in cmds["build"] and "--no-build-isolation" in cmds["build"]
    assert "--no-deps" in cmds["build"] and "--no-index" in cmds["build"] and " -e ." in cmds["build"]
    for axis in ("--B 1 8 32", "--N 576 2880", "--d 4096", "--ratio 0.098", "--dtype float16"):
        assert axis in cmds["select"]
    assert "OTPRUNE_REQUIRE_EXT=1" in cmds["tests"]
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in cmds["memcheck"] and "--tool memcheck" in cmds["memcheck"]
    assert "--tool racecheck" in cmds["racecheck"]
    for tool in ("memcheck", "racecheck"):
        assert "--kernel-name kns=greedy_kernel" in cmds[tool]


def test_sanitizer_filters_name_the_projects_kernels():
    from bench.sanitize_greedy import kernel_names

    names = kernel_names()
    assert "greedy_kernel" in names  # csrc's CUDA greedy
    for py in (ROOT / "otprune" / "triton_kernels").glob("*.py"):
        for launched in re.findall(r"\b(_\w+_kernel)\[", py.read_text()):
            assert launched in names
    assert not any(n.startswith("_argmax") for n in names)  # jit helpers are not kernels


def test_gpu_test_files_exist():
    """The tests step names existing test files, each a CUDA / Triton file or one with GPU-only tests."""
    files = [f for f in _commands()["tests"].split() if f.startswith("tests/")]
    assert files
    for f in files:
        text = (ROOT / f).read_text()
        assert "def test_" in text
        assert re.search(r"cuda|triton", Path(f).name) or "mark.cuda" in text, f


def test_select_and_model_commands_run_on_a_tiny_cpu_config(tmp_path):
    """The sweep's and the model's command lines, with the GPU sizes swapped for tiny ones."""
    out = tmp_path / "out"
    cmds = _commands()
    select = cmds["select"].replace("/tmp/otprune_gpu", str(out))
    select = re.sub(r"--B [\d ]+--N [\d ]+--d \d+", "--B 1 --N 12 --d 8", select)
    from bench.__main__ import main

    argv = shlex.split(select)
    assert argv[1:3] == ["-m", "bench"]
    assert main(argv[3:]) == 0  # in this process: the same parser, without a second torch import
    assert (out / "select.csv").exists() and (out / "select.md").exists()
    model = shlex.split(cmds["model"].replace("/tmp/otprune_gpu", str(out)))
    assert model[1:3] == ["-m", "bench"]
    assert main(model[3:]) == 0
    assert "No GPU rows" in (out / "model.md").read_text()  # CPU rows are not compared with the model


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_runner_goes_on_after_failures(tmp_path):
    """Stub python3 / compute-sanitizer: the tests step fails, the sanitizer refuses the device;
    every step still runs, the summary says which, only planned files land under $OUT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = _stub(bin_dir / "python3", f"""
case "$*" in
  *--kernel-filters*) exec {shlex.quote(sys.executable)} "$@" ;;
  *"-m pytest"*) echo "stub pytest: 1 failed"; exit 1 ;;
  *"bench select"*) out=$(echo "$*" | sed -E 's/.*--out ([^ ]+).*/\\1/'); touch "$out/select.csv" "$out/select.md" ;;
esac
echo "stub python3 $*"
""")
    _stub(bin_dir / "compute-sanitizer", 'echo "========= Error: Device not supported"; exit 1\n')
    out = tmp_path / "out"
    r = _run(env={"OUT": str(out), "PY": str(py), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    log = (out / "gpu_check.log").read_text()
    summary = log[log.index("== summary"):]
    for name in ORDER:
        assert re.search(rf"^{name}: ", summary, re.M), summary
    assert re.search(r"^tests: FAILED \(exit 1\)", summary, re.M)
    assert re.search(r"^memcheck: skipped: compute-sanitizer refused this device", summary, re.M)
    assert re.search(r"^racecheck: skipped: compute-sanitizer refused this device", summary, re.M)
    assert re.search(r"^e2e: ok", summary, re.M) and re.search(r"^build: ok", summary, re.M)
    assert "stub pytest: 1 failed" in log  # step output goes to the one log
    _, outputs, _ = _plan()
    assert set(os.listdir(out)) <= set(outputs)
    assert "unexpected files" not in log


@pytest.mark.parametrize("arg", ["--bogus", "plan"])
def test_bad_argument_is_refused(arg):
    r = _run(arg)
    assert r.returncode == 2 and "usage" in r.stderr
