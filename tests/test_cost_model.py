"""The GPU cost model (otprune.cost_model): its bounds obey their definition and monotonicity, its
per-step op count matches the torch loop, and ``auto`` on CUDA follows it (CPU only: usability is
monkeypatched, nothing runs on a GPU)."""

import csv
import dataclasses
import importlib
import itertools
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from otprune import backends
from otprune import cost_model as cm
from simt_build import build_driver, launch_plan, launcher_choice, require_cxx

SHAPES = [cm.Shape(B, N, d, cm.round_budget(r, N), dt)
          for B, N, d, r, dt in [(1, 576, 4096, 0.098, "float16"), (8, 576, 1024, 0.222, "float16"),
                                 (32, 576, 4096, 0.098, "float16"), (1, 2880, 4096, 0.098, "float16"),
                                 (32, 2880, 4096, 0.098, "float16"), (4, 1000, 512, 0.3, "float32"),
                                 (2, 300, 64, 0.5, "float64")]]
NAMES = list(cm.GPU_BACKENDS) + list(cm.DESIGNS)
# More shapes for the CUDA launch plan: clusters of 2 .. 16 blocks, rows off chip, float64.
EXTRA_SHAPES = [cm.Shape(B, N, 64, k, dt) for B, N, k, dt in
                [(1, 1152, 113, "float32"), (2, 2000, 196, "float32"), (8, 2880, 282, "float32"),
                 (9, 2880, 282, "float32"), (40, 1000, 300, "float32"), (1, 4096, 400, "float32"),
                 (3, 1500, 150, "float64"), (70, 1152, 113, "float32")]]


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    """tests/simt/driver.cpp compiled around csrc/greedy_kernel.cuh (only its --plan mode is used)."""
    require_cxx("the launch-plan driver")
    out = tmp_path_factory.mktemp("plan") / "driver"
    build_driver(out, ["-O0"])
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s.B}N{s.N}d{s.d}k{s.k}{s.dtype}")
@pytest.mark.parametrize("gpu", cm.GPUS, ids=lambda g: g.name)
def test_bound_is_its_definition(shape, gpu):
    lat = cm.LATENCY
    for name in NAMES:
        est = cm.estimate(name, shape, gpu)
        assert est.seconds == pytest.approx(max(est.host_s, est.device_s) + est.host_syncs * lat.host_sync_s)
        assert est.host_s == pytest.approx(est.host_ops * lat.launch_s)
        assert est.seconds >= est.device_s and est.seconds >= est.host_s > 0
        for p in est.phases:
            t = p.device_s(gpu, lat)
            sms = gpu.sms if p.sms is None else min(gpu.sms, p.sms)
            assert t >= p.hbm_bytes / gpu.hbm_bw  # never faster than HBM allows
            assert t >= p.flops / getattr(gpu, p.unit) * (1 - 1e-12)  # nor than the peak rate
            assert t >= p.flops / (getattr(gpu, p.unit) * sms / gpu.sms) * (1 - 1e-12)  # on the SMs it uses
            assert t >= p.latency_s + p.kernels * lat.kernel_s
        assert est.flops > 0 and est.hbm_bytes > 0


@pytest.mark.parametrize("name", NAMES, ids=lambda n: f"name-{n}")  # an id "cuda" would mark it GPU-only
def test_bound_grows_with_work(name):
    """More images, more picks or more features never make a call cheaper; a faster HBM never
    makes it slower."""
    base = cm.Shape(8, 576, 1024, 56)
    for bigger in (cm.Shape(32, 576, 1024, 56), cm.Shape(8, 576, 1024, 120), cm.Shape(8, 576, 4096, 56)):
        for gpu in cm.GPUS:
            assert cm.estimate(name, bigger, gpu).seconds >= cm.estimate(name, base, gpu).seconds * (1 - 1e-9)
    for shape in SHAPES:
        assert cm.estimate(name, shape, cm.H200).seconds <= cm.estimate(name, shape, cm.H100).seconds * (1 + 1e-9)


def test_modelled_work_matches_the_algorithms():
    """Bytes and FLOPs every design must at least move / compute, from the algorithm itself."""
    for shape in SHAPES:
        B, N, d, k = shape.B, shape.N, shape.d, shape.k
        for name in NAMES:
            est = cm.estimate(name, shape, cm.H100)
            assert est.hbm_bytes >= B * N * d * 2  # the features are read
            assert est.flops >= B * N * N * d  # the similarity (half of it, by symmetry)
            assert est.steps >= k - 1 or name == "official"
        legacy = cm.estimate("cuda-legacy", shape, cm.H100)  # re-reads S (N^2 floats) every step
        assert legacy.hbm_bytes + legacy.onchip_bytes >= B * k * N * N * 4
        assert cm.estimate("official", shape, cm.H100).host_syncs >= B * (k - 1)  # .item() per step


CUDA_DESIGNS = [d for d in cm.DESIGNS if d.startswith("cuda-") and d != "cuda-legacy"]


def test_cuda_designs_follow_the_launch_plan():
    """Every CUDA design's greedy runs as cuda_launch_plan says: the Cholesky rows' traffic goes to
    shared memory exactly when the plan keeps them on chip, one SM per block, cluster step latency
    only for a cluster; and a cluster is used only when one block cannot hold the rows and the
    batch's clusters fit the SMs at once."""
    for shape, gpu in itertools.product(SHAPES + EXTRA_SHAPES, cm.GPUS):
        elem = 8 if shape.dtype == "float64" else 4
        plan = cm.cuda_launch_plan(shape.B, shape.N, shape.k, elem, gpu)
        block = cm.cuda_block_plan(shape.N, shape.k, elem, gpu.smem_bytes)
        assert plan.smem_bytes <= gpu.smem_bytes
        if plan.cluster > 1:
            assert not block.rows_on_chip and shape.B * plan.cluster <= gpu.sms
        else:
            assert plan == block
            split = cm.cuda_cluster_plan(shape.N, shape.k, elem, gpu.smem_bytes)
            assert block.rows_on_chip or split is None or shape.B * split.cluster > gpu.sms
        for design in CUDA_DESIGNS:
            (text, phases), = cm.DESIGNS[design](shape, gpu, cm.LATENCY)
            greedy = next(p for p in phases if p.name.startswith("greedy"))
            assert greedy.sms == shape.B * plan.cluster
            assert (greedy.smem_bytes > 0) == (plan.rows_on_chip and shape.k > 2)
            step = cm.LATENCY.cluster_step_s if plan.cluster > 1 else cm.LATENCY.block_step_s
            assert greedy.latency_s == pytest.approx(greedy.steps * step)
            assert (f"cluster of {plan.cluster} blocks" in text) == (plan.cluster > 1)


def test_designs_state_what_is_implemented():
    """Every design has a status; a backend's design is the one marked implemented for it, and the
    other cuda designs share its greedy launch and sort (they differ in the similarity and G)."""
    assert set(cm.DESIGN_STATUS) == set(cm.DESIGNS)
    for backend, design in cm.BACKEND_DESIGN.items():
        assert cm.DESIGN_STATUS[design].startswith(f"implemented ({backend} backend)")
    shape = cm.Shape(1, 2880, 4096, 282)
    ours = cm.estimate("cuda", shape, cm.H100)
    for design in CUDA_DESIGNS:
        if design != cm.BACKEND_DESIGN["cuda"]:
            assert not cm.DESIGN_STATUS[design].startswith("implemented (")
            other = cm.estimate(design, shape, cm.H100)
            assert other.design == ours.design and other.phases[-2:] == ours.phases[-2:]


def test_cuda_without_triton_still_ranks_before_torch():
    """Where Triton is not usable the cuda backend runs cuda-fp32-rows (and triton is not usable
    either): auto's ranking by the Triton design stays right, as that design too beats torch."""
    for shape, gpu in itertools.product(SHAPES + EXTRA_SHAPES, cm.GPUS):
        assert cm.estimate("cuda-fp32-rows", shape, gpu).seconds < cm.estimate("torch", shape, gpu).seconds, shape


def test_triton_tile_rule_matches_the_kernels():
    """triton_gemm_block is the kernels' own rule (otprune/triton_kernels/_env.py gemm_block) at the
    SM count those assume without a GPU."""
    env = pytest.importorskip("otprune.triton_kernels._env", reason="triton not installed")
    gpu = dataclasses.replace(cm.H100, sms=env.DEFAULT_SMS)
    for B, N, fp16 in itertools.product((1, 2, 8, 32, 200), (1, 64, 576, 1001, 2880), (True, False)):
        assert cm.triton_gemm_block(B, N, fp16, gpu) == env.gemm_block(B, N, fp16, torch.device("cpu")), (B, N, fp16)


def test_cluster_plan_follows_the_gpu():
    """The launcher takes the smallest cluster that holds the rows; without clusters (compute
    capability 8) or with more images than the SMs hold at once, rows that do not fit one block go
    to global memory."""
    sm80 = dataclasses.replace(cm.H100, cc_major=8)
    for shape in EXTRA_SHAPES:
        plan = cm.cuda_launch_plan(shape.B, shape.N, shape.k, 4, cm.H100)
        if plan.cluster > 1:
            block = cm.cuda_block_plan(shape.N, shape.k, 4, cm.H100.smem_bytes)
            assert cm.cuda_cluster_plan(shape.N, shape.k, 4, cm.H100.smem_bytes, plan.cluster // 2) is None  # smallest
            assert cm.cuda_launch_plan(shape.B, shape.N, shape.k, 4, sm80) == block
            many = cm.H100.sms // plan.cluster + 1
            assert cm.cuda_launch_plan(many, shape.N, shape.k, 4, cm.H100) == block
    assert any(cm.cuda_launch_plan(s.B, s.N, s.k, 4, cm.H100).cluster > 1 for s in EXTRA_SHAPES)


def test_cuda_plan_matches_the_compiled_header(plan_driver):
    """The model's transcription of greedy_plan / greedy_cluster_plan returns what
    csrc/greedy_kernel.cuh computes (tests/simt/driver.cpp --plan), over sizes, budgets, element
    sizes and shared-memory limits (sm_90, sm_80, the 48 KiB default)."""
    for n, elem, limit in itertools.product((1, 37, 576, 577, 1000, 2880, 4096), (4, 8), (232448, 166912, 49152)):
        for k in sorted({1, 2, 3, max(1, n // 10), round(0.098 * n) or 1, n}):
            got = launch_plan(plan_driver, n, k, elem, limit)
            want = cm.cuda_block_plan(n, k, elem, limit)
            assert got == (want.threads, want.smem_bytes, want.rows_on_chip, want.cluster, want.slice), (n, k, elem)
            for max_cluster in (4, 16):
                want = cm.cuda_cluster_plan(n, k, elem, limit, max_cluster)
                if want is None:
                    with pytest.raises(subprocess.CalledProcessError):
                        launch_plan(plan_driver, n, k, elem, limit, max_cluster)
                else:
                    got = launch_plan(plan_driver, n, k, elem, limit, max_cluster)
                    assert got == (want.threads, want.smem_bytes, True, want.cluster, want.slice), (n, k, elem)


def test_cuda_launch_choice_matches_the_compiled_header(plan_driver):
    """cuda_launch_plan (block, cluster or global rows, by batch and device) is the launcher's own
    choice, csrc/greedy_kernel.cuh launch_plan, on H100-, A100- and small-GPU-like devices."""
    small = dataclasses.replace(cm.H100, sms=20)
    for gpu, batch, (n, k) in itertools.product((cm.H100, cm.A100, small), (1, 2, 8, 9, 32, 200),
                                                ((576, 56), (577, 200), (1152, 113), (2880, 282), (4096, 400))):
        want = cm.cuda_launch_plan(batch, n, k, 4, gpu)
        got = launcher_choice(plan_driver, batch, n, k, 4, gpu.smem_bytes, gpu.cc_major, gpu.sms)
        assert got == (want.threads, want.smem_bytes, want.rows_on_chip, want.cluster, want.slice), (gpu.name, batch, n)


class NonViewOps(TorchDispatchMode):
    """Records every non-view op dispatched inside it (``ops``), as the host would issue them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", ["full", "lazy"])
def test_torch_step_ops_match_the_loop(rows):
    """TORCH_STEP_OPS is at most the number of non-view ops one step of greedy_picks dispatches."""
    from otprune.greedy import greedy_picks

    s = torch.randn(2, 24, 24, generator=torch.Generator().manual_seed(0))
    s = s + s.transpose(1, 2)
    counts = []
    for k in (5, 6):
        with NonViewOps() as c:
            greedy_picks(s, [k, k], 0.01, rows=rows)
        counts.append(len(c.ops))
    assert cm.TORCH_STEP_OPS[rows] <= counts[1] - counts[0] <= cm.TORCH_STEP_OPS[rows] + 2


def test_check_ops_match_the_probe():
    """SELECT_CHECK_OPS / SELECT_CHECK_KERNELS are the ops select_probe dispatches on a non-CPU
    device (the meta device: shapes only) for a batch without lengths."""
    from otprune._validate import select_probe

    for B in (1, 8):
        x = torch.empty(B, 576, 64, device="meta", dtype=torch.float16)
        with NonViewOps() as r:
            probe = select_probe(x, None)
        assert probe.shape == (2 * B,)
        allocations = [op for op in r.ops if "empty" in str(op)]
        assert len(r.ops) == cm.SELECT_CHECK_OPS, r.ops
        assert len(r.ops) - len(allocations) == cm.SELECT_CHECK_KERNELS, r.ops


def test_triton_tiling_matches_the_kernel():
    tg = importlib.import_module("otprune.triton_kernels.greedy")

    assert (cm.TRITON_BLOCK_T, cm.TRITON_MAX_BLOCK_N) == (tg.BLOCK_T, tg.MAX_BLOCK_N)
    assert cm.TRITON_FULL_L_BUDGET_BYTES == tg.FULL_L_BUDGET_BYTES


def test_triton_rows_choice_agrees_with_its_launcher():
    """The Triton launcher's own full/lazy rule and this model's fastest Triton variant agree at the
    target shapes and a few others."""
    tg = importlib.import_module("otprune.triton_kernels.greedy")
    for shape in SHAPES + [cm.Shape(1, 576, 4096, 1), cm.Shape(256, 576, 4096, 2)]:
        if shape.dtype == "float64":
            continue  # float64 runs in torch
        picked = "full" if "full L" in cm.estimate("triton", shape, cm.H100).design else "lazy"
        assert picked == tg.choose_strategy(shape.B, shape.N, shape.k), shape


def test_cuda_rows_choice_agrees_with_its_launcher():
    """The modelled cuda backend takes the kernel-row form its launcher (cuda_ext.rows_strategy) takes."""
    cuda_ext = pytest.importorskip("otprune.backends.cuda_ext", reason="otprune._C not built")
    for shape in SHAPES + EXTRA_SHAPES + [cm.Shape(72, 2880, 64, 282, "float32"),  # G over the budget
                                          cm.Shape(40, 2880, 64, 282, "float64")]:
        dtype = torch.float64 if shape.dtype == "float64" else torch.float32  # S's dtype
        s = torch.empty(shape.B, shape.N, shape.N, device="meta", dtype=dtype)
        picked = "full" if "rows full" in cm.estimate("cuda", shape, cm.H100).design else "lazy"
        assert picked == cuda_ext.rows_strategy(s), shape


def test_shape_rejects_bad_input():
    with pytest.raises(ValueError, match="k=9 exceeds N=8"):
        cm.Shape(1, 8, 4, 9)
    with pytest.raises(ValueError, match="dtype"):
        cm.Shape(1, 8, 4, 2, "int8")
    with pytest.raises(ValueError, match="B must be"):
        cm.Shape(0, 8, 4, 2)
    with pytest.raises(ValueError, match="name must be one of"):
        cm.estimate("nope", cm.Shape(1, 8, 4, 2))


# ------------------------------------------------------------------------------------------ auto


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend the named backends are usable for CUDA tensors; returns a setter for that set."""
    usable_set = set()

    def usable(name, dev):
        return (dev == "cuda" and name in usable_set, "" if name in usable_set else "monkeypatched off")

    monkeypatch.setattr(backends, "usable", usable)
    monkeypatch.setattr(backends, "get_backend",
                        lambda name: backends.Backend(name, ("cuda",), similarity=None, greedy=None))
    monkeypatch.delenv(cm.MEASURED_ENV, raising=False)
    backends._ranked.cache_clear()
    yield usable_set.update
    backends._ranked.cache_clear()


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: f"B{s.B}N{s.N}")
@pytest.mark.parametrize("avail", [("cuda", "triton", "torch"), ("triton", "torch"), ("cuda", "torch"), ("torch",)])
def test_auto_follows_the_model(fake_cuda, shape, avail):
    fake_cuda(avail)
    dtype = getattr(torch, shape.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning for backends monkeypatched off
        got = backends.resolve("auto", torch.device("cuda"), (shape.B, shape.N, shape.d, shape.k, dtype)).name
    times = {n: cm.estimate(n, shape, cm.H100).seconds for n in avail}
    assert times[got] == min(times.values())
    assert times[got] <= times["torch"]  # never slower than the torch backend


def test_cpu_order_is_measured_order():
    assert backends.auto_order(torch.device("cpu")) == ("cpu", "torch")


def _write_measured(path, device, shape, p50_ms):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "provider", "B", "N", "d", "k", "dtype", "p50_ms"])
        w.writeheader()
        for name, ms in p50_ms.items():
            w.writerow({"device": device, "provider": f"otprune-{name}", "B": shape.B, "N": shape.N,
                        "d": shape.d, "k": shape.k, "dtype": shape.dtype, "p50_ms": ms})


def test_measurements_override_the_model(tmp_path, fake_cuda, monkeypatch):
    shape = SHAPES[0]
    fake_cuda(("cuda", "triton", "torch"))
    modelled = cm.rank(list(cm.GPU_BACKENDS), shape, "", measured={})
    slowest = modelled[-1]
    path = tmp_path / "select.csv"
    # measured: the model's slowest backend is the fastest on this device
    _write_measured(path, "", shape, {n: (0.01 if n == slowest else 1.0) for n in cm.GPU_BACKENDS})
    measured = cm.load_measurements(str(path))
    assert cm.rank(list(cm.GPU_BACKENDS), shape, "", measured)[0] == slowest
    monkeypatch.setenv(cm.MEASURED_ENV, str(path))
    backends._ranked.cache_clear()
    shp = (shape.B, shape.N, shape.d, shape.k, torch.float16)
    assert backends.resolve("auto", torch.device("cuda"), shp).name == slowest
    # a backend without a measurement: the model ranks them all (never a mix)
    partial = {k: v for k, v in measured.items() if k[1] != modelled[0]}
    assert cm.rank(list(cm.GPU_BACKENDS), shape, "", partial) == modelled
    # another device's measurements do not apply
    assert cm.rank(list(cm.GPU_BACKENDS), shape, "NVIDIA H200", measured) == \
        cm.rank(list(cm.GPU_BACKENDS), shape, "NVIDIA H200", measured={})


def test_bench_model_report(tmp_path):
    """`python -m bench model` writes a report naming every backend, design, auto's pick and the
    figures used."""
    from bench.__main__ import main

    assert main(["model", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "model.md").read_text()
    for name in list(cm.GPU_BACKENDS) + [d for d in cm.DESIGNS if d not in cm.BACKEND_DESIGN.values()]:
        assert f"| {name} |" in text
    for needle in ("3.35 TB/s", "4.8 TB/s", "989 TFLOP/s", "67 TFLOP/s", "50 MB", "auto picks", "MISSES", "meets"):
        assert needle in text
    assert text.count("auto picks (all GPU backends usable") == 6  # one line per configuration


def test_readme_shows_the_models_current_numbers():
    """README's modelled table is bench.model.summary_table() as the model computes it now."""
    from bench.model import summary_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert summary_table() in readme, "README's modelled table is stale: paste bench.model.summary_table()"


def test_device_names_map_to_their_figures():
    """An A100 is ranked with its own figures (no clusters, 163 KB, 108 SMs): the launch plan the
    model assumes there is the one the launcher makes on compute capability 8."""
    assert cm.gpu_for("NVIDIA H200") is cm.H200
    assert cm.gpu_for("NVIDIA A100-SXM4-80GB") is cm.A100
    assert cm.gpu_for("NVIDIA H100 80GB HBM3") is cm.H100 and cm.gpu_for("") is cm.H100
    shape = cm.Shape(1, 2880, 4096, 282)
    assert cm.cuda_launch_plan(1, 2880, 282, 4, cm.H100).cluster > 1
    plan = cm.cuda_launch_plan(1, 2880, 282, 4, cm.A100)
    assert plan.cluster == 1 and not plan.rows_on_chip and plan.smem_bytes <= cm.A100.smem_bytes
    assert "global memory" in cm.estimate("cuda", shape, cm.A100).design
    assert cm.estimate("cuda", shape, cm.A100).seconds > cm.estimate("cuda", shape, cm.H100).seconds
