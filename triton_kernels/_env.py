"""Launch environment: whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), launch options."""

import os

def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def warps(num_warps: int) -> dict:
    """Launch options for ``num_warps`` warps: also ``maxnreg``, the register budget the hardware
    allows a thread at that block size (65536 per SM, at most 255). Without it ptxas picks its own,
    lower register target and may spill a few bytes under it (seen with Triton 3.9: 96 registers and
    an 8-byte stack); the interpreter ignores both."""
    return dict(num_warps=num_warps, maxnreg=min(255, 65536 // (32 * num_warps)))


def gemm_config(fp16: bool) -> dict:
    """BLOCK_K and launch options of a 64x64 GEMM output tile: fp16 operands K 32 at 4 warps, fp32
    operands K 16 at 8 warps (K 32 at 4 warps, and K 16 at 4 warps at some specialisations,
    spilled under ptxas; Triton 3.6 rejects tl.dot with K < 16); K 64 in the interpreter, where
    every loop step costs milliseconds."""
    if interpreting():
        return dict(BLOCK_K=64, **warps(4))
    return dict(BLOCK_K=32, **warps(4)) if fp16 else dict(BLOCK_K=16, **warps(8))
