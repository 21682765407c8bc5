"""Every CPU-usable backend against the float64 reference (docs/design.md, Selection and Verification)."""

import pytest
import torch

import otprune
from helpers import LOGDET_RTOL, check_exact, cpu_backends, features, quiet_select
from reference import ref_logdet, ref_select

BACKENDS = cpu_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (37, 1), (37, 3), (37, 1024), (577, 3), (577, 64), (576, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_odd_sizes(backend, n, d, dtype):
    exact = 0
    for seed, ratio in ((n * 7 + d, 0.098), (n + d + 1, 0.3)):
        x = features(n, d, seed, dtype=dtype)
        k = max(1, round(ratio * n))
        idx = quiet_select(x, k, backend=backend)
        assert idx.dtype == torch.int64 and idx.shape == (k,)
        exact += check_exact(x, idx, k, dtype)
    # d <= 3: S has rank <= 3, so after 3 picks every residual is 1 up to rounding (near-ties only).
    if n > 2 and (dtype == torch.float64 or d > 3):
        assert exact >= (2 if dtype == torch.float64 else 1), "every case had a near-tie on its path"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_batched(backend, seed):
    """(B, N, d) input: every row matches the reference run on that row alone."""
    x = features(97, 48, seed, b=3)
    idx = quiet_select(x, 0.2, backend=backend)
    assert idx.shape == (3, round(0.2 * 97))
    exact = sum(check_exact(x[b], idx[b], idx.shape[1], torch.float32) for b in range(3))
    assert exact >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", ["one", "all"])
def test_k_extremes(backend, k):
    x = features(41, 16, 3)
    kk = 1 if k == "one" else 41
    idx = quiet_select(x, kk, backend=backend)
    check_exact(x, idx, kk, torch.float32)
    if k == "all":
        assert idx.tolist() == list(range(41))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_budget_rounding(backend):
    x = features(576, 32, 0)
    assert quiet_select(x, 0.098, backend=backend).shape == (56,)  # round(56.448)
    assert quiet_select(x, 1.0, backend=backend).shape == (576,)
    assert quiet_select(x[:5], 0.01, backend=backend).shape == (1,)  # round(0.05) = 0, raised to 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    """Half inputs are upcast before any arithmetic: result equals the fp32 path on the same values."""
    x = features(120, 40, 11, dtype=dtype)
    idx = quiet_select(x, 0.1, backend=backend)
    assert idx.tolist() == quiet_select(x.float(), 0.1, backend=backend).tolist()
    check_exact(x.float(), idx, 12, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_normalisation(backend):
    for seed in range(3):
        x = features(80, 24, seed)
        idx = quiet_select(x, 0.15, normalize="token", backend=backend)
        check_exact(x, idx, 12, torch.float32, normalize="token")
    # token-wise normalisation ignores each token's scale
    scale = torch.rand(80, 1) + 0.5
    assert quiet_select(x * scale, 0.15, normalize="token", backend=backend).tolist() == idx.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_per_item(backend):
    x = features(150, 33, 5, b=5)
    batched = quiet_select(x, 0.1, backend=backend)
    for b in range(5):
        assert batched[b].tolist() == quiet_select(x[b], 0.1, backend=backend).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_lengths(backend):
    lengths = [150, 37, 1, 99]
    x = features(150, 20, 8, b=4)
    x[1, 37:] = 1e3  # padding content must not matter
    x[2, 1:] = 0.0
    idx = quiet_select(x, 0.1, lengths=lengths, backend=backend)
    ks = [15, 4, 1, 10]
    assert idx.shape == (4, 15)
    for b, (n, k) in enumerate(zip(lengths, ks)):
        row = idx[b]
        assert (row[k:] == -1).all()
        assert row[:k].tolist() == quiet_select(x[b, :n], k, backend=backend).tolist()
    # lengths as a tensor, and all-full lengths equal no lengths
    assert torch.equal(idx, quiet_select(x, 0.1, lengths=torch.tensor(lengths), backend=backend))
    full = quiet_select(x, 0.1, lengths=[150] * 4, backend=backend)
    assert torch.equal(full, quiet_select(x, 0.1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_device_and_order(backend):
    x = features(64, 8, 2, b=2)
    idx = quiet_select(x, 10, backend=backend)
    assert idx.device == x.device
    assert (idx[:, 1:] > idx[:, :-1]).all()


def test_prune_gathers_kept_tokens():
    x = features(60, 12, 4, b=2)
    kept, idx = otprune.prune(x, 0.2)
    assert kept.shape == (2, 12, 12) and kept.dtype == x.dtype
    for b in range(2):
        assert torch.equal(kept[b], x[b, idx[b]])
    kept1, idx1 = otprune.prune(x[0], 0.2)
    assert torch.equal(kept1, x[0, idx1])
    kept_r, idx_r = otprune.prune(x, 0.2, lengths=[60, 20])
    assert (idx_r[1, 4:] == -1).all() and (kept_r[1, 4:] == 0).all()


def test_kernel_matrix_and_objective_match_reference():
    from reference import ref_kernel

    x = features(50, 30, 6)
    L = otprune.kernel_matrix(x.double())
    assert torch.allclose(L, ref_kernel(x), rtol=1e-12, atol=1e-12)
    L32 = otprune.kernel_matrix(x)
    assert L32.dtype == torch.float32 and torch.allclose(L32.double(), ref_kernel(x), rtol=1e-5, atol=1e-5)
    idx = otprune.select(x, 7)
    assert abs(float(otprune.objective(x, idx)) - ref_logdet(x, idx.tolist())) < 1e-9
    xb = features(50, 30, 7, b=2)
    ib = otprune.select(xb, 0.1, lengths=[50, 30])
    obj = otprune.objective(xb, ib)
    assert obj.shape == (2,)
    assert abs(float(obj[0]) - ref_logdet(xb[0], ib[0].tolist())) < 1e-9


def test_greedy_beats_baselines_on_objective():
    """Sanity of the objective itself: greedy log-det >= random subsets' log-det."""
    x = features(200, 64, 9)
    idx = otprune.select(x, 20)
    best = float(otprune.objective(x, idx))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        rnd = torch.randperm(200, generator=g)[:20].sort().values
        assert float(otprune.objective(x, rnd)) < best
    assert check_exact(x, idx, 20, torch.float32)
    ref, _ = ref_select(x, 20)
    assert abs(best - ref_logdet(x, ref)) <= LOGDET_RTOL[torch.float32] * abs(best)


# ---- magnitudes: each image is scaled on its own; small columns and tokens keep their norm ----

def _magnitude_cases():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    tiny_cols = x.clone()
    tiny_cols[:, :8] *= 1e-17  # squares 1e-34: normal in float32, below the others' by 1e34
    huge_cols = x.clone()  # the image is scaled into range, its small columns stay normal
    huge_cols[:, :8] *= 1e25
    huge_cols[:, 8:] *= 1e9
    tiny_tokens = x.clone()
    tiny_tokens[:10] *= 1e-16
    return {
        "tiny-columns": (tiny_cols, "feature"),
        "huge-and-small-columns": (huge_cols, "feature"),
        "tiny-tokens": (tiny_tokens, "token"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_magnitude_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_slices_keep_their_norm_as_in_the_reference(backend, case, dtype):
    """A column (token) far smaller than the rest of its image still gets unit norm, as in the
    float64 reference, as long as its squares are normal numbers after the image's scaling."""
    x, normalize = _magnitude_cases()[case]
    x = x.to(dtype)
    for check in (True, False):
        idx = quiet_select(x, 6, normalize=normalize, backend=backend, check=check)
        assert check_exact(x.double(), idx, 6, dtype, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_of_very_different_magnitude_equal_per_row(backend):
    a = features(40, 16, 2)
    x = torch.stack([a * 1e30, a, a * 1e-30])
    idx = quiet_select(x, 6, backend=backend)
    for b in range(3):
        assert idx[b].tolist() == quiet_select(x[b], 6, backend=backend).tolist()
    assert idx[0].tolist() == idx[1].tolist() == idx[2].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [1e30, 1e-30, float("nan"), float("inf")])
def test_padding_content_never_matters(backend, fill):
    """Whatever the padding holds (huge, tiny, NaN, inf), a ragged batch selects as with zeros:
    padding enters neither the finiteness check nor the magnitude scale nor the norms."""
    x = features(50, 16, 4, b=2)
    want = quiet_select(x, 5, lengths=[50, 30], backend=backend)
    dirty = x.clone()
    dirty[1, 30:] = fill
    for lengths in ([50, 30], torch.tensor([50, 30])):
        for check in (True, False):
            got = quiet_select(dirty, 5, lengths=lengths, backend=backend, check=check)
            assert torch.equal(got[:, : want.shape[1]], want), (lengths, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_modes_agree_at_exact_ties(backend):
    """d = 1 with token normalisation: every |S_ij| = 1, so every step is an exact tie. With a
    lengths tensor both modes run the same greedy calls (each row to the width, then cut), so
    their indices agree bit for bit even there."""
    x = torch.randn(3, 577, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lens = torch.tensor([309, 1, 195])
    kw = dict(normalize="token", gamma=1.0, lengths=lens, backend=backend)
    assert torch.equal(quiet_select(x, 0.3, check=True, **kw), quiet_select(x, 0.3, check=False, **kw))


def test_kernel_matrix_of_huge_features_is_finite_and_scale_free():
    x = features(30, 8, 5)
    want = otprune.kernel_matrix(x)
    for scale in (1e30, 1e-30):
        got = otprune.kernel_matrix(x * scale)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
