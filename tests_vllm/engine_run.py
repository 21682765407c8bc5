"""One vLLM engine run on a tiny checkpoint, as a separate process (vLLM spawns processes, and the
plugin's environment route must be read at process start, as in `vllm serve`).

    python engine_run.py MODEL_DIR OUT_JSON [--enable KEEP] [--video]

Serves :data:`PROMPTS` (one- and two-image prompts, all submitted together so that images of
different requests share encoder batches) greedily and writes, per prompt, the prompt token ids
vLLM built (placeholders included) and the generated token ids, and
the model class vLLM resolved for the checkpoint. ``--enable KEEP`` turns pruning on
through the Python route (``otprune.vllm.enable(keep=KEEP)``) instead of the environment.
``--video`` (Qwen-VL) serves :data:`VIDEO_PROMPT` with :func:`video` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import hf_tiny  # noqa: E402

sys.path.pop(0)

MAX_TOKENS = 8
# (prompt text, indices into images()): image sizes differ, so LLaVA-NeXT and Qwen images differ in N.
PROMPTS: List[Tuple[str, List[int]]] = [
    ("user : what is in this image ? <image> describe assistant :", [0]),
    ("user : compare <image> and <image> , left or right ? assistant :", [1, 2]),
    ("user : <image> what is this picture ? assistant :", [2]),
]
# Qwen-VL: its image marker, and images of 96 / 84 / 100 merged tokens (224 x 336, 336 x 196,
# 280 x 280 px), so that k = round(0.1 N) is about 10 and the kept tokens' positions matter.
QWEN_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SIZES = ((224, 336), (336, 196), (280, 280))
# A Qwen-VL video: 8 frames of 112 x 168 px at 2 fps, given as sampled (on the tiny checkpoints: 4
# temporal steps of 4 x 6 merged tokens on Qwen2.5-VL, N = 96; of 4 x 5 on Qwen3-VL, N = 80).
VIDEO_PROMPT = "user : <|vision_start|><|video_pad|><|vision_end|> what happens here ? assistant :"
VIDEO_FRAMES, VIDEO_FPS = 8, 2.0
ENGINE_ARGS = dict(dtype="float32", max_model_len=1024, seed=0, max_num_seqs=4, enforce_eager=True)


def is_qwen(model_type: str) -> bool:
    return model_type.startswith("qwen")


def prompts(model_type: str) -> List[Tuple[str, List[int]]]:
    """:data:`PROMPTS` with the model family's image marker."""
    marker = QWEN_MARKER if is_qwen(model_type) else "<image>"
    return [(text.replace("<image>", marker), idx) for text, idx in PROMPTS]


def images(model_type: str):
    """The prompts' images (RGB PIL), deterministic."""
    return hf_tiny.tiny_images(3, seed=0, **({"sizes": QWEN_SIZES} if is_qwen(model_type) else {}))


def video():
    """(frames (T, H, W, 3) uint8, metadata) of :data:`VIDEO_PROMPT`'s video, deterministic."""
    import numpy as np

    frames = (np.random.default_rng(0).random((VIDEO_FRAMES, 112, 168, 3)) * 255).astype(np.uint8)
    meta = dict(fps=VIDEO_FPS, duration=VIDEO_FRAMES / VIDEO_FPS, total_num_frames=VIDEO_FRAMES,
                frames_indices=list(range(VIDEO_FRAMES)), video_backend="opencv")
    return frames, meta


def engine_args(model_type: str, with_video: bool = False) -> dict:
    limits = {"image": 2, "video": int(with_video)} if is_qwen(model_type) else {"image": 2}
    return dict(ENGINE_ARGS, limit_mm_per_prompt=limits)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--enable", type=float)
    p.add_argument("--video", action="store_true")
    args = p.parse_args()
    if args.enable is not None:
        import otprune.vllm

        otprune.vllm.enable(keep=args.enable)
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    model_type = AutoConfig.from_pretrained(args.model).model_type
    llm = LLM(model=args.model, **engine_args(model_type, args.video))
    if args.video:
        frames, meta = video()
        requests = [{"prompt": VIDEO_PROMPT,
                     "multi_modal_data": {"video": [(frames, dict(meta, do_sample_frames=False))]}}]
    else:
        imgs = images(model_type)
        requests = [{"prompt": text, "multi_modal_data": {"image": [imgs[i] for i in idx]}}
                    for text, idx in prompts(model_type)]
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    from vllm.model_executor.model_loader import get_model_architecture

    model_cls, _ = get_model_architecture(llm.llm_engine.model_config)
    result = dict(
        model_class=f"{model_cls.__module__}.{model_cls.__qualname__}",
        prompts=[dict(prompt_token_ids=list(o.prompt_token_ids), output_ids=list(o.outputs[0].token_ids))
                 for o in outs],
    )
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
