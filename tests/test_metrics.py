"""Metrics against closed forms and an independent implementation; extractors, provenance, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from kakusan.errors import DataError
from kakusan.metrics import (GaussianStats, fid_from_stats, frechet_distance, inception_score,
                             kernel_inception_distance, precision_recall)
from kakusan.metrics.stats import _mmd2_unbiased


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---- Frechet distance ----------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)
    # diagonal (commuting) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # general SPD matrices: the definition with scipy's matrix square root
    s1, s2 = _random_spd(30, rng), _random_spd(30, rng)
    ref = np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(np.zeros(30), s1, np.zeros(30), s2) == pytest.approx(ref, rel=1e-8)
    # symmetric and zero on itself
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        frechet_distance(mu2, np.diag(b), mu1, np.diag(a)), rel=1e-12)
    assert abs(frechet_distance(np.zeros(30), s1, np.zeros(30), s1)) < 1e-9


def test_fid_of_a_set_against_itself_is_zero_and_of_samples_converges_to_the_gaussians():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 16))
    st = GaussianStats.of(f)
    assert abs(fid_from_stats(st, st)) < 1e-9
    # two Gaussians N(0, I) and N(m, 4 I) in 8-D: d^2 = |m|^2 + 8 (2 - 1)^2
    m = np.full(8, 0.5)
    x = rng.standard_normal((200_000, 8))
    y = m + 2 * rng.standard_normal((200_000, 8))
    assert fid_from_stats(GaussianStats.of(x), GaussianStats.of(y)) == pytest.approx(8 * 0.25 + 8, rel=0.01)


def test_fid_agrees_with_torchmetrics_on_identical_features():
    torchmetrics_fid = pytest.importorskip("torchmetrics.image.fid")

    class Passthrough(torch.nn.Module):
        num_features = 64

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g,
                                                                                dtype=torch.float64)
    fake = 0.9 * real[:1500] + 0.3 * torch.randn(1500, 64, generator=g, dtype=torch.float64) + 0.2
    m = torchmetrics_fid.FrechetInceptionDistance(feature=Passthrough())
    m.update(real, real=True)
    m.update(fake, real=False)
    theirs = float(m.compute())
    ours = fid_from_stats(GaussianStats.of(fake), GaussianStats.of(real))
    assert ours == pytest.approx(theirs, rel=1e-3) and ours > 1


# ---- KID -------------------------------------------------------------------------------------------------------

def test_mmd_matches_the_direct_formula_and_torchmetrics():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((40, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    direct = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2)
    assert _mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    kid = pytest.importorskip("torchmetrics.image.kid")
    fx, fy = torch.from_numpy(x), torch.from_numpy(y)
    theirs = kid.maximum_mean_discrepancy(kid.poly_kernel(fx, fx), kid.poly_kernel(fx, fy), kid.poly_kernel(fy, fy))
    assert _mmd2_unbiased(x, y) == pytest.approx(float(theirs), rel=1e-8)


def test_kid_is_zero_in_expectation_on_equal_distributions_and_positive_on_different_ones():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4000, 32)), rng.standard_normal((4000, 32))
    r = kernel_inception_distance(a, b, subset_size=500, subsets=40)
    assert r.subset_size == 500 and r.subsets == 40 and r.stderr > 0
    assert abs(r.mean) < 3 * r.stderr
    shifted = kernel_inception_distance(a, b + 0.3, subset_size=500, subsets=40)
    assert shifted.mean > 10 * shifted.stderr
    # a larger shift gives a larger distance
    bigger = kernel_inception_distance(a, b + 0.6, subset_size=500, subsets=40)
    assert bigger.mean > 2 * shifted.mean
    with pytest.raises(DataError, match="dimensions"):
        kernel_inception_distance(a, b[:, :10])


# ---- Inception Score ---------------------------------------------------------------------------------------------

def test_inception_score_limits():
    k = 10
    confident = torch.full((1000, k), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % k] = 50.0
    mean, std = inception_score(confident)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6  # sharp and evenly spread: IS = K
    assert inception_score(torch.zeros(1000, k))[0] == pytest.approx(1.0)  # no information: IS = 1
    one_class = torch.full((1000, k), -50.0)
    one_class[:, 3] = 50.0
    assert inception_score(one_class)[0] == pytest.approx(1.0)  # mode collapse: IS = 1
    # two equally likely classes, each predicted with p = 0.9 / 0.1: IS = exp(KL) = exp(log 2 - H(0.9))
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).repeat(500, 1)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert inception_score(p.log(), splits=1)[0] == pytest.approx(math.exp(math.log(2) - h), rel=1e-9)


# ---- precision / recall ------------------------------------------------------------------------------------------

def test_precision_recall_on_known_distributions():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((2000, 4))
    same = rng.standard_normal((2000, 4))
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    far = rng.standard_normal((2000, 4)) + 50
    assert precision_recall(real, far) == (0.0, 0.0)
    # memorised: 20 jittered copies of 100 training points; every sample realistic, 5% of the variety
    collapsed = np.repeat(real[:100], 20, axis=0) + 0.01 * rng.standard_normal((2000, 4))
    p, r = precision_recall(real, collapsed)
    assert p > 0.99 and 0.04 <= r < 0.1
    spread = 3 * rng.standard_normal((2000, 4))  # covers the real data, mostly unrealistic
    p, r = precision_recall(real, spread)
    assert p < 0.4 and r > 0.9


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_bad_feature_inputs_name_the_problem():
    with pytest.raises(DataError, match="singular"):
        GaussianStats.of(np.random.default_rng(0).standard_normal((100, 128)))
    with pytest.raises(DataError, match="NaN"):
        GaussianStats.of(np.full((300, 4), np.nan))
    with pytest.raises(DataError, match="2-D"):
        GaussianStats.of(np.zeros(10))
    with pytest.raises(DataError, match="dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DataError, match="more than 3 samples"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
