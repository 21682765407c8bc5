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
    """Greedy ids of transformers' Qwen3-VL on engine_run.video() with the prompt ``prompt_ids``.

    keep None: every video token (``prompt_ids`` the unpruned prompt). Otherwise the kept tokens of
    otprune's selection (``select_kept`` on the encoder's main features, as the plugin does), their
    deepstack features alike, placed at the prompt's video placeholders in order; every token at the
    position transformers' ``get_rope_index`` gives it in ``unpruned_ids`` (a kept token: its own
    token's), decoding on from the unpruned prompt's next position. ``consecutive``: the kept tokens
    at consecutive positions from the first one's instead (what a missing position fix would give)."""
    import transformers

    from otprune.autopatch import settings_from_env
    from otprune.integrations._sequence import select_kept

    model, _ = tiny_models.load_tiny(path)
    frames, meta = engine_run.video()
    inputs = transformers.AutoVideoProcessor.from_pretrained(path)(
        videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    grid = inputs["video_grid_thw"]
    with torch.no_grad():
        enc = model.model.get_video_features(inputs["pixel_values_videos"], grid, return_dict=True)
    main, deep = enc.pooler_output[0], [f[0] for f in enc.deepstack_features]
    video_id = model.config.video_token_id
    full = torch.tensor([unpruned_ids])
    positions = model.model.get_rope_index(full, (full == video_id).int() * 2, video_grid_thw=grid)[0][:, 0]
    pads = (full[0] == video_id).nonzero().flatten()
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
    encoded = type(enc)(pooler_output=(main[kept],), deepstack_features=[(f[kept],) for f in deep])
    ids, nxt, out = list(prompt_ids), int(positions.max()) + 1, []
    for step in range(engine_run.MAX_TOKENS):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), position_ids=pos.unsqueeze(1),
                           mm_encoder_outputs={"video": encoded}).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
        pos = torch.cat([pos, torch.full((3, 1), nxt + step)], dim=1)
    return out
