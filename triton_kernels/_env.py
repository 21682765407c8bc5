"""Launch environment: whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (on CPU tensors), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
