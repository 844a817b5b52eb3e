"""Training step cost per image: a pixel-space U-Net on 32x32x3 vs the same U-Net on an autoencoder's latents
(8x8x4 at f = 4, 4x4x4 at f = 8), measured in one run on one device; plus the one-time cost of encoding an image
into the latent cache and of decoding a sample.

    python benchmarks/latent_step_cost.py [--preset unet-mnist] [--batch-size 64]

The U-Net keeps its widths; only its input size and channels change (attention at the two lowest resolutions).
The autoencoder is the default ``AutoencoderConfig`` (64 channels) of each factor; its cost does not depend on
its training.
Prints a table and writes JSON to benchmarks/results/latent_step_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kakusan.diffusion import Denoiser, DiffusionConfig
from kakusan.models import UNet, get_preset
from kakusan.models.autoencoder import Autoencoder, AutoencoderConfig
from kakusan.schedules import ScheduleConfig, make_schedule


def step_seconds(model_cfg, batch: int, steps: int, device) -> float:
    torch.manual_seed(0)
    model = UNet(model_cfg).to(device)
    den = Denoiser(model, make_schedule(ScheduleConfig("cosine", 1000)), DiffusionConfig("v", "min-snr", 5.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size, device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = den.loss(x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="unet-mnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/latent_step_cost.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    base = get_preset(args.preset)
    settings = [("pixels", 32, 3, None), ("latents f=4", 8, 4, 4), ("latents f=8", 4, 4, 8)]
    for name, size, ch, factor in settings:
        levels = len(base.channel_mults)
        res = [size // 2**i for i in range(levels)]
        cfg = get_preset(args.preset, image_size=size, in_channels=ch, out_channels=ch,
                         attention_resolutions=tuple(res[-2:]))
        s = step_seconds(cfg, args.batch_size, args.steps, device)
        row = {"input": name, "shape": [ch, size, size], "step_s": s, "ms_per_image": 1000 * s / args.batch_size}
        if factor:
            ae_cfg = AutoencoderConfig(in_channels=3, latent_channels=4,
                                       channel_mults=(1, 2, 2) if factor == 4 else (1, 2, 2, 4))
            ae = Autoencoder(ae_cfg).to(device).eval()
            x = torch.rand(args.batch_size, 3, 32, 32, device=device) * 2 - 1
            with torch.no_grad():
                ae.encode(x)
                t0 = time.perf_counter()
                z = ae.encode(x).mean
                enc = time.perf_counter() - t0
                t0 = time.perf_counter()
                ae.decode(z)
                dec = time.perf_counter() - t0
            row.update(encode_ms_per_image=1000 * enc / args.batch_size, decode_ms_per_image=1000 * dec / args.batch_size)
        rows.append(row)
    px = rows[0]["ms_per_image"]
    print(f"{args.preset}, batch {args.batch_size}, {device} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}")
    print(f"{'input':>12} {'shape':>12} {'ms/image':>9} {'vs pixels':>10} {'encode ms':>10} {'decode ms':>10}")
    for r in rows:
        print(f"{r['input']:>12} {str(tuple(r['shape'])):>12} {r['ms_per_image']:>9.2f} "
              f"{px / r['ms_per_image']:>9.1f}x {r.get('encode_ms_per_image', float('nan')):>10.2f} "
              f"{r.get('decode_ms_per_image', float('nan')):>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "batch_size": args.batch_size,
                                          "device": str(device), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
