"""Argument checking for the public API.

Two parts, so that a selection synchronises the host at most once:
- :func:`check_select_args`: everything that needs no tensor data (types, shapes, dtypes, options,
  ``keep``, lengths given as a Python sequence): no host sync, traceable by torch.compile.
- :func:`read_select_data`: the values, read in one device-to-host transfer (the features'
  extremes and magnitude scale, the lengths when given as a tensor), then checked.
Every entry point reports a bad argument the same way, naming the argument and the problem.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORMALIZE_MODES = ("feature", "token")
COMPAT_MODES = (None, "official")
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "torch")


@dataclass(frozen=True)
class SelectArgs:
    """Statically checked arguments of one selection call (no tensor data read).

    x:            (B, N, d) features (a view of the input; a 2-D input gets B = 1).
    batched:      whether the input was (B, N, d).
    lengths:      the (B,) integer lengths tensor as given (values unread), or None.
    lengths_list: lengths given as a Python sequence, checked; None when absent or all equal N.
    k_max:        the output width (:func:`output_width`).
    """

    x: torch.Tensor
    batched: bool
    lengths: Optional[torch.Tensor]
    lengths_list: Optional[List[int]]
    k_max: int


@dataclass(frozen=True)
class SelectData:
    """Host values of one selection's data, read in one transfer by :func:`read_select_data`.

    scale:   per-image powers of two the features are multiplied by before squaring
             (:func:`otprune.kernel.apply_scale`), or None when every image is already in range.
    lengths: per-row valid lengths read from the lengths tensor, checked; None if none was given.
    """

    scale: Optional[List[float]]
    lengths: Optional[List[int]]


def budget(keep: Union[int, float], n: int) -> int:
    """Number of tokens kept out of ``n`` for ``keep`` (an int count or a float ratio).

    A ratio gives ``int(round(keep * n))`` (Python's round), raised to 1 so that an image is never
    dropped entirely; an int is taken as is and must not exceed ``n``.
    """
    if isinstance(keep, bool):
        raise TypeError("keep must be an int >= 1 or a float ratio in (0, 1], got a bool")
    if isinstance(keep, Integral):
        keep = int(keep)
        if keep < 1:
            raise ValueError(f"keep must be >= 1 when given as an int, got {keep}")
        if keep > n:
            raise ValueError(f"keep={keep} exceeds the number of tokens N={n}")
        return keep
    if isinstance(keep, Real):
        keep = float(keep)
        if not math.isfinite(keep) or not (0.0 < keep <= 1.0):
            raise ValueError(f"keep must be a ratio in (0, 1] when given as a float, got {keep}")
        return max(1, min(n, int(round(keep * n))))
    raise TypeError(f"keep must be an int >= 1 or a float ratio in (0, 1], got {type(keep).__name__}")


def output_width(keep: Union[int, float], n: int, lengths_list: Optional[List[int]] = None) -> int:
    """Width of the index output, known from shapes alone: the largest row budget for lengths given
    as a Python sequence, else (no lengths, or a lengths tensor whose values are unread) the budget
    of a full row of ``n`` tokens."""
    if lengths_list is None:
        return budget(keep, n)
    return max(budget(keep, v) for v in lengths_list)


def device_budgets(keep: Union[int, float], lengths: torch.Tensor) -> torch.Tensor:
    """:func:`budget` of each entry of a (B,) int64 lengths tensor, on its device (no host sync).

    Same arithmetic as :func:`budget` (a float64 product, rounded half to even); an int ``keep``
    above a length is cut to that length (the unchecked path's answer to such input).
    """
    if isinstance(keep, Integral):
        return lengths.clamp(max=int(keep))
    k = torch.round(lengths.to(torch.float64) * float(keep)).to(torch.int64)
    return torch.minimum(k.clamp_min(1), lengths)


def device_values(values: Sequence, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(len(values),) ``values`` on ``device`` (int64 by default). Off the CPU the tensor is written
    by one fill kernel per run of equal values instead of copied from host memory: no host
    synchronisation, and a CUDA graph that captures the fills replays the same values."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    out = torch.empty(len(values), dtype=dtype, device=device)
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or values[end] != values[start]:
            out[start:end].fill_(values[start])
            start = end
    return out


def check_feature_shape(features, name: str = "features") -> torch.Tensor:
    """Check a (N, d) or (B, N, d) floating tensor with N, d >= 1 (no tensor data read)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {features.dtype}"
        )
    if features.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (N, d) or (B, N, d), got {tuple(features.shape)}")
    if features.ndim == 3 and features.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B = 0), shape {tuple(features.shape)}")
    if features.shape[-2] == 0:
        raise ValueError(f"{name} has no tokens (N = 0), shape {tuple(features.shape)}")
    if features.shape[-1] == 0:
        raise ValueError(f"{name} has no feature dimensions (d = 0), shape {tuple(features.shape)}")
    return features


def select_probe(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """What a checked selection reads, still on the device (no sync yet): each image's min, then each
    image's max (B values each, x's dtype; float64 when ``lengths`` is given), then the lengths.
    x: (B, N, d), padding already zeroed. On a GPU two ops without lengths (an allocation and one
    reduction kernel)."""
    from .kernel import image_extremes

    probe = image_extremes(x.detach()).view(-1)
    if lengths is None:
        return probe
    return torch.cat((probe.to(torch.float64), lengths.detach().to(device=x.device, dtype=torch.float64)))


def read_select_data(probe: torch.Tensor, x: torch.Tensor, lengths: Optional[torch.Tensor],
                     keep: Union[int, float], name: str = "features") -> SelectData:
    """Read :func:`select_probe`'s values in one device-to-host transfer (the one host sync) and
    check them: non-finite features or out-of-range lengths raise ValueError. x: the (B, N, d)
    features probed; lengths: the (B,) tensor probed, or None; ``keep`` is checked against it.
    The magnitude scale is taken per image, so an image of extreme magnitude changes no other
    image's arithmetic."""
    from .kernel import SAFE_MAGNITUDE, host_magnitude_scale

    B = x.shape[0]
    values = probe.tolist()
    lo, hi = values[:B], values[B : 2 * B]
    if not all(map(math.isfinite, values[: 2 * B])):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    amax = [max(-a, b) for a, b in zip(lo, hi)]
    scale = None
    if min(amax) < SAFE_MAGNITUDE[0] or max(amax) > SAFE_MAGNITUDE[1]:
        scale = [host_magnitude_scale(a, b, x.dtype) for a, b in zip(lo, hi)]
    if lengths is None:
        return SelectData(scale=scale, lengths=None)
    lens = [int(v) for v in values[2 * B :]]
    check_length_values(lens, x.shape[-2], keep)
    return SelectData(scale=scale, lengths=lens)


def check_length_values(lens: List[int], n: int, keep: Union[int, float]) -> None:
    """Every length in [1, N], and an int ``keep`` not above any length."""
    if any(v < 1 or v > n for v in lens):
        raise ValueError(f"every length must be in [1, N={n}], got {lens}")
    for b, v in enumerate(lens):
        if isinstance(keep, Integral) and not isinstance(keep, bool) and keep > v:
            raise ValueError(f"keep={keep} exceeds the length of row {b} ({v} tokens)")


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, Real):
        raise TypeError(f"gamma must be a positive float, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0.0:
        raise ValueError(f"gamma must be a positive finite float, got {gamma}")
    return gamma


def check_gamma_range(gamma: float, x: torch.Tensor, normalize: str) -> None:
    """Raise ValueError when gamma * S S^T could overflow the accumulation dtype for (..., N, d) x.

    S is positive semi-definite with trace d (unit feature columns, diagonal <= d) or N (unit
    tokens, diagonal 1), and (S S^T)_ii <= trace(S) * S_ii, so the kernel's entries and every
    partial sum stay below gamma * d^2 ("feature") or gamma * N ("token"); a margin of 2^10 covers
    the residual arithmetic.
    """
    from .kernel import accumulation_dtype

    n, d = x.shape[-2], x.shape[-1]
    bound, what = (float(d) ** 2, f"d^2 (d = {d})") if normalize == "feature" else (float(n), f"N (N = {n})")
    dtype = accumulation_dtype(x.dtype)
    limit = torch.finfo(dtype).max / 2.0**10
    if gamma * bound > limit:
        raise ValueError(
            f"gamma = {gamma:g} is too large for {dtype} arithmetic: gamma * {what} must stay below "
            f"{limit:.3g} ({normalize!r} normalisation)"
        )


def check_normalize(normalize) -> str:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    return normalize


def check_compat(compat) -> Optional[str]:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'official', got {compat!r}")
    return compat


def check_backend(backend, compat: Optional[str]) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if compat == "official" and backend not in ("auto", "torch"):
        raise ValueError(f"compat='official' runs the release's own loop; backend {backend!r} cannot run it")
    return backend


def check_lengths(lengths, x: torch.Tensor, batched: bool, keep) -> Tuple[Optional[torch.Tensor], Optional[List[int]]]:
    """Static check of ``lengths`` against (B, N, d) ``x``: (tensor as given, None), (None, list),
    or (None, None) when absent or every length equals N. A tensor's values are checked later
    (:func:`read_select_data`), a sequence's here."""
    if lengths is None:
        return None, None
    if not batched:
        raise ValueError("lengths is only accepted with batched (B, N, d) features")
    B, N = x.shape[0], x.shape[1]
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.ndim != 1 or lengths.shape[0] != B:
            raise ValueError(f"lengths must have shape ({B},) to match the batch, got {tuple(lengths.shape)}")
        return lengths, None
    ordered = not isinstance(lengths, (set, frozenset, dict)) and hasattr(lengths, "__getitem__")
    try:
        values = list(lengths) if ordered else None
    except TypeError as err:
        raise TypeError(f"lengths must be a sequence or tensor of ints: {err}") from None
    if values is None:
        raise TypeError(f"lengths must be an ordered sequence (list, tuple) or tensor of ints, got {type(lengths).__name__}")
    for v in values:
        if isinstance(v, (bool, str)) or not hasattr(type(v), "__index__"):
            raise TypeError(f"lengths must hold integers, got {type(v).__name__}")
    values = [operator.index(v) for v in values]
    if len(values) != B:
        raise ValueError(f"lengths must have shape ({B},) to match the batch, got ({len(values)},)")
    check_length_values(values, N, keep)
    return None, (None if all(v == N for v in values) else values)


def check_select_args(features, keep, gamma, normalize, lengths, compat, backend="auto", check=True) -> SelectArgs:
    """Check every argument of :func:`otprune.select` that needs no tensor data (no host sync)."""
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {type(check).__name__}")
    x = check_feature_shape(features)
    check_gamma(gamma)
    check_normalize(normalize)
    check_compat(compat)
    check_backend(backend, compat)
    batched = x.ndim == 3
    x3 = x if batched else x.unsqueeze(0)
    budget(keep, x3.shape[1])
    check_gamma_range(float(gamma), x3, normalize)
    lens, lens_list = check_lengths(lengths, x3, batched, keep)
    k_max = output_width(keep, x3.shape[1], lens_list)
    return SelectArgs(x=x3, batched=batched, lengths=lens, lengths_list=lens_list, k_max=k_max)
