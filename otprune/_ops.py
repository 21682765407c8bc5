"""The selection as one ``torch.library`` custom op, ``otprune::select``.

:func:`run_select` is the whole data-dependent part of :func:`otprune.select` (features to sorted
indices); :func:`otprune.select` checks the arguments statically, then calls it directly in eager
mode and through the registered op under torch.compile, so the compiled graph holds one opaque
node and no graph break. The fake implementation gives the output shape from shapes alone
(:func:`otprune._validate.output_width`).

Host synchronisation: with ``check=True``, exactly one (:func:`otprune._validate.read_select_data`,
after the selection is issued); with ``check=False``, none, and every allocation's size follows
from shapes and ``keep`` alone (except with ``compat="official"``, whose loop syncs every step by
design). Off the CPU nothing is copied from host memory either (a pageable copy syncs; a pinned one
could be overwritten before a CUDA-graph replay re-reads it): Python lengths are written on the
device by fill kernels (:func:`otprune._validate.device_values`), and the backends get equal
budgets, every row cut to its own afterwards.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import backends
from ._validate import budget, device_budgets, device_values, output_width, read_select_data, select_probe
from .greedy import sort_picks
from .kernel import accumulation_dtype, apply_scale, image_extremes, magnitude_scale, valid_mask


def _keep(keep: float, keep_is_count: bool):
    return int(keep) if keep_is_count else keep


def rows_cut_after(device: torch.device) -> bool:
    """Whether rows of a ragged batch run to k_max and are cut to their budgets afterwards: off the
    CPU, where a backend given ragged budgets would copy them from host memory (a host sync, or a
    staging buffer that a CUDA-graph replay re-reads after it was reused). On the CPU the backends
    take ragged budgets, and the C++ greedy stops each row at its own."""
    return device.type != "cpu"


def run_select(x: torch.Tensor, keep: float, keep_is_count: bool, gamma: float, normalize: str,
               lengths: Optional[torch.Tensor], lengths_list: Optional[Sequence[int]], compat: str,
               backend: str, check: bool) -> torch.Tensor:
    """(B, output_width) int64 indices for statically checked (B, N, d) features ``x``.

    keep / keep_is_count: the count or ratio (a count travels as a float through the op schema).
    lengths: (B,) integer tensor (values unchecked so far) or None; lengths_list: checked Python
    lengths or None (at most one of the two). compat: "" or "official". check: read and check the
    data (one host sync) or not (no sync; see :func:`otprune.select`).

    With ``check`` the data is probed on the device first and read only after the selection has been
    issued (the one sync then also waits for the result): most inputs need no magnitude scale, and
    the rare one that does (an image outside SAFE_MAGNITUDE) is selected again with it.
    """
    keep = _keep(keep, keep_is_count)
    B, N = x.shape[0], x.shape[1]
    k_max = output_width(keep, N, lengths_list)
    if lengths is not None:  # values unread: clamped for the mask, checked by the read
        lens_dev = lengths.to(device=x.device, dtype=torch.int64).clamp(1, N)
    else:
        lens_dev = None if lengths_list is None else device_values(lengths_list, x.device)
    valid = valid_mask(lens_dev, B, N, x.device)
    if valid is not None:
        # Padding content never enters (a where, not a product: NaN padding would stay NaN).
        x = torch.where(valid.unsqueeze(-1), x, 0)
    if compat == "official":
        from .official import official_select

        lens = lengths_list
        if check or lengths is not None:  # the release's loop needs host lengths
            lens = read_select_data(select_probe(x, lengths), x, lengths, keep).lengths or lens
        ks = [k_max] * B if lens is None else [budget(keep, v) for v in lens]
        return _pad(official_select(x, ks, float(gamma), normalize, lens_dev), k_max)

    if lengths is not None:
        # A lengths tensor: every row runs to the width (known from shapes) and is cut to its budget
        # afterwards, the same calls with or without the read.
        ks, k_row = [k_max] * B, device_budgets(keep, lens_dev)
    elif lengths_list is not None and rows_cut_after(x.device):
        ks, k_row = [k_max] * B, device_values([budget(keep, v) for v in lengths_list], x.device)
    else:
        ks, k_row = ([k_max] * B if lengths_list is None else [budget(keep, v) for v in lengths_list]), None
    be = backends.resolve(backend, x.device, (B, N, x.shape[2], k_max, x.dtype))

    def selection(features: torch.Tensor) -> torch.Tensor:
        picks = be.greedy(be.similarity(features, normalize, valid), ks, float(gamma), valid)
        if k_row is not None:
            picks = torch.where(torch.arange(k_max, device=x.device) < k_row.unsqueeze(1), picks, -1)
        return _pad(sort_picks(picks, padded=valid is not None), k_max)

    if not check:
        if x.dtype == torch.float16:  # its squares can neither overflow nor underflow in float32
            return selection(x)
        dtype = accumulation_dtype(x.dtype)
        lo, hi = image_extremes(x).view(2, -1, 1, 1)
        return selection(x.to(dtype) * magnitude_scale(lo, hi).to(dtype))
    probe = select_probe(x, lengths)
    out = selection(x)
    scale = read_select_data(probe, x, lengths, keep).scale
    return out if scale is None else selection(apply_scale(x, scale))


def _pad(out: torch.Tensor, k_max: int) -> torch.Tensor:
    """(B, k) indices padded with -1 to (B, k_max)."""
    return F.pad(out, (0, k_max - out.shape[1]), value=-1) if out.shape[1] < k_max else out


@torch.library.custom_op("otprune::select", mutates_args=())
def select_op(x: torch.Tensor, keep: float, keep_is_count: bool, gamma: float, normalize: str,
              lengths: Optional[torch.Tensor], lengths_list: Optional[List[int]], compat: str, backend: str,
              check: bool) -> torch.Tensor:
    """Registered form of :func:`run_select` (same arguments)."""
    return run_select(x, keep, keep_is_count, gamma, normalize, lengths, lengths_list, compat, backend, check)


@select_op.register_fake
def _select_fake(x, keep, keep_is_count, gamma, normalize, lengths, lengths_list, compat, backend, check):
    width = output_width(_keep(keep, keep_is_count), x.shape[1], lengths_list)
    return x.new_empty((x.shape[0], width), dtype=torch.int64)
