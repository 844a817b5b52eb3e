"""How well does a trained ControlNet steer its base? Held-out control maps, samples with and without control from
the same noise, and whether the condition (class / prompt) still holds.

    python benchmarks/controlnet_eval.py --checkpoint runs/mnist-canny -n 500 \
        --classifier weights/classifier-mnist.safetensors --grid docs/images/controlnet-mnist.png
    python benchmarks/controlnet_eval.py --checkpoint runs/emoji-canny -n 500 --guidance 3 \
        --grid docs/images/controlnet-emoji.png

Held-out maps: the ControlNet's control type computed from images it never trained on: the test split (MNIST,
Fashion-MNIST, CIFAR-10), or for a data set without one (the emoji) the images after the run's ``--limit``.
Each map is paired with its own image's condition (the digit's class, the emoji's name), so "draw a 7 shaped like
this 7". Scores:
- edge F1 (tolerance 1 px) between the control map and the Canny edges of the sample, controlled vs not;
- class models: the domain classifier reads the class asked for (class agreement), controlled vs not;
- text models: retrieval as benchmarks/text_to_image.py (the nearest training image in pixel space has the
  prompt's caption: top-1 / top-5; shares its subcategory), controlled vs not. The control comes from the
  prompt's own image, so retrieval is expected to rise with control (it is a check that the prompt is not lost).
Prints a table, writes JSON to benchmarks/results/controlnet_<name>.json, and a grid: the maps in the top row,
then the uncontrolled samples, then controlled samples for three conditions, one column per map.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.control import control_maps, edge_f1  # noqa: E402
from kakusan.data import load_dataset, to_model_range  # noqa: E402
from kakusan.data.datasets import to_uint8  # noqa: E402
from kakusan.images import save_grid  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402


def held_out(config: dict, n: int):
    """(images uint8, labels or None, captions or None, spec, the training data) the ControlNet never trained on."""
    train = config["train"]
    spec = train["data"]
    size, channels = config["model"]["image_size"], config["model"]["in_channels"]
    if config.get("autoencoder"):
        raise SystemExit("latent ControlNets: not covered by this benchmark yet")
    name = spec.partition(":")[0]
    if name in ("mnist", "fashion-mnist", "cifar10"):
        data = load_dataset(spec, split="test", image_size=size, channels=channels)
        sl = slice(0, n)
    else:
        data = load_dataset(spec, image_size=size, channels=channels)
        start = train.get("limit")
        if not start or len(data) - start < 1:
            raise SystemExit(f"{spec} has no test split: train the ControlNet with --limit N and the images after N "
                             f"are held out")
        sl = slice(start, start + n)
    labels = None if data.labels is None else data.labels[sl]
    captions = None if data.captions is None else data.captions[sl]
    return data.images[sl], labels, captions, spec, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a ControlNet run (kakusan train --controlnet)")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--classifier", help="class models: the domain classifier (class agreement)")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sampler")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--grid", help="grid PNG path")
    ap.add_argument("--json", help="default benchmarks/results/controlnet_<run name>.json")
    args = ap.parse_args()

    pipe = Pipeline.load(args.checkpoint, device="cpu")
    from kakusan.checkpoints import read_config, resolve_checkpoint

    config = read_config(resolve_checkpoint(args.checkpoint))
    kind = config["controlnet"]["control"]
    if kind not in ("canny", "sobel", "scribble"):
        raise SystemExit(f"this benchmark computes held-out maps; the run's control is {kind!r}")
    images, labels, captions, spec, data = held_out(config, args.n)
    n = len(images)
    maps = control_maps(images, kind, seed=10_000)
    hint = (maps * 255).round().to(torch.uint8)
    if pipe.is_text:
        cond = {"prompt": list(captions)}
    else:
        cond = {"class_label": [int(c) for c in labels]}
    common = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                  batch_size=args.batch_size)
    t0 = time.perf_counter()
    plain = pipe(**cond, **common)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    steered = pipe(**cond, **common, control=hint)
    t_steered = time.perf_counter() - t0
    ref = edge_f1(maps, images)  # the held-out images themselves against their own maps (1 for canny)
    f1 = {"uncontrolled": edge_f1(maps, to_uint8(plain.images)), "controlled": edge_f1(maps, to_uint8(steered.images))}
    result = {"checkpoint": str(args.checkpoint), "base": pipe.source, "control": kind, "n": n, "data": spec,
              "sampler": plain.records[0]["sampler"], "steps": plain.records[0]["steps"], "guidance": args.guidance,
              "seed": args.seed, "edge_f1": {k: float(v.mean()) for k, v in f1.items()},
              "edge_f1_of_the_real_images": float(ref.mean()),
              "seconds": {"uncontrolled": t_plain, "controlled": t_steered}, "torch": torch.__version__}
    rows = [("edge F1 (tol. 1 px)", f1["uncontrolled"].mean().item(), f1["controlled"].mean().item())]
    if pipe.is_text:
        sys.path.insert(0, str(Path(__file__).parent))
        from text_to_image import subcategories

        sub = subcategories(spec)
        train = to_model_range(data.images).flatten(1)

        def retrieval(x):
            nearest = torch.cdist(x.flatten(1).float(), train).topk(5, largest=False).indices
            top1 = sum(data.captions[int(nearest[i, 0])] == p for i, p in enumerate(captions)) / n
            top5 = sum(p in [data.captions[int(j)] for j in nearest[i]] for i, p in enumerate(captions)) / n
            same = sum(sub.get(data.captions[int(nearest[i, 0])]) == sub.get(p) for i, p in enumerate(captions)) / n
            return {"top1": top1, "top5": top5, "subcategory": same}

        r = {"uncontrolled": retrieval(plain.images), "controlled": retrieval(steered.images)}
        result["retrieval"] = r
        for key in ("top1", "top5", "subcategory"):
            rows.append((f"retrieval {key}", r["uncontrolled"][key], r["controlled"][key]))
    elif args.classifier:
        from kakusan.metrics.features import load_extractor

        ext = load_extractor(f"classifier:{args.classifier}")
        agree = {}
        for name, gen in (("uncontrolled", plain), ("controlled", steered)):
            _, logits = ext(to_uint8(gen.images), what=name)
            agree[name] = (torch.as_tensor(logits).argmax(1) == labels).float().mean().item()
        result["class_agreement"] = agree
        result["classifier"] = args.classifier
        rows.append(("class agreement", agree["uncontrolled"], agree["controlled"]))
    print(f"\n{args.checkpoint}: {n} held-out {kind} maps of {spec}, {result['sampler']} {result['steps']} steps, "
          f"guidance {args.guidance} (the real images score edge F1 {ref.mean():.3f} against their own maps)")
    print(f"{'':>24} {'uncontrolled':>13} {'controlled':>11}")
    for name, a, b in rows:
        print(f"{name:>24} {a:>13.3f} {b:>11.3f}")

    if args.grid:  # maps, uncontrolled, then three conditions with control, one column per map
        cols = 8
        pick = torch.linspace(0, n - 1, cols).round().long()
        if pipe.is_text:
            conds = [{"prompt": [captions[int(i)] for i in pick]}] + \
                    [{"prompt": [p] * cols} for p in ("red apple", "blue heart")]
        else:
            conds = [{"class_label": [int(labels[int(i)]) for i in pick]}] + \
                    [{"class_label": [c] * cols} for c in (3, 8)]
        grid_common = {**common, "batch_size": cols}
        rows_img = [to_model_range(hint[pick]).expand(-1, pipe.image_shape[0], -1, -1),
                    pipe(**conds[0], **grid_common).images]
        rows_img += [pipe(**c, **grid_common, control=hint[pick]).images for c in conds]
        save_grid(torch.cat(rows_img), args.grid, nrow=cols)
        result["grid"] = {"path": args.grid, "rows": ["control maps", "uncontrolled, own condition",
                                                      "controlled, own condition"] +
                          [f"controlled, {next(iter(c.values()))[0]}" for c in conds[1:]]}
        print(f"grid: {args.grid}")
    out = Path(args.json or Path(__file__).parent / "results" / f"controlnet_{Path(args.checkpoint).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
