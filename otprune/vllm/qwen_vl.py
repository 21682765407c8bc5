"""vLLM's Qwen2-VL and Qwen2.5-VL with OTPrune (registered by :func:`otprune.vllm.register`).

What changes, and why:
- the processor emits k = round(r * N) placeholders per image or video, N = t * h * w / merge^2 its
  merged visual tokens (a video is one item, selected over all its frames together, as in the
  transformers integration). The count depends on the item's size alone, as vLLM needs before the
  encoder runs;
- the encoder: all items of one encoder call are scored by one batched :func:`otprune.select`
  (ragged ``lengths`` where their N differ; precomputed ``image_embeds`` / ``video_embeds`` are
  the same merged tokens and are pruned alike). Each item returns its k kept embeddings in
  ascending order (select's order with compat="official"), followed by :data:`POSITION_CHANNELS`
  channels holding each kept token's 3-D M-RoPE position in the item and its slot (0..k-1);
- positions: vLLM computes a request's M-RoPE positions before the encoder runs, when the kept
  tokens are still unknown. :meth:`_PrunedEncoder.get_mrope_input_positions` gives the text its
  final positions (text after an item resumes after the *unpruned* item's last position, and
  decoding after the unpruned prompt's) and slot j of an item the provisional position base + j.
  When the kept embeddings enter the language model (``embed_input_ids``, which strips the
  channels), each kept token's offset (its own position - its slot) is added to its provisional
  position in ``forward``. So every kept token keeps the position it had in the unpruned prompt:
  the transformers integration's convention, with the same output ids on the same weights
  (tests_vllm). Chunked prefill, prefix caching and the encoder cache keep working: the channels
  are relative to the item, the provisional positions belong to the request.
Refused at engine start: vLLM's own EVS video pruning (``video_pruning_rate``) alongside, and
pipeline parallelism (the positions are fixed where the embeddings enter, on the first stage). The
encoder's CUDA graphs are off while pruning (their replay bypasses the encoder code that prunes),
as vLLM does for EVS.
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
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.utils import copy_mm_embedding_modality

from .._validate import budget
from ..autopatch import settings_from_env
from ..integrations._sequence import select_kept
from . import settings

# Each of the four values (t, h, w of a kept token, its slot) as two base-256 digits: integers below
# 256 are exact in bfloat16 and float16, so values up to 65535 survive the embeddings' dtype.
POSITION_BASE = 256
POSITION_CHANNELS = 8


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


def item_span(t: int, h: int, w: int, t_factor: float) -> int:
    """1 + the largest M-RoPE position of an unpruned item of t x h x w merged tokens relative to its
    first position: where the text after it resumes."""
    return max(int((t - 1) * t_factor), h - 1, w - 1) + 1


def encode_positions(pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(k, 3) positions -> (k, POSITION_CHANNELS) channels [t, h, w, slot] as base-256 digit pairs,
    in ``like``'s dtype and device (slot j: the token's row among the item's k)."""
    pos = torch.cat([pos, torch.arange(pos.shape[0], dtype=torch.long).unsqueeze(1)], dim=1)
    if pos.numel() and int(pos.max()) >= POSITION_BASE ** 2:
        raise ValueError(
            f"otprune vLLM plugin: an M-RoPE position or token count of {int(pos.max())} exceeds "
            f"{POSITION_BASE ** 2 - 1}, the largest the kept embeddings can carry exactly"
        )
    digits = torch.stack([pos // POSITION_BASE, pos % POSITION_BASE], dim=-1)  # (k, 4, 2)
    return digits.reshape(pos.shape[0], POSITION_CHANNELS).to(device=like.device, dtype=like.dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """(n, POSITION_CHANNELS) channels -> (4, n) int64 rows t, h, w, slot."""
    digits = channels.round().to(torch.long).view(-1, 4, 2)
    return (digits[..., 0] * POSITION_BASE + digits[..., 1]).T


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
    """Processing-info mixin: k = round(r * N) tokens per item while pruning is on (the settings of
    the environment when vLLM builds its processor)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.otprune_settings = settings_from_env()

    def _pruned(self, n: int) -> int:
        s = self.otprune_settings
        return n if s is None else budget(s.keep, n)

    def get_num_image_tokens(self, **kwargs) -> int:
        return self._pruned(super().get_num_image_tokens(**kwargs))

    def get_num_video_tokens(self, **kwargs) -> int:
        return self._pruned(super().get_num_video_tokens(**kwargs))


class _PrunedPlaceholders:
    """Multimodal-processor mixin: each image or video becomes k = round(r * N) placeholders, N from
    its grid."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        s = self.info.otprune_settings
        if s is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}

        def replacement(item_idx: int, modality: str) -> List[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [placeholder[modality]] * budget(s.keep, int(grid.prod()) // merge)

        return [
            PromptReplacement(modality=m, target=[placeholder[m]], replacement=partial(replacement, modality=m))
            for m in ("image", "video")
        ]


class _PrunedEncoder:
    """Model mixin: kept embeddings that carry their positions, and the positions fixed in forward
    (module docstring)."""

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
        feats: List[torch.Tensor] = []
        items: List[Tuple[List[int], float]] = []  # (grid t, h, w; t factor) per item
        for key, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            video = key.startswith("video")
            embeds = self._process_video_input(inputs) if video else self._process_image_input(inputs)
            grids = inputs["video_grid_thw" if video else "image_grid_thw"].tolist()
            seconds = inputs.get("second_per_grid_ts") if video else None
            for i, (emb, grid) in enumerate(zip(embeds, grids)):
                t_factor = tokens_per_second * (1.0 if seconds is None else float(seconds[i])) if video else 1.0
                feats.append(emb)
                items.append((grid, t_factor))
        if not feats:
            return ()
        kept = select_kept(feats, self.otprune_settings.keep, self.otprune_settings.select_kwargs)
        out = []
        for emb, idx, (grid, t_factor) in zip(feats, kept, items):
            idx = idx.to(emb.device)
            pos = kept_positions(grid, merge, t_factor, idx)
            out.append(torch.cat([emb[idx], encode_positions(pos, emb)], dim=1))
        return tuple(out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        """vLLM's merge of the scheduled tokens' embeddings, the kept ones without their position
        channels; those become per-token position offsets that :meth:`forward` adds."""
        self._otprune_offsets = None
        if self.otprune_settings is None or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        embeds = [copy_mm_embedding_modality(mm, mm[:, :-POSITION_CHANNELS]) for mm in multimodal_embeddings]
        pos = torch.cat([decode_positions(mm[:, -POSITION_CHANNELS:]) for mm in multimodal_embeddings], dim=1)
        # provisional position of a kept token = its item's base + its slot j; its own = base + (t, h, w)
        self._otprune_offsets = (is_multimodal, pos[:3] - pos[3:])
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
        """(3, len(input_tokens)) positions and the decode delta before the encoder runs: text final
        (after an item it resumes after the unpruned item's last position), the k placeholders of an
        item at base + j for slot j (provisional: :meth:`forward` moves each kept token to its own)."""
        if self.otprune_settings is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = [f.mm_position.length for f in sorted(mm_features, key=lambda f: f.mm_position.offset)]
        segments, st, nxt = [], 0, 0  # st: next token index; nxt: next free position
        for (offset, t, h, w, t_factor), k in zip(self.iter_mm_grid_thw(mm_features), lengths):
            text = offset - st
            segments.append(np.broadcast_to(np.arange(nxt, nxt + text), (3, text)))
            base = nxt + text
            segments.append(np.broadcast_to(np.arange(base, base + k), (3, k)))
            nxt = base + item_span(t, h, w, t_factor)
            st = offset + k
        tail = len(input_tokens) - st
        segments.append(np.broadcast_to(np.arange(nxt, nxt + tail), (3, tail)))
        positions = np.ascontiguousarray(np.concatenate(segments, axis=1))
        # decoding continues after the last text position, or after the unpruned last item
        return torch.from_numpy(positions), nxt + tail - len(input_tokens)


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
