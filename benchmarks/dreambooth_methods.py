"""DreamBooth with and without prior preservation, DreamBooth + LoRA and textual inversion on one base, judged by
``kakusan eval --subject`` (subject fidelity, prior drift against the base), with what each run trained, its time
and the file it shares; one grid per method (the subject prompt and two recontextualised prompts).

The base and the runs are made first (the commands are in docs/RESULTS.md, section "DreamBooth with and without
prior preservation, and with LoRA"): a base text model trained without the cat emoji (``runs/emoji16-nocat``),
then one run per method on the 10 cat-face emoji. This script only evaluates them:

    python benchmarks/dreambooth_methods.py --base runs/emoji16-nocat --subject catface \
        --run "DreamBooth, prior preservation=runs/catface-db-prior" \
        --run "DreamBooth, no prior preservation=runs/catface-db-noprior" \
        --run "DreamBooth + LoRA r8, prior preservation=runs/catface-db-lora" \
        --ti "textual inversion, 4 vectors=runs/catface-ti" \
        --extractor classifier:weights/classifier-cifar10.safetensors

A run is NAME=RUN_FOLDER; ``--ti`` runs are sampled as the base with their learned_embeds.safetensors and the
placeholder in place of "sks cat face". Writes benchmarks/results/dreambooth_methods.json and
docs/images/dreambooth-<method>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.checkpoints import resolve_checkpoint  # noqa: E402
from kakusan.cli import main as kakusan  # noqa: E402
from kakusan.data import to_model_range  # noqa: E402
from kakusan.images import save_grid  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402

INSTANCE = "sks cat face"
RECONTEXT = ("sks cat face with sunglasses", "sleeping sks cat face")


def trained(ckpt: Path, config: dict) -> tuple[int, Path]:
    """(numbers trained, the file a run shares) of a run's checkpoint."""
    from safetensors.torch import load_file

    weights = load_file(ckpt / "model.safetensors")
    if "textual_inversion" in config:
        return sum(v.numel() for v in weights.values()), ckpt / "learned_embeds.safetensors"
    if "lora" in config:  # (the checkpoint holds the whole adapted model: its adapters trained)
        return sum(v.numel() for k, v in weights.items() if ".lora_" in k), ckpt / "lora.safetensors"
    return sum(v.numel() for v in weights.values()), ckpt / "ema.safetensors"


def minutes(run: Path) -> float:
    last = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()][-1]
    return last["elapsed_s"] / 60


def eval_subject(out: Path, checkpoint, prompt: str, a, extra=()) -> dict:
    args = ["eval", "--checkpoint", str(checkpoint), "--subject", a.subject, "--extractor", a.extractor,
            "--prompt", prompt, "-n", str(a.n), "--guidance", str(a.guidance), "--seed", "0",
            "--base", a.base, "--precision", "fp32", "--out", str(out), *extra]
    if kakusan(args) != 0:
        raise SystemExit(f"eval failed: {' '.join(args)}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--subject", required=True, help="the subject's images (a folder)")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN (DreamBooth runs)")
    p.add_argument("--ti", action="append", default=[], help="NAME=RUN (textual-inversion runs)")
    p.add_argument("--extractor", required=True)
    p.add_argument("--class-prompt", default="cat face", help="the base's 'before' row samples this prompt")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--json", default="benchmarks/results/dreambooth_methods.json")
    p.add_argument("--grids", default="docs/images")
    a = p.parse_args()
    tmp = Path(a.json).with_suffix("")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    before = eval_subject(tmp / "base.json", a.base, a.class_prompt, a)
    rows.append({"method": f"base, '{a.class_prompt}' (before)", "scores": before["scores"], "trained": 0,
                 "minutes": None, "file_bytes": None})
    methods = [(n, r, False) for n, r in (s.split("=", 1) for s in a.run)] + \
              [(n, r, True) for n, r in (s.split("=", 1) for s in a.ti)]
    for name, run, is_ti in methods:
        ckpt = resolve_checkpoint(run)
        config = json.loads((ckpt / "config.json").read_text())
        numel, shared = trained(ckpt, config)
        slug = Path(run).name
        if is_ti:
            word = config["textual_inversion"]["placeholder"]
            prompts = [INSTANCE.replace("sks cat face", word)] + [q.replace("sks cat face", word) for q in RECONTEXT]
            res = eval_subject(tmp / f"{slug}.json", a.base, prompts[0], a, ["--embedding", str(shared)])
            pipe = Pipeline.load(a.base, device="cpu", precision="fp32", embedding=shared)
        else:
            prompts = [INSTANCE, *RECONTEXT]
            res = eval_subject(tmp / f"{slug}.json", run, prompts[0], a)
            pipe = Pipeline.load(run, device="cpu", precision="fp32")
        class_row = None
        if not is_ti:  # what became of the class prompt itself (prior preservation keeps it the base's)
            class_row = eval_subject(tmp / f"{slug}-class.json", run, a.class_prompt, a)["scores"]["subject_fidelity"]
        rows.append({"method": name, "run": run, "prompt": prompts[0], "scores": res["scores"], "trained": numel,
                     "minutes": minutes(Path(run)), "file": str(shared), "file_bytes": shared.stat().st_size,
                     "class_prompt_subject_fidelity": class_row})
        gen = pipe(prompt=[q for q in prompts for _ in range(8)], guidance=a.guidance, seed=0)
        grid = Path(a.grids) / f"dreambooth-{slug}.png"
        save_grid(to_model_range(gen.uint8()), grid, nrow=8)
        rows[-1]["grid"] = str(grid)
        rows[-1]["grid_prompts"] = prompts
    print("| method | subject fidelity | class prompt's fidelity | prior drift (RMS px / feature) | trained | "
          "minutes | file |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, d = r["scores"], r["scores"]["prior_drift"]
        drift = f"{d['pixel_rms']:.3f} / {d['feature_cosine_distance']:.4f}" if d else "-"
        cls = f"{r['class_prompt_subject_fidelity']:.3f}" if r.get("class_prompt_subject_fidelity") is not None \
            else "-"
        mins = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        size = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e3:,.1f} kB"
        print(f"| {r['method']} | {s['subject_fidelity']:.3f} | {cls} | {drift} | {r['trained']:,} | {mins} | "
              f"{size} |")
    self_sim = before["scores"]["subject_self_similarity"]
    print(f"the subject's images among themselves: {self_sim:.3f}")
    Path(a.json).write_text(json.dumps({"rows": rows, "subject_self_similarity": self_sim,
                                        "extractor": a.extractor, "n": a.n, "guidance": a.guidance}, indent=2))
    print(f"json: {a.json}")


if __name__ == "__main__":
    main()
