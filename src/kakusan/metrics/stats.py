"""The numbers: Frechet distance, KID, Inception Score, precision/recall, over feature arrays.

All computed in float64 on CPU from (N, D) features; none knows which network made them (see
``features.py``) or where the images came from (see ``provenance.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

Array = np.ndarray


def _as_features(x, name: str = "features") -> Array:
    a = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise DataError(f"{name} must be a 2-D array (samples, dimensions), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{name} contain NaN or infinite values")
    return a


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set, with its size: what a Frechet distance needs."""

    mu: Array
    sigma: Array
    n: int

    @classmethod
    def of(cls, features, name: str = "features") -> "GaussianStats":
        f = _as_features(features, name)
        n, d = f.shape
        if n < 2:
            raise DataError(f"{name}: {n} sample(s); a covariance needs at least 2")
        if n <= d:
            raise DataError(f"{name}: {n} samples for {d}-dimensional features; the covariance would be singular "
                            f"(rank <= {n - 1} < {d}), so the Frechet distance is not meaningful. Use more than "
                            f"{d} samples (10,000+ for reportable numbers) or a lower-dimensional extractor")
        return cls(f.mean(0), np.cov(f, rowvar=False), n)


def _sqrtm_psd(a: Array) -> Array:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between N(mu1, S1) and N(mu2, S2).

    tr (S1 S2)^{1/2} is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^{1/2} S2 S1^{1/2} (same spectrum as S1 S2), which avoids the complex round-off of a general sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise DataError(f"Frechet distance between different feature dimensions: mean {mu1.shape} vs {mu2.shape}, "
                        f"covariance {sigma1.shape} vs {sigma2.shape}")
    r1 = _sqrtm_psd(sigma1)
    m = r1 @ sigma2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# --------------------------------------------------------------------------------------------------------------
# KID


@dataclass
class KIDResult:
    mean: float  # average of the unbiased MMD^2 estimates over the subsets
    std: float  # their standard deviation (what clean-fid / torchmetrics report)
    stderr: float  # standard error of the mean, from the disjoint subset rounds
    subsets: int
    subset_size: int


def _mmd2_unbiased(x: Array, y: Array) -> float:
    """Unbiased MMD^2 with the polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d, m = x.shape[1], len(x)
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def kernel_inception_distance(feat_a, feat_b, subset_size: int = 1000, subsets: int = 100,
                              seed: int = 0) -> KIDResult:
    """KID: the unbiased polynomial-kernel MMD^2 averaged over ``subsets`` random subsets of ``subset_size``
    from each side (at most half the smaller set, so that every round has >= 2 disjoint blocks).

    Each round permutes both sets and cuts them into k = n // subset_size disjoint blocks, whose estimates are
    independent; the standard error is sqrt(mean within-round variance / k): the error of one round's mean,
    an upper bound for the average over rounds (which reuse the same samples and so are not independent)."""
    a, b = _as_features(feat_a, "first feature set"), _as_features(feat_b, "second feature set")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"KID between different feature dimensions: {a.shape[1]} vs {b.shape[1]}")
    n = min(len(a), len(b))
    if n < 4:
        raise DataError(f"KID needs at least 4 samples on each side, got {len(a)} and {len(b)}")
    m = min(subset_size, n // 2)
    per_round = n // m
    rng = np.random.default_rng(seed)
    values, within_var = [], []
    while len(values) < subsets:
        pa, pb = rng.permutation(len(a)), rng.permutation(len(b))
        vals = [_mmd2_unbiased(a[pa[i * m:(i + 1) * m]], b[pb[i * m:(i + 1) * m]]) for i in range(per_round)]
        values += vals
        within_var.append(np.var(vals, ddof=1))
    v = np.asarray(values[:max(subsets, 2)])
    stderr = float(math.sqrt(np.mean(within_var) / per_round))
    return KIDResult(float(v.mean()), float(v.std(ddof=1)), stderr, len(v), m)


# --------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) from classifier logits, mean and std over ``splits`` equal parts
    (Salimans et al. 2016). With kakusan's domain classifier it is the same formula over its classes."""
    z = _as_features(logits, "logits")
    if len(z) < splits:
        raise DataError(f"Inception Score with {splits} splits needs at least {splits} samples, got {len(z)}")
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(0) + 1e-30)
        scores.append(math.exp(float((p * (part - log_py)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------------------
# Precision / recall


def _pairwise_sq(a: Array, b: Array) -> Array:
    return np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0, None)


def _kth_radius(f: Array, k: int, block: int = 2048) -> Array:
    """Squared distance of each point to its k-th nearest neighbour within the set (itself excluded)."""
    out = np.empty(len(f))
    for i in range(0, len(f), block):
        d = _pairwise_sq(f[i:i + block], f)
        out[i:i + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def knn_radii(features, k: int = 3) -> Array:
    """Squared distance of each feature vector to its k-th nearest neighbour in the set (precision's manifold)."""
    return _kth_radius(_as_features(features), k)


def _coverage_of(manifold: Array, radii: Array, queries: Array, block: int = 2048) -> float:
    """Fraction of ``queries`` inside the union of balls (manifold point, its k-NN radius)."""
    inside = 0
    for i in range(0, len(queries), block):
        d = _pairwise_sq(queries[i:i + block], manifold)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / len(queries)


def precision_recall(real, fake, k: int = 3, real_radii: Array | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = fraction of generated samples
    inside the k-NN manifold of the real features; recall = fraction of real samples inside the generated one.
    ``real_radii``: the real side's k-NN radii from :func:`knn_radii` (the same ``real`` and ``k``), when
    one reference is scored many times."""
    r, f = _as_features(real, "real features"), _as_features(fake, "generated features")
    if r.shape[1] != f.shape[1]:
        raise DataError(f"precision/recall between different feature dimensions: {r.shape[1]} vs {f.shape[1]}")
    if min(len(r), len(f)) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} samples on each side, "
                        f"got {len(r)} real and {len(f)} generated")
    precision = _coverage_of(r, _kth_radius(r, k) if real_radii is None else real_radii, f)
    recall = _coverage_of(f, _kth_radius(f, k), r)
    return precision, recall


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two uint8 batches (peak 255)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
