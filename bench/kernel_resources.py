"""Resource table of every Triton kernel compiled for sm_80 / sm_90: `python -m bench kernels [--out DIR]`.

Compile-time numbers from a machine without a GPU (:mod:`bench.triton_target`: Triton's real NVIDIA
backend behind a fake compile-only driver): per distinct compiled kernel, its configuration,
registers, shared memory, stack and spill instructions. Nothing runs on a GPU; speed and results
on a GPU are untested. `--quick` compiles for sm_90 only; `--triton-path DIR` compiles with the
Triton installed in DIR. Writes kernels[_quick].csv (rewritten, one snapshot) and .md under --out (default bench/results) and prints the table; exits 1 when a
kernel breaks a resource rule (stack or spills, shared memory over the target's limit, > 255 registers).
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import List

from . import common, triton_target

COLUMNS = ("kernel", "target", "config", "dtypes", "registers", "shared", "static_shared", "stack",
           "spill_stores", "spill_loads", "first_case")
HEADERS = ("kernel", "target", "config", "tensor dtypes", "registers", "shared (B)", "static shared (B)",
           "stack (B)", "spill st", "spill ld", "first case that compiles it")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int, nargs="+", choices=triton_target.ARCHS,
                   help="targets (default: sm_80 and sm_90; --quick: sm_90)")
    p.add_argument("--triton-path", help="a folder holding another Triton (pip install --target DIR "
                   "triton==X), put first on the compiling processes' path; writes kernels_triton<X>.*")


def markdown(rows: List[dict], problems: List[str]) -> str:
    """The committed report: what was compiled how, the limits checked, the table, any violations."""
    versions = sorted({r["triton"] for r in rows})
    limits = ", ".join(f"sm_{a} {v // 1024} KB" for a, v in triton_target.SHARED_LIMIT.items())
    head = [
        "# Triton kernels: compile-time resources",
        "",
        f"Triton {', '.join(versions)}; git {common.git_revision()}. Compile-time numbers from a CPU machine "
        "(no GPU): Triton's NVIDIA backend and bundled ptxas compiled each kernel behind a fake driver "
        "(`bench/triton_target.py`), registers / stack from `cuobjdump -res-usage`, spill instructions "
        "(LDL/STL) from its SASS, shared memory from the kernel's metadata (dynamic) and the cubin (static). "
        "They prove what compiles and its resources, nothing about results or speed on a GPU (untested on GPU).",
        "",
        f"Rules checked: no stack, no spills, static + dynamic shared memory within the opt-in limit ({limits}), "
        f"registers <= {triton_target.MAX_REGISTERS}. Shapes: N {triton_target.NS} (the greedy and kernel rows "
        f"also {tuple(n for n in triton_target.GREEDY_NS if n not in triton_target.NS)}), d {triton_target.DS} "
        "(plus a transposed view and an odd d), fp16 / bf16 / fp32, feature and token normalisation, with and "
        "without valid masks, ragged budgets, full and lazy kernel rows; one row per distinct specialisation.",
        "",
        "Violations: " + ("none." if not problems else "\n\n- " + "\n- ".join(problems)),
        "",
        "",
    ]
    return "\n".join(head) + common.markdown_table(rows, COLUMNS, HEADERS) + "\n"


def main(args: argparse.Namespace) -> int:
    archs = tuple(args.arch or ((90,) if args.quick else triton_target.ARCHS))
    rows = triton_target.run(archs, timeout=3600, pythonpath=args.triton_path)
    problems = triton_target.problems(rows)
    what = "kernels" + (f"_triton{rows[0]['triton']}" if args.triton_path and rows else "")
    stem = common.results_stem(args.out, what, args.quick)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + ["triton"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = markdown(rows, problems)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {stem}.csv and {stem}.md")
    return 1 if problems else 0
