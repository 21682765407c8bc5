"""vLLM's CPU build serving tiny LLaVA / LLaVA-NeXT checkpoints with the plugin (see conftest.py).

Against transformers on the same weights: pruning on -> k = round(0.1 N) placeholders per image and
the greedy ids of ``otprune.apply(model, keep=0.1)``; variables unset -> vLLM's own classes and the
unpruned ids; keep = 1.0 (Python route) -> the plugin's classes with the unpruned result.
"""

from __future__ import annotations

import pytest
from conftest import KEEP
from reference import image_runs
from tiny_models import KINDS

from otprune._validate import budget

IMAGE_TOKEN_ID = 4  # tests/hf_tiny.py's "<image>"
PLUGIN_CLASSES = {
    "llava": "otprune.vllm.models.OTPruneLlavaForConditionalGeneration",
    "llava_next": "otprune.vllm.models.OTPruneLlavaNextForConditionalGeneration",
}
VLLM_CLASSES = {
    "llava": "vllm.model_executor.models.llava.LlavaForConditionalGeneration",
    "llava_next": "vllm.model_executor.models.llava_next.LlavaNextForConditionalGeneration",
}


def _placeholders(run):
    return [image_runs(p["prompt_token_ids"], IMAGE_TOKEN_ID) for p in run["prompts"]]


def _outputs(run):
    return [p["output_ids"] for p in run["prompts"]]


@pytest.mark.parametrize("kind", KINDS)
def test_env_route_placeholders(kind, engine_results, references):
    run = engine_results[(kind, "env")]
    assert run["model_class"] == PLUGIN_CLASSES[kind]
    expected = [[budget(KEEP, n) for n in ref["n_tokens"]] for ref in references[kind]]
    assert _placeholders(run) == expected
    assert all(k < n for ref, ks in zip(references[kind], expected) for k, n in zip(ks, ref["n_tokens"]))


@pytest.mark.parametrize("kind", KINDS)
def test_env_route_matches_transformers_pruned(kind, engine_results, references):
    assert _outputs(engine_results[(kind, "env")]) == [ref["pruned"] for ref in references[kind]]
    # Pruning changes what this random model says, so the comparison can tell the two apart.
    assert any(ref["pruned"] != ref["unpruned"] for ref in references[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_unset_is_plain_vllm(kind, engine_results, references):
    run = engine_results[(kind, "off")]
    assert run["model_class"] == VLLM_CLASSES[kind]
    assert _placeholders(run) == [ref["n_tokens"] for ref in references[kind]]
    assert _outputs(run) == [ref["unpruned"] for ref in references[kind]]


@pytest.mark.parametrize("kind", KINDS)
def test_python_route_keep_one_equals_unpruned(kind, engine_results, references):
    run = engine_results[(kind, "python_keep1")]
    assert run["model_class"] == PLUGIN_CLASSES[kind]
    assert _placeholders(run) == [ref["n_tokens"] for ref in references[kind]]
    assert _outputs(run) == _outputs(engine_results[(kind, "off")])
