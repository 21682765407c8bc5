"""Shared by tests/test_simt.py and tests/test_cuda_sources.py: the CUDA toolkit's location and the
build of the SIMT emulation driver (tests/simt/driver.cpp around csrc/greedy_kernel.cuh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SIMT = ROOT / "tests" / "simt"
CXX = os.environ.get("CXX") or shutil.which("g++")


def require_cxx(what: str) -> str:
    """The C++ compiler for ``what``: skip the test without one, or fail it under
    OTPRUNE_REQUIRE_EXT=1 (`make test`, CI)."""
    import pytest

    if CXX is None:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail(f"OTPRUNE_REQUIRE_EXT=1 but no C++ compiler (g++ or $CXX) is found for {what}")
        pytest.skip(f"no C++ compiler (g++ or $CXX) found: {what} cannot be built")
    return CXX


def find_nvcc() -> Optional[str]:
    """nvcc from CUDA_HOME, then PATH, then the default toolkit location; None if absent."""
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


NVCC = find_nvcc()


def cuda_include_dir(header: str = "cuda_runtime_api.h") -> Optional[Path]:
    """The CUDA toolkit's include directory holding ``header`` (CUDA_HOME, CUDA_PATH, nvcc's
    toolkit, /usr/local/cuda), or None."""
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if NVCC:
        roots += [Path(NVCC).parent.parent, Path(NVCC).resolve().parent.parent]
    roots.append(Path("/usr/local/cuda"))
    return next((r / "include" for r in roots if (r / "include" / header).exists()), None)


def kernel_include_dir() -> Path:
    """Where math_constants.h comes from: the CUDA toolkit, else the tests' stand-in."""
    return cuda_include_dir("math_constants.h") or SIMT / "fallback"


def driver_command(out: Path, flags: List[str], kernel_dir: Path = CSRC) -> List[str]:
    """The g++ command compiling the emulation driver around ``kernel_dir``/greedy_kernel.cuh."""
    return [CXX, "-std=c++20", "-pthread", *flags, "-include", str(SIMT / "simt.h"), f"-I{kernel_dir}",
            "-idirafter", str(kernel_include_dir()), str(SIMT / "driver.cpp"), "-o", str(out)]


def build_driver(out: Path, flags: List[str], kernel_dir: Path = CSRC) -> None:
    """Compile the emulation driver around ``kernel_dir``/greedy_kernel.cuh into ``out``."""
    cmd = driver_command(out, flags, kernel_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"


def launch_plan(driver: Path, n: int, k_max: int, elem: int, smem_limit: int,
                max_cluster: int = 0) -> Tuple[int, int, bool, int, int]:
    """(threads, dynamic shared memory bytes, rows on chip, cluster, slice) of csrc/greedy_kernel.cuh's
    greedy_plan (max_cluster 0) or greedy_cluster_plan."""
    return _plan(driver, "--plan", n, k_max, elem, smem_limit, max_cluster)


def launcher_choice(driver: Path, batch: int, n: int, k_max: int, elem: int, smem_limit: int, cc_major: int,
                    sms: int) -> Tuple[int, int, bool, int, int]:
    """The same tuple for the plan the CUDA launcher chooses for a batch on such a device
    (csrc/greedy_kernel.cuh launch_plan)."""
    return _plan(driver, "--launch", batch, n, k_max, elem, smem_limit, cc_major, sms)


def _plan(driver: Path, mode: str, *args: int) -> Tuple[int, int, bool, int, int]:
    out = subprocess.run([str(driver), mode, *map(str, args)], capture_output=True, text=True, timeout=30,
                         check=True).stdout.split()
    return int(out[0]), int(out[1]), out[2] == "1", int(out[3]), int(out[4])
