"""Host synchronisations of select: exactly one with check=True, none with check=False.

On CPU the syncs are counted by instrumenting every Tensor method that hands data to the host;
on a GPU (tests marked cuda) torch's sync debug mode and a CUDA-graph capture check the same.
"""

import collections
import contextlib

import pytest
import torch

import otprune
from helpers import cpu_backends, features

# Tensor methods that read device data on the host (each one a sync on a GPU).
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__")


@contextlib.contextmanager
def count_host_reads():
    counts = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


X = features(40, 12, 0, b=3)
CASES = {
    "plain": (X, 0.2, {}),
    "count": (X, 5, {}),
    "lengths-list": (X, 0.2, {"lengths": [40, 17, 3]}),
    "lengths-tensor": (X, 0.2, {"lengths": torch.tensor([40, 17, 3])}),
    "lengths-tensor-no-full-row": (X, 0.2, {"lengths": torch.tensor([30, 17, 3])}),
    "fp16": (X.half(), 0.2, {}),
    "bf16-token": (X.bfloat16(), 0.2, {"normalize": "token"}),
    "huge": (X * 1e30, 0.2, {}),
    "tiny-float64": (X.double() * 1e-200, 0.2, {}),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", sorted(CASES))
def test_checked_select_reads_the_host_once(backend, case):
    x, keep, kw = CASES[case]
    otprune.select(x, keep, backend=backend, **kw)  # warm-up: imports, backend probing
    with count_host_reads() as counts:
        otprune.select(x, keep, backend=backend, **kw)
    assert sum(counts.values()) == 1, dict(counts)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", sorted(CASES))
def test_unchecked_select_never_reads_the_host_and_agrees(backend, case):
    x, keep, kw = CASES[case]
    want = otprune.select(x, keep, backend=backend, **kw)
    with count_host_reads() as counts:
        got = otprune.select(x, keep, backend=backend, check=False, **kw)
    assert sum(counts.values()) == 0, dict(counts)
    assert torch.equal(got, want)


def test_unchecked_prune_agrees():
    kept, idx = otprune.prune(X, 0.2, lengths=torch.tensor([40, 17, 3]), check=False)
    kept_c, idx_c = otprune.prune(X, 0.2, lengths=torch.tensor([40, 17, 3]))
    assert torch.equal(idx, idx_c) and torch.equal(kept, kept_c)


@pytest.mark.parametrize("backend", cpu_backends())
def test_unchecked_bad_input_is_not_checked_but_does_not_crash(backend):
    bad = X.clone()
    bad[1, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        otprune.select(bad, 0.2, backend=backend)
    idx = otprune.select(bad, 0.2, backend=backend, check=False)  # unspecified picks, right shape
    assert idx.shape == (3, 8) and idx.dtype == torch.int64
    assert ((idx >= -1) & (idx < 40)).all()
    # out-of-range lengths are clamped to [1, N]; an int keep is cut to each row's length
    lens = torch.tensor([0, 17, 99])
    with pytest.raises(ValueError, match="length"):
        otprune.select(X, 0.2, lengths=lens, backend=backend)
    got = otprune.select(X, 0.2, lengths=lens, backend=backend, check=False)
    assert torch.equal(got, otprune.select(X, 0.2, lengths=[1, 17, 40], backend=backend))
    with pytest.raises(ValueError, match="keep"):
        otprune.select(X, 5, lengths=torch.tensor([40, 3, 40]), backend=backend)
    got = otprune.select(X, 5, lengths=torch.tensor([40, 3, 40]), backend=backend, check=False)
    want = otprune.select(X[1:2, :3], 3, backend=backend)
    assert got[1].tolist() == want[0].tolist() + [-1, -1]


@pytest.mark.parametrize("backend", cpu_backends())
def test_checked_select_reads_after_issuing_the_selection(backend, monkeypatch):
    """The check's one read comes after the greedy was called, so on a GPU the sync waits for the
    finished call instead of stalling the launches (the cost model relies on it). An image outside
    the safe magnitude range is selected a second time, with its scale, after the read."""
    events = []
    be = otprune.backends.get_backend(backend)
    greedy = be.greedy
    monkeypatch.setattr(be, "greedy", lambda *a, **k: events.append("greedy") or greedy(*a, **k))
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: events.append("read") or tolist(self))
    otprune.select(X, 0.2, backend=backend)
    assert events == ["greedy", "read"]
    events.clear()
    otprune.select(X * 1e30, 0.2, backend=backend)
    assert events == ["greedy", "read", "greedy"]


def test_device_and_host_magnitude_scales_agree():
    """The unchecked path's device rule (magnitude_scale) and the checked path's host rule
    (host_magnitude_scale) give the same power of two for every finite nonzero magnitude."""
    import math

    from otprune.kernel import host_magnitude_scale, magnitude_scale

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fi = torch.finfo(dtype)
        mags = [fi.tiny / 1000, fi.tiny / 8, fi.tiny, 1e-300, 1e-30, 1e-13, 1e-12, 1.0000001e-12, 0.3, 1.0,
                1e12, 1.0001e12, 1e13, 1e30, 1e300, fi.max]
        for a in mags:
            for lo, hi in ((0.0, a), (-a, 0.0), (-a / 3, a), (-a, a / 7)):
                t_lo, t_hi = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
                if not (math.isfinite(float(t_lo)) and math.isfinite(float(t_hi))) or float(t_hi) == float(t_lo) == 0:
                    continue
                want = host_magnitude_scale(float(t_lo), float(t_hi), dtype)
                assert float(magnitude_scale(t_lo, t_hi)) == want, (dtype, lo, hi)
                assert want == 1.0 or 0.5 <= max(-float(t_lo), float(t_hi)) * want < 1.0 or want == 2.0 ** (
                    math.frexp(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max)[1] - 2)


LENGTH_CASES = sorted(case for case in CASES if case.startswith("lengths"))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", LENGTH_CASES)
def test_rows_cut_after_on_cpu_backends(backend, case, monkeypatch):
    """The path GPUs take for ragged batches (every row to k_max, cut afterwards; no ragged budgets
    reach a backend), forced on the CPU: the same indices, still one host read with check=True and
    none without."""
    from otprune import _ops

    x, keep, kw = CASES[case]
    want = otprune.select(x, keep, backend=backend, **kw)
    seen = []
    monkeypatch.setattr(_ops, "rows_cut_after", lambda device: True)
    greedy = otprune.backends.get_backend(backend).greedy
    monkeypatch.setattr(otprune.backends.get_backend(backend), "greedy",
                        lambda s, ks, *a, **k: seen.append(list(ks)) or greedy(s, ks, *a, **k))
    for check, reads in ((True, 1), (False, 0)):
        with count_host_reads() as counts:
            got = otprune.select(x, keep, backend=backend, check=check, **kw)
        assert sum(counts.values()) == reads, dict(counts)
        assert torch.equal(got, want)
    assert seen and all(len(set(ks)) == 1 for ks in seen), seen


class HostToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that takes a CPU tensor (other than a 0-d scalar) and returns a tensor on
    another device: a copy from host memory."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        host = [t for t in leaves if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if host and any(t.device.type != "cpu" for t in outs):
            self.copies.append(str(func))
        return out


def test_device_values_fills_without_copying_from_the_host():
    values = [5, 5, 3, 9, 9, 9, 5]
    from otprune._validate import device_values

    cpu = device_values(values, torch.device("cpu"))
    assert cpu.dtype == torch.int64 and cpu.tolist() == values
    with HostToDevice() as spy:
        meta = device_values(values, torch.device("meta"))
    assert meta.shape == (7,) and meta.dtype == torch.int64 and spy.copies == []
    with HostToDevice() as spy:  # the spy sees the copy that device_values avoids
        torch.tensor(values).to("meta")
    assert spy.copies


@pytest.mark.parametrize("lengths", [[40, 17, 3], torch.tensor([40, 17, 3], device="meta")], ids=["list", "tensor"])
@pytest.mark.parametrize("keep", [0.2, 3])
def test_unchecked_select_off_the_cpu_copies_nothing_from_the_host(lengths, keep, monkeypatch):
    """check=False on a non-CPU device (the meta device: shapes only, any host read would fail),
    select and prune through the torch backend's device code: no op takes host data to the device."""
    from otprune import _ops, backends

    torch_backend = backends.get_backend("torch")
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: torch_backend)
    x = torch.empty(3, 40, 12, device="meta")
    with HostToDevice() as spy:
        idx = otprune.select(x, keep, lengths=lengths, check=False)
        kept, _ = otprune.prune(x, keep, lengths=lengths, check=False)
    assert spy.copies == []
    assert idx.device.type == "meta" and idx.dtype == torch.int64
    assert idx.shape == (3, 8 if keep == 0.2 else 3) and kept.shape == (*idx.shape, 12)


def test_tensor_lengths_width_is_the_full_row_budget():
    """A lengths tensor's values are unknown until read, so the width follows from N alone."""
    lens = [30, 17, 3]
    from_list = otprune.select(X, 0.2, lengths=lens)
    from_tensor = otprune.select(X, 0.2, lengths=torch.tensor(lens))
    assert from_list.shape == (3, 6) and from_tensor.shape == (3, 8)
    assert torch.equal(from_tensor[:, :6], from_list) and (from_tensor[:, 6:] == -1).all()


# ---- GPU only (untested on GPU: no GPU was available where these were written) -------------------

def _cuda_backends():
    from otprune import backends

    return [name for name in backends.BACKEND_NAMES if backends.usable(name, "cuda")[0]] or ["torch"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("kind", ["tensor", "list"])
def test_cuda_sync_counts(backend, kind):
    x = X.cuda().half()
    lens = torch.tensor([40, 17, 3], device="cuda") if kind == "tensor" else [40, 17, 3]
    want = otprune.select(x, 0.2, lengths=lens, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = otprune.select(x, 0.2, lengths=lens, backend=backend, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want)


def _captured_select(x, lens, backend):
    """(graph, out): select(check=False) captured in a CUDA graph after a warm-up outside it (lazy
    init, autotuning); replaying the graph rewrites ``out``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        otprune.select(x, 0.2, lengths=lens, backend=backend, check=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = otprune.select(x, 0.2, lengths=lens, backend=backend, check=False)
    return graph, out


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _cuda_backends())
def test_cuda_graph_capture_with_list_lengths(backend):
    """Python lengths are written on the device by captured fills; other pinned host allocations
    between capture and replay (which could reuse a staging buffer) do not change the result."""
    x = X.cuda().half()
    lens = [40, 17, 3]
    graph, out = _captured_select(x, lens, backend)
    for seed in (1, 2):
        torch.full((64,), 7, dtype=torch.int64).pin_memory().cuda(non_blocking=True)
        fresh = features(40, 12, seed, b=3)
        x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, otprune.select(fresh.half().cuda(), 0.2, lengths=lens, backend=backend))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _cuda_backends())
def test_cuda_graph_capture(backend):
    x = X.cuda().half()
    lens = torch.tensor([40, 17, 3], device="cuda")
    graph, out = _captured_select(x, lens, backend)
    for seed in (1, 2):
        fresh = features(40, 12, seed, b=3)
        x.copy_(fresh)
        lens.copy_(torch.tensor([17, 40, 9]))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, otprune.select(fresh.half().cuda(), 0.2, lengths=lens, backend=backend))
