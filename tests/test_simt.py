"""The CUDA greedy kernel's own source (csrc/greedy_kernel.cuh, the file nvcc compiles) run on the
CPU under a small SIMT emulation (tests/simt/simt.h: one host thread per CUDA thread, barriers for
__syncthreads and warp shuffles), with the launch plan the CUDA launcher computes, compared with
the float64 reference and the C++ CPU path; then once more under ThreadSanitizer (a missing
barrier is a data race) and AddressSanitizer + UBSan (an out-of-bounds index, including past the
dynamic shared memory the launch requests). Both kernel-row forms (S, and G = gamma S S^T) and
both homes of the Cholesky rows (shared memory, global workspace) are covered.

What this proves: the kernel's indexing, barriers and arithmetic, for the block sizes and shared
memory the launcher chooses. What it does not: anything about GPU timing, memory ordering beyond
the barriers, or the nvcc-compiled binary (tests/test_cuda_sources.py checks its registers, spills
and shared memory). Needs only g++ (C++20); skipped without it, a failure when OTPRUNE_REQUIRE_EXT=1.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import check_exact, features
from otprune.greedy import gamma_gram, greedy_picks
from otprune.kernel import similarity
from simt_build import CSRC, build_driver, driver_command, launch_plan, require_cxx

pytestmark = pytest.mark.simt
GAMMA = 0.01
# Shared memory per block the plan may use: sm_90's and sm_80's opt-in limits, the 48 KiB default.
SM90, SM80, DEFAULT = 232448, 166912, 49152
# Per build: extra flags and the run timeout (s); a barrier not reached by every thread hangs.
BUILDS = {
    "plain": (["-O2"], 120),
    "tsan": (["-O1", "-g", "-fsanitize=thread"], 240),
    "asan": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=undefined"], 240),
}
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
    "ASAN_OPTIONS": "detect_leaks=0:exitcode=66",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


@pytest.fixture(scope="session")
def simt_binary(tmp_path_factory):
    """build(name) -> path of the driver compiled with BUILDS[name]'s flags (once per session)."""
    require_cxx("the simt emulation")
    folder = tmp_path_factory.mktemp("simt")
    # All builds start at once (they are single-threaded); each is awaited when first needed.
    started = {name: (folder / f"driver_{name}", driver_command(folder / f"driver_{name}", flags))
               for name, (flags, _) in BUILDS.items()}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, (_, cmd) in started.items()}

    errors = {}

    def build(name):
        out, cmd = started[name]
        if name not in errors:
            try:
                errors[name] = procs[name].communicate(timeout=300)[1]
            except subprocess.TimeoutExpired:
                procs[name].kill()
                pytest.fail(f"building the {name} driver took over 300 s")
        assert procs[name].returncode == 0, f"{' '.join(cmd)}\n{errors[name][-4000:]}"
        return out

    yield build
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rows_off_chip_limit(binary, n, elem):
    """A shared-memory limit that holds d2 and the scratch but no Cholesky row (forces global rows)."""
    return launch_plan(binary, n, 2, elem, 1 << 30)[1] - n * elem


def run_kernel(binary, src, ks, valid=None, full=False, smem_limit=SM90, max_cluster=0, pass_ks=True, timeout=120,
               gamma=GAMMA):
    """Run the emulated kernel on (B, N, N) ``src`` (S, or G when ``full``), one block per image
    (max_cluster 0) or one cluster of up to max_cluster blocks; (B, max(ks)) int64 picks."""
    B, N, _ = src.shape
    k_max = max(ks)
    head = [src.element_size(), B, N, k_max, int(pass_ks), int(valid is not None), int(full), smem_limit, max_cluster]
    parts = [np.array(head, dtype=np.int64).tobytes(), np.float64(gamma).tobytes(), src.contiguous().numpy().tobytes()]
    if pass_ks:
        parts.append(np.asarray(ks, dtype=np.int64).tobytes())
    if valid is not None:
        parts.append(valid.to(torch.uint8).contiguous().numpy().tobytes())
    stem = f"{binary}.{os.getpid()}"
    inp, outp = Path(stem + ".in"), Path(stem + ".out")
    inp.write_bytes(b"".join(parts))
    cmd = [str(binary), str(inp), str(outp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **SANITIZER_ENV})
        if "unexpected memory mapping" in proc.stderr and shutil.which("setarch"):
            # gcc 12's ThreadSanitizer cannot map its shadow under a kernel's high ASLR entropy: rerun
            # with address randomisation off.
            proc = subprocess.run(["setarch", platform.machine(), "-R", *cmd], capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, **SANITIZER_ENV})
    except subprocess.TimeoutExpired:
        pytest.fail(f"emulated kernel ran past {timeout} s (a barrier not reached by every thread hangs)")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    assert "WARNING: ThreadSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr[-6000:]
    picks = torch.from_numpy(np.fromfile(outp, dtype=np.int64)).view(B, k_max)
    inp.unlink()
    outp.unlink()
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
    """Each row: -1 past k_b, no padding token, the reference's set (tie-aware), and the C++ CPU
    path's greedy order (the torch path's if the extension is not built) where the path has no
    near-tie. Returns how many rows had none."""
    try:
        from otprune._ext import load

        want_cpu = load().greedy(s, torch.tensor(ks), GAMMA, valid)
    except ImportError:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            raise
        want_cpu = greedy_picks(s, ks, GAMMA, valid)
    exact = 0
    for b, k in enumerate(ks):
        assert (got[b, k:] == -1).all(), got[b]
        row = got[b, :k]
        pos = torch.arange(s.shape[1]) if valid is None else valid[b].nonzero().flatten()
        assert torch.isin(row, pos).all(), f"picked a padding token: {row.tolist()}"
        local = torch.searchsorted(pos, row.sort().values)
        if check_exact(x[b][pos], local, k, s.dtype):
            assert row.tolist() == want_cpu[b, :k].tolist(), "greedy order differs from the CPU path"
            exact += 1
    return exact


def run_case(binary, case, seed, timeout):
    B, N, d, ks, dtype, lengths, scatter, full, rows_home = case
    x, s, valid = make_case(B, N, d, seed=seed, dtype=dtype, lengths=lengths, scatter=scatter)
    elem = s.element_size()
    max_cluster = 0
    if isinstance(rows_home, tuple):  # ("cluster", blocks): the limit at which the plan needs that many
        max_cluster, limit = rows_home[1], 1 << 30
        while (plan := launch_plan(binary, N, max(ks), elem, limit, max_cluster))[3] < max_cluster:
            limit = plan[1] - 1
        limit = plan[1]
        assert not launch_plan(binary, N, max(ks), elem, limit)[2]  # one block would not hold the rows
    else:
        limit = rows_off_chip_limit(binary, N, elem) if rows_home == "global" else rows_home
        assert launch_plan(binary, N, max(ks), elem, limit)[2] == (rows_home != "global")
    ragged = len(set(ks)) > 1
    src = gamma_gram(s, GAMMA) if full else s
    got = run_kernel(binary, src, ks, valid, full=full, smem_limit=limit, max_cluster=max_cluster,
                     pass_ks=ragged or B == 1, timeout=timeout)
    exact = check_against_reference_and_cpu(x, s, valid, ks, got)
    assert exact >= 1 or N <= 2, "every row had a near-tie: the CPU path's order was never compared"


# (B, N, d, ks, dtype, valid lengths, scattered mask, full kernel rows, Cholesky rows: a shared-memory
# limit (one block per image, rows on chip), "global", or ("cluster", blocks per image))
PLAIN_CASES = {
    "n1": (1, 1, 4, [1], torch.float32, None, False, False, SM90),
    "n37_k_eq_n_and_k1_full": (3, 37, 6, [37, 1, 5], torch.float32, None, False, True, SM90),
    "n37_k_eq_n_lazy_global_rows": (2, 37, 6, [37, 2], torch.float32, None, False, False, "global"),
    "n100_fp64_valid_full_global_rows": (2, 100, 12, [9, 3], torch.float64, [100, 61], True, True, "global"),
    "n577_block_of_608_lazy": (1, 577, 24, [8], torch.float32, None, False, False, DEFAULT),
    "n577_fp64_ragged_valid_full": (2, 577, 16, [5, 2], torch.float64, [577, 300], False, True, SM80),
    "n1100_two_items_a_thread_full": (1, 1100, 16, [4], torch.float32, None, False, True, "global"),
    "n37_cluster_of_2_full": (2, 37, 6, [37, 4], torch.float32, None, False, True, ("cluster", 2)),
    "n100_fp64_cluster_of_4_lazy_valid": (2, 100, 12, [9, 3], torch.float64, [100, 61], True, False, ("cluster", 4)),
    "n577_cluster_of_16_full": (1, 577, 24, [8], torch.float32, None, False, True, ("cluster", 16)),
}


@pytest.mark.parametrize("case", PLAIN_CASES, ids=str)
def test_emulated_kernel_matches_reference_and_cpu(simt_binary, case):
    c = PLAIN_CASES[case]
    run_case(simt_binary("plain"), c, seed=c[1] + c[2], timeout=BUILDS["plain"][1])


SANITIZER_CASES = {  # N in {37, 100, 577}, k <= 10: each block costs seconds under a sanitizer
    "n37_full": (2, 37, 5, [10, 3], torch.float32, None, False, True, SM90),
    "n100_fp64_valid_lazy_global_rows": (1, 100, 8, [6], torch.float64, [70], True, False, "global"),
    "n577_full": (1, 577, 8, [4], torch.float32, None, False, True, DEFAULT),
    "n100_cluster_of_4_full": (1, 100, 8, [10], torch.float32, [90], True, True, ("cluster", 4)),
}


@pytest.mark.parametrize("build", ["tsan", "asan"])
@pytest.mark.parametrize("case", SANITIZER_CASES, ids=str)
def test_emulated_kernel_under_sanitizer(simt_binary, build, case):
    c = SANITIZER_CASES[case]
    run_case(simt_binary(build), c, seed=3 * c[1] + c[2], timeout=BUILDS[build][1])


@pytest.mark.parametrize("full", [False, True], ids=["lazy", "full"])
@pytest.mark.parametrize("rows_home", [SM90, "global"], ids=["rows_on_chip", "global_rows"])
def test_equal_budgets_past_a_rows_tokens(simt_binary, full, rows_home):
    """What otprune.select launches on a GPU for a ragged batch: no budgets, every row runs to
    k_max = 8, rows of 3 and 1 valid tokens past them (pivots of -inf), under ASan + UBSan. No index
    leaves [0, N), and each row's first k_b picks are those of a ragged run."""
    lengths, ks = [37, 3, 1], [8, 3, 1]
    x, s, valid = make_case(3, 37, 6, seed=11, dtype=torch.float32, lengths=lengths)
    binary = simt_binary("asan")
    limit = rows_off_chip_limit(binary, 37, 4) if rows_home == "global" else rows_home
    got = run_kernel(binary, gamma_gram(s, GAMMA) if full else s, [8] * 3, valid, full=full,
                     smem_limit=limit, pass_ks=False, timeout=BUILDS["asan"][1])
    assert ((got >= 0) & (got < 37)).all(), got
    cut = torch.where(torch.arange(8) < torch.tensor(ks).unsqueeze(1), got, -1)
    assert check_against_reference_and_cpu(x, s, valid, ks, cut) >= 1


def _rank_one_case():
    """17 rank-one tokens (fp16-rounded) and gamma = 1000: float32 residuals lose a large share to
    cancellation, and without the residuals' floor at 1 the kernel repeats picks."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 17, 1, generator=g) @ torch.randn(1, 474, generator=g)).half().float()
    return similarity(x), 1000.0


@pytest.mark.parametrize("full", [False, True], ids=["lazy", "full"])
def test_large_gamma_on_rank_one_tokens_keeps_distinct_tokens(simt_binary, full):
    s, gamma = _rank_one_case()
    for k in (17, 12):
        got = run_kernel(simt_binary("plain"), gamma_gram(s, gamma) if full else s, [k], full=full, gamma=gamma)
        row = got[0].tolist()
        assert len(set(row)) == k and all(0 <= i < 17 for i in row), row


def test_emulation_catches_a_missing_residual_floor(tmp_path):
    """The case above can fail: with residual_update's floor removed the kernel repeats picks."""
    kernel = (CSRC / "greedy_kernel.cuh").read_text()
    floor = "  return left >= floor ? left : floor;\n}"
    assert floor in kernel
    (tmp_path / "greedy_kernel.cuh").write_text(kernel.replace(floor, "  return left;\n}", 1))
    binary = tmp_path / "driver_no_floor"
    build_driver(binary, BUILDS["plain"][0], kernel_dir=tmp_path)
    s, gamma = _rank_one_case()
    assert len(set(run_kernel(binary, s, [17], gamma=gamma)[0].tolist())) < 17


@pytest.mark.parametrize("n", [1, 31, 37, 576, 577, 1024, 1025, 1100, 2880, 6016])
def test_launch_plan_has_no_tail_pass(simt_binary, n):
    """Every thread owns ceil(N / threads) items but for less than one warp's worth per pass."""
    threads = launch_plan(simt_binary("plain"), n, 1, 4, SM90)[0]
    per = -(-n // threads)
    assert threads % 32 == 0 and 32 <= threads <= 1024
    assert threads * per - n < 32 * per, (n, threads, per)
    if n in (576, 2880):
        assert threads * per == n  # the target sizes: no idle thread at all


@pytest.mark.parametrize("barrier,max_cluster", [("__syncthreads();", 0), ("cluster.sync();\n", 4)],
                         ids=["block_barriers", "cluster_argmax_barrier"])
def test_emulation_catches_a_missing_barrier(simt_binary, tmp_path, barrier, max_cluster):
    """The harness can fail: with every block barrier removed, or the cluster argmax's barrier, the
    kernel races (ThreadSanitizer) or reads unset shared memory (the emulation's junk fill)."""
    kernel = (CSRC / "greedy_kernel.cuh").read_text()
    assert barrier in kernel
    count = -1 if max_cluster == 0 else 1  # the cluster case: the first one, inside cluster_argmax
    (tmp_path / "greedy_kernel.cuh").write_text(kernel.replace(barrier, ";\n" if max_cluster else ";", count))
    binary = tmp_path / "driver_racy"
    build_driver(binary, BUILDS["tsan"][0], kernel_dir=tmp_path)
    _, s, _ = make_case(1, 37, 5, seed=1, dtype=torch.float32)
    limit = launch_plan(binary, 37, 6, 4, 1 << 30, max_cluster)[1] if max_cluster else SM90
    with pytest.raises(AssertionError, match="ThreadSanitizer|exit "):
        run_kernel(binary, s, [6], smem_limit=limit, max_cluster=max_cluster, timeout=BUILDS["tsan"][1])


@pytest.mark.parametrize("full", [False, True], ids=["lazy", "full"])
def test_non_finite_similarity_gives_distinct_in_range_picks(simt_binary, full):
    """select(check=False) hands the kernel whatever S non-finite features make (NaN rows and
    columns here, an inf token's too), under ASan + UBSan: every pick a distinct index in [0, N), and
    the finite image of the batch picks what the CPU path picks."""
    x = features(37, 6, 5, b=2)
    x[0, 3] = float("nan")
    x[0, 8, 2] = float("inf")
    s = similarity(x)
    assert not torch.isfinite(s[0]).all() and torch.isfinite(s[1]).all()
    got = run_kernel(simt_binary("asan"), gamma_gram(s, GAMMA) if full else s, [9, 9], full=full,
                     timeout=BUILDS["asan"][1])
    row = got[0].tolist()
    assert len(set(row)) == 9 and all(0 <= i < 37 for i in row), row
    assert check_against_reference_and_cpu(x[1:], s[1:], None, [9], got[1:]) == 1
