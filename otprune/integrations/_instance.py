"""Instance patching shared by the model integrations: what apply() replaced, and undoing it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional


@dataclass
class PatchState:
    """Settings of a patched instance, stored on it by either integration's apply()."""

    keep: Any
    layer: int
    select_kwargs: dict
    saved: dict  # name -> the instance attribute it replaced (absent: the class method was used)
    hooks: list = field(default_factory=list)  # decoder-layer pre-hook handles (layer > 0)
    plan: Optional[Any] = None  # _sequence.Plan of the running call (layer > 0)
    depth: int = 0  # nesting of generate / forward calls (layer > 0, original codebase)


def restore(model: Any, attr: str, names: Iterable[str]) -> None:
    """Undo an integration's apply(): pop its state from ``model.__dict__[attr]``, remove its hooks
    and restore the instance attributes ``names`` (saved ones put back, the others deleted so the
    class's methods show again). A no-op on an unpatched model."""
    state = model.__dict__.pop(attr, None)
    if state is None:
        return
    for handle in state.hooks:
        handle.remove()
    for name in names:
        model.__dict__.pop(name, None)
        if name in state.saved:
            model.__dict__[name] = state.saved[name]


def check_version(version: str, supported: tuple, what: str, tested: str) -> None:
    """Raise RuntimeError unless transformers ``version`` lies in ``supported`` = (lo, hi), lo
    included and hi excluded; ``what`` names the family, ``tested`` the releases tested."""
    from packaging.version import Version

    lo, hi = supported
    if not (Version(lo) <= Version(version) < Version(hi)):
        raise RuntimeError(
            f"otprune: transformers {version} is not supported for {what} pruning; "
            f"supported: >= {lo}, < {hi} (tested {tested})"
        )


def is_transformers_instance(model: Any, classes: Callable[[], tuple]) -> bool:
    """True when ``model`` is an instance of the transformers classes ``classes()`` returns;
    False without importing transformers when it is not loaded (no such model can exist then)."""
    if "transformers" not in sys.modules:
        return False
    try:
        return isinstance(model, classes())
    except ImportError:
        return False
