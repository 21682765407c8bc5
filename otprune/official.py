"""compat="official": the public release's selection numerics and output order, per image.

Reproduces, for one (N, d) image: column normalisation with the norm taken in the input dtype,
the full kernel matrix in float32, Cholesky rows stored in the *input* dtype (fp16 for LLaVA),
the early stop when the best residual is not positive, the repair loop that re-runs the greedy on
a kernel with the picked rows/columns zeroed when picks repeat, and ``list(set(picks))`` order.
It syncs the host every step, exactly like the original; use it to reproduce published numbers.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def _greedy(L: torch.Tensor, k: int, store_dtype: torch.dtype) -> List[int]:
    """The release's greedy on a full (N, N) float32 kernel; may return fewer than k picks."""
    n = L.shape[0]
    c = torch.zeros(k, n, dtype=store_dtype, device=L.device)
    d2 = torch.diagonal(L).clone()
    j = int(torch.argmax(d2))
    picks = [j]
    while len(picks) < k:
        t = len(picks) - 1
        proj = (c[:t, j].unsqueeze(0) @ c[:t, :]).reshape(n)
        e = (L[j, :] - proj) / torch.sqrt(d2[j])
        c[t, :] = e
        d2 -= e * e
        j = int(torch.argmax(d2))
        if float(d2[j]) < 1e-100:
            break
        picks.append(j)
    return picks


@torch.no_grad()
def official_select_one(x: torch.Tensor, k: int, gamma: float, normalize: str) -> torch.Tensor:
    """Indices kept by the public loop for one (N, d) image, in its ``list(set())`` order."""
    n = x.shape[0]
    if normalize == "feature":
        xn = x / x.norm(dim=-2, keepdim=True).to(torch.float32)
    else:
        xn = x / x.norm(dim=-1, keepdim=True).to(torch.float32)
    xn = torch.nan_to_num(xn.to(torch.float32 if x.dtype != torch.float64 else torch.float64))
    s = xn @ xn.T
    L = torch.eye(n, dtype=s.dtype, device=x.device) + gamma * s @ s.T
    return select_from_kernel(L, k, x.dtype)


def select_from_kernel(L: torch.Tensor, k: int, store_dtype: torch.dtype) -> torch.Tensor:
    """The release's greedy plus repair loop on an (N, N) kernel (modified in place, as there).

    Returns k distinct indices in ``list(set(...))`` order (int64, on L's device).
    """
    picks = _greedy(L, k, store_dtype)
    while len(set(picks)) < k:
        for i in picks:
            L[i, :] = 0
            L[:, i] = 0
        before = len(set(picks))
        picks.extend(_greedy(L, k - before, store_dtype))
        if len(set(picks)) == before:  # the release would loop forever here
            raise RuntimeError(f"compat='official': the release's repair loop cannot find {k} distinct tokens")
    return torch.tensor(list(set(picks)), dtype=torch.int64, device=L.device)


def official_select(
    x: torch.Tensor, ks: Sequence[int], gamma: float, normalize: str, lengths: Optional[torch.Tensor]
) -> torch.Tensor:
    """(B, max(ks)) int64 in the release's order per row, -1 padded. x: (B, N, d)."""
    B = x.shape[0]
    lens = [x.shape[1]] * B if lengths is None else lengths.tolist()
    out = torch.full((B, max(ks)), -1, dtype=torch.int64, device=x.device)
    for b in range(B):
        out[b, : ks[b]] = official_select_one(x[b, : lens[b]], ks[b], gamma, normalize)
    return out
