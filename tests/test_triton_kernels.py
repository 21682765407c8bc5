"""Triton kernels and the "triton" backend against plain-torch / float64 references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with a GPU and no interpreter they run on CUDA tensors. Shapes stay small:
the interpreter costs milliseconds per program per loop step.
"""

import sys

import pytest
import torch

from otprune import backends
from otprune.greedy import greedy_picks
from otprune.kernel import kernel_from_similarity
from otprune.kernel import similarity as torch_similarity
from helpers import LOGDET_RTOL, NEAR_TIE, check_exact, features, quiet_select
from reference import ref_greedy

from helpers import require_module

require_module("triton", "triton")
from otprune import triton_kernels as tk  # noqa: E402  (installed with otprune; an ImportError is an install bug)

DEV = "cpu" if tk.interpreting() else "cuda"
_ok, _why = backends.usable("triton", DEV)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend not usable for {DEV}: {_why}")

SIZES = [(1, 1), (2, 3), (37, 1), (37, 40), (65, 3), (65, 40)]
HALF_AND_SINGLE = [torch.float16, torch.bfloat16, torch.float32]
# Max abs error of S against float64 on the same input values, relative to max(1, max |S|).
# Measured: <= 6e-7 for these shapes (all three dtypes; the fp16 hi/lo split is as close as fp32).
S_RTOL = 4e-6
# L = I + gamma S S^T and its rows from the same fp32 S, against float64 on that S.
L_RTOL = 1e-6


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    got = got.double().cpu()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert torch.isfinite(got).all()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} * {scale:.3g}"


@pytest.mark.parametrize("n,d", SIZES + [(2, 40), (65, 1)])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("normalize", ["feature", "token"])
def test_similarity_matches_torch(n, d, dtype, normalize):
    x = features(n, d, n * 13 + d, b=2, dtype=dtype)
    s = tk.similarity(x.to(DEV), normalize)
    assert s.shape == (2, n, n) and s.dtype == torch.float32
    _close(s, torch_similarity(x.double(), normalize), S_RTOL)
    assert torch.equal(s, s.transpose(1, 2)), "S must be exactly symmetric"


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("normalize", ["feature", "token"])
def test_similarity_valid_mask_and_strides(dtype, normalize):
    x = features(40, 24, 5, b=3, dtype=dtype)
    x[0, 30:] = 1e3  # padding content must not matter
    valid = torch.arange(40).unsqueeze(0) < torch.tensor([[30], [40], [1]])
    s = tk.similarity(x.to(DEV), normalize, valid.to(DEV))
    _close(s, torch_similarity(x.double(), normalize, valid), S_RTOL)
    assert (s[0, 30:] == 0).all() and (s[0, :, 30:] == 0).all()
    # a non-contiguous view of the same values gives the same S
    xt = x.transpose(1, 2).contiguous().transpose(1, 2).to(DEV)
    assert not xt.is_contiguous()
    assert torch.equal(tk.similarity(xt, normalize, valid.to(DEV)), s)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_similarity_zero_column_and_token(dtype):
    x = features(20, 6, 1, b=1, dtype=dtype)
    x[0, :, 2] = 0
    x[0, 4, :] = 0
    for normalize in ("feature", "token"):
        s = tk.similarity(x.to(DEV), normalize)
        _close(s, torch_similarity(x.double(), normalize), S_RTOL)


@pytest.mark.parametrize("n", [1, 2, 37, 65])
def test_kernel_matrix_and_rows(n):
    s = tk.similarity(features(n, 40, n, b=2).to(DEV))
    want = kernel_from_similarity(s.double().cpu(), 0.01)
    L = tk.kernel_matrix(s, 0.01)
    _close(L, want, L_RTOL)
    assert torch.equal(L, L.transpose(1, 2))
    rows = torch.tensor([[n - 1, 0, -1], [n // 2, n // 2, 0]])
    got = tk.kernel_rows(s, rows.to(DEV), 0.01)
    assert got.shape == (2, 3, n)
    for b in range(2):
        for m in range(3):
            j = int(rows[b, m])
            if j < 0:
                assert (got[b, m] == 0).all()
            else:
                _close(got[b, m], want[b, j], L_RTOL)


def _check_order(s: torch.Tensor, got, k: int) -> bool:
    """``got`` (greedy order for one (N, N) S) is the float64 greedy's order on the same S, or
    has its log-det where that path has a near-tie. True when the orders had to be identical."""
    L = kernel_from_similarity(s.double().cpu(), 0.01)
    got = [int(i) for i in got]
    want, gaps = ref_greedy(L, k)
    if min(gaps) > NEAR_TIE[torch.float32]:
        assert got == want
        return True
    logdet = lambda idx: float(torch.linalg.slogdet(L[idx][:, idx])[1])  # noqa: E731
    assert abs(logdet(got) - logdet(want)) <= LOGDET_RTOL[torch.float32] * max(1.0, abs(logdet(want)))
    return False


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_matches_float64_greedy(strategy):
    exact = 0
    for n, d in SIZES:
        s = tk.similarity(features(n, d, n + 2 * d, b=2).to(DEV))
        ks = [max(1, round(0.3 * n)), n]
        picks = tk.greedy(s, ks, 0.01, strategy=strategy)
        assert picks.dtype == torch.int64 and picks.shape == (2, n)
        assert (picks[0, ks[0]:] == -1).all()
        for b in range(2):
            exact += _check_order(s[b], picks[b, : ks[b]], ks[b])
        if n > 1:
            assert sorted(picks[1].tolist()) == list(range(n))  # k = N takes every token
    assert exact >= 6


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_ties_go_to_lowest_index(strategy):
    x = torch.ones(1, 9, 4)  # identical tokens: every residual ties at every step
    s = tk.similarity(x.to(DEV))
    picks = tk.greedy(s, [5], 0.01, strategy=strategy)
    assert picks[0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(picks.cpu(), greedy_picks(s.cpu(), [5], 0.01))


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_ragged_and_batch_equal_per_item(strategy):
    lengths = [37, 1, 20, 37]
    ks = [7, 1, 20, 3]
    x = features(37, 12, 4, b=4)
    valid = torch.arange(37).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    s = tk.similarity(x.to(DEV), "feature", valid.to(DEV))
    picks = tk.greedy(s, ks, 0.01, valid.to(DEV), strategy=strategy)
    assert picks.shape == (4, 20)
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert (picks[b, k:] == -1).all()
        alone = tk.greedy(tk.similarity(x[b : b + 1, :n].to(DEV)), [k], 0.01, strategy=strategy)
        assert picks[b, :k].tolist() == alone[0].tolist()


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_equal_budgets_past_a_rows_tokens(strategy):
    """What otprune.select runs on a GPU for a ragged batch: every row to k_max (a row of 1 or 3
    tokens runs past them), cut to its budget afterwards. The first k_b picks of each row are the
    ragged call's, and no index leaves [0, N)."""
    lengths, ks = [37, 1, 3, 37], [7, 1, 3, 3]
    x = features(37, 12, 5, b=4)
    valid = (torch.arange(37).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(DEV)
    s = tk.similarity(x.to(DEV), "feature", valid)
    ragged = tk.greedy(s, ks, 0.01, valid, strategy=strategy)
    equal = tk.greedy(s, [7] * 4, 0.01, valid, strategy=strategy)
    assert ((equal >= 0) & (equal < 37)).all(), equal
    for b, k in enumerate(ks):
        assert equal[b, :k].tolist() == ragged[b, :k].tolist()


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_large_gamma_on_rank_one_tokens_keeps_distinct_tokens(strategy):
    """gamma = 1000 on 17 rank-one tokens: float32 residuals lose a large share to cancellation;
    without the residuals' floor at 1 this kernel kept 11 (lazy) or 9 (full) distinct tokens of 17."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 17, 1, generator=g) @ torch.randn(1, 474, generator=g)).half().float()
    s = tk.similarity(x.to(DEV))
    for k in (17, 12):
        row = tk.greedy(s, [k], 1000.0, strategy=strategy)[0].tolist()
        assert len(set(row)) == k and all(0 <= i < 17 for i in row), row


@pytest.mark.parametrize("strategy", ["full", "lazy"])
def test_greedy_column_chunks_give_the_same_picks(strategy, monkeypatch):
    """Beyond MAX_BLOCK_N columns (1024) a step loops over column chunks with the residuals in a
    scratch; forced here with 8-column chunks: the same picks, ties still to the lowest index."""
    greedy_mod = sys.modules[tk.greedy.__module__]
    valid = torch.arange(21).unsqueeze(0) < torch.tensor([[21], [17]])
    s = tk.similarity(features(21, 12, 9, b=2).to(DEV), "feature", valid.to(DEV))
    ties = tk.similarity(torch.ones(1, 20, 4).to(DEV))
    want = tk.greedy(s, [4, 17], 0.01, valid.to(DEV), strategy=strategy)
    monkeypatch.setattr(greedy_mod, "MAX_BLOCK_N", 8)
    assert torch.equal(tk.greedy(s, [4, 17], 0.01, valid.to(DEV), strategy=strategy), want)
    assert tk.greedy(ties, [11], 0.01, strategy=strategy)[0].tolist() == list(range(11))


def test_greedy_strategy_by_cost_and_size():
    assert tk.choose_strategy(1, 576, 56) == "full"  # a 3 us GEMM against 72 MB through one SM
    assert tk.choose_strategy(132, 576, 56) == "full"
    assert tk.choose_strategy(16, 2880, 282) == "full"  # 0.5 GiB of L
    assert tk.choose_strategy(64, 2880, 282) == "lazy"  # 2.1 GiB of L: does not fit
    assert tk.choose_strategy(1, 576, 1) == "lazy"  # no step after the first pick: no row needed
    assert tk.choose_strategy(132, 576, 2) == "lazy"  # a full GPU of images, one step each


def test_bad_arguments():
    x = features(5, 3, 0, b=1)
    with pytest.raises(TypeError, match="x must be"):
        tk.similarity(x.to(torch.float64).to(DEV))
    with pytest.raises(ValueError, match="x must be"):
        tk.similarity(x[0].to(DEV))
    with pytest.raises(ValueError, match="normalize"):
        tk.similarity(x.to(DEV), "rows")
    s = tk.similarity(x.to(DEV))
    with pytest.raises(TypeError, match="s must be float32"):
        tk.greedy(s.double(), [2], 0.01)
    with pytest.raises(ValueError, match="ks"):
        tk.greedy(s, [6], 0.01)
    with pytest.raises(ValueError, match="strategy"):
        tk.greedy(s, [2], 0.01, strategy="fast")
    with pytest.raises(ValueError, match="rows"):
        tk.kernel_rows(s, torch.tensor([[5]], device=DEV), 0.01)


# ---- the whole selection through backend="triton" against the float64 reference ----


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_select_matches_reference(n, d, dtype):
    exact = 0
    for seed, ratio in ((n * 7 + d, 0.098), (n + d + 1, 0.3)):
        x = features(n, d, seed, dtype=dtype)
        k = max(1, round(ratio * n))
        idx = quiet_select(x.to(DEV), k, backend="triton")
        assert idx.dtype == torch.int64 and idx.shape == (k,) and idx.device.type == DEV
        exact += check_exact(x.float(), idx.cpu(), k, torch.float32)
    if n > 2:
        assert exact, "every case had a near-tie: only log-dets were compared"


def test_select_fp16_split_products_are_exact_enough():
    """fp16 input takes the hi/lo split GEMM; over 3x3 tiles it still reproduces the float64 picks."""
    exact = 0
    for seed in range(3):
        x = features(150, 200, seed, dtype=torch.float16)
        idx = quiet_select(x.to(DEV), 0.1, backend="triton")
        exact += check_exact(x.float(), idx.cpu(), 15, torch.float32)
    assert exact >= 2


@pytest.mark.parametrize("normalize", ["feature", "token"])
def test_select_batch_ragged(normalize):
    def sel(x, keep, **kw):
        return quiet_select(x.to(DEV), keep, normalize=normalize, backend="triton", **kw)

    lengths = [65, 37, 1, 50]
    x = features(65, 20, 8, b=4)
    x[1, 37:] = 1e3  # padding content must not matter
    idx = sel(x, 0.1, lengths=lengths)
    ks = [round(0.1 * n) or 1 for n in lengths]
    assert idx.shape == (4, max(ks))
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert (idx[b, k:] == -1).all()
        check_exact(x[b, :n], idx[b, :k].cpu(), k, torch.float32, normalize=normalize)
        assert idx[b, :k].tolist() == sel(x[b, :n], k).tolist()
    assert torch.equal(sel(x, 0.1), sel(x, 0.1, lengths=[65] * 4))


def test_select_float64_input_runs_in_float64():
    x = features(37, 40, 2, dtype=torch.float64)
    idx = quiet_select(x.to(DEV), 9, backend="triton")
    assert idx.tolist() == quiet_select(x, 9, backend="torch").tolist()
    check_exact(x, idx.cpu(), 9, torch.float64)


def test_backend_registration():
    be = backends.get_backend("triton")
    assert be.devices == (("cpu",) if tk.interpreting() else ("cuda",))
    other = "cuda" if DEV == "cpu" else "cpu"
    ok, why = backends.usable("triton", other)
    assert not ok and "only" in why
