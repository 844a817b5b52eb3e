"""Classifier guidance on a trained class-conditional checkpoint, sampled *unconditionally* (null label) and
steered only by a noise-aware classifier's gradient; judged by the clean domain classifier.

    python benchmarks/classifier_guidance.py --checkpoint runs/mnist \
        --noisy-classifier cls/mnist-noisy-cosine.safetensors --judge weights/classifier-mnist.safetensors

Prints a table (scale, agreement with the requested digit, FID against the test split in the judge's features,
wall time) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kakusan.data.datasets import to_uint8
from kakusan.diffusion import ClippedDenoiser
from kakusan.guidance import ClassifierGuidance
from kakusan.metrics.classifier import load_classifier
from kakusan.metrics.evaluate import FeatureSet, reference_features, score
from kakusan.metrics.features import load_extractor
from kakusan.samplers import sample
from kakusan.checkpoints import load_denoiser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--noisy-classifier", required=True)
    ap.add_argument("--judge", required=True, help="a clean domain classifier (its features give the FID)")
    ap.add_argument("--ref", default="mnist", help="reference data set for the FID")
    ap.add_argument("--scales", default="0,1,2,4,8")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--sampler", default="unipc-2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/classifier_guidance.json")
    args = ap.parse_args()

    denoiser, config = load_denoiser(args.checkpoint)
    clf, report = load_classifier(args.noisy_classifier)
    judge = load_extractor(f"classifier:{args.judge}")
    ref = reference_features(judge, args.ref, "test")
    mc = config["model"]
    labels = torch.arange(args.n) % clf.cfg.num_classes
    rows = []
    print(f"{'scale':>6} {'agreement':>10} {'FID':>8} {'recall':>7} {'seconds':>8}")
    for s in [float(v) for v in args.scales.split(",")]:
        d = ClippedDenoiser(ClassifierGuidance(denoiser, clf, s, denoiser.schedule, pass_cond=False))
        t0 = time.perf_counter()
        x = sample(d, denoiser.schedule, (args.n, mc["in_channels"], mc["image_size"], mc["image_size"]),
                   sampler=args.sampler, steps=args.steps, cond=labels, seed=0)
        wall = time.perf_counter() - t0
        f, z = judge(to_uint8(x))
        res = score(judge, FeatureSet(f, z, {"kind": "samples", "n": args.n}, labels), ref, ("fid", "pr"))
        row = {"scale": s, "agreement": res["scores"]["class_agreement"], "fid": res["scores"]["fid"],
               "precision": res["scores"]["precision"], "recall": res["scores"]["recall"], "seconds": wall}
        rows.append(row)
        print(f"{s:>6g} {100 * row['agreement']:>9.1f}% {row['fid']:>8.3f} {row['recall']:>7.3f} {wall:>8.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "noisy_classifier": report, "sampler": args.sampler,
                               "steps": args.steps, "n": args.n, "unconditional_denoiser": True, "rows": rows},
                              indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
