"""transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.

:func:`apply` replaces the instance's ``generate`` and ``forward`` (never the class's); calls
without ``pixel_values`` pass through untouched. Each image's final visual-token sequence
(LLaVA-NeXT: after anyres packing, newline tokens included, as the public release does) is scored
by :func:`otprune.select` in one batched call over all images of the batch.

layer 0: before the language model runs, the dropped image-token positions are removed from
``input_ids`` / ``attention_mask`` / ``labels``, rows are re-padded on the left and the model runs
on ``inputs_embeds`` holding the text embeddings and only the kept visual features, so the
language model, its positions and its KV cache only ever see the pruned sequence. ``generate``
returns the caller's original ``input_ids`` followed by the new tokens (slicing the prompt off by
its original length still works); ``forward`` returns logits for the pruned sequence.

layer L > 0: decoder layers 0..L-1 see every token; the input of decoder layer L (transformers'
``hidden_states[L]``) scores the visual tokens, and layers L.. run on the kept tokens with their
original rotary positions, a rebuilt 4-D mask and a KV cache that holds only them (layers < L keep
the full prompt). Needs the "eager" or "sdpa" attention and the default dynamic cache.

In both modes text tokens keep their order and kept visual tokens their original order, except
that with compat="official" at layer 0 each image's kept features are fed in the release's
``list(set(...))`` order (numbered contiguously by the 1-D RoPE, as in the release).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

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

# Releases with the LlavaModel / language_model layout this module relies on (from 4.52) up to the
# 5.x series. Tested: 4.52.4, 4.57.6, 5.0.0 and 5.23.0.
SUPPORTED = ("4.52", "6.0")
_ATTR = "_otprune_hf"
_PATCHED = ("generate", "forward")


@dataclass
class Pruned:
    """A batch rewritten for the pruned sequence (B rows, new length L).

    input_ids: (B, L) int64, left-padded; image-token ids mark the kept visual tokens.
    attention_mask: (B, L) int64.
    inputs_embeds: (B, L, D) text embeddings with the kept visual features scattered in.
    labels: (B, L) int64 or None (dropped positions removed, padding -100).
    kept: per-image kept indices into that image's visual-token sequence, in the order fed
    (ascending; the release's with compat="official").
    n_tokens: per-image number of visual tokens before pruning.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    inputs_embeds: torch.Tensor
    labels: Optional[torch.Tensor]
    kept: List[torch.Tensor]
    n_tokens: List[int]


def _classes() -> tuple:
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)


def matches(model: Any) -> bool:
    """True for a transformers LLaVA / LLaVA-NeXT generation model (subclasses included)."""
    return is_transformers_instance(model, _classes)


def installed_version() -> str:
    """The installed transformers version string."""
    import transformers

    return transformers.__version__


def check_version(version: Optional[str] = None) -> None:
    """Raise RuntimeError unless transformers ``version`` (default: the installed one) is supported."""
    version = installed_version() if version is None else version
    _check_version(version, SUPPORTED, "LLaVA / LLaVA-NeXT", "4.52, 4.57, 5.0 and 5.23")


def apply(model: Any, keep: Any, layer: int, select_kwargs: dict) -> Any:
    """Patch ``model`` in place (see the module docstring); applying again replaces the settings."""
    check_version()
    check_layer_arg(layer)
    if layer > 0:
        _check_layer(model, layer)
    check_settings(keep, select_kwargs)
    revert(model)  # applying again starts from the original instance
    saved = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
    state = PatchState(keep, layer, dict(select_kwargs), saved)
    orig_generate, orig_forward = model.generate, model.forward
    model.__dict__[_ATTR] = state
    model.__dict__["generate"] = _wrap_generate(model, orig_generate)
    model.__dict__["forward"] = _wrap_forward(model, orig_forward)
    if layer > 0:
        add_layer_hooks(state, _decoder_layers(model))
    return model


def revert(model: Any) -> Any:
    """Restore the instance attributes :func:`apply` replaced; a no-op on an unpatched model."""
    restore(model, _ATTR, _PATCHED)
    return model


def _image_features(model: Any, pixel_values, image_sizes, layer, strategy) -> List[torch.Tensor]:
    """Per-image final visual-token sequences [(N_i, D)] in prompt order, as the model builds them."""
    cfg = model.config
    kw = dict(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer if layer is None else layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy if strategy is None else strategy,
    )
    if image_sizes is not None:
        kw["image_sizes"] = image_sizes
    out = model.model.get_image_features(**kw)
    feats = list(getattr(out, "pooler_output", out))  # 5.x: an output object; 4.5x: the list itself
    if feats and feats[0].ndim == 3 and image_sizes is not None:
        # Older LLaVA-NeXT releases (e.g. 4.52) return per-crop features and pack in forward: pack here.
        packed, lens = model.model.pack_image_features(
            feats, image_sizes, kw["vision_feature_select_strategy"], image_newline=model.model.image_newline
        )
        feats = list(torch.split(packed, lens.tolist()))
    return feats


def prune_inputs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    pixel_values: torch.Tensor,
    keep: Any,
    select_kwargs: dict,
    image_sizes: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    vision_feature_layer: Any = None,
    vision_feature_select_strategy: Optional[str] = None,
) -> Pruned:
    """Score every image's visual tokens in one batched select and rebuild the batch without the
    dropped ones. input_ids: (B, T) with one image-token id per visual token (the processor's output)."""
    feats = _image_features(
        model, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy
    )
    n_tokens = [int(f.shape[0]) for f in feats]
    is_image = input_ids == model.config.image_token_id
    kept = select_kept(feats, keep, select_kwargs)
    pack = Packing.of(keep_mask(is_image, n_tokens, kept))
    ids = pack.apply(input_ids, pad_id(model))
    full_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
    mask = pack.apply(full_mask, 0)
    lab = None if labels is None else pack.apply(labels, -100)
    embeds = model.get_input_embeddings()(ids)
    vis = torch.cat([f[k.to(f.device)] for f, k in zip(feats, kept)]).to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), vis)
    return Pruned(ids, mask, embeds, lab, kept, n_tokens)


def _take_inputs(kwargs: dict, inputs: Any = None):
    """Pop the multimodal inputs from ``kwargs``; None when the call carries no image."""
    if kwargs.get("pixel_values") is None:
        return None
    input_ids = kwargs.pop("input_ids", None)
    input_ids = inputs if input_ids is None else input_ids
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("otprune: a pruned call with pixel_values needs input_ids (and no inputs_embeds)")
    for name in ("position_ids", "cache_position", "past_key_values"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"otprune: {name} cannot be given with pixel_values; it is rebuilt for the pruned sequence"
            )
    return dict(
        input_ids=input_ids,
        attention_mask=kwargs.pop("attention_mask", None),
        pixel_values=kwargs.pop("pixel_values"),
        image_sizes=kwargs.pop("image_sizes", None),
        vision_feature_layer=kwargs.pop("vision_feature_layer", None),
        vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
    )


def _wrap_generate(model: Any, orig):
    @functools.wraps(orig)
    def generate(inputs: Any = None, **kwargs: Any):
        taken = _take_inputs(kwargs, inputs)
        if taken is None:
            return orig(inputs, **kwargs)
        check_cache(model, kwargs)
        state = model.__dict__[_ATTR]
        if state.layer > 0:
            with torch.no_grad():
                mask, embeds = _full_inputs(model, state, **taken)
            try:
                return orig(input_ids=taken["input_ids"], attention_mask=mask, inputs_embeds=embeds, **kwargs)
            finally:
                state.plan = None
        with torch.no_grad():
            p = prune_inputs(model, keep=state.keep, select_kwargs=state.select_kwargs, **taken)
        out = orig(
            input_ids=p.input_ids, attention_mask=p.attention_mask, inputs_embeds=p.inputs_embeds, **kwargs
        )
        return restore_prompt(out, taken["input_ids"], p.input_ids.shape[1])

    return generate


def _wrap_forward(model: Any, orig):
    @functools.wraps(orig)
    def forward(*args: Any, **kwargs: Any):
        if args:  # bind positionals by the original signature (input_ids first)
            import inspect

            bound = inspect.signature(orig).bind_partial(*args)
            kwargs.update(bound.arguments)
        taken = _take_inputs(kwargs)
        if taken is None:
            return orig(**kwargs)
        state = model.__dict__[_ATTR]
        if state.layer > 0:
            if kwargs.get("labels") is not None:
                raise ValueError(
                    "otprune: labels are not supported with layer > 0 (the sequence shrinks inside the model)"
                )
            mask, embeds = _full_inputs(model, state, **taken)
            try:
                return orig(attention_mask=mask, inputs_embeds=embeds, **kwargs)
            finally:
                state.plan = None
        labels = kwargs.pop("labels", None)
        p = prune_inputs(model, keep=state.keep, select_kwargs=state.select_kwargs, labels=labels, **taken)
        return orig(attention_mask=p.attention_mask, inputs_embeds=p.inputs_embeds, labels=p.labels, **kwargs)

    return forward


# ---- layer > 0: pruning inside the language model ------------------------------------------------


def _decoder_layers(model: Any):
    return model.model.language_model.layers


def _check_layer(model: Any, layer: int) -> None:
    check_layer(_decoder_layers(model), layer)
    check_attention(getattr(model.config.get_text_config(), "_attn_implementation", None))


def _full_inputs(
    model: Any,
    state: PatchState,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    pixel_values: torch.Tensor,
    image_sizes: Optional[torch.Tensor],
    vision_feature_layer: Any,
    vision_feature_select_strategy: Optional[str],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unpruned (attention_mask (B, T), inputs_embeds (B, T, D)); sets the plan the layer hooks fill."""
    feats = _image_features(
        model, pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy
    )
    is_image = input_ids == model.config.image_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    n_tokens = [int(f.shape[0]) for f in feats]
    check_counts(is_image, n_tokens)
    embeds = model.get_input_embeddings()(input_ids)
    vis = torch.cat(feats).to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1).to(embeds.device), vis)
    state.plan = Plan(is_image, n_tokens, mask)
    return mask, embeds
