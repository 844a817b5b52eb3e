"""The demo's training under other settings, several seeds each: wall and CPU time, the loss curve, and how many
samples the demo's independent classifier (an SVM on the real digits) reads as the digit asked for.

Each (row, seed) is ``kakusan.demo.run_demo`` with the row's overrides of DEMO_DEFAULTS (any TrainConfig field,
plus ``sampler`` / ``sample_steps`` for the demo's 100 samples), then a larger judge: ``--judge-n`` more samples
(an equal number per digit, another seed) with the same sampler.

    python benchmarks/demo_runs.py --name demo_precision --seeds 0,1 \\
        --row "label=fp32,precision=fp32" --row "label=bf16,precision=bf16"
    python benchmarks/demo_runs.py --name demo_budget --seeds 0,1,2 --row "label=default" --row "label=800,steps=800"

Prints a table and writes benchmarks/results/<name>.json (with every run's logged loss curve).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kakusan.demo import DEMO_DEFAULTS, judge_digits, run_demo
from kakusan.pipeline import Pipeline


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_row(text: str) -> dict:
    row = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    if "label" not in row:
        raise SystemExit(f"--row needs a label=...: {text!r}")
    return {k: (v if k == "label" else parse_value(v)) for k, v in row.items()}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_run(row: dict, seed: int, root: Path, judge_n: int) -> dict:
    overrides = {k: v for k, v in row.items() if k != "label"}
    out = root / f"{row['label']}-seed{seed}"
    load0, cpu0 = os.getloadavg(), cpu_seconds()
    t0 = time.perf_counter()
    r = run_demo(out, seed=seed, progress=False, **overrides)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    load1 = os.getloadavg()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    result = {"label": row["label"], "seed": seed, "overrides": overrides, "steps": r["steps"],
              "sampler": r["sampler"], "sample_steps": r["sample_steps"], "agreement_demo": r["agreement"],
              "train_s": r["train_s"], "sample_s": r["sample_s"], "demo_wall_s": wall, "demo_cpu_s": cpu,
              "loadavg_1min_before_after": [load0[0], load1[0]],
              "images_per_s_median": statistics.median(e["images_per_s"] for e in log),
              "loss_curve": [[e["step"], e["loss"]] for e in log]}
    if judge_n:
        pipe = Pipeline.load(r["checkpoint"], device="cpu")
        labels = torch.arange(pipe.num_classes).repeat_interleave(judge_n // pipe.num_classes)
        gen = pipe(class_label=labels.tolist(), sampler=overrides.get("sampler"),
                   steps=overrides.get("sample_steps"), guidance=DEMO_DEFAULTS["guidance"], seed=1000 + seed,
                   batch_size=500)
        result["judge_n"] = len(labels)
        result["agreement_judge"] = judge_digits(gen.images, labels)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--row", action="append", required=True, help="label=NAME,field=value,... (DEMO_DEFAULTS overrides)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--judge-n", type=int, default=1000, help="extra samples to judge per run (0: none)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [parse_row(r) for r in args.row]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for row in rows:
            for seed in seeds:
                res = one_run(row, seed, root, args.judge_n)
                results.append(res)
                print(json.dumps({k: v for k, v in res.items() if k != "loss_curve"}), flush=True)
    print(f"\n| row | seed | steps | train s | img/s | loss first / last 500 steps | demo (100) | judge ({args.judge_n}) | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        curve = r["loss_curve"]
        late = [loss for step, loss in curve if step > r["steps"] - 500]
        print(f"| {r['label']} | {r['seed']} | {r['steps']} | {r['train_s']:.1f} | {r['images_per_s_median']:.0f} "
              f"| {curve[0][1]:.4f} / {statistics.mean(late):.4f} | {100 * r['agreement_demo']:.0f}% "
              f"| {100 * r.get('agreement_judge', float('nan')):.1f}% "
              f"| {r['loadavg_1min_before_after'][0]:.2f}-{r['loadavg_1min_before_after'][1]:.2f} |")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "demo_defaults": DEMO_DEFAULTS, "seeds": seeds, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    path = Path(args.out) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
