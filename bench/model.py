"""Cost model report: `python -m bench model [--out DIR] [--measured CSV]`.

Prints, for every GPU backend and design of :mod:`otprune.cost_model` and every target
configuration (B 1 / 8 / 32, N 576 / 2880, d 4096, k = round(0.098 N), fp16), the bytes moved,
FLOPs, dependent steps, host ops and syncs, the modelled lower bound on H100 and H200, the
verdict against the targets, and the backend ``auto`` picks. Everything here is modelled, nothing
measured; ``--measured`` adds a modelled-vs-measured table from a GPU run of ``python -m bench
select`` (its CSV). Writes model.md under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

from otprune import cost_model as cm

from . import common

D, RATIO, DTYPE = 4096, 0.098, "float16"
B_VALUES, N_VALUES = (1, 8, 32), (576, 2880)
# Targets of the whole select call (features to indices), per (B, N): latency bound in seconds
# and speed-up over the public loop run image after image.
LATENCY_TARGETS = {(1, 576): 100e-6, (1, 2880): 1e-3}
SPEEDUP_TARGETS = {(1, 576): 30.0, (32, 576): 300.0}


# The design the summary table sets beside the backends: the cuda backend where Triton is not usable.
FALLBACK_DESIGN = "cuda-fp32-rows"


def shapes() -> List[cm.Shape]:
    return [cm.Shape(B, N, D, cm.round_budget(RATIO, N), DTYPE) for B in B_VALUES for N in N_VALUES]


def _names() -> List[str]:
    """The GPU backends, then the designs no backend implements today (for comparison)."""
    used = set(cm.BACKEND_DESIGN.values())
    return list(cm.GPU_BACKENDS) + [d for d in cm.DESIGNS if d not in used]


def _verdict(shape: cm.Shape, name: str) -> str:
    """The targets that apply to this shape, each "meets" or "MISSES" with the GPUs that miss it
    ("-" when none apply)."""
    key = (shape.B, shape.N)
    parts = []
    if key in LATENCY_TARGETS:
        lim = LATENCY_TARGETS[key]
        miss = [g.name for g in cm.GPUS if cm.estimate(name, shape, g).seconds > lim]
        parts.append(f"<= {lim * 1e6:.0f} us: " + (f"MISSES on {', '.join(miss)}" if miss else "meets"))
    if key in SPEEDUP_TARGETS and name != "official":
        lim = SPEEDUP_TARGETS[key]
        miss = [g.name for g in cm.GPUS if cm.speedup(shape, name, g) < lim]
        parts.append(f">= {lim:.0f}x: " + (f"MISSES on {', '.join(miss)}" if miss else "meets"))
    return "; ".join(parts) or "-"


def _implements(name: str) -> str:
    """What a row is: a backend (with the design its code implements), or a design and its status."""
    if name in cm.BACKEND_DESIGN:
        return f"backend: {cm.BACKEND_DESIGN[name]}"
    return cm.DESIGN_STATUS[name]


def table(shape: cm.Shape) -> str:
    rows = []
    for name in _names():
        e1, e2 = (cm.estimate(name, shape, g) for g in cm.GPUS)
        rows.append({
            "name": name,
            "design": _implements(name),
            "variant": e1.design,
            "hbm": e1.hbm_bytes / 1e6, "onchip": e1.onchip_bytes / 1e6, "gflop": e1.flops / 1e9,
            "steps": e1.steps, "ops": e1.host_ops, "syncs": e1.host_syncs,
            "h100": e1.seconds * 1e6, "h200": e2.seconds * 1e6,
            "vs": cm.speedup(shape, name, cm.H100), "verdict": _verdict(shape, name),
        })
    cols = ["name", "design", "variant", "hbm", "onchip", "gflop", "steps", "ops", "syncs", "h100", "h200", "vs",
            "verdict"]
    heads = ["name", "what", "fastest variant (H100)", "HBM MB", "L2 + smem MB", "GFLOP",
             "dependent steps", "host ops", "host syncs", "H100 us", "H200 us", "x public loop (H100)",
             "targets"]
    return common.markdown_table(rows, cols, heads)


def phase_lines(shape: cm.Shape) -> List[str]:
    """Where each backend's modelled H100 time goes, phase by phase (device time of each phase)."""
    out = []
    for name in cm.GPU_BACKENDS:
        est = cm.estimate(name, shape, cm.H100)
        parts = " | ".join(f"{p.name.split(' (')[0]} {p.device_s(cm.H100) * 1e6:.0f}" for p in est.phases)
        out.append(f"- {name} on H100, device us: {parts}; host issue time {est.host_s * 1e6:.0f} us, "
                   f"host syncs {est.host_syncs}")
    return out


def auto_line(shape: cm.Shape) -> str:
    picks = [f"{g.name}: {cm.rank(list(cm.GPU_BACKENDS), shape, g.name, measured={})[0]}" for g in cm.GPUS]
    return "auto picks (all GPU backends usable; by the model): " + ", ".join(picks)


def _time(t: float) -> str:
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.1f} ms"


def summary_table() -> str:
    """The README's table: bound per GPU backend, the cuda backend without Triton and the public
    loop, on H100 / H200, and auto's pick, for every target configuration."""
    names = list(cm.GPU_BACKENDS) + [FALLBACK_DESIGN, "official"]
    heads = ([f"`{n}` H100 / H200" for n in cm.GPU_BACKENDS] + [f"`cuda` without Triton ({FALLBACK_DESIGN}) H100 / H200",
             "public loop H100 / H200", "auto picks (H100)"])
    lines = ["| B | N | k | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * len(heads)]
    for sh in shapes():
        cells = [" / ".join(_time(cm.estimate(n, sh, g).seconds) for g in cm.GPUS) for n in names]
        pick = cm.rank(list(cm.GPU_BACKENDS), sh, cm.H100.name, measured={})[0]
        lines.append(f"| {sh.B} | {sh.N} | {sh.k} | " + " | ".join(cells) + f" | `{pick}` |")
    return "\n".join(lines)


def header() -> List[str]:
    h, h2, lat = cm.H100, cm.H200, cm.LATENCY
    return [
        "# Cost model of one select call on a GPU (modelled lower bounds, not measurements)", "",
        f"Figures: {h.name}: HBM {h.hbm_bw / 1e12:.2f} TB/s, fp16 dense tensor cores {h.fp16_tc / 1e12:.0f} TFLOP/s, "
        f"fp32 {h.fp32 / 1e12:.0f} TFLOP/s, L2 {h.l2_bytes / 1e6:.0f} MB, {h.sms} SMs, "
        f"{h.smem_bytes // 1024} KB shared memory per block; {h2.name}: HBM {h2.hbm_bw / 1e12:.1f} TB/s, the rest "
        f"the same. Assumed: L2 {h.l2_bw / 1e12:.0f} TB/s over all SMs, {h.sm_bw / 1e9:.0f} GB/s L2/HBM and "
        f"{h.smem_bw / 1e9:.0f} GB/s shared memory per SM, host-to-device copies {h.h2d_bw / 1e9:.0f} GB/s.",
        f"Latencies: host issue time {lat.launch_s * 1e6:.0f} us per framework op, "
        f"host sync {lat.host_sync_s * 1e6:.0f} us, {lat.kernel_s * 1e6:.0f} us per kernel, dependent greedy step {lat.block_step_s * 1e6:.1f} us in one "
        f"block / {lat.cluster_step_s * 1e6:.1f} us across a cluster, dependent memory round trip "
        f"{lat.round_trip_s * 1e6:.1f} us (reasons: otprune/cost_model.py).",
        "The `cuda` rows follow its launcher's plan (csrc/greedy_kernel.cuh, csrc/greedy_cuda.cu): Cholesky rows in "
        "one block's shared memory while they fit, else (sm_90) a cluster of 2-16 blocks per image while the batch's "
        "clusters fit the SMs, else one block per image with the rows in global memory; G precomputed while it fits "
        "the byte budget, else lazy rows.",
        "The `cuda` backend takes its similarity and G from the Triton kernels (tensor cores with fp32-accurate "
        "splits) and runs the CUDA greedy; where Triton is not usable it runs the cuda-fp32-rows design instead "
        "(torch similarity, fp32 cuBLAS G).",
        "Kernel headers (csrc/greedy_cuda.cu, triton_kernels/*.py) bound their kernels alone; the model adds select's "
        "other stages, 1 us per launch, the L2 operand reads of the Triton GEMM tiles, and limits a GEMM "
        f"without split-K to the SMs its tiles occupy (64 x 64, or 128 x 128 for fp16 operands when those still "
        f"cover the SMs; N = 576, B = 1: {cm._tiles(576, 64, True)[0]} of {h.sms}).",
        "Bound = max(host issue, device time) + host syncs x sync cost; a phase's device time = "
        "max(bytes / bandwidth, FLOPs / peak) over the SMs it can use + dependent steps x step cost "
        "+ kernels x kernel cost. Exact-mode fp32 GEMMs without a split run at the fp32 SIMT rate (no TF32).",
        f"Configurations: d = {D}, fp16 features, k = round({RATIO} N); \"x public loop\" = the release's "
        "loop (modelled with the same figures, image after image) over this row.", "",
    ]


def measured_table(path: str) -> str:
    """Modelled bound vs measured p50 for every GPU row of a select CSV whose device is modelled."""
    rows = []
    for r in common.latest_rows(common.read_csv(path), ("provider", "B", "N", "d", "ratio", "dtype")):
        name = r["provider"].replace("otprune-", "")
        if name not in cm.GPU_BACKENDS + ("official",) or "CPU" in r["device"]:
            continue
        shape = cm.Shape(int(r["B"]), int(r["N"]), int(r["d"]), int(r["k"]), r["dtype"])
        est = cm.estimate(name, shape, cm.gpu_for(r["device"]))
        meas, model = float(r["p50_ms"]) * 1e3, est.seconds * 1e6
        rows.append({"device": r["device"], "name": name, "B": r["B"], "N": r["N"], "d": r["d"], "k": r["k"],
                     "dtype": r["dtype"], "model": model, "meas": meas, "ratio": meas / model})
    if not rows:
        return f"No GPU rows of modelled backends in {path}."
    return common.markdown_table(rows, ["device", "name", "B", "N", "d", "k", "dtype", "model", "meas", "ratio"],
                                 ["device", "backend", "B", "N", "d", "k", "dtype", "modelled bound us",
                                  "measured p50 us", "measured / modelled"])


def report(measured: Optional[str] = None) -> str:
    lines = header() + ["## Summary (whole select call, modelled)", "", summary_table(), ""]
    misses: Dict[str, List[str]] = {}
    for shape in shapes():
        key = (shape.B, shape.N)
        target = LATENCY_TARGETS.get(key)
        title = f"## B = {shape.B}, N = {shape.N}, k = {shape.k}"
        if target:
            title += f" (target <= {target * 1e6:.0f} us"
            title += f", >= {SPEEDUP_TARGETS[key]:.0f}x the public loop)" if key in SPEEDUP_TARGETS else ")"
        elif key in SPEEDUP_TARGETS:
            title += f" (target >= {SPEEDUP_TARGETS[key]:.0f}x the public loop)"
        lines += [title, "", table(shape), "", *phase_lines(shape), "", auto_line(shape), ""]
        for name in _names():
            if "MISSES" in _verdict(shape, name):
                misses.setdefault(name, []).append(f"B={shape.B} N={shape.N}")
    lines.append("## Verdicts")
    lines.append("")
    for name in _names():
        if name == "official":
            continue
        where = misses.get(name)
        lines.append(f"- {name}: " + (f"bound misses a target at {', '.join(where)}" if where else
                                       "bound meets every target that applies"))
    if measured:
        lines += ["", "## Modelled vs measured", "", measured_table(measured)]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measured", help="a select CSV from a GPU run: adds modelled-vs-measured rows")


def main(args: argparse.Namespace) -> int:
    if args.measured and not os.path.exists(args.measured):
        print(f"--measured {args.measured}: no such file; reporting the model only")
        args.measured = None
    text = report(args.measured)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
    return 0
