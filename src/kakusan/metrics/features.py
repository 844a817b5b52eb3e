"""Feature extractors: uint8 images -> (features, logits), each with a record of what it is.

- ``inception``: the standard FID Inception-v3 (``inception.py``), 2,048-D pool3 features, 1,008 logits;
- ``classifier:FILE``: a domain classifier kakusan trained on the real data (``classifier.py``).
Spec strings: ``inception`` (published weights from the cache), ``inception:FILE``, ``classifier:FILE``.
"""

from __future__ import annotations

import torch

from ..data.datasets import resize_uint8
from ..errors import ConfigError, DataError
from .classifier import to_unit

Tensor = torch.Tensor


class FeatureExtractor:
    """Wraps a network that maps uint8 images to (features, logits). ``record`` says which network, which
    weights (SHA-256), what input it takes and how images are resized to it."""

    def __init__(self, name: str, net: torch.nn.Module, weights_sha256: str, feature_dim: int,
                 channels: int | None, image_size: int | None, resize: str, extra: dict | None = None):
        self.name, self.net, self.weights_sha256 = name, net.eval(), weights_sha256
        self.feature_dim, self.channels, self.image_size, self.resize = feature_dim, channels, image_size, resize
        self.extra = extra or {}

    @property
    def record(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "feature_dim": self.feature_dim,
                "input": {"channels": self.channels, "image_size": self.image_size}, "resize": self.resize,
                "feature_dtype": "float32", **self.extra}

    def check_images(self, images: Tensor, what: str = "images") -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DataError(f"{what}: expected uint8 images (N, C, H, W), got {tuple(images.shape)} {images.dtype}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise DataError(f"{what} have {images.shape[1]} channel(s); the {self.name} extractor takes "
                            f"{self.channels}")

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 200, device: str | torch.device = "cpu",
                 what: str = "images") -> tuple[Tensor, Tensor]:
        """uint8 (N, C, H, W) -> float32 features (N, D) and logits (N, K), on CPU."""
        self.check_images(images, what)
        net = self.net.to(device)
        feats, logits = [], []
        for i in range(0, len(images), batch_size):
            f, z = net(images[i:i + batch_size].to(device))
            feats.append(f.float().cpu())
            logits.append(z.float().cpu())
        return torch.cat(feats), torch.cat(logits)


class _ClassifierNet(torch.nn.Module):
    def __init__(self, model, image_size: int):
        super().__init__()
        self.model, self.image_size = model, image_size

    def forward(self, images_u8: Tensor) -> tuple[Tensor, Tensor]:
        if images_u8.shape[-1] != self.image_size or images_u8.shape[-2] != self.image_size:
            images_u8 = resize_uint8(images_u8, self.image_size)
        f = self.model.features(to_unit(images_u8))
        return f, self.model.head(f)


def load_extractor(spec: str, download: bool = False) -> FeatureExtractor:
    """``inception`` | ``inception:FILE`` | ``classifier:FILE``."""
    kind, _, path = spec.partition(":")
    if kind == "inception":
        from .inception import load_fid_inception

        net, digest = load_fid_inception(path or None, download=download)
        return FeatureExtractor("inception-v3-fid", net, digest, 2048, None, None,
                                "to 299x299, torch bilinear, align_corners=False (pytorch-fid); grey -> RGB")
    if kind == "classifier":
        if not path:
            raise ConfigError("the classifier extractor needs a file: classifier:FILE (see kakusan train-classifier)")
        from .classifier import load_classifier
        from .provenance import file_sha256

        model, report = load_classifier(path)
        cfg = model.cfg
        return FeatureExtractor(
            "kakusan-domain-classifier", _ClassifierNet(model, cfg.image_size), file_sha256(path),
            cfg.feature_dim, cfg.in_channels, cfg.image_size,
            f"to {cfg.image_size}x{cfg.image_size} antialiased bilinear when sizes differ",
            {"trained_on": cfg.data, "test_accuracy": report.get("test_accuracy"), "num_classes": cfg.num_classes})
    raise ConfigError(f"unknown feature extractor {spec!r}; use inception, inception:FILE or classifier:FILE")
