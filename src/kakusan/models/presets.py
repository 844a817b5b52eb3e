"""Named U-Net configurations. ``get_preset(name)`` returns a fresh config; keyword overrides apply on top."""

from __future__ import annotations

from dataclasses import replace

from ..errors import ConfigError
from .unet import UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # for tests: a few thousand parameters, any 8x8-divisible size
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
    # DDPM's CIFAR-10 network (Ho et al. 2020, appendix B); same architecture as diffusers' UNet2DModel in the
    # google/ddpm-cifar10-32 configuration
    "ddpm-cifar10": UNetConfig(image_size=32, in_channels=3, out_channels=3, channels=128,
                               channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                               dropout=0.1, norm_groups=32, time_conditioning="add"),
}


def get_preset(name: str, **overrides) -> UNetConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError(f"bad override for preset {name!r}: {e}") from None
