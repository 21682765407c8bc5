"""Selection quality: `python -m bench quality [--quick] [--out DIR]`.

What does each selection keep? Methods, each keeping k = round(ratio * N) tokens:
  otprune-exact     otprune.select (exact arithmetic, the default);
  otprune-official  otprune.select(compat="official") (the public release's fp16 numerics);
  divprune          DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
                    Multimodal Models", CVPR 2025, arXiv 2503.02175): the subset is chosen for the
                    max-min diversity problem (maximise the smallest pairwise distance of the kept
                    set) under the cosine distance 1 - cos(x_i, x_j), solved greedily: the first token
                    is the one whose nearest other token is farthest away; each next token is the one
                    whose distance to its nearest kept token is largest (:func:`divprune`);
  random            a seeded uniform random subset;
  uniform-grid      an evenly spaced subset: a near-square grid on the 24 x 24 patch grid for photos
                    (otprune.demo.uniform_grid), evenly spaced indices for the synthetic sets (whose
                    token order carries no meaning, so there it is one more data-independent subset).
Feature sets (N = 576 tokens each, given to every method in fp16 as LLaVA's projector emits them;
metrics in float64 of the same values):
  photo       patch features of scikit-image sample photos (otprune.demo, d = 600);
  clustered   synthetic: 10 Gaussian clusters of unequal sizes (Dirichlet(1) shares), d = 256.
Metrics:
  logdet      log det L[T, T] (otprune.objective, gamma 0.01, feature normalisation): higher = more
              diverse in OTPrune's sense;
  w2_gauss    2-Wasserstein distance between Gaussian fits (mean, biased covariance) of the full and
              kept sets: W2^2 = |m1 - m2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2
              (cross term by scipy.linalg.sqrtm, on the k x k form when k < d; C1^1/2 by
              eigendecomposition); lower = the kept set's first two moments are closer to the
              full set's;
  ot_cost     exact discrete OT cost (POT ot.emd2) between the full set and the kept set, uniform
              weights on each, squared-Euclidean cost; lower = kept set covers the full set better.
  w2_gauss and ot_cost use token-normalised (unit L2) features, the cosine geometry.
--quick: one photo, one synthetic set, ratio 0.098. Full: 6 photos, 6 synthetic sets, ratios
0.098 / 0.222 / 0.333. Writes quality[_quick].csv (appended), .md and .png under --out.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

import otprune

from . import common

KEY = ("features", "set", "method", "ratio")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
RATIOS = (0.098, 0.222, 0.333)
METHODS = ("otprune-exact", "otprune-official", "divprune", "random", "uniform-grid")


def clustered_features(seed: int, n: int = 576, d: int = 256, clusters: int = 10) -> torch.Tensor:
    """(n, d) float32 tokens from ``clusters`` Gaussian clusters of unequal (Dirichlet(1)) sizes."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(n, rng.dirichlet(np.ones(clusters)))
    centres = rng.standard_normal((clusters, d)) * 4.0
    x = np.concatenate([c + rng.standard_normal((s, d)) for c, s in zip(centres, sizes)])
    return torch.from_numpy(x[rng.permutation(n)].astype(np.float32))


def divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection (see module docstring); (k,) int64 ascending.

    x: (N, d) features. Distances 1 - cos are computed in float64.
    """
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    dist = 1.0 - xn @ xn.T
    n = dist.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.int64)
    nearest = dist.clone().fill_diagonal_(float("inf")).min(0).values
    picks = [int(nearest.argmax())]
    to_kept = dist[picks[0]].clone()
    for _ in range(k - 1):
        to_kept[picks] = -float("inf")
        j = int(to_kept.argmax())
        picks.append(j)
        to_kept = torch.minimum(to_kept, dist[j])
    return torch.tensor(sorted(picks), dtype=torch.int64)


def grid_indices(family: str, n: int, k: int) -> torch.Tensor:
    """The uniform-grid baseline's (k,) indices (see module docstring)."""
    if family == "photo":
        from otprune.demo import uniform_grid

        return uniform_grid(k)
    return torch.from_numpy(np.linspace(0, n - 1, k).round().astype(np.int64))


def selections(family: str, x16: torch.Tensor, ratio: float, seed: int) -> Dict[str, torch.Tensor]:
    """method -> (k,) int64 kept indices for one (N, d) fp16 feature set."""
    n = x16.shape[0]
    k = max(1, int(round(ratio * n)))
    gen = torch.Generator().manual_seed(seed)
    return {
        "otprune-exact": otprune.select(x16, ratio),
        "otprune-official": otprune.select(x16, ratio, compat="official").sort().values,
        "divprune": divprune(x16, k),
        "random": torch.randperm(n, generator=gen)[:k].sort().values,
        "uniform-grid": grid_indices(family, n, k),
    }


def unit_rows(x: torch.Tensor) -> np.ndarray:
    """(N, d) float64 numpy array of the tokens scaled to unit L2 norm (zero tokens stay zero)."""
    x = x.double().numpy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def gaussian_fit(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean (d,), biased covariance (d, d)) of (n, d) samples."""
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / x.shape[0]


def w2_gaussian(full: Tuple[np.ndarray, np.ndarray, np.ndarray], kept: np.ndarray) -> float:
    """2-Wasserstein distance between the Gaussian fit of the full set and of ``kept`` (k, d).

    full: (mean, covariance, sqrtm(covariance)) of the full set (precomputed once per set).
    """
    from scipy.linalg import sqrtm

    mu1, c1, s1 = full
    mu2, c2 = gaussian_fit(kept)
    yc = kept - mu2
    if yc.shape[0] < yc.shape[1]:
        # C2 = Yc^T Yc / k, so C1^1/2 C2 C1^1/2 and Yc C1 Yc^T / k (k x k) share their nonzero
        # eigenvalues: the same trace of the square root from a k x k instead of a d x d sqrtm.
        inner = yc @ c1 @ yc.T / yc.shape[0]
    else:
        inner = s1 @ c2 @ s1
    cross = np.real(sqrtm(inner))
    w2sq = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(cross))
    return float(np.sqrt(max(w2sq, 0.0)))


def full_fit(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, covariance, covariance^1/2) of (N, d) samples, for :func:`w2_gaussian`.

    The full set's root is taken by symmetric eigendecomposition (exact for a PSD matrix, and
    many times faster than a Schur-based sqrtm on a full-rank 600 x 600 covariance).
    """
    mu, c = gaussian_fit(x)
    w, v = np.linalg.eigh(c)
    return mu, c, (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def ot_cost(x: np.ndarray, idx: np.ndarray) -> float:
    """Exact OT cost between uniform weights on all rows of ``x`` (N, d) and on rows ``idx``; squared-Euclidean cost."""
    import ot

    kept = x[idx]
    cost = ot.dist(x, kept, metric="sqeuclidean")
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(kept.shape[0], 1.0 / kept.shape[0])
    return float(ot.emd2(a, b, cost, numItermax=1_000_000))


def feature_sets(quick: bool) -> List[Tuple[str, str, Callable[[], torch.Tensor]]]:
    """(family, set name, loader of (N, d) float32 features)."""
    from otprune.demo import photo_patch_features

    photos = PHOTOS[:1] if quick else PHOTOS
    seeds = range(1) if quick else range(6)
    sets = [("photo", p, lambda p=p: photo_patch_features(p)[1]) for p in photos]
    sets += [("clustered", f"seed {s}", lambda s=s: clustered_features(s)) for s in seeds]
    return sets


def run(quick: bool, out_dir: str) -> List[dict]:
    """Score every method on every feature set and ratio; append CSV, rewrite MD and PNG."""
    ratios = (0.098,) if quick else RATIOS
    env = common.environment(torch.device("cpu"))
    rows = []
    for i, (family, name, load) in enumerate(common.progress(feature_sets(quick), "quality sets")):
        x16 = load().half()
        x64 = x16.double()
        xu = unit_rows(x16)
        fit = full_fit(xu)
        for ratio in ratios:
            for method, idx in selections(family, x16, ratio, seed=i).items():
                rows.append({**env, "features": family, "set": name, "method": method, "ratio": ratio,
                             "N": x16.shape[0], "d": x16.shape[1], "k": idx.numel(),
                             "logdet": float(otprune.objective(x64, idx)),
                             "w2_gauss": w2_gaussian(fit, xu[idx.numpy()]),
                             "ot_cost": ot_cost(xu, idx.numpy())})
    stem = common.results_stem(out_dir, "quality", quick)
    common.append_csv(stem + ".csv", rows)
    write_report(stem)
    return rows


def summary(rows: List[Dict[str, str]]) -> List[dict]:
    """Medians over sets of every metric per (features, ratio, method)."""
    out = []
    for family, ratio, method in dict.fromkeys((r["features"], r["ratio"], r["method"]) for r in rows):
        rs = [r for r in rows if (r["features"], r["ratio"], r["method"]) == (family, ratio, method)]
        out.append({"features": family, "ratio": ratio, "method": method, "sets": len(rs), "k": rs[0]["k"],
                    **{m: statistics.median(float(r[m]) for r in rs) for m in ("logdet", "w2_gauss", "ot_cost")}})
    return out


def write_report(stem: str) -> None:
    """quality.md and quality.png from the latest row of every (features, set, method, ratio)."""
    rows = common.latest_rows(common.read_csv(stem + ".csv"), KEY)
    summ = summary(rows)
    cols = ["features", "ratio", "k", "sets", "method", "logdet", "w2_gauss", "ot_cost"]
    heads = ["features", "keep", "k", "sets", "method", "log-det (higher = more diverse)",
             "W2 Gaussian fits (lower = closer)", "OT cost full vs kept (lower = better coverage)"]
    text = ["# Selection quality: what each method keeps", "",
            "Medians over feature sets (N = 576 tokens each). See bench/quality.py for the methods, the "
            "feature sets and the metric definitions.", "", common.markdown_table(summ, cols, heads), "",
            common.env_line(rows), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))
    _plot(summ, stem + ".png")


@common.optional_plot
def _plot(summ: List[dict], path: str) -> None:
    plt = common.pyplot()
    families = list(dict.fromkeys(r["features"] for r in summ))
    metrics = (("logdet", "log-det (higher better)"), ("w2_gauss", "W2 Gaussian (lower better)"),
               ("ot_cost", "OT cost (lower better)"))
    fig, axes = plt.subplots(len(families), 3, figsize=(14, 3.6 * len(families)), squeeze=False)
    for row, family in zip(axes, families):
        for ax, (m, label) in zip(row, metrics):
            for method in METHODS:
                pts = sorted((float(r["ratio"]), r[m]) for r in summ if r["features"] == family and r["method"] == method)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            ax.set_title(f"{family}: {label}", fontsize=9)
            ax.set_xlabel("keep ratio")
    axes[0][0].legend(fontsize=7)
    common.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options beyond --quick and --out."""


def main(args: argparse.Namespace) -> int:
    rows = run(args.quick, args.out)
    stem = common.results_stem(args.out, "quality", args.quick)
    print(open(stem + ".md").read())
    print(f"{len(rows)} rows appended to {stem}.csv; wrote {stem}.md and {stem}.png")
    return 0
