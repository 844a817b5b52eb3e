"""Models of other codebases as kakusan checkpoints: a converted checkpoint (config + safetensors, nothing
pickled) samples and evaluates like one kakusan trained.

``import_dit``: a checkpoint of the DiT paper's released code (Peebles & Xie 2023; e.g. DiT-XL-2-256x256.pt,
class-conditional ImageNet in the latent space of Stable Diffusion's f = 8 autoencoder). Its diffusion is
DDPM's linear schedule over 1,000 steps with eps prediction (the learned variance is not used by kakusan's
samplers); its latents are the autoencoder's times 0.18215, the constant it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .diffusion import DiffusionConfig
from .errors import CheckpointError
from .metrics.provenance import file_sha256
from .models import model_record
from .models.dit import DiT, config_from_state, read_reference_state
from .schedules import ScheduleConfig
from .checkpoints import load_state_dict_into, save_checkpoint

DIT_LATENT_SCALE = 0.18215  # the released DiTs' latent scale (Stable Diffusion's autoencoder)


def import_dit(weights: str | Path, out: str | Path, *, autoencoder: str | Path | None = None,
               latent_scale: float = DIT_LATENT_SCALE, num_heads: int | None = None,
               class_names: list[str] | None = None) -> Path:
    """Convert a released DiT checkpoint into the run folder ``out``; returns the checkpoint folder.

    ``autoencoder``: the diffusers ``AutoencoderKL`` folder of its latent space (sd-vae-ft-ema / -mse), recorded
    by hash with ``latent_scale`` so that ``kakusan sample`` decodes; without it the checkpoint samples latents.
    """
    weights = Path(weights).expanduser()
    state = read_reference_state(weights)
    cfg = config_from_state(state, num_heads, where=str(weights))
    model = DiT(cfg)
    load_state_dict_into(model, state, weights)
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a model of {cfg.num_classes} classes")
    config = {
        "model": model_record(cfg),
        "schedule": ScheduleConfig("linear", 1000).to_dict(),
        "diffusion": DiffusionConfig("eps", "simple").to_dict(),
        "data": {"spec": f"imported:{weights}", "name": f"imported from {weights.name}", "size": 0,
                 "shape": [cfg.in_channels, cfg.image_size, cfg.image_size], "class_names": class_names or []},
        "imported": {"kind": "dit", "path": str(weights), "sha256": file_sha256(weights)},
    }
    if autoencoder is not None:
        from .checkpoints import load_autoencoder

        ae = load_autoencoder(autoencoder)
        if ae.latent_channels != cfg.in_channels:
            raise CheckpointError(f"the autoencoder {ae.source} has {ae.latent_channels} latent channels, the DiT "
                                  f"takes {cfg.in_channels}")
        ae.scale = latent_scale
        config["autoencoder"] = ae.record()
    out = Path(out)
    with torch.no_grad():
        return save_checkpoint(out / "checkpoints", 0, config, model, model, None, {"imported": True})
