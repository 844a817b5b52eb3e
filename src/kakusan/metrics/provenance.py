"""Provenance: every score carries a record of how it was made, and scores (or cached statistics) whose
records differ in what matters are not compared silently.

A record has three parts: ``extractor`` (network, weights SHA-256, input size, resize method, dtype),
``reference`` (the real side: data set spec, split, count, or the cached statistics it came from) and
``samples`` (the generated side: checkpoint + its weights' SHA-256, sampler, steps, spacing, guidance, seed,
count; or an image folder + a hash of its pixels). Feature statistics are cached as safetensors with the
same record in their metadata.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError

PRELIMINARY_BELOW = 10_000  # scores from fewer samples (either side) are labelled preliminary
STATS_KIND = "kakusan-feature-stats"

# What must agree for two scores to be comparable (dotted paths into the record).
MATTERS = ("extractor.name", "extractor.weights_sha256", "extractor.resize", "extractor.feature_dtype",
           "reference.data", "reference.split", "reference.n", "samples.n")


def file_sha256(*paths: str | Path) -> str:
    """SHA-256 of the bytes of the given files, read in order (one file: its ordinary digest)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def environment() -> dict:
    return {"kakusan_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _get(record: dict, dotted: str):
    cur = record
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def differences(a: dict, b: dict, keys: tuple[str, ...] = MATTERS) -> list[str]:
    """What differs between two records among ``keys``, one line each."""
    return [f"{k}: {_get(a, k)!r} vs {_get(b, k)!r}" for k in keys if _get(a, k) != _get(b, k)]


def check_comparable(a: dict, b: dict, strict: bool = True) -> list[str]:
    """Refuse (``strict``) or loudly warn when two score records differ in what matters."""
    diff = differences(a, b)
    if diff:
        msg = "these scores were not made the same way and are not comparable: " + "; ".join(diff)
        if strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=2)
    return diff


def sample_count_label(n_samples: int, n_reference: int) -> str | None:
    n = min(n_samples, n_reference)
    if n < PRELIMINARY_BELOW:
        return (f"preliminary: from {n:,} samples (< {PRELIMINARY_BELOW:,}); FID is biased upwards at small n and "
                f"only comparable to scores made with the same counts")
    return None


# --------------------------------------------------------------------------------------------------------------
# Cached feature statistics


def save_stats(path: str | Path, features: torch.Tensor, logits: torch.Tensor | None, record: dict,
               labels: torch.Tensor | None = None) -> Path:
    """Features (float32), their mean and covariance (float64), optional logits/labels, and the record."""
    from ..checkpoints import save_file_atomic

    f64 = features.double()
    tensors = {"features": features.float(), "mu": f64.mean(0),
               "sigma": torch.from_numpy(np.cov(f64.numpy(), rowvar=False)).reshape(f64.shape[1], f64.shape[1])}
    if logits is not None:
        tensors["logits"] = logits.float()
    if labels is not None:
        tensors["labels"] = labels.long()
    return save_file_atomic(Path(path), tensors, {"kind": STATS_KIND, "record": json.dumps(record)})


def load_stats(path: str | Path, extractor_record: dict | None = None) -> tuple[dict, dict]:
    """(tensors, record) of a stats file; with ``extractor_record`` the file must come from the same extractor
    (name, weights, resize, dtype), or loading is refused with what differs."""
    from ..checkpoints import load_tagged

    tensors, meta = load_tagged(path, STATS_KIND, "feature-stats file")
    record = json.loads(meta["record"])
    if extractor_record is not None:
        keys = ("name", "weights_sha256", "resize", "feature_dtype", "feature_dim")
        diff = [f"{k}: file {record['extractor'].get(k)!r} vs now {extractor_record.get(k)!r}"
                for k in keys if record["extractor"].get(k) != extractor_record.get(k)]
        if diff:
            raise CheckpointError(f"{path}: these statistics were made with another feature extractor: "
                                  + "; ".join(diff))
    return tensors, record
