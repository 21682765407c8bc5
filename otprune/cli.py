"""Command line: ``otprune {info,demo,bench,run}`` (also ``python -m otprune``)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Dict, List, Optional


def _cmd_info(args) -> int:
    import torch

    import otprune
    from otprune import backends

    print(f"otprune {otprune.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    for mod in ("triton", "transformers"):
        try:
            print(f", {mod} {importlib.import_module(mod).__version__}", end="")
        except Exception:
            print(f", {mod} not installed", end="")
    print()
    if torch.cuda.is_available():
        print(f"device: CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    else:
        print(f"device: CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print("backends (each on the device types it targets):")
    # A backend that fails to load cannot say which device types it targets: take those auto tries it on.
    rows = [r for r in backends.report() if backends.get_backend(r[0]) is not None
            or r[0] in backends.AUTO_ORDER.get(r[1], ())]
    for name, states in _backend_states(rows).items():
        print(f"  {name:7s} {states}")
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, shape in _auto_shapes(dev):
                print(f"auto on {dev}{label}: {backends.resolve('auto', torch.device(dev), shape).name}")
    return 0


def _auto_shapes(dev: str):
    """(label, shape) pairs info reports auto's pick for: one on CPU (a fixed order); on CUDA the
    cost model's target shapes (B 1 / 32, N 576 / 2880, d 4096, keep 0.098, fp16)."""
    import torch

    from otprune.cost_model import round_budget

    if dev != "cuda":
        return [("", None)]
    shapes = [(B, N, 4096, round_budget(0.098, N), torch.float16) for B in (1, 32) for N in (576, 2880)]
    return [(f" (B={B}, N={N}, d={d}, k={k}, fp16; by the cost model)", (B, N, d, k, dt))
            for B, N, d, k, dt in shapes]


def _backend_states(rows) -> Dict[str, str]:
    """backend -> "cpu: usable; cuda: not usable (why)" from backends.report() rows, one entry each.

    Device types that fail for the same reason share one clause ("cpu, cuda: not usable (why)").
    """
    by_name: Dict[str, Dict[str, List[str]]] = {}
    for name, dev, ok, why in rows:
        state = "usable" if ok else f"not usable ({why})"
        by_name.setdefault(name, {}).setdefault(state, []).append(dev)
    return {name: "; ".join(f"{', '.join(devs)}: {state}" for state, devs in states.items())
            for name, states in by_name.items()}


def _cmd_demo(args) -> int:
    from otprune.demo import run

    run(out_path=args.out, keep=args.keep, seed=args.seed, photo=args.photo)
    print(f"wrote {args.out}")
    return 0


def _cmd_bench(args) -> int:
    try:
        bench_main = importlib.import_module("bench.__main__").main
    except ImportError:
        print("otprune bench: the benchmark harness lives in the source checkout's bench/ folder; "
              "run it from there as `python -m bench ...`", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otprune", description="OTPrune visual-token pruning")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("info", help="versions, device and which backends are built and usable here")
    sp.set_defaults(func=_cmd_info)

    sp = sub.add_parser("demo", help="select 10%% of a photo's LLaVA patches, write a comparison PNG")
    sp.add_argument("--out", default="otprune_demo.png", help="output PNG path")
    sp.add_argument("--keep", type=float, default=0.10, help="ratio of patches kept (default 0.10)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    sp.add_argument("--photo", default="astronaut", help="scikit-image sample photo name")
    sp.set_defaults(func=_cmd_demo)

    sp = sub.add_parser("bench", help="run the benchmark harness (python -m bench ...) from a checkout")
    sp.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m bench")
    sp.set_defaults(func=_cmd_bench)

    try:
        from otprune.integrations.run_cli import add_parser as add_run_parser
    except ImportError:
        add_run_parser = None
    if add_run_parser is not None:
        add_run_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
