"""C++ extension backend for CPU tensors: torch similarity, compiled batched greedy (csrc/)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._ext import load
from ..greedy import gamma_gram, kernel_rows_strategy
from ..kernel import similarity
from . import Backend

_C = load()  # ImportError here marks the backend unavailable, with the reason


def greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor] = None,
           rows: str = "auto") -> torch.Tensor:
    """(B, N, N) float32/float64 S -> (B, max(ks)) int64 picks in greedy order, -1 past k_b.

    rows: "lazy" (the extension forms each kernel row from S), "full" (torch computes
    gamma * S S^T first, the extension reads its rows) or "auto" (:func:`kernel_rows_strategy`).
    """
    k_t = torch.tensor(list(ks), dtype=torch.int64)
    square = s.ndim == 3 and s.shape[1] == s.shape[2]  # else the extension reports the bad shape
    if square and kernel_rows_strategy(s, max(ks), rows) == "full":
        return _C.greedy(gamma_gram(s, gamma), k_t, float(gamma), valid, full=True)
    return _C.greedy(s, k_t, float(gamma), valid)


BACKEND = Backend(name="cpu", devices=("cpu",), similarity=similarity, greedy=greedy)
