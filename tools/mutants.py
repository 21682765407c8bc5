"""Mutation check: small plausible bugs, each applied to a temporary copy of the checkout, must
make the tests that guard them fail.

    .venv/bin/python tools/mutants.py [--only NAME ...] [--list] [--no-baseline]

The copy holds the checkout's tracked and untracked, not ignored, files (the working tree as it
is, never modified itself) plus the built extension; for mutants of csrc/ the copy builds its own
(`setup.py build_ext --inplace`, about a minute). First the selected tests run once unmutated (they must
pass), then each mutant runs its tests with `make test`'s switches. Prints one line per mutant,
"caught" (a test failed) or "MISSED", and exits 1 if any was missed or the baseline failed.
Takes about 3 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAVA_SIZES = ["tests/test_kernel_rows.py::test_float32_llava_sizes"]
TIES = ["tests/test_bad_input.py", "tests/test_cpu_ext.py::test_exact_ties_go_to_lowest_index"]
ROUTE = ["tests/test_env_route.py::test_route_settings_equal_apply_settings",
         "tests/test_env_route.py::test_settings_from_env",
         "tests/test_env_route_hf.py::test_route_settings_equal_apply_settings_hf"]
SPLIT_G = ["tests/test_triton_kernel_matrix.py::test_matches_float64",
           "tests/test_triton_kernel_matrix.py::test_split_keeps_what_one_fp16_product_loses"]
BENCH = ["tests/test_bench.py::test_select_providers_return_the_reference_indices",
         "tests/test_bench.py::test_e2e_keep_tokens_content", "tests/test_bench.py::test_quality_selections_content"]


@dataclass
class Mutant:
    name: str
    path: str
    edits: List[Tuple[str, str]]  # (old, new): old must occur exactly once
    tests: List[str]


MUTANTS = [
    Mutant("torch greedy: float32 Cholesky rows stored in fp16", "otprune/greedy.py",
           [("        row.mul_(scale.unsqueeze(1))\n",
             "        row.mul_(scale.unsqueeze(1))\n"
             "        if row.dtype == torch.float32:\n            row.copy_(row.half())\n")], LLAVA_SIZES),
    Mutant("C++ greedy: float32 Cholesky rows stored in fp16", "csrc/greedy_cpu.cpp",
           [("      e[i] *= scale;\n",
             "      e[i] = sizeof(T) == 4 ? T(static_cast<_Float16>(e[i] * scale)) : e[i] * scale;\n")], LLAVA_SIZES),
    Mutant("torch greedy: ties go to the highest index", "otprune/greedy.py",
           [("        torch.max(d2, -1, out=(pivot, pick_rows[t + 1]))\n",
             "        j_hi = (N - 1) - d2.flip(-1).argmax(-1)\n        pick_rows[t + 1].copy_(j_hi)\n"
             "        pivot.copy_(d2.gather(-1, j_hi.unsqueeze(-1)).squeeze(-1))\n")], TIES),
    Mutant("C++ greedy: ties go to the highest index", "csrc/greedy_cpu.cpp",
           [("if (x > bv || ", "if (x >= bv || ")], TIES),
    Mutant("split-fp16 G: lo halves dropped (one fp16 product)", "triton_kernels/kernel_rows.py",
           [("                acc = tl.dot(a_hi, b_lo, acc)\n                acc = tl.dot(a_lo, b_hi, acc)\n", "")],
           SPLIT_G),
    Mutant("split-fp16 G: scale 2^8 too large (fp16 overflow)", "triton_kernels/kernel_rows.py",
           [("127 + SPLIT_TOP - biased", "127 + SPLIT_TOP + 8 - biased")], SPLIT_G),
    Mutant("route: select settings not passed to apply", "otprune/autopatch.py",
           [("apply(self, keep=settings.keep, layer=settings.layer, **settings.select_kwargs)",
             "apply(self, keep=settings.keep, layer=settings.layer)")], ROUTE),
    Mutant("route: OTPRUNE_GAMMA parsed but dropped", "otprune/autopatch.py",
           [('        kwargs["gamma"] = _number("OTPRUNE_GAMMA", env["OTPRUNE_GAMMA"], float)\n',
             '        _number("OTPRUNE_GAMMA", env["OTPRUNE_GAMMA"], float)\n')], ROUTE),
    Mutant("route: OTPRUNE_COMPAT=official dropped", "otprune/autopatch.py",
           [('        kwargs["compat"] = "official"\n', '        pass\n')], ROUTE),
    Mutant("bench select: otprune providers with another gamma", "bench/select.py",
           [("otprune.select(x, r, backend=name)", "otprune.select(x, r, backend=name, gamma=0.05)")], BENCH),
    Mutant("bench select: official provider on reordered tokens", "bench/select.py",
           [('{"official": official_batch}', '{"official": lambda x, r: official_batch(x.flip(1), r)}')], BENCH),
    Mutant("bench e2e: otprune keeps another set", "bench/e2e.py",
           [("return otprune.prune(feats, ratio)[0]", "return otprune.prune(feats, ratio, normalize=\"token\")[0]")],
           BENCH),
]


def copy_tree(dest: str, with_ext: bool) -> None:
    """The checkout's tracked and untracked (not ignored) files into ``dest``; the built
    extension too when ``with_ext``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if rel.startswith(".venv"):
            continue
        if os.path.islink(src):  # otprune/triton_kernels -> ../triton_kernels: the copy's own folder
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            os.symlink(os.readlink(src), os.path.join(dest, rel))
        elif os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    if with_ext:
        for so in glob.glob(os.path.join(ROOT, "otprune", "_C*.so")):
            shutil.copy2(so, os.path.join(dest, "otprune"))


def build_extension(tree: str) -> None:
    """Compile the copy's csrc/ into the copy's otprune/ (an editable install would otherwise
    hand out the checkout's own build)."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not glob.glob(os.path.join(tree, "otprune", "_C*.so")):
        raise SystemExit(f"building the mutated extension failed:\n{proc.stderr[-2000:]}")


def run_tests(tree: str, tests: List[str]) -> Tuple[int, str]:
    env = dict(os.environ, OTPRUNE_REQUIRE_EXT="1", OTPRUNE_REQUIRE_DEPS="1", PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr[-300:]


def mutate(tree: str, m: Mutant) -> None:
    path = os.path.join(tree, m.path)
    with open(path) as f:
        text = f.read()
    for old, new in m.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutant {m.name!r}: expected text found {text.count(old)} times in {m.path}")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="substrings of the mutant names to run")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = p.parse_args()
    todo = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in todo:
            print(f"{m.name}: {m.path}; tests {' '.join(m.tests)}")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory(prefix="otprune-mutants-") as tmp:
        if not args.no_baseline:
            base = os.path.join(tmp, "baseline")
            copy_tree(base, with_ext=True)
            tests = list(dict.fromkeys(t for m in todo for t in m.tests))
            rc, last = run_tests(base, tests)
            print(f"baseline (unmutated): {'pass' if rc == 0 else 'FAIL'}  [{last}]", flush=True)
            bad += rc != 0
        for i, m in enumerate(todo):
            tree = os.path.join(tmp, f"m{i}")
            cpp = m.path.startswith("csrc/")
            copy_tree(tree, with_ext=not cpp)
            mutate(tree, m)
            t0 = time.time()
            if cpp:
                build_extension(tree)
            rc, last = run_tests(tree, m.tests)
            verdict = "caught" if rc == 1 else ("MISSED" if rc == 0 else f"ERROR (pytest exit {rc})")
            bad += verdict != "caught"
            print(f"{verdict:8s} {m.name}  [{last}; {time.time() - t0:.0f} s]", flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
