"""Selection microbenchmark: `python -m bench select [--quick] [--out DIR]`.

Providers: "official" (the public release's per-image loop, :mod:`bench.official`, one image after
another) and "otprune-<backend>" for every otprune backend usable on the device
(``otprune.backends.report()``). The Triton backend is left out on CPU: there it runs in the Triton
interpreter, a correctness tool that is orders of magnitude slower than compiled code.
Inputs are seeded Gaussian features (B, N, d); the greedy's cost does not depend on their values.
On CPU the providers' timed calls are interleaved (bench.common.time_many) so that load changes on
a shared machine hit every provider of a configuration alike.

Sweeps (every combination):
  GPU:   B (1, 8, 32) x N (576, 2880) x d (1024, 4096, 5120) x ratio (0.098, 0.222, 0.333)
         x dtype (float16, float32).
  CPU:   trimmed so that the run ends in a few minutes on 2 cores (1.5-3 min measured on a shared
         2-core machine): B (1, 8) x N 576 x d (1024, 4096)
         x ratio (0.098, 0.222, 0.333) x float32, plus B 1 x N 2880 x d 1024 x ratio 0.098 and
         B 1 x N 576 x d 5120 x ratio 0.098. (The official loop alone costs seconds per call at
         N = 2880 or B = 32 on such a CPU; fp16 matmuls are slow on CPU and not what CPU users run.)
  quick: B (1, 8) x N 576 x d 1024 x ratio 0.098 x float32 (under a minute on a CPU).
--B/--N/--d/--ratio/--dtype replace the sweep's values. Every row gets the speed-up of its p50
over the official loop's p50 for the same configuration, measured in the same run.
Writes select[_quick].csv (appended), .md and .png under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import otprune
from otprune import backends

from . import common
from .official import official_batch

KEY = ("provider", "B", "N", "d", "ratio", "dtype")
GPU_SWEEP = [dict(B=(1, 8, 32), N=(576, 2880), d=(1024, 4096, 5120), ratio=(0.098, 0.222, 0.333),
                  dtype=("float16", "float32"))]
CPU_SWEEP = [
    dict(B=(1, 8), N=(576,), d=(1024, 4096), ratio=(0.098, 0.222, 0.333), dtype=("float32",)),
    dict(B=(1,), N=(2880,), d=(1024,), ratio=(0.098,), dtype=("float32",)),
    dict(B=(1,), N=(576,), d=(5120,), ratio=(0.098,), dtype=("float32",)),
]
QUICK_SWEEP = [dict(B=(1, 8), N=(576,), d=(1024,), ratio=(0.098,), dtype=("float32",))]


def providers(device: torch.device) -> Dict[str, Callable[[torch.Tensor, float], object]]:
    """name -> fn(features (B, N, d), ratio): "official" plus each usable otprune backend."""
    out: Dict[str, Callable[[torch.Tensor, float], object]] = {"official": official_batch}
    for name, dev, ok, _why in backends.report():
        if dev != device.type or not ok or (name == "triton" and dev == "cpu"):
            continue
        out[f"otprune-{name}"] = lambda x, r, name=name: otprune.select(x, r, backend=name)
    return out


def configs(sweep: List[dict], overrides: Dict[str, Optional[Sequence]]) -> List[Tuple]:
    """(B, N, d, ratio, dtype) tuples of a sweep, with any axis replaced by ``overrides``."""
    out = []
    for part in sweep:
        axes = {k: (overrides.get(k) or v) for k, v in part.items()}
        out += itertools.product(axes["B"], axes["N"], axes["d"], axes["ratio"], axes["dtype"])
    return list(dict.fromkeys(out))


def run(quick: bool, out_dir: str, device: Optional[torch.device] = None,
        overrides: Optional[Dict[str, Optional[Sequence]]] = None) -> List[dict]:
    """Time every provider on every configuration; append rows to the CSV; rewrite MD and PNG."""
    device = device or common.default_device()
    sweep = QUICK_SWEEP if quick else (GPU_SWEEP if device.type == "cuda" else CPU_SWEEP)
    cfgs = configs(sweep, overrides or {})
    provs = providers(device)
    env = common.environment(device)
    reps, budget = (5, 2.0) if quick else (9, 5.0)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for B, N, d, ratio, dtype in common.progress(cfgs, "select sweep"):
        x = torch.randn(B, N, d, generator=gen).to(device=device, dtype=getattr(torch, dtype))
        k = int(round(ratio * N))
        timed = common.time_many({name: (lambda fn=fn: fn(x, ratio)) for name, fn in provs.items()}, device,
                                 reps=reps, budget_s=budget * len(provs))
        cfg_rows = [{**env, "provider": name, "B": B, "N": N, "d": d, "ratio": ratio, "k": k, "dtype": dtype,
                     "p20_ms": p20, "p50_ms": p50, "p80_ms": p80} for name, (p20, p50, p80) in timed.items()]
        base = next(r["p50_ms"] for r in cfg_rows if r["provider"] == "official")
        for r in cfg_rows:
            r["speedup_vs_official"] = base / r["p50_ms"]
        rows += cfg_rows
    stem = common.results_stem(out_dir, "select", quick)
    common.append_csv(stem + ".csv", rows)
    write_report(stem)
    return rows


def write_report(stem: str) -> None:
    """select.md and select.png from the latest row of every configuration in select.csv."""
    rows = common.latest_rows(common.read_csv(stem + ".csv"), KEY)
    cols = ["device", "provider", "B", "N", "d", "ratio", "k", "dtype", "p20_ms", "p50_ms", "p80_ms",
            "speedup_vs_official"]
    heads = ["device", "provider", "B", "N", "d", "ratio", "k", "dtype", "p20 ms", "p50 ms", "p80 ms",
             "speed-up vs official (p50)"]
    title = os.path.basename(stem)
    text = [f"# Selection latency ({title})", "",
            "Time to select k of N tokens for a batch of B images (the whole batch per call). "
            "\"official\" is the public per-image loop run image after image; speed-up = official p50 / "
            "provider p50 for the same configuration in the same run.", "",
            common.markdown_table(rows, cols, heads), "", common.env_line(rows), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))
    _plot(rows, stem + ".png")


@common.optional_plot
def _plot(rows: List[Dict[str, str]], path: str) -> None:
    """p50 latency and speed-up per configuration; one line per (provider, device), so that runs on
    several devices or thread counts are told apart (solid: the first device, dashed: the next)."""
    plt = common.pyplot()
    labels = list(dict.fromkeys(_label(r) for r in rows))
    devices = list(dict.fromkeys(r["device"] for r in rows))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(labels) + 3), 8), sharex=True)
    colors = {}
    for prov, dev in dict.fromkeys((r["provider"], r["device"]) for r in rows):
        pts = sorted((labels.index(_label(r)), float(r["p50_ms"]), float(r["speedup_vs_official"]))
                     for r in rows if r["provider"] == prov and r["device"] == dev)
        xs = [p[0] for p in pts]
        style = dict(marker="o", linestyle=("-", "--", ":", "-.")[devices.index(dev) % 4],
                     color=colors.setdefault(prov, f"C{len(colors)}"))
        name = prov if len(devices) == 1 else f"{prov}, {dev}"
        a1.plot(xs, [p[1] for p in pts], label=name, **style)
        a2.plot(xs, [p[2] for p in pts], **style)
    a1.set_yscale("log")
    a1.set_ylabel("p50 latency (ms)")
    a2.set_yscale("log")
    a2.set_ylabel("speed-up vs official")
    a2.set_xticks(range(len(labels)))
    a2.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    a1.legend(fontsize=7)
    a1.set_title("OTPrune selection latency per batch")
    common.save_figure(fig, path)


def _label(r: Dict[str, str]) -> str:
    return f"B{r['B']} N{r['N']} d{r['d']} r{r['ratio']} {r['dtype'].replace('float', 'fp')}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--B", type=int, nargs="+", help="batch sizes (replace the sweep's)")
    p.add_argument("--N", type=int, nargs="+", help="tokens per image")
    p.add_argument("--d", type=int, nargs="+", help="feature sizes")
    p.add_argument("--ratio", type=float, nargs="+", help="keep ratios")
    p.add_argument("--dtype", nargs="+", choices=("float16", "bfloat16", "float32"), help="input dtypes")


def main(args: argparse.Namespace) -> int:
    over = {k: getattr(args, k) for k in ("B", "N", "d", "ratio", "dtype")}
    rows = run(args.quick, args.out, overrides=over)
    stem = common.results_stem(args.out, "select", args.quick)
    print(open(stem + ".md").read())
    print(f"{len(rows)} rows appended to {stem}.csv; wrote {stem}.md and {stem}.png")
    return 0
