"""Tiny random-initialised transformers LLaVA / LLaVA-NeXT models with a locally built processor.

No downloads: the vision tower (CLIP), language model (Llama), tokenizer (WordLevel) and image
processors are all built from configs here. Shared by the integration tests and the benchmarks.

    model, processor = tiny_llava(seed)        # LLaVA-1.5 geometry shrunk: 112 px / patch 14 = 64 tokens
    model, processor = tiny_llava_next(seed)   # LLaVA-NeXT anyres: 56 px crops, grid pinpoints up to 112 x 112
    inputs = tiny_inputs(processor, n_images=(2, 1))   # left-padded batch, images per prompt
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

IMAGE_TOKEN = "<image>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
WORDS = (
    "user assistant : what is in the image ? describe this picture and a of red blue cat dog "
    "left right top bottom compare two images , . yes no"
).split()
VOCAB_SIZE = 64  # the language model's vocabulary (>= tokenizer vocabulary)


def _tokenizer():
    return word_tokenizer(SPECIALS, WORDS, [IMAGE_TOKEN])


def word_tokenizer(specials, words, extra_specials):
    """A left-padding word-level fast tokenizer over ``specials + words`` (pad / bos / eos / unk
    first), with ``extra_specials`` (image / vision tokens) registered as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tuple(specials) + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )
    out.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    return out


def _image_processor(name: str, **kw):
    """The PIL image processor class where transformers has one (5.x), else the default one."""
    import transformers

    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls(**kw)


def _text_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )


def _vision_config(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )


def _finish(model, tokenizer):
    model.eval()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == image_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def tiny_llava(seed: int = 0) -> Tuple[torch.nn.Module, object]:
    """(LlavaForConditionalGeneration, LlavaProcessor): 64 visual tokens per image, float32, eval mode."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer()
    cfg = LlavaConfig(
        vision_config=_vision_config(112),
        text_config=_text_config(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=64,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    image_processor = _image_processor(
        "CLIPImageProcessor", size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return _finish(model, tokenizer), processor


def tiny_llava_next(seed: int = 0) -> Tuple[torch.nn.Module, object]:
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor): 56 px crops (16 tokens each) on an
    anyres grid up to 112 x 112, so an image gets a size-dependent count (base + unpadded grid +
    newline tokens)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tokenizer = _tokenizer()
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    cfg = LlavaNextConfig(
        vision_config=_vision_config(56),
        text_config=_text_config(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    image_processor = _image_processor(
        "LlavaNextImageProcessor",
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return _finish(model, tokenizer), processor


def tiny_images(n: int, seed: int = 0, sizes: Sequence[Tuple[int, int]] = ((80, 120), (120, 64), (100, 100))):
    """``n`` random RGB PIL images of varying (height, width), deterministic in ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        out.append(Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)))
    return out


def tiny_inputs(processor, n_images: Sequence[int] = (2, 1), seed: int = 0) -> dict:
    """A left-padded batch: prompt b holds ``n_images[b]`` images; returns the processor's tensors
    (input_ids, attention_mask, pixel_values and, for LLaVA-NeXT, image_sizes)."""
    texts = []
    for b, n in enumerate(n_images):
        words = ["user", ":"] + ["what", "is", "in", "this", "image", "?"][: 3 + 2 * b]
        for _ in range(n):
            words += [IMAGE_TOKEN, "compare"]
        texts.append(" ".join(words + ["assistant", ":"]))
    images = tiny_images(sum(n_images), seed)
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
