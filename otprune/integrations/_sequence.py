"""Sequence surgery shared by the model integrations.

What every family does the same way once it knows where its visual tokens are: one batched
select over all images of a batch, removing the dropped positions from ids / masks / labels /
positions with new left padding, putting the caller's prompt back in front of generated tokens,
and the decoder-layer pre-hooks that prune inside the language model (layer L > 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from ._instance import PatchState


def check_layer_arg(layer: Any) -> None:
    """Raise ValueError unless ``layer`` is an int >= 0."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an int >= 0, got {layer!r}")


def check_settings(keep: Any, select_kwargs: dict) -> None:
    """Fail at apply time, not mid-generation, on a bad ``keep`` or select keyword.

    Runs a tiny select on a CPU tensor, also inside a meta-device init context (``from_pretrained``
    builds models in one). The backend is checked by name only: a "cuda" or "triton" backend cannot
    run on that tensor, and whether it can run on the model's device is known only at call time.
    """
    from .._validate import check_backend
    from ..api import select

    kwargs = dict(select_kwargs)
    bad = {"lengths"} & set(kwargs)
    if bad:
        raise TypeError(f"otprune.apply: {sorted(bad)[0]!r} is set per batch by the integration")
    check_backend(kwargs.pop("backend", "auto"), kwargs.get("compat"))
    n = keep if isinstance(keep, int) and not isinstance(keep, bool) and keep > 1 else 4
    with torch.device("cpu"):
        select(torch.rand(n, 4, generator=torch.Generator().manual_seed(0)), keep, backend="torch", **kwargs)


def check_attention(impl: Any) -> None:
    """layer > 0 builds 4-D masks: only the "eager" and "sdpa" attentions take them."""
    if impl not in ("eager", "sdpa"):
        raise NotImplementedError(
            f"otprune: layer > 0 needs attn_implementation 'eager' or 'sdpa' (it builds 4-D masks), got {impl!r}"
        )


def select_kept(
    feats: List[torch.Tensor], keep: Any, select_kwargs: dict, release_order: bool = True
) -> List[torch.Tensor]:
    """One batched select over all images [(N_j, D)]: per-image kept indices (k_j,) int64, in the
    order the language model is fed them. Ascending, except with compat="official" in
    :func:`otprune.select`'s order (the release's ``list(set(...))`` order). A family whose
    positions the release never defined passes ``release_order=False``: ascending in every mode.

    Ragged images are padded to the longest and passed with ``lengths`` (a Python list: each row
    runs to its own budget), so a ratio applies per image.
    """
    from ..api import select

    n_tokens = [int(f.shape[0]) for f in feats]
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lengths = n_tokens if len(set(n_tokens)) > 1 else None
    idx = select(padded, keep, lengths=lengths, **select_kwargs)
    if release_order and select_kwargs.get("compat") == "official":
        return [row[row >= 0] for row in idx]
    # Sort each row with the -1 padding last.
    big = torch.iinfo(idx.dtype).max
    idx = torch.sort(idx.masked_fill(idx < 0, big), dim=1).values
    return [row[row != big] for row in idx]


def check_counts(is_visual: torch.Tensor, n_tokens: Sequence[int], what: str = "Image") -> None:
    """Raise ValueError unless the (B, T) bool placeholder mask holds sum(n_tokens) positions."""
    if int(is_visual.sum()) != sum(n_tokens):
        raise ValueError(
            f"{what} features and {what.lower()} tokens do not match: {int(is_visual.sum())} {what.lower()} tokens "
            f"in input_ids, {sum(n_tokens)} visual tokens from {len(n_tokens)} {what.lower()}s"
        )


def keep_mask(is_visual: torch.Tensor, n_tokens: Sequence[int], kept: List[torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: every non-visual position and the kept visual ones. Item j owns the j-th run of
    n_tokens[j] visual positions in row-major order (the order the model scatters features in)."""
    check_counts(is_visual, n_tokens)
    rows, cols = is_visual.nonzero(as_tuple=True)
    offsets = torch.tensor([0] + list(n_tokens[:-1]), device=rows.device).cumsum(0).tolist()
    flat = torch.cat([k.to(rows.device) + o for k, o in zip(kept, offsets)])
    out = ~is_visual
    out[rows[flat], cols[flat]] = True
    return out


@dataclass
class Packing:
    """Kept position (r, t) of a (B, T) batch goes to column d of a right-aligned (B, length) one."""

    r: torch.Tensor
    t: torch.Tensor
    d: torch.Tensor
    length: int
    batch: int

    @classmethod
    def of(cls, keep: torch.Tensor) -> "Packing":
        """From a (B, T) bool mask of the positions kept."""
        lens = keep.sum(1)
        length = int(lens.max())
        rank = keep.long().cumsum(1) - 1 + (length - lens).unsqueeze(1)
        r, t = keep.nonzero(as_tuple=True)
        return cls(r, t, rank[r, t], length, keep.shape[0])

    def apply(self, x: torch.Tensor, fill: Any) -> torch.Tensor:
        """(*lead, B, T) -> (*lead, B, length): the kept entries, left-filled with ``fill``."""
        out = x.new_full((*x.shape[:-2], self.batch, self.length), fill)
        r, t, d = (i.to(x.device) for i in (self.r, self.t, self.d))
        out[..., r, d] = x[..., r, t]
        return out


def pad_id(model: Any) -> int:
    """The pad token id of a transformers model (generation config, then configs), else 0."""
    for cfg in (getattr(model, "generation_config", None), model.config, model.config.get_text_config()):
        pid = getattr(cfg, "pad_token_id", None)
        if isinstance(pid, int):
            return pid
    return 0


def check_cache(model: Any, kwargs: dict) -> None:
    """Pruned generation feeds the visual features once, at prefill: it needs the KV cache."""
    cfg = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("use_cache", getattr(cfg, "use_cache", True)) is False:
        raise ValueError(
            "otprune: generate() with pruning needs use_cache=True (the kept visual tokens live in the KV cache)"
        )


def restore_prompt(out: Any, input_ids: torch.Tensor, pruned_len: int):
    """Put the caller's original prompt back in front of the generated tokens."""
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    seq = torch.cat([input_ids.to(seq.device), seq[:, pruned_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return seq
    out.sequences = seq
    return out


# ---- layer > 0: pruning inside the language model ------------------------------------------------


@dataclass
class Plan:
    """One call's pruning inside the language model (layer > 0), filled in at the prefill.

    is_image: (B, T) bool visual-token positions of the full prompt; n_tokens: per-image counts.
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


def check_layer(layers: Sequence[Any], layer: int) -> None:
    """Raise ValueError unless ``layer`` indexes one of the language model's decoder ``layers``."""
    if layer >= len(layers):
        raise ValueError(f"layer must be < the language model's {len(layers)} decoder layers, got {layer}")


def add_layer_hooks(state: PatchState, layers: Sequence[Any]) -> None:
    """Pre-hooks on decoder layers ``state.layer``.. that prune by the plan in ``state``."""
    for i, block in enumerate(layers[state.layer:], start=state.layer):
        hook = functools.partial(layer_hook, state, i)
        state.hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))


def layer_hook(state: PatchState, i: int, module: Any, args: tuple, kwargs: dict):
    """Pre-hook of decoder layer i >= L: at layer L, score and drop visual tokens (prefill) or
    extend the pruned mask (decoding); every layer >= L gets the pruned mask and positions."""
    plan = state.plan
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


def _prune_hidden(plan: Plan, hidden: torch.Tensor, state: PatchState) -> torch.Tensor:
    """Select by the layer-L hidden states (B, T, D) -> the kept rows (B, L', D); fills the plan.
    The kept rows stay in prompt order with their own positions in every mode."""
    if hidden.shape[1] != plan.is_image.shape[1] or hidden.shape[0] % plan.is_image.shape[0]:
        raise RuntimeError("otprune: the first language-model call is not the prompt's prefill")
    if hidden.shape[0] != plan.is_image.shape[0]:  # beams / num_return_sequences expand the rows
        _repeat_rows(plan, hidden.shape[0] // plan.is_image.shape[0])
    is_image = plan.is_image.to(hidden.device)
    feats = list(torch.split(hidden[is_image], plan.n_tokens))
    kept = select_kept(feats, state.keep, state.select_kwargs, release_order=False)  # prompt order
    p = Packing.of(keep_mask(is_image, plan.n_tokens, kept))
    r, t, d, b = p.r, p.t, p.d, p.batch
    plan.gather = torch.zeros((b, p.length), dtype=torch.long, device=hidden.device)
    plan.gather[r, d] = t
    plan.valid = torch.zeros((b, p.length), dtype=torch.bool, device=hidden.device)
    plan.valid[r, d] = plan.attention_mask.to(hidden.device)[r, t].bool()
    plan.order = torch.full((b, p.length), -1, dtype=torch.long, device=hidden.device)
    plan.order[r, d] = t
    allowed = plan.valid[:, None, :] & (plan.order[:, None, :] <= plan.order[:, :, None])
    plan.mask = _additive(allowed.unsqueeze(1), hidden.dtype)
    return _take(hidden, plan.gather)


def _repeat_rows(plan: Plan, rep: int) -> None:
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


def _decode_mask(plan: Plan, q: int, dtype: torch.dtype) -> torch.Tensor:
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


def _gather_positions(plan: Plan, kwargs: dict) -> dict:
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
