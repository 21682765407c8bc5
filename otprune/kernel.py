"""Stage 1 in pure torch: normalisation, similarity S and the DPP kernel L = I + gamma * S S^T.

Shapes: features (B, N, d); S and L (B, N, N). Accumulation dtype: float64 for float64 input,
float32 otherwise (fp16/bf16 inputs are upcast before any arithmetic).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

# An image whose largest magnitude lies outside this range is multiplied by a power of two before
# squaring (see :func:`magnitude_scale`), so that squares neither overflow nor underflow.
SAFE_MAGNITUDE = (1e-12, 1e12)
# Block size (rows, and columns alike) of the CPU Gram's lower block triangle (see symmetric_gram;
# 72, 96 and 144 measured at N = 576: 96 fastest by a few per cent).
GRAM_BLOCK_ROWS = 96


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def image_extremes(x: torch.Tensor) -> torch.Tensor:
    """(2, B) tensor of x's dtype: row 0 the min, row 1 the max of each image of (B, N, d) ``x``
    (NaN where an image holds NaN), written in place by the reductions (no concatenation). On the
    CPU one fused reduction per image (a per-row ``aminmax(dim=...)`` is ~10x slower there);
    elsewhere one batched reduction."""
    B = x.shape[0]
    out = x.new_empty(2, B)
    if x.device.type == "cpu":
        for b in range(B):
            torch.aminmax(x[b], out=(out[0, b], out[1, b]))
    else:
        torch.aminmax(x.reshape(B, -1), dim=1, out=(out[0], out[1]))
    return out


def magnitude_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Powers of two s (float64, lo's shape and device) bringing max |x| into [0.5, 1) where it
    lies outside :data:`SAFE_MAGNITUDE`, else 1; elementwise, in 11 device ops (the unchecked path's
    scale; the checked path reads the extremes and uses :func:`host_magnitude_scale`).

    lo, hi: min and max of x (any float dtype, same shape; per image: the rows of
    :func:`image_extremes`).
    A power of two scales exactly, and the normalisation is scale-invariant, so the selection does
    not change. s stays finite and nonzero in x's accumulation dtype; an all-zero image may get any
    such s (it stays zero); non-finite extremes give an unspecified s.
    """
    maxexp = math.frexp(torch.finfo(accumulation_dtype(lo.dtype)).max)[1]
    # max |x|, at least 2^(1 - maxexp): its exponent e then lies in [2 - maxexp, maxexp]
    amax = torch.maximum(-lo, hi).to(torch.float64).clamp_min(2.0 ** (1 - maxexp))
    mantissa, _ = torch.frexp(amax)
    s = mantissa / amax  # exactly 2^-e for amax = m 2^e
    return torch.where((amax < SAFE_MAGNITUDE[0]) | (amax > SAFE_MAGNITUDE[1]), s, 1.0)


def host_magnitude_scale(lo: float, hi: float, dtype: torch.dtype) -> float:
    """:func:`magnitude_scale` for one image's extremes read on the host (Python floats, ``dtype``
    the features' dtype): the same power of two, without device ops."""
    amax = max(abs(lo), abs(hi))
    if not (math.isfinite(amax) and amax > 0) or SAFE_MAGNITUDE[0] <= amax <= SAFE_MAGNITUDE[1]:
        return 1.0
    maxexp = math.frexp(torch.finfo(accumulation_dtype(dtype)).max)[1]
    return math.ldexp(1.0, -min(max(math.frexp(amax)[1], 2 - maxexp), maxexp))


def valid_mask(lengths: Optional[torch.Tensor], B: int, N: int, device) -> Optional[torch.Tensor]:
    """(B, N) bool mask of the real (non-padding) tokens, or None when every token is real."""
    if lengths is None:
        return None
    return torch.arange(N, device=device).unsqueeze(0) < lengths.unsqueeze(1)


def normalize_features(
    x: torch.Tensor, normalize: str = "feature", valid: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Normalise (B, N, d) features in the accumulation dtype.

    ``"feature"``: every feature column gets unit L2 norm over the (valid) tokens (dim -2).
    ``"token"``: every token gets unit L2 norm (cosine similarity). A squared norm not above the
    dtype's smallest normal number (a zero column or token, or one whose squares underflow) leaves
    zeros: a norm is used only where it is accurate.
    Padding tokens (``valid`` False) are set to zero and do not enter the norms.
    out: optional (B, N, d) buffer of the accumulation dtype that receives the result.
    """
    x = x.to(accumulation_dtype(x.dtype))
    if valid is not None:
        x = torch.where(valid.unsqueeze(-1), x, 0.0)  # not a product: NaN padding would stay NaN
    dim = -2 if normalize == "feature" else -1
    # The output buffer holds the squares first (one (B, N, d) allocation instead of two: fresh
    # pages cost as much as the arithmetic on CPU). square + sum is several times faster than
    # vector_norm over a strided dim on CPU.
    y = torch.mul(x, x, out=out)
    sq = y.sum(dim, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    inv = torch.where(sq > tiny, sq.clamp_min(tiny).rsqrt(), 0.0)
    return torch.mul(x, inv, out=y)


def row_blocks(n: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of the CPU Gram's blocks (of rows and, alike, of columns): about
    :data:`GRAM_BLOCK_ROWS` each, equal sizes up to the last, covering range(n)."""
    count = max(1, -(-n // GRAM_BLOCK_ROWS))
    size = -(-n // count)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def lower_gram_(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The lower block triangle of Y Y^T for (N, K) ``y`` into (N, N) ``out`` (row stride free),
    one GEMM per block column of :func:`row_blocks`: column block [j0, j1) gets rows [j0, N)
    (measured ~12% faster than the same triangle by block rows: each GEMM has many rows).
    Entries above the diagonal blocks are left as they were. Returns ``out``."""
    for j0, j1 in row_blocks(y.shape[0]):
        torch.mm(y[j0:], y[j0:j1].T, out=out[j0:, j0:j1])
    return out


def mirror_lower_(s: torch.Tensor) -> torch.Tensor:
    """Make (B, N, N) ``s`` exactly symmetric in place from its lower block triangle (as written by
    :func:`lower_gram_`): the strict lower triangle is copied onto the upper one. Returns ``s``."""
    n = s.shape[-1]
    blocks = row_blocks(n)
    size = blocks[0][1]
    upper = torch.ones(size, size, dtype=torch.bool, device=s.device).triu_(1)
    for i0, i1 in blocks:
        if i0:
            s[:, :i0, i0:i1].copy_(s[:, i0:i1, :i0].transpose(-1, -2))
        diag = s[:, i0:i1, i0:i1]
        m = upper[: i1 - i0, : i1 - i0]
        diag.copy_(torch.where(m, diag.transpose(-1, -2), diag))
    return s


def symmetric_gram(y: torch.Tensor) -> torch.Tensor:
    """Y Y^T for (B, N, K) ``y``, (B, N, N), exactly symmetric.

    CUDA (and any non-CPU device): one batched GEMM. CPU: image by image, only the lower block
    triangle (:func:`lower_gram_`, 7/12 of the FLOPs at N = 576), then :func:`mirror_lower_`.
    Measured on the 2-core x86 machine (MKL, float32, N = 576, medians of rounds in which no other
    process used the CPU): the triangle's GEMMs take 84 ms against 115 ms for one full batched GEMM
    at B = 8, d = 4096, and 21 against 29 ms at B = 8, d = 1024 (smaller GEMMs run at a lower rate,
    so the saving is less than the FLOPs'); the mirror adds ~1.6 ms at B = 8. Under load from other
    processes the many smaller calls suffer more than one large one.
    """
    if y.device.type != "cpu":
        return torch.matmul(y, y.transpose(-1, -2))
    out = y.new_empty(y.shape[0], y.shape[1], y.shape[1])
    for b in range(y.shape[0]):
        lower_gram_(y[b], out[b])
    return mirror_lower_(out)


def similarity(
    x: torch.Tensor, normalize: str = "feature", valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """S = Xn Xn^T, (B, N, N) in the accumulation dtype, exactly symmetric; padding rows and
    columns are zero.

    On CPU image by image: each image is normalised into one reused (N, d) buffer and multiplied
    (:func:`lower_gram_`) while it is still in cache, instead of normalising the whole batch first
    (a (B, N, d) pass that runs from DRAM: 75 MB at B = 8, d = 4096).
    """
    if x.device.type != "cpu":
        return symmetric_gram(normalize_features(x, normalize, valid))
    B, N, d = x.shape
    dtype = accumulation_dtype(x.dtype)
    out = torch.empty(B, N, N, dtype=dtype)
    buf = torch.empty(1, N, d, dtype=dtype)
    for b in range(B):
        vb = None if valid is None else valid[b : b + 1]
        lower_gram_(normalize_features(x[b : b + 1], normalize, vb, out=buf)[0], out[b])
    return mirror_lower_(out)


def apply_scale(x: torch.Tensor, scale: Optional[List[float]]) -> torch.Tensor:
    """(B, N, d) ``x`` in its accumulation dtype with image b multiplied by ``scale[b]`` (powers of
    two from :func:`host_magnitude_scale`); x itself when ``scale`` is None. Off the CPU unequal
    scales are written on the device by fill kernels, not copied from host memory."""
    if scale is None:
        return x
    from ._validate import device_values

    dtype = accumulation_dtype(x.dtype)
    if len(set(scale)) == 1:
        return x.to(dtype) * scale[0]
    return x.to(dtype) * device_values(scale, x.device, dtype).view(-1, 1, 1)


def kernel_from_similarity(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """L = I + gamma * S S^T for (..., N, N) similarity S."""
    n = s.shape[-1]
    eye = torch.eye(n, dtype=s.dtype, device=s.device)
    return eye + gamma * torch.matmul(s, s.transpose(-1, -2))


def kernel_matrix(features: torch.Tensor, gamma: float = 0.01, normalize: str = "feature") -> torch.Tensor:
    """The OTPrune kernel L = I + gamma * S S^T of (N, d) or (B, N, d) features.

    Returns (N, N) or (B, N, N) in float32 (float64 for float64 input).
    """
    from ._validate import (check_feature_shape, check_gamma, check_gamma_range, check_normalize,
                            read_select_data, select_probe)

    x = check_feature_shape(features)
    gamma = check_gamma(gamma)
    check_normalize(normalize)
    check_gamma_range(gamma, x, normalize)
    x3 = x if x.ndim == 3 else x.unsqueeze(0)
    x3 = apply_scale(x3, read_select_data(select_probe(x3, None), x3, None, 1).scale)  # one host sync
    L = kernel_from_similarity(similarity(x3, normalize), gamma)
    return L if x.ndim == 3 else L[0]


def objective(
    features: torch.Tensor,
    indices: torch.Tensor,
    gamma: float = 0.01,
    normalize: str = "feature",
) -> torch.Tensor:
    """log det L[T, T] of the kept set T, computed in float64.

    ``features``: (N, d) or (B, N, d); ``indices``: (k,) or (B, k) int64 (entries equal to -1 are
    padding and ignored, as returned by :func:`otprune.select` with ``lengths``). Returns a 0-d
    tensor, or (B,) for a batch.
    """
    from ._validate import check_feature_shape

    x = check_feature_shape(features)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("indices must be an int64 or int32 torch.Tensor")
    if indices.ndim != x.ndim - 1:
        raise ValueError(
            f"indices must have shape (k,) for (N, d) features or (B, k) for (B, N, d) features, "
            f"got {tuple(indices.shape)} for features {tuple(x.shape)}"
        )
    L = kernel_matrix(x.to(torch.float64), gamma, normalize)
    if x.ndim == 2:
        return _logdet_subset(L, indices)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has batch {indices.shape[0]} but features has batch {x.shape[0]}")
    return torch.stack([_logdet_subset(L[b], indices[b]) for b in range(x.shape[0])])


def _logdet_subset(L: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if idx.numel() and int(idx.min()) < -1:
        raise ValueError(f"indices must lie in [0, N) or be -1 (padding), got {int(idx.min())}")
    idx = idx[idx >= 0].to(device=L.device, dtype=torch.int64)
    n = L.shape[-1]
    if idx.numel() and (int(idx.max()) >= n):
        raise ValueError(f"indices must lie in [0, N={n}), got max {int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ValueError("indices must not repeat")
    sub = L[idx][:, idx]
    return torch.linalg.slogdet(sub)[1] if idx.numel() else L.new_zeros(())
