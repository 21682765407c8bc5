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


def qwen_video_reference(path: str, unpruned_ids: List[int], prompt_ids: List[int], keep: float = None,
                         consecutive: bool = False) -> List[int]:
    """Greedy ids of transformers' Qwen2.5-VL / Qwen3-VL on engine_run.video() with the prompt
    ``prompt_ids``.

    keep None: every video token (``prompt_ids`` the unpruned prompt). Otherwise the kept tokens of
    otprune's selection (``select_kept`` on the encoder's main features, as the plugin does), their
    deepstack features alike, placed at the prompt's video placeholders in order. Every token sits at
    the position it has in ``unpruned_ids`` (a kept token: its own token's) and decoding goes on from
    the unpruned prompt's next position; ``consecutive``: the kept tokens at consecutive positions
    from the first one's instead (what a missing position fix would give). Positions: Qwen3-VL,
    transformers' ``get_rope_index``; Qwen2.5-VL, vLLM's own (transformers 5.x resumes the text after
    a video at another position than vLLM, whose layout the plugin keeps)."""
    import transformers

    from otprune.autopatch import settings_from_env
    from otprune.integrations._sequence import select_kept

    model, _ = tiny_models.load_tiny(path)
    frames, meta = engine_run.video()
    processor = transformers.AutoVideoProcessor.from_pretrained(path)
    inputs = processor(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    grid = inputs["video_grid_thw"]
    with torch.no_grad():
        enc = model.model.get_video_features(inputs["pixel_values_videos"], grid, return_dict=True)
    main = enc.pooler_output[0]
    deep = [f[0] for f in getattr(enc, "deepstack_features", None) or ()]
    video_id = model.config.video_token_id
    full = torch.tensor([unpruned_ids])
    pads = (full[0] == video_id).nonzero().flatten()
    if model.config.model_type == "qwen3_vl":
        positions = model.model.get_rope_index(full, (full == video_id).int() * 2, video_grid_thw=grid)[0][:, 0]
    else:
        positions = _vllm_video_positions(model.config, unpruned_ids, grid[0], int(pads[0]), len(pads),
                                          processor.temporal_patch_size / meta["fps"])
    if keep is None:
        kept = torch.arange(main.shape[0])
    else:
        settings = settings_from_env({"OTPRUNE_KEEP": str(keep)})  # what the "env" engine run reads
        kept = select_kept([main], settings.keep, settings.select_kwargs)[0]
    # each prompt token's column in the unpruned prompt: text in order, the j-th placeholder kept[j]'s
    text = iter(i for i, t in enumerate(unpruned_ids) if t != video_id)
    slots = iter(pads[kept].tolist())
    cols = [next(slots) if t == video_id else next(text) for t in prompt_ids]
    pos = positions[:, cols]
    if consecutive:
        is_video = torch.tensor(prompt_ids) == video_id
        first = int(is_video.nonzero()[0])
        pos[:, is_video] = pos[:, first : first + 1] + torch.arange(int(is_video.sum()))
    encoded = type(enc)(pooler_output=(main[kept],), **({"deepstack_features": [(f[kept],) for f in deep]} if deep else {}))
    ids, nxt, out = list(prompt_ids), int(positions.max()) + 1, []
    for step in range(engine_run.MAX_TOKENS):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), position_ids=pos.unsqueeze(1),
                           mm_encoder_outputs={"video": encoded}).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
        pos = torch.cat([pos, torch.full((3, 1), nxt + step)], dim=1)
    return out


def feature_spec(modality: str, grid, seconds, offset: int, length: int):
    """A vLLM multimodal feature as the Qwen position code reads it: the item's grid (t, h, w), its
    seconds per grid step (videos; None or 0 for none) and its placeholder range."""
    from types import SimpleNamespace

    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.as_tensor(grid))}
    if seconds:
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
    return MultiModalFeatureSpec(data=data, modality=modality, identifier="x",
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def _vllm_video_positions(config, ids: List[int], grid: torch.Tensor, offset: int, length: int,
                          seconds: float) -> torch.Tensor:
    """(3, len(ids)) M-RoPE positions vLLM's own Qwen2.5-VL gives a prompt with one video."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as cls

    holder = cls.__new__(cls)
    object.__setattr__(holder, "config", config)
    return cls.get_mrope_input_positions(holder, ids, [feature_spec("video", grid, seconds, offset, length)])[0]
