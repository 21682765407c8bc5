"""One engine configuration of `python -m bench vllm`, run as a script in its own process.

    python -P bench/vllm_worker.py SPEC_JSON

The environment decides the plugin state (OTPRUNE_KEEP set or not). Writes JSON to spec["out"]: per
timed batch its wall time (s) and output tokens, every request's time to first token (s), and the
placeholder counts per image seen.
"""

import json
import sys
import time

PROMPT = "USER: <image> describe this image in detail . ASSISTANT:"


def images(n: int, seed: int, side: int = 336):
    """``n`` random RGB images (PIL), distinct per seed so that no cache serves them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)) for _ in range(n)]


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
                  limit_mm_per_prompt={"image": 1}, max_num_seqs=spec["requests"], disable_log_stats=False)
    if spec["cpu"]:
        kwargs["enforce_eager"] = True
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)

    def batch(seed: int):
        reqs = [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images(spec["requests"], seed)]
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        return time.perf_counter() - t0, outs

    batch(10_000)  # warm-up
    image_id = llm.llm_engine.model_config.hf_config.image_token_index
    walls, tokens, ttfts, visual = [], [], [], set()
    for rep in range(spec["reps"]):
        wall, outs = batch(rep)
        walls.append(wall)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
        ttfts += [o.metrics.first_token_latency for o in outs if o.metrics is not None]
        visual |= {sum(t == image_id for t in o.prompt_token_ids) for o in outs}
    return dict(walls=walls, tokens=tokens, ttfts=ttfts, visual=sorted(visual))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/vllm_worker.py SPEC_JSON (run by python -m bench vllm)")
    spec = json.loads(sys.argv[1])
    result = run(spec)
    with open(spec["out"], "w") as f:
        json.dump(result, f)
