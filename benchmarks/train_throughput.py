"""Training-step throughput of a kakusan U-Net preset vs diffusers' UNet2DModel built with the same configuration,
measured in the same run on the same device.

One step = draw t and noise, x_t = alpha x0 + sigma eps, forward, MSE to eps, backward, AdamW (fused on CUDA).
FLOPs are counted once per model with torch.utils.flop_counter (forward + backward) and divided by the median step
time. Prints a table; writes JSON.

    python benchmarks/train_throughput.py --preset ddpm-cifar10 --batch-size 128          # GPU
    python benchmarks/train_throughput.py --preset ddpm-cifar10 --batch-size 16 --steps 5  # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.diffusion import q_sample  # noqa: E402
from kakusan.models import UNet, UNetConfig, get_preset  # noqa: E402
from kakusan.schedules import make_schedule  # noqa: E402


def diffusers_equivalent(cfg: UNetConfig):
    """diffusers' UNet2DModel with the same architecture as a kakusan UNetConfig (additive time conditioning,
    one attention head per block when attention_head_dim is None, as the DDPM configuration): with the same
    weights the two give the same outputs (tests/test_unet.py)."""
    from diffusers import UNet2DModel

    widths = [cfg.channels * m for m in cfg.channel_mults]
    down, up, res = [], [], cfg.image_size
    for _ in widths:
        down.append("AttnDownBlock2D" if res in cfg.attention_resolutions else "DownBlock2D")
        res //= 2
    res = cfg.image_size // 2 ** (len(widths) - 1)
    for _ in widths:
        up.append("AttnUpBlock2D" if res in cfg.attention_resolutions else "UpBlock2D")
        res *= 2
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks, down_block_types=tuple(down),
        up_block_types=tuple(up), dropout=cfg.dropout, norm_num_groups=cfg.norm_groups,
        attention_head_dim=cfg.attention_head_dim, attn_norm_num_groups=cfg.norm_groups, norm_eps=1e-6,
        downsample_padding=0 if cfg.downsample_padding == "bottom-right" else 1, flip_sin_to_cos=False, freq_shift=1,
        resnet_time_scale_shift="scale_shift" if cfg.time_conditioning == "scale-shift" else "default")


def run_meta(benchmark: str, preset: str, device: torch.device, **extra) -> dict:
    """What a result was measured on: the device by name, torch and diffusers versions, CPU threads; 'where'
    is the same as one line for the table's title."""
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {"benchmark": benchmark, "preset": preset, "device": dev_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), **extra}
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    meta["where"] = (f"on {dev_name} (torch {torch.__version__}"
                     + (f", diffusers {meta['diffusers']}" if "diffusers" in meta else "") + ")")
    return meta


def make_step(model, call, opt, schedule, x0, bf16: bool):
    alpha_bar = schedule.alpha_bar.to(x0.device, torch.float32)
    T = len(alpha_bar)

    def step():
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        ab = alpha_bar[t]
        x_t = q_sample(x0, ab.sqrt(), (1 - ab).sqrt(), eps)
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = call(model, x_t, t)
        loss = F.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def count_flops(model, call, x0) -> float:
    t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
    with FlopCounterMode(display=False) as fc:
        call(model, x0, t).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def time_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench(name, model, call, cfg, batch, device, bf16, compiled, steps, warmup, ckpt=False) -> dict:
    model = model.to(device).train()
    if ckpt:  # both libraries name it the same
        model.enable_gradient_checkpointing()
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    flops = count_flops(model, call, x0)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = make_step(fwd, call, opt, make_schedule("linear"), x0, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, steps, warmup, device)
    med = statistics.median(times)
    row = {"library": name, "precision": "bf16" if bf16 else ("tf32" if device.type == "cuda" else "fp32"),
           "compile": compiled, "gradient_checkpointing": ckpt, "batch": batch, "params": sum(p.numel() for p in model.parameters()),
           "median_step_ms": med * 1e3, "images_per_s": batch / med, "tflops": flops / med / 1e12,
           "gflop_per_image": flops / batch / 1e9}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=None,
                   help="comma list of fp32,bf16,bf16+compile; '+ckpt' adds gradient checkpointing (e.g. bf16+ckpt) "
                        "(default: fp32,bf16,bf16+compile,bf16+ckpt on CUDA, fp32 on CPU)")
    p.add_argument("--no-peer", action="store_true", help="skip diffusers")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    modes = (args.modes or ("fp32,bf16,bf16+compile,bf16+ckpt" if device.type == "cuda" else "fp32")).split(",")
    cfg = get_preset(args.preset)
    kakusan_call = lambda m, x, t: m(x, t.float())  # noqa: E731
    diffusers_call = lambda m, x, t: m(x, t).sample  # noqa: E731
    rows = []
    for mode in modes:
        parts = mode.split("+")
        if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"compile", "ckpt"}:
            p.error(f"unknown mode {mode!r}: fp32 or bf16, optionally +compile and/or +ckpt")
        bf16, compiled, ckpt = parts[0] == "bf16", "compile" in parts, "ckpt" in parts
        torch.manual_seed(0)
        rows.append(bench("kakusan", UNet(cfg), kakusan_call, cfg, args.batch_size, device, bf16, compiled,
                          args.steps, args.warmup, ckpt))
        if not args.no_peer:
            try:
                peer = diffusers_equivalent(cfg)
            except ImportError:
                print("diffusers is not installed: pip install 'kakusan[bench]' to compare", file=sys.stderr)
                args.no_peer = True
                continue
            rows.append(bench("diffusers", peer, diffusers_call, cfg, args.batch_size, device, bf16, compiled,
                              args.steps, args.warmup, ckpt))

    meta = run_meta("train_throughput", args.preset, device, steps=args.steps)
    print(f"\n{args.preset} training step, batch {args.batch_size}, {meta['where']}")
    hdr = f"{'library':<10} {'precision':<9} {'compile':<7} {'ckpt':<5} {'params':>9} {'ms/step':>9} {'images/s':>9} {'TFLOP/s':>8}"
    print(hdr + ("  peak GiB" if device.type == "cuda" else ""))
    for r in rows:
        line = (f"{r['library']:<10} {r['precision']:<9} {str(r['compile']):<7} "
                f"{str(r['gradient_checkpointing']):<5} {r['params'] / 1e6:>8.2f}M "
                f"{r['median_step_ms']:>9.1f} {r['images_per_s']:>9.1f} {r['tflops']:>8.2f}")
        print(line + (f"  {r['peak_mem_gib']:8.2f}" if "peak_mem_gib" in r else ""))
    for mode_rows in zip(rows[0::2], rows[1::2]):
        k, d = mode_rows
        if k["library"] == "kakusan" and d["library"] == "diffusers":
            print(f"kakusan / diffusers ({k['precision']}, compile={k['compile']}, "
                  f"checkpointing={k['gradient_checkpointing']}): "
                  f"{k['images_per_s'] / d['images_per_s']:.2f}x")
    out = Path(args.json or Path(__file__).parent / "results" / f"train_throughput-{args.preset}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
