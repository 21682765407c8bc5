"""Triton backend: stage 1 and stage 2 as Triton kernels (package ``otprune.triton_kernels``).

Devices: CUDA tensors on a GPU. When Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set
before import, as the tests do without a GPU) the backend takes CPU tensors instead, and only them:
the interpreter is slow and meant for testing, "auto" never picks Triton for CPU tensors, and a GPU
machine with the variable set falls back to the other CUDA-capable backends rather than running
CUDA tensors through the interpreter.
The kernels compute in float32 (fp16/bf16/fp32 input). Float64 input keeps its float64 contract by
running both stages in torch, so ``backend="triton"`` accepts every dtype ``select`` does.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from .. import triton_kernels as tk

from ..greedy import greedy_picks
from ..kernel import similarity as torch_similarity
from . import Backend


def _similarity(x: torch.Tensor, normalize: str, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if x.dtype == torch.float64:
        return torch_similarity(x, normalize, valid)
    return tk.similarity(x, normalize, valid)


def _greedy(s: torch.Tensor, ks: Sequence[int], gamma: float, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if s.dtype == torch.float64:
        return greedy_picks(s, ks, gamma, valid)
    return tk.greedy(s, ks, gamma, valid)


def _probe() -> Tuple[bool, str]:
    if tk.interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter)"
    try:
        import triton

        triton.runtime.driver.active.get_current_target()
    except Exception as err:  # no usable Triton GPU driver
        return False, f"Triton has no usable GPU driver: {type(err).__name__}: {err}"
    return True, ""


BACKEND = Backend(
    name="triton",
    devices=("cpu",) if tk.interpreting() else ("cuda",),
    similarity=_similarity,
    greedy=_greedy,
    probe=_probe,
)
