"""Sampling speed of a kakusan U-Net preset vs diffusers' UNet2DModel built with the same configuration, measured
in the same run on the same device.

Two figures per library and mode:
- one model evaluation (the network's forward pass at a batch of noisy images, under torch.inference_mode),
  median over the timed calls, with the outputs checked against the same library's fp32 eager forward;
- a whole 20-step sampler run: kakusan's default sampler through ``kakusan.samplers.sample`` (the code path of
  ``kakusan sample``) vs diffusers' UniPC scheduler driven the way its pipelines drive it
  (scale_model_input, the network, scheduler.step), both from the same noise.

Modes: fp32 (TF32 matmuls on CUDA), bf16 (autocast), +compile (torch.compile), +cl (channels-last memory format).

    python benchmarks/sampling_throughput.py --preset ddpm-cifar10 --batch-size 256                 # GPU
    python benchmarks/sampling_throughput.py --preset unet-mnist --batch-size 16 --calls 5          # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import diffusers_equivalent, run_meta, time_steps  # noqa: E402

from kakusan.diffusion import Denoiser, DiffusionConfig  # noqa: E402
from kakusan.models import UNet, get_preset  # noqa: E402
from kakusan.samplers import DEFAULT_SAMPLER, sample  # noqa: E402
from kakusan.schedules import make_schedule  # noqa: E402


class _Forward(torch.nn.Module):
    """net(x, t) -> prediction tensor in float32, under bf16 autocast if asked, for either library."""

    def __init__(self, net, diffusers: bool, bf16: bool):
        super().__init__()
        self.net, self.diffusers, self.bf16 = net, diffusers, bf16

    def forward(self, x, t, cond=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(x, t).sample if self.diffusers else self.net(x, t)
        return out.float()


def build(library: str, cfg, device, bf16: bool, compiled: bool, channels_last: bool):
    torch.manual_seed(0)
    net = UNet(cfg) if library == "kakusan" else diffusers_equivalent(cfg)
    if library == "kakusan":  # a trained network's output layer is not zero (as at initialisation): compare numbers
        torch.nn.init.normal_(net.conv_out.weight, std=0.02)
    net = net.to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = _Forward(net, library == "diffusers", bf16)
    return torch.compile(fwd) if compiled else fwd, net


def diffusers_sampler_loop(fwd, x, steps: int):
    """The loop of diffusers' pipelines (e.g. DDPMPipeline, with the UniPC scheduler swapped in)."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    sched.set_timesteps(steps, device=x.device)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = fwd(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--calls", type=int, default=20, help="timed model evaluations (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="sampler steps for the whole-sampler timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=None,
                   help="comma list of fp32, bf16, bf16+compile, bf16+cl, bf16+compile+cl, ... "
                        "(default: fp32,bf16,bf16+compile,bf16+compile+cl on CUDA, fp32 on CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip diffusers")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    modes = (args.modes or ("fp32,bf16,bf16+compile,bf16+compile+cl" if device.type == "cuda" else "fp32")).split(",")
    cfg = get_preset(args.preset)
    schedule = make_schedule("linear")
    libraries = ["kakusan"] + ([] if args.no_peer else ["diffusers"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    rows, eager = [], {}
    for mode in modes:
        parts = mode.split("+")
        if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"compile", "cl"}:
            p.error(f"unknown mode {mode!r}: fp32 or bf16, optionally +compile and/or +cl")
        bf16, compiled, cl = parts[0] == "bf16", "compile" in parts, "cl" in parts
        for lib in libraries:
            try:
                fwd, net = build(lib, cfg, device, bf16, compiled, cl)
            except ImportError:
                print("diffusers is not installed: pip install 'kakusan[bench]' to compare", file=sys.stderr)
                libraries.remove(lib)
                continue
            xin = x.contiguous(memory_format=torch.channels_last) if cl else x
            tin = t.float() if lib == "kakusan" else t
            with torch.inference_mode():
                out = fwd(xin, tin)
                if mode == "fp32":
                    eager[lib] = out
                ref = eager.get(lib) if mode != "fp32" else None
                err = ((out - ref).norm() / ref.norm()).item() if ref is not None else None
                times = time_steps(lambda: fwd(xin, tin), args.calls, args.warmup, device)
                # the whole sampler, from the same noise
                if lib == "kakusan":
                    den = Denoiser(fwd, schedule, DiffusionConfig("eps"))
                    run = lambda: sample(den, schedule, tuple(x.shape), sampler=DEFAULT_SAMPLER,  # noqa: E731
                                         steps=args.steps, seed=0, device=device)
                else:
                    run = lambda: diffusers_sampler_loop(fwd, x.clone(), args.steps)  # noqa: E731
                # one warm-up run (and compilation for the shapes the loop uses), one timed
                wall = time_steps(run, 1, 1, device)[0]
            med = statistics.median(times)
            rows.append({"library": lib, "mode": mode, "batch": args.batch_size,
                         "params": sum(q.numel() for q in net.parameters()), "ms_per_eval": med * 1e3,
                         "images_per_s_per_eval": args.batch_size / med, "rel_error_vs_fp32_eager": err,
                         "sampler": DEFAULT_SAMPLER if lib == "kakusan" else "UniPCMultistepScheduler",
                         "sampler_steps": args.steps, "sampler_seconds": wall})
            fwd = net = run = None  # free the compiled graphs before the next build
            if device.type == "cuda":
                torch.cuda.empty_cache()

    meta = run_meta("sampling_throughput", args.preset, device, calls=args.calls)
    print(f"\n{args.preset} sampling, batch {args.batch_size}, {meta['where']}")
    print(f"{'library':<10} {'mode':<18} {'ms/eval':>9} {'rel.err':>9} {str(args.steps) + '-step sampler s':>18}")
    for r in rows:
        e = r["rel_error_vs_fp32_eager"]
        err = f"{e:>9.1e}" if e is not None else f"{'(ref)':>9}"
        print(f"{r['library']:<10} {r['mode']:<18} {r['ms_per_eval']:>9.2f} {err} {r['sampler_seconds']:>18.3f}")
    best = {lib: min((r for r in rows if r["library"] == lib), key=lambda r: r["ms_per_eval"], default=None)
            for lib in ("kakusan", "diffusers")}
    if best["kakusan"] and best["diffusers"]:
        k, d = best["kakusan"], best["diffusers"]
        print(f"best per evaluation: kakusan {k['ms_per_eval']:.2f} ms ({k['mode']}) vs diffusers "
              f"{d['ms_per_eval']:.2f} ms ({d['mode']}): {d['ms_per_eval'] / k['ms_per_eval']:.2f}x")
    out = Path(args.json or Path(__file__).parent / "results" / f"sampling_throughput-{args.preset}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
