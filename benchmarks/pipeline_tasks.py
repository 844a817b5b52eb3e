"""What the pipeline's image-to-image tasks do on real digits: inpainting, img2img and inversion, measured.

    python benchmarks/pipeline_tasks.py --checkpoint runs/mnist --data mnist:../shared/data/mnist \
        --judge weights/classifier-mnist.safetensors --out benchmarks/results/pipeline-mnist.json --grids docs/images

On a class-conditional MNIST model and the MNIST test split:
- inpainting the lower half of N test digits, conditioned on their true class: the share the domain classifier
  reads as that class, against the same digits with the lower half filled with noise (the chance level), and
  the mean absolute jump across the mask border against the same statistic inside real digits;
- img2img at strengths 0.3 / 0.5 / 0.8 towards another class ((y + 1) mod 10): agreement with the new class and
  mean absolute distance to the input;
- DDIM inversion -> regeneration at 20 / 50 / 100 steps without guidance: PSNR to the input.
Prints a table, writes JSON (with the settings and times), and grids of each task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kakusan.data import load_dataset, to_model_range  # noqa: E402
from kakusan.images import save_grid  # noqa: E402
from kakusan.metrics.classifier import load_classifier  # noqa: E402
from kakusan.metrics.stats import psnr  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402


@torch.no_grad()
def judge(clf, images_u8: torch.Tensor) -> torch.Tensor:
    """The domain classifier's predicted class of uint8 images."""
    out = []
    for i in range(0, len(images_u8), 500):
        logits = clf(to_model_range(images_u8[i:i + 500]))
        out.append((logits[0] if isinstance(logits, tuple) else logits).argmax(1))
    return torch.cat(out)


def border_jump(u8: torch.Tensor, row: int) -> float:
    """Mean |x[row - 1] - x[row]| over the images (in [0, 1] units): the seam between rows row-1 and row."""
    x = u8.float() / 255
    return (x[:, :, row - 1] - x[:, :, row]).abs().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--judge", required=True, help="the domain classifier (kakusan train-classifier)")
    ap.add_argument("--n-inpaint", type=int, default=1000)
    ap.add_argument("--n-img2img", type=int, default=1000)
    ap.add_argument("--n-invert", type=int, default=500)
    ap.add_argument("--guidance", type=float, default=2.0, help="for inpainting and img2img")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps for inpainting and img2img")
    ap.add_argument("--invert-steps", default="20,50,100")
    ap.add_argument("--iterations", type=int, default=2, help="inversion fixed-point refinements per step")
    ap.add_argument("--resample-steps", type=int, default=1, help="inpainting: RePaint's resampling")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default="benchmarks/results/pipeline-mnist.json")
    ap.add_argument("--grids", help="folder for the grids (16 examples each)")
    ap.add_argument("--only", default="inpaint,img2img,invert")
    args = ap.parse_args()

    pipe = Pipeline.load(args.checkpoint, device="cpu", precision=args.precision)
    clf, report = load_classifier(args.judge)
    test = load_dataset(args.data, split="test")
    x, y = test.images, test.labels
    c, h, w = pipe.image_shape
    results = {"checkpoint": pipe.source, "checkpoint_sha256": pipe.weights_sha256, "data": args.data,
               "judge": args.judge, "judge_test_accuracy": report.get("test_accuracy"), "settings": vars(args)}
    grids = Path(args.grids) if args.grids else None
    only = set(args.only.split(","))
    g = torch.Generator().manual_seed(0)

    if "inpaint" in only:
        n = args.n_inpaint
        xs, ys = x[:n], y[:n]
        mask = torch.zeros(n, 1, h, w)
        mask[:, :, h // 2:] = 1  # the lower half
        t0 = time.perf_counter()
        gen = pipe(init_image=xs, mask=mask, class_label=ys.tolist(), guidance=args.guidance, steps=args.steps,
                   resample_steps=args.resample_steps, batch_size=args.batch_size, seed=0)
        dt = time.perf_counter() - t0
        done = gen.uint8()
        noisy = xs.clone()
        noisy[:, :, h // 2:] = torch.randint(0, 256, noisy[:, :, h // 2:].shape, generator=g, dtype=torch.uint8)
        results["inpaint"] = {
            "n": n, "sampler": gen.record["sampler"], "steps": args.steps, "guidance": args.guidance,
            "resample_steps": args.resample_steps,
            "seconds": dt,
            "agreement": (judge(clf, done) == ys).float().mean().item(),
            "agreement_noise_filled": (judge(clf, noisy) == ys).float().mean().item(),
            "agreement_real": (judge(clf, xs) == ys).float().mean().item(),
            "border_jump": border_jump(done, h // 2), "border_jump_real": border_jump(xs, h // 2),
            "jump_real_other_rows": sum(border_jump(xs, r) for r in range(h // 2 - 3, h // 2 + 4)) / 7}
        if grids:
            save_grid(torch.cat([xs[:16], (xs[:16] * (1 - mask[:16])).to(torch.uint8), done[:16]]),
                      grids / f"inpaint-mnist-lower-half{'' if args.resample_steps == 1 else f'-u{args.resample_steps}'}.png",
                      nrow=16)

    if "img2img" in only:
        n = args.n_img2img
        xs, ys = x[:n], y[:n]
        target = (ys + 1) % 10
        rows, rec = [xs[:16]], {}
        for s in (0.3, 0.5, 0.8):
            t0 = time.perf_counter()
            gen = pipe(init_image=xs, strength=s, class_label=target.tolist(), guidance=args.guidance,
                       steps=args.steps, batch_size=args.batch_size, seed=0)
            done = gen.uint8()
            rec[str(s)] = {"seconds": time.perf_counter() - t0,
                           "agreement_new_class": (judge(clf, done) == target).float().mean().item(),
                           "agreement_old_class": (judge(clf, done) == ys).float().mean().item(),
                           "mean_abs_distance": (done.float() - xs.float()).abs().mean().item() / 255}
            rows.append(done[:16])
        results["img2img"] = {"n": n, "steps": args.steps, "guidance": args.guidance, "target": "(y + 1) mod 10",
                              "by_strength": rec}
        if grids:
            save_grid(torch.cat(rows), grids / "img2img-mnist-strengths.png", nrow=16)

    if "invert" in only:
        n = args.n_invert
        xs, ys = x[:n], y[:n]
        rec, rows = {}, [xs[:16]]
        for steps in [int(v) for v in args.invert_steps.split(",")]:
            t0 = time.perf_counter()
            inv = pipe.invert(xs, class_label=ys.tolist(), steps=steps, iterations=args.iterations)
            t1 = time.perf_counter()
            back = pipe(noise=inv.noise, **{**inv.regenerate, "batch_size": args.batch_size}).uint8()
            p = psnr(back, xs)
            rec[str(steps)] = {"psnr_mean": p.mean().item(), "psnr_median": p.median().item(),
                               "psnr_min": p.min().item(), "invert_seconds": t1 - t0,
                               "regenerate_seconds": time.perf_counter() - t1, "max_residual": inv.residual}
            rows.append(back[:16])
        results["invert"] = {"n": n, "iterations": args.iterations, "guidance": None, "by_steps": rec}
        if grids:
            save_grid(torch.cat(rows), grids / "invert-mnist-regenerated.png", nrow=16)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if "inpaint" in results:
        r = results["inpaint"]
        print(f"inpainting lower halves (n={r['n']}, {r['sampler']} {r['steps']} steps, w={r['guidance']}): "
              f"class agreement {100 * r['agreement']:.1f}% (noise-filled {100 * r['agreement_noise_filled']:.1f}%, "
              f"real {100 * r['agreement_real']:.1f}%); border jump {r['border_jump']:.4f} vs "
              f"{r['border_jump_real']:.4f} in real digits; {r['seconds']:.0f} s")
    if "img2img" in results:
        for s, r in results["img2img"]["by_strength"].items():
            print(f"img2img strength {s}: new class {100 * r['agreement_new_class']:.1f}%, old class "
                  f"{100 * r['agreement_old_class']:.1f}%, mean |x - input| {r['mean_abs_distance']:.4f}; "
                  f"{r['seconds']:.0f} s")
    if "invert" in results:
        for st, r in results["invert"]["by_steps"].items():
            print(f"inversion {st} steps: PSNR mean {r['psnr_mean']:.2f} dB (median {r['psnr_median']:.2f}, "
                  f"min {r['psnr_min']:.2f}); {r['invert_seconds']:.0f} + {r['regenerate_seconds']:.0f} s")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
