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

In both modes text tokens keep their order and kept visual tokens their original order.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from ._instance import PatchState, restore

# Releases with the LlavaModel / language_model layout this module relies on (from 4.52) up to the
# 5.x series. Tested: 4.52.4, 4.57.6, 5.0.0 and 5.23.0.
SUPPORTED = ("4.52", "6.0")
_ATTR = "_otprune_hf"
_PATCHED = ("generate", "forward")


@dataclass
class _Plan:
    """One call's pruning inside the language model (layer > 0), filled in at the prefill.

    is_image: (B, T) bool image-token positions of the full prompt; n_tokens: per-image counts.
    attention_mask: (B, T) the prompt's mask. After the prefill reached layer L:
    gather (B, L') int64 prompt positions kept (right-aligned), valid (B, L') bool real keys,
    order (B, L') int64 their prompt index (causal order), n_new: tokens appended since the
    prefill, prefill: whether the current call is the prefill, mask: its additive 4-D mask.
    """

    is_image: torch.Tensor
    n_tokens: List[int]
    attention_mask: torch.Tensor
    gather: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    order: Optional[torch.Tensor] = None
    n_new: int = 0
    prefill: bool = True
    mask: Optional[torch.Tensor] = None


@dataclass
class Pruned:
    """A batch rewritten for the pruned sequence (B rows, new length L).

    input_ids: (B, L) int64, left-padded; image-token ids mark the kept visual tokens.
    attention_mask: (B, L) int64.
    inputs_embeds: (B, L, D) text embeddings with the kept visual features scattered in.
    labels: (B, L) int64 or None (dropped positions removed, padding -100).
    kept: per-image kept indices into that image's visual-token sequence, ascending.
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
    if "transformers" not in sys.modules:  # such a model cannot exist without transformers loaded
        return False
    try:
        return isinstance(model, _classes())
    except ImportError:
        return False


def installed_version() -> str:
    """The installed transformers version string."""
    import transformers

    return transformers.__version__


def check_version(version: Optional[str] = None) -> None:
    """Raise RuntimeError unless transformers ``version`` (default: the installed one) is supported."""
    from packaging.version import Version

    version = installed_version() if version is None else version
    lo, hi = SUPPORTED
    if not (Version(lo) <= Version(version) < Version(hi)):
        raise RuntimeError(
            f"otprune: transformers {version} is not supported for LLaVA / LLaVA-NeXT pruning; "
            f"supported: >= {lo}, < {hi} (tested 4.52, 4.57, 5.0 and 5.23)"
        )


def apply(model: Any, keep: Any, layer: int, select_kwargs: dict) -> Any:
    """Patch ``model`` in place (see the module docstring); applying again replaces the settings."""
    check_version()
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")
    if layer > 0:
        _check_layer(model, layer)
    _check_settings(keep, select_kwargs)
    revert(model)  # applying again starts from the original instance
    saved = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
    state = PatchState(keep, layer, dict(select_kwargs), saved)
    orig_generate, orig_forward = model.generate, model.forward
    model.__dict__[_ATTR] = state
    model.__dict__["generate"] = _wrap_generate(model, orig_generate)
    model.__dict__["forward"] = _wrap_forward(model, orig_forward)
    if layer > 0:
        for i, block in enumerate(_decoder_layers(model)[layer:], start=layer):
            hook = functools.partial(_layer_hook, model, i)
            state.hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return model


def revert(model: Any) -> Any:
    """Restore the instance attributes :func:`apply` replaced; a no-op on an unpatched model."""
    restore(model, _ATTR, _PATCHED)
    return model


def _check_settings(keep: Any, select_kwargs: dict) -> None:
    """Fail at apply time, not mid-generation, on a bad ``keep`` or select keyword.

    Runs a tiny select on a CPU tensor, also inside a meta-device init context (``from_pretrained``
    builds models in one). The backend is checked by name only: a "cuda" or "triton" backend cannot
    run on that tensor, and whether it can run on the model's device is known only at call time.
    """
    from ..api import select
    from ..backends import BACKEND_NAMES

    kwargs = dict(select_kwargs)
    bad = {"lengths"} & set(kwargs)
    if bad:
        raise TypeError(f"otprune.apply: {sorted(bad)[0]!r} is set per batch by the integration")
    backend = kwargs.pop("backend", "auto")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    n = keep if isinstance(keep, int) and not isinstance(keep, bool) and keep > 1 else 4
    with torch.device("cpu"):
        select(torch.rand(n, 4, generator=torch.Generator().manual_seed(0)), keep, backend="torch", **kwargs)


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


def _select_kept(feats: List[torch.Tensor], keep: Any, select_kwargs: dict) -> List[torch.Tensor]:
    """One batched select over all images [(N_j, D)]: per-image kept indices, ascending."""
    from ..api import select

    n_tokens = [int(f.shape[0]) for f in feats]
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lengths = torch.tensor(n_tokens, device=padded.device) if len(set(n_tokens)) > 1 else None
    idx = select(padded, keep, lengths=lengths, **select_kwargs)
    # Sort each row with the -1 padding last (compat="official" returns the release's order).
    big = torch.iinfo(idx.dtype).max
    idx = torch.sort(idx.masked_fill(idx < 0, big), dim=1).values
    return [row[row != big] for row in idx]


def _check_counts(is_image: torch.Tensor, n_tokens: List[int]) -> None:
    if int(is_image.sum()) != sum(n_tokens):
        raise ValueError(
            f"Image features and image tokens do not match: {int(is_image.sum())} image tokens in input_ids, "
            f"{sum(n_tokens)} visual tokens from {len(n_tokens)} images"
        )


def _keep_mask(is_image: torch.Tensor, n_tokens: List[int], kept: List[torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: text positions and the kept image positions. Image j owns the j-th run of
    n_tokens[j] image positions in row-major order (the order the model scatters features in)."""
    _check_counts(is_image, n_tokens)
    rows, cols = is_image.nonzero(as_tuple=True)
    offsets = torch.tensor([0] + n_tokens[:-1], device=rows.device).cumsum(0).tolist()
    flat = torch.cat([k.to(rows.device) + o for k, o in zip(kept, offsets)])
    keep_mask = ~is_image
    keep_mask[rows[flat], cols[flat]] = True
    return keep_mask


def _pack_index(keep_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(r, t, d, L'): kept position (r, t) goes to column d of a right-aligned (B, L') batch."""
    lens = keep_mask.sum(1)
    length = int(lens.max())
    rank = keep_mask.long().cumsum(1) - 1 + (length - lens).unsqueeze(1)
    r, t = keep_mask.nonzero(as_tuple=True)
    return r, t, rank[r, t], length


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
    kept = _select_kept(feats, keep, select_kwargs)
    r, t, d, length = _pack_index(_keep_mask(is_image, n_tokens, kept))
    b = input_ids.shape[0]
    ids = input_ids.new_full((b, length), _pad_id(model))
    ids[r, d] = input_ids[r, t]
    mask = input_ids.new_zeros((b, length))
    mask[r, d] = 1 if attention_mask is None else attention_mask[r, t].to(mask.dtype)
    lab = None
    if labels is not None:
        lab = labels.new_full((b, length), -100)
        lab[r, d] = labels[r, t]
    embeds = model.get_input_embeddings()(ids)
    vis = torch.cat([f[k.to(f.device)] for f, k in zip(feats, kept)]).to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), vis)
    return Pruned(ids, mask, embeds, lab, kept, n_tokens)


def _pad_id(model: Any) -> int:
    for cfg in (getattr(model, "generation_config", None), model.config, model.config.get_text_config()):
        pid = getattr(cfg, "pad_token_id", None)
        if isinstance(pid, int):
            return pid
    return 0


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
        _check_cache(model, kwargs)
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
        return _restore_prompt(out, taken["input_ids"], p.input_ids.shape[1])

    return generate


def _check_cache(model: Any, kwargs: dict) -> None:
    """Pruned generation feeds the visual features once, at prefill: it needs the KV cache."""
    cfg = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("use_cache", getattr(cfg, "use_cache", True)) is False:
        raise ValueError(
            "otprune: generate() with pruning needs use_cache=True (the kept visual tokens live in the KV cache)"
        )


def _restore_prompt(out: Any, input_ids: torch.Tensor, pruned_len: int):
    """Put the caller's original prompt back in front of the generated tokens."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    seq = torch.cat([input_ids.to(seq.device), seq[:, pruned_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return seq
    out.sequences = seq
    return out


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
    n = len(_decoder_layers(model))
    if layer >= n:
        raise ValueError(f"layer must be < the language model's {n} decoder layers, got {layer}")
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        raise NotImplementedError(
            f"otprune: layer > 0 needs attn_implementation 'eager' or 'sdpa' (it builds 4-D masks), got {impl!r}"
        )


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
    _check_counts(is_image, n_tokens)
    embeds = model.get_input_embeddings()(input_ids)
    vis = torch.cat(feats).to(embeds.device, embeds.dtype)
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1).to(embeds.device), vis)
    state.plan = _Plan(is_image, n_tokens, mask)
    return mask, embeds


def _layer_hook(model: Any, i: int, module: Any, args: tuple, kwargs: dict):
    """Pre-hook of decoder layer i >= L: at layer L, score and drop visual tokens (prefill) or
    extend the pruned mask (decoding); every layer >= L gets the pruned mask and positions."""
    state = model.__dict__.get(_ATTR)
    plan = state.plan if state is not None else None
    if plan is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    if i == state.layer:
        if plan.gather is None:
            hidden = _prune_hidden(plan, hidden, state)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        else:
            plan.prefill = False
            plan.mask = _decode_mask(plan, hidden.shape[1], hidden.dtype)
            plan.n_new += hidden.shape[1]
    kwargs = dict(kwargs, attention_mask=plan.mask.to(hidden.device))
    if plan.prefill:
        kwargs.update(_gather_positions(plan, kwargs))
    return args, kwargs


def _prune_hidden(plan: _Plan, hidden: torch.Tensor, state: PatchState) -> torch.Tensor:
    """Select by the layer-L hidden states (B, T, D) -> the kept rows (B, L', D); fills the plan."""
    if hidden.shape[1] != plan.is_image.shape[1] or hidden.shape[0] % plan.is_image.shape[0]:
        raise RuntimeError("otprune: the first language-model call is not the prompt's prefill")
    if hidden.shape[0] != plan.is_image.shape[0]:  # beams / num_return_sequences expand the rows
        _repeat_rows(plan, hidden.shape[0] // plan.is_image.shape[0])
    is_image = plan.is_image.to(hidden.device)
    feats = list(torch.split(hidden[is_image], plan.n_tokens))
    kept = _select_kept(feats, state.keep, state.select_kwargs)
    r, t, d, length = _pack_index(_keep_mask(is_image, plan.n_tokens, kept))
    b = hidden.shape[0]
    plan.gather = torch.zeros((b, length), dtype=torch.long, device=hidden.device)
    plan.gather[r, d] = t
    plan.valid = torch.zeros((b, length), dtype=torch.bool, device=hidden.device)
    plan.valid[r, d] = plan.attention_mask.to(hidden.device)[r, t].bool()
    plan.order = torch.full((b, length), -1, dtype=torch.long, device=hidden.device)
    plan.order[r, d] = t
    allowed = plan.valid[:, None, :] & (plan.order[:, None, :] <= plan.order[:, :, None])
    plan.mask = _additive(allowed.unsqueeze(1), hidden.dtype)
    return _take(hidden, plan.gather)


def _repeat_rows(plan: _Plan, rep: int) -> None:
    """Expand the plan like generate() expands its inputs (each row repeated ``rep`` times)."""
    per_row, j = [], 0
    for count in plan.is_image.sum(1).tolist():
        mine = []
        while count > 0:
            mine.append(plan.n_tokens[j])
            count -= plan.n_tokens[j]
            j += 1
        per_row.append(mine)
    plan.n_tokens = [n for mine in per_row for _ in range(rep) for n in mine]
    plan.is_image = plan.is_image.repeat_interleave(rep, 0)
    plan.attention_mask = plan.attention_mask.repeat_interleave(rep, 0)


def _decode_mask(plan: _Plan, q: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, L' + n_new + q) additive mask: the valid kept prompt, then causal new tokens."""
    b = plan.valid.shape[0]
    prefix = plan.valid[:, None, None, :].expand(b, 1, q, plan.valid.shape[1])
    rows = torch.arange(q, device=prefix.device)[:, None]
    cols = torch.arange(plan.n_new + q, device=prefix.device)[None, :]
    new = (cols <= plan.n_new + rows).expand(b, 1, q, plan.n_new + q)
    return _additive(torch.cat([prefix, new], dim=-1), dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _take(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """x (b', T, ...) with b' in {1, B} gathered along dim 1 by gather (B, L') -> (B, L', ...)."""
    x = x.expand(gather.shape[0], *x.shape[1:])
    idx = gather.to(x.device).view(*gather.shape, *([1] * (x.ndim - 2)))
    idx = idx.expand(*gather.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _gather_positions(plan: _Plan, kwargs: dict) -> dict:
    """Keep the kept tokens' original rotary positions during the prefill of layers >= L."""
    out = {}
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(_take(p, plan.gather) for p in pe)
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = _take(kwargs["position_ids"], plan.gather)
    if kwargs.get("cache_position") is not None:
        out["cache_position"] = torch.arange(plan.gather.shape[1], device=kwargs["cache_position"].device)
    return out
