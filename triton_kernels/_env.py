"""Launch environment: whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), GEMM tiles."""

import os

GEMM_WARPS = 4  # warps of a 64x64 output tile (similarity, kernel matrix)


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def warps(num_warps: int) -> dict:
    """Launch options for ``num_warps`` warps: also ``maxnreg``, the register budget the hardware
    allows a thread at that block size (65536 per SM, at most 255). Without it ptxas picks its own,
    lower register target and may spill a few bytes under it (seen with Triton 3.9: 96 registers and
    an 8-byte stack); the interpreter ignores both."""
    return dict(num_warps=num_warps, maxnreg=min(255, 65536 // (32 * num_warps)))


def gemm_block_k(fp16: bool) -> int:
    """K depth of a 64x64 GEMM tile at GEMM_WARPS warps: 32 for fp16 operands, 8 for fp32 ones
    (deeper fp32 tiles spill under ptxas at some specialisations: bench/results/kernels.md); 64 in
    the interpreter, where every loop step costs milliseconds."""
    if interpreting():
        return 64
    return 32 if fp16 else 8
