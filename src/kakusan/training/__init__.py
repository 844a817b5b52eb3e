from ..checkpoints import read_config, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .trainer import Trainer, TrainConfig

__all__ = ["EMA", "Trainer", "TrainConfig", "read_config", "resolve_checkpoint", "save_checkpoint"]
