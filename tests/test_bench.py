"""The benchmark harness: every `python -m bench <what> --quick` writes a sane CSV, markdown and PNG;
the quality metrics and baselines behave as their definitions say; the transcription of the public
loop (bench/official.py) agrees with otprune's own compat="official" implementation."""

import csv
import math
import os

import numpy as np
import pytest
import torch

import otprune
from helpers import check_exact, features, require_module

require_module("matplotlib", "matplotlib")

from bench import common, official, quality  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _outputs(out, stem):
    paths = [os.path.join(out, stem + ext) for ext in (".csv", ".md", ".png")]
    for p in paths:
        assert os.path.getsize(p) > 0, p
    with open(paths[2], "rb") as f:
        assert f.read(8) == PNG
    with open(paths[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r[c] for r in rows for c in common.ENV_FIELDS)
    return rows, open(paths[1]).read()


def _positive(rows, cols):
    for r in rows:
        for c in cols:
            v = float(r[c])
            assert math.isfinite(v) and v > 0, (c, r)


def test_select_quick(tmp_path):
    assert bench_main(["select", "--quick", "--out", str(tmp_path)]) == 0
    rows, md = _outputs(tmp_path, "select_quick")
    assert {"provider", "B", "N", "d", "ratio", "k", "dtype", "p20_ms", "p50_ms", "p80_ms",
            "speedup_vs_official"} <= set(rows[0])
    provs = {r["provider"] for r in rows}
    assert {"official", "otprune-torch"} <= provs
    assert {int(r["B"]) for r in rows} == {1, 8} and {r["k"] for r in rows} == {"56"}
    _positive(rows, ["p20_ms", "p50_ms", "p80_ms", "speedup_vs_official"])
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        if r["provider"] == "official":
            assert float(r["speedup_vs_official"]) == 1.0
    assert "| official |" in md and "otprune-torch" in md
    # A second run appends to the CSV; the table keeps one (latest) row per configuration.
    threads = torch.get_num_threads()
    assert bench_main(["select", "--quick", "--out", str(tmp_path), "--B", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    rows2, md2 = _outputs(tmp_path, "select_quick")
    assert len(rows2) == len(rows) + len(provs)
    assert rows2[-1]["device"].endswith("(1 threads)")
    # Latest row per (device, configuration): the 1-thread run is another device entry.
    assert md2.count("| official |") == 2 + (threads != 1)


def test_e2e_quick(tmp_path):
    require_module("transformers", "transformers")
    assert bench_main(["e2e", "--quick", "--out", str(tmp_path)]) == 0
    rows, md = _outputs(tmp_path, "e2e_quick")
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, x) for m in ("tiny-llava-1.5", "tiny-llava-1.6") for x in ("unpruned", "otprune", "official")}
    _positive(rows, ["ttft_p50_ms", "prefill_p50_ms", "decode_tok_s", "ttft_speedup", "prefill_speedup"])
    for r in rows:
        n, kept = int(r["visual_tokens"]), int(r["kept_tokens"])
        assert int(r["seq_len"]) == 55 + kept
        if r["method"] == "unpruned":
            assert kept == n and float(r["select_p50_ms"]) == 0.0 and float(r["ttft_speedup"]) == 1.0
        else:
            assert kept == round(0.098 * n)
            assert 0 < float(r["select_share"]) < 1
    assert {int(r["visual_tokens"]) for r in rows} == {256, 336}
    assert "TTFT p50 ms" in md


def test_quality_quick(tmp_path):
    require_module("ot", "POT")
    require_module("skimage", "scikit-image")
    assert bench_main(["quality", "--quick", "--out", str(tmp_path)]) == 0
    rows, md = _outputs(tmp_path, "quality_quick")
    assert {r["method"] for r in rows} == set(quality.METHODS)
    assert {r["features"] for r in rows} == {"photo", "clustered"}
    _positive(rows, ["logdet", "w2_gauss", "ot_cost"])
    assert all(r["k"] == "56" for r in rows)
    for fam in ("photo", "clustered"):
        ld = {r["method"]: float(r["logdet"]) for r in rows if r["features"] == fam}
        assert ld["otprune-exact"] > ld["random"] and ld["otprune-exact"] > ld["divprune"]
    assert "otprune-official" in md


def test_select_providers_return_the_reference_indices():
    """What the select benchmark times is the selection: every otprune provider keeps, per image,
    the reference provider's (otprune-torch) indices, which are the float64 greedy's set (a
    provider may part from it only at a near-tie, where the step-by-step check allows it);
    "official" keeps what otprune's compat="official" keeps, in the same order."""
    from bench import select as select_bench

    provs = select_bench.providers(torch.device("cpu"))
    assert "official" in provs and "otprune-torch" in provs
    x = features(576, 1024, 17, b=2)
    k = round(0.098 * 576)
    want = provs["otprune-torch"](x, 0.098)
    assert want.shape == (2, k)
    for b in range(2):
        assert check_exact(x[b], want[b], k, torch.float32)
    for name, fn in provs.items():
        got = fn(x, 0.098)
        if name == "official":
            assert [t.tolist() for t in got] == otprune.select(x, 0.098, compat="official").tolist()
        else:
            assert got.shape == want.shape, name
            for b in range(2):
                if not torch.equal(got[b], want[b]):
                    check_exact(x[b], got[b], k, torch.float32)
            # image 1: smallest gap 7e-7, above every float32 divergence measured at this size
            assert torch.equal(got[1], want[1]), name


def test_quality_selections_content():
    """Each quality method's indices are what its definition says (not merely k of them)."""
    x16 = quality.clustered_features(1, n=300, d=48).half()
    sel = quality.selections("clustered", x16, 0.1, seed=4)
    k = 30
    assert set(sel) == set(quality.METHODS)
    for idx in sel.values():
        assert idx.dtype == torch.int64 and idx.tolist() == sorted(set(idx.tolist())) and len(idx) == k
    assert check_exact(x16.float(), sel["otprune-exact"], k, torch.float32)
    assert sel["otprune-official"].tolist() == sorted(official.official_select(x16, 0.1).tolist())
    assert sel["divprune"].tolist() == quality.divprune(x16, k).tolist()
    assert sel["uniform-grid"].tolist() == np.linspace(0, 299, k).round().astype(int).tolist()
    want_random = torch.randperm(300, generator=torch.Generator().manual_seed(4))[:k].sort().values
    assert sel["random"].tolist() == want_random.tolist()
    ld = {m: float(otprune.objective(x16.double(), idx)) for m, idx in sel.items()}
    assert ld["otprune-exact"] >= ld["random"]


def test_e2e_keep_tokens_content():
    """The e2e benchmark feeds the language model the tokens each method keeps."""
    from bench import e2e

    feats = features(96, 32, 5, b=2)
    assert torch.equal(e2e.keep_tokens(feats, "unpruned", 0.25), feats)
    got = e2e.keep_tokens(feats, "otprune", 0.25)
    off = e2e.keep_tokens(feats, "official", 0.25)
    idx = otprune.select(feats, 0.25)
    for b in range(2):
        assert check_exact(feats[b], idx[b], 24, torch.float32)
        assert torch.equal(got[b], feats[b, idx[b]])
        assert torch.equal(off[b], feats[b, official.official_select(feats[b], 0.25)])


def test_exact_vs_official_compare_content():
    """compare() reports the overlap and log-dets of the two modes' actual picks."""
    from bench import exact_vs_official as evo

    x = evo.synthetic_projected_tokens(0, n=200, d=256)
    row = evo.compare(x, 0.1)
    exact = otprune.select(x, 0.1)
    assert check_exact(x.float(), exact, 20, torch.float32)
    off = official.official_select(x, 0.1)
    assert row["k"] == 20
    assert row["shared"] == len(set(exact.tolist()) & set(off.tolist()))
    assert row["logdet_exact"] == pytest.approx(float(otprune.objective(x.double(), exact)), rel=1e-12)
    assert row["logdet_official"] == pytest.approx(float(otprune.objective(x.double(), off.sort().values)), rel=1e-12)


def test_exact_vs_official_subcommand(tmp_path):
    require_module("skimage", "scikit-image")
    assert bench_main(["exact-vs-official", "--quick", "--out", str(tmp_path)]) == 0
    rows, _ = (list(csv.DictReader(open(tmp_path / "exact_vs_official.csv"))), None)
    assert len(rows) == 4 and all(0 < int(r["shared"]) <= int(r["k"]) for r in rows)
    with open(tmp_path / "exact_vs_official.png", "rb") as f:
        assert f.read(8) == PNG


def test_bad_subcommand():
    assert bench_main(["nonsense"]) == 2
    assert bench_main([]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_official_transcription_matches_compat_mode(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(97, 24, generator=g).to(dtype)
    ours = official.official_select(x, 0.2)
    assert torch.equal(ours, otprune.select(x.clone(), 0.2, compat="official"))
    assert [t.tolist() for t in official.official_batch(x.unsqueeze(0).repeat(2, 1, 1), 0.2)] == [ours.tolist()] * 2


def test_w2_and_ot_sanity():
    require_module("ot", "POT")
    x = quality.unit_rows(quality.clustered_features(0, n=120, d=16))
    fit = quality.full_fit(x)
    everything = np.arange(x.shape[0])
    half = np.arange(0, x.shape[0], 2)
    w2_half = quality.w2_gaussian(fit, x[half])
    assert quality.w2_gaussian(fit, x) < 1e-5 * max(1.0, w2_half)
    assert w2_half > 1e-3
    assert quality.ot_cost(x, everything) == pytest.approx(0.0, abs=1e-12)
    assert quality.ot_cost(x, half) > 1e-3
    # Two point masses at distance 2 on the unit circle: keeping one costs half of |2|^2 = 2.
    pts = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert quality.ot_cost(pts, np.array([0])) == pytest.approx(2.0)
    # Gaussian W2 between N(m1, C) and N(m2, C) is |m1 - m2|.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 3))
    b = a + np.array([3.0, 0.0, 0.0])
    both = np.concatenate([a, b])
    fit_a = quality.full_fit(a)
    assert quality.w2_gaussian(fit_a, b) == pytest.approx(3.0, rel=1e-6)
    assert quality.w2_gaussian(quality.full_fit(both), both[:400]) > 1.0
    # Fewer kept tokens than dimensions takes the k x k route; it equals the d x d formula.
    from scipy.linalg import sqrtm

    mu1, c1, s1 = fit
    kept = x[:10]
    mu2, c2 = quality.gaussian_fit(kept)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(np.real(sqrtm(s1 @ c2 @ s1)))
    assert quality.w2_gaussian(fit, kept) == pytest.approx(np.sqrt(direct), rel=1e-6)


def test_divprune_definition():
    # Unit vectors at 0, 10, 20 and 90 degrees: 90 has the farthest nearest neighbour (70 degrees),
    # then 0 is farthest from {90}, then 20 is farther than 10 from {0, 90}.
    ang = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    x = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1))
    assert quality.divprune(x, 1).tolist() == [3]
    assert quality.divprune(x, 2).tolist() == [0, 3]
    assert quality.divprune(x, 3).tolist() == [0, 2, 3]
    # Duplicated tokens never make it pick the same token twice.
    dup = torch.cat([x, x])
    assert quality.divprune(dup, 8).unique().numel() == 8


def test_random_has_lower_logdet_than_otprune_on_clusters():

    for seed in range(3):
        x = quality.clustered_features(seed, n=200, d=32)
        ot_idx = otprune.select(x, 0.1)
        rnd = torch.randperm(200, generator=torch.Generator().manual_seed(seed))[:20]
        assert float(otprune.objective(x, ot_idx)) > float(otprune.objective(x, rnd))


def test_csv_append_refuses_other_columns(tmp_path):
    path = str(tmp_path / "x.csv")
    common.append_csv(path, [{"a": 1, "b": 2}])
    common.append_csv(path, [{"a": 3, "b": 4}])
    assert [r["a"] for r in common.read_csv(path)] == ["1", "3"]
    with pytest.raises(ValueError, match="columns"):
        common.append_csv(path, [{"a": 1, "c": 2}])
    rows = [{"device": "x", "k": "1", "v": "old"}, {"device": "x", "k": "2", "v": "b"}, {"device": "x", "k": "1", "v": "new"}]
    assert [r["v"] for r in common.latest_rows(rows, ["k"])] == ["b", "new"]
