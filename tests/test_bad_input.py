"""Bad input raises ValueError/TypeError naming the argument; degenerate valid input works."""

import math

import numpy as np
import pytest
import torch

import otprune
from helpers import check_exact, cpu_backends, features, quiet_select

X = torch.randn(10, 4)
XB = torch.randn(2, 10, 4)

# (id, callable, exception type, text the message must contain)
BAD = [
    ("features-list", lambda: otprune.select([[1.0, 2.0]], 1), TypeError, "features"),
    ("features-numpy", lambda: otprune.select(np.ones((4, 3), np.float32), 1), TypeError, "features"),
    ("features-int", lambda: otprune.select(torch.ones(4, 3, dtype=torch.int64), 1), TypeError, "dtype"),
    ("features-bool", lambda: otprune.select(torch.ones(4, 3, dtype=torch.bool), 1), TypeError, "dtype"),
    ("features-complex", lambda: otprune.select(torch.ones(4, 3, dtype=torch.complex64), 1), TypeError, "dtype"),
    ("features-1d", lambda: otprune.select(torch.ones(5), 1), ValueError, "shape"),
    ("features-4d", lambda: otprune.select(torch.ones(1, 2, 5, 3), 1), ValueError, "shape"),
    ("features-0d", lambda: otprune.select(torch.tensor(1.0), 1), ValueError, "shape"),
    ("empty-N", lambda: otprune.select(torch.ones(0, 3), 1), ValueError, "N = 0"),
    ("empty-d", lambda: otprune.select(torch.ones(4, 0), 1), ValueError, "d = 0"),
    ("empty-B", lambda: otprune.select(torch.ones(0, 4, 3), 1), ValueError, "B = 0"),
    ("nan", lambda: otprune.select(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1), ValueError, "non-finite"),
    ("inf", lambda: otprune.select(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1), ValueError, "non-finite"),
    ("-inf-half", lambda: otprune.select(torch.tensor([[1.0, -float("inf")]], dtype=torch.float16), 1), ValueError, "non-finite"),
    ("keep-zero", lambda: otprune.select(X, 0), ValueError, "keep"),
    ("keep-negative", lambda: otprune.select(X, -3), ValueError, "keep"),
    ("keep-above-N", lambda: otprune.select(X, 11), ValueError, "keep"),
    ("keep-ratio-zero", lambda: otprune.select(X, 0.0), ValueError, "keep"),
    ("keep-ratio-above-one", lambda: otprune.select(X, 1.5), ValueError, "keep"),
    ("keep-ratio-negative", lambda: otprune.select(X, -0.1), ValueError, "keep"),
    ("keep-nan", lambda: otprune.select(X, math.nan), ValueError, "keep"),
    ("keep-inf", lambda: otprune.select(X, math.inf), ValueError, "keep"),
    ("keep-bool", lambda: otprune.select(X, True), TypeError, "keep"),
    ("keep-str", lambda: otprune.select(X, "10"), TypeError, "keep"),
    ("keep-none", lambda: otprune.select(X, None), TypeError, "keep"),
    ("keep-above-a-length", lambda: otprune.select(XB, 8, lengths=[10, 5]), ValueError, "keep"),
    ("gamma-zero", lambda: otprune.select(X, 2, gamma=0.0), ValueError, "gamma"),
    ("gamma-negative", lambda: otprune.select(X, 2, gamma=-1.0), ValueError, "gamma"),
    ("gamma-nan", lambda: otprune.select(X, 2, gamma=math.nan), ValueError, "gamma"),
    ("gamma-str", lambda: otprune.select(X, 2, gamma="0.01"), TypeError, "gamma"),
    ("gamma-overflows-float32", lambda: otprune.select(X, 2, gamma=1e40), ValueError, "gamma"),
    ("gamma-overflows-float32-token", lambda: otprune.select(X, 2, gamma=1e37, normalize="token"), ValueError, "gamma"),
    ("gamma-overflows-float64", lambda: otprune.select(X.double(), 2, gamma=1e306), ValueError, "gamma"),
    ("gamma-overflows-unchecked", lambda: otprune.select(X, 2, gamma=1e40, check=False), ValueError, "gamma"),
    ("check-str", lambda: otprune.select(X, 2, check="no"), TypeError, "check"),
    ("check-tensor", lambda: otprune.select(X, 2, check=torch.tensor(False)), TypeError, "check"),
    ("normalize-unknown", lambda: otprune.select(X, 2, normalize="l1"), ValueError, "normalize"),
    ("compat-unknown", lambda: otprune.select(X, 2, compat="paper"), ValueError, "compat"),
    ("backend-unknown", lambda: otprune.select(X, 2, backend="metal"), ValueError, "backend"),
    ("backend-cuda-on-cpu", lambda: otprune.select(X, 2, backend="cuda"), ValueError, "backend"),
    ("official-with-backend", lambda: otprune.select(X, 2, compat="official", backend="cuda"), ValueError, "backend"),
    ("lengths-unbatched", lambda: otprune.select(X, 2, lengths=[10]), ValueError, "lengths"),
    ("lengths-wrong-count", lambda: otprune.select(XB, 2, lengths=[10, 10, 10]), ValueError, "lengths"),
    ("lengths-2d", lambda: otprune.select(XB, 2, lengths=torch.ones(2, 1, dtype=torch.int64)), ValueError, "lengths"),
    ("lengths-zero", lambda: otprune.select(XB, 1, lengths=[10, 0]), ValueError, "length"),
    ("lengths-above-N", lambda: otprune.select(XB, 1, lengths=[10, 11]), ValueError, "length"),
    ("lengths-float", lambda: otprune.select(XB, 1, lengths=torch.tensor([10.0, 5.0])), TypeError, "lengths"),
    ("lengths-float-list", lambda: otprune.select(XB, 1, lengths=[10.0, 5.5]), TypeError, "lengths"),
    ("lengths-str", lambda: otprune.select(XB, 1, lengths="ab"), TypeError, "lengths"),
    ("lengths-int", lambda: otprune.select(XB, 1, lengths=10), TypeError, "lengths"),
    ("lengths-set", lambda: otprune.select(XB, 1, lengths={10, 5}), TypeError, "lengths"),
    ("lengths-generator", lambda: otprune.select(XB, 1, lengths=(v for v in (10, 5))), TypeError, "lengths"),
    ("keep-above-a-tensor-length", lambda: otprune.select(XB, 8, lengths=torch.tensor([10, 5])), ValueError, "row 1"),
    ("prune-bad-keep", lambda: otprune.prune(X, 0), ValueError, "keep"),
    ("kernel-matrix-int", lambda: otprune.kernel_matrix(torch.ones(3, 2, dtype=torch.int32)), TypeError, "dtype"),
    ("kernel-matrix-gamma", lambda: otprune.kernel_matrix(X, gamma=-1.0), ValueError, "gamma"),
    ("kernel-matrix-gamma-overflows", lambda: otprune.kernel_matrix(X, gamma=1e40), ValueError, "gamma"),
    ("objective-index-below-padding", lambda: otprune.objective(X, torch.tensor([0, -2])), ValueError, "-1"),
    ("objective-float-indices", lambda: otprune.objective(X, torch.tensor([0.0, 1.0])), TypeError, "indices"),
    ("objective-index-range", lambda: otprune.objective(X, torch.tensor([0, 10])), ValueError, "indices"),
    ("objective-repeat", lambda: otprune.objective(X, torch.tensor([1, 1])), ValueError, "repeat"),
    ("objective-shape", lambda: otprune.objective(XB, torch.tensor([0, 1])), ValueError, "indices"),
    ("objective-batch", lambda: otprune.objective(XB, torch.tensor([[0, 1]])), ValueError, "batch"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(case):
    _, call, exc, text = case
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError))
    assert text.lower() in str(info.value).lower(), str(info.value)


# ---- degenerate but valid input: valid indices, never NaN-driven garbage -------------------------

def _assert_valid(idx, n, k):
    vals = idx.tolist()
    assert len(vals) == k and len(set(vals)) == k and vals == sorted(vals)
    assert all(0 <= v < n for v in vals)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("keep", [1.0, 39, 30])
@pytest.mark.parametrize("rows", ["lazy", "full"])
def test_large_gamma_on_identical_tokens_keeps_distinct_tokens(backend, keep, rows, monkeypatch):
    """gamma = 100 on 40 identical tokens: L = I + c 11^T with c ~ 1e6, so float32 residuals lose
    about 0.1 a step to cancellation. Without the residuals' floor at 1 they fell below 0, the
    updates exploded and picks repeated; now every pick is a distinct token."""
    from otprune import greedy

    monkeypatch.setattr(greedy, "FULL_ROWS_MIN_SHARE", 0.0 if rows == "full" else 2.0)
    torch.manual_seed(0)
    x = torch.randn(1, 700).expand(40, 700).contiguous()
    k = 40 if keep == 1.0 else keep
    for check in (True, False):
        _assert_valid(quiet_select(x, keep, gamma=100.0, backend=backend, check=check), 40, k)
    # 17 rank-one tokens at gamma = 1000: the C++ path repeated picks here without the floor
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(17, 1, generator=g) @ torch.randn(1, 474, generator=g)).half()
    k = 17 if keep == 1.0 else 12
    for check in (True, False):
        _assert_valid(quiet_select(x, k, gamma=1000.0, backend=backend, check=check), 17, k)


@pytest.mark.parametrize("backend", cpu_backends())
def test_duplicate_tokens(backend):
    base = torch.randn(6, 16)
    x = base.repeat(8, 1)  # 48 tokens, 6 distinct
    idx = quiet_select(x, 12, backend=backend)
    _assert_valid(idx, 48, 12)
    check_exact(x, idx, 12, torch.float32)  # exact ties everywhere: compared by log-det


@pytest.mark.parametrize("backend", cpu_backends())
def test_constant_features(backend):
    idx = quiet_select(torch.full((30, 8), 2.5), 5, backend=backend)
    _assert_valid(idx, 30, 5)
    assert idx.tolist() == [0, 1, 2, 3, 4]  # every gain ties: lowest indices first


@pytest.mark.parametrize("backend", cpu_backends())
def test_all_zero_features(backend):
    idx = quiet_select(torch.zeros(2, 20, 5), 4, backend=backend)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_feature_column(backend):
    x = features(40, 6, 1)
    x[:, 2] = 0
    idx = quiet_select(x, 8, backend=backend)
    _assert_valid(idx, 40, 8)
    check_exact(x, idx, 8, torch.float32)
    assert torch.isfinite(otprune.kernel_matrix(x)).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_token_with_token_normalisation(backend):
    x = features(30, 6, 2)
    x[4] = 0
    idx = quiet_select(x, 6, normalize="token", backend=backend)
    _assert_valid(idx, 30, 6)
    assert check_exact(x, idx, 6, torch.float32, normalize="token")


@pytest.mark.parametrize("backend", cpu_backends())
def test_single_token(backend):
    assert quiet_select(torch.randn(1, 7), 1, backend=backend).tolist() == [0]
    assert quiet_select(torch.randn(1, 7), 1.0, backend=backend).tolist() == [0]
    assert quiet_select(torch.randn(3, 1, 7), 0.5, backend=backend).tolist() == [[0]] * 3


@pytest.mark.parametrize("backend", cpu_backends())
def test_k_equals_n(backend):
    idx = quiet_select(features(33, 5, 0, b=2), 33, backend=backend)
    assert idx.tolist() == [list(range(33))] * 2


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30])
def test_extreme_magnitudes(backend, scale):
    """Normalisation is scale-invariant, so extreme (finite) scales pick the same tokens."""
    x = features(50, 10, 3, dtype=torch.float64)
    want = quiet_select(x, 9, backend=backend).tolist()
    assert quiet_select(x * scale, 9, backend=backend).tolist() == want
    x32 = x.float()
    assert quiet_select(x32 * float(scale) if abs(math.log10(scale)) < 37 else x32, 9, backend=backend).tolist() == quiet_select(x32, 9, backend=backend).tolist()


def test_fp16_extremes():
    x = features(50, 10, 3, dtype=torch.float32)
    big = (x / x.abs().max() * 60000).half()
    tiny = (x / x.abs().max() * 1e-6).half()  # subnormal halves
    for h in (big, tiny):
        idx = otprune.select(h, 9)
        _assert_valid(idx, 50, 9)
        check_exact(h.float(), idx, 9, torch.float32)


def test_non_contiguous_and_grad_inputs():
    x = features(40, 12, 5, b=2)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous view
    assert not xt.is_contiguous()
    assert torch.equal(otprune.select(xt, 5), otprune.select(x, 5))
    xg = x.clone().requires_grad_(True)
    assert torch.equal(otprune.select(xg, 5), otprune.select(x, 5))
    assert torch.equal(otprune.select(x[:, ::2], 4), otprune.select(x[:, ::2].contiguous(), 4))


@pytest.mark.parametrize("kwargs", [{}, {"check": False}, {"backend": "torch"}, {"compat": "official"}])
def test_meta_tensors_are_refused_naming_the_device(kwargs):
    """Meta tensors have no values to select from: refused with the device named, not a host-read
    failure deep inside (torch.compile's fake tensors go through otprune::select's fake kernel)."""
    with pytest.raises(RuntimeError, match="meta"):
        otprune.select(torch.empty(2, 40, 8, device="meta"), 9, **kwargs)
