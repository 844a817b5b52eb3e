"""The demo: train a class-conditional model on the real digits that ship with scikit-learn, sample one row per
digit, and let an independent classifier say how many samples are the digit that was asked for."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .data import load_digits, to_uint8
from .images import save_grid
from .pipeline import Pipeline
from .training import Trainer, TrainConfig

# 800 steps: about 90 s of training on 2 quiet cores. The judge read 100% of the demo's samples at seeds 0-2, and
# 99.8-100% of 500 more each (benchmarks/demo_runs.py, docs/RESULTS.md); 1,500 steps gave no more that it could see.
DEMO_DEFAULTS = dict(data="digits", preset="unet-digits", cond="class", schedule="cosine", prediction="v",
                     weighting="min-snr", steps=800, batch_size=64, lr=5e-4, warmup_steps=100, ema_decay=0.999,
                     log_every=100, sample_every=500, checkpoint_every=500, guidance=2.0)


def digit_classifier():
    """An SVM on the real 8x8 digits (pixels on sklearn's 0-16 scale); about 99% accurate on held-out digits.
    Returns (classifier, held-out accuracy of a copy trained on half the data)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.svm import SVC

    d = sk_digits()
    X, y = d.data, d.target
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    half = len(X) // 2
    check = SVC(gamma=0.001, C=10).fit(X[perm[:half]], y[perm[:half]])
    held_out = float((check.predict(X[perm[half:]]) == y[perm[half:]]).mean())
    return SVC(gamma=0.001, C=10).fit(X, y), held_out


def judge_digits(x: torch.Tensor, labels: torch.Tensor, clf=None) -> float:
    """Fraction of samples x (B, 1, 8, 8) in [-1, 1] that the independent classifier (``clf``, default
    :func:`digit_classifier`'s) reads as ``labels``."""
    if clf is None:
        clf, _ = digit_classifier()
    feats = to_uint8(x).reshape(len(x), -1).numpy().astype(np.float64) * (16.0 / 255.0)
    return float((clf.predict(feats) == labels.cpu().numpy()).mean())


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, guidance: float = 2.0, seed: int = 0,
             progress: bool = True, sampler: str | None = None, sample_steps: int | None = None,
             **overrides) -> dict:
    """Train on the digits (DEMO_DEFAULTS, ``overrides`` replacing any of them), sample 10 of each digit with
    ``sampler`` over ``sample_steps`` (default: the pipeline's, unipc-2 in 20 steps) and judge them."""
    t0 = time.perf_counter()
    cfg = TrainConfig(**{**DEMO_DEFAULTS, "out": str(out), "seed": seed, "progress": progress,
                         **({"steps": steps} if steps else {}), **overrides})
    trainer = Trainer(cfg, load_digits())
    ckpt = trainer.fit()
    t_train = time.perf_counter() - t0

    pipe = Pipeline.load(ckpt, device="cpu")
    per_row = 10
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_row)  # one row per digit
    gen = pipe(class_label=labels.tolist(), sampler=sampler, steps=sample_steps, guidance=guidance, seed=seed)
    x, t_sample = gen.images, gen.seconds
    grid = save_grid(x, Path(out) / "demo-grid.png", nrow=per_row, min_size=400, record={**gen.record, "grid": True, "nrow": per_row})
    clf, held_out = digit_classifier()
    return {"grid": str(grid), "checkpoint": str(ckpt), "agreement": judge_digits(x, labels, clf),
            "classifier_held_out_accuracy": held_out, "train_s": t_train, "sample_s": t_sample,
            "steps": cfg.steps, "sampler": gen.record["sampler"], "sample_steps": gen.record["steps"]}
