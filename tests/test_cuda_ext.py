"""The compiled CUDA backend (csrc/greedy_cuda.cu) against the float64 reference, the torch
greedy on the same GPU, and under CUDA-graph capture. Needs a GPU (skipped otherwise); an
unbuilt CUDA extension is skipped, or a failure when OTPRUNE_REQUIRE_EXT=1.
"""

import os

import pytest
import torch

from helpers import NEAR_TIE, check_exact, features, quiet_select
from otprune import backends
from otprune.greedy import greedy_picks
from otprune.kernel import similarity
from reference import ref_select

pytestmark = pytest.mark.cuda
GAMMA = 0.01


@pytest.fixture(autouse=True)
def _need_cuda_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = backends.usable("cuda", "cuda")
    if not ok:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail(f"OTPRUNE_REQUIRE_EXT=1 but the cuda backend is unusable: {why}")
        pytest.skip(f"CUDA extension not usable: {why}")


def cuda_greedy(s, ks, valid=None, rows="auto"):
    return backends.get_backend("cuda").greedy(s, ks, GAMMA, valid, rows=rows)


@pytest.mark.parametrize("rows", ["full", "lazy"])
@pytest.mark.parametrize("n,k", [(576, 56), (577, 200), (2880, 282)])
def test_both_kernel_row_forms_exact_with_tf32_enabled(rows, n, k):
    """Both forms, Cholesky rows on chip (576/56) and in global memory (577/200, 2880/282), match
    the float64 reference with TF32 switched on globally: the full form's GEMM must turn it off."""
    exact = 0
    for seed in range(2):
        x = features(n, 64, 7 * n + seed)
        s = similarity(x.cuda().unsqueeze(0))  # at the default precision (no TF32)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32 allowed from here on
        try:
            got = cuda_greedy(s, [k], rows=rows)[0].sort().values.cpu()
            assert torch.get_float32_matmul_precision() == "high"
        finally:
            torch.set_float32_matmul_precision(prev)
        exact += check_exact(x, got, k, torch.float32)
    assert exact, "every case had a near-tie: only log-dets were compared"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (37, 3), (577, 64), (576, 1024), (2880, 16)])
def test_matches_reference(dtype, n, d):
    exact = 0
    for seed, k in ((n + d, max(1, round(0.098 * n))), (2 * n + d, min(n, 64))):
        x = features(n, d, seed, dtype=dtype)
        idx = quiet_select(x.cuda(), k, backend="cuda")
        assert idx.is_cuda and idx.dtype == torch.int64 and idx.shape == (k,)
        exact += check_exact(x, idx.cpu(), k, dtype)
    if n > 2 and dtype == torch.float64:
        assert exact, "every case had a near-tie: only log-dets were compared"


def test_every_home_of_the_cholesky_rows_agrees():
    """N = 577, k = 200: the rows overflow one block's shared memory, so a lone image runs on a
    cluster (sm_90) and a batch of 40 (40 clusters would not fit the SMs at once) one block per image
    with the rows in global memory. Same arithmetic per item, so the same greedy order."""
    x = features(577, 32, 11, b=40)
    s = similarity(x.cuda())
    batched = cuda_greedy(s, [200] * 40)
    for b in (0, 17, 39):
        alone = cuda_greedy(s[b:b + 1].contiguous(), [200])
        assert batched[b].tolist() == alone[0].tolist()
        check_exact(x[b], batched[b].sort().values.cpu(), 200, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_greedy_order_as_torch(dtype):
    compared = 0
    for seed in range(4):
        x = features(577, 64, 100 + seed, dtype=dtype)
        s = similarity(x.cuda().unsqueeze(0))
        got, want = cuda_greedy(s, [56]), greedy_picks(s, [56], GAMMA)
        if ref_select(x.double(), 56)[1] > NEAR_TIE[dtype]:
            assert got.tolist() == want.tolist()
            compared += 1
    assert compared >= 1


def test_k_equals_n_and_exact_ties():
    x = features(300, 8, 3).cuda()
    assert quiet_select(x, 300, backend="cuda").tolist() == list(range(300))
    same = similarity(torch.ones(1, 700, 3, device="cuda", dtype=torch.float64))
    got = cuda_greedy(same, [5])
    assert got.tolist() == greedy_picks(same, [5], GAMMA).tolist()
    assert got[0, 0].item() == 0


def test_batch_and_ragged_lengths():
    lengths = [600, 37, 1, 599]
    x = features(600, 20, 8, b=4).cuda()
    x[1, 37:] = 1e3
    idx = quiet_select(x, 0.1, lengths=lengths, backend="cuda")
    ks = [60, 4, 1, 60]
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert (idx[b, k:] == -1).all()
        assert idx[b, :k].tolist() == quiet_select(x[b, :n], k, backend="cuda").tolist()
        check_exact(x[b, :n].cpu(), idx[b, :k].cpu(), k, torch.float32)


def test_too_large_n_raises():
    s = torch.zeros(1, 6100, 6100, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="N <="):
        cuda_greedy(s, [2])


def test_cuda_graph_capture_and_replay():
    b, n, k = 4, 576, 56
    s_static = similarity(features(n, 64, 1, b=b).cuda())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_greedy(s_static, [k] * b)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_greedy(s_static, [k] * b)
    for seed in (2, 3):
        fresh = similarity(features(n, 64, seed, b=b).cuda())
        s_static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert out.tolist() == cuda_greedy(fresh, [k] * b).tolist()
