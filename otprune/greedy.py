"""Stage 2 in pure torch: batched greedy log-det maximisation with incremental Cholesky.

Works on the similarity S (B, N, N); the kernel rows are formed lazily, only for chosen items:
L[j, :] = e_j + gamma * (S S^T)[j, :] = e_j + gamma * S[j, :] @ S (S is symmetric).
The identity term e_j only touches entry j of the new Cholesky row, which belongs to an item that
is taken from then on and never read again, so it is left out.
The loop runs k_max - 1 steps on device tensors: no host synchronisation, no data-dependent
Python branch, so it is the same code on CPU and GPU and can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def greedy_picks(
    s: torch.Tensor,
    ks: Sequence[int],
    gamma: float,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Greedy picks in selection order.

    s:     (B, N, N) symmetric similarity, float32 or float64 (the greedy state uses its dtype);
           rows and columns of padding tokens must be zero.
    ks:    per-row budgets (1 <= k_b <= valid length of row b).
    valid: (B, N) bool mask of real tokens, or None.
    Returns (B, max(ks)) int64: row b holds its k_b picks in greedy order, then -1.
    """
    B, N, _ = s.shape
    k_max = max(ks)
    ragged = any(k != k_max for k in ks)
    dev = s.device

    # d2 = diag(L) = 1 + gamma * ||S_i||^2: every item's residual (squared Cholesky pivot).
    d2 = torch.linalg.vector_norm(s, dim=-1).square_().mul_(gamma).add_(1.0)
    if valid is not None:
        d2.masked_fill_(~valid, float("-inf"))
    # Cholesky rows, step-major so that step t's rows c[t] (B, N) are one contiguous block.
    c = s.new_zeros(max(k_max - 1, 1), B, N)
    s_rows = s.view(B * N, N)
    base = torch.arange(B, device=dev) * N  # flat offset of row b in the (B*N) views
    picks = torch.empty(k_max, B, dtype=torch.int64, device=dev)
    pivot, j = d2.max(-1)
    picks[0] = j
    for t in range(k_max - 1):
        flat = base + j
        # e = (gamma * S[j, :] S - C[:t, j]^T C[:t, :]) / sqrt(d2[j])
        e = c[t].unsqueeze(1)  # (B, 1, N) view of this step's row
        torch.bmm(s_rows.index_select(0, flat).unsqueeze(1), s, out=e)
        if t:
            prev = c[:t].transpose(0, 1)  # (B, t, N)
            cj = prev.gather(2, j.view(B, 1, 1).expand(B, t, 1)).transpose(1, 2)  # (B, 1, t)
            e.baddbmm_(cj, prev, beta=gamma, alpha=-1.0)
        else:
            e.mul_(gamma)
        if ragged:
            # Rows past their budget may run out of tokens: give them a zero update, not NaN.
            live = pivot > 0
            scale = torch.where(live, pivot, 1.0).rsqrt_().mul_(live)
        else:
            scale = pivot.rsqrt_()
        c[t].mul_(scale.unsqueeze(1))
        d2.addcmul_(c[t], c[t], value=-1.0)
        d2.view(-1).index_fill_(0, flat, float("-inf"))
        pivot, j = d2.max(-1)
        picks[t + 1] = j
    picks = picks.T
    if ragged:
        k_t = torch.tensor(ks, device=dev).unsqueeze(1)
        picks = torch.where(torch.arange(k_max, device=dev).unsqueeze(0) < k_t, picks, -1)
    return picks.contiguous()


def sort_picks(picks: torch.Tensor) -> torch.Tensor:
    """Sort each row's picks ascending, keeping the -1 padding at the end. (B, k) int64."""
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(picks < 0, big, picks)
    out = keyed.sort(dim=-1).values
    return torch.where(out == big, -1, out)
