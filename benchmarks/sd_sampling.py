"""Stable Diffusion sampling speed: kakusan's pipeline against diffusers' StableDiffusionPipeline, in the same run,
on the same SD-1.5-shaped model with random weights (U-Net 320-640-1280-1280, CLIP ViT-L/14 text tower, f = 8
autoencoder), the same DDIM scheduler (SD's: leading spacing, steps_offset 1), guidance 7.5 with a negative prompt.

    python benchmarks/sd_sampling.py --device cuda                 # 512x512, 20 steps (the full benchmark)
    python benchmarks/sd_sampling.py --tiny --device cpu           # a tiny SD-shaped model: checks the script
    python benchmarks/sd_sampling.py --device cpu --precision bf16 --repeats 1 --image-warmup 0   # 2 CPU cores

``--precision bf16``: kakusan's bf16 autocast (its default on CUDA and on CPUs with native bf16) against diffusers'
pipeline in bf16 weights (``torch_dtype=torch.bfloat16``, how diffusers runs in half precision); fp32 is both in
fp32 (where the images agree to ~1e-6).

Reports ms per U-Net evaluation (a guided batch of 2, as each sampling step makes) and ms per 512x512 image at 20
steps (text encoding, 20 steps, decoding), median of --repeats after a warm-up (the two libraries' runs
alternating), and the largest difference between the two pipelines' images (the same starting latents). Writes JSON to benchmarks/results/sd_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1)


def build(folder: Path, tiny: bool, image_size: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    ucfg, tcfg, vcfg = (TINY_UNET, TINY_TEXT, TINY_VAE) if tiny else (SD15_UNET, SD15_TEXT, SD15_VAE)
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(sample_size=image_size // factor, in_channels=4, out_channels=4, **ucfg)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=tcfg["hidden_size"], **tcfg))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
                        down_block_types=("DownEncoderBlock2D",) * len(vcfg["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(vcfg["block_out_channels"]), **vcfg)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
    from transformers import CLIPTokenizer

    from kakusan.testing import write_clip_tokenizer

    # a tokenizer over the byte alphabet (no download): the speed does not depend on the vocabulary
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder.parent / "tokenizer-src"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def timed_pair(fa, fb, repeats: int, device: torch.device, warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds of fa() and of fb(), the runs alternating (a, b, a, b, ...) so that a load elsewhere
    on the machine falls on both alike."""
    def one(fn):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(one(fa))
        tb.append(one(fb))
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny SD-shaped model (checks the script in seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-size", type=int, help="pixels (default 512; 32 with --tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-warmup", type=int, default=1, help="untimed whole images before the timed ones")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--json", default="benchmarks/results/sd_sampling.json")
    args = ap.parse_args()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from kakusan.pipeline import Pipeline

    device = torch.device(args.device)
    size = args.image_size or (32 if args.tiny else 512)
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry, low quality"
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(tmp) / "sd"
        build(folder, args.tiny, size)
        ours = Pipeline.load(folder, device=device, precision=args.precision)
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                      torch_dtype=dtype)
        ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
        ref = ref.to(device)
        ref.set_progress_bar_config(disable=True)
        c, h, w = ours.shape
        noise = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
        from kakusan.samplers import sampling_levels

        sigma0 = sampling_levels(ours.schedule, "ddim", args.steps, "leading").sigma[0].item()  # diffusers' x_T

        # one U-Net evaluation: a guided batch of 2 at one timestep, each through its own entry point
        x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        t = torch.full((2,), 501.0, device=device)
        with torch.no_grad():
            cond = ours._encode([prompt, negative])
            emb = cond.tokens.to(device)
            xr, embr = x.to(dtype), emb.to(dtype)
            unet_ours, unet_ref = timed_pair(lambda: ours.denoiser.raw(x, t, cond),
                                             lambda: ref.unet(xr, t.long(), encoder_hidden_states=embr).sample,
                                             args.repeats, device)

        kw = dict(negative_prompt=negative, sampler="ddim", steps=args.steps, spacing="leading", guidance=7.5, n=1)
        ours_call = lambda: ours(prompt, noise=noise, **kw).images  # noqa: E731
        ref_call = lambda: ref(prompt, negative_prompt=negative, num_inference_steps=args.steps,  # noqa: E731
                               guidance_scale=7.5, height=size, width=size, output_type="pt",
                               latents=(noise * sigma0).to(device, dtype)).images
        got = {}
        image_ours, image_ref = timed_pair(lambda: got.__setitem__("ours", ours_call()),
                                           lambda: got.__setitem__("ref", ref_call()), args.repeats, device,
                                           args.image_warmup)
        diff = ((got["ours"] + 1) / 2 - got["ref"].float().cpu()).abs().max().item()

    rows = [("kakusan", unet_ours, image_ours), ("diffusers", unet_ref, image_ref)]
    print(f"SD-1.5-shaped{' (tiny)' if args.tiny else ''}, {size}x{size}, DDIM {args.steps} steps, guidance 7.5, "
          f"{device}, {args.precision}")
    print(f"{'':<10} {'ms / U-Net eval (batch 2)':>26} {'ms / image':>12}")
    for name, u, im in rows:
        print(f"{name:<10} {u:>26.1f} {im:>12.1f}")
    print(f"largest image difference: {diff:.2e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    import diffusers

    out.write_text(json.dumps({"tiny": args.tiny, "image_size": size, "steps": args.steps, "device": str(device),
                               "precision": args.precision, "torch": torch.__version__,
                               "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
                               "repeats": args.repeats, "image_warmup": args.image_warmup,
                               "kakusan": {"ms_per_unet_eval": unet_ours, "ms_per_image": image_ours},
                               "diffusers_pipeline": {"ms_per_unet_eval": unet_ref, "ms_per_image": image_ref},
                               "max_image_difference": diff}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
