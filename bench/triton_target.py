"""Compile every Triton kernel for a real NVIDIA target on a machine without a GPU, and read its resources.

How: a fake active Triton driver whose ``get_current_target()`` is ``GPUTarget("cuda", arch, 32)``
(device 0, stream 0) is installed, and ``JITFunction.run`` is made compile-only (``warmup=True``).
The project's own wrappers (the triton backend's two stages, :func:`kernel_rows`) are then called
with CPU tensors of the real shapes, so exactly the specialisations a GPU run would compile are
compiled, by Triton's real NVIDIA backend and its bundled ``ptxas``. Nothing is launched.
Per compiled kernel: registers and stack (bundled ``cuobjdump -res-usage`` on the cubin), spill
instructions (local-memory loads / stores ``LDL`` / ``STL`` in its SASS), shared memory
(``metadata.shared``, dynamic, plus the cubin's static shared memory).

What this proves: the kernels compile for sm_80 / sm_90 at these shapes, and their register, stack
and shared-memory use. It proves nothing about results or speed on a GPU (untested on GPU).

Triton must not be in interpreter mode: run it in a fresh process (:func:`run`, or
``python -m bench.triton_target --arch 90``), never in the test process (tests set TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ARCHS = (80, 90)
# Largest shared memory one block may use (static + dynamic, opt-in), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255
NS = (576, 2880, 1001)  # the two LLaVA sizes and an odd N
GREEDY_NS = NS + (100, 300)  # plus the greedy's smaller column blocks (128, 512)
DS = (1024, 4096, 5120)
DTYPES = ("float16", "bfloat16", "float32")
GAMMA = 0.01
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- in the compiling process


def install_fake_driver(arch: int) -> List[dict]:
    """Make Triton compile for ``sm_<arch>`` without a GPU and never launch.

    Returns a list that receives one record per compile-only launch: the kernel's name, the
    compiled kernel, its constexpr arguments and the dtypes of its tensor arguments.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it before Triton is imported")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)

    def _unavailable(*_a, **_k):
        raise RuntimeError("fake compile-only Triton driver: nothing runs on it")

    methods = {name: _unavailable for name in getattr(DriverBase, "__abstractmethods__", ())}
    methods.update(
        is_active=classmethod(lambda cls: True),
        get_current_target=lambda self: target,
        get_current_device=lambda self: 0,
        get_current_stream=lambda self, device=None: 0,
        set_current_device=lambda self, device: None,
        get_active_torch_device=lambda self: torch.device("cpu"),
        __init__=lambda self: None,
    )
    driver.set_active(type("CompileOnlyDriver", (DriverBase,), methods)())

    records: List[dict] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        const = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)})
        records.append(dict(kernel=kernel, constexprs=const, dtypes=dtypes))
        return kernel

    JITFunction.run = run
    return records


def cases(ns: Sequence[int] = NS, ds: Sequence[int] = DS, dtypes: Sequence[str] = DTYPES) -> Iterator[Tuple[str, dict]]:
    """(label, arguments) of every wrapper call at the shapes that matter.

    stage 1: every (N, d, dtype, normalisation, valid mask or not), plus a transposed
    (non-unit feature stride) view and an odd d; stage 2: every N with ragged budgets
    (k = round(0.098 N) and half that) and a valid mask or none, both kernel-row forms, also at the
    smaller N of GREEDY_NS; kernel_rows; kernel_matrix as G (split-fp16, no identity) and in ieee.
    """
    for n in ns:
        for d in ds:
            for dt in dtypes:
                for norm in ("feature", "token"):
                    for masked in (False, True):
                        yield "similarity", dict(n=n, d=d, dtype=dt, normalize=norm, masked=masked)
    for dt in dtypes:
        for norm in ("feature", "token"):
            yield "similarity", dict(n=ns[0], d=ds[0], dtype=dt, normalize=norm, masked=False, transposed=True)
            yield "similarity", dict(n=ns[-1], d=ds[0] + 1, dtype=dt, normalize=norm, masked=True)
    for n in ns + tuple(n for n in GREEDY_NS if n not in ns):
        for strategy in ("full", "lazy"):
            for masked in (False, True):
                yield "greedy", dict(n=n, k=max(1, round(0.098 * n)), strategy=strategy, masked=masked)
        yield "kernel_rows", dict(n=n, m=max(1, round(0.098 * n)))
    for n in ns:  # the cuda backend's G (the greedy's "full" form above compiles split-fp16 L)
        yield "kernel_matrix", dict(n=n, identity=False, precision="split-fp16")
        yield "kernel_matrix", dict(n=n, identity=True, precision="ieee")


def _call(what: str, c: dict) -> None:
    """One wrapper call (compile-only) on CPU tensors of the case's shapes; B = 2, image 1 ragged."""
    import torch

    from otprune import triton_kernels as tk
    from otprune.backends.triton_backend import BACKEND

    n = c["n"]
    valid = None
    if c.get("masked"):
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, n // 2:] = False
    if what == "similarity":
        shape = (2, c["d"], n) if c.get("transposed") else (2, n, c["d"])
        x = torch.zeros(shape, dtype=getattr(torch, c["dtype"]))
        x = x.transpose(1, 2) if c.get("transposed") else x
        BACKEND.similarity(x, c["normalize"], valid)
    elif what == "greedy":
        s = torch.zeros(2, n, n)
        k = c["k"]
        ks = [k, max(1, k // 2)]
        tk.greedy(s, ks, GAMMA, valid, strategy=c["strategy"])
    elif what == "kernel_matrix":
        tk.kernel_matrix(torch.zeros(2, n, n), GAMMA, identity=c["identity"], precision=c["precision"])
    else:
        s = torch.zeros(2, n, n)
        rows = torch.zeros(2, c["m"], dtype=torch.int64)
        tk.kernel_rows(s, rows, GAMMA)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cubin: bytes) -> Dict[str, int]:
    """registers, stack, local, static shared memory and spill loads / stores of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{res.stdout}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, stack=stack, local=local, static_shared=shared,
                spill_stores=len(re.findall(r"\bSTL(\.\w+)*\b", sass.stdout)),
                spill_loads=len(re.findall(r"\bLDL(\.\w+)*\b", sass.stdout)))


def compile_all(arch: int, only: Optional[Sequence[str]] = None) -> List[dict]:
    """Compile every case for ``sm_<arch>`` in this process; one row per distinct compiled kernel."""
    records = install_fake_driver(arch)
    import triton

    rows: Dict[str, dict] = {}
    for what, c in cases():
        if only and what not in only:
            continue
        start = len(records)
        _call(what, c)
        for r in records[start:]:
            k = r["kernel"]
            if k.hash in rows:
                continue
            const = ", ".join(f"{n}={v}" for n, v in r["constexprs"].items())
            rows[k.hash] = dict(
                kernel=k.name, target=f"sm_{arch}", triton=triton.__version__,
                config=f"{const}, num_warps={k.metadata.num_warps}, num_stages={k.metadata.num_stages}, "
                       f"maxnreg={getattr(k.metadata, 'maxnreg', None)}",
                dtypes="/".join(r["dtypes"]), first_case=f"{what} " + " ".join(f"{a}={v}" for a, v in c.items()),
                shared=int(k.metadata.shared), cubin=k.asm["cubin"],
            )
    with ThreadPoolExecutor(2) as pool:
        usage = list(pool.map(resources, [r["cubin"] for r in rows.values()]))
    out = []
    for r, u in zip(rows.values(), usage):
        r.pop("cubin")
        out.append({**r, **u})
    return out


# ---------------------------------------------------------------- from any process


def problems(rows: Sequence[dict]) -> List[str]:
    """Every resource rule a compiled kernel breaks: stack / spills, shared memory, registers."""
    bad = []
    for r in rows:
        arch = int(r["target"].split("_")[1])
        what = f"{r['kernel']} {r['target']} [{r['config']}] ({r['first_case']})"
        if r["stack"] or r["local"] or r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{what}: stack {r['stack']} B, local {r['local']} B, "
                       f"{r['spill_stores']} spill stores, {r['spill_loads']} spill loads")
        if r["shared"] + r["static_shared"] > SHARED_LIMIT[arch]:
            bad.append(f"{what}: shared memory {r['shared']} + {r['static_shared']} B > {SHARED_LIMIT[arch]} B")
        if r["registers"] > MAX_REGISTERS:
            bad.append(f"{what}: {r['registers']} registers > {MAX_REGISTERS}")
    return bad


def run(archs: Sequence[int] = ARCHS, python: str = sys.executable, timeout: float = 600.0,
        pythonpath: Optional[str] = None) -> List[dict]:
    """Compile every kernel for each target, one fresh process per target (in parallel), TRITON_INTERPRET unset.

    pythonpath: put first on the child's PYTHONPATH (e.g. another Triton installed with --target).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, _ROOT, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([python, "-m", "bench.triton_target", "--arch", str(a)], cwd=_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in archs]
    rows = []
    for a, p in zip(archs, procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode:
            for q in procs:
                q.kill()
            raise RuntimeError(f"compiling for sm_{a} failed (exit {p.returncode}):\n{err[-6000:]}")
        rows += json.loads(out)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=ARCHS, required=True)
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    json.dump(compile_all(args.arch), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
