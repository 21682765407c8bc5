"""transformers LLaVA / LLaVA-NeXT integration: batched, left-padded generate() with pruning.

Tiny random models (tests/hf_tiny.py), no downloads. What the language model saw is read with a
pre-hook on it, never from otprune's bookkeeping; the reference is the unpatched model fed
hand-pruned embeddings. layer > 0: hooks on the decoder layers check what each layer saw, the
reference picks come from the unpatched model's hidden states, and cached decoding is checked
against re-running the pruned prefill.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import otprune  # noqa: E402
from hf_tiny import tiny_inputs, tiny_llava, tiny_llava_next  # noqa: E402
from otprune.integrations import hf_llava  # noqa: E402

FAMILIES = {"llava": tiny_llava, "llava_next": tiny_llava_next}
N_IMAGES = (2, 1)  # two images in the first prompt, one in the second
NEW_TOKENS = 4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, processor = FAMILIES[request.param](seed=0)
    inputs = tiny_inputs(processor, N_IMAGES)
    yield request.param, model, inputs
    otprune.revert(model)


def _generate(model, **kw):
    return model.generate(
        **kw, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )


def _image_features(model, inputs):
    """Per-image final visual-token sequences [(N_j, D)], computed with the unpatched model."""
    kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            **kw,
        )
        feats = list(getattr(out, "pooler_output", out))
        if feats[0].ndim == 3:  # older releases (e.g. 4.52) pack NeXT crops in forward
            packed, lens = model.model.pack_image_features(
                feats,
                inputs["image_sizes"],
                model.config.vision_feature_select_strategy,
                model.model.image_newline,
            )
            feats = list(torch.split(packed, lens.tolist()))
    return feats


def _images_per_row(inputs, image_id, n_tokens):
    """Image indices per prompt row, from the image-token counts of input_ids."""
    rows, j = [], 0
    for row in inputs["input_ids"]:
        count, mine = int((row == image_id).sum()), []
        while count > 0:
            mine.append(j)
            count -= n_tokens[j]
            j += 1
        assert count == 0
        rows.append(mine)
    return rows


def _manual_inputs(model, inputs, feats, keep, **select_kwargs):
    """Hand-pruned (input_ids, attention_mask, inputs_embeds, per-image kept indices, labels):
    a per-token loop over each row, new left padding in front. Each image's kept features are
    fed in ascending order, or with compat="official" in otprune.select's (the release's) order."""
    image_id = model.config.image_token_id
    n = [f.shape[0] for f in feats]
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lengths = torch.tensor(n) if len(set(n)) > 1 else None
    picks = otprune.select(padded, keep, lengths=lengths, **select_kwargs)
    kept = [[int(i) for i in row if i >= 0] for row in picks]
    if select_kwargs.get("compat") != "official":
        kept = [sorted(k) for k in kept]
    vis = [feats[j][k] for j, k in enumerate(kept)]
    rows, j, t = [], 0, 0
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        out = []
        for tok, m in zip(ids, mask):
            if tok != image_id:
                out.append((tok, m))
                continue
            if t in kept[j]:
                out.append((tok, m))
            t += 1
            if t == n[j]:
                j, t = j + 1, 0
        rows.append(out)
    length = max(len(r) for r in rows)
    pad = model.generation_config.pad_token_id
    ids = torch.tensor([[pad] * (length - len(r)) + [tok for tok, _ in r] for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [m for _, m in r] for r in rows])
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[ids == image_id] = torch.cat(vis).to(embeds.dtype)
    labels = torch.tensor([[-100] * (length - len(r)) + [tok for tok, _ in r] for r in rows])
    return ids, mask, embeds, kept, labels


class _SeenByLM:
    """Pre-hook on the language model recording the inputs_embeds of every call."""

    def __init__(self, model):
        self.embeds = []
        self._h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.embeds.append(kwargs["inputs_embeds"].detach().clone())

    def close(self):
        self._h.remove()


@pytest.mark.parametrize(
    "keep, select_kwargs",
    [(0.25, {}), (3, {}), (0.2, {"compat": "official"})],
    ids=["ratio", "count", "official"],
)
def test_generate_prunes_batch(family, keep, select_kwargs):
    name, model, inputs = family
    image_id = model.config.image_token_id
    feats = _image_features(model, inputs)
    n = [f.shape[0] for f in feats]
    if name == "llava_next":
        assert len(set(n)) > 1, "the NeXT test images should give different per-image token counts"
    per_row = _images_per_row(inputs, image_id, n)
    ids, mask, embeds, kept, _ = _manual_inputs(model, inputs, feats, keep, **select_kwargs)
    official = select_kwargs.get("compat") == "official"
    if official:  # the release's list(set()) order, unsorted for some image here
        assert any(k != sorted(k) for k in kept)
    ref = _generate(model, input_ids=ids, attention_mask=mask, inputs_embeds=embeds)

    otprune.apply(model, keep=keep, **select_kwargs)
    seen = _SeenByLM(model)
    try:
        out = _generate(model, **inputs)
    finally:
        seen.close()
        otprune.revert(model)

    prefill = seen.embeds[0]
    assert prefill.shape[1] == ids.shape[1]
    embed = model.get_input_embeddings()
    for b, images in enumerate(per_row):
        row = prefill[b]
        used = torch.zeros(row.shape[0], dtype=torch.bool)
        for j in images:
            # Positions of this row holding one of image j's (unpruned) visual features.
            eq = (row[:, None, :] == feats[j][None].to(row.dtype)).all(-1)  # (L, N_j)
            pos = eq.any(1).nonzero().flatten()
            expect = otprune._validate.budget(keep, n[j])
            assert len(pos) == expect, f"image {j}: LM saw {len(pos)} visual tokens, expected {expect}"
            src = eq[pos].float().argmax(1)
            if not official:
                assert torch.all(src[1:] > src[:-1]), "kept visual tokens must keep their original order"
            assert src.tolist() == kept[j], "kept visual tokens reach the LM in select's order"
            used[pos] = True
        real = (inputs["attention_mask"][b] == 1) & (inputs["input_ids"][b] != image_id)
        text_ids = inputs["input_ids"][b][real]
        text = row[~used][-len(text_ids):]
        assert torch.equal(text, embed(text_ids).detach()), "text tokens changed or reordered"
        n_pad = int((~used).sum()) - len(text_ids)
        assert n_pad == int((mask[b] == 0).sum())

    # The KV cache holds the pruned prompt and the new tokens only.
    assert out.past_key_values.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    # The caller's prompt is returned unchanged in front of the new tokens.
    t = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :t], inputs["input_ids"])
    assert torch.equal(out.sequences[:, t:], ref.sequences[:, ids.shape[1]:])
    for a, r in zip(out.logits, ref.logits):
        assert torch.equal(a, r)


def test_forward_prunes(family):
    _, model, inputs = family
    feats = _image_features(model, inputs)
    ids, mask, embeds, _, labels = _manual_inputs(model, inputs, feats, 0.25)
    with torch.no_grad():
        ref = model(attention_mask=mask, inputs_embeds=embeds, labels=labels)
        otprune.apply(model, keep=0.25)
        try:
            got = model(**inputs, labels=inputs["input_ids"])
            positional = model(inputs["input_ids"], inputs["pixel_values"], **{
                k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")
            })
        finally:
            otprune.revert(model)
    assert got.logits.shape == ref.logits.shape and torch.equal(got.logits, ref.logits)
    assert torch.equal(got.loss, ref.loss)
    assert torch.equal(positional.logits, ref.logits)


def test_generate_needs_cache(family):
    _, model, inputs = family
    otprune.apply(model, keep=0.25)
    try:
        with pytest.raises(ValueError, match="use_cache"):
            model.generate(**inputs, max_new_tokens=2, use_cache=False)
        # positional input_ids are accepted like the original generate's
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        a = model.generate(inputs["input_ids"], **rest, max_new_tokens=2, do_sample=False)
        b = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        otprune.revert(model)
    assert torch.equal(a, b)


def test_revert_and_reapply(family):
    _, model, inputs = family
    cls_generate, cls_forward = type(model).generate, type(model).forward
    base = _generate(model, **inputs)
    with torch.no_grad():
        base_fwd = model(**inputs).logits

    otprune.apply(model, keep=0.25)
    once = _generate(model, **inputs)
    otprune.apply(model, keep=0.5, layer=1)
    otprune.apply(model, keep=0.25)  # applying again replaces the settings, no double wrapping
    assert not any(block._forward_pre_hooks for block in model.model.language_model.layers)
    twice = _generate(model, **inputs)
    assert all(torch.equal(a, b) for a, b in zip(once.logits, twice.logits))
    assert not torch.equal(once.logits[0], base.logits[0])
    assert type(model).generate is cls_generate and type(model).forward is cls_forward  # class untouched

    otprune.revert(model)
    otprune.revert(model)  # no-op on an unpatched model
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
    again = _generate(model, **inputs)
    assert torch.equal(again.sequences, base.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, base.logits))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_fwd)


def test_text_only_call_passes_through(family):
    _, model, inputs = family
    text = {"input_ids": inputs["input_ids"][:, -3:], "attention_mask": inputs["attention_mask"][:, -3:]}
    base = _generate(model, **text)
    otprune.apply(model, keep=0.25)
    try:
        got = _generate(model, **text)
    finally:
        otprune.revert(model)
    assert torch.equal(got.sequences, base.sequences)


def test_bad_settings_rejected_before_patching(family):
    _, model, _ = family
    with pytest.raises(ValueError, match="decoder layers"):
        otprune.apply(model, keep=0.25, layer=3)
    with pytest.raises(ValueError, match="layer"):
        otprune.apply(model, keep=0.25, layer=-1)
    with pytest.raises(ValueError, match="keep"):
        otprune.apply(model, keep=1.5)
    with pytest.raises(TypeError):
        otprune.apply(model, keep=0.25, gama=0.1)
    with pytest.raises(ValueError, match="compat='official'.*'cpu'"):
        otprune.apply(model, keep=0.25, compat="official", backend="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        otprune.apply(model, keep=0.25, backend="gpu")
    assert "generate" not in model.__dict__ and hf_llava._ATTR not in model.__dict__


@pytest.mark.parametrize("version", ["4.45.2", "4.51.3", "6.0.0"])
def test_unsupported_transformers_version(family, monkeypatch, version):
    _, model, _ = family
    monkeypatch.setattr(hf_llava, "installed_version", lambda: version)
    with pytest.raises(RuntimeError, match=f"transformers {version} is not supported"):
        otprune.apply(model, keep=0.25)
    assert "generate" not in model.__dict__


def test_supported_versions():
    for v in ("4.52.0", "4.57.6", "5.0.0", "5.23.0"):
        hf_llava.check_version(v)


# ---- layer > 0: pruning inside the language model ------------------------------------------------

LAYER = 1


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


def test_inner_layer_keep_all_is_baseline(family):
    _, model, inputs = family
    base = _generate(model, **inputs)
    otprune.apply(model, keep=1.0, layer=LAYER)
    try:
        got = _generate(model, **inputs)
    finally:
        otprune.revert(model)
    assert torch.equal(got.sequences, base.sequences)
    for a, b in zip(got.logits, base.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inner_layer_prunes(family):
    name, model, inputs = family
    keep = 0.25
    image_id = model.config.image_token_id
    layers = model.model.language_model.layers
    t_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref_hidden = model(**inputs, output_hidden_states=True).hidden_states[LAYER]  # input of layer LAYER

    seen = {}

    def pre(i):
        def hook(module, args, kwargs):
            seen.setdefault(("in", i), (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    def post(module, args, output):
        seen.setdefault("out", _first_output(output).detach().clone())

    otprune.apply(model, keep=keep, layer=LAYER)
    handles = [layers[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in range(len(layers))]
    handles.append(layers[LAYER - 1].register_forward_hook(post))
    try:
        out = _generate(model, **inputs)
    finally:
        for h in handles:
            h.remove()
        otprune.revert(model)

    # Earlier layers see every token and compute what the unpatched model computes.
    assert all(seen[("in", i)].shape[1] == t_len for i in range(LAYER))
    torch.testing.assert_close(seen["out"], ref_hidden, rtol=1e-5, atol=1e-5)
    pruned = seen[("in", LAYER)]
    assert all(seen[("in", i)].shape[1] == pruned.shape[1] for i in range(LAYER, len(layers)))

    # Expected picks: one batched select on the layer-LAYER hidden states of each image's tokens.
    is_image = inputs["input_ids"] == image_id
    n = [f.shape[0] for f in _image_features(model, inputs)]
    feats = list(torch.split(seen["out"][is_image], n))
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    picks = otprune.select(padded, keep, lengths=torch.tensor(n) if len(set(n)) > 1 else None)
    expect = [sorted(int(i) for i in row if i >= 0) for row in picks]

    per_row = _images_per_row(inputs, image_id, n)
    for b, images in enumerate(per_row):
        # The row's tokens sit right-aligned after the new left padding: recover their source
        # positions by exact match against the full layer-LAYER hidden states.
        real = inputs["attention_mask"][b] == 1  # left padding has identical rows; skip it
        m = int((real & ~is_image[b]).sum()) + sum(otprune._validate.budget(keep, n[j]) for j in images)
        eq = (pruned[b][-m:, None, :] == seen["out"][b][None]).all(-1) & real  # (m, T)
        assert bool(eq.any(1).all())
        src = eq.float().argmax(1)
        assert torch.all(src[1:] > src[:-1]), "kept tokens must keep their original order"
        text_pos = (real & ~is_image[b]).nonzero().flatten()
        assert set(text_pos.tolist()) <= set(src.tolist()), "a text token was dropped"
        img_pos = is_image[b].nonzero().flatten()
        start = 0
        for j in images:
            mine = img_pos[start:start + n[j]]
            start += n[j]
            got = torch.isin(mine, src).nonzero().flatten().tolist()
            assert len(got) == otprune._validate.budget(keep, n[j])
            assert got == expect[j]

    # KV cache: layers before LAYER hold the full prompt, later ones the pruned one.
    cache = out.past_key_values
    assert cache.get_seq_length(0) == t_len + NEW_TOKENS - 1
    assert cache.get_seq_length(LAYER) == pruned.shape[1] + NEW_TOKENS - 1

    # Cached decoding agrees with re-running the pruned prefill on prompt + generated tokens.
    new = out.sequences[:, t_len:]
    otprune.apply(model, keep=keep, layer=LAYER)
    try:
        for s in range(1, NEW_TOKENS):
            ids = torch.cat([inputs["input_ids"], new[:, :s]], dim=1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :s])], dim=1)
            with torch.no_grad():
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[s], rtol=1e-4, atol=1e-4)
    finally:
        otprune.revert(model)


def test_inner_layer_beams(family):
    """Beam search expands the rows inside generate(): the plan follows, so each beam's first-step
    logits equal the greedy pruned run's for its prompt."""
    _, model, inputs = family
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for keep in (1.0, 0.25):
        otprune.apply(model, keep=keep, layer=LAYER)
        try:
            greedy = model.generate(**inputs, **kw)
            beams = model.generate(**inputs, **kw, num_beams=2, num_return_sequences=2)
        finally:
            otprune.revert(model)
        assert beams.sequences.shape[0] == 4
        torch.testing.assert_close(beams.logits[0][::2], greedy.logits[0], rtol=1e-5, atol=1e-5)
