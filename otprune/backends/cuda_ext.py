"""C++/CUDA extension backend for CUDA tensors: torch similarity, one-launch greedy kernel (csrc/).

Kernel rows (design and cost bound: csrc/greedy_cuda.cu's header): "full" computes G = gamma S S^T
by one fp32 GEMM (TF32 off) and the kernel reads row j of G per step; "lazy" has the kernel form
each row from S (k passes over S per image). "auto" takes "full" unless the extra (B, N, N)
buffer exceeds ``otprune.greedy.FULL_ROWS_MAX_BYTES``: on a GPU the GEMM costs a few microseconds
per image at N = 576 where the lazy form streams S through one SM at every step. Untested on GPU.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._ext import load
from ..greedy import FULL_ROWS_MAX_BYTES, ROWS, gamma_gram
from ..kernel import similarity
from . import Backend

_C = load()  # ImportError here marks the backend unavailable, with the reason


def rows_strategy(s: torch.Tensor, rows: str = "auto") -> str:
    """"full" or "lazy" kernel rows for (B, N, N) ``s`` on the GPU (module docstring)."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if rows != "auto":
        return rows
    return "full" if s.numel() * s.element_size() <= FULL_ROWS_MAX_BYTES else "lazy"


def exact_gram(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma * S S^T, (B, N, N) in s's dtype, with TF32 off for the GEMM: TF32's 10-bit mantissa
    would change picks that fp32 arithmetic gets right."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return gamma_gram(s, gamma)
    finally:
        torch.set_float32_matmul_precision(prev)


def greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor] = None,
           rows: str = "auto") -> torch.Tensor:
    """(B, N, N) float32/float64 CUDA S -> (B, max(ks)) int64 picks in greedy order, -1 past k_b:
    at most one GEMM, then one kernel launch on the current stream (untested on GPU)."""
    k_t = torch.tensor(list(ks), dtype=torch.int64)
    stream = torch.cuda.current_stream(s.device).cuda_stream if s.is_cuda else 0
    square = s.ndim == 3 and s.shape[1] == s.shape[2]  # else the extension reports the bad shape
    if square and rows_strategy(s, rows) == "full":
        return _C.greedy(exact_gram(s, gamma), k_t, float(gamma), valid, full=True, stream=stream)
    return _C.greedy(s, k_t, float(gamma), valid, stream=stream)


def probe() -> Tuple[bool, str]:
    """Usable when the extension has its CUDA part and a GPU is visible."""
    if not _C.with_cuda:
        return False, "otprune._C was built without CUDA (CPU-only torch or no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


BACKEND = Backend(name="cuda", devices=("cuda",), similarity=similarity, greedy=greedy, probe=probe)
