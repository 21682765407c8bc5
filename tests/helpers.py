"""Shared test utilities: backends usable on CPU, input generators, the exactness check."""

from __future__ import annotations

import warnings
from typing import List

import torch

from otprune import backends
from reference import ref_logdet, ref_select

# A greedy step whose best and runner-up residual differ by less than this (relative) is a
# near-tie: rounding in any non-float64 pipeline may legitimately pick the other item there.
# Measured: fp32 pipelines agree with the float64 reference on every path whose smallest gap
# exceeds ~5e-8, so 1e-6 leaves a 20x margin.
NEAR_TIE = {torch.float64: 1e-11, torch.float32: 1e-6}
# Log-det tolerance (relative) where a near-tie lets the paths differ.
LOGDET_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


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


def check_exact(x: torch.Tensor, got, k: int, acc_dtype: torch.dtype, normalize: str = "feature") -> bool:
    """Assert ``got`` (indices for one (N, d) image) is the reference's set, or, at a near-tie,
    a set whose log-det matches the reference's. Returns True when the sets had to be identical."""
    got = [int(i) for i in got]
    assert len(got) == k and len(set(got)) == k, got
    assert got == sorted(got)
    ref, gap = ref_select(x.to(torch.float64), k, normalize=normalize)
    if gap > NEAR_TIE[acc_dtype]:
        assert got == ref, f"no near-tie on the path (min gap {gap:.2e}) but the index sets differ"
        return True
    want = ref_logdet(x, ref, normalize=normalize)
    have = ref_logdet(x, got, normalize=normalize)
    assert abs(have - want) <= LOGDET_RTOL[acc_dtype] * max(1.0, abs(want)), (have, want, gap)
    return False


def quiet_select(*args, **kwargs):
    """otprune.select without the one-time backend fallback warning."""
    import otprune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return otprune.select(*args, **kwargs)
