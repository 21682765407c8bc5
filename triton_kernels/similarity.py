"""Fused normalisation + similarity GEMM: S = Xn Xn^T, batched, float32 out.

x: (B, N, d) float16 / bfloat16 / float32, any strides; valid: optional (B, N) bool (padding
tokens are dropped from the norms and get zero rows and columns in S).

Two launches and no torch arithmetic between them: the scales kernel (sums of squares per feature
column over the valid tokens, or per token, and from them the GEMM's operand scales, the fp16
split's powers of two included), then the GEMM, which applies the normalisation while loading its operands (feature-wise) or in its
epilogue (token-wise). Only the upper block triangle of S is multiplied; each tile is mirrored and
diagonal tiles are averaged with their transposes, so S is exactly symmetric (the greedy relies
on it).
Accumulation is fp32 throughout; the products are made exact enough that the greedy's picks do
not move (plain fp16 / TF32 products of the scaled features flip picks):

- float32 / bfloat16 input: operands upcast to fp32, ``tl.dot(..., input_precision="ieee")``.
- float16 input, feature-wise: X diag(w) X^T with w = 1/c^2 is computed as A B^T where
  B = X diag(b), b_c a power of two (so B is exact in fp16), and A = X diag(w / b) * 2^SHIFT_A split
  into hi + lo fp16 terms; two fp16 dots with fp32 accumulation (tensor cores on a GPU) give about
  22 significant bits per element of A, close to fp32. b_c ~ 1/c_c keeps both operands near unit
  scale whatever the column norms, so neither term underflows fp16.
- float16 input, token-wise: raw fp16 products are exact in fp32, so one fp16 dot of X X^T and the
  cosine scaling r_i r_j in the epilogue.

Tiles (:func:`._env.gemm_block`, :func:`._env.gemm_config`: those spill-free): 64x64 outputs, K
depth 32 at 4 warps for fp16 operands, 16 at 8 warps for fp32 operands; 128x128 at K 32 and 8
warps for fp16 operands while the batch's 128-tiles still give every SM one (half the L2 operand
traffic per FLOP). Fixed, not autotuned (the interpreter cannot autotune more than one config). The compile gate (bench/triton_target.py)
compiles every specialisation for sm_80 / sm_90: no stack, no spills.

Cost bound at d = 4096 (H100: 3.35 TB/s HBM, 989 TFLOP/s fp16 dense, 67 TFLOP/s fp32; assumed as
in otprune/cost_model.py: 7 TB/s of L2 over all SMs, 110 GB/s per SM; H200: 4.8 TB/s HBM):
bytes = X read twice from HBM (scales, GEMM) + S written; each GEMM tile reads its 2 x tile rows of
X from L2; 2 launches, no dependent steps; FLOPs = 2 N^2 d over the upper block triangle
(T (T + 1) / 2 of T^2 tiles), twice for the fp16 hi/lo split (tensor cores), once in fp32 ieee
(SIMT FMA) for fp32 / bf16 input.
- N = 576, B = 1, fp16 feature-wise, 45 64-tiles on 45 SMs: 10.8 MB HBM (3.2 us), 47 MB of L2 tile
  reads (9.5 us at 45 x 110 GB/s), 3.0 GFLOP fp16 (8.9 us on 45 SMs): ~10 us. fp32 input: 20 MB,
  94 MB of L2 reads, 1.5 GFLOP fp32 (67 us on 45 SMs).
- N = 2880, B = 1, fp16 feature-wise, 276 128-tiles: 80 MB HBM (24 us H100, 17 us H200), 0.58 GB of
  L2 tile reads (83 us), 71 GFLOP fp16 (72 us): ~83 us, L2-bound. fp32 input: 128 MB, 35 GFLOP
  fp32: 0.52 ms.
Speed, and that ``input_precision="ieee"`` is honoured (the interpreter ignores it), are untested on
GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._env import gemm_block, gemm_config, warps

# Power-of-two exponents of the fp16 hi/lo scheme: |B| <= 2^(SHIFT_B + 1), |A| <= 2^(SHIFT_A - SHIFT_B).
SHIFT_B = tl.constexpr(13)
SHIFT_A = tl.constexpr(27)
MODE_FP32, MODE_HILO, MODE_TOKEN = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _scales_kernel(
    x_ptr, valid_ptr, ca_ptr, cb_ptr, N, D, eps,
    sxb, sxn, sxd, svb, svn,
    MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The GEMM's operand scales from the sums of squares of the valid tokens, r = 1 / sqrt(sum)
    (0 where sum <= eps): per column (MODE_FP32: ca = r; MODE_HILO: cb = the power of two
    2^(frexp exponent of r + SHIFT_B), ca = r^2 2^SHIFT_A / cb), both (B, D); or per token
    (MODE_TOKEN: ca = r, (B, N))."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    x_b = x_ptr + b * sxb
    if MODE != 2:
        cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < N
            if HAS_VALID:
                rmask &= tl.load(valid_ptr + b * svb + rows * svn, mask=rows < N, other=0) != 0
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(x_b + rows[:, None] * sxn + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            acc += v * v
        sq = tl.sum(acc, axis=0)
        r = tl.where(sq > eps, 1.0 / tl.sqrt_rn(tl.maximum(sq, eps)), 0.0)
        if MODE == 1:
            biased = (r.to(tl.int32, bitcast=True) >> 23) & 0xFF
            # frexp's exponent is biased - 126 (0 for r = 0): cb = 2^(exponent + SHIFT_B), in (r, 2r] * 2^SHIFT_B
            cb = tl.where(r > 0, ((biased + SHIFT_B + 1) << 23).to(tl.float32, bitcast=True), 2.0**SHIFT_B)
            tl.store(cb_ptr + b * D + cols, cb, mask=cols < D)
            r = r * r * 2.0**SHIFT_A / cb
        tl.store(ca_ptr + b * D + cols, r, mask=cols < D)
    else:
        rows = p * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        if HAS_VALID:
            rmask &= tl.load(valid_ptr + b * svb + rows * svn, mask=rows < N, other=0) != 0
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(x_b + rows[:, None] * sxn + cols[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            acc += v * v
        sq = tl.sum(acc, axis=1)
        r = tl.where(sq > eps, 1.0 / tl.sqrt_rn(tl.maximum(sq, eps)), 0.0)
        tl.store(ca_ptr + b * N + rows, r, mask=rows < N)


@triton.jit
def _similarity_kernel(
    x_ptr, valid_ptr, ca_ptr, cb_ptr, s_ptr, N, D, hilo_scale,
    sxb, sxn, sxd, svb, svn,
    MODE: tl.constexpr, X_FP16: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK x BLOCK) tile (pm, pn), pm <= pn, of S for image b, stored at (pm, pn) and (pn, pm).

    MODE_FP32: S = (X diag(ca)) (X diag(ca))^T with exact fp32 products.
    MODE_HILO: S = hilo_scale * (hi + lo)(X diag(cb))^T, hi + lo = X diag(ca) split in fp16.
    MODE_TOKEN: S_ij = r_i r_j (X X^T)_ij, r = ca.
    """
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    if pm <= pn:
        x_b = x_ptr + b * sxb
        rm = pm * BLOCK + tl.arange(0, BLOCK)
        rn = pn * BLOCK + tl.arange(0, BLOCK)
        mm = rm < N
        mn = rn < N
        if HAS_VALID:
            mm &= tl.load(valid_ptr + b * svb + rm * svn, mask=rm < N, other=0) != 0
            mn &= tl.load(valid_ptr + b * svb + rn * svn, mask=rn < N, other=0) != 0
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < D
            a = tl.load(x_b + rm[:, None] * sxn + rk[None, :] * sxd, mask=mm[:, None] & mk[None, :], other=0.0)
            bt = tl.load(x_b + rk[:, None] * sxd + rn[None, :] * sxn, mask=mk[:, None] & mn[None, :], other=0.0)
            if MODE == 0:
                ca = tl.load(ca_ptr + b * D + rk, mask=mk, other=0.0)
                af = a.to(tl.float32) * ca[None, :]
                bf = bt.to(tl.float32) * ca[:, None]
                acc = tl.dot(af, bf, acc, input_precision="ieee")
            elif MODE == 1:
                ca = tl.load(ca_ptr + b * D + rk, mask=mk, other=0.0)
                cb = tl.load(cb_ptr + b * D + rk, mask=mk, other=0.0)
                af = a.to(tl.float32) * ca[None, :]
                hi = af.to(tl.float16)
                lo = (af - hi.to(tl.float32)).to(tl.float16)
                bq = (bt.to(tl.float32) * cb[:, None]).to(tl.float16)  # exact: power-of-two scale
                acc = tl.dot(hi, bq, acc)
                acc = tl.dot(lo, bq, acc)
            else:
                if X_FP16:
                    acc = tl.dot(a, bt, acc)  # fp16 x fp16 products are exact in fp32
                else:
                    acc = tl.dot(a.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
        if MODE == 2:
            r_m = tl.load(ca_ptr + b * N + rm, mask=mm, other=0.0)
            r_n = tl.load(ca_ptr + b * N + rn, mask=mn, other=0.0)
            acc = acc * r_m[:, None] * r_n[None, :]
        elif MODE == 1:
            acc = acc * hilo_scale
        if pm == pn:
            # Rounding (and the hi/lo split) makes a diagonal tile's products differ in the last bits
            # from their transposes: average them so that S is exactly symmetric.
            acc = 0.5 * (acc + tl.trans(acc))
        s_b = s_ptr + b * N * N
        out_mask = (rm < N)[:, None] & (rn < N)[None, :]
        tl.store(s_b + rm[:, None] * N + rn[None, :], acc, mask=out_mask)
        if pm < pn:
            tl.store(s_b + rn[:, None] * N + rm[None, :], tl.trans(acc), mask=tl.trans(out_mask))


def _check(x: torch.Tensor, normalize: str, valid: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"x must be a (B, N, d) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if normalize not in ("feature", "token"):
        raise ValueError(f"normalize must be 'feature' or 'token', got {normalize!r}")
    if valid is not None and (valid.shape != x.shape[:2] or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a (B, N) bool tensor, got {valid.dtype} {tuple(valid.shape)}")


def _scales(x: torch.Tensor, mode: int, v: torch.Tensor, has_valid: bool, eps: float):
    """(ca, cb) for the similarity GEMM in ``mode`` (see :func:`_scales_kernel`), fp32: (B, d) each
    for the feature-wise modes (cb is ca for MODE_FP32), ca (B, N) and cb = ca for MODE_TOKEN. One
    launch; a zero column or token (sum of squares <= eps) gets zero scales, never NaN.
    v: the valid mask as uint8 (B, N), read when ``has_valid``."""
    B, N, D = x.shape
    token = mode == MODE_TOKEN
    ca = torch.empty(B, N if token else D, dtype=torch.float32, device=x.device)
    cb = torch.empty_like(ca) if mode == MODE_HILO else ca
    bn, bd = (16, 64) if token else (32, 32)
    grid = (B, triton.cdiv(N, bn) if token else triton.cdiv(D, bd))
    _scales_kernel[grid](
        x, v, ca, cb, N, D, float(eps), x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1),
        MODE=mode, HAS_VALID=has_valid, BLOCK_N=bn, BLOCK_D=bd, **warps(4),
    )
    return ca, cb


def similarity(
    x: torch.Tensor, normalize: str = "feature", valid: Optional[torch.Tensor] = None,
    eps: float = torch.finfo(torch.float32).tiny,
) -> torch.Tensor:
    """S = Xn Xn^T for (B, N, d) float16/bfloat16/float32 ``x``; (B, N, N) float32.

    normalize: "feature" (unit-norm columns over the valid tokens) or "token" (cosine).
    valid: optional (B, N) bool; padding rows and columns of S are zero.
    eps: a column / token whose sum of squares is <= eps is treated as zero (default: float32's
    smallest normal number, as the torch path).
    """
    _check(x, normalize, valid)
    B, N, D = x.shape
    if normalize == "token":
        mode = MODE_TOKEN
    else:
        mode = MODE_HILO if x.dtype == torch.float16 else MODE_FP32
    v = valid.to(torch.uint8) if valid is not None else x.new_empty(1, 1, dtype=torch.uint8)
    ca, cb = _scales(x, mode, v, valid is not None, eps)
    s = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    fp16 = mode == MODE_HILO or (mode == MODE_TOKEN and x.dtype == torch.float16)
    block = gemm_block(B, N, fp16, x.device)
    gemm = gemm_config(fp16, block)
    t = triton.cdiv(N, block)
    _similarity_kernel[(B, t, t)](
        x, v, ca, cb, s, N, D, 2.0**-SHIFT_A.value,
        x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1),
        MODE=mode, X_FP16=x.dtype == torch.float16, HAS_VALID=valid is not None,
        BLOCK=block, **gemm,
    )
    return s
