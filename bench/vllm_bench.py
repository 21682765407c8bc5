"""vLLM serving with and without the OTPrune plugin: `python -m bench vllm [--quick] [--out DIR] [--model PATH]`.

Needs vLLM installed (CPU: `make test-vllm` builds .venv-vllm; run `.venv-vllm/bin/python -m bench vllm`).
Offline engine (vllm.LLM), one engine per configuration, each in its own process with the plugin
switched by the environment (unset = plain vLLM, OTPRUNE_KEEP=r = pruned), as `vllm serve` would be:
a warm-up batch, then --reps timed batches of --requests concurrent requests, each with its own
random image (so no encoder or prefix cache hit) and the same text, greedy, exactly --max-tokens
output tokens (ignore_eos). Columns:
  req_s       requests per second over a batch (requests / wall time of llm.generate), median of reps;
  out_tok_s   output tokens per second over a batch, median of reps;
  ttft p50/p90  time to first token per request (vLLM's first_token_latency: arrival to first token,
              queueing inside the batch included), over all timed requests;
  visual      placeholders per image (round(keep * N), N for unpruned);
  speed-ups   unpruned / this row (same model and run).
Model: --model PATH (a local LLaVA-1.5 / LLaVA-NeXT checkpoint, e.g. llava-hf/llava-1.5-7b-hf saved
locally; the command for a GPU), or by default a tiny random LLaVA-1.5 built here: 336 px / 14 =
576 visual tokens, 2-layer 64-wide CLIP, 4-layer 256-wide Llama, float32 (numbers from it say how
the engine's cost moves with fewer tokens, not what a 7B model gains). CPU rows are labelled
"CPU, tiny model, shared machine". --quick: 8 requests, 8 tokens, keep 0.098, one timed batch.
Writes vllm[_quick].csv (appended) and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from . import common

KEY = ("model", "requests", "keep")
KEEPS = (0.098, 0.222)
_WORDS = ("<pad> <s> </s> <unk> <image> USER: ASSISTANT: describe this image in detail . a the of and is "
          "red blue green cat dog left right top bottom").split()


def save_tiny_checkpoint(folder: str) -> str:
    """Save the tiny random LLaVA-1.5 (see the module docstring) with its tokenizer and processor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    text = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=_WORDS.index("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    path = os.path.join(folder, "tiny-llava-1.5")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _rename_vision_keys(os.path.join(path, "model.safetensors"))
    return path


def _rename_vision_keys(weights: str) -> None:
    """transformers 5.x saves the CLIP tower as ``vision_tower.embeddings...``; vLLM loads
    ``vision_tower.vision_model.*``."""
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    out = {}
    for k, v in state.items():
        if "vision_tower." in k and ".vision_model." not in k:
            head, tail = k.split("vision_tower.", 1)
            k = f"{head}vision_tower.vision_model.{tail}"
        out[k] = v
    save_file(out, weights, metadata={"format": "pt"})


def _run_config(spec: Dict, keep: Optional[float]) -> Dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OTPRUNE_KEEP", "BASELINE", "SUBSET_RATIO")}
    if keep is not None:
        env["OTPRUNE_KEEP"] = repr(keep)
    if spec["cpu"]:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # -P: neither the checkout (whose build metadata may be stale) nor bench/ (whose module names could
    # shadow packages vLLM imports) goes on sys.path; the engine sees the installed otprune.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
    spec = dict(spec, out=os.path.join(spec["tmp"], f"result-{keep}.json"))
    proc = subprocess.run([sys.executable, "-P", script, json.dumps(spec)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM run (keep={keep}) failed:\n{proc.stderr[-4000:]}")
    with open(spec["out"]) as f:
        return json.load(f)


def _quantile(xs: List[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def run(args: argparse.Namespace) -> List[dict]:
    import torch

    cpu = not torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or save_tiny_checkpoint(tmp)
        name = os.path.basename(os.path.normpath(model))
        spec = dict(model=model, cpu=cpu, tmp=tmp, dtype=args.dtype or ("float32" if cpu else "auto"),
                    requests=8 if args.quick else args.requests, max_tokens=8 if args.quick else args.max_tokens,
                    reps=1 if args.quick else args.reps, max_model_len=args.max_model_len)
        keeps = (0.098,) if args.quick else tuple(args.keeps)
        env = common.environment(torch.device("cpu" if cpu else "cuda"))
        label = "CPU, tiny model, shared machine" if cpu and not args.model else ("CPU" if cpu else "GPU")
        env["vllm"] = _vllm_version()
        results = {keep: _run_config(spec, keep) for keep in (None,) + keeps}
    full = results[None]["visual"]
    for keep in keeps:
        if results[keep]["visual"] == full:
            raise RuntimeError(f"OTPRUNE_KEEP={keep} left {full} visual tokens per image: the otprune vLLM "
                               "plugin is not active in this environment (is otprune installed here?)")
    rows = []
    base = None
    for keep, r in results.items():
        req_s = statistics.median(spec["requests"] / w for w in r["walls"])
        tok_s = statistics.median(t / w for t, w in zip(r["tokens"], r["walls"]))
        ttft50 = _quantile(r["ttfts"], 0.5) * 1e3 if r["ttfts"] else float("nan")
        ttft90 = _quantile(r["ttfts"], 0.9) * 1e3 if r["ttfts"] else float("nan")
        if base is None:
            base = (req_s, tok_s, ttft50)
        rows.append(dict(env, setting=label, model=name, requests=spec["requests"], max_tokens=spec["max_tokens"],
                         reps=spec["reps"], keep=1.0 if keep is None else keep,
                         method="unpruned" if keep is None else "otprune",
                         visual="/".join(map(str, r["visual"])), req_s=req_s, out_tok_s=tok_s,
                         ttft_p50_ms=ttft50, ttft_p90_ms=ttft90, req_s_speedup=req_s / base[0],
                         ttft_speedup=base[2] / ttft50 if ttft50 == ttft50 else float("nan")))
    stem = common.results_stem(args.out, "vllm", args.quick)
    common.append_csv(stem + ".csv", rows)
    write_report(stem)
    return rows


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def write_report(stem: str) -> None:
    rows = common.latest_rows(common.read_csv(stem + ".csv"), KEY)
    cols = ["setting", "device", "model", "requests", "max_tokens", "method", "keep", "visual", "req_s", "out_tok_s",
            "ttft_p50_ms", "ttft_p90_ms", "req_s_speedup", "ttft_speedup"]
    heads = ["setting", "device", "model", "concurrent requests", "output tokens", "method", "keep",
             "visual tokens / image", "requests/s", "output tokens/s", "TTFT p50 ms", "TTFT p90 ms",
             "requests/s speed-up", "TTFT speed-up"]
    text = ["# vLLM offline serving with and without the OTPrune plugin", "",
            "One engine per row (vllm.LLM, plugin switched by OTPRUNE_KEEP), a batch of concurrent image "
            "requests, greedy, fixed output length; medians over the timed batches. See bench/vllm_bench.py.",
            "", common.markdown_table(rows, cols, heads), "", common.env_line(rows), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local LLaVA / LLaVA-NeXT checkpoint folder (default: a tiny random LLaVA-1.5)")
    p.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS), help="kept ratios (default 0.098 0.222)")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests per batch (default 16)")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (default 16)")
    p.add_argument("--reps", type=int, default=3, help="timed batches per engine (default 3)")
    p.add_argument("--dtype", help="model dtype (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--max-model-len", type=int, default=2048, help="engine max_model_len (default 2048)")


def main(args: argparse.Namespace) -> int:
    rows = run(args)
    stem = common.results_stem(args.out, "vllm", args.quick)
    print(open(stem + ".md").read())
    print(f"{len(rows)} rows appended to {stem}.csv; wrote {stem}.md")
    return 0

