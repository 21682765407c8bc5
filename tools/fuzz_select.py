"""Random differential fuzz of otprune.select against the float64 reference.

    .venv/bin/python tools/fuzz_select.py [--cases N | --seconds S] [--seed K] [--backends torch cpu]
    .venv/bin/python tools/fuzz_select.py --case SEED [--backends ...]   # rerun one reported case

Each case draws random inputs: B in 1..3, odd and even N (1..~600) and d (1..~700), dtypes
fp16/bf16/fp32/fp64, both normalize modes, int and ratio keep, ragged lengths (1 included), layouts
(contiguous, transposed view, strided, expand()ed, requires_grad), kinds (normal, scaled columns,
duplicate, identical, zero tokens/columns, constant columns, tiny, huge, denormal, low-rank,
one-hot tokens) and a different magnitude per image. Checks, per backend (default: every backend
usable on CPU tensors except Triton) and per check=True/False:
  reference       every row is the float64 greedy's set, step by step up to near-ties
                  (tests/helpers.py: check_exact, NEAR_TIE)
  check T==F      check=True and check=False return identical indices
  lengths form    lengths as a list and as a tensor give the same first columns (-1 after them),
                  or both follow the reference up to near-ties (the two widths differ, and with
                  them the kernel-row form, lazy or full, whose rounding differs)
  batch==alone    a batch row equals that image selected alone, or both are near-tie paths
  padding         random features, zeros or huge/NaN/inf garbage past each row's length give
                  identical indices
Prints progress every ~10%, then a table per check: passed (of which via near-ties), real failures,
undecided (the near-tie path search gave up). When any real failure occurred, prints one reproducer
line per failure (the case seed and its parameters) and exits 1. 50 cases take a few seconds on one
core (one torch thread by default: on a busy 2-core machine two threads made small cases ~70x slower).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import otprune  # noqa: E402
from helpers import check_exact, cpu_backends  # noqa: E402
from otprune._validate import budget  # noqa: E402
from otprune.kernel import accumulation_dtype  # noqa: E402

CHECKS = ("reference", "check T==F", "lengths form", "batch==alone", "padding")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KINDS = ("normal", "scaled", "dup", "identical", "zero_tokens", "zero_cols", "const_cols", "tiny", "huge",
         "denormal", "lowrank", "onehot")
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "grad")
# Per-dtype factors for the kinds that move magnitudes (inputs stay finite, tiny/denormal stay nonzero).
TINY = {torch.float16: 1e-3, torch.bfloat16: 1e-30, torch.float32: 1e-30, torch.float64: 1e-200}
HUGE = {torch.float16: 1.5e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}
DENORMAL = {torch.float16: 1e-7, torch.bfloat16: 1e-39, torch.float32: 1e-40, torch.float64: 1e-310}
# Decimal exponent range of the per-image magnitude factor.
MAGNITUDE = {torch.float16: 2, torch.bfloat16: 25, torch.float32: 25, torch.float64: 150}


class Tally:
    """Counts per check: passed, passed via near-ties, undecided, and failures with reproducers."""

    def __init__(self):
        self.counts: Dict[str, Dict[str, int]] = {c: defaultdict(int) for c in CHECKS}
        self.failures: List[str] = []

    def note(self, check: str, outcome: str, case: Optional["Case"] = None, why: str = ""):
        self.counts[check][outcome] += 1
        if outcome == "failed":
            self.failures.append(f"{check}: {why}\n  repro: {case.repro()}")

    def table(self) -> str:
        rows = [f"{'check':<14}{'passed':>8}{'near-tie':>10}{'failed':>8}{'undecided':>11}"]
        for c in CHECKS:
            n = self.counts[c]
            rows.append(f"{c:<14}{n['passed'] + n['near-tie']:>8}{n['near-tie']:>10}{n['failed']:>8}"
                        f"{n['undecided']:>11}")
        return "\n".join(rows)


class Case:
    """One random input, drawn from ``seed`` alone (so a failure reruns with --case SEED)."""

    def __init__(self, seed: int, backends: List[str]):
        self.seed, self.backends = seed, backends
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        self.B = rng.choice([1, 1, 2, 3])
        self.N = rng.choice([1, 2, 3, 5, 17, 40, 97, 128, 200, 577, rng.randrange(1, 600)])
        self.d = rng.choice([1, 2, 3, 8, 33, 64, 300, 700, rng.randrange(1, 700)])
        if self.B * self.N * self.d > 2 * 577 * 300:
            self.d = 64
        self.dtype = rng.choice(DTYPES)
        self.kind = rng.choice(KINDS)
        self.layout = rng.choice(LAYOUTS)
        self.normalize = rng.choice(["feature", "token"])
        self.gamma = rng.choice([0.01, 0.01, 1e-4, 1.0, 100.0])
        self.lengths = None
        if rng.random() < 0.5:
            self.lengths = [rng.choice([1, self.N, rng.randint(1, self.N)]) for _ in range(self.B)]
        n_min = min(self.lengths) if self.lengths else self.N
        if rng.random() < 0.5:
            self.keep = rng.choice([1, n_min, max(1, n_min // 2), max(1, round(0.098 * n_min))])
        else:
            self.keep = min(1.0, rng.choice([0.098, 0.3, 0.5, 1.0, 1e-9, (rng.randrange(1, 2 * self.N + 1) + 0.5)
                                             / (2 * self.N)]))
        self.magnitudes = self.kind not in ("tiny", "huge", "denormal") and rng.random() < 0.4
        self.squeeze = self.B == 1 and self.lengths is None and rng.random() < 0.5
        self.x = self._layout(self._features(g, rng))

    def _features(self, g: torch.Generator, rng: random.Random) -> torch.Tensor:
        B, N, d, kind = self.B, self.N, self.d, self.kind
        x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
        if kind == "scaled":
            x = x * 3 * torch.rand(d, generator=g, dtype=torch.float64) + torch.randn(d, generator=g, dtype=torch.float64)
        elif kind == "dup":
            x = x[:, torch.randint(0, max(1, N // 3), (N,), generator=g)]
        elif kind == "identical":
            x = x[:, :1].expand(B, N, d).clone()
        elif kind == "zero_tokens":
            x[:, torch.rand(N, generator=g) < 0.3] = 0
        elif kind == "zero_cols":
            x[:, :, torch.rand(d, generator=g) < 0.3] = 0
        elif kind == "const_cols":
            x[:, :, torch.rand(d, generator=g) < 0.5] = 0.7
        elif kind in ("tiny", "huge", "denormal"):
            x = x * {"tiny": TINY, "huge": HUGE, "denormal": DENORMAL}[kind][self.dtype]
        elif kind == "lowrank":
            r = rng.choice([1, 2, 3])
            x = torch.randn(B, N, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)
        elif kind == "onehot":
            x = torch.zeros(B, N, d, dtype=torch.float64)
            x[:, torch.arange(N), torch.arange(N) % d] = 1.0
        if self.magnitudes:
            e = MAGNITUDE[self.dtype]
            x = x * torch.tensor([10.0 ** rng.uniform(-e, e) for _ in range(B)], dtype=torch.float64).view(B, 1, 1)
        x = x.to(self.dtype)
        return x.clamp(-6e4, 6e4) if self.dtype == torch.float16 else x

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "transposed":
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if self.layout == "strided":
            big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] * 3, dtype=x.dtype)
            big[:, ::2, ::3] = x
            return big[:, ::2, ::3]
        if self.layout == "expanded":
            return x[:1].expand(x.shape[0], -1, -1)
        if self.layout == "grad":
            return x.clone().requires_grad_(True)
        return x

    def row_len(self, b: int) -> int:
        return self.N if self.lengths is None else self.lengths[b]

    def repro(self) -> str:
        return (f"python tools/fuzz_select.py --case {self.seed} --backends {' '.join(self.backends)}  # B={self.B} "
                f"N={self.N} d={self.d} dtype={str(self.dtype)[6:]} kind={self.kind} layout={self.layout} "
                f"normalize={self.normalize} gamma={self.gamma} keep={self.keep} lengths={self.lengths} "
                f"magnitudes={self.magnitudes} 2-D={self.squeeze}")


def select(case: Case, x: torch.Tensor, lengths, backend: str, check: bool) -> torch.Tensor:
    """(B, width) indices of one call (a 2-D input's result unsqueezed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = otprune.select(x[0] if case.squeeze else x, case.keep, gamma=case.gamma, normalize=case.normalize,
                           lengths=lengths, backend=backend, check=check)
    return r.unsqueeze(0) if case.squeeze else r


def run_case(case: Case, tally: Tally):
    """Every check of :data:`CHECKS` on one case; an exception counts as a failure of its check."""
    acc = accumulation_dtype(case.dtype)
    x = case.x
    verdicts: Dict[tuple, Optional[str]] = {}

    def reference(b: int, row: List[int]) -> Optional[str]:
        """None when ``row`` is the reference's set, "near-tie" / "undecided", or the failure text."""
        key = (b, tuple(row))
        if key not in verdicts:
            xb = x[b, :case.row_len(b)].detach().to(torch.float64)  # exact for every dtype
            try:
                verdicts[key] = None if check_exact(xb, row, budget(case.keep, xb.shape[0]), acc, case.normalize,
                                                    case.gamma) or len(row) in (1, xb.shape[0]) else "near-tie"
            except AssertionError as err:
                verdicts[key] = "undecided" if "gave up" in str(err) else f"row {b} = {row}: {err}"
        return verdicts[key]

    def outcome(check: str, verdict: Optional[str], what: str):
        if verdict in (None, "near-tie", "undecided"):
            tally.note(check, {None: "passed"}.get(verdict, verdict))
        else:
            tally.note(check, "failed", case, f"{what}: {verdict}")

    def guarded(check: str, what: str, fn: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        try:
            return fn()
        except Exception as err:
            tally.note(check, "failed", case, f"{what} raised {type(err).__name__}: {err}"[:400])
            return None

    rows = lambda r: [[int(v) for v in row if v >= 0] for row in r.tolist()]  # noqa: E731

    def identical(check: str, a: torch.Tensor, b: torch.Tensor, what: str, ties: bool = False):
        """Exact comparison of two results; a failure says whether both still follow the reference
        (then they part only at near-ties, e.g. rounding that differs with the call's width). With
        ``ties`` that case counts as a near-tie pass."""
        if torch.equal(a, b):
            return outcome(check, None, what)
        valid = all(reference(i, row) in (None, "near-tie", "undecided") for r in (a, b) for i, row in enumerate(rows(r)))
        if ties and valid:
            return outcome(check, "near-tie", what)
        outcome(check, f"{a.tolist()} vs {b.tolist()}" + (" (both follow the reference: near-ties only)" if valid
                                                          else ""), what)
    tensor_lengths = None if case.lengths is None else torch.tensor(case.lengths)
    for be in case.backends:
        res = {}
        for chk in (True, False):
            what = f"backend={be} check={chk}"
            r = guarded("reference", what, lambda: select(case, x, case.lengths, be, chk))
            if r is None:
                continue
            res[chk] = r
            for b, row in enumerate(rows(r)):
                outcome("reference", reference(b, row), what)
            if tensor_lengths is not None:
                t = guarded("lengths form", what + " lengths=tensor", lambda: select(case, x, tensor_lengths, be, chk))
                if t is not None:
                    w = r.shape[-1]
                    if bool((t[:, w:] == -1).all()):
                        identical("lengths form", r, t[:, :w], what + " list vs tensor", ties=True)
                    else:
                        outcome("lengths form", f"list {r.tolist()} vs tensor {t.tolist()}", what)
            if case.lengths is not None and min(case.lengths) < case.N:
                garbage = garbage_padding(case)
                p = guarded("padding", what, lambda: select(case, garbage, case.lengths, be, chk))
                if p is not None:
                    identical("padding", r, p, what + " random vs other padding")
        if len(res) == 2:
            identical("check T==F", res[True], res[False], f"backend={be}")
        if case.B > 1 and True in res:
            for b, row in enumerate(rows(res[True])):
                n = case.row_len(b)
                alone = guarded("batch==alone", f"backend={be} row {b} alone", lambda: otprune.select(
                    x[b, :n].detach(), budget(case.keep, n), gamma=case.gamma, normalize=case.normalize, backend=be))
                if alone is None:
                    continue
                if alone.tolist() == row:
                    verdict = None
                else:
                    v_alone, v_row = reference(b, alone.tolist()), reference(b, row)
                    verdict = next((v for v in (v_row, v_alone) if v not in (None, "near-tie", "undecided")), None)
                    verdict = verdict and f"batch {row} vs alone {alone.tolist()}: {verdict}"
                    verdict = verdict or ("undecided" if "undecided" in (v_row, v_alone) else "near-tie")
                outcome("batch==alone", verdict, f"backend={be} row {b}")


def garbage_padding(case: Case) -> torch.Tensor:
    """A contiguous copy of the case's features with zeros, huge, NaN or inf values past each row's
    length instead of its random features (check=True must accept it: the padding is never read)."""
    x = case.x.detach().clone()
    fill = [0.0, torch.finfo(case.dtype).max, float("nan"), float("inf"), -float("inf")][case.seed % 5]
    for b, n in enumerate(case.lengths):
        x[b, n:] = fill
    return x


def fuzz(cases: Optional[int], seconds: Optional[float], seed: int, backends: List[str],
         case_seeds: Optional[List[int]] = None, log=print) -> Tally:
    """Run cases (``cases`` of them, or for ``seconds``, or exactly ``case_seeds``); returns the tally."""
    rng = random.Random(seed)
    tally = Tally()
    start, done, next_report = time.monotonic(), 0, 0.1
    while True:
        if case_seeds is not None:
            if done == len(case_seeds):
                break
            case_seed = case_seeds[done]
        else:
            case_seed = rng.randrange(1 << 31)
            if (cases is not None and done >= cases) or (seconds is not None and time.monotonic() - start >= seconds):
                break
        run_case(Case(case_seed, backends), tally)
        done += 1
        share = done / cases if cases else (time.monotonic() - start) / seconds if seconds else 0.0
        if share >= next_report:
            log(f"{done} cases, {time.monotonic() - start:.0f} s, {len(tally.failures)} failures", flush=True)
            next_report = (int(share * 10) + 1) / 10
    origin = "given case seeds" if case_seeds is not None else f"seed {seed}"
    log(f"{done} cases in {time.monotonic() - start:.0f} s ({origin}, backends {' '.join(backends)})")
    return tally


def main(argv: Optional[List[str]] = None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--cases", type=int, help="number of random cases (default 50)")
    group.add_argument("--seconds", type=float, help="run for this long instead")
    group.add_argument("--case", type=int, nargs="+", metavar="SEED", help="rerun these case seeds only")
    p.add_argument("--seed", type=int, default=0, help="seed of the case sequence")
    p.add_argument("--backends", nargs="+", default=cpu_backends(), help="default: usable on CPU, not Triton")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the cases are small, and on a busy machine more threads are "
                        "many times slower)")
    args = p.parse_args(argv)
    cases = args.cases if args.cases is not None or args.seconds is not None else 50
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        tally = fuzz(cases, args.seconds, args.seed, args.backends, args.case, log)
    finally:
        torch.set_num_threads(threads)
    log(tally.table())
    for f in tally.failures:
        log(f)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
