"""Plain float64 reference of the selection (docs/design.md, "Selection"), written for clarity.

One image at a time, the textbook incremental-Cholesky greedy on L = I + gamma * S S^T. Kernel
rows come from a :class:`Kernel`, which forms them from the normalised features (so that N = 2880
costs O(N d^2), not O(N^3)) or from the full matrix for small N.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch

GAMMA = 0.01


def ref_normalize(x: torch.Tensor, normalize: str = "feature") -> torch.Tensor:
    """(N, d) features normalised in float64 (zero columns / tokens stay zero)."""
    x = x.to(torch.float64)
    dim = 0 if normalize == "feature" else 1
    norm = x.norm(dim=dim, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def ref_kernel(x: torch.Tensor, gamma: float = GAMMA, normalize: str = "feature") -> torch.Tensor:
    """L = I + gamma * S S^T for one (N, d) image, (N, N) float64."""
    xn = ref_normalize(x, normalize)
    s = xn @ xn.T
    return torch.eye(x.shape[0], dtype=torch.float64) + gamma * s @ s.T


class Kernel:
    """Rows, diagonal and principal minors of L = I + gamma * S S^T, S = Xn Xn^T, in float64.

    From (N, d) features (:meth:`from_features`) L is never formed when d < N: with G = Xn^T Xn
    (d, d), L[j, :] = e_j + gamma * (Xn[j] G) Xn^T. From a given (N, N) L (:meth:`from_matrix`)
    rows are read.
    """

    def __init__(self, n: int, xn: Optional[torch.Tensor], g: Optional[torch.Tensor],
                 full: Optional[torch.Tensor], gamma: float):
        self.n, self._xn, self._g, self._full, self.gamma = n, xn, g, full, gamma

    @classmethod
    def from_features(cls, x: torch.Tensor, gamma: float = GAMMA, normalize: str = "feature") -> "Kernel":
        n, d = x.shape
        if d >= n:
            return cls(n, None, None, ref_kernel(x, gamma, normalize), gamma)
        xn = ref_normalize(x, normalize)
        return cls(n, xn, xn.T @ xn, None, gamma)

    @classmethod
    def from_matrix(cls, L: torch.Tensor) -> "Kernel":
        return cls(L.shape[0], None, None, L.to(torch.float64), 0.0)

    def diagonal(self) -> torch.Tensor:
        if self._full is not None:
            return torch.diagonal(self._full).clone()
        return 1.0 + self.gamma * ((self._xn @ self._g) * self._xn).sum(1)

    def row(self, j: int) -> torch.Tensor:
        if self._full is not None:
            return self._full[j]
        out = self.gamma * (self._xn @ (self._g @ self._xn[j]))
        out[j] += 1.0
        return out

    def logdet(self, idx: Sequence[int]) -> float:
        idx_t = torch.as_tensor(list(idx), dtype=torch.int64)
        if self._full is not None:
            sub = self._full[idx_t][:, idx_t]
        else:
            xt = self._xn[idx_t]
            sub = torch.eye(len(idx_t), dtype=torch.float64) + self.gamma * (xt @ self._g @ xt.T)
        return float(torch.linalg.slogdet(sub)[1])


class GreedyState:
    """The incremental-Cholesky greedy on a :class:`Kernel`, one pick at a time (any pick allowed,
    so that a path other than the greedy's can be followed)."""

    def __init__(self, kern: Kernel, k: int):
        self.kern = kern
        self.d2 = kern.diagonal()  # residuals (squared Cholesky pivots); >= 1 for this L
        self.scale = float(self.d2.max())  # the gaps' unit (see relative_gaps)
        self.c = torch.zeros(max(k, 1), kern.n, dtype=torch.float64)
        self.taken = torch.zeros(kern.n, dtype=torch.bool)
        self.picks: List[int] = []

    def residuals(self) -> torch.Tensor:
        """(N,) residuals, -inf at taken items."""
        return torch.where(self.taken, torch.tensor(float("-inf"), dtype=torch.float64), self.d2)

    def take(self, j: int) -> None:
        t = len(self.picks)
        e = (self.kern.row(j) - self.c[:t, j] @ self.c[:t]) / torch.sqrt(self.d2[j])
        self.c[t] = e
        self.d2 = self.d2 - e * e
        self.taken[j] = True
        self.picks.append(j)

    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        return self.d2.clone(), self.taken.clone(), len(self.picks)

    def restore(self, snap: Tuple[torch.Tensor, torch.Tensor, int]) -> None:
        # rows c[t:] are rewritten before they are read again
        self.d2, self.taken, t = snap[0].clone(), snap[1].clone(), snap[2]
        del self.picks[t:]


def relative_gaps(res: torch.Tensor, scale: float) -> torch.Tensor:
    """(best - r_i) / scale for every item: residuals ``res`` (-inf at taken items) against the
    largest diagonal entry of L. That is the scale of the terms a residual is computed from
    (r = L_jj - sum of squared Cholesky entries), so float32 rounding moves residuals by about
    eps * scale however much they have shrunk: the near-tie measure of the tests."""
    return (res.max() - res) / scale


def ref_greedy(L: torch.Tensor, k: int):
    """Greedy picks in order on an (N, N) float64 L and, for each step, the gap between the best
    and runner-up residual (:func:`relative_gaps`, the near-tie measure used by the tests)."""
    return ref_greedy_kernel(Kernel.from_matrix(L), k)


def ref_greedy_kernel(kern: Kernel, k: int):
    """:func:`ref_greedy` on a :class:`Kernel`."""
    st = GreedyState(kern, k)
    gaps = []
    for _ in range(k):
        res = st.residuals()
        j = int(torch.argmax(res))
        top = torch.topk(res, min(2, kern.n)).values
        gaps.append(float("inf") if top.numel() < 2 or not torch.isfinite(top[1]) else float((top[0] - top[1]) / st.scale))
        st.take(j)
    return st.picks, gaps


def ref_select(x: torch.Tensor, k: int, gamma: float = GAMMA, normalize: str = "feature"):
    """(sorted picks, min relative gap along the path) for one (N, d) image."""
    picks, gaps = ref_greedy_kernel(Kernel.from_features(x, gamma, normalize), k)
    return sorted(picks), min(gaps)


def ref_logdet(x: torch.Tensor, idx: Iterable[int], gamma: float = GAMMA, normalize: str = "feature") -> float:
    """log det L[T, T] of the index set ``idx`` for one (N, d) image, float64."""
    return Kernel.from_features(x, gamma, normalize).logdet(list(idx))
