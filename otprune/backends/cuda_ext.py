"""C++/CUDA extension backend for CUDA tensors: torch similarity, one-launch greedy kernel (csrc/)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._ext import load
from ..kernel import similarity
from . import Backend

_C = load()  # ImportError here marks the backend unavailable, with the reason


def greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N, N) float32/float64 CUDA S -> (B, max(ks)) int64 picks: one kernel launch, kernel rows
    formed per step from S (untested on GPU)."""
    stream = torch.cuda.current_stream(s.device).cuda_stream
    return _C.greedy(s, torch.tensor(list(ks), dtype=torch.int64), float(gamma), valid, stream=stream)


def probe() -> Tuple[bool, str]:
    """Usable when the extension has its CUDA part and a GPU is visible."""
    if not _C.with_cuda:
        return False, "otprune._C was built without CUDA (CPU-only torch or no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


BACKEND = Backend(name="cuda", devices=("cuda",), similarity=similarity, greedy=greedy, probe=probe)
