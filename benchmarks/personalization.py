"""How much of a subject do textual inversion and DreamBooth put into a text model's samples?

    python benchmarks/personalization.py --base runs/emoji-nocat --ti runs/catface-ti --ti-prompt "<cat-face>" \
        --db runs/catface-db --db-prompt "sks cat face" --subject folder:catface --data emoji:PATH \
        --base-prompt "cat face" --base-prompt "grinning face" -n 64 --grid docs/images/personalization-emoji.png

Subject fidelity: images as vectors (pixels in [-1, 1] at the model's size) minus the mean image of the whole data
set (so the white background and the average emoji do not count), and the cosine similarity of each sample to
each subject image; the score is its mean over samples and subject images. The same score against as many other
emoji of the data set (a fixed random draw, the subject excluded) is the control: a sample that looks like "an
emoji" gets both; one that looks like the subject gets more of the first. Rows: the subject images themselves
(each against the others: the ceiling), the base model with plain prompts, the textual-inversion word, the
DreamBooth model with its instance prompt. UniPC-2 20 steps, the given guidance. Prints a table, writes JSON and a
grid (one row per method, the subject on top).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.data import load_dataset, to_model_range  # noqa: E402
from kakusan.images import save_grid  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402


def centred(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(N, D) unit vectors of images (N, C, H, W) in [-1, 1] minus the data set's mean image."""
    return torch.nn.functional.normalize((x - mean).flatten(1), dim=1)


def fidelity(samples: torch.Tensor, refs: torch.Tensor, mean: torch.Tensor, leave_one_out: bool = False) -> float:
    sims = centred(samples, mean) @ centred(refs, mean).T  # (N, M)
    if leave_one_out:
        sims = sims[~torch.eye(len(sims), dtype=torch.bool)]
    return sims.mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--base-prompt", action="append", default=[])
    p.add_argument("--ti", help="a textual-inversion run (its base is --base)")
    p.add_argument("--ti-prompt", action="append", default=[])
    p.add_argument("--db", help="a DreamBooth run")
    p.add_argument("--db-prompt", action="append", default=[])
    p.add_argument("--subject", required=True, help="the subject's images (folder:DIR)")
    p.add_argument("--data", required=True, help="the whole data set (its mean image; the control images)")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/personalization_emoji.json")
    p.add_argument("--grid")
    a = p.parse_args()

    base = Pipeline.load(a.base, device="cpu")
    c, h, _ = base.image_shape
    data = load_dataset(a.data, image_size=h, channels=c)
    subject = to_model_range(load_dataset(a.subject, image_size=h, channels=c).images)
    mean = to_model_range(data.images).mean(0, keepdim=True)
    g = torch.Generator().manual_seed(0)
    others = to_model_range(data.images[torch.randperm(len(data), generator=g)[:len(subject)]])
    rows = [{"method": "the subject images (each against the others)", "prompt": None,
             "subject": fidelity(subject, subject, mean, True), "others": fidelity(subject, others, mean)}]
    grid = [subject[: min(len(subject), 8)]]
    runs = [("base", base, q) for q in a.base_prompt]
    if a.ti:
        ti = Pipeline.load(a.ti, device="cpu")
        runs += [("textual inversion", ti, q) for q in a.ti_prompt]
    if a.db:
        db = Pipeline.load(a.db, device="cpu")
        runs += [("DreamBooth", db, q) for q in a.db_prompt]
    for name, pipe, prompt in runs:
        t0 = time.perf_counter()
        x = pipe(prompt=prompt, n=a.n, guidance=a.guidance, seed=a.seed).images
        rows.append({"method": name, "prompt": prompt, "subject": fidelity(x, subject, mean),
                     "others": fidelity(x, others, mean), "sample_s": time.perf_counter() - t0})
        grid.append(x[:8])
    print(f"{'method':<46} {'prompt':<18} {'subject':>8} {'others':>8}")
    for r in rows:
        print(f"{r['method']:<46} {str(r['prompt']):<18} {r['subject']:8.3f} {r['others']:8.3f}")
    out = {"rows": rows, "n": a.n, "guidance": a.guidance, "seed": a.seed, "base": a.base, "ti": a.ti, "db": a.db,
           "subject": a.subject, "data": a.data, "image_size": h}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    if a.grid:
        save_grid(torch.cat([torch.cat([r, torch.ones(8 - len(r), *r.shape[1:])]) for r in grid]), a.grid, nrow=8,
                  min_size=512)
        print(f"grid: {a.grid}")


if __name__ == "__main__":
    main()
