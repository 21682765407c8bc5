"""The whole k-step incremental-Cholesky greedy (DESIGN.md section 2, step 5) in one launch.

One persistent program per image loops over its own k_b - 1 steps: the residuals d2 (the marginal
gains are log d2) live in registers as one (BLOCK_N,) vector, the Cholesky rows C in a global
scratch (B, k_max - 1, N) fp32; each step forms the chosen row of L, subtracts C[:t, j]^T C[:t, :],
scales by 1 / sqrt(d2[j]), updates d2 and takes the argmax (ties to the lowest index). No host
synchronisation, ragged budgets and lengths per program, fp32 throughout.

Rows of L (issue 3.1b), ``strategy``:
- ``"full"``: L = I + gamma S S^T is computed first by :func:`.kernel_rows.kernel_matrix` (one GEMM
  over the whole GPU); each step then loads row j (N floats).
- ``"lazy"``: each step forms L[j, :] = gamma S[j, :] S inside the program, streaming S (N^2
  floats) per step; no (B, N, N) buffer for L. The identity term e_j touches only entry j, which is
  taken from then on and never read again, so it is left out (as in the torch greedy).
- ``"auto"``: ``"full"`` while B N^2 fp32 floats fit :data:`FULL_L_BUDGET_BYTES`, else ``"lazy"``.
  Reason (estimated, not measured): one program per image streaming N^2 floats per step keeps a
  single SM busy per image, while the GEMM uses every SM; the lazy form only pays off when the
  batch alone fills the GPU, and it is kept for the case where L would not fit in memory.
  The GPU timing comparison at N = 576 and N = 2880 could not be measured (no GPU here).

Tested under the Triton interpreter only; on a GPU (register pressure of the (BLOCK_N,) state at
N in the thousands, speed) it is untested.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .kernel_rows import kernel_matrix

FULL_L_BUDGET_BYTES = 1 << 30
_STRATEGIES = ("auto", "full", "lazy")


@triton.jit
def _greedy_kernel(
    src_ptr, ks_ptr, valid_ptr, c_ptr, picks_ptr, N, K_MAX, C_STRIDE, gamma,
    FULL_L: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Greedy for image b. src: L (FULL_L) or S, (B, N, N) fp32 contiguous and symmetric.

    c: scratch (B, max(K_MAX - 1, 1), N) fp32 with batch stride C_STRIDE;
    picks: (B, K_MAX) int64 prefilled with -1.
    """
    b = tl.program_id(0).to(tl.int64)
    k = tl.load(ks_ptr + b)
    cols = tl.arange(0, BLOCK_N)
    in_n = cols < N
    live = in_n
    if HAS_VALID:
        live &= tl.load(valid_ptr + b * N + cols, mask=in_n, other=0) != 0
    src = src_ptr + b * N * N
    c_b = c_ptr + b * C_STRIDE
    # d2 = diag(L) = 1 + gamma * ||S_i||^2
    if FULL_L:
        d2 = tl.load(src + cols * (N + 1), mask=in_n, other=0.0)
    else:
        sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, N, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            tile = tl.load(src + r[:, None] * N + cols[None, :], mask=(r < N)[:, None] & in_n[None, :], other=0.0)
            sq += tl.sum(tile * tile, axis=0)
        d2 = 1.0 + gamma * sq
    d2 = tl.where(live, d2, float("-inf"))
    pivot = tl.max(d2, axis=0)
    j = tl.argmax(d2, axis=0, tie_break_left=True).to(tl.int64)
    tl.store(picks_ptr + b * K_MAX, j)
    for t in range(0, k - 1):
        if FULL_L:
            e = tl.load(src + j * N + cols, mask=in_n, other=0.0)
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r0 in range(0, N, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                mr = r < N
                sj = tl.load(src + j * N + r, mask=mr, other=0.0)
                tile = tl.load(src + r[:, None] * N + cols[None, :], mask=mr[:, None] & in_n[None, :], other=0.0)
                acc += tl.sum(sj[:, None] * tile, axis=0)
            e = gamma * acc
        for u0 in range(0, t, BLOCK_T):
            u = u0 + tl.arange(0, BLOCK_T)
            mu = u < t
            cj = tl.load(c_b + u * N + j, mask=mu, other=0.0)
            prev = tl.load(c_b + u[:, None] * N + cols[None, :], mask=mu[:, None] & in_n[None, :], other=0.0)
            e -= tl.sum(cj[:, None] * prev, axis=0)
        e = tl.div_rn(e, tl.sqrt_rn(pivot))
        tl.store(c_b + t * N + cols, e, mask=in_n)
        tl.debug_barrier()  # row t is re-read by other threads at the next steps
        d2 = tl.where(cols == j, float("-inf"), d2 - e * e)
        pivot = tl.max(d2, axis=0)
        j = tl.argmax(d2, axis=0, tie_break_left=True).to(tl.int64)
        tl.store(picks_ptr + b * K_MAX + t + 1, j)


def choose_strategy(B: int, N: int) -> str:
    """``"full"`` when the whole (B, N, N) fp32 L fits :data:`FULL_L_BUDGET_BYTES`, else ``"lazy"``."""
    return "full" if 4 * B * N * N <= FULL_L_BUDGET_BYTES else "lazy"


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
    if strategy == "auto":
        strategy = choose_strategy(B, N)
    k_max = max(int(k) for k in ks)
    dev = s.device
    src = kernel_matrix(s, gamma) if strategy == "full" else s.contiguous()
    ks_t = torch.tensor([int(k) for k in ks], dtype=torch.int32, device=dev)
    v = valid.to(torch.uint8).contiguous() if valid is not None else ks_t.new_empty(1, dtype=torch.uint8)
    c = torch.empty(B, max(k_max - 1, 1), N, dtype=torch.float32, device=dev)
    picks = torch.full((B, k_max), -1, dtype=torch.int64, device=dev)
    block_n = triton.next_power_of_2(N)
    block_r = max(1, min(32, 8192 // block_n))
    _greedy_kernel[(B,)](
        src, ks_t, v, c, picks, N, k_max, c.stride(0), float(gamma),
        FULL_L=strategy == "full", HAS_VALID=valid is not None,
        BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_T=block_r, num_warps=8 if block_n >= 2048 else 4,
    )
    return picks
