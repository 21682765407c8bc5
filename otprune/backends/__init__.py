"""Backend registry and dispatch.

Every backend implements the same two stages (docs/design.md, Backends):
  similarity(x, normalize, valid) -> S     x: (B, N, d) float; S: (B, N, N) float32/float64
  greedy(s, ks, gamma, valid)     -> picks (B, max(ks)) int64, greedy order, -1 past k_b
plus ``usable(device) -> (bool, reason)``. Adding a backend means adding one module here and one
entry in ``_FACTORIES``.

``auto`` (:func:`resolve`): for CPU tensors ``cpu`` > ``torch`` (measured: the C++ greedy is faster
at every configuration of bench/results/select.md). For CUDA tensors the usable backends are
ranked by :mod:`otprune.cost_model` for the call's (B, N, d, k, dtype) on the device, fastest first,
so that auto never prefers a backend the model rates slower than another usable one. A measured
table replaces the model's ranking: point the environment variable ``OTPRUNE_MEASURED`` at the
select CSV of a GPU run (``python -m bench select``); a shape that every candidate backend has a row
for on this device (same name, B, N, d, k, dtype) is ranked by the measured p50 instead. Rankings
are cached per process: set the variable before the first selection.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
# CPU: measured order. CUDA: the candidates; their order comes from the cost model per shape.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# The shape auto ranks CUDA backends for when the caller gives none: (B, N, d, k, dtype) of one
# LLaVA-1.5 image at keep 0.098.
DEFAULT_SHAPE = (1, 576, 4096, 56, torch.float16)

# name -> module path holding a ``BACKEND`` object implementing the interface above.
_FACTORIES: Dict[str, str] = {
    "torch": "otprune.backends.torch_backend",
    "cpu": "otprune.backends.cpu_ext",
    "cuda": "otprune.backends.cuda_ext",
    "triton": "otprune.backends.triton_backend",
}


@dataclass
class Backend:
    """One implementation of the two stages.

    name:       registry name.
    devices:    device types it runs on ("cpu", "cuda").
    similarity: stage 1, see module docstring.
    greedy:     stage 2, see module docstring.
    probe:      () -> (usable, reason): whether its compiled parts load here.
    """

    name: str
    devices: Tuple[str, ...]
    similarity: Callable[..., torch.Tensor]
    greedy: Callable[..., torch.Tensor]
    probe: Callable[[], Tuple[bool, str]] = lambda: (True, "")


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend asked for by name cannot run here (not built, no GPU, wrong device)."""


_loaded: Dict[str, Optional[Backend]] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def get_backend(name: str) -> Optional[Backend]:
    """The backend object for ``name``, or None when its module cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_FACTORIES[name]).BACKEND
        except Exception as err:  # a missing optional dependency or extension
            _loaded[name] = None
            _load_errors[name] = f"{type(err).__name__}: {err}"
    return _loaded[name]


def usable(name: str, device_type: str) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type`` here, and why not if it cannot."""
    if name not in _FACTORIES:
        return False, f"unknown backend {name!r}"
    be = get_backend(name)
    if be is None:
        return False, _load_errors.get(name, "failed to load")
    if device_type not in be.devices:
        return False, f"runs on {'/'.join(be.devices)} tensors only, not {device_type}"
    ok, why = be.probe()
    if ok and device_type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return ok, why


def auto_order(device: torch.device, shape: Optional[Tuple[int, int, int, int, torch.dtype]] = None) -> Tuple[str, ...]:
    """Backends ``auto`` tries for ``device``, preferred first (module docstring).

    shape: (B, N, d, k_max, dtype) of the call; None ranks for :data:`DEFAULT_SHAPE`.
    """
    if device.type != "cuda":
        return AUTO_ORDER.get(device.type, ("torch",))
    B, N, d, k, dtype = shape or DEFAULT_SHAPE
    return _ranked(_device_name(device), B, N, d, k, str(dtype).replace("torch.", ""))


@lru_cache(maxsize=1024)
def _ranked(device_name: str, B: int, N: int, d: int, k: int, dtype: str) -> Tuple[str, ...]:
    from .. import cost_model

    return tuple(cost_model.rank(list(AUTO_ORDER["cuda"]), cost_model.Shape(B, N, d, k, dtype), device_name))


@lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    """The CUDA device's name ("" when it cannot be read: the model then uses its default GPU)."""
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # no driver (tests rank CUDA backends on CPU machines)
        return ""


def resolve(backend: str, device: torch.device,
            shape: Optional[Tuple[int, int, int, int, torch.dtype]] = None) -> Backend:
    """Pick the backend for ``device``: by name (error if unusable) or, for "auto", the first usable
    one of :func:`auto_order` (``shape`` = the call's (B, N, d, k_max, dtype), see there)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    dev = device.type
    if backend != "auto":
        ok, why = usable(backend, dev)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is not usable for {dev} tensors here: {why}")
        return get_backend(backend)
    for name in auto_order(device, shape):
        ok, why = usable(name, dev)
        if ok:
            return get_backend(name)
        if name != "torch" and name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"otprune: backend {name!r} unavailable ({why}); falling back to the next one",
                RuntimeWarning,
                stacklevel=4,
            )
    raise RuntimeError(f"no otprune backend is usable for {dev} tensors")


def report() -> List[Tuple[str, str, bool, str]]:
    """(backend, device type, usable, reason) for every backend and device type it targets."""
    rows = []
    for name in BACKEND_NAMES:
        for dev in ("cpu", "cuda"):
            ok, why = usable(name, dev)
            be = get_backend(name)
            if be is not None and dev not in be.devices:
                continue
            rows.append((name, dev, ok, why))
    return rows
