"""A KL-regularised convolutional autoencoder for latent diffusion (Rombach et al. 2022, the "VAE" of Stable
Diffusion), and the patch discriminator of its optional adversarial loss.

Shape walk, f = 4 (``channel_mults`` of length 3), 32x32x3 -> 8x8x4:
    encoder: conv_in 3->ch | level 0: res blocks ch @32, down | level 1: res 2ch @16, down | level 2: res 2ch @8
             | middle: res, attention, res @8 | GroupNorm, SiLU, conv -> 2 * latent_channels (mean, log-variance)
    decoder: conv_in latent->2ch | middle @8 | levels mirrored, one more res block each, upsampling | conv_out.
The downsampling factor is 2 ** (len(channel_mults) - 1). The latent scale (1 / std of the encoded training
data) is measured after training and stored in the config; nothing here assumes a constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, config_from_dict
from .unet import AttentionBlock, Downsample, Upsample

Tensor = torch.Tensor


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    latent_channels: int = 4
    channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)  # f = 2 ** (len - 1): (1, 2, 2) -> 4, (1, 2, 2, 4) -> 8
    num_res_blocks: int = 1
    norm_groups: int = 32
    mid_attention: bool = True
    scale_factor: float | None = None  # latents are multiplied by it; measured (1 / std) after training
    latent_mean: float = 0.0  # the measured mean of the latents (recorded; latents are not shifted)

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        if self.in_channels < 1 or self.latent_channels < 1 or self.channels < 1 or self.num_res_blocks < 1:
            raise ConfigError("autoencoder channel counts and num_res_blocks must be positive")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"autoencoder channel_mults must be positive, got {self.channel_mults}")
        if self.norm_groups < 1:
            raise ConfigError(f"autoencoder norm_groups must be >= 1, got {self.norm_groups}")
        for c in (self.channels * m for m in self.channel_mults):
            if c % self.norm_groups:
                raise ConfigError(f"autoencoder width {c} is not divisible by norm_groups {self.norm_groups}")
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise ConfigError(f"scale_factor must be positive, got {self.scale_factor}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return config_from_dict(cls, d, "autoencoder")


class Block(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1) shortcut; no time input."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps=1e-6), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar))."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent elements. (B,)"""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = cfg = config
        g = cfg.norm_groups
        widths = [cfg.channels * m for m in cfg.channel_mults]
        # encoder
        self.enc_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.enc_blocks, self.enc_down = nn.ModuleList(), nn.ModuleList()
        c = cfg.channels
        for i, w in enumerate(widths):
            self.enc_blocks.append(nn.Sequential(*[Block(c if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]))
            c = w
            if i < len(widths) - 1:
                self.enc_down.append(Downsample(c))
        self.enc_mid = nn.ModuleList([Block(c, c, g), AttentionBlock(c, None, g) if cfg.mid_attention
                                      else nn.Identity(), Block(c, c, g)])
        self.enc_out = nn.Sequential(nn.GroupNorm(g, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, 2 * cfg.latent_channels, 3,
                                                                                        padding=1))
        # decoder
        self.dec_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.dec_mid = nn.ModuleList([Block(c, c, g), AttentionBlock(c, None, g) if cfg.mid_attention
                                      else nn.Identity(), Block(c, c, g)])
        self.dec_blocks, self.dec_up = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.dec_blocks.append(nn.Sequential(*[Block(c if j == 0 else w, w, g)
                                                   for j in range(cfg.num_res_blocks + 1)]))
            c = w
            if i > 0:
                self.dec_up.append(Upsample(c))
        self.dec_out = nn.Sequential(nn.GroupNorm(g, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3,
                                                                                        padding=1))

    @property
    def factor(self) -> int:
        return self.config.factor

    def check_input(self, x: Tensor) -> None:
        f = self.factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ConfigError(f"the autoencoder takes (B, {self.config.in_channels}, H, W) images, got "
                              f"{tuple(x.shape)}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ConfigError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's "
                              f"downsampling factor {f}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x in [-1, 1], (B, C, H, W) -> q(z | x) over (B, latent_channels, H / f, W / f), unscaled."""
        self.check_input(x)
        h = self.enc_in(x)
        for i, blocks in enumerate(self.enc_blocks):
            h = blocks(h)
            if i < len(self.enc_down):
                h = self.enc_down[i](h)
        for m in self.enc_mid:
            h = m(h)
        return DiagonalGaussian(self.enc_out(h))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images (B, C, H, W), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ConfigError(f"the decoder takes (B, {self.config.latent_channels}, h, w) latents, got "
                              f"{tuple(z.shape)}")
        h = self.dec_in(z)
        for m in self.dec_mid:
            h = m(h)
        for i, blocks in enumerate(self.dec_blocks):
            h = blocks(h)
            if i < len(self.dec_up):
                h = self.dec_up[i](h)
        return self.dec_out(h)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        q = self.encode(x)
        return self.decode(q.sample(generator)), q

    # latent space of the diffusion model: scaled latents
    @property
    def scale(self) -> float:
        if self.config.scale_factor is None:
            raise ConfigError("this autoencoder has no measured latent scale yet (kakusan train-autoencoder "
                              "measures it at the end of training)")
        return self.config.scale_factor

    def to_latent(self, x: Tensor, mode: str = "mean", generator: torch.Generator | None = None) -> Tensor:
        q = self.encode(x)
        return (q.mean if mode == "mean" else q.sample(generator)) * self.scale

    def from_latent(self, z: Tensor) -> Tensor:
        return self.decode(z / self.scale)


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): strided 4x4 convs with GroupNorm and LeakyReLU, giving one
    real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(min(32, c_out // 4), c_out),
                     nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
