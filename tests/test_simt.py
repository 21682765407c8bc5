"""The CUDA greedy kernel's own source (csrc/greedy_kernel.cuh, the file nvcc compiles) run on the
CPU under a small SIMT emulation (tests/simt/simt.h: one host thread per CUDA thread, barriers for
__syncthreads and warp shuffles), compared with the float64 reference and the C++ CPU path; then
once more under ThreadSanitizer (a missing barrier is a data race) and AddressSanitizer + UBSan
(an out-of-bounds index, including past the dynamic shared memory the launch requests).

What this proves: the kernel's indexing, barriers and arithmetic, for the block sizes and shared
memory the launcher would choose. What it does not: anything about real GPU timing, memory
ordering beyond the barriers, or the nvcc-compiled binary (tests/test_cuda_sources.py checks its
registers, spills and shared memory). Needs only g++ (C++20); skipped without it, a failure when
OTPRUNE_REQUIRE_EXT=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import check_exact, features
from otprune.kernel import similarity
from test_cuda_sources import cuda_include_dir

pytestmark = pytest.mark.simt
GAMMA = 0.01
ROOT = Path(__file__).resolve().parent.parent
SIMT = ROOT / "tests" / "simt"
CXX = os.environ.get("CXX") or shutil.which("g++")
# Per build: extra flags, the run timeout (s), and the sanitizer's report marker.
BUILDS = {
    "plain": (["-O2"], 120),
    "tsan": (["-O1", "-g", "-fsanitize=thread"], 240),
    "asan": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=undefined"], 240),
}
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
    "ASAN_OPTIONS": "detect_leaks=1:exitcode=66",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def kernel_include_dir():
    """The CUDA toolkit's include directory (for its math_constants.h), else the tests' stand-in."""
    return cuda_include_dir("math_constants.h") or SIMT / "fallback"


@pytest.fixture(scope="session")
def simt_binary(tmp_path_factory):
    """build(name) -> path of the driver compiled with BUILDS[name]'s flags (once per session)."""
    if CXX is None:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail("OTPRUNE_REQUIRE_EXT=1 but no C++ compiler (g++ or $CXX) is found for the simt tests")
        pytest.skip("no C++ compiler (g++ or $CXX) found: the simt emulation cannot be built")
    folder = tmp_path_factory.mktemp("simt")
    built = {}

    def build(name):
        if name not in built:
            out = folder / f"driver_{name}"
            cmd = [CXX, "-std=c++20", "-pthread", *BUILDS[name][0], "-include", str(SIMT / "simt.h"),
                   f"-I{ROOT / 'csrc'}", "-idirafter", str(kernel_include_dir()),
                   str(SIMT / "driver.cpp"), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
            built[name] = out
        return built[name]

    return build


def run_kernel(binary, s, ks, valid=None, pass_ks=True, timeout=120):
    """Run the emulated kernel on (B, N, N) ``s``; returns (B, max(ks)) int64 picks."""
    B, N, _ = s.shape
    k_max = max(ks)
    head = np.array([s.element_size(), B, N, k_max, int(pass_ks), int(valid is not None)], dtype=np.int64)
    parts = [head.tobytes(), np.float64(GAMMA).tobytes(), s.contiguous().numpy().tobytes()]
    if pass_ks:
        parts.append(np.asarray(ks, dtype=np.int64).tobytes())
    if valid is not None:
        parts.append(valid.to(torch.uint8).contiguous().numpy().tobytes())
    src, dst = Path(str(binary) + f".{os.getpid()}.in"), Path(str(binary) + f".{os.getpid()}.out")
    src.write_bytes(b"".join(parts))
    env = {**os.environ, **SANITIZER_ENV}
    try:
        proc = subprocess.run([str(binary), str(src), str(dst)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"emulated kernel ran past {timeout} s (a barrier not reached by every thread hangs)")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    assert "WARNING: ThreadSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr[-6000:]
    picks = torch.from_numpy(np.fromfile(dst, dtype=np.int64)).view(B, k_max)
    src.unlink()
    dst.unlink()
    return picks


def make_case(B, N, d, seed, dtype, lengths=None, scatter=False):
    """Features (B, N, d), the similarity S in ``dtype`` and the valid mask (or None)."""
    x = features(N, d, seed, b=B, dtype=dtype)
    valid = None
    if lengths is not None:
        g = torch.Generator().manual_seed(seed + 1)
        valid = torch.zeros(B, N, dtype=torch.bool)
        for b, n in enumerate(lengths):
            pos = torch.randperm(N, generator=g)[:n] if scatter else torch.arange(n)
            valid[b, pos] = True
    return x, similarity(x, valid=valid), valid


def check_against_reference_and_cpu(x, s, valid, ks, got):
    """Each row: -1 past k_b, the reference's set (tie-aware), and the CPU path's order where
    the path has no near-tie."""
    import otprune._C as C

    want_cpu = C.greedy(s, torch.tensor(ks), GAMMA, valid)
    for b, k in enumerate(ks):
        assert (got[b, k:] == -1).all(), got[b]
        row = got[b, :k]
        pos = torch.arange(s.shape[1]) if valid is None else valid[b].nonzero().flatten()
        assert torch.isin(row, pos).all(), "picked a padding token"
        local = torch.searchsorted(pos, row.sort().values)
        if check_exact(x[b][pos], local, k, s.dtype):
            assert row.tolist() == want_cpu[b, :k].tolist(), "greedy order differs from the C++ CPU path"


# (B, N, d, ks, dtype, lengths, scattered mask)
PLAIN_CASES = {
    "n1": (1, 1, 4, [1], torch.float32, None, False),
    "n37_k_eq_n_and_k1": (3, 37, 6, [37, 1, 5], torch.float32, None, False),
    "n100_fp64_valid": (2, 100, 12, [9, 3], torch.float64, [100, 61], True),
    "n577_larger_than_block": (1, 577, 24, [8], torch.float32, None, False),
    "n577_fp64_ragged": (2, 577, 16, [5, 2], torch.float64, [577, 300], False),
    "n1100_fp32": (1, 1100, 16, [4], torch.float32, None, False),
}


@pytest.mark.parametrize("case", PLAIN_CASES, ids=str)
def test_emulated_kernel_matches_reference_and_cpu(simt_binary, case):
    B, N, d, ks, dtype, lengths, scatter = PLAIN_CASES[case]
    x, s, valid = make_case(B, N, d, seed=N + d, dtype=dtype, lengths=lengths, scatter=scatter)
    ragged = len(set(ks)) > 1
    got = run_kernel(simt_binary("plain"), s, ks, valid, pass_ks=ragged or B == 1)
    check_against_reference_and_cpu(x, s, valid, ks, got)


SANITIZER_CASES = {  # N in {37, 100, 577}, k <= 10: each block costs seconds under a sanitizer
    "n37_fp32": (2, 37, 5, [10, 3], torch.float32, None, False),
    "n100_fp64_valid": (1, 100, 8, [6], torch.float64, [70], True),
    "n577_fp32": (1, 577, 8, [4], torch.float32, None, False),
}


@pytest.mark.parametrize("build", ["tsan", "asan"])
@pytest.mark.parametrize("case", SANITIZER_CASES, ids=str)
def test_emulated_kernel_under_sanitizer(simt_binary, build, case):
    B, N, d, ks, dtype, lengths, scatter = SANITIZER_CASES[case]
    x, s, valid = make_case(B, N, d, seed=3 * N + d, dtype=dtype, lengths=lengths, scatter=scatter)
    got = run_kernel(simt_binary(build), s, ks, valid, timeout=BUILDS[build][1])
    check_against_reference_and_cpu(x, s, valid, ks, got)


def test_emulation_catches_a_missing_barrier(simt_binary, tmp_path):
    """The harness can fail: the kernel with its barriers removed races under ThreadSanitizer."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    kernel = (ROOT / "csrc" / "greedy_kernel.cuh").read_text()
    assert "__syncthreads();" in kernel
    (tmp_path / "greedy_kernel.cuh").write_text(kernel.replace("__syncthreads();", ";"))
    binary = tmp_path / "driver_racy"
    cmd = [CXX, "-std=c++20", "-pthread", *BUILDS["tsan"][0], "-include", str(SIMT / "simt.h"), f"-I{tmp_path}",
           "-idirafter", str(kernel_include_dir()), str(SIMT / "driver.cpp"), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    x, s, valid = make_case(1, 37, 5, seed=1, dtype=torch.float32)
    with pytest.raises(AssertionError, match="ThreadSanitizer|exit 66"):
        run_kernel(binary, s, [4], timeout=BUILDS["tsan"][1])
