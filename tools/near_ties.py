"""Measure where float32 greedy paths leave the float64 reference (the tests' near-tie threshold).

`.venv/bin/python tools/near_ties.py [--seeds 12]` (a few minutes on 2 cores) runs the torch
greedy and the C++ extension (when built), each with lazy and full kernel rows, in float32 on random
LLaVA-sized images (tests/helpers.py:features), replays each greedy order in float64
(tests/reference.py) and prints per size: on how many paths the kept set is the reference's, and
the largest gaps (reference.relative_gaps: share of the largest diagonal entry of L, and share of
the best residual) at which a path took another item than the float64 greedy.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import features  # noqa: E402
from otprune import backends  # noqa: E402
from otprune.greedy import greedy_picks  # noqa: E402
from otprune.kernel import similarity  # noqa: E402
from reference import GAMMA, GreedyState, Kernel, relative_gaps  # noqa: E402

SIZES = [(576, 1024, 56), (576, 1024, 173), (576, 4096, 56), (576, 4096, 173), (2880, 1024, 282)]


def replay(kern: Kernel, order):
    """[(gap of max diag L, gap of the best residual)] at each step where ``order`` left the greedy."""
    st = GreedyState(kern, len(order))
    out = []
    for j in order:
        res = st.residuals()
        best = int(torch.argmax(res))
        if j != best:
            out.append((float(relative_gaps(res, st.scale)[j]), float((res[best] - res[j]) / res[best])))
        st.take(j)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=12)
    args = p.parse_args()
    impls = {"torch": greedy_picks}
    if backends.usable("cpu", "cpu")[0]:
        impls["cpu"] = backends.get_backend("cpu").greedy
    for n, d, k in SIZES:
        exact = total = 0
        worst = (0.0, 0.0)
        for seed in range(args.seeds if n < 1000 else max(1, args.seeds // 6)):
            x = features(n, d, 1000 * n + d + seed)
            kern = Kernel.from_features(x, GAMMA)
            st = GreedyState(kern, k)
            for _ in range(k):
                st.take(int(torch.argmax(st.residuals())))
            s = similarity(x.unsqueeze(0))
            for impl in impls.values():
                for rows in ("lazy", "full"):
                    order = impl(s, [k], GAMMA, None, rows=rows)[0].tolist()
                    total += 1
                    exact += sorted(order) == sorted(st.picks)
                    for gaps in replay(kern, order):
                        worst = max(worst, gaps)
        print(f"N={n} d={d} k={k}: reference set on {exact}/{total} float32 paths; largest gap where a "
              f"path left the greedy: {worst[0]:.2e} of max diag L ({worst[1]:.2e} of the best residual)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
