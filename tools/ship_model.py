"""Ship a trained run as a named model (kakusan/shipped/NAME.safetensors + its entry in index.json).

    python tools/ship_model.py --run runs/mnist --name mnist --dtype fp16 \
        --title "class-conditional MNIST digits, 28x28 (unet-mnist)" \
        --example "kakusan sample --checkpoint mnist --class 3 --guidance 2" \
        --train-command "kakusan train --data mnist:../shared/data/mnist ..." \
        --scores benchmarks/results/shipped_mnist.json --score-label fp16

What it writes: the run's EMA weights in --dtype (``kakusan export``), and an index entry with the file's sha256 and
size, the training command, the run's steps / images / minutes (from its log.jsonl), the data set's content hash
(``ImageDataset.sha256``: the images, labels and captions as the model saw them) and the evaluation: the row of the
--scores JSON (benchmarks/recipes.py or benchmarks/text_to_image.py output) whose label is --score-label, with its
full provenance record, plus a one-line summary for ``kakusan models``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kakusan.checkpoints import export_model, read_config, resolve_checkpoint  # noqa: E402
from kakusan.data import load_dataset  # noqa: E402
from kakusan.metrics.provenance import file_sha256  # noqa: E402
from kakusan.zoo import INDEX, SHIPPED_DIR  # noqa: E402


def run_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    last = steps[-1]
    # a resumed run starts its clock again: add up each segment's last time
    total = sum(a["elapsed_s"] for a, b in zip(steps, steps[1:] + [None]) if b is None or b["elapsed_s"] < a["elapsed_s"])
    return {"steps": last["step"], "final_loss": round(last["loss"], 5), "minutes": round(total / 60, 1),
            "segments": 1 + sum(b["elapsed_s"] < a["elapsed_s"] for a, b in zip(steps, steps[1:]))}


def score_entry(path: Path, label: str) -> dict:
    data = json.loads(path.read_text())
    rows = data.get("rows")
    if rows is not None:  # benchmarks/recipes.py
        row = next((r for r in rows if r["row"]["label"] == label), None)
        if row is None:
            raise SystemExit(f"{path}: no row labelled {label!r}")
        s, src = row["scores"], row["record"]["samples"]
        summary = (f"FID {s['fid']:.2f}, {100 * s['class_agreement']:.1f}% as asked ({src['sampler']} "
                   f"{src['steps']}, w={src['guidance']:g}, n={data['n']})")
        return {"summary": summary, "file": str(path.resolve().relative_to(ROOT)), "label": label, "scores": s,
                "record": row["record"]}
    if "retrieval" in data:  # benchmarks/text_to_image.py
        r = data["retrieval"]
        summary = (f"retrieval top-1 {100 * r['top1']:.1f}%, subcategory {100 * r['subcategory']:.1f}% "
                   f"(chance {100 * data['chance']['subcategory']:.1f}%; n={data['n_prompts']})")
        return {"summary": summary, "file": str(path.resolve().relative_to(ROOT)), "label": label, "scores": r,
                "record": {k: v for k, v in data.items() if k not in ("retrieval", "grid")}}
    raise SystemExit(f"{path}: neither a recipes.py nor a text_to_image.py result")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--title", required=True)
    ap.add_argument("--example", required=True)
    ap.add_argument("--train-command", required=True)
    ap.add_argument("--scores", type=Path, action="append", default=[])
    ap.add_argument("--score-label", action="append", default=[])
    args = ap.parse_args(argv)
    ckpt = resolve_checkpoint(args.run)
    config = read_config(ckpt)
    out = export_model(ckpt, SHIPPED_DIR / f"{args.name}.safetensors", dtype=args.dtype,
                       extra={"source": f"{args.run.name}/{ckpt.name}"})
    spec = config["data"]["spec"]
    shape = config["data"]["shape"]
    data = load_dataset(spec, image_size=shape[-1], channels=shape[0])
    labels = args.score_label or ["fp16"] * len(args.scores)
    entry = {
        "name": args.name, "file": out.name, "sha256": file_sha256(out),
        "bytes": out.stat().st_size, "dtype": args.dtype, "title": args.title, "example": args.example,
        "train": {"command": args.train_command, "checkpoint": ckpt.name, **run_summary(args.run),
                  "steps": int(ckpt.name.removeprefix("step-")) if ckpt.name.startswith("step-") else None,
                  "preset": config["train"].get("preset"), "kakusan_version": config.get("kakusan_version")},
        "data": {"spec": spec, "name": data.name, "images": len(data), "sha256": data.sha256()},
        "scores": [score_entry(p, lab) for p, lab in zip(args.scores, labels)],
    }
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        entry["params"] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    models = json.loads(INDEX.read_text())["models"] if INDEX.is_file() else []
    names = [m["name"] for m in models]  # a model shipped again keeps its place in the list
    models = [entry if m["name"] == args.name else m for m in models] if args.name in names else models + [entry]
    INDEX.write_text(json.dumps({"models": models}, indent=1) + "\n")
    print(f"shipped {args.name}: {out} ({entry['bytes'] / 1e6:.2f} MB, {entry['params']:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
