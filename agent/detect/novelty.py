"""A numpy-only novelty detector: PCA with Hotelling's T² and the Q statistic (SPE).

It runs beside the TFLite models on the feature vectors of the detector. A PCA model of normal
running is fitted on a bounded buffer of recent vectors that the detector judged normal, and is
refitted as that buffer moves on, so it follows the device's own slow changes. For a new vector:

- ``T²`` (Hotelling) is its squared Mahalanobis distance inside the principal subspace: an unusual
  *amount* of the normal variation;
- ``Q`` (squared prediction error) is the squared distance from that subspace: a *pattern* of
  variation that normal running does not show.

Control limits at confidence ``alpha``: ``T²`` against the chi-square quantile with ``k`` degrees
of freedom (Wilson-Hilferty approximation), ``Q`` by Jackson and Mudholkar (1979) from the
eigenvalues left out of the model. Both need only the normal quantile, which the standard library
provides (``statistics.NormalDist``). No scikit-learn, no scipy.

Logging policy: debug for each refit (components, limits).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_STD_FLOOR = 1e-9


def chi2_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty)."""
    if not 0.0 < p < 1.0 or dof < 1:
        raise ValueError("need 0 < p < 1 and dof >= 1")
    z = NormalDist().inv_cdf(p)
    a = 2.0 / (9.0 * dof)
    return dof * max(0.0, 1.0 - a + z * math.sqrt(a)) ** 3


def q_limit(residual_eigenvalues: np.ndarray, alpha: float) -> float:
    """Jackson-Mudholkar control limit of Q for the eigenvalues not in the PCA model."""
    lam = np.asarray(residual_eigenvalues, dtype=np.float64)
    lam = lam[lam > 0]
    if len(lam) == 0:
        return 0.0
    t1, t2, t3 = (float(np.sum(lam**i)) for i in (1, 2, 3))
    h0 = 1.0 - 2.0 * t1 * t3 / (3.0 * t2 * t2)
    if h0 <= 1e-6:  # degenerate spectrum: fall back to the chi-square scaled by the mean
        return t1 * chi2_quantile(alpha, len(lam)) / len(lam)
    z = NormalDist().inv_cdf(alpha)
    base = z * math.sqrt(2.0 * t2 * h0 * h0) / t1 + 1.0 + t2 * h0 * (h0 - 1.0) / (t1 * t1)
    return t1 * max(base, 0.0) ** (1.0 / h0)


@dataclass(frozen=True)
class PcaModel:
    """A fitted PCA model of normal data with its T² and Q limits."""

    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray  # (k, d): principal directions, rows
    eigenvalues: np.ndarray  # (k,): variances along them
    residual_eigenvalues: np.ndarray
    t2_limit: float
    q_limit: float
    samples: int

    @property
    def k(self) -> int:
        return len(self.eigenvalues)

    def statistics(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """T² and Q of each row of ``x`` (or of one vector)."""
        xs = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.std
        scores = xs @ self.components.T
        t2 = np.sum(scores * scores / self.eigenvalues, axis=1)
        resid = xs - scores @ self.components
        q = np.sum(resid * resid, axis=1)
        return t2, q


def fit_pca(
    x: np.ndarray,
    *,
    variance: float = 0.9,
    alpha: float = 0.99,
    standardize: bool = True,
    max_components: int | None = None,
) -> PcaModel:
    """Fit PCA on rows of normal data. ``variance``: the fraction of variance the model keeps
    (at least one component, and one fewer than the dimensions, so that Q means something)."""
    a = np.asarray(x, dtype=np.float64)
    n, d = a.shape
    if n < d + 2 or d < 2:
        raise ValueError(f"need more rows than dimensions + 1 (got {n} rows of {d})")
    mean = a.mean(axis=0)
    std = np.maximum(a.std(axis=0, ddof=1), _STD_FLOOR) if standardize else np.ones(d)
    xs = (a - mean) / std
    _, s, vt = np.linalg.svd(xs / math.sqrt(n - 1), full_matrices=False)
    lam = s * s
    total = float(lam.sum())
    if total <= 0:
        raise ValueError("the data has no variance")
    cum = np.cumsum(lam) / total
    k = int(np.searchsorted(cum, variance) + 1)
    k = max(1, min(k, d - 1, max_components or d - 1))
    keep = np.maximum(lam[:k], _STD_FLOOR)
    model = PcaModel(
        mean=mean,
        std=std,
        components=vt[:k],
        eigenvalues=keep,
        residual_eigenvalues=lam[k:],
        t2_limit=chi2_quantile(alpha, k),
        q_limit=q_limit(lam[k:], alpha),
        samples=n,
    )
    return model


@dataclass(frozen=True)
class NoveltySettings:
    """``[detect.novelty]``: the PCA T²+Q detector beside the TFLite models."""

    enabled: bool = True
    variance: float = 0.9  # fraction of variance in the PCA model
    alpha: float = 0.99  # confidence of the T² and Q limits
    buffer: int = 3600  # vectors of recent normal history kept (1 h at 1 Hz)
    min_samples: int = 200  # vectors needed before the first fit
    retrain_every: int = 600  # refit after this many new normal vectors

    def __post_init__(self) -> None:
        if not 0 < self.variance < 1 or not 0.5 < self.alpha < 1:
            raise ValueError("variance must be in (0, 1) and alpha in (0.5, 1)")
        if self.min_samples < 10 or self.buffer < self.min_samples or self.retrain_every < 1:
            raise ValueError("need min_samples >= 10, buffer >= min_samples, retrain_every >= 1")


@dataclass(frozen=True)
class NoveltyScore:
    t2: float
    q: float
    t2_limit: float
    q_limit: float

    @property
    def novel(self) -> bool:
        return self.t2 > self.t2_limit or self.q > self.q_limit

    def to_dict(self) -> dict[str, Any]:
        return {"t2": self.t2, "q": self.q, "t2_limit": self.t2_limit, "q_limit": self.q_limit}


class NoveltyDetector:
    """PCA T²+Q over a bounded buffer of recent normal vectors, refitted as it moves on."""

    def __init__(self, settings: NoveltySettings | None = None) -> None:
        self.settings = settings or NoveltySettings()
        self._buffer: deque[np.ndarray] = deque(maxlen=self.settings.buffer)
        self._since_fit = 0
        self.model: PcaModel | None = None
        self.fits = 0

    def __len__(self) -> int:
        return len(self._buffer)

    def seed(self, vectors: np.ndarray) -> None:
        """Fill the buffer with normal vectors (commissioning) and fit at once."""
        for v in np.asarray(vectors, dtype=np.float64):
            self._buffer.append(v)
        self.refit()

    def observe(self, vector: np.ndarray) -> None:
        """Add a vector the detector judged normal; refit every ``retrain_every`` of them."""
        self._buffer.append(np.asarray(vector, dtype=np.float64))
        self._since_fit += 1
        s = self.settings
        due = self.model is None or self._since_fit >= s.retrain_every
        if due and len(self._buffer) >= s.min_samples:
            self.refit()

    def refit(self) -> None:
        if len(self._buffer) < self.settings.min_samples:
            return
        try:
            self.model = fit_pca(
                np.stack(self._buffer), variance=self.settings.variance, alpha=self.settings.alpha
            )
        except ValueError as err:  # e.g. no variance at all: keep the previous model
            log.debug("novelty refit skipped reason=%s", err)
            return
        self._since_fit = 0
        self.fits += 1
        log.debug(
            "novelty refit samples=%d components=%d t2_limit=%.3g q_limit=%.3g",
            self.model.samples,
            self.model.k,
            self.model.t2_limit,
            self.model.q_limit,
        )

    def score(self, vector: np.ndarray) -> NoveltyScore | None:
        if self.model is None:
            return None
        t2, q = self.model.statistics(vector)
        return NoveltyScore(float(t2[0]), float(q[0]), self.model.t2_limit, self.model.q_limit)
