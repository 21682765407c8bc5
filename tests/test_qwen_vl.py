"""transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL integration: batched, left-padded generate() with pruning.

Tiny random models (tests/qwen_tiny.py), no downloads. What the language model received is read
with pre-hooks on it and on the inner model, never from otprune's bookkeeping; the references are
the unpatched model's own run (positions, keep = 1.0) and the unpatched model fed hand-pruned
inputs through its public ``mm_encoder_outputs`` argument.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import otprune  # noqa: E402
from otprune._validate import budget  # noqa: E402
from otprune.integrations import qwen_vl  # noqa: E402
from qwen_tiny import FAMILIES, tiny_qwen, tiny_qwen_inputs  # noqa: E402

N_IMAGES = (2, 1)  # two images in the first prompt, one in the second (all of different sizes)
NEW_TOKENS = 3
KEEP = 0.3


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, processor = tiny_qwen(request.param, seed=0)
    inputs = tiny_qwen_inputs(processor, N_IMAGES)
    yield request.param, model, inputs
    otprune.revert(model)


def _generate(model, **kw):
    return model.generate(
        **kw, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )


class _Seen:
    """Pre-hooks recording the inner model's input_ids and the language model's inputs per call."""

    def __init__(self, model):
        self.ids, self.lm = [], []
        self._h = [
            model.model.register_forward_pre_hook(self._inner, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(self._lm, with_kwargs=True),
        ]

    def _inner(self, module, args, kwargs):
        self.ids.append(kwargs.get("input_ids"))

    def _lm(self, module, args, kwargs):
        self.lm.append({k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, list))})

    def close(self):
        for h in self._h:
            h.remove()


def _run(model, generate: bool, **kw):
    """(generate's or forward's output, what the hooks saw)."""
    seen = _Seen(model)
    try:
        with torch.no_grad():
            out = _generate(model, **kw) if generate else model(**kw)
    finally:
        seen.close()
    return out, seen


def _features(model, inputs):
    """Per-image merged visual tokens [(N_j, D)] and the vision output, from the unpatched model."""
    with torch.no_grad():
        out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output), out


def _expected(model, inputs, feats, keep, **select_kwargs):
    """Hand-computed (kept indices per image, ascending, (B, T) bool mask of the prompt positions
    kept): one otprune.select per image, image j owning the j-th run of image tokens."""
    kept = [sorted(otprune.select(f, keep, **select_kwargs).tolist()) for f in feats]
    image_id = model.config.image_token_id
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    j, t = 0, 0
    for b, row in enumerate(inputs["input_ids"].tolist()):
        for i, tok in enumerate(row):
            if tok != image_id:
                mask[b, i] = True
                continue
            mask[b, i] = t in kept[j]
            t += 1
            if t == feats[j].shape[0]:
                j, t = j + 1, 0
    return kept, mask


def _right_aligned(x, mask_b, length):
    """The entries of 1-D ``x`` where ``mask_b``, as the last ones of a row of ``length``."""
    return x[mask_b], length - int(mask_b.sum())


def _reversed_picks(real):
    """``real`` select with each row's picks reversed (-1 padding kept last): an order that is not
    ascending, as the release's list(set()) order often is at real sizes (these images are tiny)."""
    def select(x, keep, **kw):
        idx = real(x, keep, **kw)
        rows = [torch.cat([r[r >= 0].flip(0), r[r < 0]]) for r in idx.reshape(-1, idx.shape[-1])]
        return torch.stack(rows).reshape(idx.shape)
    return select


@pytest.mark.parametrize("select_kwargs", [{}, {"compat": "official"}], ids=["exact", "official"])
def test_generate_prunes_batch(family, select_kwargs, monkeypatch):
    """Under compat="official" too, the kept tokens are fed in ascending order with their own
    positions (Qwen keeps ascending: the release's order is LLaVA's); select is made to return an
    unsorted order there."""
    name, model, inputs = family
    feats, _ = _features(model, inputs)
    n = [f.shape[0] for f in feats]
    assert len(set(n)) > 1, "the test images should give different per-image token counts"
    if select_kwargs:
        monkeypatch.setattr(otprune.api, "select", _reversed_picks(otprune.api.select))
    base, seen_base = _run(model, True, **inputs)
    kept, mask = _expected(model, inputs, feats, KEEP, **select_kwargs)

    otprune.apply(model, keep=KEEP, **select_kwargs)
    try:
        out, seen = _run(model, True, **inputs)
    finally:
        otprune.revert(model)

    ids = seen.ids[0]
    image_id = model.config.image_token_id
    # Visual tokens reaching the language model: sum(k), per row as the prompts hold them.
    assert int((ids == image_id).sum()) == sum(budget(KEEP, x) for x in n)
    assert int((ids == image_id).sum()) == sum(len(k) for k in kept)
    prefill = seen.lm[0]
    length = prefill["inputs_embeds"].shape[1]
    assert length == int(mask.sum(1).max())
    pos, pos_base = prefill["position_ids"], seen_base.lm[0]["position_ids"]
    assert pos.shape[0] == pos_base.shape[0] == 4
    row_images = [[0, 1], [2]]
    for b in range(ids.shape[0]):
        keep_b = mask[b] & inputs["attention_mask"][b].bool()
        pad = length - int(keep_b.sum())
        # Text and kept visual tokens in their order, their original 3-D positions (convention a).
        assert torch.equal(ids[b, pad:], inputs["input_ids"][b][keep_b])
        assert torch.equal(pos[:, b, pad:], pos_base[:, b, keep_b])
        # The kept rows are otprune.select's picks on get_image_features.
        vis = prefill["inputs_embeds"][b, pad:][ids[b, pad:] == image_id]
        expect = torch.cat([feats[j][kept[j]] for j in row_images[b]])
        assert torch.equal(vis, expect)
    # Decoding continues after the unpruned prompt's last position.
    for step in range(1, NEW_TOKENS):
        assert torch.equal(seen.lm[step]["position_ids"], seen_base.lm[step]["position_ids"])
    # The caller's prompt is returned in front of the new tokens; the cache holds the pruned prompt.
    t = inputs["input_ids"].shape[1]
    assert out.sequences.shape == base.sequences.shape
    assert torch.equal(out.sequences[:, :t], inputs["input_ids"])
    assert out.past_key_values.get_seq_length() == length + NEW_TOKENS - 1
    if name.startswith("qwen3"):  # deepstack features pruned with the same indices
        _, vision = _features(model, inputs)
        for level, got in zip(vision.deepstack_features, prefill["deepstack_visual_embeds"]):
            level = torch.split(level, n) if isinstance(level, torch.Tensor) else level  # 5.17: not split
            assert torch.equal(got, torch.cat([level[j][kept[j]] for j in range(len(feats))]))
        assert torch.equal(prefill["visual_pos_masks"], ids == image_id)


def test_generate_matches_hand_pruned_reference(family):
    """The patched generate equals the unpatched model fed the hand-pruned prompt, positions and
    features (``mm_encoder_outputs``)."""
    _, model, inputs = family
    if "mm_encoder_outputs" not in inspect.signature(type(model).forward).parameters:
        pytest.skip("this transformers release's forward takes no mm_encoder_outputs (added in 5.18)")
    feats, vision = _features(model, inputs)
    kept, mask = _expected(model, inputs, feats, KEEP)
    _, seen_base = _run(model, True, **inputs)
    pos_full = seen_base.lm[0]["position_ids"]
    length = int(mask.sum(1).max())
    b_, r = inputs["input_ids"].shape[0], pos_full.shape[0]
    ids = torch.zeros((b_, length), dtype=torch.long)
    att = torch.zeros((b_, length), dtype=torch.long)
    pos = torch.zeros((r, b_, length), dtype=torch.long)
    for b in range(b_):
        m = mask[b]
        pad = length - int(m.sum())
        ids[b, pad:] = inputs["input_ids"][b][m]
        att[b, pad:] = inputs["attention_mask"][b][m]
        pos[:, b, pad:] = pos_full[:, b, m]
    vision.pooler_output = tuple(f[k] for f, k in zip(feats, kept))
    if getattr(vision, "deepstack_features", None) is not None:
        vision.deepstack_features = [tuple(f[k] for f, k in zip(level, kept)) for level in vision.deepstack_features]
    with torch.no_grad():
        ref = _generate(
            model, input_ids=ids, attention_mask=att, position_ids=pos, mm_encoder_outputs={"image": vision}
        )
    labels = torch.where(att.bool(), ids, -100)  # the labels of the kept positions, padding ignored
    with torch.no_grad():
        ref_fwd = model(input_ids=ids, attention_mask=att, position_ids=pos[1:], labels=labels,
                        mm_encoder_outputs={"image": vision})
    otprune.apply(model, keep=KEEP)
    try:
        with torch.no_grad():
            out = _generate(model, **inputs)
            fwd = model(**inputs, labels=torch.where(inputs["attention_mask"].bool(), inputs["input_ids"], -100))
    finally:
        otprune.revert(model)
    t = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, t:], ref.sequences[:, length:])
    for a, e in zip(out.logits, ref.logits):
        assert torch.equal(a, e)
    # forward: the same pruned logits, and the loss over the kept positions' labels.
    torch.testing.assert_close(fwd.logits, ref_fwd.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(fwd.loss, ref_fwd.loss, rtol=0, atol=1e-6)


def test_forward_positions_and_labels(family):
    _, model, inputs = family
    feats, _ = _features(model, inputs)
    _, mask = _expected(model, inputs, feats, KEEP)
    nxt = torch.full((mask.shape[0], 1), 7)
    base, seen_base = _run(model, False, **inputs)
    _, step_base = _run(model, False, input_ids=nxt, past_key_values=base.past_key_values)
    otprune.apply(model, keep=KEEP)
    try:
        out, seen = _run(model, False, **inputs, labels=inputs["input_ids"])
        # A hand-written decoding step (cache, no mask): rope_deltas continue the unpruned positions.
        _, step = _run(model, False, input_ids=nxt, past_key_values=out.past_key_values)
    finally:
        otprune.revert(model)
    assert torch.equal(step.lm[0]["position_ids"], step_base.lm[0]["position_ids"])
    pos, pos_base = seen.lm[0]["position_ids"], seen_base.lm[0]["position_ids"]
    assert pos.shape[0] == pos_base.shape[0]
    length = out.logits.shape[1]
    for b in range(mask.shape[0]):
        keep_b = mask[b] & inputs["attention_mask"][b].bool()
        assert torch.equal(pos[:, b, length - int(keep_b.sum()):], pos_base[:, b, keep_b])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("layer", [0, "inner"])
def test_keep_all_is_identity_and_revert_restores(family, layer):
    name, model, inputs = family
    layer = 0 if layer == 0 else (2 if name.startswith("qwen3") else 1)
    base = _generate(model, **inputs)
    with torch.no_grad():
        fwd = model(**inputs).logits
    otprune.apply(model, keep=1.0, layer=layer)
    try:
        got = _generate(model, **inputs)
        with torch.no_grad():
            got_fwd = model(**inputs).logits
    finally:
        otprune.revert(model)
    assert torch.equal(got.sequences, base.sequences)
    for a, b in zip(got.logits, base.logits):
        if layer == 0:
            assert torch.equal(a, b)
        else:  # a rebuilt 4-D mask instead of the model's own: same values up to rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if layer == 0:
        assert torch.equal(got_fwd, fwd)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert qwen_vl._ATTR not in model.__dict__
    again = _generate(model, **inputs)
    assert torch.equal(again.sequences, base.sequences)
    for a, b in zip(again.logits, base.logits):
        assert torch.equal(a, b)


def test_inner_layer_prunes(family):
    name, model, inputs = family
    layer = 2 if name.startswith("qwen3") else 1
    feats, _ = _features(model, inputs)
    n = [f.shape[0] for f in feats]
    seen = []
    block = model.model.language_model.layers[layer]
    otprune.apply(model, keep=KEEP, layer=layer)  # its pre-hook runs before the one below
    h = block.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_embeddings"][0].shape), with_kwargs=True
    )
    try:
        out = _generate(model, **inputs)
    finally:
        otprune.revert(model)
        h.remove()
    # Layers >= L see each row's prompt (its padding included) less the dropped visual tokens.
    t = inputs["input_ids"].shape[1]
    assert seen[0][1] == max(t - sum(n[j] - budget(KEEP, n[j]) for j in rows) for rows in ([0, 1], [2]))
    assert all(s[1] == 1 for s in seen[1:]) and len(seen) == NEW_TOKENS
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS


def test_bad_settings(family, monkeypatch):
    name, model, inputs = family
    with pytest.raises(ValueError, match="decoder layers"):
        otprune.apply(model, keep=0.25, layer=len(model.model.language_model.layers))
    with pytest.raises(ValueError, match="keep"):
        otprune.apply(model, keep=1.5)
    if name.startswith("qwen3"):
        with pytest.raises(NotImplementedError, match="deepstack"):
            otprune.apply(model, keep=0.25, layer=1)
    otprune.apply(model, keep=0.25)
    try:
        with pytest.raises(NotImplementedError, match="num_beams"):
            model.generate(**inputs, max_new_tokens=2, num_beams=2)
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
    finally:
        otprune.revert(model)
    monkeypatch.setattr(qwen_vl, "installed_version", lambda: "5.16.0")
    with pytest.raises(RuntimeError, match="transformers 5.16.0 is not supported"):
        otprune.apply(model, keep=0.25)
    assert "generate" not in model.__dict__


def test_video_selected_over_all_its_tokens():
    """A hand-made video (2 temporal groups of 4 x 4 patches = 8 merged tokens) next to an image."""
    model, processor = tiny_qwen("qwen2_5_vl", seed=0)
    inputs = tiny_qwen_inputs(processor, (1,))
    cfg = model.config
    patch = cfg.vision_config.patch_size
    grid = torch.tensor([[2, 4, 4]])
    n_video = int(grid.prod()) // 4
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(int(grid.prod()), 3 * 2 * patch * patch, generator=g)
    tok = processor.tokenizer.convert_tokens_to_ids
    head = [tok("<|vision_start|>")] + [cfg.video_token_id] * n_video + [tok("<|vision_end|>")]
    ids = torch.cat([torch.tensor([head]), inputs["input_ids"]], dim=1)
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.cat([torch.tensor([[0] + [2] * n_video + [0]]), inputs["mm_token_type_ids"]], 1),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        pixel_values_videos=videos,
        video_grid_thw=grid,
    )
    _, seen_base = _run(model, True, **kw)
    otprune.apply(model, keep=0.5)
    try:
        out, seen = _run(model, True, **kw)
    finally:
        otprune.revert(model)
    got = seen.ids[0]
    n_image = int((ids == cfg.image_token_id).sum())
    assert int((got == cfg.video_token_id).sum()) == budget(0.5, n_video)
    assert int((got == cfg.image_token_id).sum()) == budget(0.5, n_image)
    with torch.no_grad():
        vfeat = model.get_video_features(videos, grid, return_dict=True).pooler_output[0]
    kept_v = otprune.select(vfeat, 0.5)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[1:1 + n_video] = False
    keep[1 + kept_v] = True
    # The video's kept tokens (and the text around them) keep their original 3-D positions.
    head_kept = int(keep[: 2 + n_video].sum())
    pos, pos_base = seen.lm[0]["position_ids"][:, 0], seen_base.lm[0]["position_ids"][:, 0]
    assert torch.equal(pos[:, :head_kept], pos_base[:, keep][:, :head_kept])
    assert out.sequences.shape[1] == ids.shape[1] + NEW_TOKENS


ENV_SCRIPT = r"""
import json, os, sys
with open(sys.argv[1]) as f:
    exec(f.read())  # what site.py does with the .pth's line
sys.path.insert(0, sys.argv[2])
import transformers
classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
           "Qwen3VLMoeForConditionalGeneration")
report = {"class_patched": [hasattr(getattr(transformers, c).__init__, "__otprune_cls__") for c in classes]}
import torch
from qwen_tiny import tiny_qwen, tiny_qwen_inputs
model, processor = tiny_qwen("qwen2_5_vl", seed=0)
report["patched"] = "_otprune_qwen" in model.__dict__
inputs = tiny_qwen_inputs(processor, (2, 1))
ids = []
model.model.register_forward_pre_hook(lambda m, a, k: ids.append(k["input_ids"]), with_kwargs=True)
model.generate(**inputs, max_new_tokens=2, do_sample=False)
report["visual"] = int((ids[0] == model.config.image_token_id).sum())
report["n"] = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
print(json.dumps(report))
"""


def test_env_route_patches_qwen(tmp_path):
    """OTPRUNE_KEEP in the environment: the ``.pth`` hook patches the Qwen classes at import and
    the model built from them prunes (a subprocess, as an unchanged program would run)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run.py"
    script.write_text(ENV_SCRIPT)
    env = dict(os.environ, OTPRUNE_KEEP="0.25", PYTHONPATH=root)
    env.pop("BASELINE", None)
    proc = subprocess.run(
        [sys.executable, str(script), os.path.join(root, "otprune_autopatch.pth"), os.path.dirname(__file__)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["class_patched"] == [True, True, True, True]
    assert report["patched"]
    assert report["visual"] == sum(budget(0.25, n) for n in report["n"])


def test_otprune_run_on_tiny_saved_qwen(tmp_path):
    """``otprune run`` loads a saved tiny Qwen2.5-VL (tokenizer + image processor, no torchvision)
    and reports the visual-token count its language model really saw."""
    import os
    import subprocess
    import sys

    from PIL import Image

    model, processor = tiny_qwen("qwen2_5_vl", seed=0)
    folder = tmp_path / "qwen"
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (112, 84), (200, 30, 30)).save(photo)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-m", "otprune", "run", "--model", str(folder), "--image", str(photo), "--prompt", "what ?",
         "--keep", "0.25", "--max-new-tokens", "3", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=root),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in res.stdout.splitlines()
              if line.split()[:1] in (["unpruned"], ["pruned"])}
    assert counts["unpruned"] == (112 // 14) * (84 // 14) // 4
    assert counts["pruned"] == budget(0.25, counts["unpruned"])


def test_bench_e2e_qwen_shapes():
    """The e2e benchmark's Qwen2.5-VL shapes: the tiny one encodes to 256 merged tokens per image
    and prefills; the 7B one has Qwen2.5-VL-7B's size (built on the meta device, no memory)."""
    from bench import e2e

    model = e2e.build_model("tiny-qwen2.5-vl", torch.device("cpu"), torch.float32)
    feats = e2e.encode(model, e2e.image_inputs("tiny-qwen2.5-vl", 2, torch.device("cpu"), torch.float32))
    assert feats.shape == (2, 256, 256)
    token, _ = e2e.prefill(model, e2e.keep_tokens(feats, "otprune", 0.098))
    assert token.shape == (2,)
    big = e2e.build_model("qwen2.5-vl-7b", torch.device("meta"), torch.float16)
    assert 8.2e9 < sum(p.numel() for p in big.parameters()) < 8.4e9
