"""The environment-variable route for transformers' LLaVA / LLaVA-NeXT (e.g. lmms-eval's llava_hf).

A subprocess runs the ``.pth`` line exactly as ``site`` does, imports transformers the usual way,
builds a tiny random model (tests/hf_tiny.py) and runs batched generate() with two images in the
first prompt. What the language model saw is counted with a pre-hook on it: per row, the real
tokens must be the text tokens plus round(r * N_j) for each of the row's images, where N_j is the
length of image j's run of image tokens in input_ids.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import require_module  # noqa: E402
from route_settings import PTH, ROOT, check_route_report, clean_env, run_route_settings  # noqa: E402

require_module("transformers", "transformers")

SCRIPT = r"""
import json, sys
with open(sys.argv[1]) as f:
    exec(f.read())  # what site.py does with the .pth's line
report = {"torch_at_start": "torch" in sys.modules}
sys.path.insert(0, sys.argv[2])
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
report["class_patched"] = [hasattr(c.__init__, "__otprune_cls__")
                           for c in (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)]
import torch
import otprune
from hf_tiny import tiny_inputs, tiny_llava, tiny_llava_next
model, processor = (tiny_llava if sys.argv[3] == "llava" else tiny_llava_next)(seed=0)
report["patched"] = hasattr(model, "_otprune_hf")
inputs = tiny_inputs(processor, (2, 1))
image_id = model.config.image_token_id
runs = []  # per row: lengths of the runs of image tokens (one run per image)
for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
    row, n = [], 0
    for tok in ids + [-1]:
        if tok == image_id:
            n += 1
        elif n:
            row.append(n)
            n = 0
    runs.append(row)
report["runs"] = runs
report["text"] = [int(((ids != image_id) & (m == 1)).sum()) for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
seen = []
def hook(module, args, kwargs):
    seen.append(kwargs["attention_mask"].sum(-1).tolist() if kwargs.get("attention_mask") is not None
                else [kwargs["inputs_embeds"].shape[1]] * kwargs["inputs_embeds"].shape[0])
model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
report["lm"] = seen[0]
if report["patched"]:
    otprune.revert(model)
    otprune.apply(model, keep=float(sys.argv[4]))
    report["same_as_api"] = torch.equal(out, model.generate(**inputs, max_new_tokens=3, do_sample=False))
print("REPORT " + json.dumps(report))
"""


def _run(family, ratio, **env_vars):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, PTH, os.path.join(ROOT, "tests"), family, str(ratio)],
                          env=clean_env(**env_vars), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


HF_SETUP = r"""
from hf_tiny import tiny_inputs, tiny_{family}
def build():
    global inputs
    model, processor = tiny_{family}(seed=0)
    inputs = tiny_inputs(processor, (2, 1))
    return model
def generate(model, **kw):
    return model.generate(**inputs, **kw)
def lm(model):
    return model.model.language_model
"""


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_route_settings_equal_apply_settings_hf(family):
    """Non-default gamma, normalisation, backend and compat="official" through the variables give
    what otprune.apply gives with the same settings: picks and generated outputs."""
    check_route_report(run_route_settings(HF_SETUP.format(family=family)))


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_release_variables_prune_hf_models(family):
    rep = _run(family, 0.25, BASELINE="OURS", LAYER_INDEX="0", SUBSET_RATIO="0.25")
    assert not rep["torch_at_start"]
    assert rep["class_patched"] == [True, True] and rep["patched"]
    assert [len(r) for r in rep["runs"]] == [2, 1]
    expect = [t + sum(round(0.25 * n) for n in runs) for t, runs in zip(rep["text"], rep["runs"])]
    assert rep["lm"] == expect
    assert rep["same_as_api"]


def test_unset_variables_change_nothing_hf():
    rep = _run("llava_next", 0.25)
    assert rep["class_patched"] == [False, False] and not rep["patched"]
    assert rep["lm"] == [t + sum(runs) for t, runs in zip(rep["text"], rep["runs"])]


def test_from_pretrained_is_patched_hf(monkeypatch, tmp_path):
    """from_pretrained builds the model under a meta-device context: the route must still apply,
    and unpatching the classes leaves later instances alone."""
    import torch
    from hf_tiny import tiny_inputs, tiny_llava
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava import modeling_llava

    from otprune.autopatch import patch_hf, unpatch_hf

    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    inputs = tiny_inputs(processor, (1,))
    monkeypatch.setenv("OTPRUNE_KEEP", "8")
    patch_hf(modeling_llava)
    try:
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    finally:
        unpatch_hf(modeling_llava)
    assert not hasattr(LlavaForConditionalGeneration.__init__, "__otprune_cls__")
    seen = []
    loaded.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    loaded.generate(**inputs, max_new_tokens=1, do_sample=False)
    text = int((inputs["input_ids"] != loaded.config.image_token_id).sum())
    assert seen[0] == text + 8
    assert not hasattr(LlavaForConditionalGeneration(loaded.config), "_otprune_hf")
