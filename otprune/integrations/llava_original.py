"""The original LLaVA codebase (``llava`` package): LLaVA-1.5 and LLaVA-1.6 (anyres, spatial_unpad).

:func:`apply` replaces the instance's ``prepare_inputs_labels_for_multimodal`` (never the class's).
Each image's final visual-token sequence (LLaVA-1.6: after anyres merging, image_newline tokens
included, as the public release does) is scored by :func:`otprune.select` in one batched call
over all images of the batch.

layer 0: the features are pruned where they are produced, before LLaVA splices them into the
text, so LLaVA's own code builds the embeddings, labels, attention mask, padding and positions
for the pruned sequence (any batch size, any number of images per prompt, no fixed prompt
length). It runs LLaVA's function twice: once on a probe batch (one image marker per row) to get
the final per-image sequences, once on the real prompt with the kept features in their place:
ascending, or with compat="official" in the release's ``list(set(...))`` order.

layer L > 0: LLaVA builds the full sequence; decoder layers 0..L-1 see every token, the input of
decoder layer L scores the visual tokens and layers L.. run on the kept tokens in prompt order
(in every mode) with their original rotary positions, a rebuilt mask and a KV cache that holds
only them. Needs the "eager" or "sdpa" attention; labels are not supported there.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Callable, List, Optional

import torch

from ._instance import PatchState, restore
from ._sequence import (
    Plan,
    add_layer_hooks,
    check_attention,
    check_layer,
    check_layer_arg,
    check_settings,
    select_kept,
)

_ATTR = "_otprune_llava"
_PREPARE = "prepare_inputs_labels_for_multimodal"
_OUTER = ("generate", "forward")  # wrapped for layer > 0 only: they end a call's pruning plan


def _arch():
    return sys.modules.get("llava.model.llava_arch")


def matches(model: Any) -> bool:
    """True for an original-codebase LLaVA model (any ``LlavaMetaForCausalLM`` subclass)."""
    arch = _arch()  # such a model cannot exist before llava's model code is imported
    return arch is not None and isinstance(model, arch.LlavaMetaForCausalLM)


def is_patched(model: Any) -> bool:
    """True when :func:`apply` is in effect on ``model``."""
    return _ATTR in model.__dict__


def original_prepare(model: Any) -> Callable:
    """LLaVA's own ``prepare_inputs_labels_for_multimodal`` (the class's) bound to ``model``."""
    return getattr(type(model), _PREPARE).__get__(model, type(model))


def apply(model: Any, keep: Any, layer: int, select_kwargs: dict) -> Any:
    """Patch ``model`` in place (see the module docstring); applying again replaces the settings."""
    check_layer_arg(layer)
    if layer > 0:
        _check_layer(model, layer)
    check_settings(keep, select_kwargs)
    revert(model)
    names = (_PREPARE,) + (_OUTER if layer > 0 else ())
    saved = {name: model.__dict__[name] for name in names if name in model.__dict__}
    state = PatchState(keep, layer, dict(select_kwargs), saved)
    orig = model.__dict__.get(_PREPARE) or original_prepare(model)
    model.__dict__[_ATTR] = state
    model.__dict__[_PREPARE] = _wrap_prepare(model, orig)
    if layer > 0:
        for name in _OUTER:
            model.__dict__[name] = _wrap_outer(state, getattr(model, name))
        add_layer_hooks(state, _decoder_layers(model))
    return model


def revert(model: Any) -> Any:
    """Restore the instance attributes :func:`apply` replaced; a no-op on an unpatched model."""
    restore(model, _ATTR, (_PREPARE,) + _OUTER)
    return model


def _wrap_prepare(model: Any, orig: Callable) -> Callable:
    @functools.wraps(orig)
    def prepare(input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
        args = (input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        state = model.__dict__[_ATTR]
        if model.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
            if state.layer > 0 and images is None and input_ids.shape[1] > 1:
                state.plan = None  # a new text-only prompt: nothing to prune in it
            return orig(*args)
        with torch.no_grad():
            feats = image_features(model, orig, images, image_sizes, input_ids.device)
        placeholder = torch.empty((len(feats), 0, 0, 0))  # LLaVA's "one tensor of images" path
        if state.layer > 0:
            with _encoded_as(model, feats):
                return _prepare_full(model, state, orig, args[:5] + (placeholder, image_sizes), feats)
        with torch.no_grad():
            kept = select_kept(feats, state.keep, state.select_kwargs)
        pruned = [f[k.to(f.device)] for f, k in zip(feats, kept)]
        with _encoded_as(model, pruned):
            return orig(input_ids, position_ids, attention_mask, past_key_values, labels, placeholder, image_sizes)

    return prepare


@contextlib.contextmanager
def _encoded_as(model: Any, features: List[torch.Tensor]):
    """Make ``model.encode_images`` return ``features`` (LLaVA indexes the result per image)."""
    had = "encode_images" in model.__dict__
    saved = model.__dict__.get("encode_images")
    model.__dict__["encode_images"] = lambda images: features
    try:
        yield
    finally:
        if had:
            model.__dict__["encode_images"] = saved
        else:
            del model.__dict__["encode_images"]


@contextlib.contextmanager
def _no_truncation(model: Any):
    """Switch off LLaVA's truncation to tokenizer_model_max_length (the probe must see every token)."""
    cfg = model.config
    had = "tokenizer_model_max_length" in cfg.__dict__
    saved = cfg.__dict__.get("tokenizer_model_max_length")
    cfg.tokenizer_model_max_length = None
    try:
        yield
    finally:
        if had:
            cfg.tokenizer_model_max_length = saved
        else:
            del cfg.tokenizer_model_max_length


def image_features(
    model: Any, prepare: Callable, images: Any, image_sizes: Any = None, device: Optional[torch.device] = None
) -> List[torch.Tensor]:
    """Each image's final visual-token sequence [(N_j, D)], as ``prepare`` (LLaVA's function) builds
    it: run on a probe batch (on ``device``, default the model's) whose row j is image j's marker
    followed by one text token."""
    from llava.constants import IMAGE_TOKEN_INDEX

    n = len(images)  # a (n, 3, H, W) or (n, crops, 3, H, W) tensor or a list of n tensors
    probe = torch.tensor([[IMAGE_TOKEN_INDEX, 0]] * n, device=model.device if device is None else device)
    ones = torch.ones_like(probe, dtype=torch.bool)
    with _no_truncation(model):
        _, _, mask, _, embeds, _ = prepare(probe, None, ones, None, None, images, image_sizes)
    return [row[m][:-1] for row, m in zip(embeds, mask.bool())]


# ---- layer > 0: pruning inside the language model ------------------------------------------------


def _decoder_layers(model: Any):
    return model.get_model().layers


def _check_layer(model: Any, layer: int) -> None:
    check_layer(_decoder_layers(model), layer)
    check_attention(getattr(model.config, "_attn_implementation", None))


def _prepare_full(model: Any, state: PatchState, orig: Callable, args: tuple, feats: List[torch.Tensor]):
    """Run LLaVA's function unpruned; record where each image's tokens landed for the layer hooks."""
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    n_tokens = [int(f.shape[0]) for f in feats]
    input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes = args
    if labels is not None:
        raise ValueError("otprune: labels are not supported with layer > 0 (the sequence shrinks inside the model)")
    # Text positions get label 0 and image positions IGNORE_INDEX: that marks the image tokens.
    marker = torch.zeros_like(input_ids)
    out = orig(input_ids, position_ids, attention_mask, past_key_values, marker, images, image_sizes)
    _, pos, mask, pkv, embeds, lab = out
    valid = torch.ones(lab.shape, dtype=torch.bool, device=lab.device) if mask is None else mask.bool()
    is_image = (lab == IGNORE_INDEX) & valid
    # A prompt without an image marker still consumes one image (LLaVA's convention): skip it.
    row_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counts = ((input_ids == IMAGE_TOKEN_INDEX) & row_valid).sum(1).tolist()
    placed, j = [], 0
    for c in counts:
        placed += n_tokens[j:j + c]
        j += max(c, 1)
    state.plan = Plan(is_image, placed, valid.long())
    return None, pos, mask, pkv, embeds, None


def _wrap_outer(state: PatchState, orig: Callable) -> Callable:
    """generate / forward: the outermost call drops the pruning plan when it ends."""

    @functools.wraps(orig)
    def outer(*args: Any, **kwargs: Any):
        state.depth += 1
        try:
            return orig(*args, **kwargs)
        finally:
            state.depth -= 1
            if state.depth == 0:
                state.plan = None

    return outer
