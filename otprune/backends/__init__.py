"""Backend registry and dispatch.

Every backend implements the same two stages (DESIGN.md section 4):
  similarity(x, normalize, valid) -> S     x: (B, N, d) float; S: (B, N, N) float32/float64
  greedy(s, ks, gamma, valid)     -> picks (B, max(ks)) int64, greedy order, -1 past k_b
plus ``usable(device) -> (bool, reason)``. Adding a backend means adding one module here and one
entry in ``_FACTORIES``.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKEND_NAMES = ("cuda", "triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

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


def resolve(backend: str, device: torch.device) -> Backend:
    """Pick the backend for ``device``: by name (error if unusable) or the fastest usable one."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKEND_NAMES):
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    dev = device.type
    if backend != "auto":
        ok, why = usable(backend, dev)
        if not ok:
            raise BackendUnavailableError(f"backend {backend!r} is not usable for {dev} tensors here: {why}")
        return get_backend(backend)
    order = AUTO_ORDER.get(dev, ("torch",))
    for name in order:
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
