"""Stable Diffusion's U-Net as a kakusan backbone: diffusers' ``UNet2DConditionModel`` behind the backbone
contract ``(x_t, t, cond) -> prediction``.

SD's network is not rebuilt in kakusan's own U-Net: its blocks differ in many small ways (time embedding with
cos first, GEGLU feed-forward, linear or 1x1-conv transformer projections, upcast attention, SDXL's extra
conditioning) and each would be a new config switch and a weight map to keep equal to diffusers' forever. Wrapped,
the network is diffusers' own, so the outputs are its outputs by construction, and what the wrapper adds is
only the contract: ``t`` is the schedule's time (diffusers' timestep, the same numbers), ``cond`` a ``TextCond``
whose tokens are the encoder's hidden states. Gradient checkpointing is diffusers'; LoRA targets are its
attention projections (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``), which kakusan's LoRA finds by name.

The config record is diffusers' own config of the network (``unet``), saved with the weights, plus the latent
size and channels the pipeline draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import ConfigError, need

Tensor = torch.Tensor

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention linears: LoRA's targets


@dataclass
class SDUNetConfig:
    """``unet``: the diffusers ``UNet2DConditionModel`` config (its ``config.json`` without the ``_`` keys)."""

    unet: dict = field(default_factory=dict)
    image_size: int = 64  # latent size drawn by default (512 px through SD's f = 8 autoencoder)
    in_channels: int = 4

    def __post_init__(self):
        need(isinstance(self.unet, dict) and self.unet, "an SD U-Net config needs the diffusers 'unet' config")
        need(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        need(self.in_channels == self.unet.get("in_channels", 4),
             f"in_channels {self.in_channels} differs from the U-Net's {self.unet.get('in_channels', 4)}")

    def to_dict(self) -> dict:
        return {"unet": dict(self.unet), "image_size": self.image_size, "in_channels": self.in_channels}

    @classmethod
    def from_dict(cls, d: dict) -> "SDUNetConfig":
        unknown = set(d) - {"unet", "image_size", "in_channels"}
        if unknown:
            raise ConfigError(f"unknown SD U-Net config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def of(cls, unet, image_size: int | None = None) -> "SDUNetConfig":
        """The config of a built diffusers U-Net."""
        cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        size = cfg.get("sample_size") or 64
        size = size[0] if isinstance(size, (list, tuple)) else size
        return cls(cfg, int(image_size or size), int(cfg.get("in_channels", 4)))


def _diffusers_unet(config: dict):
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        raise ConfigError("Stable Diffusion checkpoints need the diffusers package (pip install diffusers)") from None
    if config.get("addition_embed_type"):
        raise ConfigError(f"this U-Net takes extra conditioning ({config['addition_embed_type']!r}, as SDXL's): "
                          f"not supported yet, only SD 1.x / 2.x U-Nets")
    return UNet2DConditionModel.from_config(config)


class SDUNet(nn.Module):
    """(x (B, 4, h, w), t (B,), TextCond (B, L, D)) -> eps or v (B, 4, h, w), by diffusers' UNet2DConditionModel."""

    def __init__(self, config: SDUNetConfig, unet: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else _diffusers_unet(config.unet)
        self.context_dim = int(self.unet.config.cross_attention_dim)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is None or not hasattr(cond, "tokens"):
            raise ConfigError("a Stable Diffusion U-Net needs an encoded prompt (the empty prompt when unconditional)")
        tokens = cond.tokens.to(x.device)  # the text encoder may live elsewhere (offloaded to the CPU)
        if tokens.shape[-1] != self.context_dim:
            raise ConfigError(f"the U-Net cross-attends to {self.context_dim}-wide tokens, the text encoder gives "
                              f"{tokens.shape[-1]}")
        # SD attends to every position of the padded prompt (as trained): the mask is not applied
        return self.unet(x, t, encoder_hidden_states=tokens.to(x.dtype), return_dict=False)[0]

    def enable_gradient_checkpointing(self, on: bool = True) -> "SDUNet":
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        return self
