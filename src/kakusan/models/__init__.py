from .presets import PRESETS, get_preset
from .unet import UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "get_preset", "UNet", "UNetConfig", "timestep_embedding"]
