"""The environment-variable route: prune in an unchanged LLaVA program (e.g. lmms-eval).

Installing otprune puts ``otprune_autopatch.pth`` in site-packages. At interpreter start it
checks two variables and, if either is set, arms an import hook (``_otprune_autopatch``). When
LLaVA's ``llava.model.llava_arch`` is imported, :func:`patch_llava` makes every LLaVA model class
(``LlavaLlamaForCausalLM``, ...) call ``otprune.apply(model, ...)`` with the settings below on each
instance it constructs (``from_pretrained`` included); when transformers' LLaVA / LLaVA-NeXT
modelling module is imported, :func:`patch_hf` does the same for ``LlavaForConditionalGeneration``
and ``LlavaNextForConditionalGeneration`` (and subclasses that do not define their own
``__init__``); likewise for transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) generation classes
(e.g. lmms-eval's Qwen wrappers). With neither variable set nothing is imported or patched.

The public release's variables:
  BASELINE=OURS        turns the route on (other values: off)
  SUBSET_RATIO=r       kept fraction of each image's visual tokens (required with BASELINE=OURS)
  LAYER_INDEX=L        0: prune before the language model (default); L > 0: after decoder layer L
otprune's own (they win over the release's; OTPRUNE_KEEP alone also turns the route on):
  OTPRUNE_KEEP         a ratio ("0.098", "1.0") or, written without a point, tokens per image ("56")
  OTPRUNE_LAYER        as LAYER_INDEX
  OTPRUNE_BACKEND      "auto" (default), "cuda", "triton", "cpu" or "torch"
  OTPRUNE_COMPAT       "official": the release's selection numerics; unset or "none": exact
                       (either way the kept tokens reach the model in their original order)
  OTPRUNE_GAMMA        kernel weight gamma (default 0.01)
  OTPRUNE_NORMALIZE    "feature" (default) or "token"
Bad values raise ValueError naming the variable when a model is constructed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

_HOOK = "_otprune_autopatch_init_subclass"  # set on LlavaMetaForCausalLM while patched


@dataclass(frozen=True)
class Settings:
    """What ``otprune.apply`` gets: keep, layer and the select keywords."""

    keep: Union[int, float]
    layer: int = 0
    select_kwargs: dict = field(default_factory=dict)


def _number(name: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a valid {kind.__name__}") from None


def settings_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Settings]:
    """The settings the environment asks for, or None when the route is off."""
    env = os.environ if environ is None else environ
    keep_text = env.get("OTPRUNE_KEEP")
    if keep_text:
        keep = _number("OTPRUNE_KEEP", keep_text, float if "." in keep_text or "e" in keep_text.lower() else int)
    elif env.get("BASELINE") == "OURS":
        if not env.get("SUBSET_RATIO"):
            raise ValueError("BASELINE=OURS needs SUBSET_RATIO (the kept fraction, e.g. 0.098) or OTPRUNE_KEEP")
        keep = _number("SUBSET_RATIO", env["SUBSET_RATIO"], float)
    else:
        return None
    layer_name = "OTPRUNE_LAYER" if env.get("OTPRUNE_LAYER") else "LAYER_INDEX"
    layer = _number(layer_name, env.get(layer_name) or "0", int)
    kwargs: dict = {}
    if env.get("OTPRUNE_BACKEND"):
        kwargs["backend"] = env["OTPRUNE_BACKEND"]
    compat = env.get("OTPRUNE_COMPAT", "")
    if compat not in ("", "none", "official"):
        raise ValueError(f"OTPRUNE_COMPAT={compat!r}: expected 'official' or 'none'")
    if compat == "official":
        kwargs["compat"] = "official"
    if env.get("OTPRUNE_GAMMA"):
        kwargs["gamma"] = _number("OTPRUNE_GAMMA", env["OTPRUNE_GAMMA"], float)
    if env.get("OTPRUNE_NORMALIZE"):
        kwargs["normalize"] = env["OTPRUNE_NORMALIZE"]
    return Settings(keep, layer, kwargs)


HF_CLASSES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)


def patch_module(module: Any) -> None:
    """Patch the model classes of a freshly imported target module (see ``_otprune_autopatch``)."""
    if module.__name__.startswith("transformers."):
        patch_hf(module)
    else:
        patch_llava(module)


def patch_hf(module: Any) -> None:
    """Make transformers' LLaVA / LLaVA-NeXT / Qwen-VL generation classes in ``module`` apply the
    environment's settings at construction (idempotent)."""
    for name in HF_CLASSES:
        if hasattr(module, name):
            _wrap_init(getattr(module, name))


def unpatch_hf(module: Any) -> None:
    """Undo :func:`patch_hf` (instances already patched stay patched)."""
    for name in HF_CLASSES:
        if hasattr(module, name):
            _unwrap_init(getattr(module, name))


def patch_llava(arch: Any) -> None:
    """Make every LLaVA model class apply the environment's settings at construction (idempotent).

    arch: the ``llava.model.llava_arch`` module. The ``__init__`` of each ``LlavaMetaForCausalLM``
    subclass, existing or defined later (``llava_llama``, ``llava_mistral``, ...), is wrapped: once
    the most-derived ``__init__`` has run, ``otprune.apply(model, ...)`` patches the new instance
    (``otprune.revert`` undoes it as usual). A bad variable raises ValueError there.
    """
    base = arch.LlavaMetaForCausalLM
    if _HOOK in base.__dict__:
        return
    saved = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super(base, cls).__init_subclass__(**kwargs)
        _wrap_init(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)
    setattr(base, _HOOK, saved)
    for cls in _subclasses(base):
        _wrap_init(cls)


def unpatch_llava(arch: Any) -> None:
    """Undo :func:`patch_llava` on the classes (instances already patched stay patched)."""
    base = arch.LlavaMetaForCausalLM
    if _HOOK not in base.__dict__:
        return
    saved = base.__dict__[_HOOK]
    delattr(base, _HOOK)
    if saved is None:
        del base.__init_subclass__
    else:
        base.__init_subclass__ = saved
    for cls in _subclasses(base):
        _unwrap_init(cls)


def _unwrap_init(cls: type) -> None:
    init = cls.__dict__.get("__init__")
    if getattr(init, "__otprune_cls__", None) is cls:
        if init.__otprune_own__ is None:
            del cls.__init__
        else:
            cls.__init__ = init.__otprune_own__


def _subclasses(base: type) -> list:
    out, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in out:
            out.append(cls)
            todo.extend(cls.__subclasses__())
    return out


def _wrap_init(cls: type) -> None:
    original = cls.__init__
    if getattr(original, "__otprune_cls__", None) is cls:
        return

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # Only the outermost __init__ applies, once the instance is complete: the class's own, or
        # an inherited one of a subclass that defines none.
        if type(self).__init__ is __init__:
            settings = settings_from_env()
            if settings is not None:
                from . import apply

                apply(self, keep=settings.keep, layer=settings.layer, **settings.select_kwargs)

    __init__.__otprune_cls__ = cls
    __init__.__otprune_own__ = cls.__dict__.get("__init__")  # None: it was inherited
    cls.__init__ = __init__
