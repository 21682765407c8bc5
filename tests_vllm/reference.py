"""transformers references for the vLLM runs: the same checkpoint, prompts and images."""

from __future__ import annotations

from typing import Dict, List

import torch

import engine_run
import tiny_models


def image_runs(ids: List[int], image_token_id: int) -> List[int]:
    """Lengths of the runs of ``image_token_id`` in ``ids`` (one run per image when images are
    separated by text)."""
    runs, n = [], 0
    for t in list(ids) + [None]:
        if t == image_token_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def transformers_reference(path: str, keep: float) -> List[Dict[str, list]]:
    """Per prompt of engine_run.prompts(): ``n_tokens`` (visual tokens per image, unpruned), the
    ``image_token_id``,
    ``unpruned`` and ``pruned`` (greedy ids, the latter with ``otprune.apply(model, keep=keep)``)."""
    import otprune

    model, processor = tiny_models.load_tiny(path)
    model_type = model.config.model_type
    imgs = engine_run.images(model_type)
    out = []
    for text, idx in engine_run.prompts(model_type):
        inputs = processor(images=[imgs[i] for i in idx], text=text, return_tensors="pt")
        n_tokens = image_runs(inputs["input_ids"][0].tolist(), model.config.image_token_id)
        row = dict(n_tokens=n_tokens, image_token_id=model.config.image_token_id)
        for name in ("unpruned", "pruned"):
            if name == "pruned":
                otprune.apply(model, keep=keep)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=engine_run.MAX_TOKENS, do_sample=False)
            row[name] = ids[0, inputs["input_ids"].shape[1]:].tolist()
        otprune.revert(model)
        out.append(row)
    return out
