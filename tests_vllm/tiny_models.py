"""Tiny random LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints saved to a folder
that vLLM can serve offline.

The towers, tokenizers and image processors are those of tests/hf_tiny.py and tests/qwen_tiny.py,
with a language model whose head_dim is 32 (vLLM's CPU attention needs head_dim >= 32). transformers
saves the CLIP tower's weights as ``...vision_tower.embeddings...``; vLLM loads
``vision_tower.vision_model.*``, so the saved keys are renamed. The Qwen checkpoints take images of
up to 336 x 336 px (up to 144 merged tokens) so that a kept token's position matters.

    path = save_tiny("llava", folder)       # or "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"
    model, processor = load_tiny(path)      # the same weights in transformers, float32, eval mode
"""

from __future__ import annotations

import os
import sys
from typing import Any, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import hf_tiny  # noqa: E402
import qwen_tiny  # noqa: E402

sys.path.pop(0)

KINDS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
QWEN_MAX_PIXELS = (24 * 14) ** 2


def _text_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=hf_tiny.VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )


def _build_qwen(kind: str, seed: int) -> Tuple[Any, Any]:
    """qwen_tiny's model with a head_dim-32 language model (M-RoPE sections 4 + 6 + 6 of its 16
    frequencies), its tokenizer and a Qwen2VLImageProcessor up to QWEN_MAX_PIXELS."""
    import transformers

    tokenizer = qwen_tiny._tokenizer()
    cfg = qwen_tiny._config(kind, qwen_tiny._ids(tokenizer))
    cfg.text_config.head_dim = 32
    cfg.text_config.num_attention_heads = 2
    cfg.text_config.num_key_value_heads = 1
    cfg.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
    if kind == "qwen3_vl_moe":
        # vLLM reads it; transformers' Qwen3-VL-MoE always renormalises the top-k routing weights
        cfg.text_config.norm_topk_prob = True
    cls = getattr(transformers, QWEN_CLASSES[kind])
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    patch = cfg.vision_config.patch_size
    image_processor = hf_tiny._image_processor(
        "Qwen2VLImageProcessor", patch_size=patch, merge_size=2, temporal_patch_size=2,
        min_pixels=(2 * patch) ** 2, max_pixels=QWEN_MAX_PIXELS,
    )
    return model, _QwenFiles(image_processor, tokenizer)


class _QwenFiles(qwen_tiny.QwenImageProcessor):
    """The image-only Qwen processor, saved as its tokenizer and image processor files."""

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def build_tiny(kind: str, seed: int = 0) -> Tuple[Any, Any]:
    """(model, processor) in transformers: hf_tiny's / qwen_tiny's geometry with a head_dim-32
    language model."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind in QWEN_KINDS:
        return _build_qwen(kind, seed)
    from transformers import LlavaConfig, LlavaNextConfig

    _, processor = hf_tiny.tiny_llava(seed) if kind == "llava" else hf_tiny.tiny_llava_next(seed)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(hf_tiny.IMAGE_TOKEN)
    common = dict(
        text_config=_text_config(),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    if kind == "llava":
        from transformers import LlavaForConditionalGeneration as cls

        cfg = LlavaConfig(vision_config=hf_tiny._vision_config(112), image_seq_length=64, **common)
    else:
        from transformers import LlavaNextForConditionalGeneration as cls

        cfg = LlavaNextConfig(
            vision_config=hf_tiny._vision_config(56),
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            image_seq_length=16,
            **common,
        )
    torch.manual_seed(seed)
    model = cls(cfg)
    return hf_tiny._finish(model, processor.tokenizer), processor


def save_tiny(kind: str, folder: str, seed: int = 0) -> str:
    """Save a tiny checkpoint + processor under folder/kind (float32 safetensors); returns the path."""
    from safetensors.torch import load_file, save_file

    model, processor = build_tiny(kind, seed)
    path = os.path.join(folder, kind)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    renamed = {_vllm_key(k): _hub_layout(k, v) for k, v in state.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    return path


def _hub_layout(key: str, value: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL-MoE's fused experts as released checkpoints store them (and vLLM loads them):
    gate_up_proj (E, hidden, 2 I), down_proj (E, I, hidden). transformers holds and saves them
    transposed, and transposes released ones on load."""
    if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return value.transpose(1, 2).contiguous()
    return value


def _vllm_key(key: str) -> str:
    marker = "vision_tower."
    if marker in key and ".vision_model." not in key:
        head, tail = key.split(marker, 1)
        return f"{head}{marker}vision_model.{tail}"
    return key


def load_tiny(path: str) -> Tuple[Any, Any]:
    """The saved checkpoint in transformers (it reads either key layout), with its processor."""
    import transformers
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type in QWEN_KINDS:
        cls = getattr(transformers, QWEN_CLASSES[cfg.model_type])
        model = cls.from_pretrained(path, dtype=torch.float32).eval()
        processor = qwen_tiny.QwenImageProcessor(
            transformers.AutoImageProcessor.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        )
        return model, processor
    cls = LlavaNextForConditionalGeneration if cfg.model_type == "llava_next" else LlavaForConditionalGeneration
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)
