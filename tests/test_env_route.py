"""The environment-variable route: BASELINE / SUBSET_RATIO / LAYER_INDEX and OTPRUNE_* variables.

Subprocesses run the ``.pth`` line exactly as ``site`` does (exec of the line) with the repository on
PYTHONPATH, then import LLaVA the way lmms-eval does and run a tiny model, unchanged otherwise.
"""

import json
import os
import socket
import subprocess
import sys
from importlib import metadata

import pytest

from helpers import require_module  # noqa: E402
from route_settings import PTH, ROOT, check_route_report, clean_env, run_route_settings  # noqa: E402

require_module("llava.model.language_model.llava_llama", "the llava package (llava-torch)")

import otprune  # noqa: E402
from otprune.autopatch import Settings, patch_llava, settings_from_env, unpatch_llava  # noqa: E402

TEXT = (10, 13)  # text tokens of the two prompt rows of llava_tiny.row_ids(2) / row_ids(2, extra=3)
N = 64  # visual tokens per image of tiny_llava15

SCRIPT = r"""
import json, sys, tempfile
with open(sys.argv[1]) as f:
    exec(f.read())  # what site.py does with the .pth's "import ..." line
report = {"torch_at_start": "torch" in sys.modules, "hook_loaded": "_otprune_autopatch" in sys.modules}
from llava.model.builder import load_pretrained_model  # lmms-eval's import
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
report["class_patched"] = hasattr(LlavaLlamaForCausalLM.__init__, "__otprune_cls__")
sys.path.insert(0, sys.argv[2])
from llava_tiny import prompt_ids, row_ids, tiny_images, tiny_llava15
model = tiny_llava15(tempfile.mkdtemp())
images, sizes = tiny_images(model, 4)
ids, mask = prompt_ids([row_ids(2), row_ids(2, extra=3)])
lm, layer1 = [], []
def lm_hook(module, args, kwargs):
    if kwargs.get("inputs_embeds") is not None:
        lm.append(kwargs["attention_mask"].sum(1).tolist())
model.get_model().register_forward_pre_hook(lm_hook, with_kwargs=True)
model.get_model().layers[1].register_forward_hook(lambda m, a, o: layer1.append(a[0].shape[1]))
out = model.generate(ids, images=images, image_sizes=sizes, attention_mask=mask, max_new_tokens=3, do_sample=False)
report.update(lm=lm[0], layer1=layer1[0], steps=len(layer1), out=out.shape[1])
print("REPORT " + json.dumps(report))
"""

RELEASE = {"BASELINE": "OURS", "LAYER_INDEX": "0", "SUBSET_RATIO": "0.25"}


def _start(env):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, PTH, os.path.join(ROOT, "tests")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _report(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def test_release_variables_prune_in_every_process():
    procs = [_start(clean_env(**RELEASE)) for _ in range(2)]  # like two accelerate processes
    for rep in map(_report, procs):
        assert not rep["torch_at_start"]  # the .pth imports nothing heavy, even when on
        assert rep["hook_loaded"] and rep["class_patched"]
        assert rep["lm"] == [t + 2 * round(0.25 * N) for t in TEXT]
        assert rep["out"] == 3


def test_unset_variables_change_nothing():
    rep = _report(_start(clean_env(OTPRUNE_SKIP_EXT="1")))  # an unrelated OTPRUNE_ variable
    assert not rep["torch_at_start"] and not rep["hook_loaded"] and not rep["class_patched"]
    assert rep["lm"] == [t + 2 * N for t in TEXT]


def test_otprune_variables_layer_inside_language_model():
    env = clean_env(OTPRUNE_KEEP="8", OTPRUNE_LAYER="1", OTPRUNE_BACKEND="torch", OTPRUNE_GAMMA="0.02")
    rep = _report(_start(env))
    assert rep["lm"] == [t + 2 * N for t in TEXT]  # layer 0 sees every token
    assert rep["layer1"] == max(TEXT) + 2 * 8  # equal drops per row: the kept tokens only
    assert rep["steps"] == 3


LLAVA_SETUP = r"""
import tempfile
from llava.model.builder import load_pretrained_model  # noqa: F401  (lmms-eval's import)
from llava_tiny import prompt_ids, row_ids, tiny_images, tiny_llava15
def build():
    return tiny_llava15(tempfile.mkdtemp())
def generate(model, **kw):
    images, sizes = tiny_images(model, 4)
    ids, mask = prompt_ids([row_ids(2), row_ids(2, extra=3)])
    return model.generate(ids, images=images, image_sizes=sizes, attention_mask=mask, **kw)
def lm(model):
    return model.get_model()
"""


def test_route_settings_equal_apply_settings():
    """Non-default gamma, normalisation, backend and compat="official" through the variables."""
    check_route_report(run_route_settings(LLAVA_SETUP))


def test_settings_from_env():
    assert settings_from_env({}) is None
    assert settings_from_env({"BASELINE": "FASTV", "SUBSET_RATIO": "0.5"}) is None
    assert settings_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "0.098"}) == Settings(0.098, 0, {})
    assert settings_from_env({"BASELINE": "OURS", "SUBSET_RATIO": "1", "LAYER_INDEX": "2"}) == Settings(1.0, 2, {})
    full = {
        "BASELINE": "OURS", "SUBSET_RATIO": "0.5", "LAYER_INDEX": "2", "OTPRUNE_KEEP": "56",
        "OTPRUNE_LAYER": "3", "OTPRUNE_BACKEND": "triton", "OTPRUNE_COMPAT": "official",
        "OTPRUNE_GAMMA": "0.02", "OTPRUNE_NORMALIZE": "token",
    }
    kw = {"backend": "triton", "compat": "official", "gamma": 0.02, "normalize": "token"}
    assert settings_from_env(full) == Settings(56, 3, kw)
    assert settings_from_env({"OTPRUNE_KEEP": "0.1", "OTPRUNE_COMPAT": "none"}) == Settings(0.1, 0, {})


@pytest.mark.parametrize("env, name", [
    ({"BASELINE": "OURS"}, "SUBSET_RATIO"),
    ({"BASELINE": "OURS", "SUBSET_RATIO": "abc"}, "SUBSET_RATIO"),
    ({"OTPRUNE_KEEP": "x"}, "OTPRUNE_KEEP"),
    ({"OTPRUNE_KEEP": "4", "LAYER_INDEX": "1.5"}, "LAYER_INDEX"),
    ({"OTPRUNE_KEEP": "4", "OTPRUNE_COMPAT": "paper"}, "OTPRUNE_COMPAT"),
])
def test_bad_settings_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        settings_from_env(env)


@pytest.fixture()
def patched_class(monkeypatch):
    from llava.model import llava_arch

    for k in ("BASELINE", "SUBSET_RATIO", "LAYER_INDEX"):
        monkeypatch.delenv(k, raising=False)
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    original_init = LlavaLlamaForCausalLM.__dict__["__init__"]
    patch_llava(llava_arch)
    patch_llava(llava_arch)  # idempotent
    assert LlavaLlamaForCausalLM.__init__.__otprune_own__ is original_init
    yield
    unpatch_llava(llava_arch)
    assert LlavaLlamaForCausalLM.__dict__["__init__"] is original_init
    assert "__init_subclass__" not in llava_arch.LlavaMetaForCausalLM.__dict__


def _lm_lengths(model):
    from llava_tiny import prompt_ids, row_ids, tiny_images

    images, sizes = tiny_images(model, 4)
    ids, mask = prompt_ids([row_ids(2), row_ids(2, extra=3)])
    seen = []

    def hook(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append(kwargs["attention_mask"].sum(1).tolist())

    handle = model.get_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.generate(ids, images=images, image_sizes=sizes, attention_mask=mask, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return seen[0]


def test_route_in_process_then_revert(patched_class, monkeypatch, tmp_path):
    from llava_tiny import tiny_llava15

    monkeypatch.setenv("OTPRUNE_KEEP", "4")
    model = tiny_llava15(str(tmp_path))
    assert _lm_lengths(model) == [t + 8 for t in TEXT]
    otprune.revert(model)  # off for good on this instance
    assert _lm_lengths(model) == [t + 2 * N for t in TEXT]


def test_bad_value_fails_loudly_at_construction(patched_class, monkeypatch, tmp_path):
    from llava_tiny import tiny_llava15

    monkeypatch.setenv("BASELINE", "OURS")
    monkeypatch.setenv("SUBSET_RATIO", "lots")
    with pytest.raises(ValueError, match="SUBSET_RATIO"):
        tiny_llava15(str(tmp_path))


def test_subclass_defined_later_is_patched_once(patched_class, monkeypatch, tmp_path):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava_tiny import tiny_llava15
    from otprune.integrations import llava_original

    class Derived(LlavaLlamaForCausalLM):  # e.g. a fork's own model class
        pass

    calls = []
    monkeypatch.setattr(llava_original, "apply", lambda m, *a: calls.append(type(m)) or m)
    monkeypatch.setenv("OTPRUNE_KEEP", "4")
    model = tiny_llava15(str(tmp_path))
    Derived(model.config)
    assert calls == [LlavaLlamaForCausalLM, Derived]


def test_installed_pth():
    """The installed distribution ships the .pth at the top of site-packages, and it runs at start."""
    try:
        dist = metadata.distribution("otprune")
    except metadata.PackageNotFoundError:
        pytest.skip("otprune is not pip-installed in this environment")
    with open(os.path.join(ROOT, "setup.py")) as f:
        if "otprune_autopatch.pth" not in f.read():
            pytest.skip("setup.py does not ship otprune_autopatch.pth yet")
    installed = dist.locate_file("otprune_autopatch.pth")
    assert os.path.exists(installed), "otprune is installed without its .pth: reinstall it"
    with open(installed) as a, open(PTH) as b:
        assert a.read() == b.read()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OTPRUNE_KEEP="0.1")
    probe = "import sys; print('_otprune_autopatch' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd="/")
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_from_pretrained_is_patched(patched_class, monkeypatch, tmp_path):
    """from_pretrained builds the model in a meta-device context: the route must still apply."""
    import torch
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava_tiny import tiny_llava15
    from otprune.integrations import llava_original

    tiny_llava15(str(tmp_path)).save_pretrained(str(tmp_path / "llava-tiny"))
    monkeypatch.setenv("OTPRUNE_KEEP", "4")
    monkeypatch.setenv("OTPRUNE_BACKEND", "torch")
    model = LlavaLlamaForCausalLM.from_pretrained(str(tmp_path / "llava-tiny"), torch_dtype=torch.float32)
    assert llava_original.is_patched(model)
    model.get_vision_tower().load_model()  # what LLaVA's load_pretrained_model does next
    assert _lm_lengths(model.eval()) == [t + 8 for t in TEXT]


ACCELERATE_SCRIPT = r"""
import json, os, sys, tempfile
report = {"hook_loaded": "_otprune_autopatch" in sys.modules}  # put there by the installed .pth
from llava.model.builder import load_pretrained_model  # noqa: F401  (lmms-eval's import)
sys.path.insert(0, sys.argv[1])
from llava_tiny import prompt_ids, row_ids, tiny_images, tiny_llava15
model = tiny_llava15(tempfile.mkdtemp())
images, sizes = tiny_images(model, 4)
ids, mask = prompt_ids([row_ids(2), row_ids(2, extra=3)])
lm = []
def lm_hook(module, args, kwargs):
    if kwargs.get("inputs_embeds") is not None:
        lm.append(kwargs["attention_mask"].sum(1).tolist())
model.get_model().register_forward_pre_hook(lm_hook, with_kwargs=True)
model.generate(ids, images=images, image_sizes=sizes, attention_mask=mask, max_new_tokens=2, do_sample=False)
rank = int(os.environ["RANK"])  # set by accelerate's torchrun-based launcher
report.update(lm=lm[0], rank=rank, world=int(os.environ["WORLD_SIZE"]))
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
"""


def test_accelerate_multi_process_launch(tmp_path):
    """The release's launcher with two processes (its multi-process path, torchrun underneath; on a
    CPU-only machine each process runs on the CPU): the installed .pth prunes in each of them."""
    require_module("accelerate", "accelerate")
    try:
        installed = metadata.distribution("otprune").locate_file("otprune_autopatch.pth")
    except metadata.PackageNotFoundError:
        pytest.skip("otprune is not pip-installed in this environment")
    if not os.path.exists(installed):
        pytest.skip("the installed otprune has no otprune_autopatch.pth (reinstall it)")
    script = tmp_path / "job.py"
    script.write_text(ACCELERATE_SCRIPT)
    env = clean_env(**RELEASE)
    env.pop("PYTHONPATH")  # the installed package and its .pth only, as a user's launch sees them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
           str(script), os.path.join(ROOT, "tests"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reps):
        assert rep["rank"] == r and rep["world"] == 2
        assert rep["hook_loaded"]
        assert rep["lm"] == [t + 2 * round(0.25 * N) for t in TEXT]
