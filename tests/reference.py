"""Plain float64 reference of DESIGN.md section 2, written for clarity, not speed.

One image at a time, full kernel matrix, the textbook incremental-Cholesky greedy.
"""

from __future__ import annotations

import torch

GAMMA = 0.01


def ref_kernel(x: torch.Tensor, gamma: float = GAMMA, normalize: str = "feature") -> torch.Tensor:
    """L = I + gamma * S S^T for one (N, d) image, in float64."""
    x = x.to(torch.float64)
    dim = 0 if normalize == "feature" else 1
    norm = x.norm(dim=dim, keepdim=True)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    xn = x / norm
    s = xn @ xn.T
    return torch.eye(x.shape[0], dtype=torch.float64) + gamma * s @ s.T


def ref_greedy(L: torch.Tensor, k: int):
    """Greedy picks in order and, for each step, the gap between the best and runner-up residual
    relative to the best (the near-tie measure used by the tests)."""
    n = L.shape[0]
    d2 = torch.diagonal(L).clone()
    c = torch.zeros(k, n, dtype=torch.float64)
    taken = torch.zeros(n, dtype=torch.bool)
    picks, gaps = [], []

    def choose():
        masked = torch.where(taken, torch.tensor(float("-inf"), dtype=torch.float64), d2)
        top = torch.topk(masked, min(2, n)).values
        gap = float("inf") if top.numel() < 2 or not torch.isfinite(top[1]) else float((top[0] - top[1]) / top[0])
        return int(torch.argmax(masked)), gap

    j, gap = choose()
    for t in range(k):
        picks.append(j)
        gaps.append(gap)
        taken[j] = True
        if t == k - 1:
            break
        e = (L[j] - c[:t, j] @ c[:t]) / torch.sqrt(d2[j])
        c[t] = e
        d2 = d2 - e * e
        j, gap = choose()
    return picks, gaps


def ref_select(x: torch.Tensor, k: int, gamma: float = GAMMA, normalize: str = "feature"):
    """(sorted picks, min relative gap along the path) for one (N, d) image."""
    picks, gaps = ref_greedy(ref_kernel(x, gamma, normalize), k)
    return sorted(picks), min(gaps)


def ref_logdet(x: torch.Tensor, idx, gamma: float = GAMMA, normalize: str = "feature") -> float:
    L = ref_kernel(x, gamma, normalize)
    idx = torch.as_tensor(list(idx), dtype=torch.int64)
    return float(torch.linalg.slogdet(L[idx][:, idx])[1])
