"""Tiny random-initialised models of the original LLaVA codebase (``llava`` package), no downloads.

A tiny CLIP vision tower and its image processor are saved to a folder and named by the config's
``mm_vision_tower``, the way LLaVA loads them; the language model is a 3-layer Llama.

    model = tiny_llava15(folder)        # LLaVA-1.5: 112 px / patch 14 = 64 visual tokens per image
    model = tiny_llava16(folder)        # LLaVA-1.6: anyres 56 px crops, spatial_unpad + image_newline
    images, sizes = tiny_images(model, n) # what LLaVA's process_images makes of n random photos
    ids = prompt_ids(rows)              # (B, T) left-padded ids, IMAGE_TOKEN_INDEX marks each image
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

VOCAB_SIZE = 64
PAD_ID = 0
EOS_ID = 2
# Text segments around the images of each prompt row (token ids < VOCAB_SIZE).
TEXT = ([5, 6, 7], [8, 9], [10, 11, 12, 13])


def _save_tower(folder: str, image_size: int) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = os.path.join(folder, f"clip{image_size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = CLIPVisionConfig(
            image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
        )
        torch.manual_seed(0)
        CLIPVisionModel(cfg).save_pretrained(path)
        CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ).save_pretrained(path)
    return path


def _build(folder: str, image_size: int, seed: int, **extra) -> torch.nn.Module:
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    cfg = LlavaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=EOS_ID, initializer_range=0.1,
        mm_vision_tower=_save_tower(folder, image_size), mm_hidden_size=32,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        tokenizer_padding_side="left", **extra,
    )
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(cfg)
    model.get_vision_tower().load_model()
    if hasattr(model.get_model(), "image_newline"):  # built with torch.empty
        with torch.no_grad():
            model.get_model().image_newline.normal_(0, 0.5)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()


def tiny_llava15(folder: str, seed: int = 0) -> torch.nn.Module:
    """LlavaLlamaForCausalLM with LLaVA-1.5's layout: flat merge, 64 visual tokens per image."""
    return _build(folder, 112, seed, mm_patch_merge_type="flat", image_aspect_ratio="pad")


def tiny_llava16(folder: str, seed: int = 0) -> torch.nn.Module:
    """LlavaLlamaForCausalLM with LLaVA-1.6's layout: anyres crops of 56 px (16 tokens each) on a
    grid up to 112 x 112, spatial_unpad merge with image_newline tokens (size-dependent counts)."""
    return _build(
        folder, 56, seed, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    )


def tiny_images(model: torch.nn.Module, n: int, seed: int = 0) -> Tuple[object, List[Tuple[int, int]]]:
    """(images, image_sizes) for ``n`` random photos of varying shape, via LLaVA's process_images:
    a (n, 3, H, W) tensor (LLaVA-1.5) or a list of (1 + crops, 3, h, w) tensors (LLaVA-1.6);
    image_sizes are (width, height)."""
    from llava.mm_utils import process_images
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = ((80, 120), (120, 64), (100, 100), (60, 90))
    photos = [
        Image.fromarray(rng.integers(0, 256, size=(*shapes[i % len(shapes)], 3), dtype=np.uint8))
        for i in range(n)
    ]
    images = process_images(photos, model.get_vision_tower().image_processor, model.config)
    if isinstance(images, torch.Tensor) and images.ndim == 5:  # equal crop counts: keep LLaVA's list form
        images = list(images)
    return images, [p.size for p in photos]


def row_ids(n_images: int, extra: int = 0) -> List[int]:
    """One prompt: TEXT segments with an image marker between them (``extra`` more text tokens first)."""
    from llava.constants import IMAGE_TOKEN_INDEX

    ids = [1] + [20 + i for i in range(extra)]
    for j in range(n_images + 1):
        ids += TEXT[j % len(TEXT)]
        if j < n_images:
            ids.append(IMAGE_TOKEN_INDEX)
    return ids


def prompt_ids(rows: Sequence[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) int64, left-padded with PAD_ID."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask
