"""Shared test utilities: backends usable on CPU, input generators, the exactness check."""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch

import pytest

from otprune import backends
from reference import GAMMA, GreedyState, Kernel, relative_gaps

# A greedy step at which an item's residual trails the best one by at most this share of the largest
# diagonal entry of L (reference.relative_gaps) is a near-tie for that item: rounding in a
# non-float64 pipeline may legitimately take it there. At every other step every path must take the
# float64 reference's item, and the replay continues exactly along whichever item was taken.
# Measured with tools/near_ties.py (torch greedy and C++ path, lazy and full kernel rows, float32;
# 12-16 images per size): the largest gap at which a float32 path took another item than the float64
# greedy was 2.0e-7 at N x d = 576 x 1024 (k = 56), 5.8e-7 at 576 x 1024 (k = 173), 9.1e-7 at
# 576 x 4096 (k = 56, 173) and 1.7e-6 at 2880 x 1024 (k = 282); 5e-6 leaves a 3x margin above the
# largest. (Relative to the best residual instead, the same divergences reach 2.4e-5 at d = 4096:
# late residuals are small differences of large terms, so that measure grows with the cancellation.)
# An fp16 or TF32 rounding of the Cholesky rows moves residuals by ~1e-4 of that scale.
NEAR_TIE = {torch.float64: 1e-11, torch.float32: 5e-6}
# Log-det tolerance relative to |log-det|, for checks that compare only log-dets of two sets
# (check_exact itself replays the path exactly instead).
LOGDET_RTOL = {torch.float64: 1e-9, torch.float32: 1e-6}
# Path searches give up after this many greedy steps (only near-ties branch).
_SEARCH_BUDGET = 20_000
_KERNELS: "OrderedDict[tuple, Kernel]" = OrderedDict()


def require_module(name: str, what: str):
    """Import ``name`` for a test module: skip the module when it is missing, or fail it when
    OTPRUNE_REQUIRE_DEPS=1 (`make test`, CI), where every test dependency must be installed."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if os.environ.get("OTPRUNE_REQUIRE_DEPS") == "1":
            pytest.fail(f"OTPRUNE_REQUIRE_DEPS=1 but {what} cannot be imported: {err}", pytrace=False)
        pytest.skip(f"needs {what}: {err}", allow_module_level=True)


def cpu_backends(small_only: bool = False) -> List[str]:
    """Backends usable on CPU tensors here; Triton (interpreter) only for small shapes."""
    names = []
    for name in backends.BACKEND_NAMES:
        ok, _ = backends.usable(name, "cpu")
        if ok and (name != "triton" or small_only):
            names.append(name)
    return names


def features(n: int, d: int, seed: int, b: int = 0, dtype=torch.float32, kind: str = "scaled") -> torch.Tensor:
    """Random (n, d) or (b, n, d) features with per-column scale and offset (LLaVA-like spread)."""
    g = torch.Generator().manual_seed(seed)
    shape = (b, n, d) if b else (n, d)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "scaled":
        x = x * (3 * torch.rand(d, generator=g, dtype=torch.float64)) + torch.randn(d, generator=g, dtype=torch.float64)
    return x.to(dtype)


def reference_kernel(x: torch.Tensor, gamma: float = GAMMA, normalize: str = "feature") -> Kernel:
    """The float64 reference kernel of one (N, d) image, cached by content (every backend of a
    test compares against the same reference)."""
    x = x.detach().cpu().contiguous()
    key = (tuple(x.shape), str(x.dtype), hashlib.sha1(x.numpy().tobytes()).hexdigest(), gamma, normalize)
    if key in _KERNELS:
        _KERNELS.move_to_end(key)
        return _KERNELS[key]
    kern = Kernel.from_features(x, gamma, normalize)
    _KERNELS[key] = kern
    while len(_KERNELS) > 8:
        _KERNELS.popitem(last=False)
    return kern


def follow_path(kern: Kernel, got: Sequence[int], k: int, tie: float) -> List[Tuple[int, float]]:
    """Replay the float64 greedy on ``kern`` along a path that ends in exactly the set ``got``,
    where each step takes the reference's best item, or another item of ``got`` whose residual is
    within ``tie`` of the best (reference.relative_gaps). Returns the steps that took another item,
    as (step, gap); raises AssertionError naming the step when no such path exists.
    Several items within ``tie`` of the best are tried in turn (depth-first search)."""
    st = GreedyState(kern, k)
    remaining = torch.zeros(kern.n, dtype=torch.bool)
    remaining[torch.as_tensor(list(got), dtype=torch.int64)] = True
    dev: List[Tuple[int, float]] = []
    stack = []
    steps, fail = 0, (-1, "")
    while len(st.picks) < k:
        res = st.residuals()
        gaps = torch.where(remaining, relative_gaps(res, st.scale), float("inf"))
        best = int(torch.argmax(res))
        near = (gaps <= tie).nonzero().flatten()
        near = near[torch.argsort(gaps[near], stable=True)]
        ok = list(zip(near.tolist(), gaps[near].tolist()))
        if not ok:
            t = len(st.picks)
            if t > fail[0]:
                i = int(torch.argmin(gaps))
                fail = (t, f"step {t}: the float64 greedy takes {best}, not in the result; the closest "
                           f"item of the result, {i}, trails it by {float(gaps[i]):.2e} "
                           f"> near-tie threshold {tie:.0e} (of max diag L)")
            if not stack:
                raise AssertionError(fail[1])
            snap, remaining, ok, dev = stack.pop()
            st.restore(snap)
            best = int(torch.argmax(st.residuals()))
        if len(ok) > 1:
            stack.append((st.snapshot(), remaining.clone(), ok[1:], list(dev)))
        j, gap = ok[0]
        if j != best:
            dev.append((len(st.picks), gap))
        st.take(j)
        remaining[j] = False
        steps += 1
        assert steps <= _SEARCH_BUDGET, f"near-tie path search gave up after {steps} steps; {fail[1]}"
    return dev


def check_exact(x: torch.Tensor, got, k: int, acc_dtype: torch.dtype, normalize: str = "feature",
                gamma: float = GAMMA) -> bool:
    """Assert that ``got`` (the indices kept for one (N, d) image, ascending) is what the float64
    greedy keeps, step by step (:func:`follow_path` with NEAR_TIE[acc_dtype]): every step takes the
    reference's item except at a near-tie, and the replay goes on exactly from whatever was taken.
    Returns True when ``got`` is the reference's own set and the case is not trivial (1 < k < N):
    what the "not every case was a near-tie" guards count."""
    got = [int(i) for i in got]
    n = x.shape[0]
    assert len(got) == k and len(set(got)) == k, got
    assert got == sorted(got)
    assert all(0 <= i < n for i in got), got
    if k == n:
        return False
    dev = follow_path(reference_kernel(x, gamma, normalize), got, k, NEAR_TIE[acc_dtype])
    return not dev and 1 < k < n


def check_same_order(x: torch.Tensor, a, b, acc_dtype: torch.dtype, normalize: str = "feature",
                     gamma: float = GAMMA) -> bool:
    """Two greedy orders (picks in selection order) for one (N, d) image: identical, or first
    different at a step where their two items' float64 residuals (after the common prefix) are
    within NEAR_TIE[acc_dtype] of each other. True when identical."""
    a, b = [int(i) for i in a], [int(i) for i in b]
    assert len(a) == len(b)
    t = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
    if t is None:
        return True
    st = GreedyState(reference_kernel(x, gamma, normalize), t + 1)
    for j in a[:t]:
        st.take(j)
    res = st.residuals()
    gap = float(abs(res[a[t]] - res[b[t]])) / st.scale
    assert gap <= NEAR_TIE[acc_dtype], f"orders part at step {t} ({a[t]} vs {b[t]}) with gap {gap:.2e}"
    return False


def quiet_select(*args, **kwargs):
    """otprune.select without the one-time backend fallback warning."""
    import otprune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return otprune.select(*args, **kwargs)
