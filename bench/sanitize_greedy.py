"""Small driver for compute-sanitizer: the CUDA greedy (backend "cuda") on a few shapes, each result
compared with backend "torch" on the same float32 input and device. A differing index set is
printed, not fatal (a near-tie can flip a pick legitimately; tests/test_cuda_ext.py makes the
tie-aware check); the sanitizer's own exit code reports memory errors and races.

    compute-sanitizer --tool memcheck python3 -m bench.sanitize_greedy

(run as a module: as a script, bench/select.py would shadow the standard library's select)

Shapes are small on purpose (the sanitizer slows kernels down a hundredfold): ragged rows,
k = 1, k = N, N not a multiple of the block size, N = 2880 with k = 282. Exit status 2 without
a CUDA device. (Untested on GPU.)
"""

from __future__ import annotations

import sys

import torch

import otprune

CASES = [  # (B, N, d, keep, lengths)
    (1, 1, 8, 1, None),
    (3, 37, 16, 1.0, None),
    (4, 577, 64, 0.098, None),
    (5, 300, 32, 0.222, [300, 17, 1, 299, 150]),
    (1, 2880, 64, 0.098, None),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    differ = 0
    for B, N, d, keep, lengths in CASES:
        x = torch.randn(B, N, d, device="cuda", generator=gen)
        lens = None if lengths is None else torch.tensor(lengths, device="cuda")
        got = otprune.select(x, keep, lengths=lens, backend="cuda")
        want = otprune.select(x, keep, lengths=lens, backend="torch")
        torch.cuda.synchronize()
        same = torch.equal(got.cpu(), want.cpu())
        differ += not same
        print(f"B={B} N={N} d={d} keep={keep} ragged={lengths is not None}: "
              f"{'same picks as torch' if same else 'picks differ from torch'}")
    print(f"{len(CASES) - differ} of {len(CASES)} cases pick the same tokens as backend torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
