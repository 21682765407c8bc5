"""The whole k-step incremental-Cholesky greedy (docs/design.md, the greedy) in one launch.

One persistent program per image loops over its own k_b - 1 steps. Each step walks the columns in
chunks of BLOCK_N <= MAX_BLOCK_N: it forms the chosen row of L, subtracts C[:t, j]^T C[:t, :] in
tiles of BLOCK_T = 16 rows of C (independent of BLOCK_N), scales by 1 / sqrt(d2[j]), stores the new
Cholesky row, updates the residuals d2 (the marginal gains are log d2) and folds the chunk's argmax
into the step's (ties to the lowest index). C (B, k_max - 1, N) and d2 (B, N) live in a global
scratch (L1/L2-resident at these sizes); one barrier per step. BLOCK_N // 64 warps (4 to 16) keep
every (BLOCK_T, BLOCK_N) tile at <= 32 fp32 per thread: no spills at any N (the compile gate,
bench/triton_target.py, checks N = 576 / 1001 / 2880 for sm_80 and sm_90). Ragged budgets and
lengths per program, fp32 throughout. No host synchronisation with equal budgets (ragged ones are
copied from host memory; otprune.select passes equal budgets on a GPU and cuts rows afterwards).

Rows of L, ``strategy``:
- ``"full"``: L = I + gamma S S^T first, by :func:`.kernel_rows.kernel_matrix` (one split-fp16
  tensor-core GEMM over all SMs); each step then reads row j of L (N x 4 bytes).
- ``"lazy"``: each step forms L[j, :] = gamma S[j, :] S inside the program, streaming S (N^2 x 4
  bytes) per step; no (B, N, N) buffer. The identity term e_j touches only entry j, which is taken
  from then on and never read again, so it is left out (as in the torch greedy).
- ``"auto"`` (:func:`choose_strategy`), by cost: full adds one GEMM of 3 B N^3 FLOPs (three
  split-fp16 products over the upper block triangle) over all SMs (fp16 tensor cores at 989 TFLOP/s:
  0.6 us at N = 576, 72 us at N = 2880 per image) and saves the (k - 1) N^2 x 4 bytes per image that lazy streams through that image's SM
  (72 MB = 0.65 ms at N = 576, k = 56; 9.4 GB = 85 ms at N = 2880, k = 282, at 110 GB/s per SM;
  with B > 132 in ceil(B / 132) waves, and never faster than B (k - 1) N^2 4 bytes at 7 TB/s of L2).
  Full is chosen when its GEMM is the cheaper: at B = 1 for every k >= 2 up to N ~ 2400, at the
  LLaVA sizes (k = 0.098 N) for every B; lazy for k = 1, for a large batch with few picks, and
  whenever L does not fit :data:`FULL_L_BUDGET_BYTES`.

Cost bound per image (d does not enter; H100: 3.35 TB/s HBM, 67 TFLOP/s fp32, 50 MB L2; H200:
4.8 TB/s HBM, the rest alike; assumed as in otprune/cost_model.py: one SM pulls <= 110 GB/s from
L2, a dependent step costs 1 us, a dependent load inside a step 0.5 us). One program per image,
so one SM's bandwidth and the latency chain bound it, not HBM: H100 and H200 bounds are equal.
- N = 576, k = 56, full: C reads N 4 k(k-1)/2 = 3.5 MB, plus L rows and d2 0.4 MB: 3.9 MB from
  L2 (C is 129 KB: L1/L2-resident) = 36 us through one SM; 1.8 MFLOP; 55 dependent steps of one
  chunk, 120 inner tile iterations: 55 x 1 + 120 x 0.5 = 115 us. Bound ~150 us per image
  (concurrent images: 132 SMs).
- N = 2880, k = 282, full: C reads 456 MB + 10 MB = 466 MB through one SM = 4.2 ms; 0.23 GFLOP;
  281 steps x 3 chunks, 7.8k inner tile iterations: 4.2 ms of latency. Bound ~8 ms per image: this
  one-program design cannot meet 1 ms at N = 2880, B = 1 (C, 3.2 MB, does not fit one SM; a
  multi-SM split needs a grid-wide barrier per step, not expressible in Triton's interpreter).
- lazy: 79 MB (N = 576) / 9.8 GB (N = 2880) through one SM: 0.72 ms / 89 ms.

Tested under the Triton interpreter (on CPU tensors); compiled for sm_80 / sm_90 without spills by
the compile gate. Speed and results on a GPU are untested on GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._env import warps
from .kernel_rows import kernel_matrix, row_product

FULL_L_BUDGET_BYTES = 1 << 30
BLOCK_T = 16  # rows of C (lazy: rows of S) per inner-loop iteration, whatever N
# Columns per chunk; BLOCK_N // 64 warps (at least 4, 16 at 1024), so that a (BLOCK_T, BLOCK_N)
# tile is at most 32 fp32 per thread: no spills (bench/results/kernels.md).
MAX_BLOCK_N = 1024
# H100 figures of the full/lazy rule (module docstring): fp16 dense tensor-core FLOP/s, SM count;
# assumed as in otprune/cost_model.py: L2 bytes/s over all SMs, bytes/s one SM pulls from L2.
_FP16_TC_FLOPS, _SMS, _L2_BYTES_S, _SM_BYTES_S = 989e12, 132, 7e12, 110e9
_STRATEGIES = ("auto", "full", "lazy")


@triton.jit
def _argmax_update(d2, c0, best, best_j):
    """Fold the maximum of chunk d2 (columns c0...) into the running (best, best_j); ties to the lowest index."""
    m = tl.max(d2, axis=0)
    at = c0 + tl.argmax(d2, axis=0, tie_break_left=True).to(tl.int64)
    better = m > best
    return tl.where(better, m, best), tl.where(better, at, best_j)


@triton.jit
def _greedy_kernel(
    src_ptr, ks_ptr, valid_ptr, d2_ptr, c_ptr, picks_ptr, N, K_MAX, C_STRIDE, gamma,
    FULL_L: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Greedy for image b. src: L (FULL_L) or S, (B, N, N) fp32 contiguous and symmetric.

    d2: scratch (B, N) fp32 (the residuals); c: scratch (B, max(K_MAX - 1, 1), N) fp32 with batch
    stride C_STRIDE; picks: (B, K_MAX) int64 prefilled with -1. Columns go in chunks of BLOCK_N.
    """
    b = tl.program_id(0).to(tl.int64)
    k = tl.load(ks_ptr + b)
    src = src_ptr + b * N * N
    c_b = c_ptr + b * C_STRIDE
    d2_b = d2_ptr + b * N
    best = tl.full((), float("-inf"), tl.float32)
    j = tl.full((), 0, tl.int64)
    # d2 = diag(L) = 1 + gamma * ||S_i||^2, -inf for padding
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        in_n = cols < N
        if FULL_L:
            d2 = tl.load(src + cols * (N + 1), mask=in_n, other=0.0)
        else:
            sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r0 in range(0, N, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                tile = tl.load(src + r[:, None] * N + cols[None, :], mask=(r < N)[:, None] & in_n[None, :], other=0.0)
                sq += tl.sum(tile * tile, axis=0)
            d2 = 1.0 + gamma * sq
        live = in_n
        if HAS_VALID:
            live &= tl.load(valid_ptr + b * N + cols, mask=in_n, other=0) != 0
        d2 = tl.where(live, d2, float("-inf"))
        tl.store(d2_b + cols, d2, mask=in_n)
        best, j = _argmax_update(d2, c0, best, j)
    tl.store(picks_ptr + b * K_MAX, j)
    for t in range(0, k - 1):
        root = tl.sqrt_rn(best)
        best = tl.full((), float("-inf"), tl.float32)
        j_next = tl.full((), 0, tl.int64)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            in_n = cols < N
            if FULL_L:
                e = tl.load(src + j * N + cols, mask=in_n, other=0.0)
            else:
                e = gamma * row_product(src, j, cols, in_n, N, BLOCK_R, BLOCK_N)
            for u0 in range(0, t, BLOCK_T):
                u = u0 + tl.arange(0, BLOCK_T)
                mu = u < t
                cj = tl.load(c_b + u * N + j, mask=mu, other=0.0)
                prev = tl.load(c_b + u[:, None] * N + cols[None, :], mask=mu[:, None] & in_n[None, :], other=0.0)
                e -= tl.sum(cj[:, None] * prev, axis=0)
            e = tl.div_rn(e, root)
            tl.store(c_b + t * N + cols, e, mask=in_n)
            d2 = tl.load(d2_b + cols, mask=in_n, other=float("-inf"))
            # floored at min(d2, 1), a NaN update too: exact residuals are >= 1 (otprune.greedy)
            left = d2 - e * e
            fl = tl.minimum(d2, 1.0)
            d2 = tl.where(cols == j, float("-inf"), tl.where(left >= fl, left, fl))
            tl.store(d2_b + cols, d2, mask=in_n)
            best, j_next = _argmax_update(d2, c0, best, j_next)
        tl.debug_barrier()  # row t of C and d2 are re-read by other threads at the next step
        j = j_next
        tl.store(picks_ptr + b * K_MAX + t + 1, j)


def choose_strategy(B: int, N: int, k_max: int) -> str:
    """``"full"`` or ``"lazy"`` rows of L for B images of N tokens and k_max picks, by the cost model
    of the module docstring: the modelled faster one, and ``"lazy"`` whenever the whole (B, N, N)
    fp32 L would not fit :data:`FULL_L_BUDGET_BYTES`."""
    if 4 * B * N * N > FULL_L_BUDGET_BYTES:
        return "lazy"
    extra = (k_max - 1) * 4.0 * N * N  # bytes lazy streams per image beyond full's row reads
    lazy_s = max(-(-B // _SMS) * extra / _SM_BYTES_S, B * extra / _L2_BYTES_S)
    full_s = B * 3.0 * float(N) ** 3 / _FP16_TC_FLOPS  # 3 split-fp16 products of 2 N^3, upper triangle
    return "full" if full_s <= lazy_s else "lazy"


def greedy(
    s: torch.Tensor,
    ks: Sequence[int],
    gamma: float,
    valid: Optional[torch.Tensor] = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """Greedy picks in selection order, same contract as :func:`otprune.greedy.greedy_picks`.

    s:     (B, N, N) float32 symmetric similarity; rows and columns of padding tokens zero.
    ks:    per-row budgets, 1 <= k_b <= valid length of row b (checked against N only: checking the
           valid lengths would need a host sync; the caller, otprune.select, guarantees it).
    valid: (B, N) bool mask of real tokens, or None.
    strategy: "auto", "full" or "lazy" (see the module docstring).
    Returns (B, max(ks)) int64: row b holds its k_b picks in greedy order, then -1.
    """
    if not isinstance(s, torch.Tensor) or s.ndim != 3 or s.shape[1] != s.shape[2]:
        raise ValueError(f"s must be a (B, N, N) tensor, got {getattr(s, 'shape', type(s))}")
    if s.dtype != torch.float32:
        raise TypeError(f"s must be float32, got {s.dtype}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    B, N, _ = s.shape
    if len(ks) != B or any(not 1 <= int(k) <= N for k in ks):
        raise ValueError(f"ks must hold {B} budgets in [1, N={N}], got {list(ks)}")
    if valid is not None and (valid.shape != (B, N) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a ({B}, {N}) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    k_max = max(int(k) for k in ks)
    if strategy == "auto":
        strategy = choose_strategy(B, N, k_max)
    dev = s.device
    src = kernel_matrix(s, gamma) if strategy == "full" else s.contiguous()
    if all(int(k) == k_max for k in ks):  # what otprune.select passes on a GPU: nothing copied
        ks_t = torch.full((B,), k_max, dtype=torch.int32, device=dev)
    else:  # ragged budgets come from host memory: a copy that syncs the host on a GPU
        ks_t = torch.tensor([int(k) for k in ks], dtype=torch.int32, device=dev)
    v = valid.to(torch.uint8).contiguous() if valid is not None else ks_t.new_empty(1, dtype=torch.uint8)
    d2 = torch.empty(B, N, dtype=torch.float32, device=dev)
    c = torch.empty(B, max(k_max - 1, 1), N, dtype=torch.float32, device=dev)
    picks = torch.full((B, k_max), -1, dtype=torch.int64, device=dev)
    block_n = min(triton.next_power_of_2(N), MAX_BLOCK_N)
    _greedy_kernel[(B,)](
        src, ks_t, v, d2, c, picks, N, k_max, c.stride(0), float(gamma),
        FULL_L=strategy == "full", HAS_VALID=valid is not None,
        BLOCK_N=block_n, BLOCK_R=BLOCK_T, BLOCK_T=BLOCK_T, **warps(max(4, block_n // 64)),
    )
    return picks
