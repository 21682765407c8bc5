"""The CUDA sources hold up without a GPU: csrc/*.cu (torch-header-free) compiles with nvcc for
sm_80 and sm_90 without register spills or stack frames, and the WITH_CUDA branch of
csrc/bindings.cpp compiles (syntax only) against torch's headers.

Skipped when nvcc (or, for the bindings, a C++ compiler) is absent; a failure instead when
OTPRUNE_REQUIRE_EXT=1. This proves the sources build and what ptxas allots them; it says nothing
about behaviour on a GPU (tests/test_simt.py runs the kernel source on the CPU).
"""

import os
import re
import subprocess
import sysconfig

import pytest

from simt_build import CSRC, CXX, NVCC, build_driver, cuda_include_dir, launch_plan

CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]


# Shared memory per block with opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize), and without.
OPTIN_SMEM = {"sm_80": 166912, "sm_90": 232448}
DEFAULT_SMEM = 48 * 1024


def need(tool, what):
    if tool is None:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail(f"OTPRUNE_REQUIRE_EXT=1 but {what} is not found")
        pytest.skip(f"{what} not found")


def test_sources_exist():
    assert [p.name for p in CUDA_SOURCES] == ["greedy_cuda.cu"]


_PTXAS_CACHE = {}


def ptxas_report(source, arch, tmp_path):
    """{kernel (mangled): {"registers", "stack", "spill_stores", "spill_loads", "smem"}} from
    `nvcc -Xptxas -v` for one source and arch (compiled once per test session)."""
    key = (source, arch)
    if key not in _PTXAS_CACHE:
        out = tmp_path / (source.stem + ".o")
        cmd = [NVCC, "-c", f"-gencode=arch=compute_{arch[3:]},code={arch}", "-std=c++17", "-O3",
               "-Werror=all-warnings", "-Xptxas", "-v", "-Xcompiler", "-fPIC", str(source), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        assert out.stat().st_size > 0
        kernels, current = {}, None
        for line in (proc.stdout + proc.stderr).splitlines():
            if m := re.search(r"Function properties for (\S+)", line):
                current = kernels.setdefault(m.group(1), {})
            elif current is not None and (m := re.search(
                    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
                current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            elif current is not None and (m := re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", line)):
                current.update(registers=int(m.group(1)))
                sm = re.search(r"(\d+) bytes smem", line)
                current["smem"] = int(sm.group(1)) if sm else 0
                current = None
        _PTXAS_CACHE[key] = kernels
    return _PTXAS_CACHE[key]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_without_spills(source, arch, tmp_path):
    need(NVCC, "nvcc (CUDA_HOME, PATH, /usr/local/cuda)")
    kernels = ptxas_report(source, arch, tmp_path)
    assert kernels, "ptxas reported no kernels"
    for name, res in kernels.items():
        assert res.get("registers") is not None, (name, res)
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (name, res)
        assert res["stack"] == 0, (name, res)
        # __launch_bounds__(1024): 64 K registers per SM shared by 1024 threads.
        assert res["registers"] <= 64, (name, res)


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    """The SIMT driver, used here only for its --plan mode (the launcher's greedy_plan)."""
    need(CXX, "a C++ compiler (g++ or $CXX)")
    out = tmp_path_factory.mktemp("plan") / "driver"
    build_driver(out, ["-O0"])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_is_what_the_launcher_requests(arch, tmp_path, plan_driver):
    """No static shared memory (so the launch's dynamic request is the whole), the plan within the
    arch's opt-in limit, on-chip Cholesky rows at N = 576, k = 56 (one block) and N = 2880, k = 282
    (a cluster of 16 on sm_90), and within the 48 KiB default for every N the launcher accepts when
    the rows stay in global memory."""
    need(NVCC, "nvcc (CUDA_HOME, PATH, /usr/local/cuda)")
    for name, res in ptxas_report(CUDA_SOURCES[0], arch, tmp_path).items():
        assert res["smem"] == 0, (name, res)
    limit = OPTIN_SMEM[arch]
    for n, k, elem in [(1, 1, 4), (576, 56, 4), (576, 56, 8), (2880, 282, 4), (6016, 300, 8), (12032, 2, 4)]:
        threads, smem = launch_plan(plan_driver, n, k, elem, limit)[:2]
        assert smem <= limit and threads <= 1024, (n, k, elem, threads, smem)
    assert launch_plan(plan_driver, 576, 56, 4, limit)[2], "N = 576, k = 56 rows should sit in shared memory"
    assert not launch_plan(plan_driver, 2880, 282, 4, limit)[2]
    if arch == "sm_90":  # one block cannot hold N = 2880, k = 282: a cluster of 16 can
        threads, smem, on_chip, cluster, _ = launch_plan(plan_driver, 2880, 282, 4, limit, 16)
        assert (on_chip, cluster) == (True, 16) and smem <= limit and threads <= 1024
    for elem in (4, 8):
        max_n = 47 * 1024 // elem  # cuda_max_n in csrc/greedy_cuda.h
        assert launch_plan(plan_driver, max_n, max_n, elem, limit)[1] <= DEFAULT_SMEM
    assert "cudaFuncAttributeMaxDynamicSharedMemorySize" in (CSRC / "greedy_cuda.cu").read_text()


def test_bindings_cuda_branch_compiles_against_torch_headers():
    """csrc/bindings.cpp with WITH_CUDA, syntax only (a CPU torch cannot link the CUDA part)."""
    need(CXX, "a C++ compiler (g++ or $CXX)")
    cuda_include = cuda_include_dir()
    need(cuda_include, "the CUDA toolkit's cuda_runtime_api.h")
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(cuda_include)]
    cmd = [CXX, "-fsyntax-only", "-std=c++20", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           *(f"-I{p}" for p in includes), str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
