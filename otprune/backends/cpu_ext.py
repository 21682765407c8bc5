"""C++ extension backend for CPU tensors: torch similarity, compiled batched greedy (csrc/)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._ext import load
from ..kernel import similarity
from . import Backend

_C = load()  # ImportError here marks the backend unavailable, with the reason


def greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, N) float32/float64 S -> (B, max(ks)) int64 picks in greedy order, -1 past k_b."""
    return _C.greedy(s, torch.tensor(list(ks), dtype=torch.int64), float(gamma), valid)


BACKEND = Backend(name="cpu", devices=("cpu",), similarity=similarity, greedy=greedy)
