"""Prompt experiments on a text model (default: the shipped emoji model), measured in colour where the eye would
look: does a colour word move the colour, does a negative prompt take it away, does more guidance push harder?

    python benchmarks/prompt_experiments.py --checkpoint emoji --out benchmarks/results/prompt_experiments.json

1. Colour words: for each object, "red OBJECT" and "blue OBJECT", n samples each from the same noises; the
   score is the mean of (R - B) over the pixels that are not background (the emoji are on white), red prompt
   minus blue prompt. Positive: the word moved the colour the way it says.
2. Detail: "face" -> "smiling face" -> "smiling face with sunglasses": the mean pixel distance of each to the
   previous from the same noise (how much each added word changes the picture), and a grid.
3. Negative prompt: "face" with and without --negative-prompt "yellow", the same noises; the score is the mean
   yellowness ((R + G) / 2 - B over non-background pixels).
4. Guidance scale: the colour-word gap of 1. at w = 1, 2, 3, 5, 7.5.
Grids go to docs/images/prompt-*.png. Every pipeline call's record is kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.images import save_grid  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402

OBJECTS = ["heart", "apple", "car", "circle", "square", "flower", "book", "balloon"]


def foreground(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1, H, W) mask of pixels that are not the white background."""
    return (x.min(1, keepdim=True).values < 0.8).float()


def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (v * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1)


def red_minus_blue(x: torch.Tensor) -> torch.Tensor:
    return masked_mean((x[:, :1] - x[:, 2:3]), foreground(x))


def yellowness(x: torch.Tensor) -> torch.Tensor:
    return masked_mean(((x[:, :1] + x[:, 1:2]) / 2 - x[:, 2:3]), foreground(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="emoji")
    ap.add_argument("-n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--scales", default="1,2,3,5,7.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", default="docs/images")
    ap.add_argument("--out", default="benchmarks/results/prompt_experiments.json")
    args = ap.parse_args(argv)
    pipe = Pipeline.load(args.checkpoint)
    t0 = time.perf_counter()
    records = []

    def run(prompts, guidance=args.guidance, **kw):
        out = pipe(prompt=[p for p in prompts for _ in range(args.n)], steps=args.steps, guidance=guidance,
                   seed=args.seed, **kw)
        records.append(out.record)
        return out.images.float()

    def colour_gap(guidance):
        x = run([f"{c} {o}" for o in OBJECTS for c in ("red", "blue")], guidance)
        rb = red_minus_blue(x).view(len(OBJECTS), 2, args.n)
        return x, (rb[:, 0] - rb[:, 1]).mean(1)  # per object: red prompt minus blue prompt

    result = {"checkpoint": args.checkpoint, "weights_sha256": pipe.weights_sha256, "n": args.n,
              "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    # 1. colour words
    x, gap = colour_gap(args.guidance)
    k = min(4, args.n)  # one row per object: k samples of "red OBJECT", then k of "blue OBJECT"
    save_grid(x.view(2 * len(OBJECTS), args.n, *x.shape[1:])[:, :k].reshape(-1, *x.shape[1:]),
              Path(args.images) / "prompt-colour-words.png", nrow=2 * k)
    result["colour_words"] = {"objects": OBJECTS, "red_minus_blue_gap": gap.tolist(), "mean": gap.mean().item(),
                              "objects_the_right_way": int((gap > 0).sum())}
    print(f"colour words (w={args.guidance:g}): (R-B) gap red-vs-blue prompt, mean {gap.mean():.3f}, "
          f"{int((gap > 0).sum())}/{len(OBJECTS)} objects the right way: "
          + ", ".join(f"{o} {g:+.2f}" for o, g in zip(OBJECTS, gap.tolist())))
    # 2. detail
    chain = ["face", "smiling face", "smiling face with sunglasses"]
    xs = [run([p]) for p in chain]
    steps = [(xs[i] - xs[i - 1]).pow(2).mean((1, 2, 3)).sqrt().mean().item() for i in range(1, len(xs))]
    save_grid(torch.cat(xs), Path(args.images) / "prompt-detail.png", nrow=args.n)
    result["detail"] = {"prompts": chain, "rms_change_per_added_words": steps}
    print(f"detail: RMS pixel change {' -> '.join(chain)}: " + ", ".join(f"{s:.3f}" for s in steps))
    # 3. negative prompt
    plain = run(["face"])
    neg = run(["face"], negative_prompt="yellow")
    save_grid(torch.cat([plain, neg]), Path(args.images) / "prompt-negative.png", nrow=args.n)
    y0, y1 = yellowness(plain).mean().item(), yellowness(neg).mean().item()
    result["negative_prompt"] = {"prompt": "face", "negative": "yellow", "yellowness_without": y0,
                                 "yellowness_with": y1}
    print(f"negative prompt: 'face' yellowness {y0:.3f} without, {y1:.3f} with --negative-prompt yellow")
    # 4. guidance scale
    scales = [float(s) for s in args.scales.split(",")]
    gaps = {}
    for w in scales:
        _, g = colour_gap(w)
        gaps[w] = g.mean().item()
        print(f"guidance {w:g}: colour-word gap {gaps[w]:.3f}", flush=True)
    result["guidance_scale"] = {"scales": scales, "colour_word_gap": [gaps[w] for w in scales]}
    result["seconds"] = time.perf_counter() - t0
    result["records"] = records
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
