"""``otprune run``: answer one image question on a real model, with and without pruning.

Loads a transformers LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense or MoE) checkpoint (hub id or
local folder), generates an answer unpruned and pruned, and prints the visual-token count the
language model received and the prefill time of each. Where the weights cannot be had it says so
and exits with status 2. A Qwen processor that cannot be built (its video processor needs
torchvision) is replaced by :class:`QwenImageProcessor` over the checkpoint's tokenizer and image
processor.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Tuple

FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
QWEN_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_TYPES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
IMAGE_PAD = "<|image_pad|>"


class QwenImageProcessor:
    """Qwen-VL's processor for images only: each ``<|image_pad|>`` in a text becomes one token per
    merged visual token of its image (t*h*w / merge**2 from the image processor's grid).

    Returns input_ids / attention_mask (B, T) int64, pixel_values (patches, C*t*p*p), image_grid_thw
    (n_images, 3) int64 and mm_token_type_ids (B, T) int32 (1 at image tokens).
    """

    def __init__(self, image_processor: Any, tokenizer: Any):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def __call__(self, images: Any, text: Any, return_tensors: str = "pt", padding: bool = True) -> Dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        vis = self.image_processor(images, return_tensors="pt")
        counts = (vis["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        if sum(t.count(IMAGE_PAD) for t in texts) != len(counts):
            raise ValueError(f"{sum(t.count(IMAGE_PAD) for t in texts)} {IMAGE_PAD} markers for {len(counts)} images")
        it = iter(counts)
        expanded = []
        for t in texts:
            parts = t.split(IMAGE_PAD)
            expanded.append(parts[0] + "".join(IMAGE_PAD * next(it) + rest for rest in parts[1:]))
        batch = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        ids = batch["input_ids"]
        return dict(
            input_ids=ids,
            attention_mask=batch["attention_mask"],
            pixel_values=vis["pixel_values"],
            image_grid_thw=vis["image_grid_thw"],
            mm_token_type_ids=(ids == self.image_token_id).int(),
        )

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, **kwargs)


def add_parser(sub: Any) -> None:
    """Register the ``run`` subcommand on an argparse subparsers object."""
    sp = sub.add_parser("run", help="answer with and without pruning on a real LLaVA / Qwen-VL model")
    sp.add_argument("--model", required=True,
                    help="hub id or local folder of a transformers LLaVA / LLaVA-NeXT / Qwen2-VL / "
                         "Qwen2.5-VL / Qwen3-VL model")
    sp.add_argument("--image", required=True, help="image file")
    sp.add_argument("--prompt", required=True, help="question about the image")
    sp.add_argument("--keep", type=float, default=0.098, help="ratio (0, 1] or count (>= 1) of visual tokens kept")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    sp.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                    help="model dtype ('auto': float16 on GPU, float32 on CPU)")
    sp.add_argument("--backend", default="auto", help="otprune backend")
    sp.add_argument("--compat", default=None, choices=(None, "official"), help="'official' for the release's numerics")
    sp.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"otprune run: {msg}", file=sys.stderr)
    return 2


def _keep_value(keep: float):
    """A ratio in (0, 1] stays a float; a larger whole number is a token count."""
    return int(keep) if keep > 1 else keep


def _load(model_id: str, device: str, dtype_name: str) -> Tuple[Any, Any]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_id)
    classes = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
               **QWEN_TYPES}
    if config.model_type not in classes:
        raise ValueError(
            f"model type {config.model_type!r} is not a transformers LLaVA / LLaVA-NeXT / Qwen-VL model "
            f"(supported: {', '.join(classes)}); original-codebase checkpoints run through the "
            "environment-variable route instead"
        )
    if dtype_name == "auto":
        dtype = torch.float16 if device == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    cls = getattr(transformers, classes[config.model_type], None)
    if cls is None:
        raise ImportError(f"transformers {transformers.__version__} has no {classes[config.model_type]}")
    model = cls.from_pretrained(model_id, dtype=dtype).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except ImportError:
        if config.model_type not in QWEN_TYPES:
            raise
        from transformers import AutoTokenizer

        processor = QwenImageProcessor(_pil_image_processor(model_id), AutoTokenizer.from_pretrained(model_id))
    return model, processor


def _pil_image_processor(model_id: str) -> Any:
    """The checkpoint's image processor, as its PIL class where transformers has one: before 5.23
    AutoImageProcessor insists on the torchvision-backed class even with use_fast=False."""
    import transformers
    from transformers import AutoImageProcessor
    from transformers.image_processing_utils import ImageProcessingMixin

    name = ImageProcessingMixin.get_image_processor_dict(model_id)[0].get("image_processor_type", "")
    cls = getattr(transformers, name.removesuffix("Fast") + "Pil", None) if name else None
    return cls.from_pretrained(model_id) if cls is not None else AutoImageProcessor.from_pretrained(model_id)


def _inputs(processor: Any, image: Any, prompt: str, device: str, dtype, model_type: str) -> Dict[str, Any]:
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(conv, add_generation_prompt=True)
    else:
        text = (QWEN_TEMPLATE if model_type in QWEN_TYPES else FALLBACK_TEMPLATE).format(prompt=prompt)
    batch = processor(images=image, text=text, return_tensors="pt")
    out = {}
    for name, val in batch.items():
        val = val.to(device)
        out[name] = val.to(dtype) if val.is_floating_point() else val
    return out


def _language_model(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", None) or model.language_model


def _answer(model: Any, processor: Any, inputs: Dict[str, Any], max_new_tokens: int) -> Tuple[str, int, float]:
    """(answer, prompt length the language model saw, prefill seconds)."""
    import torch

    seen = []
    hook = _language_model(model).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None
                                               else args[0]).shape[1]),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model(**inputs)  # warm-up
            _sync(inputs)
            t0 = time.perf_counter()
            model(**inputs)
            _sync(inputs)
            prefill = time.perf_counter() - t0
            seen.clear()
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        hook.remove()
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True).strip(), seen[0], prefill


def _sync(inputs: Dict[str, Any]) -> None:
    import torch

    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``otprune run``; returns the exit status."""
    import os

    import torch

    import otprune

    if not os.path.isfile(args.image):
        return _fail(f"--image {args.image!r}: no such file")
    if not (0 < args.keep <= 1 or float(args.keep).is_integer()):
        return _fail(f"--keep must be a ratio in (0, 1] or a whole token count, got {args.keep}")
    try:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    except Exception as err:
        return _fail(f"--image {args.image!r} is not a readable image ({type(err).__name__}: {err})")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"loading {args.model} on {device} ...", file=sys.stderr, flush=True)
    try:
        model, processor = _load(args.model, device, args.dtype)
    except ImportError as err:
        return _fail(f"needs transformers with LLaVA / Qwen-VL support ({err})")
    except (OSError, ValueError) as err:
        return _fail(
            f"cannot load model {args.model!r}: {str(err).splitlines()[0]}\n"
            "Pass a local folder holding the weights, or run where the model hub is reachable."
        )
    inputs = _inputs(processor, image, args.prompt, device, model.dtype, model.config.model_type)
    image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
    text_tokens = int((inputs["input_ids"] != image_id).sum())

    rows = []
    for label in ("unpruned", "pruned"):
        if label == "pruned":
            otprune.apply(model, keep=_keep_value(args.keep), backend=args.backend, compat=args.compat)
        try:
            answer, seen, prefill = _answer(model, processor, inputs, args.max_new_tokens)
        finally:
            if label == "pruned":
                otprune.revert(model)
        rows.append((label, seen - text_tokens, prefill))
        print(f"[{label}] {answer}")
    print(f"{'':10s} {'visual tokens':>13s} {'prefill ms':>11s}")
    for label, vis, prefill in rows:
        print(f"{label:10s} {vis:13d} {prefill * 1e3:11.1f}")
    print(f"prefill speed-up {rows[0][2] / rows[1][2]:.2f}x")
    return 0
