"""The compiled CPU backend (csrc/greedy_cpu.cpp) against the float64 reference and the torch greedy.

Skipped when otprune._C is not built, unless OTPRUNE_REQUIRE_EXT=1 (CI), where that is a failure.
"""

import os

import pytest
import torch

from helpers import check_exact, check_same_order, features, quiet_select
from otprune import backends
from otprune.greedy import greedy_picks
from otprune.kernel import similarity, valid_mask

GAMMA = 0.01


@pytest.fixture(autouse=True)
def _need_extension():
    ok, why = backends.usable("cpu", "cpu")
    if not ok:
        if os.environ.get("OTPRUNE_REQUIRE_EXT") == "1":
            pytest.fail(f"OTPRUNE_REQUIRE_EXT=1 but the cpu backend is unusable: {why}")
        pytest.skip(f"compiled extension not built: {why}")


def ext_greedy(s, ks, valid=None):
    return backends.get_backend("cpu").greedy(s, ks, GAMMA, valid)


@pytest.mark.parametrize("n", [1, 2, 37, 577])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_odd_sizes(n, d, dtype):
    exact = 0
    for seed, k in ((n + d, 1), (3 * n + d, max(1, round(0.1 * n))), (5 * n + d, min(n, 40))):
        x = features(n, d, seed, dtype=dtype)
        idx = quiet_select(x, k, backend="cpu")
        assert idx.dtype == torch.int64 and idx.shape == (k,)
        exact += check_exact(x, idx, k, dtype)
    if n > 2:
        assert exact, "every case had a near-tie: only log-dets were compared"


@pytest.mark.parametrize("n", [1, 2, 37])
def test_k_equals_n_takes_everything(n):
    x = features(n, 3, n)
    assert quiet_select(x, n, backend="cpu").tolist() == list(range(n))
    picks = ext_greedy(similarity(x.unsqueeze(0)), [n])
    assert sorted(picks[0].tolist()) == list(range(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,k", [(37, 3, 9), (150, 40, 15), (577, 64, 56)])
def test_same_greedy_order_as_torch(dtype, n, d, k):
    """Picks in greedy order equal the torch greedy's on the same S, up to a first parting at a
    near-tie step; the kept sets pass the reference check."""
    identical = 0
    for seed in range(4):
        x = features(n, d, 100 + seed, dtype=dtype)
        s = similarity(x.unsqueeze(0))
        assert s.dtype == dtype
        got, want = ext_greedy(s, [k]), greedy_picks(s, [k], GAMMA)
        assert got.dtype == torch.int64 and got.shape == (1, k)
        identical += check_same_order(x, got[0], want[0], dtype)
        check_exact(x, sorted(got[0].tolist()), k, dtype)
    assert identical >= 2


def test_float64_stays_float64():
    """Near-equal residuals that fp32 cannot separate: the fp64 path must keep them apart."""
    x = features(60, 8, 7, dtype=torch.float64)
    s = similarity(x.unsqueeze(0))
    assert ext_greedy(s, [20]).tolist() == greedy_picks(s, [20], GAMMA).tolist()
    s32 = s.float()
    assert ext_greedy(s32, [20]).tolist() == greedy_picks(s32, [20], GAMMA).tolist()


def test_batch_equals_per_item():
    """Images run in parallel over the batch; each row equals its image run alone."""
    x = features(150, 33, 5, b=5)
    batched = quiet_select(x, 0.1, backend="cpu")
    for b in range(5):
        assert batched[b].tolist() == quiet_select(x[b], 0.1, backend="cpu").tolist()


def test_ragged_lengths():
    lengths = [150, 37, 1, 99]
    x = features(150, 20, 8, b=4)
    x[1, 37:] = 1e3  # padding content must not matter
    x[2, 1:] = 0.0
    idx = quiet_select(x, 0.1, lengths=lengths, backend="cpu")
    ks = [15, 4, 1, 10]
    assert idx.shape == (4, 15)
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert (idx[b, k:] == -1).all()
        assert idx[b, :k].tolist() == quiet_select(x[b, :n], k, backend="cpu").tolist()
        check_exact(x[b, :n], idx[b, :k], k, torch.float32)


def test_masked_tokens_are_never_picked():
    """A non-prefix valid mask: masked tokens are skipped even when k equals the valid count."""
    x = features(40, 6, 9, b=2)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, ::3] = False
    valid[1, 5:9] = False
    s = similarity(x, "feature", valid)
    ks = [int(valid[0].sum()), 12]
    got = ext_greedy(s, ks, valid)
    assert sorted(got[0].tolist()) == valid[0].nonzero().flatten().tolist()
    assert not set(got[1, :12].tolist()) & set(range(5, 9))
    assert (got[1, 12:] == -1).all()
    assert got.tolist() == greedy_picks(s, ks, GAMMA, valid).tolist()


def test_exact_ties_go_to_lowest_index():
    """Duplicated tokens make residuals tie exactly: the lowest index wins, as in torch.argmax."""
    base = features(6, 4, 1, dtype=torch.float64)
    x = base.repeat(3, 1)  # token i, i+6, i+12 identical
    s = similarity(x.unsqueeze(0))
    got = ext_greedy(s, [9])
    assert got.tolist() == greedy_picks(s, [9], GAMMA).tolist()
    assert got[0, 0].item() < 6
    same = similarity(torch.ones(1, 5, 3, dtype=torch.float64))
    assert ext_greedy(same, [3]).tolist() == greedy_picks(same, [3], GAMMA).tolist()
    assert ext_greedy(same, [3])[0, 0].item() == 0


def test_valid_mask_matches_lengths_helper():
    lengths = torch.tensor([30, 12])
    x = features(30, 5, 4, b=2)
    valid = valid_mask(lengths, 2, 30, x.device)
    s = similarity(x, "feature", valid)
    assert ext_greedy(s, [6, 3], valid).tolist() == greedy_picks(s, [6, 3], GAMMA, valid).tolist()


def test_bad_arguments_raise():
    ext = backends.get_backend("cpu")
    s = similarity(features(10, 3, 0, b=2))
    with pytest.raises(RuntimeError, match="ks"):
        ext.greedy(s, [0, 3], GAMMA)
    with pytest.raises(RuntimeError, match="ks"):
        ext.greedy(s, [11, 3], GAMMA)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.greedy(s.half(), [2, 2], GAMMA)
    with pytest.raises(RuntimeError, match=r"\(B, N, N\)"):
        ext.greedy(s[:, :, :5], [2, 2], GAMMA)
    with pytest.raises(RuntimeError, match="valid"):
        ext.greedy(s, [2, 2], GAMMA, torch.ones(2, 9, dtype=torch.bool))
