"""Argument checking for the public API.

Every public entry point funnels its arguments through :func:`check_select_args`, so a bad
argument is reported once, the same way, naming the argument and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORMALIZE_MODES = ("feature", "token")
COMPAT_MODES = (None, "official")


@dataclass(frozen=True)
class SelectArgs:
    """Checked arguments of one selection call.

    x:        (B, N, d) features (a view of the input; a 2-D input gets B = 1).
    batched:  whether the input was (B, N, d).
    lengths:  (B,) int64 valid lengths on x's device, or None when every row has N tokens.
    ks:       per-row budgets k_b (Python ints, 1 <= k_b <= length_b).
    k_max:    max(ks); the output width.
    """

    x: torch.Tensor
    batched: bool
    lengths: Optional[torch.Tensor]
    ks: tuple
    k_max: int


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


def check_features(features, name: str = "features") -> torch.Tensor:
    """Check a (N, d) or (B, N, d) floating tensor with N, d >= 1 and finite values."""
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
    if not math.isfinite(max_magnitude(features)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return features


def max_magnitude(x: torch.Tensor) -> float:
    """max |x| (NaN or inf when x holds any); one fused reduction, one host sync."""
    lo, hi = torch.aminmax(x)
    return max(abs(float(lo)), abs(float(hi)))


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, Real):
        raise TypeError(f"gamma must be a positive float, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0.0:
        raise ValueError(f"gamma must be a positive finite float, got {gamma}")
    return gamma


def check_normalize(normalize) -> str:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    return normalize


def check_compat(compat) -> Optional[str]:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or 'official', got {compat!r}")
    return compat


def check_lengths(lengths, x: torch.Tensor, batched: bool) -> Optional[torch.Tensor]:
    """Check ``lengths`` against the (B, N, d) tensor ``x``; returns int64 on x's device or None."""
    if lengths is None:
        return None
    if not batched:
        raise ValueError("lengths is only accepted with batched (B, N, d) features")
    B, N = x.shape[0], x.shape[1]
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        values = lengths.detach().to("cpu", torch.int64)
    else:
        try:
            values = torch.as_tensor(list(lengths))
        except (TypeError, ValueError) as err:
            raise TypeError(f"lengths must be a sequence or tensor of ints: {err}") from None
        if values.dtype != torch.int64:
            raise TypeError(f"lengths must hold integers, got {values.dtype}")
    if values.ndim != 1 or values.shape[0] != B:
        raise ValueError(f"lengths must have shape ({B},) to match the batch, got {tuple(values.shape)}")
    if bool((values < 1).any()) or bool((values > N).any()):
        raise ValueError(f"every length must be in [1, N={N}], got {values.tolist()}")
    return values.to(x.device)


def check_select_args(features, keep, gamma, normalize, lengths, compat) -> SelectArgs:
    """Check every argument of :func:`otprune.select`; returns the normalised :class:`SelectArgs`."""
    x = check_features(features)
    check_gamma(gamma)
    check_normalize(normalize)
    check_compat(compat)
    batched = x.ndim == 3
    x3 = x if batched else x.unsqueeze(0)
    lens = check_lengths(lengths, x3, batched)
    if lens is None:
        ks = (budget(keep, x3.shape[1]),) * x3.shape[0]
    else:
        ks = tuple(budget(keep, int(n)) for n in lens.tolist())
    if lens is not None and bool((lens == x3.shape[1]).all()):
        lens = None
    return SelectArgs(x=x3, batched=batched, lengths=lens, ks=ks, k_max=max(ks))
