"""`otprune demo`: OTPrune on a real photograph cut into LLaVA-1.5's 24 x 24 patch grid.

The photograph ships with scikit-image (``skimage.data.astronaut``, public domain; nothing is
downloaded). It is resized to 336 x 336 px and cut into 24 x 24 patches of 14 px, as LLaVA-1.5's
CLIP ViT-L/14-336 does. Per-patch features (d = 600), documented so that anyone can reproduce them:
  * the patch's RGB pixels, 14 x 14 x 3 = 588 values in [0, 1], minus the image's mean colour;
  * a 9-bin histogram of gradient orientations (HOG, one cell per patch), times 4;
  * the patch's mean colour (3 values) minus the image's mean colour, times 4.
These stand in for CLIP features (no weights can be downloaded here): they make patches that look
alike close and patches that differ far apart, which is what the selection responds to.
"""

from __future__ import annotations

import time
from typing import Dict, Tuple

import numpy as np
import torch

GRID = 24  # LLaVA-1.5: 336 px / 14 px
PATCH = 14


def load_photo(name: str = "astronaut") -> np.ndarray:
    """(336, 336, 3) float32 RGB in [0, 1] of a scikit-image sample photograph."""
    try:
        from skimage import data
        from skimage.transform import resize
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo needs scikit-image: pip install scikit-image") from err
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    side = GRID * PATCH
    return resize(img[..., :3], (side, side), anti_aliasing=True).astype(np.float32)


def patch_features(img: np.ndarray) -> torch.Tensor:
    """(GRID*GRID, 600) float32 features of a (336, 336, 3) image, row-major patch order."""
    from skimage.color import rgb2gray
    from skimage.feature import hog

    mean = img.reshape(-1, 3).mean(0)
    patches = img.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4)
    pixels = (patches - mean).reshape(GRID * GRID, -1)
    grads = hog(
        rgb2gray(img), orientations=9, pixels_per_cell=(PATCH, PATCH), cells_per_block=(1, 1),
        feature_vector=False,
    ).reshape(GRID * GRID, 9)
    colour = patches.mean(axis=(2, 3)).reshape(GRID * GRID, 3) - mean
    feats = np.concatenate([pixels, 4.0 * grads, 4.0 * colour], axis=1)
    return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))


def photo_patch_features(name: str = "astronaut") -> Tuple[np.ndarray, torch.Tensor]:
    """(image (336, 336, 3) float32, features (576, 600) float32) for a sample photograph."""
    img = load_photo(name)
    return img, patch_features(img)


def uniform_grid(n_keep: int, grid: int = GRID) -> torch.Tensor:
    """Indices of a near-square uniform grid of about ``n_keep`` patches (exactly n_keep)."""
    rows = max(1, int(round(np.sqrt(n_keep))))
    cols = -(-n_keep // rows)
    r = np.linspace(0, grid - 1, rows).round().astype(int)
    c = np.linspace(0, grid - 1, cols).round().astype(int)
    idx = sorted({int(i * grid + j) for i in r for j in c})
    return torch.tensor(idx[:n_keep], dtype=torch.int64)


def run(out_path: str = "otprune_demo.png", keep: float = 0.10, seed: int = 0, photo: str = "astronaut") -> Dict:
    """Select 10% of the patches three ways, print log-det and time, write the comparison PNG."""
    import otprune
    from otprune._validate import budget

    print(f"[1/3] loading the '{photo}' photograph and building 24x24 patch features ...", flush=True)
    img, feats = photo_patch_features(photo)
    n = feats.shape[0]
    k = budget(keep, n)

    print(f"[2/3] selecting {k} of {n} patches ...", flush=True)
    otprune.select(feats, keep)  # warm-up (first call loads backends)
    reps, times = 7, []
    for _ in range(reps):
        t0 = time.perf_counter()
        ot_idx = otprune.select(feats, keep)
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    gen = torch.Generator().manual_seed(seed)
    rand_idx = torch.randperm(n, generator=gen)[:k].sort().values
    grid_idx = uniform_grid(k)
    results = {}
    for name, idx in (("OTPrune", ot_idx), ("random", rand_idx), ("uniform grid", grid_idx)):
        results[name] = {"indices": idx, "logdet": float(otprune.objective(feats, idx))}
    results["OTPrune"]["ms"] = ms
    for name, r in results.items():
        extra = f", selection {r['ms']:.2f} ms (median of {reps}, CPU)" if "ms" in r else ""
        print(f"  {name:13s} log det L[T,T] = {r['logdet']:8.4f}{extra}")

    print(f"[3/3] writing {out_path} ...", flush=True)
    _plot(img, results, k, n, out_path)
    return results


def _plot(img: np.ndarray, results: Dict, k: int, n: int, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    for ax, (name, r) in zip(axes, results.items()):
        mask = np.zeros(GRID * GRID, dtype=bool)
        mask[r["indices"].numpy()] = True
        shade = np.repeat(np.repeat(mask.reshape(GRID, GRID), PATCH, 0), PATCH, 1)
        shown = np.where(shade[..., None], img, 0.25 * img)
        ax.imshow(np.clip(shown, 0, 1))
        for idx in r["indices"].tolist():
            y, x = divmod(idx, GRID)
            ax.add_patch(plt.Rectangle((x * PATCH - 0.5, y * PATCH - 0.5), PATCH, PATCH,
                                       fill=False, edgecolor="yellow", linewidth=0.8))
        title = f"{name}: {k}/{n} patches\nlog det = {r['logdet']:.3f}"
        if "ms" in r:
            title += f", {r['ms']:.1f} ms"
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("Kept patches (bright) on LLaVA-1.5's 24x24 grid; higher log det = more diverse")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
