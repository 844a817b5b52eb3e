"""Training the latent-diffusion autoencoder: reconstruction (L1 or L2) + KL weight, an optional patch
discriminator (hinge loss) after a warm-up, atomic checkpoints and exact resume like the diffusion trainer, and
at the end the latent scale measured on the training data (1 / std of the encoded means) and stored in the
autoencoder's config.

``load_autoencoder(path)`` opens a kakusan autoencoder checkpoint or a diffusers ``AutoencoderKL`` folder
(Stable Diffusion's VAE, when its weights are present); both give the same interface (encode / decode /
to_latent / from_latent / factor / latent_channels / sha256).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import load_dataset, to_model_range, to_uint8
from ..errors import CheckpointError, ConfigError, config_from_dict
from ..metrics.stats import psnr
from ..models.autoencoder import Autoencoder, AutoencoderConfig, PatchDiscriminator
from ..checkpoints import (LoadedAutoencoder, load_autoencoder, load_state_dict_into, load_tensors, read_config,
                           resolve_checkpoint, restore_rng_state,
                           rng_state, save_checkpoint, unflatten_optimizer_state)
from ..diffusion import resolve_device
from .trainer import batch_indices

FACTORS = {4: (1, 2, 2), 8: (1, 2, 2, 4)}


@dataclass
class AutoencoderTrainConfig:
    data: str = "cifar10"
    image_size: int | None = None
    channels: int | None = None
    factor: int = 4  # the downsampling factor: 4 or 8
    latent_channels: int = 4
    model: dict = field(default_factory=dict)  # overrides of AutoencoderConfig (channels, num_res_blocks, ...)
    rec_loss: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-6  # on the KL summed over latent elements, per image pixel (as LDM's)
    disc_weight: float = 0.0  # > 0: add the patch discriminator's hinge loss with this weight ...
    disc_start: int = 2000  # ... from this step on
    steps: int = 5000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    hflip: bool = False
    seed: int = 0
    out: str = "runs/autoencoder"
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    scale_images: int = 2000  # training images encoded to measure the latent scale
    limit: int | None = None
    device: str = "auto"
    progress: bool = True
    max_minutes: float | None = None

    def __post_init__(self):
        if self.factor not in FACTORS:
            raise ConfigError(f"factor must be one of {sorted(FACTORS)}, got {self.factor}")
        if self.rec_loss not in ("l1", "l2"):
            raise ConfigError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "latent_channels", "scale_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.kl_weight < 0 or self.disc_weight < 0 or not self.lr > 0:
            raise ConfigError("kl_weight and disc_weight must be >= 0 and lr > 0")

    def model_config(self, in_channels: int) -> AutoencoderConfig:
        base = {"in_channels": in_channels, "latent_channels": self.latent_channels,
                "channel_mults": FACTORS[self.factor], **self.model}
        return AutoencoderConfig(**base)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderTrainConfig":
        return config_from_dict(cls, d, "autoencoder training")


class _Pair(nn.Module):
    """The autoencoder and its discriminator, saved together (keys ``autoencoder.*``, ``discriminator.*``)."""

    def __init__(self, ae: Autoencoder, disc: PatchDiscriminator):
        super().__init__()
        self.autoencoder, self.discriminator = ae, disc


class AutoencoderTrainer:
    def __init__(self, cfg: AutoencoderTrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.data = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, limit=cfg.limit)
        c, h, w = self.data.shape
        self.ae_cfg = cfg.model_config(c)
        if h % self.ae_cfg.factor or w % self.ae_cfg.factor:
            raise ConfigError(f"image size {h}x{w} is not divisible by the downsampling factor {self.ae_cfg.factor}")
        torch.manual_seed(cfg.seed)
        self.ae = Autoencoder(self.ae_cfg).to(self.device)
        self.disc = PatchDiscriminator(c).to(self.device)
        self.pair = _Pair(self.ae, self.disc)
        self.optimizer = torch.optim.AdamW([{"params": self.ae.parameters()},
                                            {"params": self.disc.parameters()}], lr=cfg.lr, betas=(0.5, 0.9))
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.images = to_model_range(self.data.images)
        self.step = 0
        self.out = Path(cfg.out)

    def config(self) -> dict:
        return {"model": {"type": "autoencoder", **self.ae_cfg.to_dict()},
                "data": {"spec": self.cfg.data, "name": self.data.name, "size": len(self.data),
                         "shape": list(self.data.shape)},
                "train": asdict(self.cfg)}

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoints", self.step, self.config(), self.pair, self.pair,
                               self.optimizer, rng_state(self.generator, self.device), self.cfg.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> None:
        ckpt = resolve_checkpoint(path or self.out)
        saved = read_config(ckpt)
        mine = self.config()["model"]
        if {k: v for k, v in saved["model"].items() if k not in ("scale_factor", "latent_mean")} != \
                {k: v for k, v in mine.items() if k not in ("scale_factor", "latent_mean")}:
            raise CheckpointError(f"{ckpt}: its autoencoder config differs from this run's")
        load_state_dict_into(self.pair, load_tensors(ckpt / "model.safetensors"), ckpt)
        state = json.loads((ckpt / "state.json").read_text())
        self.optimizer.load_state_dict(unflatten_optimizer_state(load_tensors(ckpt / "optimizer.safetensors"),
                                                                 state["optimizer"]))
        restore_rng_state(state, self.generator, self.device)
        self.step = state["step"]

    def train_step(self) -> dict:
        cfg = self.cfg
        self.pair.train()
        idx = batch_indices(len(self.images), cfg.batch_size, self.step, cfg.seed)
        x = self.images[idx].to(self.device)
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=self.generator, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        recon, q = self.ae(x, self.generator)
        rec = (recon - x).abs().mean() if cfg.rec_loss == "l1" else (recon - x).square().mean()
        kl = q.kl().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        adversarial = cfg.disc_weight > 0 and self.step >= cfg.disc_start
        if adversarial:
            self.disc.requires_grad_(False)
            loss = loss - cfg.disc_weight * self.disc(recon).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc.requires_grad_(True)
        gn = torch.nn.utils.clip_grad_norm_(self.ae.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(gn)):
            raise ConfigError(f"step {self.step}: non-finite autoencoder loss {loss.item()}; lower the lr; the last "
                              f"good checkpoint is in {self.out / 'checkpoints'}")
        self.optimizer.step()
        rec_info = {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}
        if adversarial:  # the discriminator's hinge loss on real vs reconstructed images
            self.optimizer.zero_grad(set_to_none=True)
            d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(recon.detach())).mean()
            d_loss.backward()
            self.optimizer.step()
            rec_info["disc"] = d_loss.item()
        with torch.no_grad():
            rec_info["psnr"] = psnr(to_uint8(recon), to_uint8(x)).mean().item()
        self.step += 1
        return rec_info

    @torch.no_grad()
    def measure_scale(self) -> tuple[float, float]:
        """1 / std and mean of the posterior means of (up to) ``scale_images`` training images."""
        self.ae.eval()
        std, mean = posterior_mean_stats(self.ae.encode, self.data.images, self.cfg.scale_images, self.device)
        return 1.0 / std, mean

    def fit(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="autoencoder", disable=None if cfg.progress else True)
        t0 = time.perf_counter()
        acc: dict[str, list[float]] = {}
        with open(self.out / "log.jsonl", "a") as log:
            while self.step < cfg.steps:
                for k, v in self.train_step().items():
                    acc.setdefault(k, []).append(v)
                bar.update(1)
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_time:
                    rec = {"step": self.step, **{k: sum(v) / len(v) for k, v in acc.items()},
                           "elapsed_s": time.perf_counter() - t0}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(psnr=f"{rec['psnr']:.2f}")
                    acc = {}
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps and not out_of_time:
                    self.save()
                if out_of_time:
                    print(f"stopping at step {self.step}: the {cfg.max_minutes} minute budget is spent", flush=True)
                    break
        bar.close()
        scale, mean = self.measure_scale()
        self.ae_cfg.scale_factor, self.ae_cfg.latent_mean = scale, mean
        return self.save()


# --------------------------------------------------------------------------------------------------------------
# Loading: kakusan checkpoints and diffusers AutoencoderKL folders


@torch.no_grad()
def posterior_mean_stats(encode, images: torch.Tensor, n: int, device, batch_size: int = 256
                         ) -> tuple[float, float]:
    """std and mean of the posterior means ``encode(x).mean`` of up to ``n`` uint8 images spread over the set."""
    pick = torch.linspace(0, len(images) - 1, min(n, len(images))).round().long()
    z = torch.cat([encode(to_model_range(images[pick[i:i + batch_size]]).to(device)).mean.float().cpu()
                   for i in range(0, len(pick), batch_size)])
    return z.std().item(), z.mean().item()


def measure_latent_scale(ae: LoadedAutoencoder, images: torch.Tensor, n: int = 2000) -> float:
    """1 / std of the (unscaled) posterior means of up to ``n`` images (uint8, spread over the set); sets and
    returns ``ae.scale``."""
    std, _ = posterior_mean_stats(ae._posterior, images, n, next(ae.module.parameters()).device)
    ae.scale = 1.0 / std
    return ae.scale


@torch.no_grad()
def reconstruction_report(checkpoint: str | Path, data_spec: str, split: str = "test", grid: str | Path | None = None,
                          limit: int | None = None, batch_size: int = 256, device: str | torch.device = "cpu"
                          ) -> dict:
    """Reconstruction PSNR (dB, uint8, peak 255; the mean of per-image values, and the PSNR of the pooled MSE) of
    an autoencoder on a data split, through the posterior means; optionally a grid of originals (odd rows) over
    reconstructions (even rows)."""
    from ..images import save_grid

    ae = load_autoencoder(checkpoint, device)
    data = load_dataset(data_spec, split=split, limit=limit, channels=ae.in_channels)
    values, sq = [], []
    first = None
    for i in range(0, len(data), batch_size):
        x = data.images[i:i + batch_size]
        q = ae._posterior(to_model_range(x).to(device))
        rec = to_uint8(ae.decode(q.mean)).cpu()
        values.append(psnr(rec, x))
        sq.append((rec.float() - x.float()).square().flatten(1).mean(1))
        if first is None:
            first = (x[:32], rec[:32])
    values, mse = torch.cat(values), torch.cat(sq).mean()
    report = {"checkpoint": str(checkpoint), "autoencoder_sha256": ae.sha256, "data": data_spec, "split": split,
              "n": len(data), "psnr_mean": values.mean().item(), "psnr_of_mean_mse": (10 * torch.log10(255**2 / mse)).item(),
              "grid": None}
    if grid is not None:
        x, r = first
        rows = torch.cat([torch.stack([x[j:j + 8], r[j:j + 8]]) for j in range(0, len(x), 8)]).flatten(0, 1)
        report["grid"] = str(save_grid(rows, grid, nrow=8))
    return report
