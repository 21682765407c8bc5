"""The CPU similarity's block-row Gram product equals one GEMM up to rounding, mirrored blocks included."""

import pytest
import torch

from otprune.kernel import GRAM_MIN_BLOCK_ROWS, symmetric_gram


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n", [1, GRAM_MIN_BLOCK_ROWS * 2 - 1, GRAM_MIN_BLOCK_ROWS * 2, 577, 1003])
def test_symmetric_gram_matches_one_gemm(n, dtype, tol):
    y = torch.randn(2, n, 24, generator=torch.Generator().manual_seed(n), dtype=dtype)
    got = symmetric_gram(y)
    want = torch.matmul(y, y.transpose(-1, -2))
    assert got.shape == (2, n, n) and got.dtype == dtype
    assert torch.allclose(got, want, rtol=tol, atol=tol * 24)
    assert torch.allclose(got, got.transpose(-1, -2), rtol=tol, atol=tol * 24)
