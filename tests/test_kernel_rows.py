"""Both ways of forming kernel rows in the greedy ("lazy" per step from S, "full" from a
precomputed gamma * S S^T), in the torch greedy and the C++ extension, against the float64
reference; and the size rule that "auto" follows."""

import pytest
import torch

from helpers import check_exact, features
from otprune import backends
from otprune.greedy import FULL_ROWS_MIN_N, greedy_picks, kernel_rows_strategy, sort_picks
from otprune.kernel import similarity, valid_mask

GAMMA = 0.01


def _impls():
    out = {"torch": greedy_picks}
    ok, _ = backends.usable("cpu", "cpu")
    if ok:
        out["cpu"] = backends.get_backend("cpu").greedy
    return out


IMPLS = _impls()


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("rows", ["lazy", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (37, 3), (300, 64), (577, 16)])
def test_matches_reference(impl, rows, dtype, n, d):
    exact = 0
    for seed, k in ((n + d, 1), (2 * n + d, max(1, round(0.1 * n))), (3 * n + d, max(1, round(0.4 * n))), (4 * n, n)):
        x = features(n, d, seed, dtype=dtype)
        s = similarity(x.unsqueeze(0))
        picks = IMPLS[impl](s, [k], GAMMA, None, rows=rows)
        assert picks.shape == (1, k) and picks.dtype == torch.int64
        exact += check_exact(x, sort_picks(picks)[0], k, dtype)
    if n > 2:
        assert exact, "every case had a near-tie: only log-dets were compared"


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_and_full_pick_the_same_order(impl, dtype):
    """Same greedy path, different rounding: equal picks wherever the path has no near-tie (the
    float64 check above); in float64 these random cases have none."""
    x = features(200, 24, 11, b=3, dtype=dtype)
    s = similarity(x)
    lazy = IMPLS[impl](s, [60, 60, 60], GAMMA, None, rows="lazy")
    full = IMPLS[impl](s, [60, 60, 60], GAMMA, None, rows="full")
    if dtype == torch.float64:
        assert torch.equal(lazy, full)
    else:
        assert (lazy == full).float().mean() > 0.9


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_full_rows_ragged_and_masked(impl):
    lengths = torch.tensor([90, 37, 1, 64])
    x = features(90, 12, 3, b=4, dtype=torch.float64)
    valid = valid_mask(lengths, 4, 90, x.device)
    s = similarity(x, "feature", valid)
    ks = [27, 11, 1, 19]
    full = IMPLS[impl](s, ks, GAMMA, valid, rows="full")
    lazy = IMPLS[impl](s, ks, GAMMA, valid, rows="lazy")
    assert torch.equal(full, lazy)
    for b, (n, k) in enumerate(zip(lengths.tolist(), ks)):
        assert (full[b, k:] == -1).all()
        assert max(full[b, :k].tolist()) < n
        check_exact(x[b, :n], sorted(full[b, :k].tolist()), k, torch.float64)


def test_auto_rule():
    small = torch.zeros(8, 576, 576)
    assert kernel_rows_strategy(small, 56) == "lazy"
    assert kernel_rows_strategy(small, 192) == "full"
    assert kernel_rows_strategy(torch.zeros(1, FULL_ROWS_MIN_N, FULL_ROWS_MIN_N), 10) == "full"
    huge = torch.empty(1 << 10, 1 << 10, 1 << 10, device="meta")  # 4 GiB: over budget
    assert kernel_rows_strategy(huge, 1 << 9) == "lazy"
    assert kernel_rows_strategy(small, 56, "full") == "full"
    with pytest.raises(ValueError, match="rows"):
        kernel_rows_strategy(small, 56, "eager")
