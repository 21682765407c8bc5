"""Model integrations: patch a loaded model instance so that its visual tokens are pruned.

Each family module exposes ``matches(model) -> bool``, ``apply(model, keep, layer, select_kwargs)``
and ``revert(model)``; :func:`apply` dispatches to the first module whose ``matches`` is true.
"""

from __future__ import annotations

import importlib
from typing import Any, Union

# Family modules, tried in order. Each is imported lazily so that a missing optional
# dependency (transformers, the original ``llava`` package) only matters for its own family.
_FAMILIES = (
    "otprune.integrations.hf_llava",
    "otprune.integrations.qwen_vl",
    "otprune.integrations.llava_original",
)


def _family(model: Any):
    for path in _FAMILIES:
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if mod.matches(model):
            return mod
    raise TypeError(
        f"otprune.apply: unsupported model type {type(model).__module__}.{type(model).__name__}; "
        "supported: transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration, "
        "Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration / "
        "Qwen3VLMoeForConditionalGeneration "
        "and the original LLaVA codebase's LlavaLlamaForCausalLM"
    )


def apply(model: Any, keep: Union[int, float] = 0.098, layer: int = 0, **select_kwargs: Any) -> Any:
    """Patch ``model`` in place to keep ``keep`` visual tokens per image; returns ``model``.

    layer: 0 prunes the projected visual features before the language model; L > 0 prunes inside
    the language model after decoder layer L, scored by the layer-L hidden states.
    select_kwargs: passed to :func:`otprune.select` (gamma, normalize, compat, backend).
    Applying again replaces the previous settings; :func:`revert` undoes it.
    """
    return _family(model).apply(model, keep, layer, select_kwargs)


def revert(model: Any) -> Any:
    """Undo :func:`apply` on ``model`` (a no-op on an unpatched model); returns ``model``."""
    return _family(model).revert(model)
