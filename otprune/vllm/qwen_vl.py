"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL with OTPrune (registered by :func:`otprune.vllm.register`).

What changes, and why:
- the processor emits k = round(r * N) placeholders per pruned item, N = t * h * w / merge^2 its
  merged visual tokens: every image, and on Qwen2-VL / Qwen2.5-VL every video (one item, selected
  over all its frames together, as in the transformers integration). Qwen3-VL's videos (frames
  interleaved with timestamp text) pass through unpruned. The count depends on the item's size
  alone, as vLLM needs before the encoder runs;
- the encoder: the pruned items of one encoder call are scored by one batched
  :func:`otprune.select` (ragged ``lengths`` where their N differ; precomputed ``image_embeds`` /
  ``video_embeds`` are the same merged tokens and are pruned alike; on Qwen3-VL the score uses the
  main features, and the deepstack features of a kept token go with it). Each item returns its k
  kept embeddings in ascending order (select's order with compat="official"), followed by
  :data:`POSITION_CHANNELS` channels holding each token's M-RoPE position offset (below);
- positions: vLLM computes a request's M-RoPE positions before the encoder runs, when the kept
  tokens are still unknown. :meth:`_PrunedEncoder.get_mrope_input_positions` computes vLLM's own
  positions for the *unpruned* prompt (each pruned item expanded back to its N placeholders), gives
  every text and unpruned token its position there and slot j of a pruned item the provisional
  position base + j (base: the item's first position); decoding continues after the unpruned
  prompt. When the embeddings enter the language model (``embed_input_ids``, which strips the
  channels), each kept token's offset (its own position - its provisional one) is added to its
  position in ``forward``. So every kept token keeps the position it had in the unpruned prompt, as
  in the transformers integration (same output ids on the same weights, tests_vllm). Chunked
  prefill, prefix caching and the encoder cache keep working: the offsets are relative to the item.
Refused at engine start: vLLM's own video pruning (``video_pruning_rate``) alongside, and pipeline
parallelism (the positions are fixed where the embeddings enter, on the first stage). The encoder's
CUDA graphs are off while pruning (their replay bypasses the encoder code that prunes), as vLLM does
for its EVS.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.utils import copy_mm_embedding_modality

from .._validate import budget
from ..autopatch import settings_from_env
from ..integrations._sequence import select_kept
from . import settings

# A token's offset in t, h and w, each stored as three base-256 digits of offset + OFFSET_BIAS:
# integers below 256 are exact in bfloat16 and float16, so offsets of magnitude below 2^23 survive
# the embeddings' dtype.
OFFSET_BASE = 256
OFFSET_DIGITS = 3
OFFSET_BIAS = OFFSET_BASE ** OFFSET_DIGITS // 2
POSITION_CHANNELS = 3 * OFFSET_DIGITS


def kept_positions(grid_thw: Sequence[int], merge: int, t_factor: float, kept: torch.Tensor) -> torch.Tensor:
    """(k, 3) int64 M-RoPE positions (t, h, w) of the kept tokens ``kept`` (indices into the item's
    t * h * w / merge^2 merged tokens, in the vision tower's (t, h, w) raster order) relative to the
    item's first position, for an item of grid ``grid_thw`` (in patches). t is scaled by
    ``t_factor`` (tokens_per_second * seconds per grid step for videos, 1 for images) and
    truncated, as vLLM's own positions are."""
    T, H, W = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    idx = kept.to(torch.long).cpu().numpy()
    t, rest = np.divmod(idx, H * W)
    h, w = np.divmod(rest, W)
    if t_factor != 1.0:
        t = (t * t_factor).astype(np.int64)
    return torch.from_numpy(np.stack([t, h, w], axis=1).astype(np.int64))


def encode_offsets(offsets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(k, 3) int64 position offsets (t, h, w) -> (k, POSITION_CHANNELS) channels of ``like``'s dtype
    and device (three base-256 digits each, most significant first)."""
    if offsets.numel() and int(offsets.abs().max()) >= OFFSET_BIAS:
        raise ValueError(
            f"otprune vLLM plugin: an M-RoPE position offset of {int(offsets.abs().max())} exceeds "
            f"{OFFSET_BIAS - 1}, the largest the kept embeddings can carry exactly"
        )
    v = offsets.to(torch.long) + OFFSET_BIAS
    digits = torch.stack([v // OFFSET_BASE ** p % OFFSET_BASE for p in reversed(range(OFFSET_DIGITS))], dim=-1)
    return digits.reshape(offsets.shape[0], POSITION_CHANNELS).to(device=like.device, dtype=like.dtype)


def decode_offsets(channels: torch.Tensor) -> torch.Tensor:
    """(n, POSITION_CHANNELS) channels -> (3, n) int64 offsets (t, h, w)."""
    digits = channels.round().to(torch.long).view(-1, 3, OFFSET_DIGITS)
    v = torch.zeros(digits.shape[:2], dtype=torch.long, device=channels.device)
    for p in range(OFFSET_DIGITS):
        v = v * OFFSET_BASE + digits[..., p]
    return (v - OFFSET_BIAS).T


def check_engine(vllm_config) -> None:
    """Refuse what the Qwen-VL pruning cannot serve (ValueError naming it): vLLM's own EVS video
    pruning alongside (both would prune the same videos, and vLLM would then rewrite the kept
    tokens' positions by its own rule), and pipeline parallelism (the positions are fixed where the
    embeddings enter, on the first stage only)."""
    rate = vllm_config.model_config.multimodal_config.video_pruning_rate
    if rate:
        raise ValueError(
            f"otprune vLLM plugin: video_pruning_rate={rate} (vLLM's EVS) is set while OTPrune prunes this "
            "model's images and videos; unset one of the two"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(
            "otprune vLLM plugin: Qwen-VL pruning needs pipeline_parallel_size 1 (the kept tokens' positions "
            "are set where the embeddings enter the language model, on the first stage only)"
        )


class _PrunedCounts:
    """Processing-info mixin: k = round(r * N) tokens per pruned item while pruning is on (the
    settings of the environment when vLLM builds its processor)."""

    pruned_modalities: Tuple[str, ...] = ("image", "video")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.otprune_settings = settings_from_env()

    def _pruned(self, n: int, modality: str) -> int:
        s = self.otprune_settings
        return n if s is None or modality not in self.pruned_modalities else budget(s.keep, n)

    def get_num_image_tokens(self, **kwargs) -> int:
        return self._pruned(super().get_num_image_tokens(**kwargs), "image")

    def get_num_video_tokens(self, **kwargs) -> int:
        return self._pruned(super().get_num_video_tokens(**kwargs), "video")


class _PrunedPlaceholders:
    """Multimodal-processor mixin: each pruned item becomes k = round(r * N) placeholders, N from
    its grid; the other updates are vLLM's own."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        s = self.info.otprune_settings
        if s is None:
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        config = self.info.get_hf_config()
        token = {"image": config.image_token_id, "video": config.video_token_id}

        def replacement(item_idx: int, modality: str) -> List[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [token[modality]] * budget(s.keep, int(grid.prod()) // merge)

        return [
            PromptReplacement(modality=u.modality, target=[token[u.modality]],
                              replacement=partial(replacement, modality=u.modality))
            if u.modality in self.info.pruned_modalities else u
            for u in updates
        ]


class _PrunedEncoder:
    """Model mixin: kept embeddings that carry their position offsets, the provisional positions,
    and the offsets added in forward (module docstring)."""

    pruned_modalities: Tuple[str, ...] = ("image", "video")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        s = settings()  # checked here too: a bad value fails the engine start
        if s is not None:
            check_engine(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.otprune_settings = s
        self._otprune_offsets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        return config if self.otprune_settings is None else dataclasses.replace(config, modalities=[])

    def embed_multimodal(self, **kwargs):
        if self.otprune_settings is None:
            return super().embed_multimodal(**kwargs)
        merge = self.visual.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        # the score's features: Qwen3-VL's main features, without the deepstack levels beside them
        width = self.visual_dim if getattr(self, "use_deepstack", False) else None
        embeds: List[torch.Tensor] = []
        pruned: List[Tuple[int, List[int], float]] = []  # (index into embeds, grid t h w, t factor)
        for key, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            video = key.startswith("video")
            items = self._process_video_input(inputs) if video else self._process_image_input(inputs)
            grids = inputs["video_grid_thw" if video else "image_grid_thw"].tolist()
            seconds = inputs.get("second_per_grid_ts") if video else None
            for i, (emb, grid) in enumerate(zip(items, grids)):
                if ("video" if video else "image") in self.pruned_modalities:
                    t_factor = tokens_per_second * (1.0 if seconds is None else float(seconds[i])) if video else 1.0
                    pruned.append((len(embeds), grid, t_factor))
                embeds.append(emb)
        if not embeds:
            return ()
        # unpruned items (Qwen3-VL's videos) keep every token at offset 0
        offsets = [torch.zeros(e.shape[0], 3, dtype=torch.long) for e in embeds]
        if pruned:
            feats = [embeds[j][:, :width] for j, _, _ in pruned]
            kept = select_kept(feats, self.otprune_settings.keep, self.otprune_settings.select_kwargs)
            for (j, grid, t_factor), idx in zip(pruned, kept):
                idx = idx.to(embeds[j].device)
                embeds[j] = embeds[j][idx]
                # own position relative to the item's first - slot: what forward adds to base + slot
                offsets[j] = kept_positions(grid, merge, t_factor, idx) - torch.arange(len(idx)).unsqueeze(1)
        return tuple(torch.cat([e, encode_offsets(o, e)], dim=1) for e, o in zip(embeds, offsets))

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """vLLM's merge of the scheduled tokens' embeddings, without their offset channels; the
        offsets are kept for :meth:`forward`."""
        self._otprune_offsets = None
        if self.otprune_settings is None or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds = [copy_mm_embedding_modality(mm, mm[:, :-POSITION_CHANNELS]) for mm in multimodal_embeddings]
        offsets = torch.cat([decode_offsets(mm[:, -POSITION_CHANNELS:]) for mm in multimodal_embeddings], dim=1)
        self._otprune_offsets = (is_multimodal, offsets)
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self._otprune_offsets is not None:
            mask, offsets = self._otprune_offsets
            self._otprune_offsets = None
            # in place: the runner rewrites its position buffer every step, and a captured graph
            # keeps reading the same storage
            scheduled = positions[:, : mask.shape[0]]
            scheduled[:, mask] += offsets.to(scheduled.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """(3, len(input_tokens)) positions and the decode delta before the encoder runs: vLLM's own
        for the unpruned prompt (each pruned item expanded back to its N placeholders) at every text
        and unpruned token, base + j at slot j of a pruned item (provisional: :meth:`forward` adds
        each kept token's offset)."""
        if self.otprune_settings is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        tokens = list(input_tokens)
        full_tokens: List[int] = []
        full_features = []
        cols = np.empty(len(tokens), dtype=np.int64)  # each token's column in the unpruned prompt
        slots = np.zeros(len(tokens), dtype=np.int64)
        st = 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, k = f.mm_position.offset, f.mm_position.length
            cols[st:offset] = np.arange(len(full_tokens), len(full_tokens) + offset - st)
            full_tokens += tokens[st:offset]
            start = len(full_tokens)
            if f.modality in self.pruned_modalities:
                n = int(f.data[f"{f.modality}_grid_thw"].data.prod()) // merge ** 2
                full_tokens += [tokens[offset]] * n
                cols[offset:offset + k], slots[offset:offset + k] = start, np.arange(k)
            else:
                n = k
                full_tokens += tokens[offset:offset + k]
                cols[offset:offset + k] = np.arange(start, start + k)
            full_features.append(dataclasses.replace(
                f, mm_position=dataclasses.replace(f.mm_position, offset=start, length=n)))
            st = offset + k
        cols[st:] = np.arange(len(full_tokens), len(full_tokens) + len(tokens) - st)
        full_tokens += tokens[st:]
        full, delta = super().get_mrope_input_positions(full_tokens, full_features)
        positions = full[:, torch.from_numpy(cols)] + torch.from_numpy(slots)
        # decoding continues where it would after the unpruned prompt
        return positions, len(full_tokens) + int(delta) - len(tokens)


class OTPruneQwen2VLProcessingInfo(_PrunedCounts, Qwen2VLProcessingInfo):
    pass


class OTPruneQwen2VLMultiModalProcessor(_PrunedPlaceholders, Qwen2VLMultiModalProcessor):
    pass


class OTPruneQwen2_5_VLProcessingInfo(_PrunedCounts, Qwen2_5_VLProcessingInfo):
    pass


class OTPruneQwen2_5_VLMultiModalProcessor(_PrunedPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen2VLMultiModalProcessor, info=OTPruneQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class OTPruneQwen2VLForConditionalGeneration(_PrunedEncoder, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with OTPrune's kept visual tokens at their own M-RoPE positions."""


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen2_5_VLMultiModalProcessor, info=OTPruneQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class OTPruneQwen2_5_VLForConditionalGeneration(_PrunedEncoder, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with OTPrune's kept visual tokens at their own M-RoPE positions."""


class OTPruneQwen3VLProcessingInfo(_PrunedCounts, Qwen3VLProcessingInfo):
    pruned_modalities = ("image",)


class OTPruneQwen3VLMultiModalProcessor(_PrunedPlaceholders, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen3VLMultiModalProcessor, info=OTPruneQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class OTPruneQwen3VLForConditionalGeneration(_PrunedEncoder, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with OTPrune's kept image tokens (deepstack features alike) at their own M-RoPE
    positions; videos pass through unpruned."""

    pruned_modalities = ("image",)
