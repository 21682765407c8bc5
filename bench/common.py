"""Shared benchmark plumbing: timing, environment stamp, CSV append, markdown table, PNG plot
(skipped without matplotlib), progress.

Timing (p20/p50/p80): on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush) for
calls under 20 ms, a loop of CUDA-event timings for longer ones or without Triton; on CPU the wall
clock (``time.perf_counter``) after a warm-up call, interleaving the compared functions. Every row written carries the device name, the
torch / triton / transformers versions and the git revision of the checkout.
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ENV_FIELDS = ("run", "device", "torch", "triton", "transformers", "git")
QUANTILES = (0.2, 0.5, 0.8)


def results_stem(out_dir: str, what: str, quick: bool) -> str:
    """Path stem of a benchmark's files; ``--quick`` runs write ``<what>_quick.*`` next to the full ones."""
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, what + ("_quick" if quick else ""))


def _version(mod: str) -> str:
    try:
        return str(importlib.import_module(mod).__version__)
    except Exception:
        return "none"


def device_name(device: torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU with its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def git_revision() -> str:
    """Short revision of the checkout holding bench/, with ``+dirty`` for uncommitted changes.

    Changes under bench/results/ do not count: a run that rewrites the committed results must
    not stamp its own rows dirty."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def environment(device: torch.device) -> Dict[str, str]:
    """The stamp every CSV row carries (see ENV_FIELDS)."""
    return {
        "run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git": git_revision(),
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_many(fns: Dict[str, Callable[[], object]], device: torch.device, *, reps: int = 10,
              budget_s: float = 5.0) -> Dict[str, List[float]]:
    """name -> [p20, p50, p80] run time in milliseconds of each function in ``fns``.

    CUDA: each function on its own (see :func:`_time_cuda`). CPU: wall clock after one untimed
    warm-up call of each; the timed calls are interleaved (one call of each per round) so that load
    changes on a shared machine hit all of them alike; the loop stops after ``reps`` rounds, or
    after at least 3 once ``budget_s`` seconds have been spent.
    """
    if device.type == "cuda":
        return {name: _time_cuda(fn, reps) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: [float(v) for v in np.percentile(t, [100 * q for q in QUANTILES])] for name, t in times.items()}


def _time_cuda(fn: Callable[[], object], reps: int) -> List[float]:  # untested on GPU
    """do_bench for short calls; for calls over 20 ms (model forwards, the official loop on big
    batches), ``reps`` CUDA-event timings (3 for calls over a second), since do_bench's 100 ms
    measuring window would hold only one or two of them. One untimed call first: it compiles
    (Triton JIT, cuBLAS heuristics) so that compilation never counts as the first timing."""
    fn()
    torch.cuda.synchronize()
    first = _event_ms(fn)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and first < 20.0:
        return [float(v) for v in do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))]
    fn()
    times = [_event_ms(fn) for _ in range(reps if first < 1000.0 else 3)]
    return [float(v) for v in np.percentile(times, [100 * q for q in QUANTILES])]


def _event_ms(fn: Callable[[], object]) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(items: Sequence, desc: str) -> Iterable:
    """Iterate ``items`` with a progress bar on stderr (tqdm when installed, else a plain line)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _plain_progress(items: Sequence, desc: str) -> Iterable:
    n = len(items)
    for i, item in enumerate(items, 1):
        print(f"\r{desc}: {i}/{n}", end="", file=sys.stderr, flush=True)
        yield item
    print(file=sys.stderr)


def append_csv(path: str, rows: List[Dict]) -> None:
    """Append ``rows`` to ``path``; writes the header when the file is new. Columns must not change."""
    if not rows:
        return
    fields = list(rows[0])
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has columns {header}, this run writes {fields}; use another --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: List[Dict[str, str]], key: Sequence[str]) -> List[Dict[str, str]]:
    """The most recent row for every (device, *key) combination, in first-seen order."""
    out: Dict[tuple, Dict[str, str]] = {}
    for r in rows:
        k = (r["device"],) + tuple(r[c] for c in key)
        out.pop(k, None)
        out[k] = r
    return list(out.values())


def markdown_table(rows: List[Dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """A GitHub markdown table of ``columns`` of ``rows`` (floats to 4 significant digits)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def fmt(v) -> str:
    """Integers as they are, other numbers to 4 significant digits, NaN as "-", text unchanged."""
    if isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if f != f else f"{f:.4g}"


def optional_plot(draw: Callable[..., None]) -> Callable[..., None]:
    """Decorator for a figure writer ``draw(data, path)``: without matplotlib, say so and skip it.

    The CSV and markdown results never depend on matplotlib; only the PNG is left out."""

    @functools.wraps(draw)
    def wrapper(data, path: str) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"plot skipped (matplotlib not installed): {path} not written")
            return
        draw(data, path)

    return wrapper


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Lay out, write as PNG (100 dpi) and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def env_line(rows: List[Dict[str, str]]) -> str:
    """One markdown line naming the devices, versions, revisions and run times behind ``rows``."""
    runs: Dict[str, List[str]] = {}
    for r in rows:
        key = (f"{r['device']}; torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}; "
               f"git {r['git']}")
        runs.setdefault(key, []).append(r["run"])
    parts = [f"{k}; runs {min(v)} to {max(v)}" if min(v) != max(v) else f"{k}; run {v[0]}" for k, v in runs.items()]
    return "Measured on: " + " | ".join(parts)
