"""Public selection API: select, prune (DESIGN.md section 3)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import backends
from ._validate import check_select_args, max_magnitude
from .greedy import sort_picks
from .kernel import accumulation_dtype, valid_mask

Keep = Union[int, float]
# Features whose largest magnitude lies outside this range are rescaled before squaring (the
# normalisation is scale-invariant), so that squares neither overflow nor underflow.
_SAFE_MAGNITUDE = (1e-12, 1e12)


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
) -> torch.LongTensor:
    """Indices of the visual tokens OTPrune keeps.

    features: (N, d) or (B, N, d), float16/bfloat16/float32/float64, CPU or CUDA.
    keep:     int >= 1 (tokens per image) or float ratio in (0, 1] (k = round(keep * N), at least 1).
    gamma:    kernel weight in L = I + gamma * S S^T.
    normalize: "feature" (unit-norm feature columns, the release's default) or "token" (cosine).
    lengths:  optional (B,) valid lengths of a right-padded batch; the ratio applies per row and
              rows are padded with -1 up to the largest k.
    compat:   None (exact arithmetic, sorted output) or "official" (the public release's numerics
              and order, see :mod:`otprune.official`).
    backend:  "auto", "cuda", "triton", "cpu" (C++ extension) or "torch".
    Returns (k,) or (B, k) int64 on the input's device; ascending unless compat="official".
    """
    args = check_select_args(features, keep, gamma, normalize, lengths, compat)
    x = args.x
    if compat == "official":
        if backend not in ("auto", "torch"):
            raise ValueError(f"compat='official' runs the release's own loop; backend {backend!r} cannot run it")
        from .official import official_select

        out = official_select(x, args.ks, float(gamma), normalize, args.lengths)
    else:
        be = backends.resolve(backend, x.device)
        x = _safe_scale(x)
        valid = valid_mask(args.lengths, x.shape[0], x.shape[1], x.device)
        s = be.similarity(x, normalize, valid)
        out = sort_picks(be.greedy(s, args.ks, float(gamma), valid))
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


def _safe_scale(x: torch.Tensor) -> torch.Tensor:
    """Rescale features of extreme magnitude into a safe range (one reduction; same result)."""
    amax = max_magnitude(x)
    if amax == 0.0 or _SAFE_MAGNITUDE[0] <= amax <= _SAFE_MAGNITUDE[1]:
        return x
    return x.to(accumulation_dtype(x.dtype)) / amax
