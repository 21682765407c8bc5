"""`python -m bench <what> [--quick] [--out DIR]`; also reached as `otprune bench ...`.

what: select | e2e | quality | exact-vs-official | model | kernels | vllm. `--quick` runs a small
configuration (under a minute on a CPU) and writes <what>_quick.* files; results go to bench/results/ unless --out names
another folder. `--threads N` sets torch's CPU threads for the run (the committed CPU results hold
runs at --threads 2 and --threads 1: on a machine shared with other jobs, multi-threaded ops stall
on busy cores, and one thread gives the steadier ratios).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from .common import RESULTS_DIR, optional_plot, save_figure

SUBCOMMANDS = {
    "select": "bench.select",
    "e2e": "bench.e2e",
    "quality": "bench.quality",
    "exact-vs-official": "bench.exact_vs_official",
    "model": "bench.model",
    "kernels": "bench.kernel_resources",
    "vllm": "bench.vllm_bench",
}


def _usage() -> str:
    return "usage: python -m bench {" + ",".join(SUBCOMMANDS) + "} [--quick] [--out DIR] [--threads N] [options]"


def main(argv: Optional[List[str]] = None) -> int:
    """Run one benchmark; ``argv`` as on the command line without the program name. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        print(__doc__)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what not in SUBCOMMANDS:
        print(f"{_usage()}\nunknown benchmark {what!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[what])
    if what == "exact-vs-official":
        return _exact_vs_official(module, rest)
    p = argparse.ArgumentParser(prog=f"python -m bench {what}", description=module.__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small configuration, under a minute on a CPU")
    p.add_argument("--out", default=RESULTS_DIR, help="output folder (default bench/results)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a shared "
                   "machine 1 thread gives steadier timings than threads that wait on busy cores")
    module.add_arguments(p)
    args = p.parse_args(rest)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        return int(module.main(args) or 0)
    finally:
        torch.set_num_threads(threads)


def _exact_vs_official(module, rest: List[str]) -> int:
    """Run bench.exact_vs_official (it writes CSV and MD), then plot its CSV to a PNG beside them."""
    code = int(module.main(rest) or 0)
    if code or "-h" in rest or "--help" in rest:
        return code
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=RESULTS_DIR)
    out = p.parse_known_args(rest)[0].out
    _plot_exact_vs_official(os.path.join(out, "exact_vs_official.csv"), os.path.join(out, "exact_vs_official.png"))
    return 0


@optional_plot
def _plot_exact_vs_official(csv_path: str, png_path: str) -> None:
    """Scatter of the official vs exact log-det per image, and the share of shared picks."""
    from .common import pyplot, read_csv

    rows = read_csv(csv_path)
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for family in dict.fromkeys(r["features"] for r in rows):
        rs = [r for r in rows if r["features"] == family]
        rel = [float(r["logdet_official"]) / float(r["logdet_exact"]) for r in rs]
        share = [int(r["shared"]) / int(r["k"]) for r in rs]
        a1.plot(range(len(rs)), rel, "o", label=family)
        a2.plot(range(len(rs)), share, "o", label=family)
    a1.axhline(1.0, color="grey", lw=0.8)
    a1.set_ylabel("log-det official / exact")
    a2.set_ylabel("share of picks kept by both")
    for ax in (a1, a2):
        ax.set_xlabel("image")
        ax.legend(fontsize=8)
    fig.suptitle("Exact vs official numerics (fp16 input, keep 0.098)")
    save_figure(fig, png_path)


if __name__ == "__main__":
    sys.exit(main())
