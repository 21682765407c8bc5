"""Rows of the DPP kernel L = I + gamma * S S^T from the similarity S, batched, float32.

Two ways to get the rows the greedy needs:

- :func:`kernel_matrix`: the whole L (B, N, N) in one tiled GEMM of S S^T (exact fp32 products,
  ``input_precision="ieee"``), with gamma and the identity fused into the epilogue. Only the upper
  block triangle is multiplied; each tile is mirrored (diagonal tiles averaged with their
  transposes), so L is exactly symmetric. Cost 2 N^3 flops per image spread over the
  whole GPU, plus B N^2 floats of memory; the greedy then reads one row per step.
- :func:`kernel_rows`: only the rows L[j, :] = e_j + gamma * S[j, :] S for given j (S is
  symmetric), each a matrix-vector product over S. Computing the k chosen rows costs k N^2 reads of
  S per image and no extra memory. The greedy kernel (:mod:`.greedy`) can also form these rows
  itself inside its persistent loop (``strategy="lazy"``), which is this same product.

Which one the greedy uses is decided by its cost model (:func:`.greedy.choose_strategy`).

Tiles of :func:`kernel_matrix`: 64x64 outputs, K depth 16 at 8 warps (fp32 operands; :func:`._env.gemm_config`;
deeper tiles spilled under ptxas: the compile gate, bench/triton_target.py, holds it spill-free).

Cost bound per image (d does not enter; H100: 3.35 TB/s HBM, 67 TFLOP/s fp32, 50 MB L2; H200:
4.8 TB/s HBM):
- kernel_matrix: 2 N^3 FLOPs over the upper block triangle in fp32 ieee (SIMT FMA), S read and L
  written (2 N^2 x 4 bytes), one launch, no dependent steps. N = 576: 0.21 GFLOP = 3.2 us, 2.7 MB
  (0.8 us H100, 0.6 us H200): ~3 us. N = 2880: 24 GFLOP = 0.36 ms, 66 MB (20 us / 14 us):
  compute-bound, ~0.36 ms (both GPUs).
- kernel_rows for M = k rows: M N^2 x 4 bytes of S (L2-resident up to N ~ 3500) and 2 M N^2
  FLOPs. N = 576, k = 56: 74 MB, 37 MFLOP: 22 us at HBM rate (H100), less from L2. N = 2880,
  k = 282: 9.4 GB, 4.7 GFLOP: 2.8 ms (H100), 1.9 ms (H200).
Untested on GPU (speed and results); tested under the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import gemm_config, warps


@triton.jit
def _kernel_matrix_kernel(
    s_ptr, l_ptr, N, gamma,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tile (pm, pn), pm <= pn, of L = I + gamma * S S^T for image b, stored at (pm, pn) and (pn, pm)."""
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    if pm <= pn:
        s_b = s_ptr + b * N * N
        rm = pm * BLOCK + tl.arange(0, BLOCK)
        rn = pn * BLOCK + tl.arange(0, BLOCK)
        mm = rm < N
        mn = rn < N
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < N
            a = tl.load(s_b + rm[:, None] * N + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            bt = tl.load(s_b + rn[None, :] * N + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
            acc = tl.dot(a, bt, acc, input_precision="ieee")
        acc = acc * gamma + tl.where(rm[:, None] == rn[None, :], 1.0, 0.0)
        if pm == pn:  # products and their transposes round differently: make L exactly symmetric
            acc = 0.5 * (acc + tl.trans(acc))
        l_b = l_ptr + b * N * N
        out_mask = mm[:, None] & mn[None, :]
        tl.store(l_b + rm[:, None] * N + rn[None, :], acc, mask=out_mask)
        if pm < pn:
            tl.store(l_b + rn[:, None] * N + rm[None, :], tl.trans(acc), mask=tl.trans(out_mask))


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
        s_b = s_ptr + b * N * N
        for r0 in range(0, N, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mr = r < N
            sj = tl.load(s_b + j * N + r, mask=mr, other=0.0)
            tile = tl.load(s_b + r[:, None] * N + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)
            acc += tl.sum(sj[:, None] * tile, axis=0)
        acc = acc * gamma + tl.where(cols == j, 1.0, 0.0)
    tl.store(out_ptr + (b * M + m) * N + cols, acc, mask=mc)


def _check_s(s: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor) or s.ndim != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(f"s must be a (B, N, N) tensor, got {getattr(s, 'shape', type(s))}")
    if s.dtype != torch.float32:
        raise TypeError(f"s must be float32, got {s.dtype}")


def kernel_matrix(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """L = I + gamma * S S^T for (B, N, N) float32 ``s``; (B, N, N) float32."""
    _check_s(s)
    s = s.contiguous()
    B, N, _ = s.shape
    out = torch.empty_like(s)
    block = 64
    t = triton.cdiv(N, block)
    _kernel_matrix_kernel[(B, t, t)](s, out, N, float(gamma), BLOCK=block, **gemm_config(fp16=False))
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
