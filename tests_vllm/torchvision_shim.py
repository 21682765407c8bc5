"""Test-only shim: lets PyPI's CUDA torchvision import next to vLLM's CPU torch.

vLLM's LLaVA code imports torchvision.transforms.v2 (through transformers' Pixtral image processor).
The torchvision wheel that vLLM's CPU build pulls in is a CUDA build whose compiled operators do
not load against the CPU torch, and its Python side then fails with "operator torchvision::nms
does not exist". Declaring the two operator schemas it looks up before torchvision is imported
lets the pure-Python part import; nothing here runs those operators.

`python tests_vllm/torchvision_shim.py --install` writes a .pth into the running interpreter's
site-packages so that every process of that (test) environment, vLLM's spawned ones included,
runs :func:`declare` at start. Use it only in a test environment whose torchvision cannot load.
"""

from __future__ import annotations

import os
import sys
import sysconfig

PTH = "otprune_test_torchvision_shim.pth"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS = []  # keeps the torch.library fragment alive


def declare() -> None:
    """Declare torchvision::nms / qnms unless torchvision is already imported (idempotent)."""
    if "torchvision" in sys.modules or _LIBS:
        return
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBS.append(lib)


def install() -> str:
    """Write the .pth that runs :func:`declare` at interpreter start; returns its path."""
    site = sysconfig.get_paths()["purelib"]
    path = os.path.join(site, PTH)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(path, "w") as f:
        f.write(f"import sys; sys.path.insert(0, {here!r}); import torchvision_shim; "
                "sys.path.remove(" + repr(here) + "); torchvision_shim.declare()\n")
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python tests_vllm/torchvision_shim.py --install")
    print(install())
