"""otprune: fast, faithful OTPrune visual-token selection for multimodal LLMs.

Data flow: features -> (normalise, similarity, kernel rows) -> greedy -> indices -> model.
"""

from .api import prune, select
from .kernel import kernel_matrix, objective

__version__ = "0.1.0"

__all__ = ["select", "prune", "kernel_matrix", "objective", "apply", "revert", "__version__"]


def apply(model, keep=0.098, **select_kwargs):
    """Patch a loaded LLaVA-family model instance to prune its visual tokens (see integrations)."""
    from .integrations import apply as _apply

    return _apply(model, keep=keep, **select_kwargs)


def revert(model):
    """Undo :func:`apply` on ``model``, restoring its original behaviour exactly."""
    from .integrations import revert as _revert

    return _revert(model)
