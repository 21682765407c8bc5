"""Small driver for compute-sanitizer: the project's GPU kernels (backends "cuda" and "triton",
whichever are usable) on a few shapes, each result compared with backend "torch" on the same
float32 input and device. A differing index set is printed, not fatal (a near-tie can flip a pick
legitimately; the GPU tests make the tie-aware check); the sanitizer's own exit code reports
memory errors and races.

    compute-sanitizer --tool memcheck $(python3 -m bench.sanitize_greedy --kernel-filters) \\
        python3 -m bench.sanitize_greedy

(run as a module: as a script, bench/select.py would shadow the standard library's select)

``--kernel-filters`` prints one ``--kernel-name kns=<name>`` per kernel defined in csrc/ (CUDA
``__global__`` functions) and otprune/triton_kernels/ (launched ``@triton.jit`` functions), read
from the sources, so that the sanitizer checks the project's kernels only (not cuBLAS or torch's).

Shapes are small on purpose (the sanitizer slows kernels down a hundredfold): ragged rows,
k = 1, k = N, N not a multiple of the block size, N = 2880 with k = 282. Exit status 2 without
a CUDA device. (Untested on GPU.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (B, N, d, keep, lengths)
    (1, 1, 8, 1, None),
    (3, 37, 16, 1.0, None),
    (4, 577, 64, 0.098, None),
    (5, 300, 32, 0.222, [300, 17, 1, 299, 150]),
    (1, 2880, 64, 0.098, None),
]
_CUDA_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_TRITON_JIT = re.compile(r"@triton\.jit\s*\ndef\s+(\w+)\s*\(")


def kernel_names(root: Path = ROOT) -> List[str]:
    """Names of the project's GPU kernels: the @triton.jit functions launched with a grid
    (``name[grid](...)``) in otprune/triton_kernels/, then the CUDA __global__ functions in csrc/
    (last, so that a sanitizer honouring only its last --kernel-name still checks the CUDA kernel)."""
    names = []
    for path in sorted((root / "otprune" / "triton_kernels").glob("*.py")):
        text = path.read_text()
        names += [n for n in _TRITON_JIT.findall(text) if re.search(rf"\b{n}\[[^\]]*\]\(", text)]
    for path in sorted((root / "csrc").glob("*.cu*")):
        names += _CUDA_KERNEL.findall(path.read_text())
    return list(dict.fromkeys(names))


def kernel_filters(root: Path = ROOT) -> List[str]:
    """compute-sanitizer arguments limiting its checks to :func:`kernel_names` (substring match)."""
    out = []
    for name in kernel_names(root):
        out += ["--kernel-name", f"kns={name}"]
    return out


def main(argv: List[str]) -> int:
    if argv == ["--kernel-filters"]:
        print(" ".join(kernel_filters()))
        return 0
    if argv:
        print(f"usage: python -m bench.sanitize_greedy [--kernel-filters]; got {argv}", file=sys.stderr)
        return 2
    import torch

    import otprune
    from otprune import backends

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    names = [n for n in ("cuda", "triton") if backends.usable(n, "cuda")[0]]
    if not names:
        print("neither the cuda nor the triton backend is usable here: nothing to check")
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    runs = differ = 0
    for B, N, d, keep, lengths in CASES:
        x = torch.randn(B, N, d, device="cuda", generator=gen)
        lens = None if lengths is None else torch.tensor(lengths, device="cuda")
        want = otprune.select(x, keep, lengths=lens, backend="torch").cpu()
        for name in names:
            got = otprune.select(x, keep, lengths=lens, backend=name)
            torch.cuda.synchronize()
            same = torch.equal(got.cpu(), want)
            runs += 1
            differ += not same
            print(f"{name}: B={B} N={N} d={d} keep={keep} ragged={lengths is not None}: "
                  f"{'same picks as torch' if same else 'picks differ from torch'}")
    print(f"{runs - differ} of {runs} runs pick the same tokens as backend torch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
