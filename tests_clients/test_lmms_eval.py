"""The release's evaluation command, run by the real client: lmms-eval 0.7.3 under accelerate.

    BASELINE=OURS LAYER_INDEX=0 SUBSET_RATIO=0.098 python3 -m accelerate.commands.launch \
        --num_processes=1 -m lmms_eval --model llava --model_args pretrained=... --tasks ... \
        --batch_size 1 --log_samples --log_samples_suffix ... --output_path ...

unchanged but for the model arguments (a tiny checkpoint built here, CPU device arguments) and the
task (a local one built here). A probe on PYTHONPATH (tests_clients/probe/sitecustomize.py) records,
in every process, the prompt's text tokens and the sequence length each decoder layer receives in
the prefill: visual tokens reaching a layer = its length - the text tokens. lmms-eval exits 0 even
when evaluation fails, so its log is read for errors too.

Runs in the clients' own venv (make test-clients), not in the main test suite.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tiny_checkpoints import TASK, VISUAL_TOKENS, save_llava_hf, save_llava_original, save_task

HERE = os.path.dirname(os.path.abspath(__file__))
RATIO = 0.098
KEPT = round(RATIO * VISUAL_TOKENS)  # 56 of 576
# How lmms-eval reports a failed evaluation or generation while still exiting 0.
LOG_ERRORS = ("Error during evaluation", "in generating", "Traceback (most recent call last)")
# CPU: the llava wrapper hard-codes cuda:0 unless device_map=auto; llava_hf's default device_map ""
# is rejected by transformers 5.23.
MODEL_ARGS = {"llava": "device=cpu,device_map=auto", "llava_hf": "device=cpu,device_map=cpu"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clients"))
    return {"llava": save_llava_original(folder), "llava_hf": save_llava_hf(folder), "task": save_task(folder)}


def _lmms_eval(assets, tmp_path, model, env_vars):
    """Run the release's command for ``model`` with ``env_vars``; (records of the probe, log text)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO") and not k.startswith("OTPRUNE_")}
    env.update(env_vars, CLIENT_PROBE_DIR=str(probe), PYTHONPATH=os.path.join(HERE, "probe"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "-m", "lmms_eval",
           "--model", model, "--model_args", f"pretrained={assets[model]},{MODEL_ARGS[model]}",
           "--tasks", TASK, "--include_path", assets["task"], "--batch_size", "1", "--log_samples",
           "--log_samples_suffix", model, "--output_path", str(tmp_path / "logs")]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    for bad in LOG_ERRORS:
        assert bad not in log, log[-5000:]
    assert glob.glob(str(tmp_path / "logs" / "**" / "*results*.json"), recursive=True), log[-3000:]
    records = []
    for path in glob.glob(str(probe / "*.json")):
        with open(path) as f:
            records += json.load(f)
    assert len(records) == 2, (records, log[-3000:])  # one generate call per document of the task
    return records, log


def _visual(record):
    """Visual tokens each decoder layer received in the prefill, by layer index."""
    return {int(i): n - record["text"] for i, n in record["layers"].items()}


RELEASE = {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": str(RATIO)}


@pytest.mark.parametrize("model", ["llava", "llava_hf"])
def test_release_command_prunes(assets, tmp_path, model):
    records, _ = _lmms_eval(assets, tmp_path, model, RELEASE)
    for rec in records:
        assert rec["otprune_imported"]
        if rec["placeholders"] is not None:  # transformers: the dropped tokens' placeholders are removed
            assert rec["placeholders"] == KEPT, rec
        assert set(_visual(rec).values()) == {KEPT}, rec


@pytest.mark.parametrize("model", ["llava", "llava_hf"])
def test_unset_variables_change_nothing(assets, tmp_path, model):
    records, _ = _lmms_eval(assets, tmp_path, model, {})
    for rec in records:
        assert not rec["otprune_imported"]
        if rec["placeholders"] is not None:  # transformers: the processor writes one per visual token
            assert rec["placeholders"] == VISUAL_TOKENS, rec
        assert set(_visual(rec).values()) == {VISUAL_TOKENS}, rec


def test_release_command_inside_language_model(assets, tmp_path):
    """LAYER_INDEX=2: decoder layers 0 and 1 see all 576 visual tokens, layers 2.. the 56 kept."""
    records, _ = _lmms_eval(assets, tmp_path, "llava", dict(RELEASE, LAYER_INDEX="2"))
    for rec in records:
        visual = _visual(rec)
        assert rec["otprune_imported"] and sorted(visual) == [0, 1, 2], rec
        assert (visual[0], visual[1], visual[2]) == (VISUAL_TOKENS, VISUAL_TOKENS, KEPT), rec
