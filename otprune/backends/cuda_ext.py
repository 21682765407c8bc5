"""C++/CUDA extension backend for CUDA tensors: tensor-core similarity and kernel rows, then the
one-launch greedy kernel (csrc/).

Stages (design and cost bound: docs/design.md, Performance; csrc/greedy_cuda.cu's header):
- similarity: the Triton kernels' fused normalisation + triangle GEMM (otprune.triton_kernels:
  two launches; fp16 input on tensor cores with the hi/lo split); float64 input, or no usable
  Triton, takes otprune.kernel.similarity (torch, cuBLAS fp32);
- kernel rows: "full" computes G = gamma S S^T first, by the Triton split-fp16 tensor-core triangle
  GEMM (fp32-level products; otprune.triton_kernels.kernel_matrix) or, for float64 S or without
  Triton, by one cuBLAS GEMM with TF32 off; the kernel then reads row j of G per step. "lazy" has
  the kernel form each row from S (k passes over S per image). "auto" takes "full" unless the
  extra (B, N, N) buffer exceeds ``otprune.greedy.FULL_ROWS_MAX_BYTES``: on a GPU the GEMM costs a
  few microseconds per image at N = 576 where the lazy form streams S through one SM at every step;
- greedy: one launch of the CUDA kernel on the current stream.
The stages pick Triton by the tensor's device (``backends.usable("triton", ...)``), so under
``TRITON_INTERPRET=1`` the same composition runs on CPU tensors with the C++ CPU greedy: that is
how its numerics are tested without a GPU. Untested on GPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

from .._ext import load
from ..greedy import FULL_ROWS_MAX_BYTES, ROWS, gamma_gram
from ..kernel import similarity as torch_similarity
from . import Backend, usable

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


@lru_cache(maxsize=None)
def _triton_usable(device_type: str) -> bool:
    return usable("triton", device_type)[0]


def _triton_for(t: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``t`` (a float32/16 tensor on a device Triton runs on; the
    probe is read once per process and device type)."""
    return t.dtype != torch.float64 and _triton_usable(t.device.type)


def similarity(x: torch.Tensor, normalize: str = "feature", valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S (B, N, N), float32 (float64 for float64 x): the Triton similarity, else torch's."""
    if _triton_for(x):
        from .. import triton_kernels as tk

        return tk.similarity(x, normalize, valid)
    return torch_similarity(x, normalize, valid)


def gram(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """G = gamma * S S^T, (B, N, N) in s's dtype: the Triton split-fp16 tensor-core GEMM for float32
    S, else cuBLAS with TF32 off (:func:`exact_gram`)."""
    if s.dtype == torch.float32 and _triton_for(s):
        from .. import triton_kernels as tk

        return tk.kernel_matrix(s, gamma, identity=False)
    return exact_gram(s, gamma)


def greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor] = None,
           rows: str = "auto") -> torch.Tensor:
    """(B, N, N) float32/float64 CUDA S -> (B, max(ks)) int64 picks in greedy order, -1 past k_b:
    at most one GEMM (:func:`gram`), then one kernel launch on the current stream (untested on GPU)."""
    k_t = torch.tensor(list(ks), dtype=torch.int64)
    stream = torch.cuda.current_stream(s.device).cuda_stream if s.is_cuda else 0
    square = s.ndim == 3 and s.shape[1] == s.shape[2]  # else the extension reports the bad shape
    if square and rows_strategy(s, rows) == "full":
        return _C.greedy(gram(s, gamma), k_t, float(gamma), valid, full=True, stream=stream)
    return _C.greedy(s, k_t, float(gamma), valid, stream=stream)


def probe() -> Tuple[bool, str]:
    """Usable when the extension has its CUDA part and a GPU is visible."""
    if not _C.with_cuda:
        return False, "otprune._C was built without CUDA (CPU-only torch or no CUDA toolkit at build time)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


BACKEND = Backend(name="cuda", devices=("cuda",), similarity=similarity, greedy=greedy, probe=probe)
