"""Named backbone configurations (U-Nets and DiTs). ``get_preset(name)`` returns a fresh config; keyword
overrides apply on top. ``build_model`` makes the network of a config, and a checkpoint's ``model`` record
(``model_record``: the config's fields and its ``type``) rebuilds it through ``model_config_from_dict``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import CheckpointError, ConfigError
from .dit import DiT, DiTConfig
from .sd_unet import SDUNet, SDUNetConfig
from .unet import UNet, UNetConfig

ModelConfig = UNetConfig | DiTConfig | SDUNetConfig

PRESETS: dict[str, ModelConfig] = {
    # for tests: ~0.2M parameters, any size divisible by 2
    "unet-tiny": UNetConfig(image_size=8, in_channels=1, out_channels=1, channels=16, channel_mults=(1, 2),
                            num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, norm_groups=8,
                            time_conditioning="scale-shift"),
    # the demo: sklearn's real 8x8 digits on a laptop CPU (~1.1M parameters)
    "unet-digits": UNetConfig(image_size=8, in_channels=1, out_channels=1, channels=32, channel_mults=(1, 2),
                              num_res_blocks=2, attention_resolutions=(4,), dropout=0.0, norm_groups=8,
                              time_conditioning="scale-shift"),
    # MNIST / Fashion-MNIST at 28x28 on a CPU (~1.2M parameters, ~0.75 s per step of 64 on 2 cores): 28 -> 14 -> 7
    "unet-mnist": UNetConfig(image_size=28, in_channels=1, out_channels=1, channels=32, channel_mults=(1, 2, 2),
                             num_res_blocks=1, attention_resolutions=(7,), dropout=0.0, norm_groups=16,
                             time_conditioning="scale-shift"),
    # text-to-image at 32x32 RGB on a CPU (the emoji set; ~2.1M parameters with a 384-wide text encoder):
    # 32 -> 16 -> 8, transformer blocks (self-attention, cross-attention to the prompt) at 16 and 8
    "unet-text32": UNetConfig(image_size=32, in_channels=3, out_channels=3, channels=32, channel_mults=(1, 2, 2),
                              num_res_blocks=1, attention_resolutions=(16, 8), attention_head_dim=32,
                              dropout=0.0, norm_groups=16, time_conditioning="scale-shift"),
    # DDPM's CIFAR-10 network (Ho et al. 2020, appendix B); the same network as diffusers' UNet2DModel in the
    # google/ddpm-cifar10-32 configuration (tests/test_unet.py maps its weights in and compares the outputs),
    # its downsampling padded after the last row and column as DDPM's TensorFlow code pads it
    "ddpm-cifar10": UNetConfig(image_size=32, in_channels=3, out_channels=3, channels=128,
                               channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                               dropout=0.1, norm_groups=32, time_conditioning="add",
                               downsample_padding="bottom-right"),
    # DiTs. For tests: two blocks, 16 tokens
    "dit-tiny": DiTConfig(image_size=8, in_channels=1, out_channels=1, patch_size=2, hidden_size=32, depth=2,
                          num_heads=2),
    # MNIST / Fashion-MNIST at 28x28 on a CPU: 4x4 patches (49 tokens), 6 blocks of width 192 (~4.1M parameters)
    "dit-mnist": DiTConfig(image_size=28, in_channels=1, out_channels=1, patch_size=4, hidden_size=192, depth=6,
                           num_heads=3),
    # the paper's sizes (Peebles & Xie 2023, table 1) with 2x2 patches, on 32x32x4 latents (256x256 images through
    # Stable Diffusion's f = 8 autoencoder); the trainer sizes them to the data or latents it is given
    "dit-s2": DiTConfig(image_size=32, in_channels=4, out_channels=4, hidden_size=384, depth=12, num_heads=6),
    "dit-b2": DiTConfig(image_size=32, in_channels=4, out_channels=4, hidden_size=768, depth=12, num_heads=12),
    "dit-l2": DiTConfig(image_size=32, in_channels=4, out_channels=4, hidden_size=1024, depth=24, num_heads=16),
    "dit-xl2": DiTConfig(image_size=32, in_channels=4, out_channels=4, hidden_size=1152, depth=28, num_heads=16),
}

_TYPES = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT), "sd-unet": (SDUNetConfig, SDUNet)}


def get_preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError(f"bad override for preset {name!r}: {e}") from None


def build_model(config: ModelConfig) -> torch.nn.Module:
    """The backbone network of a U-Net or DiT config."""
    for cfg_cls, model_cls in _TYPES.values():
        if isinstance(config, cfg_cls):
            return model_cls(config)
    raise ConfigError(f"not a model config: {type(config).__name__}")


def model_record(config: ModelConfig) -> dict:
    """The ``model`` entry of a checkpoint's config: the architecture's name and its fields."""
    kind = next(k for k, (cfg_cls, _) in _TYPES.items() if isinstance(config, cfg_cls))
    return {"type": kind, **config.to_dict()}


def model_config_from_dict(record: dict, where: str = "checkpoint") -> ModelConfig:
    """Rebuild a config from a ``model_record`` (a record without ``type`` is a U-Net, as the first checkpoints)."""
    d = dict(record)
    kind = d.pop("type", "unet")
    if kind not in _TYPES:
        raise CheckpointError(f"{where}: unknown model type {kind!r} (known: {', '.join(_TYPES)})")
    return _TYPES[kind][0].from_dict(d)


def describe(config: ModelConfig) -> str:
    """One line on a config's architecture, for ``kakusan presets``."""
    size = f"{config.image_size}x{config.image_size}x{config.in_channels}"
    if isinstance(config, DiTConfig):
        return (f"{size}  DiT, {config.patch_size}x{config.patch_size} patches ({config.num_patches} tokens), "
                f"{config.depth} blocks of width {config.hidden_size}, {config.num_heads} heads")
    return (f"{size}  U-Net, channels {config.channels} x {list(config.channel_mults)}, "
            f"attention at {list(config.attention_resolutions)}")
