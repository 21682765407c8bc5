"""The plugin without an engine: entry point, inactive when unset, settings errors at plugin load,
the Python route, the per-image selection, and rank agreement under tensor parallelism."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
import torch

import otprune
import otprune.vllm
from otprune.autopatch import Settings

ARCHS = tuple(otprune.vllm.ARCHS)


@pytest.fixture
def clean_env(monkeypatch):
    """No pruning variables; vLLM's registry entries and plugin-loaded flag restored afterwards."""
    import vllm.plugins
    from vllm import ModelRegistry

    for name in ("OTPRUNE_KEEP", "BASELINE", "SUBSET_RATIO", "OTPRUNE_COMPAT", "OTPRUNE_GAMMA",
                 "OTPRUNE_NORMALIZE", "OTPRUNE_BACKEND", "OTPRUNE_LAYER", "LAYER_INDEX", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    entries = {a: ModelRegistry.models.get(a) for a in ARCHS}
    loaded = vllm.plugins.plugins_loaded
    yield ModelRegistry
    otprune.vllm.disable()
    for name in otprune.vllm._ENV:
        os.environ.pop(name, None)
    for arch, entry in entries.items():
        ModelRegistry.models[arch] = entry
    vllm.plugins.plugins_loaded = loaded


def test_entry_point_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("otprune") == "otprune.vllm:register"


def test_unset_leaves_vllm_untouched(clean_env):
    import vllm.plugins

    before = {a: clean_env.models[a] for a in ARCHS}
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()  # what every vLLM process does at start
    assert {a: clean_env.models[a] for a in ARCHS} == before
    assert all(type(e).__name__ == "_LazyRegisteredModel" and e.module_name.startswith("vllm.") for e in before.values())


def test_env_route_registers_the_pruning_classes(clean_env, monkeypatch):
    import vllm.plugins

    monkeypatch.setenv("BASELINE", "OURS")
    monkeypatch.setenv("SUBSET_RATIO", "0.25")
    vllm.plugins.plugins_loaded = False
    vllm.plugins.load_general_plugins()
    for arch in ARCHS:
        entry = clean_env.models[arch]
        assert f"{entry.module_name}:{entry.class_name}" == otprune.vllm.ARCHS[arch]
    for arch, target in otprune.vllm.ARCHS.items():
        cls = clean_env._try_load_model_cls(arch)
        assert f"{cls.__module__}:{cls.__name__}" == target


@pytest.mark.parametrize("rate, pp, words", [(0.5, 1, "video_pruning_rate=0.5"), (None, 2, "pipeline_parallel_size")])
def test_qwen_refuses_evs_and_pipeline_parallelism(clean_env, monkeypatch, rate, pp, words):
    """Checked before vLLM's model is built, so a bad engine fails at start, naming the setting."""
    from types import SimpleNamespace

    from otprune.vllm import qwen_vl

    monkeypatch.setenv("OTPRUNE_KEEP", "0.1")
    cfg = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=SimpleNamespace(video_pruning_rate=rate)),
                          parallel_config=SimpleNamespace(pipeline_parallel_size=pp))
    for cls in (qwen_vl.OTPruneQwen2VLForConditionalGeneration, qwen_vl.OTPruneQwen2_5_VLForConditionalGeneration,
                qwen_vl.OTPruneQwen3VLForConditionalGeneration):
        with pytest.raises(ValueError, match=words):
            cls(vllm_config=cfg)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"OTPRUNE_KEEP": "abc"}, ["OTPRUNE_KEEP", "'abc'"]),
        ({"OTPRUNE_KEEP": "1.5"}, ["keep", "1.5"]),
        ({"OTPRUNE_KEEP": "0"}, ["keep", ">= 1"]),
        ({"BASELINE": "OURS"}, ["SUBSET_RATIO"]),
        ({"OTPRUNE_KEEP": "0.1", "OTPRUNE_LAYER": "2"}, ["layer 2", "layer 0"]),
        ({"BASELINE": "OURS", "SUBSET_RATIO": "0.1", "LAYER_INDEX": "x"}, ["LAYER_INDEX"]),
        ({"OTPRUNE_KEEP": "0.1", "OTPRUNE_COMPAT": "release"}, ["OTPRUNE_COMPAT"]),
        ({"OTPRUNE_KEEP": "0.1", "OTPRUNE_BACKEND": "gpu"}, ["backend", "'gpu'"]),
        ({"OTPRUNE_KEEP": "0.1", "OTPRUNE_NORMALIZE": "row"}, ["normalize", "'row'"]),
        ({"OTPRUNE_KEEP": "0.1", "OTPRUNE_GAMMA": "-1"}, ["gamma"]),
    ],
)
def test_bad_settings_fail_when_vllm_loads_the_plugin(clean_env, monkeypatch, env, words):
    import vllm.plugins

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = {a: clean_env.models[a] for a in ARCHS}
    vllm.plugins.plugins_loaded = False
    with pytest.raises(ValueError, match="otprune vLLM plugin: bad pruning settings") as info:
        vllm.plugins.load_general_plugins()
    for w in words:
        assert w in str(info.value)
    assert {a: clean_env.models[a] for a in ARCHS} == before


def test_enable_and_disable(clean_env):
    before = {a: clean_env.models[a] for a in ARCHS}
    s = otprune.vllm.enable(keep=0.2, compat="official", gamma=0.05)
    assert s == Settings(0.2, 0, {"compat": "official", "gamma": 0.05})
    assert os.environ["OTPRUNE_KEEP"] == "0.2" and os.environ["OTPRUNE_COMPAT"] == "official"
    assert otprune.vllm.settings() == s  # what the engine's processes will read
    assert all(f"{clean_env.models[a].module_name}:{clean_env.models[a].class_name}" == otprune.vllm.ARCHS[a]
               for a in ARCHS)
    assert otprune.vllm.enable(keep=56) == Settings(56, 0, {})  # a count; earlier options dropped
    assert "OTPRUNE_COMPAT" not in os.environ
    otprune.vllm.disable()
    assert otprune.vllm.settings() is None
    assert {a: clean_env.models[a] for a in ARCHS} == before


def test_enable_rejects_bad_values_without_side_effects(clean_env):
    with pytest.raises(ValueError, match="keep"):
        otprune.vllm.enable(keep=2.0)
    with pytest.raises(ValueError, match="normalize"):
        otprune.vllm.enable(keep=0.1, normalize="rows")
    with pytest.raises(ValueError, match="keep must be an int or a float"):
        otprune.vllm.enable(keep="0.1")
    assert "OTPRUNE_KEEP" not in os.environ
    assert all(clean_env.models[a].module_name.startswith("vllm.") for a in ARCHS)


def _ragged(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, generator=g) for n in (40, 64, 23)]


def test_kept_embeddings_ragged_batch_is_per_image_select():
    from otprune.vllm.models import kept_embeddings

    feats = _ragged()
    out = kept_embeddings(feats, Settings(0.1, 0, {}))
    assert [o.shape[0] for o in out] == [4, 6, 2]
    for f, o in zip(feats, out):
        idx = otprune.select(f, 0.1)
        assert torch.equal(idx, idx.sort().values)
        assert torch.equal(o, f[idx])


def test_kept_embeddings_official_order_and_uniform_batch():
    from otprune.vllm.models import kept_embeddings

    feats = _ragged(1)
    out = kept_embeddings(feats, Settings(0.25, 0, {"compat": "official"}))
    orders = [otprune.select(f, 0.25, compat="official") for f in feats]
    assert any(not torch.equal(i, i.sort().values) for i in orders)  # the release's order is not sorted
    for f, o, i in zip(feats, out, orders):
        assert torch.equal(o, f[i])
    batch = torch.stack([feats[1][:20], feats[1][20:40]]).to(torch.bfloat16)  # LLaVA-1.5: one (B, N, D)
    out = kept_embeddings(batch, Settings(5, 0, {}))
    assert [tuple(o.shape) for o in out] == [(5, 16), (5, 16)] and out[0].dtype == torch.bfloat16


def _tp_rank(rank: int, world: int, port: int, path: str) -> None:
    """One 'tensor-parallel rank': a row-parallel projector shard, all-reduce, then selection."""
    import torch.distributed as dist

    from otprune.vllm.models import kept_embeddings

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(n, 32, generator=g) for n in (50, 37)]
    weight = torch.randn(32, 24, generator=g)
    shard = slice(rank * 16, (rank + 1) * 16)  # each rank holds half of the input features
    feats = []
    for h in hidden:
        part = h[:, shard] @ weight[shard]
        dist.all_reduce(part)  # every rank receives the same sum
        feats.append(part)
    kept = kept_embeddings(feats, Settings(0.2, 0, {}))
    torch.save([k.clone() for k in kept], f"{path}.{rank}")
    dist.destroy_process_group()


def test_tensor_parallel_ranks_keep_the_same_tokens(tmp_path):
    """vLLM runs the encoder on every rank; its row-parallel layers end in an all-reduce that hands
    every rank the same features, and the selection is deterministic, so every rank keeps the same
    tokens. Checked with two gloo processes on the CPU."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "kept")
    mp.start_processes(_tp_rank, args=(2, port, path), nprocs=2, start_method="spawn")
    a, b = (torch.load(f"{path}.{r}") for r in (0, 1))
    assert [x.shape[0] for x in a] == [10, 7]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
