"""Triton kernels for OTPrune selection (DESIGN.md sections 2 and 4).

- :func:`similarity`: fused normalisation + similarity GEMM, S (B, N, N) float32.
- :func:`kernel_rows` / :func:`kernel_matrix`: rows L[j, :] = e_j + gamma (S S^T)[j, :] of the
  kernel for chosen j, or the whole L with the identity fused into the GEMM epilogue.
- :func:`greedy`: the whole k-step incremental-Cholesky greedy in one persistent launch
  (one program per image), reading rows of the whole L or forming them lazily from S
  (:func:`choose_strategy` picks by size; see :mod:`.greedy`).

Every kernel runs in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set before
import; that is how they are tested here. On a GPU they are untested.
"""

from ._env import interpreting
from .greedy import choose_strategy, greedy
from .kernel_rows import kernel_matrix, kernel_rows
from .similarity import similarity

__all__ = ["choose_strategy", "greedy", "interpreting", "kernel_matrix", "kernel_rows", "similarity"]
