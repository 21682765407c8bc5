"""Qwen3-VL video through vLLM's CPU build with the plugin: two engine runs (pruning on through the
environment, and off) on the tiny Qwen3-VL checkpoint, one video prompt (engine_run.video()).

vLLM fixes a video's placeholders, frame by frame after each frame's timestamp text, before the
encoder runs; which frames the kept tokens come from is known only after. So a pruned video keeps
every frame's text and markers and holds all k = round(r N) kept tokens in its first frame (vLLM's
own layout for its EVS), each at the M-RoPE position it has in the unpruned prompt.

The reference is transformers' Qwen3-VL on the same weights, with the video's encoder outputs given
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

PLUGIN_CLASS = "otprune.vllm.qwen_vl.OTPruneQwen3VLForConditionalGeneration"


@pytest.fixture(scope="module")
def video_runs(checkpoints, tmp_path_factory):
    """config -> the engine's result for the video prompt: "env" (OTPRUNE_KEEP), "off", and
    "keep1" (keep = 1.0 through ``otprune.vllm.enable``)."""
    out = tmp_path_factory.mktemp("video")
    path = checkpoints["qwen3_vl"]
    configs = {"env": ({"OTPRUNE_KEEP": str(KEEP)}, []), "off": ({}, []), "keep1": ({}, ["--enable", "1.0"])}
    runs = {name: run_engine(path, os.path.join(out, f"{name}.json"), env, ["--video", *args])
            for name, (env, args) in configs.items()}
    return {name: dict(run["prompts"][0], model_class=run["model_class"]) for name, run in runs.items()}


@pytest.fixture(scope="module")
def video_token(checkpoints):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoints["qwen3_vl"])
    return config.video_token_id, config.vision_start_token_id, config.vision_end_token_id


def _frames(ids, video, start, end):
    """Placeholders per vision_start ... vision_end block (frames; the outer block counts none)."""
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


def test_pruned_video_prompt_is_lumped(video_runs, video_token):
    video, start, end = video_token
    plain, pruned = video_runs["off"]["prompt_token_ids"], video_runs["env"]["prompt_token_ids"]
    per_frame = [c for c in _frames(plain, video, start, end) if c]
    n = sum(per_frame)
    assert len(per_frame) == 4 and n == 80
    assert _frames(pruned, video, start, end)[-4:] == [budget(KEEP, n), 0, 0, 0]
    # every other token, frame timestamps and markers included, as vLLM lays the video out
    assert [t for t in pruned if t != video] == [t for t in plain if t != video]


def test_reference_reproduces_plain_vllm(checkpoints, video_runs):
    ids = video_runs["off"]["prompt_token_ids"]
    assert qwen_video_reference(checkpoints["qwen3_vl"], ids, ids) == video_runs["off"]["output_ids"]


def test_plugin_matches_reference_pruned(checkpoints, video_runs):
    plain, pruned = video_runs["off"], video_runs["env"]
    path, args = checkpoints["qwen3_vl"], (plain["prompt_token_ids"], pruned["prompt_token_ids"])
    want = qwen_video_reference(path, *args, keep=KEEP)
    assert pruned["output_ids"] == want
    assert want != plain["output_ids"]  # pruning changes what this random model says
    assert qwen_video_reference(path, *args, keep=KEEP, consecutive=True) != want


def test_keep_one_is_plain_vllm(video_runs):
    """A video whose budget is all its tokens keeps vLLM's own layout and output (the plugin's class
    serving it)."""
    assert video_runs["keep1"]["model_class"] == PLUGIN_CLASS
    assert video_runs["env"]["model_class"] == PLUGIN_CLASS and video_runs["off"]["model_class"] != PLUGIN_CLASS
    assert video_runs["keep1"]["prompt_token_ids"] == video_runs["off"]["prompt_token_ids"]
    assert video_runs["keep1"]["output_ids"] == video_runs["off"]["output_ids"]
