"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE) with OTPrune (registered by
:func:`otprune.vllm.register`).

What changes, and why:
- the processor emits k = round(r * N) placeholders per image and per video, N = t * h * w / merge^2
  its merged visual tokens (a video is one item, selected over all its frames together, as in the
  transformers integration). The count depends on the item's size alone, as vLLM needs before the
  encoder runs. Qwen3-VL lays a video out frame by frame, each frame's tokens after its timestamp
  text; which frames the kept tokens come from is known only after the encoder, so a pruned video
  keeps every frame's text and markers and holds all k placeholders in its first frame (the layout
  vLLM uses for its EVS). The kept tokens then precede the later frames' text in the sequence,
  while their positions are their own (below);
- the encoder: the pruned items of one encoder call are scored by one batched
  :func:`otprune.select` (ragged ``lengths`` where their N differ; precomputed ``image_embeds`` /
  ``video_embeds`` are the same merged tokens and are pruned alike; on Qwen3-VL the score uses the
  main features, and the deepstack features of a kept token go with it). Each item returns its k
  kept embeddings in ascending order (select's order with compat="official"), followed by
  :data:`POSITION_CHANNELS` channels holding each token's M-RoPE position offset (below);
- positions: vLLM computes a request's M-RoPE positions before the encoder runs, when the kept
  tokens are still unknown. :meth:`_PrunedEncoder.get_mrope_input_positions` computes vLLM's own
  positions for the *unpruned* prompt (each pruned item expanded back to its N placeholders, a
  Qwen3-VL video's frame by frame), gives every text and unpruned token its position there and
  slot j of a pruned item the provisional position base + j (base: the item's first position);
  decoding continues after the unpruned prompt. When the embeddings enter the language model
  (``embed_input_ids``, which strips the channels), each kept token's offset (its own position -
  its provisional one) is added to its position in ``forward``. The encoder side knows a kept
  token's own position from its grid index; for a Qwen3-VL video it takes vLLM's positions of the
  video's unpruned layout, rebuilt with the tokenizer (the frames' timestamp text shifts them). So
  every kept token keeps the position it had in the unpruned prompt, as in the transformers
  integration (same output ids on the same weights, tests_vllm). Chunked prefill, prefix caching
  and the encoder cache keep working: the offsets are relative to the item.
Refused at engine start: vLLM's own video pruning (``video_pruning_rate``) alongside, and pipeline
parallelism (the positions are fixed where the embeddings enter, on the first stage). The encoder's
CUDA graphs are off while pruning (their replay bypasses the encoder code that prunes), as vLLM does
for its EVS.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

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
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
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
    H, W = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
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
    """Multimodal-processor mixin: each item becomes k = round(r * N) placeholders, N from its grid.
    With ``lumped_videos`` (Qwen3-VL) a pruned video keeps its per-frame timestamps and markers, with
    all k placeholders in the first frame (:meth:`_lumped_video`); a video whose budget is all its
    tokens is left as vLLM lays it out."""

    lumped_videos = False

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        s = self.info.otprune_settings
        if s is None:
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        config = self.info.get_hf_config()
        token = {"image": config.image_token_id, "video": config.video_token_id}

        def replacement(item_idx: int, modality: str, own):
            item = out_mm_kwargs[modality][item_idx]
            n = int(item[f"{modality}_grid_thw"].data.prod()) // merge
            k = budget(s.keep, n)
            if modality == "video" and self.lumped_videos:
                return own(item_idx) if k == n else self._lumped_video(item, k)
            return [token[modality]] * k

        return [
            PromptReplacement(modality=u.modality, target=u.target if self.lumped_videos else [token[u.modality]],
                              replacement=partial(replacement, modality=u.modality, own=u.replacement))
            for u in updates
        ]


class _PrunedEncoder:
    """Model mixin: kept embeddings that carry their position offsets, the provisional positions,
    and the offsets added in forward (module docstring)."""

    lumped_videos = False  # Qwen3-VL: a pruned video's placeholders all sit in its first frame

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
        # (index into embeds, kept indices -> their (k, 3) positions relative to the item's first)
        pruned: List[Tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = []
        for key, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            video = key.startswith("video")
            modality = "video" if video else "image"
            items = self._process_video_input(inputs) if video else self._process_image_input(inputs)
            grids = inputs["video_grid_thw" if video else "image_grid_thw"].tolist()
            seconds = inputs.get("second_per_grid_ts") if video else None
            for i, (emb, grid) in enumerate(zip(items, grids)):
                if self._prunes(modality, emb.shape[0]):
                    if video and self.lumped_videos:
                        where = partial(self._video_positions, grid, inputs["timestamps"][i])
                    else:
                        t_factor = tokens_per_second * (1.0 if seconds is None else float(seconds[i])) if video else 1.0
                        where = partial(kept_positions, grid, merge, t_factor)
                    pruned.append((len(embeds), where))
                embeds.append(emb)
        if not embeds:
            return ()
        # unpruned items keep every token at offset 0
        offsets = [torch.zeros(e.shape[0], 3, dtype=torch.long) for e in embeds]
        if pruned:
            feats = [embeds[j][:, :width] for j, _ in pruned]
            kept = select_kept(feats, self.otprune_settings.keep, self.otprune_settings.select_kwargs)
            for (j, where), idx in zip(pruned, kept):
                idx = idx.to(embeds[j].device)
                embeds[j] = embeds[j][idx]
                # own position relative to the item's first - slot: what forward adds to base + slot
                offsets[j] = where(idx) - torch.arange(len(idx)).unsqueeze(1)
        return tuple(torch.cat([e, encode_offsets(o, e)], dim=1) for e, o in zip(embeds, offsets))

    def _prunes(self, modality: str, n: int) -> bool:
        """Whether an item of ``n`` tokens is pruned: always, but for a Qwen3-VL video (whose pruned
        layout differs from vLLM's) only when its budget is below n."""
        return not (modality == "video" and self.lumped_videos) or budget(self.otprune_settings.keep, n) < n

    def _video_positions(self, grid: Sequence[int], timestamps, kept: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL: (k, 3) int64 M-RoPE positions of a video's kept tokens relative to its first
        token, from vLLM's own positions for the video's unpruned prompt (frames separated by
        their timestamp text, whose length only the tokenizer knows)."""
        config = self.config
        frames, per_frame = int(grid[0]), int(grid[1]) * int(grid[2]) // config.vision_config.spatial_merge_size ** 2
        repl = Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[per_frame] * frames, timestamps=timestamps, tokenizer=self._tokenizer,
            vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id,
        ).full
        feature = MultiModalFeatureSpec(
            data=MultiModalKwargsItem({"video_grid_thw": MultiModalFieldElem(
                data=torch.tensor(list(grid)), field=MultiModalFieldConfig.batched("video").field)}),
            modality="video", identifier="otprune", mm_position=PlaceholderRange(offset=0, length=len(repl)))
        positions, _ = Qwen3VLForConditionalGeneration._get_mrope_input_positions(repl, [feature], config)
        cols = torch.tensor(repl).eq(config.video_token_id).nonzero().flatten()
        own = positions[:, cols]
        return (own - own[:, :1]).T[kept.cpu()]

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
            grid = f.data[f"{f.modality}_grid_thw"].data
            span = tokens[offset:offset + k]
            if self._prunes(f.modality, int(grid.prod()) // merge ** 2):
                full_span, span_cols, first = self._unpruned_span(f.modality, span, grid)
                kept = span_cols < 0
                cols[offset:offset + k] = np.where(kept, first, span_cols) + start
                slots[offset:offset + k][kept] = np.arange(int(kept.sum()))
            else:
                full_span = span
                cols[offset:offset + k] = np.arange(start, start + k)
            full_tokens += full_span
            full_features.append(dataclasses.replace(f, mm_position=PlaceholderRange(offset=start, length=len(full_span))))
            st = offset + k
        cols[st:] = np.arange(len(full_tokens), len(full_tokens) + len(tokens) - st)
        full_tokens += tokens[st:]
        full, delta = super().get_mrope_input_positions(full_tokens, full_features)
        positions = full[:, torch.from_numpy(cols)] + torch.from_numpy(slots)
        # decoding continues where it would after the unpruned prompt
        return positions, len(full_tokens) + int(delta) - len(tokens)

    def _unpruned_span(self, modality: str, span: List[int], grid: torch.Tensor) -> Tuple[List[int], np.ndarray, int]:
        """A pruned item's placeholder span -> (the unpruned span, each span token's column in it or
        -1 for a kept token's slot, the unpruned column of the item's first token). A span of k
        placeholders becomes N; a lumped Qwen3-VL video gets every frame's placeholders back."""
        merge = self.config.vision_config.spatial_merge_size ** 2
        if not (modality == "video" and self.lumped_videos):
            return [span[0]] * (int(grid.prod()) // merge), np.full(len(span), -1, dtype=np.int64), 0
        config = self.config
        per_frame = int(grid[1:].prod()) // merge
        full: List[int] = []
        cols = np.full(len(span), -1, dtype=np.int64)
        first = -1
        for i, token in enumerate(span):
            if token == config.video_token_id:
                continue
            cols[i] = len(full)
            full.append(token)
            if token == config.vision_start_token_id:
                first = len(full) if first < 0 else first
                full += [config.video_token_id] * per_frame
        return full, cols, first


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
    pass


class OTPruneQwen3VLMultiModalProcessor(_PrunedPlaceholders, Qwen3VLMultiModalProcessor):
    lumped_videos = True

    def _lumped_video(self, item, k: int):
        """A pruned video's prompt: every frame's ``<t seconds><|vision_start|>...<|vision_end|>``
        as vLLM writes it, the k kept tokens' placeholders in the first frame, none in the others
        (vLLM's own layout for its EVS). Only the placeholders are embeddings."""
        config = self.info.get_hf_config()
        frames = int(item["video_grid_thw"].data[0])
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=[k] + [0] * (frames - 1), timestamps=item["timestamps"].data,
            tokenizer=self.info.get_tokenizer(), vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id, video_token_id=config.video_token_id,
            select_token_id=True,
        )


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen3VLMultiModalProcessor, info=OTPruneQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class OTPruneQwen3VLForConditionalGeneration(_PrunedEncoder, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with OTPrune's kept image and video tokens (deepstack features alike) at their
    own M-RoPE positions; a pruned video's kept tokens sit in its first frame."""

    lumped_videos = True


class OTPruneQwen3VLMoeProcessingInfo(_PrunedCounts, Qwen3VLMoeProcessingInfo):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    OTPruneQwen3VLMultiModalProcessor, info=OTPruneQwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class OTPruneQwen3VLMoeForConditionalGeneration(_PrunedEncoder, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE (Qwen3-VL's vision side and positions, a mixture-of-experts language
    model), pruned as :class:`OTPruneQwen3VLForConditionalGeneration`."""

    lumped_videos = True
