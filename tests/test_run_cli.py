"""`otprune run`: clear failures without weights, and a full run on a tiny saved model."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **env):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-m", "otprune", "run", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return str(path)


def test_missing_image_is_a_clear_error(tmp_path):
    res = _run(["--model", "any", "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert res.returncode == 2
    assert "--image" in res.stderr and "no such file" in res.stderr
    assert "Traceback" not in res.stderr


def test_unavailable_weights_say_so_without_traceback(photo):
    res = _run(["--model", "llava-hf/llava-1.5-7b-hf", "--image", photo, "--prompt", "hi"])
    assert res.returncode == 2
    assert "cannot load model 'llava-hf/llava-1.5-7b-hf'" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_keep_is_rejected(photo):
    res = _run(["--model", "any", "--image", photo, "--prompt", "hi", "--keep", "2.5"])
    assert res.returncode == 2 and "--keep" in res.stderr


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_full_run_on_tiny_saved_model(family, photo, tmp_path):
    """Loads a saved tiny checkpoint through AutoConfig/AutoProcessor, answers both ways, and
    reports the visual-token count the language model really saw (counted by its own hook)."""
    from hf_tiny import tiny_llava, tiny_llava_next

    model, processor = (tiny_llava if family == "llava" else tiny_llava_next)()
    folder = tmp_path / family
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    res = _run(["--model", str(folder), "--image", photo, "--prompt", "what is in the image ?",
                "--keep", "0.25", "--max-new-tokens", "3", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("[unpruned]") for line in lines)
    assert any(line.startswith("[pruned]") for line in lines)
    counts = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[:1] in (["unpruned"], ["pruned"])}
    assert counts["pruned"] == round(0.25 * counts["unpruned"])
    if family == "llava":
        assert counts["unpruned"] == 64  # 112 px / patch 14, CLS dropped
    assert "prefill speed-up" in res.stdout
