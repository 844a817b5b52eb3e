"""Text-to-image on the captioned emoji: a prompt grid and a retrieval check of a trained text model.

    python benchmarks/text_to_image.py --checkpoint runs/emoji --guidance 3

1. A grid of 16 prompts (8 captions seen in training, 8 new combinations), 4 samples each, one column per prompt.
2. Retrieval: one sample for every distinct training caption (or --n-prompts of them, evenly spread); the
   training image nearest to it (L2 in pixel space, RGB at the model's resolution, values in [-1, 1]) is looked
   up, and the check asks whether that image's caption is the prompt (top-1, and within the 5 / 10 nearest), and
   whether it shares the prompt's emoji subcategory (from captions.jsonl; 99 subcategories). The chance rates come
   from the same samples matched against shuffled prompts.
Prints a table and writes JSON (with the grid's prompts) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import torch

from kakusan.conditioning import encoder_for_checkpoint
from kakusan.data import load_dataset, to_model_range
from kakusan.diffusion import ClippedDenoiser
from kakusan.guidance import ClassifierFreeGuidance
from kakusan.images import save_grid
from kakusan.samplers import sample
from kakusan.checkpoints import load_denoiser

SEEN = ["red apple", "grinning face", "dog face", "blue heart", "rocket", "snowman", "fire", "banana"]
NEW = ["blue apple", "purple banana", "green dog face", "red rocket", "blue fire", "yellow snowman", "pink ghost",
       "grinning dog face"]


def subcategories(spec: str) -> dict[str, str]:
    """caption -> subcategory, read from the emoji set's captions.jsonl (folder or archive)."""
    path = Path(spec.partition(":")[2])
    if path.is_dir():
        lines = next(path.rglob("captions.jsonl")).read_text().splitlines()
    else:
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("captions.jsonl"))
            lines = tar.extractfile(member).read().decode().splitlines()
    return {r["name"]: r.get("subcategory", "") for r in map(json.loads, filter(str.strip, lines))}


def generate(d, schedule, encoder, prompts, shape, null, args, seed) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i:i + args.batch_size]
        cond = encoder.encode(chunk)
        g = ClassifierFreeGuidance(d, args.guidance, null)
        out.append(sample(g, schedule, (len(chunk), *shape), sampler=args.sampler, steps=args.steps, cond=cond,
                          seed=seed + i))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", help="the training data spec (default: the checkpoint's)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--sampler", default="unipc-2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-prompts", type=int, default=0, help="0: every distinct training caption")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--grid", default="docs/images/emoji-text-to-image.png")
    ap.add_argument("--out", default="benchmarks/results/text_to_image.json")
    args = ap.parse_args()

    denoiser, config = load_denoiser(args.checkpoint)
    encoder = encoder_for_checkpoint(config["text_encoder"])
    spec = args.data or config["data"]["spec"]
    mc = config["model"]
    shape = (mc["in_channels"], mc["image_size"], mc["image_size"])
    data = load_dataset(spec, image_size=mc["image_size"], channels=mc["in_channels"])
    d = ClippedDenoiser(denoiser)
    null = encoder.encode("")
    seen_captions = set(data.captions)

    # 1. the grid: one row per prompt
    grid_prompts = SEEN + NEW
    t0 = time.perf_counter()
    x = generate(d, denoiser.schedule, encoder, grid_prompts * 4, shape, null, args, 0)
    save_grid(x, args.grid, nrow=len(grid_prompts))  # one column per prompt
    print(f"grid of {len(grid_prompts)} prompts x 4: {args.grid} ({time.perf_counter() - t0:.0f} s)")

    # 2. retrieval
    unique = sorted(seen_captions)
    if args.n_prompts:
        unique = [unique[i] for i in torch.linspace(0, len(unique) - 1, args.n_prompts).round().long()]
    t0 = time.perf_counter()
    samples = generate(d, denoiser.schedule, encoder, unique, shape, null, args, 10_000)
    wall = time.perf_counter() - t0
    train = to_model_range(data.images).flatten(1)
    dist = torch.cdist(samples.flatten(1).float(), train)  # (n prompts, n train)
    nearest = dist.topk(10, largest=False).indices
    captions = data.captions
    sub = subcategories(spec)
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(0))

    def rates(prompts):
        top = {k: sum(p in [captions[j] for j in nearest[i, :k]] for i, p in enumerate(prompts)) / len(prompts)
               for k in (1, 5, 10)}
        same_sub = sum(sub.get(captions[int(nearest[i, 0])]) == sub.get(p) for i, p in enumerate(prompts))
        return {"top1": top[1], "top5": top[5], "top10": top[10], "subcategory": same_sub / len(prompts)}

    got, chance = rates(unique), rates([unique[int(j)] for j in perm])
    print(f"\nretrieval: {len(unique)} seen prompts, guidance {args.guidance}, {args.sampler} {args.steps} steps, "
          f"nearest training image in pixel space ({wall:.0f} s of sampling)")
    print(f"{'':>22} {'top-1':>7} {'top-5':>7} {'top-10':>7} {'subcategory':>12}")
    for name, r in (("prompted samples", got), ("shuffled prompts", chance)):
        print(f"{name:>22} {100 * r['top1']:>6.1f}% {100 * r['top5']:>6.1f}% {100 * r['top10']:>6.1f}% "
              f"{100 * r['subcategory']:>11.1f}%")
    result = {"checkpoint": str(args.checkpoint), "train_config": config["train"],
              "text_encoder": config["text_encoder"], "guidance": args.guidance, "sampler": args.sampler,
              "steps": args.steps, "feature_space": f"pixels {shape}, L2, [-1, 1]", "n_prompts": len(unique),
              "retrieval": got, "chance": chance, "sample_seconds": wall,
              "grid": {"path": args.grid, "seen": SEEN, "new": NEW,
                       "seen_in_training": [p in seen_captions for p in grid_prompts]},
              "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
