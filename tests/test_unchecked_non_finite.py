"""check=False on non-finite input: which tokens are kept is unspecified (README), but each row is
still k_b distinct in-range indices in ascending order, and the other images of the batch keep
exactly the picks they get from finite input (an image's NaN or inf never leaks into another).
This is what makes the unchecked path safe to gather with: no out-of-range index reaches a model.
The emulated CUDA kernel's side of it is in tests/test_simt.py."""

import pytest
import torch

import otprune
from helpers import cpu_backends, features

N, D, K = 40, 8, 9
NAN, INF = float("nan"), float("inf")


def _spoil(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Non-finite values in image 0 of (B, N, D) features."""
    x = x.clone()
    if kind == "nan_entry":
        x[0, 3, 5] = NAN
    elif kind == "inf_entry":
        x[0, 3, 5] = INF
    elif kind == "minus_inf_entry":
        x[0, 7, 1] = -INF
    elif kind == "nan_token":
        x[0, 3] = NAN
    elif kind == "nan_column":
        x[0, :, 2] = NAN
    elif kind == "nan_image":
        x[0] = NAN
    elif kind == "inf_image":
        x[0] = INF
    elif kind == "mixed":
        x[0, 1, 1], x[0, 2, 2], x[0, 5, 5] = INF, -INF, NAN
    else:
        raise AssertionError(kind)
    return x


KINDS = ["nan_entry", "inf_entry", "minus_inf_entry", "nan_token", "nan_column", "nan_image", "inf_image", "mixed"]


@pytest.mark.parametrize("backend", cpu_backends(small_only=True))
@pytest.mark.parametrize("normalize", ["feature", "token"])
@pytest.mark.parametrize("lengths", [None, [N, 30, 20]], ids=["full", "ragged"])
@pytest.mark.parametrize("kind", KINDS)
def test_unchecked_non_finite_gives_valid_rows(backend, normalize, lengths, kind):
    clean = features(N, D, 1, b=3)
    kwargs = dict(backend=backend, normalize=normalize, lengths=lengths)
    want = otprune.select(clean, K, **kwargs)
    got = otprune.select(_spoil(clean, kind), K, check=False, **kwargs)
    assert got.shape == want.shape
    row = got[0].tolist()
    assert all(0 <= i < N for i in row), row
    assert len(set(row)) == K and row == sorted(row), row
    assert torch.equal(got[1:], want[1:]), "a non-finite image changed another image's picks"


@pytest.mark.parametrize("backend", cpu_backends(small_only=True))
def test_checked_non_finite_still_raises(backend):
    """The same inputs with check=True are refused, naming the problem."""
    with pytest.raises(ValueError, match="non-finite"):
        otprune.select(_spoil(features(N, D, 1, b=3), "nan_entry"), K, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_unchecked_non_finite_official_numerics(dtype, kind):
    """compat="official" (the release's order, unsorted): the same guarantees."""
    clean = features(N, D, 1, b=3).to(dtype)
    want = otprune.select(clean, K, compat="official")
    got = otprune.select(_spoil(clean, kind), K, compat="official", check=False)
    row = got[0].tolist()
    assert len(set(row)) == K and all(0 <= i < N for i in row), row
    assert torch.equal(got[1:], want[1:])
