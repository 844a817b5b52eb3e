"""Does bf16 sampling cost quality? One checkpoint, the same noise, the network in fp32 and in bf16 autocast (the
sampler's arithmetic in fp32 both times), scored by classifier-feature FID against the real test split; the
spread of two fp32 seeds is the yardstick the bf16 difference is measured against. Also: how far the bf16 images
are from the fp32 ones drawn from the same noise (pixels, and whether the classifier reads the same digit).

    python benchmarks/precision_quality.py --checkpoint runs/mnist --ref mnist:../shared/data/mnist \
        --extractor classifier:weights/classifier-mnist.safetensors -n 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.metrics.evaluate import FeatureSet, generate, reference_features, score  # noqa: E402
from kakusan.metrics.features import load_extractor  # noqa: E402
from kakusan.metrics.stats import fid_from_stats  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--extractor", required=True)
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "precision_quality.json"))
    args = p.parse_args()

    ext = load_extractor(args.extractor)
    ref = reference_features(ext, args.ref, "test")
    runs = {}
    for name, precision, seed in (("fp32-seed0", "fp32", 0), ("bf16-seed0", "bf16", 0), ("fp32-seed1", "fp32", 1)):
        pipe = Pipeline.load(args.checkpoint, device="cpu", precision=precision)
        t0 = time.perf_counter()
        images, labels, source = generate(pipe, args.n, sampler=args.sampler, steps=args.steps,
                                          guidance=args.guidance, seed=seed, batch_size=args.batch_size)
        seconds = time.perf_counter() - t0
        feats, logits = ext(images, what=name)
        fs = FeatureSet(feats, logits, source, labels)
        s = score(ext, fs, ref, ("fid", "kid"))["scores"]
        agree = (torch.as_tensor(logits).argmax(1) == labels).float().mean().item()
        runs[name] = {"fid": s["fid"], "kid": s["kid"]["mean"], "class_agreement": agree, "seconds": seconds,
                      "images": images, "pred": torch.as_tensor(logits).argmax(1), "fs": fs, "source": source}
        print(f"{name}: FID {s['fid']:.3f}, KID {1e3 * s['kid']['mean']:.3f}e-3, read as the class asked "
              f"{100 * agree:.2f}%, {seconds:.0f} s", flush=True)

    a, b, c = runs["fp32-seed0"], runs["bf16-seed0"], runs["fp32-seed1"]
    pix = (a["images"].float() - b["images"].float()).abs()
    out = {
        "checkpoint": str(args.checkpoint), "n": args.n, "guidance": args.guidance, "source": a["source"],
        "runs": {k: {kk: vv for kk, vv in v.items() if kk in ("fid", "kid", "class_agreement", "seconds")}
                 for k, v in runs.items()},
        "fid_bf16_minus_fp32_same_noise": b["fid"] - a["fid"],
        "fid_fp32_seed1_minus_seed0": c["fid"] - a["fid"],
        "fid_between_fp32_and_bf16_samples": fid_from_stats(a["fs"].gaussian("fp32"), b["fs"].gaussian("bf16")),
        "fid_between_fp32_seeds": fid_from_stats(a["fs"].gaussian("fp32"), c["fs"].gaussian("fp32 seed 1")),
        "same_noise_pixels": {"mean_abs_grey_levels": pix.mean().item(),
                              "p99_abs": torch.quantile(pix.flatten()[::7], 0.99).item(), "max_abs": pix.max().item()},
        "same_noise_same_digit_read": (a["pred"] == b["pred"]).float().mean().item(),
        "bf16_speedup": a["seconds"] / b["seconds"],
    }
    print(json.dumps({k: v for k, v in out.items() if k not in ("source",)}, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
