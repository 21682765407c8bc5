"""Stage 2 in pure torch: batched greedy log-det maximisation with incremental Cholesky.

Works on the similarity S (B, N, N). The kernel rows L[j, :] = e_j + gamma * (S S^T)[j, :] it
needs come one of two ways (``rows``):
- "lazy": formed per step for the chosen item only, gamma * S[j, :] @ S (S is symmetric): k_max
  passes over S, no (B, N, N) kernel;
- "full": G = gamma * S S^T computed first by one symmetric GEMM, each step reads row j of G.
Lazy reads S once per step (memory-bound, k * N^2 per image); full pays one N^3 GEMM
(compute-bound) and then almost nothing per step, so full wins for large N or large k / N.
:func:`kernel_rows_strategy` picks by size. Measured on the 2-core x86 machine with the
block-triangle CPU Gram and this loop (d = 1024, fp32, medians of interleaved calls, ms for the greedy
alone, lazy / full; torch greedy, then the C++ path; the machine was shared, so take +-10%):
  B=1 N=576 k=56:   torch 5.6 / 5.5     C++ 1.9 / 2.5  B=8 N=576 k=56:   torch 14 / 18   C++ 7.7 / 15
  B=1 N=576 k=128:  torch 11 / 8.8      C++ 3.7 / 3.0  B=8 N=576 k=128:  torch 33 / 27   C++ 15 / 17
  B=1 N=576 k=192:  torch 17 / 12       C++ 5.4 / 3.6  B=8 N=576 k=192:  torch 50 / 35   C++ 21 / 19
  B=1 N=1152 k=113: torch 21 / 22       C++ 12 / 17    B=1 N=1152 k=256: torch 52 / 32   C++ 27 / 19
The rule below (full from k / N >= 0.2 or N >= 1536) takes the faster form in all of these but one,
the C++ path at B=8 N=576 k=128 (15% slower than lazy there).
Each lazy step is eleven small torch ops plus one batched row product; on the 2-core CPU the small
ops cost ~50-80 us per step whatever B is, and the row product reads all of S (10.6 MB at B=8
N=576) at two thirds to three quarters of the rate a plain reduction reads it.
The identity term e_j only touches entry j of the new Cholesky row, which belongs to an item that
is taken from then on and never read again, so it is left out in both forms.
The loop runs k_max - 1 steps on device tensors: no host synchronisation, no data-dependent
Python branch, so it is the same code on CPU and GPU and can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._validate import device_values
from .kernel import symmetric_gram

ROWS = ("auto", "lazy", "full")
# "auto" takes the full kernel from this many tokens on, or from this share k_max / N on, as long
# as the extra (B, N, N) buffer stays under the byte budget.
FULL_ROWS_MIN_N = 1536
FULL_ROWS_MIN_SHARE = 0.2
FULL_ROWS_MAX_BYTES = 2 << 30


def kernel_rows_strategy(s: torch.Tensor, k_max: int, rows: str = "auto") -> str:
    """"lazy" or "full" (see the module docstring) for a (B, N, N) similarity and ``k_max`` picks."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if rows != "auto":
        return rows
    n = s.shape[-1]
    fits = s.numel() * s.element_size() <= FULL_ROWS_MAX_BYTES
    return "full" if fits and (n >= FULL_ROWS_MIN_N or k_max >= FULL_ROWS_MIN_SHARE * n) else "lazy"


def gamma_gram(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """G = gamma * S S^T for (B, N, N) S: the kernel L without its identity, (B, N, N)."""
    return symmetric_gram(s).mul_(gamma)


def greedy_picks(
    s: torch.Tensor,
    ks: Sequence[int],
    gamma: float,
    valid: Optional[torch.Tensor] = None,
    rows: str = "auto",
) -> torch.Tensor:
    """Greedy picks in selection order.

    s:     (B, N, N) symmetric similarity, float32 or float64 (the greedy state uses its dtype);
           rows and columns of padding tokens must be zero.
    ks:    per-row budgets (1 <= k_b <= valid length of row b).
    valid: (B, N) bool mask of real tokens, or None.
    rows:  how kernel rows are formed: "auto", "lazy" or "full" (module docstring).
    Returns (B, max(ks)) int64: row b holds its k_b picks in greedy order, then -1.
    """
    B, N, _ = s.shape
    k_max = max(ks)
    ragged = any(k != k_max for k in ks)
    # With padding a row may also run out of tokens before k_max (select(check=False) runs every
    # row to k_max and masks afterwards).
    guard = ragged or valid is not None
    dev = s.device
    full = kernel_rows_strategy(s, k_max, rows) == "full"

    if full:
        g = gamma_gram(s, gamma)
        d2 = torch.diagonal(g, dim1=-2, dim2=-1).add(1.0)
        src = g.view(B * N, N)
    else:
        # d2 = diag(L) = 1 + gamma * ||S_i||^2: every item's residual (squared Cholesky pivot).
        d2 = torch.linalg.vector_norm(s, dim=-1).square_().mul_(gamma).add_(1.0)
        src = s.view(B * N, N)
    beta = 1.0 if full else gamma  # scale of the fetched row: G's rows carry gamma already
    if valid is not None:
        d2.masked_fill_(~valid, float("-inf"))
    # Cholesky rows, image-major (B, K, N): the correction's batched product then reads contiguous
    # rows (a step-major layout made it copy, or take a per-image path, on CPU). Rows from step t on
    # are unwritten at step t and enter no arithmetic (the gather copies them into cj, whose :t
    # slice alone is used), so the buffer is not zeroed.
    K = max(k_max - 1, 1)
    c = s.new_empty(B, K, N)
    c_rows = c.unbind(1)
    # Picks as (k_max, B, 1): max with keepdim writes a step's column directly (cheaper on CPU).
    picks = torch.empty(k_max, B, 1, dtype=torch.int64, device=dev)
    pick_rows = picks.unbind(0)
    # Step t's gather index: its picks broadcast over the K rows of c (views made once: on CPU each
    # view costs microseconds per step; a gather over all K rows is cheaper than one over :t).
    pick_cols = picks.view(k_max, B, 1, 1).expand(k_max, B, K, 1).unbind(0)
    base = (torch.arange(B, device=dev) * N).unsqueeze(1)  # flat offset of row b in the (B*N) views
    flat_col = torch.empty(B, 1, dtype=torch.int64, device=dev)
    flat = flat_col.view(B)
    e = s.new_empty(B, 1, N)  # this step's row before scaling
    e_flat = e.view(B, N)
    v = s.new_empty(B, 1, N) if not full else e  # lazy: the fetched S row
    v_flat = v.view(B, N)
    cj = s.new_empty(B, K, 1)  # C[:, j] of every image
    cj_row = cj.transpose(1, 2)
    pivot_col = d2.new_empty(B, 1)
    floor = torch.empty_like(d2)  # min(d2, 1) of the step, the residuals' lower bound
    pivot = pivot_col.view(B)
    torch.max(d2, -1, keepdim=True, out=(pivot_col, pick_rows[0]))
    d2_flat = d2.view(-1)
    for t in range(k_max - 1):
        torch.add(base, pick_rows[t], out=flat_col)
        # e = (gamma * S[j, :] S - C[:t, j]^T C[:t, :]) / sqrt(d2[j])
        torch.index_select(src, 0, flat, out=v_flat)
        if not full:
            torch.bmm(v, s, out=e)
        if t:
            torch.gather(c, 2, pick_cols[t], out=cj)
            e.baddbmm_(cj_row[:, :, :t], c[:, :t], beta=beta, alpha=-1.0)
        elif not full:
            e.mul_(gamma)
        if guard:
            # Rows past their budget may run out of tokens: give them a zero update, not NaN.
            live = pivot > 0
            scale = torch.where(live, pivot, 1.0).rsqrt_().mul_(live).unsqueeze(1)
        else:
            scale = pivot_col.rsqrt_()
        row = c_rows[t]
        torch.mul(e_flat, scale, out=row)
        # d2 = fmax(d2 - row^2, min(d2, 1)): every exact residual is >= 1 (L is I plus a PSD matrix),
        # and in float32 a large gamma on nearly identical tokens rounds residuals below 1, then
        # below 0, where the Cholesky rows explode to inf and NaN and picks would repeat. With the
        # floor (fmax: a NaN update falls to it too) live items stay >= 1 and taken or padding items
        # -inf, so every pick is a distinct real token whatever the rounding.
        torch.clamp_max(d2, 1.0, out=floor)
        d2.addcmul_(row, row, value=-1.0)
        torch.fmax(d2, floor, out=d2)
        d2_flat.index_fill_(0, flat, float("-inf"))
        torch.max(d2, -1, keepdim=True, out=(pivot_col, pick_rows[t + 1]))
    picks = picks.view(k_max, B).T
    if ragged:
        k_t = device_values(ks, dev).unsqueeze(1)
        picks = torch.where(torch.arange(k_max, device=dev).unsqueeze(0) < k_t, picks, -1)
    return picks.contiguous()


def sort_picks(picks: torch.Tensor, padded: bool = True) -> torch.Tensor:
    """Sort each row's picks ascending, keeping the -1 padding at the end. (B, k) int64.

    padded: whether a row may hold -1 padding; False (no lengths, every row full) sorts with one
    kernel instead of three."""
    if not padded:
        return picks.sort(dim=-1).values
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(picks < 0, big, picks)
    out = keyed.sort(dim=-1).values
    return torch.where(out == big, -1, out)
