"""Writing samples as pictures: a grid PNG, or one PNG per image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import to_uint8


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: int = 255
              ) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (H', W', C) grid with ``nrow`` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def png_info(record: dict | None):
    """PNG text chunks for a generation record: ``kakusan`` (the JSON record, what ``--from-png`` reads) and
    ``parameters`` (a one-line summary in the form image viewers and web UIs show)."""
    if record is None:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("kakusan", json.dumps(record))
    cond = record.get("cond", record.get("prompt") if record.get("prompt") is not None else record.get("class_label"))
    parts = [f"Steps: {record.get('steps')}", f"Sampler: {record.get('sampler')}",
             f"CFG scale: {record.get('guidance')}", f"Seed: {record.get('seed')}",
             f"Model hash: {str(record.get('checkpoint_sha256'))[:10]}", f"kakusan: {record.get('kakusan_version')}"]
    if record.get("guidance_kind") == "auto":  # the scale is autoguidance's, not classifier-free guidance's
        parts[2] = f"Autoguidance scale: {record.get('guidance')}"
        parts.insert(5, f"Guide hash: {str((record.get('guide') or {}).get('sha256'))[:10]}")
    info.add_text("parameters", f"{cond if cond is not None else ''}\n" + ", ".join(parts))
    return info


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, min_size: int = 256,
              record: dict | None = None) -> Path:
    """Save samples in [-1, 1] (or uint8) as a grid PNG, enlarged (nearest) so the grid is >= min_size px;
    ``record``: the generation record it carries (a PNG text chunk)."""
    images = x if x.dtype == torch.uint8 else to_uint8(x)
    grid = make_grid(images, nrow)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, math.ceil(min_size / max(im.size)))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, pnginfo=png_info(record))
    return path


def save_images(x: torch.Tensor, folder: str | Path, prefix: str = "sample",
                records: list[dict] | None = None) -> list[Path]:
    """One PNG per image (at its own size), each carrying its generation record (``records[i]``) if given."""
    images = x if x.dtype == torch.uint8 else to_uint8(x)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        p = folder / f"{prefix}-{i:05d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
            p, pnginfo=png_info(records[i] if records else None))
        paths.append(p)
    return paths
