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

SD's ControlNets are wrapped the same way: ``SDControlNet`` is diffusers' ``ControlNetModel`` behind the ControlNet
contract of ``models.controlnet``, ``(x_t, t, cond, hint) -> (residuals, middle)``, with the control image in
[0, 1] at the pixel size (8x the latent, as diffusers' control image processor gives it); ``SDUNet`` takes the
(scaled, summed) residuals as ``control`` and hands them to diffusers' U-Net.
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


def _diffusers_model(class_name: str, config: dict, what: str):
    """An empty diffusers ``class_name`` (UNet2DConditionModel, ControlNetModel) from its config; SDXL's extra
    conditioning refused."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"Stable Diffusion {what}s need the diffusers package (pip install diffusers)") from None
    if config.get("addition_embed_type"):
        raise ConfigError(f"this {what} takes extra conditioning ({config['addition_embed_type']!r}, as SDXL's): "
                          f"not supported yet, only SD 1.x / 2.x {what}s")
    return getattr(diffusers, class_name).from_config(config)


def _diffusers_unet(config: dict):
    return _diffusers_model("UNet2DConditionModel", config, "U-Net")


def _tokens(cond, x: Tensor, width: int, what: str) -> Tensor:
    """The encoded prompt of a TextCond, on x's device and in its dtype, checked against the network's width."""
    if cond is None or not hasattr(cond, "tokens"):
        raise ConfigError(f"a Stable Diffusion {what} needs an encoded prompt (a TextCond; the empty prompt when "
                          f"unconditional), got {type(cond).__name__}")
    tokens = cond.tokens.to(x.device)  # the text encoder may live elsewhere (offloaded to the CPU)
    if tokens.shape[-1] != width:
        raise ConfigError(f"the {what} cross-attends to {width}-wide tokens, the text encoder gives "
                          f"{tokens.shape[-1]}")
    return tokens.to(x.dtype)


class SDUNet(nn.Module):
    """(x (B, 4, h, w), t (B,), TextCond (B, L, D)) -> eps or v (B, 4, h, w), by diffusers' UNet2DConditionModel."""

    def __init__(self, config: SDUNetConfig, unet: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else _diffusers_unet(config.unet)
        self.context_dim = int(self.unet.config.cross_attention_dim)

    def forward(self, x: Tensor, t: Tensor, cond=None, control=None) -> Tensor:
        """``control``: (residuals, one per skip; the middle's residual), a ControlNet's sum, added by diffusers'
        U-Net to its skips and middle output."""
        tokens = _tokens(cond, x, self.context_dim, "U-Net")
        # SD attends to every position of the padded prompt (as trained): the mask is not applied
        if control is None:
            return self.unet(x, t, encoder_hidden_states=tokens, return_dict=False)[0]
        residuals, mid = control
        return self.unet(x, t, encoder_hidden_states=tokens,
                         down_block_additional_residuals=tuple(r.to(x.dtype) for r in residuals),
                         mid_block_additional_residual=mid.to(x.dtype), return_dict=False)[0]

    def enable_gradient_checkpointing(self, on: bool = True) -> "SDUNet":
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        return self


# --------------------------------------------------------------------------------------------------------------
# Stable Diffusion's ControlNets (diffusers' ControlNetModel), for ``models.controlnet.ControlledUNet``


def _plain(config) -> dict:
    """A diffusers config as a JSON-ready dict: no ``_`` keys, tuples as lists."""
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


@dataclass
class SDControlNetConfig:
    """``controlnet``: the diffusers ``ControlNetModel`` config (its ``config.json`` without the ``_`` keys)."""

    controlnet: dict = field(default_factory=dict)

    def __post_init__(self):
        need(isinstance(self.controlnet, dict) and self.controlnet,
             "an SD ControlNet config needs the diffusers 'controlnet' config")
        self.controlnet = _plain(self.controlnet)

    @property
    def hint_channels(self) -> int:
        return int(self.controlnet.get("conditioning_channels", 3))

    @property
    def hint_factor(self) -> int:
        """Pixels of the control image per latent position: the hint encoder's stride-2 stages."""
        widths = self.controlnet.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        return 2 ** (len(widths) - 1)

    def to_dict(self) -> dict:
        return {"controlnet": dict(self.controlnet)}

    @classmethod
    def from_dict(cls, d: dict) -> "SDControlNetConfig":
        unknown = set(d) - {"controlnet"}
        if unknown:
            raise ConfigError(f"unknown SD ControlNet config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def of(cls, controlnet) -> "SDControlNetConfig":
        """The config of a built diffusers ControlNetModel."""
        return cls(_plain(controlnet.config))


def _diffusers_controlnet(config: dict):
    return _diffusers_model("ControlNetModel", config, "ControlNet")


class SDControlNet(nn.Module):
    """(x (B, 4, h, w), t (B,), TextCond, hint (B, 3, 8h, 8w) in [0, 1]) -> (residuals, one per skip of the SD U-Net;
    the middle's residual), by diffusers' ControlNetModel at conditioning scale 1 (``ControlledUNet`` scales)."""

    def __init__(self, config: SDControlNetConfig, controlnet: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.controlnet = controlnet if controlnet is not None else _diffusers_controlnet(config.controlnet)
        self.context_dim = int(self.controlnet.config.cross_attention_dim)

    def check_hint(self, hint: Tensor, x: Tensor) -> None:
        f, c = self.config.hint_factor, self.config.hint_channels
        want = (x.shape[0], c, x.shape[2] * f, x.shape[3] * f)
        if not torch.is_tensor(hint) or tuple(hint.shape) != want:
            got = tuple(hint.shape) if torch.is_tensor(hint) else type(hint).__name__
            raise ConfigError(f"the control image batch is {got}; this ControlNet takes {want} ({c} channels at "
                              f"{f}x the latent size, values in [0, 1], one per sample)")

    def forward(self, x: Tensor, t: Tensor, cond, hint: Tensor) -> tuple[list[Tensor], Tensor]:
        tokens = _tokens(cond, x, self.context_dim, "ControlNet")
        self.check_hint(hint, x)
        down, mid = self.controlnet(x, t, encoder_hidden_states=tokens, controlnet_cond=hint.to(x.device, x.dtype),
                                    conditioning_scale=1.0, return_dict=False)
        return list(down), mid

    def enable_gradient_checkpointing(self, on: bool = True) -> "SDControlNet":
        if on:
            self.controlnet.enable_gradient_checkpointing()
        else:
            self.controlnet.disable_gradient_checkpointing()
        return self
