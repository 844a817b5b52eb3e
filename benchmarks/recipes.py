"""Training recipes and guidance compared on one footing: classifier-feature FID and class agreement of samples
from several checkpoints / samplers / guidance settings, against one set of reference features.

    python benchmarks/recipes.py --name edm-mnist --ref mnist:../shared/data/mnist \
        --extractor classifier:weights/classifier-mnist.safetensors -n 2000 \
        --row "label=current,ckpt=runs/mnist-base,sampler=unipc-2,steps=20,guidance=2" \
        --row "label=edm,ckpt=runs/mnist-edm,sampler=heun,steps=18,guidance=2" \
        --row "label=auto,ckpt=runs/mnist-edm,guide=runs/mnist-edm/checkpoints/step-00000500,guidance=2"

A row is comma-separated key=value: label, ckpt (required), sampler, steps, guidance (none: unguided), guide
(autoguidance: the guiding checkpoint). Every row samples the same seed, n samples balanced over the classes.
Prints a table and writes JSON (each row's full provenance record from kakusan.metrics) to
benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.metrics.evaluate import FeatureSet, generate, nan_to_none, reference_features, score  # noqa: E402
from kakusan.metrics.features import load_extractor  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402

KEYS = ("label", "ckpt", "sampler", "steps", "guidance", "guide")


def parse_row(text: str) -> dict:
    row = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"bad --row part {part!r}: expected key=value with key one of {', '.join(KEYS)}")
        row[key] = value
    if "ckpt" not in row:
        raise SystemExit(f"--row {text!r} names no ckpt=")
    row.setdefault("label", Path(row["ckpt"]).name)
    row["steps"] = int(row["steps"]) if "steps" in row else None
    g = row.get("guidance", "none")
    row["guidance"] = None if g == "none" else float(g)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--extractor", required=True)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--row", action="append", required=True)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    rows = [parse_row(r) for r in args.row]
    extractor = load_extractor(args.extractor)
    ref = reference_features(extractor, args.ref)
    results = []
    for row in rows:
        t0 = time.perf_counter()
        pipe = Pipeline.load(row["ckpt"], device="cpu", **({"guide": row["guide"]} if row.get("guide") else {}))
        images, labels, source = generate(pipe, args.n, sampler=row.get("sampler"), steps=row["steps"],
                                          guidance=row["guidance"], seed=args.seed, batch_size=args.batch_size)
        feats, logits = extractor(images, device="cpu", what="samples")
        result = score(extractor, FeatureSet(feats, logits, source, labels), ref, metrics=("fid", "pr"))
        s = result["scores"]
        results.append({"row": row, "seconds": time.perf_counter() - t0, **result})
        print(f"{row['label']:>28} {source['sampler']:>8} {source['steps']:>3} steps {source['nfe']:>3} NFE "
              f"w={row['guidance']}  FID {s['fid']:7.3f}  agreement {100 * s.get('class_agreement', float('nan')):5.1f}%"
              f"  precision {s['precision']:.3f} recall {s['recall']:.3f}  ({results[-1]['seconds']:.0f} s)",
              flush=True)
    out = Path(args.out) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nan_to_none({"n": args.n, "seed": args.seed, "rows": results}), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
