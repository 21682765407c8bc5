"""Qwen-VL videos through vLLM's CPU build with the plugin: per model (tiny Qwen2.5-VL and Qwen3-VL)
three engine runs on one video prompt (engine_run.video()): pruning on through the environment,
off, and keep = 1.0 through ``otprune.vllm.enable``.

A video is one item selected over all its frames together. On Qwen2.5-VL its N placeholders become
k = round(r N). Qwen3-VL writes a video frame by frame, each frame's tokens after its timestamp
text, and vLLM fixes that layout before the encoder runs, when the kept tokens' frames are unknown:
a pruned video keeps every frame's text and markers and holds all k kept tokens in its first frame
(vLLM's own layout for its EVS). Either way each kept token has the M-RoPE position it has in the
unpruned prompt.

The reference is transformers' model on the same weights, with the video's encoder outputs given
directly and explicit positions (reference.qwen_video_reference). Unpruned it reproduces plain vLLM,
which checks the reference itself; pruned, with otprune's selection and each kept token at its own
unpruned position, it must reproduce the plugin; with the kept tokens at consecutive positions it
does not, so the comparison sees the positions.
"""

from __future__ import annotations

import os

import pytest
from conftest import KEEP, run_engine
from reference import qwen_video_reference

from otprune._validate import budget

KINDS = {"qwen2_5_vl": "OTPruneQwen2_5_VLForConditionalGeneration", "qwen3_vl": "OTPruneQwen3VLForConditionalGeneration"}
CONFIGS = {"env": ({"OTPRUNE_KEEP": str(KEEP)}, []), "off": ({}, []), "keep1": ({}, ["--enable", "1.0"])}


@pytest.fixture(scope="module")
def video_runs(checkpoints, tmp_path_factory):
    """(kind, config) -> the engine's result for the video prompt, with the model class it served."""
    out = tmp_path_factory.mktemp("video")
    runs = {}
    for kind in KINDS:
        for name, (env, args) in CONFIGS.items():
            run = run_engine(checkpoints[kind], os.path.join(out, f"{kind}-{name}.json"), env, ["--video", *args])
            runs[kind, name] = dict(run["prompts"][0], model_class=run["model_class"])
    return runs


def _tokens(path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return config.video_token_id, config.vision_start_token_id, config.vision_end_token_id


def _frames(ids, video, start, end):
    """Placeholders per vision_start ... vision_end block (Qwen3-VL: frames, the outer block last)."""
    counts, inside = [], None
    for t in ids:
        if t == start:
            inside = 0
        elif t == end and inside is not None:
            counts.append(inside)
            inside = None
        elif t == video and inside is not None:
            inside += 1
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_video_prompt(kind, checkpoints, video_runs):
    video, start, end = _tokens(checkpoints[kind])
    plain, pruned = video_runs[kind, "off"]["prompt_token_ids"], video_runs[kind, "env"]["prompt_token_ids"]
    n = plain.count(video)
    assert pruned.count(video) == budget(KEEP, n) < n
    # every other token, Qwen3-VL's frame timestamps and markers included, as vLLM lays the video out
    assert [t for t in pruned if t != video] == [t for t in plain if t != video]
    if kind == "qwen3_vl":
        per_frame = [c for c in _frames(plain, video, start, end) if c]
        assert len(per_frame) == 4 and sum(per_frame) == n
        assert _frames(pruned, video, start, end)[-4:] == [budget(KEEP, n), 0, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reproduces_plain_vllm(kind, checkpoints, video_runs):
    ids = video_runs[kind, "off"]["prompt_token_ids"]
    assert qwen_video_reference(checkpoints[kind], ids, ids) == video_runs[kind, "off"]["output_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_plugin_matches_reference_pruned(kind, checkpoints, video_runs):
    plain, pruned = video_runs[kind, "off"], video_runs[kind, "env"]
    path, args = checkpoints[kind], (plain["prompt_token_ids"], pruned["prompt_token_ids"])
    want = qwen_video_reference(path, *args, keep=KEEP)
    assert pruned["output_ids"] == want
    assert want != plain["output_ids"]  # pruning changes what this random model says
    assert qwen_video_reference(path, *args, keep=KEEP, consecutive=True) != want


@pytest.mark.parametrize("kind", KINDS)
def test_keep_one_is_plain_vllm(kind, video_runs):
    """A video whose budget is all its tokens gets vLLM's own layout and output (the plugin's class
    serving it)."""
    plugin = f"otprune.vllm.qwen_vl.{KINDS[kind]}"
    assert video_runs[kind, "keep1"]["model_class"] == plugin == video_runs[kind, "env"]["model_class"]
    assert video_runs[kind, "off"]["model_class"] != plugin
    assert video_runs[kind, "keep1"]["prompt_token_ids"] == video_runs[kind, "off"]["prompt_token_ids"]
    assert video_runs[kind, "keep1"]["output_ids"] == video_runs[kind, "off"]["output_ids"]
