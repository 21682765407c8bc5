"""Rows of the DPP kernel L = I + gamma * S S^T from the similarity S, batched, float32.

Two ways to get the rows the greedy needs:

- :func:`kernel_matrix`: the whole L (B, N, N) (or G = L - I, ``identity=False``, for the CUDA
  greedy) in one tiled GEMM of S S^T, with gamma and the identity fused into the epilogue. Only the
  upper block triangle is multiplied; each tile is mirrored (diagonal tiles averaged with their
  transposes), so L is exactly symmetric. The greedy then reads one row per step.
  Products (``precision``): "split-fp16" (default) scales each image's S by a power of two that
  brings max diag(S) (= max |S_ij| for a Gram matrix) to [2^11, 2^12), splits every element into
  fp16 hi + lo halves (about 22 significant bits) and sums three fp16 tensor-core products,
  hi hi^T + hi lo^T + lo hi^T, in fp32; the dropped lo lo^T is 2^-22 of the product. Its error is
  about twice fp32's (tests/test_triton_kernel_matrix.py), far under the greedy's near-tie threshold, and
  the picks stay those of the float64 reference. "ieee": exact fp32 products (SIMT FMA).
- :func:`kernel_rows`: only the rows L[j, :] = e_j + gamma * S[j, :] S for given j (S is
  symmetric), each a matrix-vector product over S. Computing the k chosen rows costs k N^2 reads of
  S per image and no extra memory. The greedy kernel (:mod:`.greedy`) can also form these rows
  itself inside its persistent loop (``strategy="lazy"``), which is this same product.

Which one the greedy uses is decided by its cost model (:func:`.greedy.choose_strategy`).

Tiles of :func:`kernel_matrix` (:func:`._env.gemm_block`, :func:`._env.gemm_config`): 64x64
outputs, split-fp16 K depth 32 at 4 warps, ieee 16 at 8 warps (deeper fp32 tiles spilled under
ptxas); split-fp16 128x128 at K 32 and 8 warps while the batch's 128-tiles still give every SM one.
The compile gate (bench/triton_target.py) holds every specialisation spill-free.

Cost bound per image (d does not enter; H100: 3.35 TB/s HBM, 989 TFLOP/s fp16 dense tensor cores,
67 TFLOP/s fp32, 50 MB L2; H200: 4.8 TB/s HBM, the rest alike):
- kernel_matrix, split-fp16: 3 x 2 N^3 FLOPs over the upper block triangle (T (T + 1) / 2 of T^2
  64-tiles), S read and L written (2 N^2 x 4 bytes), one launch, no dependent steps. N = 576:
  0.64 GFLOP = 0.6 us over all SMs (1.9 us at B = 1, where its 45 tiles occupy 45 SMs), 2.7 MB
  (0.8 us H100, 0.6 us H200): ~2 us at B = 1. N = 2880: 73 GFLOP = 74 us, 66 MB (20 us / 14 us):
  compute-bound, ~74 us (both GPUs). ieee: a third of the FLOPs at the fp32 rate: 3.2 us / 0.36 ms.
  Each split-fp16 tile also reads diag(S) for its image's scale (N strided loads, one 32-byte
  sector each: ~3% of its 2 x tile x N x 4 operand bytes at N = 2880), rather than a separate
  launch computing the B scales first.
- kernel_rows for M = k rows: M N^2 x 4 bytes of S (L2-resident up to N ~ 3500) and 2 M N^2
  FLOPs. N = 576, k = 56: 74 MB, 37 MFLOP: 22 us at HBM rate (H100), less from L2. N = 2880,
  k = 282: 9.4 GB, 4.7 GFLOP: 2.8 ms (H100), 1.9 ms (H200).
Untested on GPU (speed and results); tested under the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import gemm_block, gemm_config, warps

PRECISIONS = ("split-fp16", "ieee")
# Exponent of the power of two that the split-fp16 product scales max diag(S) to: 2^4 under fp16's
# largest value (65504) for the hi halves, while the lo halves (~2^-11 of their hi) stay normal fp16
# down to entries 2^-15 of the largest.
SPLIT_TOP = tl.constexpr(11)


@triton.jit
def _split_scale(s_b, N, BLOCK: tl.constexpr):
    """(scale, 1 / scale^2), powers of two: scale brings max diag(S) of image b into
    [2^SPLIT_TOP, 2^(SPLIT_TOP + 1)), its exponent clamped to [-60, 60] (zero S: 2^60)."""
    m = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.abs(tl.load(s_b + i * (N + 1), mask=i < N, other=0.0)))
    biased = (tl.max(m, axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.minimum(tl.maximum(127 + SPLIT_TOP - biased, -60), 60)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return scale, inv * inv


@triton.jit
def _split_fp16(v):
    """fp32 v as hi + lo, both fp16 (round to nearest): about 22 significant bits of v."""
    hi = v.to(tl.float16)
    return hi, (v - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _kernel_matrix_kernel(
    s_ptr, l_ptr, N, gamma,
    SPLIT: tl.constexpr, IDENTITY: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile (pm, pn), pm <= pn, of gamma * S S^T (+ I if IDENTITY) for image b, stored at (pm, pn)
    and (pn, pm). SPLIT: three fp16 tensor-core products of the scaled hi/lo halves, else fp32 ieee."""
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    if pm <= pn:
        s_b = s_ptr + b * N * N
        rm = pm * BLOCK + tl.arange(0, BLOCK)
        rn = pn * BLOCK + tl.arange(0, BLOCK)
        mm = rm < N
        mn = rn < N
        if SPLIT:
            scale, unscale = _split_scale(s_b, N, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < N
            a = tl.load(s_b + rm[:, None] * N + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            bt = tl.load(s_b + rn[None, :] * N + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
            if SPLIT:
                a_hi, a_lo = _split_fp16(a * scale)
                b_hi, b_lo = _split_fp16(bt * scale)
                acc = tl.dot(a_hi, b_hi, acc)
                acc = tl.dot(a_hi, b_lo, acc)
                acc = tl.dot(a_lo, b_hi, acc)
            else:
                acc = tl.dot(a, bt, acc, input_precision="ieee")
        if SPLIT:
            acc = acc * unscale
        acc = acc * gamma
        if IDENTITY:
            acc += tl.where(rm[:, None] == rn[None, :], 1.0, 0.0)
        if pm == pn:  # products and their transposes round differently: make the result exactly symmetric
            acc = 0.5 * (acc + tl.trans(acc))
        l_b = l_ptr + b * N * N
        out_mask = mm[:, None] & mn[None, :]
        tl.store(l_b + rm[:, None] * N + rn[None, :], acc, mask=out_mask)
        if pm < pn:
            tl.store(l_b + rn[:, None] * N + rm[None, :], tl.trans(acc), mask=tl.trans(out_mask))


@triton.jit
def row_product(s_b, j, cols, in_n, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """(S[j, :] S)[cols] for one image's symmetric (N, N) fp32 S at ``s_b``: (BLOCK_N,) fp32, the
    rows of S taken BLOCK_R at a time (the lazy kernel row without gamma; also the greedy's)."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mr = r < N
        sj = tl.load(s_b + j * N + r, mask=mr, other=0.0)
        tile = tl.load(s_b + r[:, None] * N + cols[None, :], mask=mr[:, None] & in_n[None, :], other=0.0)
        acc += tl.sum(sj[:, None] * tile, axis=0)
    return acc


@triton.jit
def _kernel_rows_kernel(
    s_ptr, rows_ptr, out_ptr, N, M, gamma,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Columns block pc of L[j, :] for j = rows[b, m]; a row with j < 0 is left zero."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    pc = tl.program_id(2)
    j = tl.load(rows_ptr + b * M + m)
    cols = pc * BLOCK_N + tl.arange(0, BLOCK_N)
    mc = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if j >= 0:
        acc = row_product(s_ptr + b * N * N, j, cols, mc, N, BLOCK_R, BLOCK_N) * gamma + tl.where(cols == j, 1.0, 0.0)
    tl.store(out_ptr + (b * M + m) * N + cols, acc, mask=mc)


def _check_s(s: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor) or s.ndim != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(f"s must be a (B, N, N) tensor, got {getattr(s, 'shape', type(s))}")
    if s.dtype != torch.float32:
        raise TypeError(f"s must be float32, got {s.dtype}")


def kernel_matrix(s: torch.Tensor, gamma: float, identity: bool = True, precision: str = "split-fp16") -> torch.Tensor:
    """L = I + gamma * S S^T (``identity=False``: G = gamma * S S^T) for (B, N, N) float32 ``s``.

    s: a Gram matrix (the similarity: symmetric, |S_ij| <= max_i S_ii). precision: "split-fp16"
    (three fp16 tensor-core products of S's hi/lo halves, fp32 accumulation, about fp32-accurate)
    or "ieee" (fp32 SIMT products). Returns (B, N, N) float32, exactly symmetric.
    """
    _check_s(s)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    s = s.contiguous()
    B, N, _ = s.shape
    out = torch.empty_like(s)
    split = precision == "split-fp16"
    block = gemm_block(B, N, split, s.device)
    t = triton.cdiv(N, block)
    _kernel_matrix_kernel[(B, t, t)](s, out, N, float(gamma), SPLIT=split, IDENTITY=bool(identity), BLOCK=block,
                                     **gemm_config(split, block))
    return out


def kernel_rows(s: torch.Tensor, rows: torch.Tensor, gamma: float) -> torch.Tensor:
    """Rows L[j, :] = e_j + gamma * S[j, :] S of the kernel for j = rows[b, m].

    s: (B, N, N) float32, symmetric. rows: (B, M) integer indices in [0, N), or -1 (zero row out).
    Returns (B, M, N) float32.
    """
    _check_s(s)
    B, N, _ = s.shape
    if rows.ndim != 2 or rows.shape[0] != B or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be a ({B}, M) integer tensor, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (int(rows.max()) >= N or int(rows.min()) < -1):
        raise ValueError(f"rows must lie in [0, N={N}) or be -1")
    s = s.contiguous()
    rows = rows.to(torch.int64).contiguous()
    M = rows.shape[1]
    out = torch.empty(B, M, N, dtype=torch.float32, device=s.device)
    if M == 0:
        return out
    block_n = min(triton.next_power_of_2(N), 256)
    block_r = 32
    _kernel_rows_kernel[(B, M, triton.cdiv(N, block_n))](
        s, rows, out, N, M, float(gamma), BLOCK_R=block_r, BLOCK_N=block_n, **warps(4)
    )
    return out
