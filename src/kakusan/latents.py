"""The latent cache: a data set encoded once by a frozen autoencoder, kept as a safetensors file with its
provenance (the autoencoder's weights hash and latent scale, the data set and a hash of its pixels, the encoding
mode), so training a latent model never runs the encoder. A cache that no longer matches its inputs is refused.

Modes: ``mean`` (the posterior means, deterministic) or ``sample`` (one draw from each posterior, seeded).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .data import ImageDataset, to_model_range
from .errors import ConfigError, DataError
from .metrics.provenance import tensor_sha256
from .checkpoints import LoadedAutoencoder
from .checkpoints import save_file_atomic

MODES = ("mean", "sample")


def cache_record(ae: LoadedAutoencoder, data: ImageDataset, data_spec: str, mode: str, seed: int) -> dict:
    return {"kind": "kakusan-latents", "autoencoder_sha256": ae.sha256, "scale_factor": ae.scale,
            "data_spec": data_spec, "data_name": data.name, "n": len(data), "shape": list(data.shape),
            "pixels_sha256": tensor_sha256(data.images), "mode": mode, "seed": seed if mode == "sample" else None}


@torch.no_grad()
def encode_dataset(ae: LoadedAutoencoder, images: torch.Tensor, mode: str = "mean", seed: int = 0,
                   batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> scaled latents (N, c, H / f, W / f), float32 on the CPU."""
    if mode not in MODES:
        raise ConfigError(f"latent mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = next(ae.module.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=None if progress else True):
        x = to_model_range(images[i:i + batch_size]).to(device)
        out.append(ae.to_latent(x, mode, gen).float().cpu())
    return torch.cat(out)


def latent_cache(ae: LoadedAutoencoder, data: ImageDataset, data_spec: str, mode: str = "mean", seed: int = 0,
                 path: str | Path | None = None, cache_dir: Path | None = None, progress: bool = False
                 ) -> tuple[torch.Tensor, Path]:
    """The scaled latents of ``data``, read from ``path`` (an explicit cache file, checked against the inputs:
    a stale one is refused) or from / into ``cache_dir`` under a name keyed by the inputs."""
    record = cache_record(ae, data, data_spec, mode, seed)
    if path is None:
        key = hashlib.sha256(json.dumps({k: record[k] for k in ("autoencoder_sha256", "scale_factor",
                                                                "pixels_sha256", "mode", "seed")}).encode())
        path = Path(cache_dir) / f"latents-{key.hexdigest()[:16]}.safetensors"
    path = Path(path)
    if path.is_file():
        check_cache(path, record)
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("latents"), path
    latents = encode_dataset(ae, data.images, mode, seed, progress=progress)
    save_file_atomic(path, {"latents": latents}, {"kakusan_latents": json.dumps(record)})
    return latents, path


def check_cache(path: Path, record: dict) -> None:
    try:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("kakusan_latents", "null"))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise DataError(f"{path}: unreadable latent cache ({e}); delete it to encode again") from None
    if not isinstance(saved, dict) or saved.get("kind") != "kakusan-latents":
        raise DataError(f"{path}: not a kakusan latent cache")
    what = {"autoencoder_sha256": "the autoencoder changed", "scale_factor": "the latent scale changed",
            "pixels_sha256": "the data changed", "n": "the data changed", "mode": "the encoding mode differs",
            "seed": "the posterior-sample seed differs"}
    stale = [why for k, why in what.items() if saved.get(k) != record.get(k)]
    if stale:
        raise DataError(f"{path}: stale latent cache ({'; '.join(dict.fromkeys(stale))}); delete it or pass another "
                        f"--latent-cache path to encode again")
