"""vLLM's CPU build serving tiny LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE
checkpoints with the plugin (see conftest.py).

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

PLUGIN_CLASSES = {
    "llava": "otprune.vllm.models.OTPruneLlavaForConditionalGeneration",
    "llava_next": "otprune.vllm.models.OTPruneLlavaNextForConditionalGeneration",
    "qwen2_vl": "otprune.vllm.qwen_vl.OTPruneQwen2VLForConditionalGeneration",
    "qwen2_5_vl": "otprune.vllm.qwen_vl.OTPruneQwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "otprune.vllm.qwen_vl.OTPruneQwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "otprune.vllm.qwen_vl.OTPruneQwen3VLMoeForConditionalGeneration",
}
VLLM_CLASSES = {
    "llava": "vllm.model_executor.models.llava.LlavaForConditionalGeneration",
    "llava_next": "vllm.model_executor.models.llava_next.LlavaNextForConditionalGeneration",
    "qwen2_vl": "vllm.model_executor.models.qwen2_vl.Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "vllm.model_executor.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "vllm.model_executor.models.qwen3_vl.Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "vllm.model_executor.models.qwen3_vl_moe.Qwen3VLMoeForConditionalGeneration",
}


def _placeholders(run, refs):
    return [image_runs(p["prompt_token_ids"], ref["image_token_id"]) for p, ref in zip(run["prompts"], refs)]


def _outputs(run):
    return [p["output_ids"] for p in run["prompts"]]


@pytest.mark.parametrize("kind", KINDS)
def test_env_route_placeholders(kind, engine_results, references):
    run = engine_results[(kind, "env")]
    assert run["model_class"] == PLUGIN_CLASSES[kind]
    expected = [[budget(KEEP, n) for n in ref["n_tokens"]] for ref in references[kind]]
    assert _placeholders(run, references[kind]) == expected
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
    assert _placeholders(run, references[kind]) == [ref["n_tokens"] for ref in references[kind]]
    assert _outputs(run) == [ref["unpruned"] for ref in references[kind]]


@pytest.mark.parametrize("kind", KINDS)
def test_python_route_keep_one_equals_unpruned(kind, engine_results, references):
    run = engine_results[(kind, "python_keep1")]
    assert run["model_class"] == PLUGIN_CLASSES[kind]
    assert _placeholders(run, references[kind]) == [ref["n_tokens"] for ref in references[kind]]
    assert _outputs(run) == _outputs(engine_results[(kind, "off")])
