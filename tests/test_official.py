"""compat="official" against the literal transcription of the public release's loop (bench/official.py)."""

import pytest
import torch

import otprune
from helpers import features
from bench.official import official_from_kernel, official_select
from otprune.official import select_from_kernel


def llava_like(n, d, seed, dtype=torch.float16):
    """Projected-token-like features: positive offset, a few large channels, low-rank structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) * 0.3
    x += torch.randn(n, d, generator=g) * 0.5 + torch.randn(d, generator=g) * 0.2
    x[:, :4] *= 20
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,ratio", [(576, 256, 0.098), (100, 64, 0.3), (37, 5, 0.222), (1, 3, 1.0)])
def test_official_mode_matches_release_loop(dtype, n, d, ratio):
    for seed in range(2):
        x = llava_like(n, d, seed, dtype)
        want = official_select(x, ratio)
        got = otprune.select(x, ratio, compat="official")
        assert got.tolist() == want.tolist()  # same indices, same list(set()) order


def test_official_mode_batched_and_ragged():
    x = llava_like(120, 32, 3).unsqueeze(0).repeat(3, 1, 1)
    x[1] = llava_like(120, 32, 4)
    got = otprune.select(x, 0.1, compat="official", lengths=[120, 120, 50])
    assert got.shape == (3, 12)
    assert got[0].tolist() == official_select(x[0], 0.1).tolist()
    assert got[1].tolist() == official_select(x[1], 0.1).tolist()
    assert got[2, :5].tolist() == official_select(x[2, :50], 0.1).tolist()
    assert (got[2, 5:] == -1).all()


def test_official_repair_loop_matches_release():
    """A rank-2 kernel makes the release's greedy repeat picks: its repair loop must be reproduced."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 2, generator=g)
    L = a @ a.T
    for k in (3, 6, 9):
        want = official_from_kernel(L.clone(), k, 30, "cpu", torch.float16)
        got = select_from_kernel(L.clone(), k, torch.float16)
        assert got.tolist() == want.tolist() and len(set(got.tolist())) == k


def test_official_differs_from_exact_only_in_numerics():
    """fp64 input: the release's numerics are exact too, so the sets agree with exact mode."""
    x = features(200, 40, 1, dtype=torch.float64)
    assert sorted(otprune.select(x, 20, compat="official").tolist()) == otprune.select(x, 20).tolist()


def test_official_rejects_other_backends():
    with pytest.raises(ValueError, match="backend"):
        otprune.select(torch.randn(10, 3), 2, compat="official", backend="cpu")
