"""Triton kernels for OTPrune selection (docs/design.md: the similarity, the greedy, the backends).

- :func:`similarity`: fused normalisation + similarity GEMM, S (B, N, N) float32.
- :func:`kernel_rows` / :func:`kernel_matrix`: rows L[j, :] = e_j + gamma (S S^T)[j, :] of the
  kernel for chosen j, or the whole L with the identity fused into the GEMM epilogue.
- :func:`greedy`: the whole k-step incremental-Cholesky greedy in one persistent launch
  (one program per image), reading rows of the whole L or forming them lazily from S
  (:func:`choose_strategy` picks by a cost model; see :mod:`.greedy`).

Every kernel runs in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set before
import; that is how their results are tested here. bench/triton_target.py compiles each one for
sm_80 and sm_90 without a GPU and checks registers, stack / spills and shared memory. Results and
speed on a GPU are untested on GPU.
"""

if __name__ == "triton_kernels":
    # Reached as a top-level package because a checkout's root is on sys.path (the current directory,
    # PYTHONPATH). That name belongs to Triton's own package: hand the import to the next
    # ``triton_kernels`` on the path, never claim it (otprune imports this folder as otprune.triton_kernels).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'triton_kernels' (the checkout's triton_kernels/ folder "
                                  "is otprune's source, imported as otprune.triton_kernels)", name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])
else:
    from ._env import interpreting
    from .greedy import choose_strategy, greedy
    from .kernel_rows import kernel_matrix, kernel_rows
    from .similarity import similarity

    __all__ = ["choose_strategy", "greedy", "interpreting", "kernel_matrix", "kernel_rows", "similarity"]
