"""End-to-end benchmark: `python -m bench e2e [--quick] [--out DIR] [--models ...]`.

Models are transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with
random weights built directly on the device from configs (nothing is downloaded):
  llava-1.5-7b    CLIP ViT-L/14-336 (576 visual tokens) + Llama-7B (32 layers, 4096 wide), fp16;
  llava-1.6-7b    the same towers with anyres: a 672 x 672 image = base + 2 x 2 crops, packed by
                  LLaVA-NeXT (unpad + newline tokens) into 2928 visual tokens, fp16;
  tiny-llava-1.5  224 px / 14 = 256 visual tokens, 2-layer 64-wide CLIP, 4-layer 256-wide Llama, fp32;
  tiny-llava-1.6  112 px crops of a 224 x 224 image: 336 packed visual tokens, same small towers.
and transformers Qwen2_5_VLForConditionalGeneration:
  qwen2.5-vl-7b   Qwen2.5-VL-7B's vision tower (32 blocks, 1280 wide, window attention) and language
                  model (28 layers, 3584 wide, GQA 28/4); a 672 x 672 image = 48 x 48 patches merged
                  2 x 2 into 576 visual tokens, fp16;
  tiny-qwen2.5-vl 2-block 64-wide tower, 4-layer 256-wide language model; 448 x 448 = 256 visual tokens, fp32.
The Qwen prefill here runs on sequential positions (the cost of M-RoPE's 3-D positions is the same).
The 7B shapes need a GPU (default there); on CPU the tiny ones are the default, and --quick runs the
tiny LLaVA ones with B = 1 and keep 0.098 only. (7B GPU path: untested on GPU.)

Pipeline, run directly here (no model patching): pixel_values -> get_image_features (vision tower
+ projector; LLaVA-NeXT packing) -> selection over each image's visual tokens -> inputs_embeds =
[35 prompt tokens | kept visual tokens | 20 question tokens] -> language-model prefill ->
lm_head -> first token; then greedy decoding with the pruned KV cache. Methods: "unpruned" (all
visual tokens), "otprune" (otprune.select, exact mode, sorted) and "official" (the public
per-image loop, :mod:`bench.official`, tokens fed in its list(set()) order), keep 0.098 / 0.222 /
0.333, batch B in {1, 8}.
Columns: ttft = time to first token (image encoding + selection + prefill + first token);
prefill = the language model's prefill forward alone on ready embeddings; select = the selection
alone; select_share = select / ttft (the selection's share of the pruned prefill path);
speed-ups are the unpruned value over this row's (same model, B, run); decode_tok_s = generated
tokens per second over the batch (B x steps / time) with this row's KV cache.
Writes e2e[_quick].csv (appended), .md and .png under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Tuple

import torch

import otprune

from . import common
from .official import official_select

KEY = ("model", "B", "method", "ratio")
PROMPT_TOKENS, QUESTION_TOKENS = 35, 20
RATIOS = (0.098, 0.222, 0.333)
_CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=336, patch_size=14, projection_dim=768)
_LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=14, projection_dim=64)
_TINY_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1000, max_position_embeddings=4096)
_QWEN_VIT_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
_QWEN_LM_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
_TINY_QWEN_VIT = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                      window_size=112, fullatt_block_indexes=[1])
_TINY_QWEN_LM = dict(_TINY_LLAMA, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
SHAPES: Dict[str, dict] = {
    "llava-1.5-7b": dict(next=False, vision=_CLIP_L, text=_LLAMA_7B, image=336),
    "llava-1.6-7b": dict(next=True, vision=_CLIP_L, text=_LLAMA_7B, image=672,
                         pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
    "tiny-llava-1.5": dict(next=False, vision={**_TINY_CLIP, "image_size": 224}, text=_TINY_LLAMA, image=224),
    "tiny-llava-1.6": dict(next=True, vision={**_TINY_CLIP, "image_size": 112}, text=_TINY_LLAMA, image=224,
                           pinpoints=[[112, 224], [224, 112], [224, 224]]),
    "qwen2.5-vl-7b": dict(qwen=True, vision=_QWEN_VIT_7B, text=_QWEN_LM_7B, image=672),
    "tiny-qwen2.5-vl": dict(qwen=True, vision=_TINY_QWEN_VIT, text=_TINY_QWEN_LM, image=448),
}
QWEN_PATCH, QWEN_MERGE = 14, 2


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight LLaVA(-NeXT) or Qwen2.5-VL of shape ``name`` (see SHAPES), built on ``device`` in
    ``dtype``, eval mode."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    shape = SHAPES[name]
    if shape.get("qwen"):
        return _build(_qwen_config(shape), device, dtype)
    vision, text = CLIPVisionConfig(**shape["vision"]), LlamaConfig(**shape["text"])
    common_kw = dict(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                     vision_feature_layer=-2, vision_feature_select_strategy="default",
                     image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    if shape["next"]:
        cfg, cls = LlavaNextConfig(image_grid_pinpoints=shape["pinpoints"], **common_kw), LlavaNextForConditionalGeneration
    else:
        cfg, cls = LlavaConfig(**common_kw), LlavaForConditionalGeneration
    return _build((cls, cfg), device, dtype)


def _qwen_config(shape: dict) -> tuple:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = shape["text"]["vocab_size"]
    cfg = Qwen2_5_VLConfig(vision_config=dict(shape["vision"], patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE),
                           text_config=shape["text"], image_token_id=vocab - 1, video_token_id=vocab - 2,
                           vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    return Qwen2_5_VLForConditionalGeneration, cfg


def _build(cls_cfg: tuple, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cls, cfg = cls_cfg
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def image_inputs(name: str, B: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random pixel_values (and image_sizes for LLaVA-NeXT, image_grid_thw for Qwen) for B square
    images of the model's size."""
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(1)
    if shape.get("qwen"):
        side = shape["image"] // QWEN_PATCH
        patches = torch.randn(B * side * side, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=g)
        return {"pixel_values": patches.to(device, dtype),
                "image_grid_thw": torch.tensor([[1, side, side]] * B, device=device)}
    side = shape["vision"]["image_size"]
    if not shape["next"]:
        return {"pixel_values": torch.randn(B, 3, side, side, generator=g).to(device, dtype)}
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = [shape["image"], shape["image"]]
    crops = image_size_to_num_patches(size, shape["pinpoints"], side)
    return {"pixel_values": torch.randn(B, crops, 3, side, side, generator=g).to(device, dtype),
            "image_sizes": torch.tensor([size] * B, device=device)}


@torch.no_grad()
def encode(model: torch.nn.Module, images: dict) -> torch.Tensor:
    """(B, N, d) projected visual tokens of every image (LLaVA-NeXT: packed anyres tokens)."""
    out = model.model.get_image_features(**images)
    feats = getattr(out, "pooler_output", out)
    return torch.stack(list(feats))


def keep_tokens(feats: torch.Tensor, method: str, ratio: float) -> torch.Tensor:
    """(B, k, d) visual tokens fed to the language model by ``method``."""
    if method == "unpruned":
        return feats
    if method == "otprune":
        return otprune.prune(feats, ratio)[0]
    return torch.stack([feats[b][official_select(feats[b], ratio)] for b in range(feats.shape[0])])


@torch.no_grad()
def prefill(model: torch.nn.Module, embeds: torch.Tensor) -> Tuple[torch.Tensor, object]:
    """(first generated token (B,), KV cache) of a prefill over (B, L, h) ``embeds``."""
    out = model.model.language_model(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1]).argmax(-1), out.past_key_values


@torch.no_grad()
def decode(model: torch.nn.Module, token: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """Greedy-decode ``steps`` tokens after ``token`` with ``cache``; returns the last token (B,)."""
    embed = model.model.get_input_embeddings()
    for _ in range(steps):
        out = model.model.language_model(inputs_embeds=embed(token[:, None]), past_key_values=cache, use_cache=True)
        token, cache = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1), out.past_key_values
    return token


def measure_model(name: str, batches: Tuple[int, ...], ratios: Tuple[float, ...], device: torch.device,
                  reps: int, steps: int) -> List[dict]:
    """Rows for one model: every B, the unpruned baseline and each method x ratio."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(name, device, dtype)
    vocab = model.config.text_config.vocab_size
    embed = model.model.get_input_embeddings()
    env = common.environment(device)
    rows = []
    methods = [("unpruned", 1.0)] + [(m, r) for r in ratios for m in ("otprune", "official")]
    for B in common.progress(batches, f"e2e {name}"):
        g = torch.Generator().manual_seed(2)
        text = torch.randint(3, vocab - 1, (B, PROMPT_TOKENS + QUESTION_TOKENS), generator=g).to(device)
        images = image_inputs(name, B, device, dtype)
        pre, post = embed(text[:, :PROMPT_TOKENS]), embed(text[:, PROMPT_TOKENS:])
        feats = encode(model, images)
        embeds = {mr: torch.cat([pre, keep_tokens(feats, *mr).to(pre.dtype), post], 1) for mr in methods}

        def ttft(method: str, ratio: float) -> torch.Tensor:
            kept = keep_tokens(encode(model, images), method, ratio)
            return prefill(model, torch.cat([pre, kept.to(pre.dtype), post], 1))[0]

        # Methods' calls are interleaved on CPU (common.time_many): load changes hit all alike.
        t = common.time_many({mr: (lambda mr=mr: ttft(*mr)) for mr in methods}, device, reps=reps, budget_s=30.0)
        p = common.time_many({mr: (lambda mr=mr: prefill(model, embeds[mr])) for mr in methods}, device,
                             reps=reps, budget_s=30.0)
        s = common.time_many({mr: (lambda mr=mr: keep_tokens(feats, *mr)) for mr in methods[1:]}, device,
                             reps=reps, budget_s=15.0)
        s[methods[0]] = [0.0] * 3
        for mr in methods:
            rows.append({**env, "model": name, "B": B, "method": mr[0], "ratio": mr[1],
                         "visual_tokens": feats.shape[1], "kept_tokens": embeds[mr].shape[1] - PROMPT_TOKENS - QUESTION_TOKENS,
                         "seq_len": embeds[mr].shape[1],
                         "ttft_p20_ms": t[mr][0], "ttft_p50_ms": t[mr][1], "ttft_p80_ms": t[mr][2],
                         "prefill_p20_ms": p[mr][0], "prefill_p50_ms": p[mr][1], "prefill_p80_ms": p[mr][2],
                         "select_p50_ms": s[mr][1], "select_share": s[mr][1] / t[mr][1],
                         "decode_tok_s": _decode_rate(model, embeds[mr], steps, reps, device)})
        del embeds, feats
    for r in rows:
        base = next(b for b in rows if b["B"] == r["B"] and b["method"] == "unpruned")
        r["ttft_speedup"] = base["ttft_p50_ms"] / r["ttft_p50_ms"]
        r["prefill_speedup"] = base["prefill_p50_ms"] / r["prefill_p50_ms"]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _decode_rate(model, embeds: torch.Tensor, steps: int, reps: int, device: torch.device) -> float:
    """Median over ``reps`` of B x steps / seconds for decoding after a fresh prefill of ``embeds``."""
    rates = []
    for _ in range(max(1, min(reps, 3))):
        token, cache = prefill(model, embeds)
        common.synchronize(device)
        t0 = time.perf_counter()
        decode(model, token, cache, steps)
        common.synchronize(device)
        rates.append(embeds.shape[0] * steps / (time.perf_counter() - t0))
    return float(sorted(rates)[len(rates) // 2])


def run(quick: bool, out_dir: str, models: Optional[List[str]] = None, device: Optional[torch.device] = None) -> List[dict]:
    """Measure ``models`` (default: 7B shapes on GPU, tiny ones on CPU); append CSV, rewrite MD/PNG."""
    device = device or common.default_device()
    if models is None:
        big = device.type == "cuda" and not quick
        models = ["llava-1.5-7b", "llava-1.6-7b", "qwen2.5-vl-7b"] if big else ["tiny-llava-1.5", "tiny-llava-1.6"]
        models += [] if big or quick else ["tiny-qwen2.5-vl"]
    batches, ratios = ((1,), (0.098,)) if quick else ((1, 8), RATIOS)
    reps, steps = (3, 4) if quick else ((10, 32) if device.type == "cuda" else (5, 16))
    rows = []
    for name in models:
        rows += measure_model(name, batches, ratios, device, reps, steps)
    stem = common.results_stem(out_dir, "e2e", quick)
    common.append_csv(stem + ".csv", rows)
    write_report(stem)
    return rows


def write_report(stem: str) -> None:
    """e2e.md and e2e.png from the latest row of every (device, model, B, method, ratio) in e2e.csv."""
    rows = common.latest_rows(common.read_csv(stem + ".csv"), KEY)
    cols = ["device", "model", "B", "method", "ratio", "kept_tokens", "seq_len", "ttft_p20_ms", "ttft_p50_ms",
            "ttft_p80_ms", "ttft_speedup", "prefill_p50_ms", "prefill_speedup", "select_p50_ms", "select_share",
            "decode_tok_s"]
    heads = ["device", "model", "B", "method", "keep", "visual tokens kept", "sequence", "TTFT p20 ms",
             "TTFT p50 ms", "TTFT p80 ms", "TTFT speed-up", "LM prefill p50 ms", "LM prefill speed-up",
             "selection p50 ms", "selection share of TTFT", "decode tok/s (batch)"]
    text = ["# End-to-end: LLaVA / Qwen2.5-VL prefill and decoding with pruned visual tokens", "",
            "Random-weight models built from configs; TTFT = image encoding + selection + LM prefill + first "
            "token; LM prefill = the language model's forward alone; speed-ups are unpruned p50 / row p50 "
            "(same model, B, run); selection share = selection p50 / TTFT p50. See bench/e2e.py for the shapes.",
            "", common.markdown_table(rows, cols, heads), "", common.env_line(rows), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))
    _plot(rows, stem + ".png")


@common.optional_plot
def _plot(rows: List[Dict[str, str]], path: str) -> None:
    plt = common.pyplot()
    groups = list(dict.fromkeys((r["device"], r["model"], r["B"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.2), squeeze=False)
    for ax, (dev, model, B) in zip(axes[0], groups):
        rs = [r for r in rows if (r["device"], r["model"], r["B"]) == (dev, model, B)]
        labels = [("all" if r["method"] == "unpruned" else f"{r['method']}\n{r['ratio']}") for r in rs]
        ttft = [float(r["ttft_p50_ms"]) for r in rs]
        sel = [float(r["select_p50_ms"]) for r in rs]
        ax.bar(range(len(rs)), ttft, color="tab:blue", label="TTFT p50")
        ax.bar(range(len(rs)), sel, color="tab:red", label="selection p50")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{model}, B={B}\n{dev[:28]}", fontsize=9)
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=8)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES),
                   help="model shapes (default: the 7B ones on GPU, the tiny ones on CPU)")


def main(args: argparse.Namespace) -> int:
    rows = run(args.quick, args.out, models=args.models)
    stem = common.results_stem(args.out, "e2e", args.quick)
    print(open(stem + ".md").read())
    print(f"{len(rows)} rows appended to {stem}.csv; wrote {stem}.md and {stem}.png")
    return 0
