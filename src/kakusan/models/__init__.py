from .dit import DiT, DiTConfig
from .layers import timestep_embedding
from .presets import PRESETS, build_model, describe, get_preset, model_config_from_dict, model_record
from .unet import UNet, UNetConfig

__all__ = ["PRESETS", "get_preset", "build_model", "describe", "model_config_from_dict", "model_record", "DiT",
           "DiTConfig", "UNet", "UNetConfig", "timestep_embedding"]
