"""otprune.apply / revert on the original LLaVA codebase's models (tiny, random, no downloads)."""

import pytest
import torch

from helpers import require_module  # noqa: E402

require_module("llava.model.language_model.llava_llama", "the llava package (llava-torch)")

import otprune  # noqa: E402
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava_tiny import prompt_ids, row_ids, tiny_images, tiny_llava15, tiny_llava16  # noqa: E402
from otprune.integrations import llava_original  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

RATIO = 0.25
GEN = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module", params=["llava15", "llava16"])
def setup(request, tmp_path_factory):
    build = tiny_llava15 if request.param == "llava15" else tiny_llava16
    model = build(str(tmp_path_factory.mktemp("tower")))
    images, sizes = tiny_images(model, 4)
    rows = [row_ids(2), row_ids(2, extra=3)]  # two images per prompt, rows of different length
    ids, mask = prompt_ids(rows)
    yield model, images, sizes, rows, ids, mask
    otprune.revert(model)


def _full_features(model, images, sizes):
    """Each image's unpruned final sequence, from LLaVA's own (unpatched) function, one image a row."""
    probe = torch.tensor([[1, IMAGE_TOKEN_INDEX]] * len(images))
    fn = llava_original.original_prepare(model)
    _, _, mask, _, embeds, _ = fn(probe, None, torch.ones_like(probe), None, None, images, sizes)
    return [e[m.bool()][1:] for e, m in zip(embeds, mask)]


def _prefill_inputs(model):
    """Record the (inputs_embeds, attention_mask) of every call into the language model."""
    seen = []

    def hook(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append((kwargs["inputs_embeds"].detach().clone(), kwargs["attention_mask"].clone()))

    return seen, model.get_model().register_forward_pre_hook(hook, with_kwargs=True)


def _manual(model, rows, kept_feats):
    """Left-padded (embeds, mask) of the prompts with each image marker replaced by its kept features."""
    embed = model.get_model().embed_tokens
    seqs, j = [], 0
    with torch.no_grad():
        for r in rows:
            parts = []
            for tok in r:
                if tok == IMAGE_TOKEN_INDEX:
                    parts.append(kept_feats[j])
                    j += 1
                else:
                    parts.append(embed(torch.tensor([tok])))
            seqs.append(torch.cat(parts))
    width = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), width, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, width - s.shape[0]:] = s
        mask[b, width - s.shape[0]:] = 1
    return out, mask


def _generate(model, images, sizes, ids, mask):
    return model.generate(ids, images=images, image_sizes=sizes, attention_mask=mask, **GEN)


def test_generate_prunes_each_image_and_matches_manual_pruning(setup):
    model, images, sizes, rows, ids, mask = setup
    full = _full_features(model, images, sizes)
    n = [f.shape[0] for f in full]
    if isinstance(images, list):
        assert len(set(n)) > 1, "LLaVA-1.6 images should have size-dependent token counts"
    kept = [f[otprune.select(f, RATIO)] for f in full]
    otprune.apply(model, keep=RATIO)
    seen, handle = _prefill_inputs(model)
    try:
        out = _generate(model, images, sizes, ids, mask)
    finally:
        handle.remove()
        otprune.revert(model)
    embeds, lm_mask = seen[0]
    # The language model saw exactly round(r * N) visual tokens per image, text untouched, in order.
    ref_embeds, ref_mask = _manual(model, rows, kept)
    for b, r in enumerate(rows):
        n_text = sum(t != IMAGE_TOKEN_INDEX for t in r)
        k = sum(round(RATIO * n[j]) for j in (2 * b, 2 * b + 1))
        assert int(lm_mask[b].sum()) == n_text + k
    assert torch.equal(lm_mask.long(), ref_mask)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    # Same generation as the unpatched language model fed the manually pruned embeddings.
    ref = LlamaForCausalLM.generate(model, inputs_embeds=ref_embeds, attention_mask=ref_mask, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for s, t in zip(out.scores, ref.scores):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-5)


def test_forward_with_labels_builds_pruned_labels(setup):
    model, images, sizes, rows, ids, mask = setup
    labels = ids.masked_fill(mask == 0, -100)
    full = _full_features(model, images, sizes)
    kept = [f[otprune.select(f, 4)] for f in full]
    otprune.apply(model, keep=4)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images, image_sizes=sizes)
    finally:
        otprune.revert(model)
    ref_embeds, ref_mask = _manual(model, rows, kept)
    # Labels of the pruned sequence: text tokens keep theirs, the 4 kept visual tokens and padding -100.
    ref_labels = torch.full(ref_mask.shape, -100)
    for b, r in enumerate(rows):
        lab = sum(([-100] * 4 if t == IMAGE_TOKEN_INDEX else [t] for t in r), [])
        ref_labels[b, ref_mask.shape[1] - len(lab):] = torch.tensor(lab)
    with torch.no_grad():
        ref = LlamaForCausalLM.forward(model, inputs_embeds=ref_embeds, attention_mask=ref_mask, labels=ref_labels)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_official_feeds_the_release_order(setup):
    """compat="official": each image's kept features reach the language model in otprune.select's
    order (the release's list(set()) order, unsorted for some image here), not ascending."""
    model, images, sizes, rows, ids, mask = setup
    full = _full_features(model, images, sizes)
    orders = [otprune.select(f, RATIO, compat="official") for f in full]
    assert any(not torch.equal(o, o.sort().values) for o in orders)
    otprune.apply(model, keep=RATIO, compat="official")
    seen, handle = _prefill_inputs(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, images=images, image_sizes=sizes)
    finally:
        handle.remove()
        otprune.revert(model)
    ref_embeds, ref_mask = _manual(model, rows, [f[o] for f, o in zip(full, orders)])
    embeds, lm_mask = seen[0]
    assert torch.equal(lm_mask.long(), ref_mask)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)


def test_apply_twice_then_revert_restores_exactly(setup):
    model, images, sizes, rows, ids, mask = setup
    before = dict(model.__dict__)
    base = _generate(model, images, sizes, ids, mask)
    otprune.apply(model, keep=0.5)
    otprune.apply(model, keep=RATIO)  # the second call replaces the first
    assert llava_original.is_patched(model)
    seen, handle = _prefill_inputs(model)
    try:
        _generate(model, images, sizes, ids, mask)
    finally:
        handle.remove()
    n = [f.shape[0] for f in _full_features(model, images, sizes)]
    n_text = sum(t != IMAGE_TOKEN_INDEX for t in rows[0])
    assert int(seen[0][1][0].sum()) == n_text + round(RATIO * n[0]) + round(RATIO * n[1])
    otprune.revert(model)
    otprune.revert(model)  # harmless on an unpatched model
    assert not llava_original.is_patched(model)
    assert model.__dict__.keys() == before.keys()
    again = _generate(model, images, sizes, ids, mask)
    assert torch.equal(base.sequences, again.sequences)
    for s, t in zip(base.scores, again.scores):
        assert torch.equal(s, t)


def test_layer_prunes_inside_language_model(setup):
    model, images, sizes, rows, ids, mask = setup
    n = [f.shape[0] for f in _full_features(model, images, sizes)]
    lengths = []
    blocks = model.get_model().layers
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: lengths.append((i, a[0].shape[1]))) for i in (0, 1)]
    otprune.apply(model, keep=RATIO, layer=1)
    try:
        out = _generate(model, images, sizes, ids, mask)
    finally:
        for h in handles:
            h.remove()
        otprune.revert(model)
    text = [sum(t != IMAGE_TOKEN_INDEX for t in r) for r in rows]
    width = max(text[b] + n[2 * b] + n[2 * b + 1] for b in range(2))
    dropped = [n[j] - round(RATIO * n[j]) for j in range(4)]
    # Rows stay aligned: padding positions are carried along (masked), dropped visual tokens are not.
    k = width - min(dropped[2 * b] + dropped[2 * b + 1] for b in range(2))
    assert lengths[0] == (0, width)  # layer 0 sees every token
    assert lengths[1] == (1, k)  # layer 1 onwards: the kept tokens only
    assert out.sequences.shape == (len(rows), GEN["max_new_tokens"]) and len(out.scores) == GEN["max_new_tokens"]


def test_layer_keep_all_equals_baseline(setup):
    model, images, sizes, rows, ids, mask = setup
    base = _generate(model, images, sizes, ids, mask)
    otprune.apply(model, keep=1.0, layer=1)
    try:
        out = _generate(model, images, sizes, ids, mask)
    finally:
        otprune.revert(model)
    assert torch.equal(base.sequences, out.sequences)
    for s, t in zip(base.scores, out.scores):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-4)


def test_bad_arguments(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="layer"):
        otprune.apply(model, keep=RATIO, layer=3)
    with pytest.raises(ValueError, match="layer"):
        otprune.apply(model, keep=RATIO, layer=-1)
    with pytest.raises((ValueError, TypeError)):
        otprune.apply(model, keep=0.0)
    with pytest.raises(ValueError, match="backend"):
        otprune.apply(model, keep=RATIO, backend="gpu")
    with pytest.raises(TypeError, match="lengths"):
        otprune.apply(model, keep=RATIO, lengths=[3])
    assert not llava_original.is_patched(model)
    # A device backend is checked by name at apply time (its tensors only exist at run time).
    otprune.apply(model, keep=RATIO, backend="cuda")
    assert llava_original.is_patched(model)
    otprune.revert(model)


def test_layer_generation_matches_masking_reference(setup):
    """layer L through generation: scores equal the unpatched model whose layers >= L mask out the
    dropped visual tokens as keys (masking instead of gathering), positions and cache unchanged."""
    model, images, sizes, rows, ids, mask = setup
    layer, row = 1, row_ids(2)
    imgs, szs = images[:2], sizes[:2]
    n = [f.shape[0] for f in _full_features(model, imgs, szs)]
    x = torch.tensor([row])
    captured = []  # the input of decoder layer L (not output_hidden_states: it alters llava's logits here)
    handle = model.get_model().layers[layer].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=x, images=imgs, image_sizes=szs)
    finally:
        handle.remove()
    h = captured[0][0]
    first = row.index(IMAGE_TOKEN_INDEX)
    second = row.index(IMAGE_TOKEN_INDEX, first + 1) - 1 + n[0]  # after the first image's expansion
    drop = torch.zeros(h.shape[0], dtype=torch.bool)
    for start, count in ((first, n[0]), (second, n[1])):
        span = torch.ones(count, dtype=torch.bool)
        span[otprune.select(h[start:start + count], RATIO)] = False
        drop[start:start + count] = span
    t = h.shape[0]

    def masked(module, args, kwargs):
        q = args[0].shape[1]
        keys = t if q == t else t + len(steps)  # prefill, or decoding step len(steps)
        allowed = torch.ones(q, keys, dtype=torch.bool)
        allowed[:, :t] = ~drop
        if q == t:
            allowed &= torch.ones(t, t, dtype=torch.bool).tril()
        return args, dict(kwargs, attention_mask=torch.zeros(1, 1, q, keys).masked_fill(~allowed, -1e30))

    steps = []
    handles = [model.get_model().layers[layer].register_forward_pre_hook(
        lambda m, a: steps.append(1) if a[0].shape[1] == 1 else None)]
    handles += [b.register_forward_pre_hook(masked, with_kwargs=True) for b in model.get_model().layers[layer:]]
    try:
        ref = model.generate(x, images=imgs, image_sizes=szs, **GEN)
    finally:
        for hd in handles:
            hd.remove()
    otprune.apply(model, keep=RATIO, layer=layer)
    try:
        out = model.generate(x, images=imgs, image_sizes=szs, **GEN)
        with torch.no_grad():
            logits = model(input_ids=x, images=imgs, image_sizes=szs).logits
    finally:
        otprune.revert(model)
    base = model.generate(x, images=imgs, image_sizes=szs, **GEN)
    assert not torch.allclose(base.scores[-1], ref.scores[-1], atol=1e-3)  # the dropping matters here
    assert logits.shape[1] == t - int(drop.sum())  # forward: logits for the kept sequence
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_images_as_one_5d_tensor(setup):
    """LLaVA-1.6: process_images stacks equal crop counts into one (n, crops, 3, h, w) tensor."""
    model, images, sizes, rows, ids, mask = setup
    if not isinstance(images, list):
        pytest.skip("LLaVA-1.5 images are already one 4-D tensor")
    kept = [f[otprune.select(f, RATIO)] for f in _full_features(model, images, sizes)]
    ref_embeds, ref_mask = _manual(model, rows, kept)
    ref = LlamaForCausalLM.generate(model, inputs_embeds=ref_embeds, attention_mask=ref_mask, **GEN)
    otprune.apply(model, keep=RATIO)
    try:
        a = _generate(model, images, sizes, ids, mask)
        b = _generate(model, torch.stack(images), sizes, ids, mask)
    finally:
        otprune.revert(model)
    for out in (a, b):  # both forms equal the unpatched model fed the manually pruned tokens
        assert torch.equal(out.sequences, ref.sequences)
        for s, t in zip(out.scores, ref.scores):
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-5)
