"""ControlNet (Zhang, Rao & Agrawala 2023, 'Adding conditional control to text-to-image diffusion models') for
kakusan's own U-Net.

A trainable copy of the frozen base's way down and middle (time / label / text embeddings, conv_in, the down
levels, the middle block), started from the base's weights; a small hint encoder that turns the control image
(edges, a sketch, any paired picture; values in [0, 1], at the base's pixel size) into conv_in-wide features added
after the copy's conv_in; and one zero-initialised 1x1 convolution per skip connection and one for the middle
output, whose outputs the base adds to its own skips and middle output before its way up (fig. 3 of the paper).
With every zero convolution at zero the base's output is exactly unchanged, and the gradient still reaches them.

    base skips s_i, middle m   ->   s_i + scale * Z_i(copy_i(x + H(hint))),   m + scale * Z_mid(copy_mid(...))

Shape walk for a ControlNet on ``unet-mnist`` (28x28, 1 channel): hint (B, 1, 28, 28) -> 16 -> 32 -> zero conv
to 32 channels @28 (added to conv_in's output) -> the copied levels: skips 32@28, 32@28, 32@14, 64@14, 64@7,
64@7 and the middle 64@7 -> one 1x1 zero conv each. A latent base (``hint_factor`` pixels per latent, e.g. 8) gets
stride-2 convolutions in the hint encoder down to the latent size, as the paper's 512 -> 64 encoder.

The base is not part of the ControlNet: ``ControlledUNet`` (models.controlnet) runs a base with one or more
ControlNets, whose residuals are summed, each with its own hint and scale (``ControlCond``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..conditioning.control import ControlCond
from ..errors import ConfigError, config_from_dict, need
from .unet import UNet, UNetConfig

Tensor = torch.Tensor


@dataclass
class ControlNetConfig:
    """``base``: the base U-Net's config (a dict, as checkpoints hold it); ``hint_channels``: the control image's
    channels; ``hint_factor``: pixels of the control image per position of the base's input (1 for a pixel
    model, the autoencoder's factor for a latent one); ``hint_widths``: the hint encoder's widths (default
    (16, 32) at factor 1, the paper's (16, 32, 96, 256) with downsampling)."""

    base: dict = field(default_factory=dict)
    hint_channels: int = 1
    hint_factor: int = 1
    hint_widths: tuple[int, ...] | None = None

    def __post_init__(self):
        need(isinstance(self.base, dict) and self.base, "a ControlNet config needs its base U-Net's config")
        need(self.hint_channels >= 1, f"hint_channels must be >= 1, got {self.hint_channels}")
        need(self.hint_factor >= 1 and self.hint_factor & (self.hint_factor - 1) == 0,
             f"hint_factor must be a power of 2, got {self.hint_factor}")
        if self.hint_widths is None:
            self.hint_widths = (16, 32) if self.hint_factor == 1 else (16, 32, 96, 256)
        self.hint_widths = tuple(int(w) for w in self.hint_widths)
        need(all(w >= 1 for w in self.hint_widths), f"hint_widths must be positive, got {self.hint_widths}")
        downs = int(math.log2(self.hint_factor))
        need(len(self.hint_widths) >= downs + 1,
             f"hint_factor {self.hint_factor} needs {downs} stride-2 stages: give at least {downs + 1} hint_widths")
        self.unet_config  # validates the base

    @property
    def unet_config(self) -> UNetConfig:
        base = {k: v for k, v in self.base.items() if k != "type"}
        return UNetConfig.from_dict(base)

    def to_dict(self) -> dict:
        return {"base": dict(self.base), "hint_channels": self.hint_channels, "hint_factor": self.hint_factor,
                "hint_widths": list(self.hint_widths)}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        return config_from_dict(cls, d, "ControlNet")


def zero_conv(c: int) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """conv 3x3 -> SiLU, then per further width: conv -> SiLU -> conv (stride 2 while downsampling remains) ->
    SiLU; a zero-initialised 3x3 conv to the base's conv_in width. (B, hint_channels, f*H, f*W) -> (B, ch, H, W)."""

    def __init__(self, c_in: int, widths: tuple[int, ...], c_out: int, factor: int):
        super().__init__()
        downs = int(math.log2(factor))
        layers: list[nn.Module] = [nn.Conv2d(c_in, widths[0], 3, padding=1), nn.SiLU()]
        for i, w in enumerate(widths[1:]):
            prev = widths[i]
            layers += [nn.Conv2d(prev, prev, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(prev, w, 3, padding=1, stride=2 if i < downs else 1), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], c_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hint: Tensor) -> Tensor:
        return self.out(self.layers(hint))


class ControlNet(nn.Module):
    """(x_t, t, cond, hint) -> (residuals, one per skip of the base; the middle's residual)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        ucfg = config.unet_config
        self.copy = UNet(ucfg, decoder=False)
        self.hint_encoder = HintEncoder(config.hint_channels, config.hint_widths, ucfg.channels, config.hint_factor)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in self.copy.skip_channels)
        mid = ucfg.channels * ucfg.channel_mults[-1]
        self.mid_zero = zero_conv(mid)

    @classmethod
    def from_base(cls, base: UNet, hint_channels: int = 1, hint_factor: int = 1,
                  hint_widths: tuple[int, ...] | None = None) -> "ControlNet":
        """A ControlNet whose copy starts as ``base``'s weights (the paper's initialisation)."""
        if not isinstance(base, UNet):
            raise ConfigError(f"a kakusan ControlNet is built on kakusan's U-Net, not {type(base).__name__}")
        cfg = ControlNetConfig({"type": "unet", **base.config.to_dict()}, hint_channels, hint_factor, hint_widths)
        net = cls(cfg)
        own = net.copy.state_dict()
        net.copy.load_state_dict({k: v for k, v in base.state_dict().items() if k in own}, strict=True)
        return net

    def check_hint(self, hint: Tensor, x: Tensor) -> None:
        f, c = self.config.hint_factor, self.config.hint_channels
        want = (x.shape[0], c, x.shape[2] * f, x.shape[3] * f)
        if tuple(hint.shape) != want:
            raise ConfigError(f"the control image batch is {tuple(hint.shape)}; this ControlNet takes {want} "
                              f"({c} channel(s) at {f}x the model's input size, one per sample)")

    def forward(self, x: Tensor, t: Tensor, cond, hint: Tensor) -> tuple[list[Tensor], Tensor]:
        self.check_hint(hint, x)
        net = self.copy
        temb, context, mask = net.embed(x, t, cond)
        h = net.conv_in(x) + self.hint_encoder(hint.to(net.conv_in.weight.dtype))
        h, skips = net.encode(h, temb, context, mask)
        return [z(s) for z, s in zip(self.zero_convs, skips)], self.mid_zero(h)

    def enable_gradient_checkpointing(self, on: bool = True) -> "ControlNet":
        self.copy.enable_gradient_checkpointing(on)
        return self


class ControlledUNet(nn.Module):
    """A base backbone with ControlNets, itself a backbone ``(x_t, t, cond) -> prediction``: a ``ControlCond``
    condition runs each ControlNet on its hint, sums the residuals times their scales (times the condition's
    per-sample ``keep``: 0 leaves that sample uncontrolled), and hands them to the base; any other condition
    goes to the base unchanged. The base may be kakusan's U-Net or Stable Diffusion's (models.sd_unet), whose
    forward takes the same ``control=(residuals, middle)``."""

    def __init__(self, base: nn.Module, controlnets: list[nn.Module]):
        super().__init__()
        self.base = base
        self.controlnets = nn.ModuleList(controlnets)
        self.config = base.config  # what the network takes (input size, conditioning): the base's

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        if not isinstance(cond, ControlCond):
            return self.base(x, t, cond)
        if len(cond.hints) != len(self.controlnets):
            raise ConfigError(f"{len(cond.hints)} control image(s) for {len(self.controlnets)} ControlNet(s)")
        if len(cond) != x.shape[0]:
            raise ConfigError(f"the control condition holds {len(cond)} samples, the batch {x.shape[0]}")
        residuals, mid = None, None
        keep = cond.keep.to(x.device, x.dtype)[:, None, None, None]
        for net, hint, scale in zip(self.controlnets, cond.hints, cond.scales):
            if scale == 0:
                continue
            r, m = net(x, t, cond.inner, hint.to(x.device))
            r = [keep * (scale * ri) for ri in r]
            m = keep * (scale * m)
            residuals = r if residuals is None else [a + b for a, b in zip(residuals, r)]
            mid = m if mid is None else mid + m
        return self.base(x, t, cond.inner, control=None if residuals is None else (residuals, mid))


def controlnet_from_checkpoint_config(record: dict) -> nn.Module:
    """Build an empty ControlNet from a checkpoint's ``controlnet`` record (kakusan's, or an SD one's)."""
    if record.get("type", "unet") == "sd-controlnet":
        from .sd_unet import SDControlNet, SDControlNetConfig

        return SDControlNet(SDControlNetConfig.from_dict(record["config"]))
    return ControlNet(ControlNetConfig.from_dict(record["config"]))


__all__ = ["ControlNet", "ControlNetConfig", "ControlledUNet", "HintEncoder", "controlnet_from_checkpoint_config"]
