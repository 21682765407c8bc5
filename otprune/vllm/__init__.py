"""OTPrune inside vLLM: a ``vllm.general_plugins`` entry point for LLaVA-1.5, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL and Qwen3-VL (dense and MoE).

Installed with otprune, the plugin is loaded by vLLM in every one of its processes (API server,
engine core, workers) and calls :func:`register`. It does nothing unless the process's environment
asks for pruning, with the variables of the environment-variable route (see
:mod:`otprune.autopatch`): ``OTPRUNE_KEEP=r`` or the release's ``BASELINE=OURS SUBSET_RATIO=r``,
plus ``OTPRUNE_COMPAT``, ``OTPRUNE_GAMMA``, ``OTPRUNE_NORMALIZE``, ``OTPRUNE_BACKEND``. Then it
replaces vLLM's ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration`` by
subclasses (:mod:`otprune.vllm.models`) whose processor emits k = round(r * N) placeholders per
image (N: the image's visual tokens, LLaVA-NeXT's packed anyres sequence with its newline tokens
included) and whose encoder returns the k embeddings OTPrune keeps, in ascending order (the
release's order with ``OTPRUNE_COMPAT=official``); and ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` /
``Qwen3VLMoeForConditionalGeneration`` likewise per image and per video (:mod:`otprune.vllm.qwen_vl`), the kept tokens keeping their own M-RoPE positions. Only pruning before the language model (layer 0) exists here;
``OTPRUNE_LAYER`` / ``LAYER_INDEX`` > 0 is refused.

Python users who build the engine in code call :func:`enable` before constructing ``vllm.LLM``.
Importing this module never imports vLLM.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional, Union

from ..autopatch import Settings, settings_from_env

ARCHS = {
    "LlavaForConditionalGeneration": "otprune.vllm.models:OTPruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "otprune.vllm.models:OTPruneLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "otprune.vllm.qwen_vl:OTPruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "otprune.vllm.qwen_vl:OTPruneQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "otprune.vllm.qwen_vl:OTPruneQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "otprune.vllm.qwen_vl:OTPruneQwen3VLMoeForConditionalGeneration",
}
# What enable() writes; disable() removes them again.
_ENV = ("OTPRUNE_KEEP", "OTPRUNE_COMPAT", "OTPRUNE_GAMMA", "OTPRUNE_NORMALIZE", "OTPRUNE_BACKEND")
_saved: Dict[str, object] = {}  # architecture -> vLLM's own registry entry, while ours is registered


def settings(environ=None) -> Optional[Settings]:
    """The pruning settings the environment asks for (None: off), checked for vLLM.

    Raises ValueError naming the problem for a bad value, a layer other than 0, or select
    keywords :func:`otprune.select` rejects.
    """
    try:
        s = settings_from_env(environ)
        if s is None:
            return None
        if s.layer != 0:
            raise ValueError(
                f"layer {s.layer} (OTPRUNE_LAYER / LAYER_INDEX) is not supported: the vLLM plugin prunes "
                "before the language model only (layer 0)"
            )
        from ..integrations._sequence import check_settings

        check_settings(s.keep, s.select_kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"otprune vLLM plugin: bad pruning settings: {err}") from err
    return s


def register() -> None:
    """vLLM's plugin hook: swap in the pruning model classes when the environment enables pruning.

    A no-op (vLLM untouched) when the variables are unset; raises ValueError on bad settings, so
    the engine fails at start.
    """
    if settings() is None:
        return
    from vllm import ModelRegistry

    for arch, target in ARCHS.items():
        if arch not in _saved:
            _saved[arch] = ModelRegistry.models.get(arch)
        ModelRegistry.register_model(arch, target)
    _forget_resolved_archs()


def enable(
    keep: Union[int, float],
    *,
    compat: Optional[str] = None,
    gamma: Optional[float] = None,
    normalize: Optional[str] = None,
    backend: Optional[str] = None,
) -> Settings:
    """Turn pruning on for vLLM engines built afterwards in this process (and the processes they start).

    keep: ratio in (0, 1] (k = round(keep * N) per image) or an int count per image; compat, gamma,
    normalize, backend: as for :func:`otprune.select` (None: its default). The settings are written
    to this process's environment (``OTPRUNE_*``), which vLLM's engine and worker processes inherit,
    and the plugin is registered here. Returns the checked settings; raises ValueError on bad ones.
    """
    import vllm  # noqa: F401  (fails here, before the environment changes, when vLLM is absent)

    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"otprune.vllm.enable: keep must be an int or a float, got {keep!r}")
    values = {
        "OTPRUNE_KEEP": repr(float(keep)) if isinstance(keep, float) else str(keep),
        "OTPRUNE_COMPAT": compat,
        "OTPRUNE_GAMMA": None if gamma is None else repr(float(gamma)),
        "OTPRUNE_NORMALIZE": normalize,
        "OTPRUNE_BACKEND": backend,
    }
    env = dict(os.environ)
    for name, value in values.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    checked = settings(env)  # raises before anything changes
    assert checked is not None
    for name in _ENV:
        os.environ.pop(name, None)
        if name in env:
            os.environ[name] = env[name]
    register()
    return checked


def disable() -> None:
    """Undo :func:`enable`: remove its variables and restore vLLM's own model classes.

    The release's ``BASELINE`` / ``SUBSET_RATIO`` are left alone: unset them too if they are set.
    """
    for name in _ENV:
        os.environ.pop(name, None)
    if not _saved:
        return
    from vllm import ModelRegistry

    for arch, entry in _saved.items():
        if entry is None:
            ModelRegistry.models.pop(arch, None)
        else:
            ModelRegistry.models[arch] = entry
    _saved.clear()
    _forget_resolved_archs()


def _forget_resolved_archs() -> None:
    """vLLM memoises the class it resolved for a model path; drop that so a swap takes effect."""
    utils = sys.modules.get("vllm.model_executor.model_loader.utils")  # not imported yet: nothing memoised
    cache = getattr(utils, "_MODEL_ARCH_BY_HASH", None)
    if isinstance(cache, dict):
        cache.clear()
