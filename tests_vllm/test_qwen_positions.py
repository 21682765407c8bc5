"""The vLLM Qwen-VL subclasses' M-RoPE positions against vLLM's own for the unpruned prompt, without
an engine.

A prompt of text, two images of different sizes and (Qwen2.5-VL) a video with fractional seconds per
grid step, for Qwen2-VL, Qwen2.5-VL and Qwen3-VL. vLLM's own classes give the unpruned prompt's
positions (for images they equal transformers' get_rope_index, checked here too; for videos
transformers 5.x resumes the text after the spatial extent only, vLLM after the scaled temporal one
as well: the plugin follows vLLM, so that keep = 1 serves exactly what vLLM serves unpruned). The
plugin's route (``get_mrope_input_positions`` for the pruned prompt, then each kept token's offset
channels from ``embed_multimodal``'s encoding, stripped by ``embed_input_ids`` and added in
``forward``) must give every kept token, and every text token, the position it had there, and decode
from the unpruned prompt's next position, in float32 and in bfloat16 embeddings.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import qwen_tiny  # noqa: E402

sys.path.pop(0)

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration  # noqa: E402
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration  # noqa: E402

from otprune._validate import budget  # noqa: E402
from otprune.autopatch import Settings  # noqa: E402
from otprune.vllm import qwen_vl  # noqa: E402
from reference import feature_spec  # noqa: E402

KEEP = 0.3
MERGE = 2
CLASSES = {  # family -> (the plugin's class, vLLM's own)
    "qwen2_vl": (qwen_vl.OTPruneQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (qwen_vl.OTPruneQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (qwen_vl.OTPruneQwen3VLForConditionalGeneration, Qwen3VLForConditionalGeneration),
    "qwen3_vl_moe": (qwen_vl.OTPruneQwen3VLMoeForConditionalGeneration, Qwen3VLMoeForConditionalGeneration),
}


def _items(family: str):
    """(modality, grid t h w in patches, seconds per grid step) of the prompt's items, in order."""
    items = [("image", (1, 12, 8), None), ("image", (1, 6, 10), None)]
    if family == "qwen2_5_vl":
        items.append(("video", (3, 8, 6), 0.7))
    return items


def _prompt(items, tokens):
    """input_ids and mm_token_type_ids of the unpruned prompt, and each item's token offset."""
    ids, types, offsets = [7, 8, 9], [0, 0, 0], []
    for modality, (t, h, w), _ in items:
        ids += [tokens["vision_start_token_id"]]
        types += [0]
        offsets.append(len(ids))
        n = t * h * w // MERGE ** 2
        ids += [tokens["image_token_id" if modality == "image" else "video_token_id"]] * n
        types += [1 if modality == "image" else 2] * n
        ids += [tokens["vision_end_token_id"], 10, 11]
        types += [0, 0, 0]
    return torch.tensor([ids]), torch.tensor([types], dtype=torch.int32), offsets


def _model(family, config):
    """The plugin's class without its (vLLM-built) weights: what the position methods read."""
    cls, _ = CLASSES[family]
    obj = cls.__new__(cls)
    object.__setattr__(obj, "otprune_settings", Settings(keep=KEEP, layer=0, select_kwargs={}))
    object.__setattr__(obj, "config", config)
    return obj


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(CLASSES))
def test_kept_tokens_keep_their_unpruned_positions(family, dtype):
    model, _ = qwen_tiny.tiny_qwen(family)
    tokens = qwen_tiny._ids(qwen_tiny._tokenizer())
    items = _items(family)
    ids, types, offsets = _prompt(items, tokens)
    merge = model.config.vision_config.spatial_merge_size
    assert merge == MERGE

    # The pruned prompt: text as it was, item j's N_j tokens cut to a random sorted k_j of them.
    gen = torch.Generator().manual_seed(0)
    keep_cols, channels, unpruned, kept_lengths = [], [], [], []
    tokens_per_second = getattr(model.config.vision_config, "tokens_per_second", 1.0)
    start = 0
    for (modality, grid, seconds), offset in zip(items, offsets):
        n = grid[0] * grid[1] * grid[2] // MERGE ** 2
        kept = torch.randperm(n, generator=gen)[: budget(KEEP, n)].sort().values
        keep_cols += list(range(start, offset)) + (offset + kept).tolist()
        start = offset + n
        unpruned.append(feature_spec(modality, grid, seconds, offset, n))
        kept_lengths.append(len(kept))
        t_factor = tokens_per_second * seconds if modality == "video" else 1.0
        offs = qwen_vl.kept_positions(grid, MERGE, t_factor, kept) - torch.arange(len(kept)).unsqueeze(1)
        channels.append(qwen_vl.encode_offsets(offs, torch.empty(0, dtype=dtype)))
    keep_cols += list(range(start, ids.shape[1]))
    pruned_ids = ids[0, keep_cols].tolist()
    is_mm = types[0, keep_cols] > 0
    starts = [i for i in range(len(pruned_ids)) if is_mm[i] and (i == 0 or not is_mm[i - 1])]
    features = [feature_spec(f.modality, tuple(f.data[f"{f.modality}_grid_thw"].data.tolist()),
                         f.data["second_per_grid_ts"].data.item() if "second_per_grid_ts" in f.data else None, s, k)
                for f, s, k in zip(unpruned, starts, kept_lengths)]

    obj = _model(family, model.config)
    full, full_delta = CLASSES[family][1].get_mrope_input_positions(obj, ids[0].tolist(), unpruned)
    assert full.shape == (3, ids.shape[1])
    if family != "qwen2_5_vl":  # images only: vLLM's positions are transformers' own
        grids = torch.tensor([g for _, g, _ in items])
        hf_full, _ = model.model.get_rope_index(ids, types, image_grid_thw=grids)
        assert torch.equal(full, hf_full[:, 0])
    positions, delta = obj.get_mrope_input_positions(pruned_ids, features)
    assert positions.shape == (3, len(pruned_ids))

    # What embed_input_ids and forward do with the channels of the scheduled kept tokens.
    positions = positions.clone()
    positions[:, is_mm] += qwen_vl.decode_offsets(torch.cat(channels).float())
    assert torch.equal(positions, full[:, keep_cols])
    assert len(pruned_ids) + delta == ids.shape[1] + full_delta  # the first decoded token's position


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_offset_channels_exact_in_every_dtype(dtype):
    """Offsets of magnitude up to 2^23 - 1 survive the embeddings' dtype (one bf16 channel would
    round 257 to 256); larger ones are refused, not rounded."""
    offs = torch.tensor([[0, 1, -1], [257, -4097, 65535], [2 ** 23 - 1, -(2 ** 23 - 1), -300]])
    channels = qwen_vl.encode_offsets(offs, torch.empty(0, dtype=dtype))
    assert channels.dtype == dtype and channels.shape == (3, qwen_vl.POSITION_CHANNELS)
    assert torch.equal(qwen_vl.decode_offsets(channels), offs.T)
    with pytest.raises(ValueError, match="exceeds"):
        qwen_vl.encode_offsets(torch.tensor([[2 ** 23, 0, 0]]), torch.empty(0, dtype=dtype))


class _TimestampTokenizer:
    """Stands in for the tokenizer where vLLM tokenizes a frame's ``<t seconds>`` text: 1 to 3 ids
    by timestamp, so that the frames' text differs in length as with a real tokenizer."""

    def encode(self, text, add_special_tokens=False):
        seconds = float(text[1:].split()[0])
        return [20 + i for i in range(1 + int(seconds) % 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_video_kept_tokens_keep_their_unpruned_positions(family, dtype):
    """Qwen3-VL video: vLLM lays a video out frame by frame, each frame's tokens after its timestamp
    text. Pruned, the processor keeps every frame's text and markers and puts the k kept tokens in the
    first frame (vLLM's own layout for its EVS). Each kept token must still get its unpruned position
    (its frame's, after that frame's text), every text token its own, and decoding must continue after
    the unpruned prompt; here with an image before the video and text between and after."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalProcessor

    model, _ = qwen_tiny.tiny_qwen(family)
    config = model.config
    tokens = qwen_tiny._ids(qwen_tiny._tokenizer())
    tokenizer = _TimestampTokenizer()
    grid, timestamps = (4, 8, 6), [0.5, 1.5, 2.5, 4.0]  # 4 frames of 12 merged tokens
    per_frame = grid[1] * grid[2] // MERGE ** 2
    n = grid[0] * per_frame
    k = budget(KEEP, n)
    assert per_frame < k < n  # the kept tokens span more than one frame's worth

    def repl(counts):
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=counts, timestamps=timestamps, tokenizer=tokenizer,
            vision_start_token_id=tokens["vision_start_token_id"], vision_end_token_id=tokens["vision_end_token_id"],
            video_token_id=tokens["video_token_id"], select_token_id=True).full

    image = [tokens["vision_start_token_id"]] + [tokens["image_token_id"]] * 24 + [tokens["vision_end_token_id"]]
    head, middle, tail = [7, 8, 9], [10, 11], [12, 13]
    full_video, lumped = repl([per_frame] * grid[0]), repl([k] + [0] * (grid[0] - 1))
    full_ids = head + image + middle + full_video + tail
    video_at = len(head + image + middle)
    unpruned = [feature_spec("image", (1, 12, 8), None, len(head) + 1, 24),
                feature_spec("video", grid, None, video_at, len(full_video))]

    gen = torch.Generator().manual_seed(1)
    kept = torch.randperm(n, generator=gen)[:k].sort().values
    kept_img = torch.randperm(24, generator=gen)[: budget(KEEP, 24)].sort().values
    # pruned prompt and, for each of its tokens, its column in the unpruned prompt
    image_cols = [len(head)] + (len(head) + 1 + kept_img).tolist() + [len(head) + 25]
    video_pads = [i for i, t in enumerate(full_video) if t == tokens["video_token_id"]]
    lumped_cols, slot = [], 0
    text_cols = iter(i for i, t in enumerate(full_video) if t != tokens["video_token_id"])
    for t in lumped:
        if t == tokens["video_token_id"]:
            lumped_cols.append(video_pads[int(kept[slot])])
            slot += 1
        else:
            lumped_cols.append(next(text_cols))
    cols = (list(range(len(head))) + image_cols + list(range(len(head) + 26, video_at))
            + [video_at + c for c in lumped_cols]
            + list(range(video_at + len(full_video), len(full_ids))))
    pruned_ids = [full_ids[c] for c in cols]
    assert pruned_ids == head + [image[0]] + [image[1]] * len(kept_img) + [image[-1]] + middle + lumped + tail
    features = [feature_spec("image", (1, 12, 8), None, len(head) + 1, len(kept_img)),
                feature_spec("video", grid, None, video_at - 24 + len(kept_img), len(lumped))]

    obj = _model(family, config)
    object.__setattr__(obj, "_tokenizer", tokenizer)
    full, full_delta = CLASSES[family][1].get_mrope_input_positions(obj, full_ids, unpruned)
    positions, delta = obj.get_mrope_input_positions(pruned_ids, features)
    assert positions.shape == (3, len(pruned_ids))

    offs_img = qwen_vl.kept_positions((1, 12, 8), MERGE, 1.0, kept_img) - torch.arange(len(kept_img)).unsqueeze(1)
    offs_vid = obj._video_positions(grid, timestamps, kept) - torch.arange(k).unsqueeze(1)
    channels = torch.cat([qwen_vl.encode_offsets(o, torch.empty(0, dtype=dtype)) for o in (offs_img, offs_vid)])
    is_mm = torch.tensor([t in (tokens["image_token_id"], tokens["video_token_id"]) for t in pruned_ids])
    positions = positions.clone()
    positions[:, is_mm] += qwen_vl.decode_offsets(channels.float())
    assert torch.equal(positions, full[:, cols])
    assert len(pruned_ids) + delta == len(full_ids) + full_delta
