"""Control maps and ControlNet checkpoints: what steers a model's structure (see models.controlnet).

Control maps are computed from images by OpenCV (``pip install 'kakusan[control]'``), as ControlNet's own
annotators do:
- ``canny``: ``cv2.Canny`` on the image (RGB or grey; thresholds 100 / 200, ControlNet's defaults), 0 / 1 edges;
- ``sobel``: the Sobel gradient magnitude of the grey image, scaled to [0, 1] per image;
- ``scribble``: a hand-drawn-looking sketch: the Canny edges moved by a small random affine jitter (up to 1 px
  and 6 degrees), thickened by a 3x3 dilation (seeded per image, so a data set's maps repeat).
Maps are (N, 1, H, W) float in [0, 1]; a ControlNet that takes 3 channels (Stable Diffusion's) gets it repeated.

A ControlNet checkpoint is a training run of ``kakusan train --controlnet``: the ControlNet's weights alone, its
config, and the hash of the base weights it was trained on (``controlnet.base``); an SD ControlNet is a diffusers
``ControlNetModel`` folder or a community single file (kakusan.sd). ``load_controlnet`` reads either and refuses
one made for another base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

Tensor = torch.Tensor
CONTROL_TYPES = ("canny", "sobel", "scribble")
CANNY_LOW, CANNY_HIGH = 100, 200


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("control maps (canny / sobel / scribble) need OpenCV: pip install 'kakusan[control]' "
                          "(opencv-python-headless), or give the control image itself") from None
    return cv2


def _u8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) uint8, or float in [-1, 1] -> (N, H, W, C) uint8."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"control maps are computed from (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


def _grey_u8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) uint8, or float in [-1, 1] -> (N, H, W) uint8 grey (ITU-R 601 luma for colour)."""
    x = _u8(images).transpose(0, 3, 1, 2)
    if x.shape[1] == 3:
        grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        return np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x[:, 0])


def control_maps(images: Tensor, kind: str, seed: int = 0) -> Tensor:
    """The ``kind`` control map of each image: (N, 1, H, W) float in [0, 1]. ``seed``: the scribble jitter of
    image i is drawn from seed + i."""
    if kind not in CONTROL_TYPES:
        raise ConfigError(f"unknown control type {kind!r}; choose from {', '.join(CONTROL_TYPES)}")
    cv2 = _cv2()
    grey = _grey_u8(images)
    pixels = _u8(images)  # Canny on the image itself (OpenCV takes the strongest channel's gradient for colour)
    out = np.empty(grey.shape, dtype=np.float32)
    for i, g in enumerate(grey):
        if kind == "sobel":
            gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
            gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
            mag = np.sqrt(gx * gx + gy * gy)
            out[i] = mag / mag.max() if mag.max() > 0 else mag
            continue
        edges = cv2.Canny(pixels[i] if pixels.shape[-1] == 3 else g, CANNY_LOW, CANNY_HIGH)
        if kind == "scribble":
            rng = np.random.default_rng(seed + i)
            h, w = g.shape
            m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-6, 6)), 1.0)
            m[:, 2] += rng.uniform(-1, 1, size=2)
            edges = cv2.warpAffine(edges, m, (w, h), flags=cv2.INTER_NEAREST)
            edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
        out[i] = edges > 0
    return torch.from_numpy(out)[:, None]


def edge_f1(reference: Tensor, images: Tensor, tolerance: int = 1) -> Tensor:
    """Per image, the F1 score between the edges of a reference map (N, 1, H, W) in [0, 1] (> 0.5 = edge) and the
    Canny edges of ``images``, a pixel counting as matched when an edge of the other lies within ``tolerance``
    pixels (Chebyshev distance, by dilation): precision = sample edges near a reference edge, recall = reference
    edges near a sample edge. An image pair without edges on both sides scores 1, one side empty 0."""
    cv2 = _cv2()
    ref = (reference[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    got = (control_maps(images, "canny")[:, 0] > 0.5).numpy().astype(np.uint8)
    k = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    scores = []
    for r, g in zip(ref, got):
        nr, ng = int(r.sum()), int(g.sum())
        if nr == 0 and ng == 0:
            scores.append(1.0)
            continue
        if nr == 0 or ng == 0:
            scores.append(0.0)
            continue
        precision = float((g & cv2.dilate(r, k)).sum()) / ng
        recall = float((r & cv2.dilate(g, k)).sum()) / nr
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return torch.tensor(scores)


# --------------------------------------------------------------------------------------------------------------
# ControlNet checkpoints


def load_controlnet(path: str | Path, *, base_sha256: str | None, base_config: dict, device="cpu",
                    use_ema: bool = True, base_weights_ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """(ControlNet module, record) of a kakusan ControlNet run / checkpoint, or of an SD ControlNet (a diffusers
    ``ControlNetModel`` folder or single file) for a Stable Diffusion base; refused when made for another base
    (kakusan's: the recorded base weights hash differs from ``base_sha256``)."""
    from .checkpoints import load_state_dict_into, load_tensors, read_config, resolve_checkpoint, weights_file
    from .metrics.provenance import file_sha256

    model = base_config.get("model", {})
    path = Path(path).expanduser()
    if model.get("type") == "sd-unet":
        from .sd import is_sd_controlnet, load_sd_controlnet

        if not is_sd_controlnet(path):
            raise CheckpointError(f"{path}: not a Stable Diffusion ControlNet (a diffusers ControlNetModel folder or "
                                  f"a single file with control_model.* weights), which this SD base needs")
        net, record = load_sd_controlnet(path, model["unet"], device=device)
        return net.to(device).eval(), record
    from .sd import is_sd_controlnet

    if is_sd_controlnet(path):
        raise CheckpointError(f"{path}: a Stable Diffusion ControlNet; it steers a Stable Diffusion base, not this "
                              f"kakusan model")
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    record = config.get("controlnet")
    if record is None:
        raise CheckpointError(f"{ckpt}: not a ControlNet checkpoint (train one with kakusan train --controlnet)")
    base = record["base"]
    if base_sha256 is not None and base["sha256"] != base_sha256:
        raise CheckpointError(f"{ckpt}: this ControlNet was trained on the base {base['path']} (its "
                              f"{base['weights']}, sha256 {base['sha256'][:12]}); the base weights given have sha256 "
                              f"{str(base_sha256)[:12]}" + ("" if base_weights_ema else " (--no-ema: the raw weights, "
                                                            "not the EMA weights the ControlNet was trained on)"))
    from .models.controlnet import ControlNet, ControlNetConfig

    net = ControlNet(ControlNetConfig.from_dict(record["config"]))
    weights = weights_file(ckpt, use_ema)
    load_state_dict_into(net, load_tensors(weights), weights)
    return net.to(device).eval(), {"path": str(ckpt), "sha256": file_sha256(weights), "type": "unet",
                                   "control": record.get("control"), "base_sha256": base["sha256"]}


def hint_shape(net: torch.nn.Module) -> tuple[int, int]:
    """(channels, pixels per model input position) of a ControlNet's control image."""
    cfg = net.config
    if hasattr(cfg, "hint_channels"):
        return cfg.hint_channels, cfg.hint_factor
    return int(cfg.controlnet.get("conditioning_channels", 3)), 8  # an SD ControlNet: RGB at the pixel size
