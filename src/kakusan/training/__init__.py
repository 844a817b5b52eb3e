from .checkpoint import read_config, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .trainer import Trainer, TrainConfig, apply_checkpoint_lora, load_denoiser

__all__ = ["EMA", "Trainer", "TrainConfig", "apply_checkpoint_lora", "load_denoiser", "read_config", "resolve_checkpoint",
           "save_checkpoint"]
