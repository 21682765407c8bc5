"""Tiny random-initialised transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL models with a local processor.

No downloads: vision tower, language model, tokenizer (WordLevel holding the vision special tokens)
and ``Qwen2VLImageProcessor`` are built from configs here; ``QwenImageProcessor`` (the image-only
processor of ``otprune run``) expands the image markers. Shared by the tests and the benchmarks.

    model, processor = tiny_qwen("qwen2_5_vl", seed)   # also "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"
    inputs = tiny_qwen_inputs(processor, n_images=(2, 1))   # left-padded batch, images per prompt

Images of 56..112 px give 4..16 merged visual tokens each (patch 14, or 16 for Qwen3-VL, 2 x 2 merge).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from hf_tiny import _image_processor, tiny_images, word_tokenizer
from otprune.integrations.run_cli import QwenImageProcessor

VISION = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>") + VISION
WORDS = (
    "user assistant : what is in the image ? describe this picture and a of red blue cat dog "
    "left right top bottom compare two images , . yes no"
).split()
VOCAB_SIZE = 64  # the language model's vocabulary (>= tokenizer vocabulary)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _tokenizer():
    return word_tokenizer(SPECIALS, WORDS, VISION)


def _ids(tokenizer) -> dict:
    conv = tokenizer.convert_tokens_to_ids
    return dict(
        vision_start_token_id=conv(VISION[0]),
        image_token_id=conv(VISION[1]),
        video_token_id=conv(VISION[2]),
        vision_end_token_id=conv(VISION[3]),
    )


def _text(family: str) -> dict:
    # head_dim 16: the M-RoPE sections (t, h, w) split its 8 frequencies.
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3 if family.startswith("qwen3") else 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _config(family: str, ids: dict):
    import transformers

    text = _text(family)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14)
        return transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
            window_size=56, fullatt_block_indexes=[1],
        )
        return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        vision = dict(
            depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=16,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        )
        text["rope_parameters"]["mrope_interleaved"] = True
        if family == "qwen3_vl":
            return transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        # 4 experts of width 16, 2 per token, in every layer
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
        return transformers.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def tiny_qwen(family: str = "qwen2_5_vl", seed: int = 0) -> Tuple[torch.nn.Module, object]:
    """(Qwen*ForConditionalGeneration, its processor): float32, eval mode, eager attention."""
    import transformers

    tokenizer = _tokenizer()
    cfg = _config(family, _ids(tokenizer))
    cls = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    }[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    patch = cfg.vision_config.patch_size
    image_processor = _image_processor(
        "Qwen2VLImageProcessor", patch_size=patch, merge_size=2, temporal_patch_size=2,
        min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2,
    )
    # Qwen's own processor also builds a video processor, which needs torchvision.
    return model, QwenImageProcessor(image_processor, tokenizer)


def tiny_qwen_inputs(
    processor, n_images: Sequence[int] = (2, 1), seed: int = 0, sizes: Sequence[Tuple[int, int]] = None
) -> dict:
    """A left-padded batch: prompt b holds ``n_images[b]`` images of varying sizes; returns the
    processor's tensors (input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)."""
    texts = []
    for b, n in enumerate(n_images):
        words = ["user", ":"] + ["what", "is", "in", "this", "image", "?"][: 3 + 2 * b]
        for _ in range(n):
            words += [VISION[0], VISION[1], VISION[3], "compare"]
        texts.append(" ".join(words + ["assistant", ":"]))
    kw = {} if sizes is None else {"sizes": sizes}
    images = tiny_images(sum(n_images), seed, **kw)
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
