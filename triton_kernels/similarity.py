"""Fused normalisation + similarity GEMM: S = Xn Xn^T, batched, float32 out.

x: (B, N, d) float16 / bfloat16 / float32, any strides; valid: optional (B, N) bool (padding
tokens are dropped from the norms and get zero rows and columns in S).

Two launches: a sum-of-squares reduction (per feature column over the valid tokens, or per token),
then the GEMM, which applies the normalisation while loading its operands (feature-wise) or in its
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

Tiles: 64x64 outputs, K depth 32 at 4 warps for fp16 operands, 16 at 8 warps for fp32 operands
(:func:`._env.gemm_config`: those spill-free), fixed, not autotuned (the
interpreter cannot autotune more than one config). The compile gate (bench/triton_target.py)
compiles every specialisation for sm_80 / sm_90: no stack, no spills.

Cost bound per image at d = 4096 (H100: 3.35 TB/s HBM, 989 TFLOP/s fp16 dense, 67 TFLOP/s fp32;
H200: 4.8 TB/s HBM): bytes = X read twice (sums of squares, GEMM) + S written, 2 launches, no
dependent steps; FLOPs = 2 N^2 d over the upper block triangle (T (T + 1) / 2 of T^2 tiles), twice
for the fp16 hi/lo split (tensor cores), once in fp32 ieee (SIMT FMA) for fp32 / bf16 input.
- N = 576, fp16 feature-wise: 10.8 MB (3.2 us H100, 2.2 us H200), 3.0 GFLOP fp16 (3.1 us): ~3 us.
  fp32 input: 20 MB, 1.5 GFLOP fp32: 22 us.
- N = 2880, fp16 feature-wise: 80 MB (24 us H100, 17 us H200), 69 GFLOP fp16: 70 us (compute-bound).
  fp32 input: 128 MB, 35 GFLOP fp32: 0.52 ms.
Speed, and that ``input_precision="ieee"`` is honoured (the interpreter ignores it), are untested on
GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._env import gemm_config, warps

# Power-of-two exponents of the fp16 hi/lo scheme: |B| <= 2^(SHIFT_B + 1), |A| <= 2^(SHIFT_A - SHIFT_B).
SHIFT_B = 13
SHIFT_A = 27
MODE_FP32, MODE_HILO, MODE_TOKEN = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sumsq_kernel(
    x_ptr, valid_ptr, out_ptr, N, D,
    sxb, sxn, sxd, svb, svn,
    OVER_TOKENS: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sums of squares of valid tokens: per column (OVER_TOKENS, out (B, D)) or per token (out (B, N))."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    x_b = x_ptr + b * sxb
    if OVER_TOKENS:
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
        tl.store(out_ptr + b * D + cols, tl.sum(acc, axis=0), mask=cols < D)
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
        tl.store(out_ptr + b * N + rows, tl.sum(acc, axis=1), mask=rows < N)


@triton.jit
def _similarity_kernel(
    x_ptr, valid_ptr, ca_ptr, cb_ptr, r_ptr, s_ptr, N, D, out_scale,
    sxb, sxn, sxd, svb, svn,
    MODE: tl.constexpr, X_FP16: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK x BLOCK) tile (pm, pn), pm <= pn, of S for image b, stored at (pm, pn) and (pn, pm).

    MODE_FP32: S = (X diag(ca)) (X diag(ca))^T with exact fp32 products.
    MODE_HILO: S = out_scale * (hi + lo)(X diag(cb))^T, hi + lo = X diag(ca) split in fp16.
    MODE_TOKEN: S_ij = r_i r_j (X X^T)_ij.
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
            r_m = tl.load(r_ptr + b * N + rm, mask=mm, other=0.0)
            r_n = tl.load(r_ptr + b * N + rn, mask=mn, other=0.0)
            acc = acc * r_m[:, None] * r_n[None, :]
        else:
            acc = acc * out_scale
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


def sum_of_squares(x: torch.Tensor, over_tokens: bool, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sums of squares of the valid tokens of (B, N, d) ``x`` in fp32: (B, d) per column when
    ``over_tokens``, else (B, N) per token (zero for padding tokens)."""
    B, N, D = x.shape
    out = torch.empty(B, D if over_tokens else N, dtype=torch.float32, device=x.device)
    v = valid.to(torch.uint8) if valid is not None else x.new_empty(1, 1, dtype=torch.uint8)
    bn, bd = (32, 32) if over_tokens else (16, 64)
    grid = (B, triton.cdiv(D, bd) if over_tokens else triton.cdiv(N, bn))
    _sumsq_kernel[grid](
        x, v, out, N, D, x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1),
        OVER_TOKENS=over_tokens, HAS_VALID=valid is not None, BLOCK_N=bn, BLOCK_D=bd, **warps(4),
    )
    return out


def _inv_norm(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(sq), zero where sq <= eps (a zero column or token stays zero, never NaN)."""
    return torch.where(sq > eps, sq.clamp_min(eps).rsqrt(), 0.0)


def similarity(
    x: torch.Tensor, normalize: str = "feature", valid: Optional[torch.Tensor] = None, eps: float = 1e-30
) -> torch.Tensor:
    """S = Xn Xn^T for (B, N, d) float16/bfloat16/float32 ``x``; (B, N, N) float32.

    normalize: "feature" (unit-norm columns over the valid tokens) or "token" (cosine).
    valid: optional (B, N) bool; padding rows and columns of S are zero.
    eps: a column / token whose sum of squares is <= eps is treated as zero.
    """
    _check(x, normalize, valid)
    B, N, D = x.shape
    feature = normalize == "feature"
    sq = sum_of_squares(x, feature, valid)
    r = _inv_norm(sq, eps)
    ca = cb = r
    out_scale = 1.0
    if not feature:
        mode = MODE_TOKEN
    elif x.dtype == torch.float16:
        mode = MODE_HILO
        cb = torch.ldexp(torch.ones_like(r), torch.frexp(r).exponent + SHIFT_B)  # in (r, 2r] * 2^SHIFT_B
        ca = r * r * 2.0**SHIFT_A / cb
        out_scale = 2.0**-SHIFT_A
    else:
        mode = MODE_FP32
    s = torch.empty(B, N, N, dtype=torch.float32, device=x.device)
    v = valid.to(torch.uint8) if valid is not None else x.new_empty(1, 1, dtype=torch.uint8)
    block = 64
    gemm = gemm_config(fp16=mode == MODE_HILO or (mode == MODE_TOKEN and x.dtype == torch.float16))
    t = triton.cdiv(N, block)
    _similarity_kernel[(B, t, t)](
        x, v, ca, cb, r, s, N, D, out_scale,
        x.stride(0), x.stride(1), x.stride(2), v.stride(0), v.stride(1),
        MODE=mode, X_FP16=x.dtype == torch.float16, HAS_VALID=valid is not None,
        BLOCK=block, **gemm,
    )
    return s
