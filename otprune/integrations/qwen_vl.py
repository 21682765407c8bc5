"""transformers ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` (Qwen3-VL with a
mixture-of-experts language model: the same vision side and positions, handled alike).

:func:`apply` replaces the instance's ``generate`` and ``forward`` (never the class's); calls
without ``pixel_values`` / ``pixel_values_videos`` pass through untouched. The visual tokens are
the vision tower's merged tokens (2 x 2 patches each): image j has N_j = t*h*w / 4 of them (from
``image_grid_thw``) and keeps k_j = round(r * N_j). A video is one item selected over all its
tokens (every frame together), like an image. All images and videos of a batch are scored by
:func:`otprune.select` in one batched call (ragged through ``lengths``).

layer 0: the vision tower runs once; the dropped positions are removed from ``input_ids``,
``attention_mask``, ``labels``, ``mm_token_type_ids`` and the position ids, rows are re-padded on
the left, and the model runs with the kept features only (Qwen3-VL: its deepstack features are
pruned with the same indices). Positions follow convention (a): the model's own 3-D M-RoPE
positions are computed for the unpruned prompt and each kept token keeps its own, text keeps its
positions, and decoding continues after the unpruned prompt's last position (generate() extends
the given positions by one per step; ``rope_deltas`` are shifted so that a decoding step through
``forward`` with the cache continues likewise). The kept tokens are fed in ascending order in
every mode, compat="official" included: the release ran LLaVA only, where its ``list(set(...))``
order decided the kept tokens' positions; here they keep their own. ``generate`` returns the
caller's original ``input_ids`` followed by the new tokens; ``forward`` returns logits for the
pruned sequence.
Beam search and ``num_return_sequences`` > 1 are refused.

layer L > 0 (images only): decoder layers 0..L-1 see every token; the input of decoder layer L
scores the visual tokens and layers L.. run on the kept tokens with their original M-RoPE
positions, a rebuilt 4-D mask and a KV cache that holds only them. Needs the "eager" or "sdpa"
attention; on Qwen3-VL, L must be past the deepstack layers (they add features at the full
sequence's visual positions).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Dict, List, Optional

import torch

from ._instance import PatchState, restore
from ._instance import check_version as _check_version
from ._instance import is_transformers_instance
from ._sequence import (
    Packing,
    Plan,
    add_layer_hooks,
    check_attention,
    check_cache,
    check_counts,
    check_layer,
    check_layer_arg,
    check_settings,
    keep_mask,
    pad_id,
    restore_prompt,
    select_kept,
)

# Releases whose Qwen-VL models take 4-row position_ids in generate, return per-item tuples from
# get_image_features and compute positions in compute_3d_position_ids. Tested: 5.17.0 and 5.23.0.
SUPPORTED = ("5.17", "6.0")
TESTED = "5.17 and 5.23"
_ATTR = "_otprune_qwen"
_PATCHED = ("generate", "forward")
CLASSES = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)
# (pixel input, grid input, features method, token id attribute) per modality, in the model's order.
_MODALITIES = (
    ("pixel_values", "image_grid_thw", "get_image_features", "image_token_id"),
    ("pixel_values_videos", "video_grid_thw", "get_video_features", "video_token_id"),
)


# What the models' position code reads besides input_ids and attention_mask.
_POSITION_INPUTS = ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "second_per_grid_ts")


def _classes() -> tuple:
    import transformers

    return tuple(getattr(transformers, name) for name in CLASSES if hasattr(transformers, name))


def matches(model: Any) -> bool:
    """True for a transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL generation model (subclasses included)."""
    return is_transformers_instance(model, _classes)


def installed_version() -> str:
    """The installed transformers version string."""
    import transformers

    return transformers.__version__


def check_version(version: Optional[str] = None) -> None:
    """Raise RuntimeError unless transformers ``version`` (default: the installed one) is supported."""
    version = installed_version() if version is None else version
    _check_version(version, SUPPORTED, "Qwen2-VL / Qwen2.5-VL / Qwen3-VL", TESTED)


def apply(model: Any, keep: Any, layer: int, select_kwargs: dict) -> Any:
    """Patch ``model`` in place (see the module docstring); applying again replaces the settings."""
    check_version()
    check_layer_arg(layer)
    if layer > 0:
        _check_layer(model, layer)
    check_settings(keep, select_kwargs)
    revert(model)
    saved = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
    state = PatchState(keep, layer, dict(select_kwargs), saved)
    model.__dict__[_ATTR] = state
    model.__dict__["generate"] = _wrap(model, model.generate, generate=True)
    model.__dict__["forward"] = _wrap(model, model.forward, generate=False)
    if layer > 0:
        add_layer_hooks(state, _decoder_layers(model))
    return model


def revert(model: Any) -> Any:
    """Restore the instance attributes :func:`apply` replaced; a no-op on an unpatched model."""
    restore(model, _ATTR, _PATCHED)
    return model


# ---- layer 0 -----------------------------------------------------------------------------------


def encode(model: Any, kwargs: dict) -> Dict[str, Any]:
    """The vision tower's outputs per modality present in ``kwargs`` (``get_image_features`` /
    ``get_video_features`` output objects: ``pooler_output`` a tuple of (N_j, D) per item and,
    on Qwen3-VL, ``deepstack_features`` a list over levels of such tuples)."""
    out = {}
    for pixels, grid, method, _ in _MODALITIES:
        if kwargs.get(pixels) is not None:
            out[method] = getattr(model.model, method)(kwargs[pixels], kwargs.get(grid), return_dict=True)
    return out


def _pruned_output(output: Any, kept: List[torch.Tensor]) -> Any:
    """A copy of a vision output with every item's sequence cut to its kept rows (deepstack levels too)."""
    new = type(output)(**{k: v for k, v in output.items()})

    def cut(feats):
        return tuple(f[k.to(f.device)] for f, k in zip(feats, kept))

    def cut_level(level):  # per-item tuple (5.18+) or one (sum N_j, D) tensor (5.17)
        if isinstance(level, torch.Tensor):
            return torch.cat(cut(torch.split(level, sizes)))
        return cut(level)

    sizes = [int(f.shape[0]) for f in output.pooler_output]
    new.pooler_output = cut(output.pooler_output)
    if getattr(output, "deepstack_features", None) is not None:
        new.deepstack_features = [cut_level(level) for level in output.deepstack_features]
    return new


@contextlib.contextmanager
def _encoded_as(model: Any, outputs: Dict[str, Any]):
    """Make the inner model's ``get_image_features`` / ``get_video_features`` return ``outputs``."""
    inner = model.model
    saved = {name: inner.__dict__[name] for name in outputs if name in inner.__dict__}
    for name, out in outputs.items():
        # Same signature as the method: generate() (5.2x) reads it to pick the encoder's inputs.
        inner.__dict__[name] = functools.wraps(getattr(inner, name))(lambda *args, _out=out, **kwargs: _out)
    try:
        yield
    finally:
        for name in outputs:
            inner.__dict__.pop(name, None)
        inner.__dict__.update(saved)


def _position_ids(model: Any, kwargs: dict, mask: Optional[torch.Tensor], generate: bool) -> torch.Tensor:
    """The position ids the unpatched model gives the language model for this prompt:
    generate (4, B, T) (text row, then t / h / w); forward (3, B, T), Qwen3-VL (4, B, T)."""
    ids = kwargs["input_ids"]
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    if generate:
        extra = {k: kwargs[k] for k in _POSITION_INPUTS if kwargs.get(k) is not None}
        return model._prepare_position_ids_for_generation(ids, dict(extra, attention_mask=mask))
    fn = model.model.compute_3d_position_ids
    names = inspect.signature(fn).parameters
    args = dict(kwargs, inputs_embeds=None, attention_mask=mask, past_key_values=None)
    pos = fn(**{k: args.get(k) for k in names})
    if pos is None:  # what the language model builds itself then
        rows = 4 if "Qwen3" in type(model.model.language_model).__name__ else 3
        pos = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(rows, ids.shape[0], -1)
    return pos


def prune_call(model: Any, state: PatchState, kwargs: dict, generate: bool) -> Dict[str, Any]:
    """Select the kept visual tokens and rewrite the call's keyword arguments for the pruned
    sequence (in place); returns the vision outputs to hand to the model (see :func:`_encoded_as`)."""
    ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    full_mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        outputs = encode(model, kwargs)
        feats = [f for out in outputs.values() for f in out.pooler_output]
        kept = select_kept(feats, state.keep, state.select_kwargs, release_order=False)  # see module doc
    keep = torch.ones_like(ids, dtype=torch.bool)
    pruned, j = {}, 0
    for _, _, method, token in _MODALITIES:
        if method in outputs:
            n = len(outputs[method].pooler_output)
            n_tokens = [int(f.shape[0]) for f in outputs[method].pooler_output]
            is_mod = ids == getattr(model.config, token)
            check_counts(is_mod, n_tokens, "Image" if token == "image_token_id" else "Video")
            keep &= keep_mask(is_mod, n_tokens, kept[j:j + n])
            pruned[method] = _pruned_output(outputs[method], kept[j:j + n])
            j += n
    given = kwargs.get("position_ids") is not None
    pos = _position_ids(model, kwargs, full_mask, generate)
    pack = Packing.of(keep)
    kwargs["input_ids"] = pack.apply(ids, pad_id(model))
    new_mask = pack.apply(full_mask, 0)
    kwargs["attention_mask"] = None if mask is None and bool(new_mask.all()) else new_mask
    kwargs["position_ids"] = pack.apply(pos, 0)
    for name, fill in (("labels", -100), ("mm_token_type_ids", 0)):
        if kwargs.get(name) is not None:
            kwargs[name] = pack.apply(kwargs[name], fill)
    # rope_deltas (just set for this prompt unless positions were given) turn a cache length into the
    # next position: shift them by what the batch lost, so a decoding step continues as unpruned.
    deltas = getattr(model.model, "rope_deltas", None)
    if not given and deltas is not None and deltas.shape[0] == ids.shape[0]:
        model.model.rope_deltas = deltas + (ids.shape[1] - pack.length)
    return pruned


def _check_call(model: Any, kwargs: dict, generate: bool) -> None:
    if kwargs.get("input_ids") is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("otprune: a pruned call with pixel values needs input_ids (and no inputs_embeds)")
    if kwargs.get("past_key_values") is not None:
        raise ValueError("otprune: past_key_values cannot be given with pixel values; the prompt is pruned at prefill")
    if generate:
        check_cache(model, kwargs)
        cfg = kwargs.get("generation_config") or model.generation_config
        for name in ("num_beams", "num_return_sequences"):
            if (kwargs.get(name) or getattr(cfg, name, 1) or 1) > 1:
                raise NotImplementedError(f"otprune: {name} > 1 is not supported with Qwen-VL pruning")


def _wrap(model: Any, orig, generate: bool):
    @functools.wraps(orig)
    def call(*args: Any, **kwargs: Any):
        if args:  # bind positionals by the original signature (input_ids first)
            kwargs.update(inspect.signature(orig).bind_partial(*args).arguments)
        if generate and "inputs" in kwargs:
            kwargs.setdefault("input_ids", kwargs.pop("inputs"))
        state = model.__dict__[_ATTR]
        # depth > 0: generate's own forward calls, already pruned.
        if state.depth > 0 or all(kwargs.get(pixels) is None for pixels, _, _, _ in _MODALITIES):
            return orig(**kwargs)
        _check_call(model, kwargs, generate)
        state.depth += 1
        try:
            if state.layer > 0:
                return _call_full(model, state, orig, kwargs)
            prompt = kwargs["input_ids"]
            outputs = prune_call(model, state, kwargs, generate)
            with _encoded_as(model, outputs):
                out = orig(**kwargs)
        finally:
            state.depth -= 1
        return restore_prompt(out, prompt, kwargs["input_ids"].shape[1]) if generate else out

    return call


# ---- layer > 0: pruning inside the language model ------------------------------------------------


def _decoder_layers(model: Any):
    return model.model.language_model.layers


def _check_layer(model: Any, layer: int) -> None:
    check_layer(_decoder_layers(model), layer)
    text = model.config.get_text_config()
    check_attention(getattr(text, "_attn_implementation", None))
    deep = getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ()
    if layer < len(deep):
        raise NotImplementedError(
            f"otprune: layer {layer} is inside Qwen3-VL's deepstack layers (0..{len(deep) - 1}), which add features "
            f"at the unpruned visual positions; use layer 0 or layer >= {len(deep)}"
        )


def _call_full(model: Any, state: PatchState, orig, kwargs: dict):
    """Run the unpruned call with a plan the decoder-layer hooks fill at layer L."""
    if kwargs.get("pixel_values_videos") is not None:
        raise NotImplementedError("otprune: layer > 0 prunes images only; use layer 0 for videos")
    if kwargs.get("labels") is not None:
        raise ValueError("otprune: labels are not supported with layer > 0 (the sequence shrinks inside the model)")
    ids = kwargs["input_ids"]
    with torch.no_grad():
        out = encode(model, kwargs)["get_image_features"]
    n_tokens = [int(f.shape[0]) for f in out.pooler_output]
    is_image = ids == model.config.image_token_id
    check_counts(is_image, n_tokens)
    mask = kwargs.get("attention_mask")
    state.plan = Plan(is_image, n_tokens, torch.ones_like(ids) if mask is None else mask)
    try:
        with _encoded_as(model, {"get_image_features": out}):
            return orig(**kwargs)
    finally:
        state.plan = None
