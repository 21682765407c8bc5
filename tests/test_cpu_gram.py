"""The CPU similarity path: the lower block triangle Gram (otprune.kernel.lower_gram_), its mirror
(mirror_lower_) and the image-by-image similarity, against one full GEMM of the whole batch."""

import pytest
import torch

from otprune import kernel
from otprune.kernel import (
    lower_gram_,
    mirror_lower_,
    normalize_features,
    row_blocks,
    similarity,
    symmetric_gram,
    valid_mask,
)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _x(b, n, d, dtype=torch.float32, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("n", [1, 2, 7, 159, 160, 161, 577, 1000])
def test_row_blocks_cover_rows_in_near_equal_blocks(n):
    blocks = row_blocks(n)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [e - s for s, e in blocks]
    assert min(sizes) >= 1 and max(sizes) <= kernel.GRAM_BLOCK_ROWS
    assert all(s == sizes[0] for s in sizes[:-1]) and sizes[-1] <= sizes[0]
    assert len(blocks) == -(-n // kernel.GRAM_BLOCK_ROWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,n,d", [(1, 1, 3), (2, 5, 4), (1, 159, 8), (3, 161, 9), (2, 577, 16), (1, 700, 3)])
def test_symmetric_gram_equals_full_product_and_is_exactly_symmetric(dtype, b, n, d):
    y = _x(b, n, d, dtype, seed=n + d)
    got = symmetric_gram(y)
    want = torch.matmul(y, y.transpose(-1, -2))
    assert got.shape == (b, n, n) and got.dtype == dtype
    assert torch.equal(got, got.transpose(-1, -2))
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_lower_gram_writes_only_the_lower_block_triangle():
    n = 2 * kernel.GRAM_BLOCK_ROWS + 5
    y = _x(1, n, 6)[0]
    out = torch.full((n, n), float("nan"))
    lower_gram_(y, out)
    written = torch.zeros(n, n, dtype=torch.bool)
    for j0, j1 in row_blocks(n):
        written[j0:, j0:j1] = True
    assert not out[written].isnan().any() and out[~written].isnan().all()
    assert written[torch.ones(n, n, dtype=torch.bool).tril()].all()  # on and below the diagonal
    torch.testing.assert_close(out[written], (y @ y.T)[written], **TOL[torch.float32])


def test_mirror_copies_the_strict_lower_triangle():
    s = _x(2, 170, 170)
    lower = torch.tril(s)
    mirror_lower_(s)
    assert torch.equal(torch.tril(s), lower)
    assert torch.equal(s, s.transpose(-1, -2))


def test_lower_gram_into_a_strided_output():
    """The batch's (N, N) slices are what the CPU similarity writes into."""
    y = _x(1, 300, 5)[0]
    big = torch.zeros(2, 300, 300)
    lower_gram_(y, big[1])
    mirror_lower_(big[1:])
    assert torch.equal(big[0], torch.zeros(300, 300))
    torch.testing.assert_close(big[1], y @ y.T, **TOL[torch.float32])


@pytest.mark.parametrize("normalize", ["feature", "token"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_similarity_matches_one_batched_gemm_with_padding(normalize, dtype):
    b, n, d = 3, 200, 24
    x = _x(b, n, d, dtype, seed=5)
    valid = valid_mask(torch.tensor([n, 1, 77]), b, n, x.device)
    got = similarity(x, normalize, valid)
    y = normalize_features(x, normalize, valid)
    want = torch.matmul(y, y.transpose(-1, -2))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc
    assert torch.equal(got, got.transpose(-1, -2))
    torch.testing.assert_close(got, want, **TOL[acc])
    pad = ~valid
    assert (got[pad] == 0).all() and (got.transpose(-1, -2)[pad] == 0).all()
    for i in range(b):  # image by image: a batch row equals that image alone
        assert torch.equal(got[i], similarity(x[i : i + 1], normalize, None if valid is None else valid[i : i + 1])[0])


def test_normalize_features_into_a_buffer():
    x = _x(1, 40, 8)
    buf = torch.empty(1, 40, 8)
    out = normalize_features(x, "feature", out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out.square().sum(-2), torch.ones(1, 8))
