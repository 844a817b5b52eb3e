"""kakusan's default against diffusers' best on this CPU, in one run: sampling (per model evaluation and a whole
20-step sampler) and training steps, for the U-Net presets (and a DiT, kakusan only: diffusers has no DiT of the
same configuration to build), with the CPU's own matmul peak measured in the same run.

Every configuration runs in a fresh process (so its peak resident memory is its own), one after another:
- kakusan ``default``: what ``Pipeline.load`` / ``kakusan train`` do with ``--precision auto`` (bf16 autocast on a
  CPU with native bf16, fp32 elsewhere), eager; ``fp32``: the old CPU default; ``default+compile``: ``--compile``
  (Denoiser.compile with frozen weights, the pipeline's path; for training, torch.compile of the network);
- diffusers' UNet2DModel built with the same architecture (benchmarks/train_throughput.py), in ``fp32``,
  ``bf16`` (autocast), ``bf16+cl`` (channels-last) and ``bf16+compile`` (torch.compile, frozen weights for
  sampling as kakusan's); its best row is the one compared.
Sampling: the median of --calls timed evaluations after warm-up (compile time reported apart), and one timed
whole sampler run from the same noise: kakusan's default sampler through ``kakusan.samplers.sample`` vs diffusers'
UniPC scheduler driven as its pipelines drive it. FLOPs per evaluation are counted with torch's FlopCounterMode;
"of peak" divides the achieved FLOP/s by the measured matmul peak of the precision that ran.

    python benchmarks/cpu_speed.py                                  # the full table (~40 min on 2 cores)
    python benchmarks/cpu_speed.py --presets unet-mnist --batches 16 --no-train   # one cell
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

SAMPLE_MODES = {"kakusan": ["fp32", "default", "default+compile"],
                "diffusers": ["fp32", "bf16", "bf16+cl", "bf16+compile"]}
TRAIN_MODES = {"kakusan": ["fp32", "default", "default+compile"], "diffusers": ["fp32", "bf16", "bf16+compile"]}


def matmul_peak(n: int = 2048, reps: int = 8) -> dict:
    """GFLOP/s of an n x n x n matmul in fp32 and bf16 (the best of ``reps``)."""
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        for _ in range(2):
            a @ b
        best = min(_timed(lambda: a @ b) for _ in range(reps))  # noqa: B023
        out[name] = 2 * n**3 / best / 1e9
    return out


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _precision(lib: str, mode: str, net) -> tuple[bool, bool, bool]:
    """(bf16, compile, channels_last) of a mode; kakusan's 'default' is what --precision auto resolves to here
    for this network."""
    from kakusan.diffusion import autocast_dtype

    parts = mode.split("+")
    bf16 = parts[0] == "bf16" or (parts[0] == "default" and autocast_dtype("auto", "cpu", net) is not None)
    return bf16, "compile" in parts, "cl" in parts


def _build(lib: str, preset: str):
    from kakusan.models import build_model, get_preset
    from train_throughput import diffusers_equivalent

    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = build_model(cfg) if lib == "kakusan" else diffusers_equivalent(cfg)
    for name, q in net.named_parameters():  # a trained network's zero-initialised layers are not zero: real numbers
        if q.dim() > 1 and torch.count_nonzero(q) == 0:
            torch.nn.init.normal_(q, std=0.02)
    return cfg, net


def one_sample(preset: str, batch: int, library: str, mode: str, calls: int, steps: int) -> dict:
    lib = library
    from kakusan.diffusion import Denoiser, DiffusionConfig
    from kakusan.samplers import DEFAULT_SAMPLER, sample
    from kakusan.schedules import make_schedule
    from sampling_throughput import _Forward, diffusers_sampler_loop

    cfg, net = _build(lib, preset)
    bf16, compiled, cl = _precision(lib, mode, net)
    net = net.eval()
    if cl:
        net = net.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    schedule = make_schedule("linear")
    with torch.no_grad():
        if lib == "kakusan":
            den = Denoiser(net, schedule, DiffusionConfig("eps")).set_precision("bf16" if bf16 else "fp32", "cpu")
            if compiled:
                den.compile(frozen=True)
            fwd = lambda: den.raw(x, t.float())  # noqa: E731
        else:
            f = _Forward(net, True, bf16)
            if compiled:
                f = torch.compile(f, dynamic=False, options={"freezing": True})
            xin = x.contiguous(memory_format=torch.channels_last) if cl else x
            fwd = lambda: f(xin, t)  # noqa: E731
        with FlopCounterMode(display=False) as fc:
            (_Forward(net, lib == "diffusers", False)(x, t if lib == "diffusers" else t.float()))
        flops = fc.get_total_flops()
        first = _timed(fwd)  # the compile (or the first call's warm-up)
        fwd()
        times = [_timed(fwd) for _ in range(calls)]
        wall = None
        if steps:
            if lib == "kakusan":
                wall = _timed(lambda: sample(den, schedule, tuple(x.shape), sampler=DEFAULT_SAMPLER, steps=steps,
                                             seed=0, device="cpu"))
            else:
                wall = _timed(lambda: diffusers_sampler_loop(lambda a, b: f(a, b), x.clone(), steps))
    med = statistics.median(times)
    return {"task": "sample", "preset": preset, "batch": batch, "library": lib, "mode": mode,
            "precision": "bf16" if bf16 else "fp32", "compile": compiled, "channels_last": cl,
            "ms_per_eval": med * 1e3, "first_call_s": first, "gflop_per_eval": flops / 1e9,
            "gflops": flops / med / 1e9, "sampler_steps": steps or None, "sampler_seconds": wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def one_train(preset: str, batch: int, library: str, mode: str, calls: int) -> dict:
    lib = library
    from kakusan.schedules import make_schedule
    from train_throughput import count_flops, make_step

    cfg, net = _build(lib, preset)
    bf16, compiled, _ = _precision(lib, mode, net)
    net = net.train()
    call = (lambda m, x, t: m(x, t.float())) if lib == "kakusan" else (lambda m, x, t: m(x, t).sample)
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    flops = count_flops(net, call, x0)
    fwd = torch.compile(net) if compiled else net
    # kakusan's trainer: AdamW fused on CUDA (foreach here); the peer the same
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    step = make_step(fwd, call, opt, make_schedule("linear"), x0, bf16)
    first = _timed(step)
    step()
    times = [_timed(step) for _ in range(calls)]
    med = statistics.median(times)
    return {"task": "train", "preset": preset, "batch": batch, "library": lib, "mode": mode,
            "precision": "bf16" if bf16 else "fp32", "compile": compiled, "ms_per_step": med * 1e3,
            "images_per_s": batch / med, "first_step_s": first, "gflop_per_step": flops / 1e9,
            "gflops": flops / med / 1e9, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(spec: dict, timeout: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {spec}", file=sys.stderr)
        return None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        print(f"  failed: {spec}\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def best(rows, **match):
    key = "ms_per_eval" if match.get("task") == "sample" else "ms_per_step"
    cand = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return min(cand, key=lambda r: r[key], default=None)


def summarize(rows: list[dict], presets: list[str], batches: list[int]) -> list[dict]:
    """kakusan's default and best rows against diffusers' best, per preset and batch; prints the table."""
    summary = []
    for preset in presets:
        for b in batches:
            k, d = best(rows, task="sample", preset=preset, batch=b, library="kakusan", mode="default"), \
                best(rows, task="sample", preset=preset, batch=b, library="diffusers")
            kb = best(rows, task="sample", preset=preset, batch=b, library="kakusan")
            f32 = best(rows, task="sample", preset=preset, batch=b, library="kakusan", mode="fp32")
            if k:
                summary.append({"task": "sample", "preset": preset, "batch": b,
                                "kakusan_default_ms": k["ms_per_eval"], "kakusan_best_ms": kb["ms_per_eval"],
                                "kakusan_best_mode": kb["mode"],
                                "diffusers_best_ms": d["ms_per_eval"] if d else None,
                                "diffusers_best_mode": d["mode"] if d else None,
                                "default_vs_diffusers_best": d["ms_per_eval"] / k["ms_per_eval"] if d else None,
                                "best_vs_diffusers_best": d["ms_per_eval"] / kb["ms_per_eval"] if d else None,
                                "default_vs_fp32": f32["ms_per_eval"] / k["ms_per_eval"] if f32 else None})
        k = best(rows, task="train", preset=preset, library="kakusan", mode="default")
        kb = best(rows, task="train", preset=preset, library="kakusan")
        d = best(rows, task="train", preset=preset, library="diffusers")
        if k:
            summary.append({"task": "train", "preset": preset, "batch": k["batch"],
                            "kakusan_default_img_s": k["images_per_s"], "kakusan_best_img_s": kb["images_per_s"],
                            "kakusan_best_mode": kb["mode"],
                            "diffusers_best_img_s": d["images_per_s"] if d else None,
                            "diffusers_best_mode": d["mode"] if d else None,
                            "default_vs_diffusers_best": k["images_per_s"] / d["images_per_s"] if d else None,
                            "best_vs_diffusers_best": kb["images_per_s"] / d["images_per_s"] if d else None})
    print("\nkakusan default (and best) against diffusers' best configuration, same run")
    for s in summary:
        if s["task"] == "sample":
            vs = (f"diffusers {s['diffusers_best_ms']:8.1f} ({s['diffusers_best_mode']}): "
                  f"default {s['default_vs_diffusers_best']:.2f}x, best {s['best_vs_diffusers_best']:.2f}x"
                  if s["diffusers_best_ms"] else "")
            print(f"sample {s['preset']:<13} b{s['batch']:<3} default {s['kakusan_default_ms']:8.1f} ms "
                  f"(vs fp32 {s['default_vs_fp32']:.2f}x)  best {s['kakusan_best_ms']:8.1f} ({s['kakusan_best_mode']})"
                  f"  {vs}")
        else:
            vs = (f"diffusers {s['diffusers_best_img_s']:7.1f} ({s['diffusers_best_mode']}): "
                  f"default {s['default_vs_diffusers_best']:.2f}x, best {s['best_vs_diffusers_best']:.2f}x"
                  if s["diffusers_best_img_s"] else "")
            print(f"train  {s['preset']:<13} b{s['batch']:<3} default {s['kakusan_default_img_s']:7.1f} img/s "
                  f"best {s['kakusan_best_img_s']:7.1f} ({s['kakusan_best_mode']})  {vs}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="unet-digits,unet-mnist,ddpm-cifar10,dit-mnist")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--compile-batches", default="16,64", help="batches at which the +compile modes run")
    p.add_argument("--compile-presets", default="unet-mnist,ddpm-cifar10")
    p.add_argument("--train-compile-presets", default="unet-mnist")
    p.add_argument("--calls", type=int, default=5, help="timed evaluations / steps per configuration (median)")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--sampler-batches", default="1,16", help="batches at which a whole sampler run is timed")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-batch-large", type=int, default=16, help="the training batch for ddpm-cifar10")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-sample", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--json", default=str(HERE / "results" / "cpu_speed.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--summarize", metavar="JSON", help="print the summary of an earlier run's JSON again")
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        task = spec.pop("task")
        row = one_sample(**spec) if task == "sample" else one_train(**spec)
        print(json.dumps(row))
        return

    from train_throughput import run_meta

    if args.summarize:
        d = json.loads(Path(args.summarize).read_text())
        d["summary"] = summarize(d["rows"], sorted({r["preset"] for r in d["rows"]}, key=d["preset"].split(",").index),
                                 sorted({r["batch"] for r in d["rows"] if r["task"] == "sample"}))
        Path(args.summarize).write_text(json.dumps(d, indent=2))
        return

    presets, batches = args.presets.split(","), [int(b) for b in args.batches.split(",")]
    cbatches = {int(b) for b in args.compile_batches.split(",")}
    cpresets = set(args.compile_presets.split(","))
    tcpresets = set(args.train_compile_presets.split(","))
    sbatches = {int(b) for b in args.sampler_batches.split(",")}
    peak = matmul_peak()
    print(f"matmul peak here: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    specs = []
    for preset in presets:
        libs = ["kakusan"] if preset.startswith("dit") else ["kakusan", "diffusers"]
        for b in batches if not args.no_sample else []:
            for lib in libs:
                for mode in SAMPLE_MODES[lib]:
                    if "compile" in mode and (b not in cbatches or preset not in cpresets):
                        continue
                    specs.append({"task": "sample", "preset": preset, "batch": b, "library": lib, "mode": mode,
                                  "calls": args.calls, "steps": args.sampler_steps if b in sbatches else 0})
        if not args.no_train:
            b = args.train_batch_large if preset == "ddpm-cifar10" else args.train_batch
            for lib in libs:
                for mode in TRAIN_MODES[lib]:
                    if "compile" in mode and preset not in tcpresets:
                        continue
                    specs.append({"task": "train", "preset": preset, "batch": b, "library": lib, "mode": mode,
                                  "calls": args.calls})
    rows, t0 = [], time.perf_counter()
    for i, spec in enumerate(specs):
        row = run_child(spec, args.timeout)
        if row is None:
            continue
        row["of_peak"] = row["gflops"] / peak[row["precision"]]
        rows.append(row)
        what = (f"{row['ms_per_eval']:8.1f} ms/eval" if row["task"] == "sample" else
                f"{row['images_per_s']:8.1f} img/s")
        print(f"[{i + 1}/{len(specs)} {time.perf_counter() - t0:6.0f} s] {row['task']:<6} {row['preset']:<13} "
              f"b{row['batch']:<3} {row['library']:<9} {row['mode']:<16} {what}  {100 * row['of_peak']:5.1f}% of peak"
              f"  {row['peak_rss_mib']:6.0f} MiB", flush=True)

    summary = summarize(rows, presets, batches)
    meta = run_meta("cpu_speed", ",".join(presets), torch.device("cpu"), calls=args.calls,
                    wall_s=time.perf_counter() - t0)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "matmul_peak_gflops": peak, "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
