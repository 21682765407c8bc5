"""Locate the compiled extension ``otprune._C`` (csrc/).

``load()`` returns the installed module built by setup.py. When it is missing and the environment
variable ``OTPRUNE_JIT=1`` is set, it is compiled on first use from the source tree's csrc/ with
torch.utils.cpp_extension.load (cached by torch afterwards); CUDA sources are included when this
torch has CUDA and a CUDA toolkit is found. Otherwise ImportError says how to build it.
"""

from __future__ import annotations

import glob
import os
from types import ModuleType
from typing import Optional

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_module: Optional[ModuleType] = None


def load() -> ModuleType:
    """The compiled module (exposes ``greedy(s, ks, gamma, valid=None)`` and ``with_cuda``)."""
    global _module
    if _module is None:
        try:
            from . import _C as module
        except ImportError as err:
            if os.environ.get("OTPRUNE_JIT") != "1":
                raise ImportError(
                    "the compiled extension otprune._C is not built: install with "
                    "`pip install --no-build-isolation -e .` or set OTPRUNE_JIT=1 to compile it on first use"
                ) from err
            module = _jit_build()
        _module = module
    return _module


def _jit_build() -> ModuleType:
    """Compile csrc/ now with torch.utils.cpp_extension.load."""
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise ImportError(f"OTPRUNE_JIT=1 but the C++ sources are not shipped with this install ({_CSRC})")
    try:  # torch's JIT build needs ninja; pip's copy is not on PATH unless the venv is activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cflags = ["-O3", "-g0", "-fopenmp"] + (["-DWITH_CUDA"] if cuda else [])
    return cpp_extension.load(
        name="otprune_C",
        sources=sources + (sorted(glob.glob(os.path.join(_CSRC, "*.cu"))) if cuda else []),
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3"],
        extra_ldflags=["-fopenmp"],
        with_cuda=cuda,
    )
