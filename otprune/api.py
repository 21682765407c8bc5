"""Public selection API: select, prune.

:func:`select` checks its arguments without reading tensor data, then runs the selection
(:mod:`otprune._ops`): directly in eager mode, as the custom op ``otprune::select`` under
torch.compile.
"""

from __future__ import annotations

from numbers import Integral
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _ops
from ._validate import check_select_args

Keep = Union[int, float]


@torch.no_grad()
def select(
    features: torch.Tensor,
    keep: Keep,
    *,
    gamma: float = 0.01,
    normalize: str = "feature",
    lengths: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    compat: Optional[str] = None,
    backend: str = "auto",
    check: bool = True,
) -> torch.LongTensor:
    """Indices of the visual tokens OTPrune keeps.

    features: (N, d) or (B, N, d), float16/bfloat16/float32/float64, CPU or CUDA.
    keep:     int >= 1 (tokens per image) or float ratio in (0, 1] (k = round(keep * N), at least 1).
    gamma:    kernel weight in L = I + gamma * S S^T.
    normalize: "feature" (unit-norm feature columns, the release's default) or "token" (cosine).
    lengths:  optional (B,) valid lengths of a right-padded batch (a Python sequence or an integer
              tensor); ``keep`` applies per row (k_b = budget of length_b) and every row is padded
              with -1 up to k_max: max_b k_b for a sequence; the budget of a full row of N tokens
              for a tensor (its values are unknown until read, the width follows from shapes).
    compat:   None (exact arithmetic, sorted output) or "official" (the public release's numerics
              and order, see :mod:`otprune.official`; it syncs the host every greedy step).
    backend:  "auto", "cuda", "triton", "cpu" (C++ extension) or "torch".
    check:    True: read the data once (one host synchronisation) and raise ValueError for
              non-finite features or out-of-range lengths. False: no host synchronisation and no
              allocation whose size depends on data (for CUDA-graph capture; pass lengths as a device
              tensor or a Python sequence). Nothing is checked then: non-finite features give
              unspecified indices, a lengths tensor is clamped to [1, N], an int keep is cut to
              each row's length. For valid input both settings return identical indices.
    Returns (k_max,) or (B, k_max) int64 on the input's device; ascending unless compat="official".
    """
    args = check_select_args(features, keep, gamma, normalize, lengths, compat, backend, check)
    run = _ops.select_op if torch.compiler.is_compiling() else _ops.run_select
    out = run(args.x, float(keep), isinstance(keep, Integral), float(gamma), normalize, args.lengths,
              args.lengths_list, compat or "", backend, check)
    return out if args.batched else out[0]


def prune(features: torch.Tensor, keep: Keep, **kwargs) -> Tuple[torch.Tensor, torch.LongTensor]:
    """(kept_features, indices): the kept tokens gathered in index order, and :func:`select`'s indices.

    kept_features: (k, d) or (B, k, d) in the input dtype; rows padded with -1 indices get zero
    feature rows there.
    """
    idx = select(features, keep, **kwargs)
    if features.ndim == 2:
        return features[idx], idx
    safe = idx.clamp_min(0)
    kept = torch.gather(features, 1, safe.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    kept = kept.masked_fill((idx < 0).unsqueeze(-1), 0)
    return kept, idx
