"""Launch environment: whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), the GEMM tile
choice and launch options."""

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def warps(num_warps: int) -> dict:
    """Launch options for ``num_warps`` warps: also ``maxnreg``, the register budget the hardware
    allows a thread at that block size (65536 per SM, at most 255). Without it ptxas picks its own,
    lower register target and may spill a few bytes under it (seen with Triton 3.9: 96 registers and
    an 8-byte stack); the interpreter ignores both."""
    return dict(num_warps=num_warps, maxnreg=min(255, 65536 // (32 * num_warps)))


# SMs assumed where no GPU can be asked (the interpreter, the compile gate): an H100's.
DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; :data:`DEFAULT_SMS` for any other device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def gemm_block(batch: int, n: int, fp16: bool, device: torch.device) -> int:
    """Output tile edge of the N x N triangle GEMMs (similarity, kernel matrix): 128 for fp16
    (tensor-core) operands while the batch's upper-triangle 128-tiles still give every SM one,
    else 64. A 128-tile reads its operand rows from L2 once per 128 x 128 outputs: half the L2
    traffic per FLOP of a 64-tile, which bounds these GEMMs on tensor cores at d = 4096."""
    t = -(-n // 128)
    return 128 if fp16 and batch * t * (t + 1) // 2 >= sm_count(device) else 64


def gemm_config(fp16: bool, block: int = 64) -> dict:
    """BLOCK_K and launch options of a (block x block) GEMM output tile. 64: fp16 operands K 32 at
    4 warps, fp32 operands K 16 at 8 warps (K 32 at 4 warps, and K 16 at 4 warps at some
    specialisations, spilled under ptxas; Triton 3.6 rejects tl.dot with K < 16). 128 (fp16 only):
    K 32 at 8 warps. K 64 in the interpreter, where every loop step costs milliseconds."""
    if interpreting():
        return dict(BLOCK_K=64, **warps(4))
    if block == 128:
        return dict(BLOCK_K=32, **warps(8))
    return dict(BLOCK_K=32, **warps(4)) if fp16 else dict(BLOCK_K=16, **warps(8))
