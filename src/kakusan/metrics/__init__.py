"""Evaluation: Frechet distance, KID, Inception Score, precision/recall; feature extractors (the FID
Inception-v3, a domain classifier kakusan trains); provenance records and cached statistics."""

from .stats import (GaussianStats, KIDResult, fid_from_stats, frechet_distance, inception_score,
                    kernel_inception_distance, precision_recall)

__all__ = ["GaussianStats", "KIDResult", "fid_from_stats", "frechet_distance", "inception_score",
           "kernel_inception_distance", "precision_recall"]
