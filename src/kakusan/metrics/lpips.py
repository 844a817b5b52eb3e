"""Perceptual distance between two images: LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep
features as a perceptual metric", eq. 1, version 0.1), and a labelled stand-in where no LPIPS weights are on disk.

LPIPS between images x and y, with f_l the activations of layer l of an ImageNet backbone (C_l channels, H_l x W_l),
each position's channel vector scaled to unit length (f^_l), and w_l >= 0 one learned weight per channel:

    d(x, y) = sum_l  1 / (H_l W_l)  sum_{h,w}  sum_c  w_{l,c} (f^_l(x) - f^_l(y))_{c,h,w}^2

The backbones are torchvision's AlexNet and VGG-16 convolution stacks, written out here with torchvision's parameter
names (``features.N.weight``), so torchvision's published weight files load as they are (read with
``torch.load(weights_only=True)``, their SHA-256 checked against the prefix in the published file names). The
linear heads w_l are the ones the ``lpips`` package ships inside itself (``lpips/weights/v0.1/{alex,vgg}.pth``); its
Python code is not imported (it imports torchvision, which does not load beside a CPU build of torch), only those
files are read. Images in [-1, 1] are shifted and scaled per channel as LPIPS's own input layer does; grey images
are repeated to RGB, and images smaller than 64 px are upsampled bilinearly to 64 (AlexNet's strides need it).

The stand-in (``classifier:FILE``): the same unit-normalised squared differences over the four stages of kakusan's
domain classifier, each layer's spatial mean summed over channels with equal weights, averaged over the layers.
Not LPIPS (no learned weights, no human judgements behind it); every record and column says so.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

Tensor = torch.Tensor

# torchvision's published ImageNet weights (their names carry the first 8 hex digits of the file's SHA-256), the
# feature-stack indices whose ReLU outputs LPIPS reads, and the channels there
BACKBONES = {
    "alex": {"file": "alexnet-owt-7be5be79.pth", "sha256_prefix": "7be5be79", "taps": (1, 4, 7, 9, 11),
             "channels": (64, 192, 384, 256, 256)},
    "vgg": {"file": "vgg16-397923af.pth", "sha256_prefix": "397923af", "taps": (3, 8, 15, 22, 29),
            "channels": (64, 128, 256, 512, 512)},
}
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input layer: (x - shift) / scale per RGB channel, x in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 64
EPS = 1e-10


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` (conv 11/4 -> 5 -> 3 -> 3 -> 3, ReLUs, three 3/2 max pools)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 ``features``: 3x3 convs (64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3), a ReLU after
    each and a 2x2 max pool after each group."""
    layers, c_in = [], 3
    for group in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for c in group:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def unit_normalize(f: Tensor) -> Tensor:
    """Each position's channel vector divided by its length (+1e-10, as LPIPS): (B, C, H, W) -> same."""
    return f / (f.square().sum(1, keepdim=True).sqrt() + EPS)


def layer_distance(fa: Tensor, fb: Tensor, weight: Tensor | None = None) -> Tensor:
    """sum_c w_c mean_{h,w} (f^a - f^b)_c^2 for one layer: (B, C, H, W) x 2 -> (B,); w = 1 without ``weight``."""
    d = (unit_normalize(fa) - unit_normalize(fb)).square().mean((2, 3))  # (B, C)
    return d.sum(1) if weight is None else d @ weight


class LPIPSNet(nn.Module):
    """The backbone (``features``, torchvision's names) and the per-channel weights of each tapped layer
    (``lins.l.weight``, (1, C_l, 1, 1) as the lpips package stores them)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in BACKBONES:
            raise ConfigError(f"unknown LPIPS backbone {net!r}; choose alex or vgg")
        self.net = net
        self.features = alexnet_features() if net == "alex" else vgg16_features()
        self.taps = BACKBONES[net]["taps"]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in BACKBONES[net]["channels"])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def activations(self, x: Tensor) -> list[Tensor]:
        """The ReLU outputs LPIPS reads, for images (B, 3, H, W) in [-1, 1]."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS of image pairs (B, 3, H, W) in [-1, 1] -> (B,)."""
        fx, fy = self.activations(x), self.activations(y)
        return sum(layer_distance(a, b, lin.weight.flatten()) for a, b, lin in zip(fx, fy, self.lins))


# --------------------------------------------------------------------------------------------------------------
# Files


def hub_dir() -> Path:
    """Where torchvision keeps downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch"
    return Path(home) / "hub" / "checkpoints"


def lpips_heads_file(net: str) -> Path:
    """The lpips package's linear heads (v0.1) for ``net``, found without importing the package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("LPIPS's linear heads ship inside the lpips package, which is not installed: "
                              "pip install --no-deps lpips (only its weight files are read; its torchvision is "
                              "not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise CheckpointError(f"the lpips package has no {path.relative_to(path.parents[2])} (lpips >= 0.1.4 ships it)")
    return path


def _torch_load(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return sd


def load_lpips(net: str = "alex", backbone: str | Path | None = None, heads: str | Path | None = None,
               check_hash: bool = True) -> tuple[LPIPSNet, dict]:
    """LPIPS with ``net``'s backbone weights from ``backbone`` (default: torchvision's file in :func:`hub_dir`),
    SHA-256-checked against the published prefix, and the lpips package's heads (or ``heads``). Returns the
    network and its record. A missing or different file is refused, saying which file is wanted and where."""
    from .provenance import file_sha256

    if net not in BACKBONES:
        raise ConfigError(f"unknown LPIPS backbone {net!r}; choose alex or vgg")
    info = BACKBONES[net]
    path = Path(backbone).expanduser() if backbone else hub_dir() / info["file"]
    if not path.is_file():
        raise CheckpointError(f"LPIPS-{net} needs torchvision's ImageNet {net} weights, {info['file']} (SHA-256 "
                              f"{info['sha256_prefix']}...): {path} not found. Put the file there or pass it as "
                              f"lpips:{net}:FILE (no network is used)")
    digest = file_sha256(path)
    if check_hash and not digest.startswith(info["sha256_prefix"]):
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}... is not torchvision's {info['file']} "
                              f"({info['sha256_prefix']}...); LPIPS's heads were trained on that file's features")
    heads_path = Path(heads).expanduser() if heads else lpips_heads_file(net)
    model = LPIPSNet(net)
    sd = {k: v for k, v in _torch_load(path).items() if k.startswith("features.")}
    lin = {f"lins.{k[3]}.weight": v for k, v in _torch_load(heads_path).items()
           if k.startswith("lin") and k.endswith(".model.1.weight")}
    given, want = {**sd, **lin}, model.state_dict()
    missing = [k for k in want if k not in given]
    wrong = [f"{k} {tuple(v.shape)}" for k, v in given.items() if k not in want or want[k].shape != v.shape]
    if missing or wrong:
        raise CheckpointError(f"{path} / {heads_path}: not LPIPS-{net} weights (missing {missing[:3]}, not of "
                              f"this network: {wrong[:3]})")
    model.load_state_dict(given)
    record = {"name": "lpips", "net": net, "version": "0.1", "backbone_sha256": digest,
              "heads_sha256": file_sha256(heads_path), "input": "[-1, 1], grey -> RGB, bilinear up to "
              f"{MIN_SIZE}x{MIN_SIZE} when smaller"}
    return model, record


# --------------------------------------------------------------------------------------------------------------
# Distances of uint8 image batches


class PerceptualDistance:
    """``d(a, b) -> (N,)`` for two uint8 batches (N, C, H, W) of the same shape, with ``label`` (a column name:
    ``lpips`` or ``feature_distance``) and ``record`` (which network, which weights, stand-in or not)."""

    def __init__(self, net: nn.Module, record: dict, label: str, prepare):
        self.net, self.record, self.label, self.prepare = net.eval(), record, label, prepare

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor, batch_size: int = 100, device="cpu") -> Tensor:
        if a.shape != b.shape or a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.ndim != 4:
            raise ConfigError(f"a perceptual distance compares two uint8 batches of one shape, got {tuple(a.shape)} "
                              f"{a.dtype} and {tuple(b.shape)} {b.dtype}")
        net, out = self.net.to(device), []
        for i in range(0, len(a), batch_size):
            x, y = (self.prepare(t[i:i + batch_size].to(device)) for t in (a, b))
            out.append(net(x, y).float().cpu())
        return torch.cat(out)


def _lpips_input(images_u8: Tensor) -> Tensor:
    x = images_u8.float() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if min(x.shape[-2:]) < MIN_SIZE:
        x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
    return x


class _ClassifierDistance(nn.Module):
    """The stand-in: :func:`layer_distance` (equal weights) over the stem and three stages of a domain
    classifier, averaged over the four layers."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def activations(self, x: Tensor) -> list[Tensor]:
        h = self.model.stem(x)
        out = [h]
        for stage in self.model.stages:
            h = stage(h)
            out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.activations(x), self.activations(y)
        return sum(layer_distance(a, b) for a, b in zip(fx, fy)) / len(fx)


def classifier_distance(path: str | Path) -> PerceptualDistance:
    """The labelled stand-in distance in the features of the domain classifier at ``path``."""
    from ..data.datasets import resize_uint8
    from .classifier import load_classifier, to_unit
    from .provenance import file_sha256

    model, _ = load_classifier(path)
    if model.cfg.schedule is not None:
        raise ConfigError(f"{path} is a noise-aware classifier (for classifier guidance); the stand-in distance "
                          f"takes a clean-image domain classifier (kakusan train-classifier without --noisy)")
    size = model.cfg.image_size

    def prepare(u8: Tensor) -> Tensor:
        return to_unit(u8 if u8.shape[-1] == size else resize_uint8(u8, size))

    record = {"name": "classifier-feature-distance", "stand_in_for": "lpips",
              "note": "not LPIPS: unit-normalised feature differences of kakusan's domain classifier (stem and "
                      "three stages), equal channel weights, averaged over the layers",
              "weights_sha256": file_sha256(path), "trained_on": model.cfg.data}
    return PerceptualDistance(_ClassifierDistance(model), record, "feature_distance", prepare)


def load_distance(spec: str) -> PerceptualDistance:
    """``lpips:alex`` | ``lpips:vgg`` (torchvision's file from :func:`hub_dir`) | ``lpips:NET:FILE`` |
    ``classifier:FILE`` (the labelled stand-in)."""
    kind, _, rest = spec.partition(":")
    if kind == "lpips":
        net, _, path = rest.partition(":")
        model, record = load_lpips(net or "alex", path or None)
        return PerceptualDistance(model, record, "lpips", _lpips_input)
    if kind == "classifier" and rest:
        return classifier_distance(rest)
    raise ConfigError(f"unknown distance {spec!r}; use lpips:alex, lpips:vgg, lpips:NET:FILE or classifier:FILE")


def default_distance(extractor_spec: str | None) -> tuple[str, str | None]:
    """The distance to use when none is named: LPIPS-AlexNet where its weights are on disk (torchvision's file in
    :func:`hub_dir` and the lpips package's heads), else the stand-in in the classifier of ``extractor_spec``.
    Returns (spec, a line saying why the stand-in was chosen, or None)."""
    have_backbone = (hub_dir() / BACKBONES["alex"]["file"]).is_file()
    have_heads = importlib.util.find_spec("lpips") is not None
    if have_backbone and have_heads:
        return "lpips:alex", None
    why = (f"{hub_dir() / BACKBONES['alex']['file']} not found" if not have_backbone
           else "the lpips package (its heads) is not installed")
    if extractor_spec and extractor_spec.startswith("classifier:"):
        return extractor_spec, (f"no LPIPS weights on disk ({why}): the distance to the reference is the stand-in "
                                f"in the domain classifier's features (column feature_distance), not LPIPS")
    raise ConfigError(f"no LPIPS weights on disk ({why}) and no domain classifier for the stand-in: pass "
                      f"--distance lpips:alex:FILE (torchvision's {BACKBONES['alex']['file']}) or "
                      f"--distance classifier:FILE")
