"""The Triton kernel matrix L = I + gamma S S^T / G = gamma S S^T in both precisions, and the cuda
backend's composition of stages (Triton similarity, split-fp16 G, compiled greedy reading G).

Without a GPU the Triton kernels run in the interpreter on CPU tensors; the interpreter computes an
fp16 x fp16 dot exactly in fp32 as tensor cores do, so the split-fp16 numerics (the scaling, the
hi/lo split, the three products) are the kernel's own, up to the accumulation order. The cuda
backend's stage functions take CPU tensors there and hand G to the C++ CPU greedy (the same
``_C.greedy`` entry point, full rows), so the whole composition is checked against the float64
greedy; the CUDA kernel itself is covered by tests/test_simt.py and, on a GPU, tests/test_cuda_ext.py.
"""

import importlib

import pytest
import torch

from helpers import check_exact, features, require_module
from otprune import backends
from otprune.kernel import similarity as torch_similarity

require_module("triton", "triton")
from otprune import triton_kernels as tk  # noqa: E402

DEV = "cpu" if tk.interpreting() else "cuda"
_ok, _why = backends.usable("triton", DEV)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend not usable for {DEV}: {_why}")
GAMMA = 0.01
# Max abs error against float64 on the same S, relative to the largest entry. Measured on these
# inputs: ieee <= 3e-7, split-fp16 <= 5e-7 (it drops lo lo^T, 2^-22 of each product).
G_RTOL = {"ieee": 1e-6, "split-fp16": 2e-6}


def _reference(s: torch.Tensor, identity: bool) -> torch.Tensor:
    s64 = s.double().cpu()
    g = GAMMA * s64 @ s64.transpose(1, 2)
    return g + torch.eye(s.shape[-1], dtype=torch.float64) if identity else g


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to max |want| (L's entries carry the identity's rounding, G's not)."""
    return float((got.double().cpu() - want).abs().max()) / float(want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("precision", ["split-fp16", "ieee"])
@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("n", [1, 37, 64, 65, 130])
def test_matches_float64(precision, identity, n):
    s = torch_similarity(features(n, 24, n, b=2)).to(DEV)
    got = tk.kernel_matrix(s, GAMMA, identity=identity, precision=precision)
    assert got.shape == s.shape and got.dtype == torch.float32
    assert torch.equal(got, got.transpose(1, 2)), "L must be exactly symmetric"
    assert _err(got, _reference(s, identity)) <= G_RTOL[precision]


def test_split_scales_each_image_by_a_power_of_two():
    """The split's scale comes from each image's own diagonal: images 2^-40 and 2^40 apart keep
    full accuracy, and a power-of-two multiple of S gives exactly the power-of-two multiple of G."""
    s = torch_similarity(features(70, 16, 3, b=1)).to(DEV)
    both = torch.cat([s * 2.0**-40, s * 2.0**40])
    got = tk.kernel_matrix(both, GAMMA, identity=False)
    base = tk.kernel_matrix(s, GAMMA, identity=False)
    assert torch.equal(got[0], base[0] * 2.0**-80)
    assert torch.equal(got[1], base[0] * 2.0**80)
    assert _err(got[:1] * 2.0**80, _reference(s, False)) <= G_RTOL["split-fp16"]


def test_split_keeps_what_one_fp16_product_loses():
    """The lo halves carry what fp16 drops: one fp16 product of S (hi hi^T only) is ~1e-4 off, the
    split within G_RTOL. Guards against a split that silently keeps only the hi halves."""
    s = torch_similarity(features(96, 40, 5, b=1)).to(DEV)
    want = _reference(s, False)
    hi = s.half().float().double().cpu()
    assert _err(GAMMA * hi @ hi.transpose(1, 2), want) > 50 * G_RTOL["split-fp16"]
    assert _err(tk.kernel_matrix(s, GAMMA, identity=False), want) <= G_RTOL["split-fp16"]


def split_fp16_gram(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """The kernel's split-fp16 G in plain torch (CPU, float32): the same per-image power-of-two
    scale from max diag(S), the same fp16 hi/lo halves, the three products (exact in fp32, summed in
    fp32 by three GEMMs instead of one accumulator). (B, N, N) float32, symmetrised."""
    top = 11  # kernel_rows.SPLIT_TOP
    biased = (torch.diagonal(s, dim1=1, dim2=2).abs().amax(1).view(torch.int32) >> 23) & 0xFF
    e = (127 + top - biased).clamp(-60, 60).to(torch.float32)
    a = s * torch.exp2(e).view(-1, 1, 1)
    hi = a.half().float()
    lo = (a - hi).half().float()
    g = hi @ hi.transpose(1, 2) + hi @ lo.transpose(1, 2) + lo @ hi.transpose(1, 2)
    g = g * torch.exp2(-2 * e).view(-1, 1, 1) * gamma
    return 0.5 * (g + g.transpose(1, 2))


def test_torch_emulation_is_the_kernel():
    """split_fp16_gram (used below at sizes the interpreter cannot reach) computes what the kernel
    computes, up to fp32 accumulation order."""
    s = torch_similarity(features(130, 24, 6, b=2))
    got = tk.kernel_matrix(s.to(DEV), GAMMA, identity=False).cpu().double()
    emu = split_fp16_gram(s, GAMMA).double()
    # a few fp32 ulps apart (accumulation order); dropping the lo halves would be ~1e-4 apart
    assert float((got - emu).abs().max()) <= 1e-6 * float(emu.abs().max())
    assert _err(emu, _reference(s, False)) <= G_RTOL["split-fp16"]


def test_split_fp16_rows_exact_at_llava_next_size():
    """LLaVA-NeXT's 2880 tokens, keep 0.098: the C++ greedy reading the split-fp16 G (emulated)
    keeps the float64 greedy's picks up to near-ties."""
    x = features(2880, 1024, 2880)
    s = torch_similarity(x.unsqueeze(0))
    picks = cuda_ext._C.greedy(split_fp16_gram(s, GAMMA), torch.tensor([282]), GAMMA, None, full=True, stream=0)
    check_exact(x, picks[0].sort().values, 282, torch.float32)


def test_zero_similarity_and_padding():
    s = torch.zeros(2, 40, 40)
    s[1, :30, :30] = torch_similarity(features(30, 8, 2, b=1))[0]
    got = tk.kernel_matrix(s.to(DEV), GAMMA, identity=False).cpu()
    assert torch.isfinite(got).all()
    assert (got[0] == 0).all() and (got[1, 30:] == 0).all() and (got[1, :, 30:] == 0).all()


def test_bad_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        tk.kernel_matrix(torch.zeros(1, 3, 3, device=DEV), GAMMA, precision="tf32")


# ------------------------------------------------------------ the cuda backend's composition

cuda_ext = pytest.importorskip("otprune.backends.cuda_ext", reason="otprune._C not built")


def test_cuda_stages_take_the_triton_kernels(monkeypatch):
    """On a tensor Triton can take, the cuda backend's similarity and G are the Triton kernels
    (split-fp16 G); float64 goes to torch."""
    sim_mod = importlib.import_module("otprune.triton_kernels.similarity")
    calls = []
    monkeypatch.setattr(tk, "similarity", lambda *a, **k: calls.append("similarity") or sim_mod.similarity(*a, **k))
    real_km = tk.kernel_matrix
    monkeypatch.setattr(tk, "kernel_matrix", lambda *a, **k: calls.append(("G", k)) or real_km(*a, **k))
    x = features(50, 12, 1, b=2).to(DEV)
    s = cuda_ext.similarity(x, "feature", None)
    g = cuda_ext.gram(s, GAMMA)
    assert calls == ["similarity", ("G", {"identity": False})]
    assert _err(g, _reference(s, False)) <= G_RTOL["split-fp16"]
    s64 = cuda_ext.similarity(x.double(), "feature", None)
    assert s64.dtype == torch.float64 and len(calls) == 2
    assert cuda_ext.gram(s64, GAMMA).dtype == torch.float64 and len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_composition_exact_at_llava_size(dtype):
    """Triton similarity -> split-fp16 G -> compiled greedy reading G: the float64 greedy's picks
    (up to near-ties) at N = 576, k = 56 (d = 1024: the interpreter takes ~8 s per image)."""
    exact, d = 0, 1024
    for seed in range(2):
        x = features(576, d, 31 * d + seed, dtype=dtype)
        s = cuda_ext.similarity(x.unsqueeze(0).to(DEV), "feature", None)
        picks = cuda_ext.greedy(s.cpu() if DEV == "cpu" else s, [56], GAMMA, rows="full")
        exact += check_exact(x.double() if dtype == torch.float16 else x, picks[0].sort().values.cpu(), 56,
                             torch.float32)
    assert exact, "every case had a near-tie"


def test_cuda_composition_ragged_and_padded():
    x = features(80, 16, 4, b=3)
    valid = torch.arange(80).unsqueeze(0) < torch.tensor([[80], [41], [7]])
    ks = [8, 4, 7]
    s = cuda_ext.similarity(x.to(DEV), "feature", valid.to(DEV))
    picks = cuda_ext.greedy(s, ks, GAMMA, valid.to(DEV), rows="full").cpu()
    for b, (k, n) in enumerate(zip(ks, (80, 41, 7))):
        row = picks[b]
        assert (row[k:] == -1).all()
        check_exact(x[b, :n], row[:k].sort().values, k, torch.float32)


def test_wide_tiles_agree(monkeypatch):
    """With few SMs (here: forced to one) the fp16-operand GEMMs take 128 x 128 tiles: same S and G
    as the 64-tiles up to rounding, still exactly symmetric."""
    env = importlib.import_module("otprune.triton_kernels._env")
    x = features(150, 20, 8, b=2, dtype=torch.float16).to(DEV)
    s64 = tk.similarity(x)
    g64 = tk.kernel_matrix(s64, GAMMA, identity=False)
    assert env.gemm_block(2, 150, True, s64.device) == 64
    monkeypatch.setattr(env, "sm_count", lambda device: 1)
    assert env.gemm_block(2, 150, True, s64.device) == 128 and env.gemm_block(2, 150, False, s64.device) == 64
    s128 = tk.similarity(x)
    g128 = tk.kernel_matrix(s128, GAMMA, identity=False)
    assert torch.equal(s128, s128.transpose(1, 2)) and torch.equal(g128, g128.transpose(1, 2))
    assert _err(s128, s64.double().cpu()) <= 1e-6
    assert _err(g128, _reference(s64, False)) <= G_RTOL["split-fp16"]
