"""A domain classifier that kakusan trains on the real data set, for offline evaluation.

No Inception weights can be fetched here, and Inception features of 28x28 digits mean little anyway. A small
ResNet-style network trained on the data set's own training split gives (a) penultimate features for a
Frechet distance / KID / precision-recall in a space that knows the domain, (b) logits for an Inception-style
score, and (c) a per-class accuracy check of class-conditional samples.

Architecture (``widths = (w1, w2, w3)``): a 3x3 stem conv, then three stages, each
``conv3x3 -> maxpool 2 -> BN -> GELU`` followed by a residual ``(conv3x3 -> BN -> GELU) x 2``; global max pool
-> ``features`` (w3-dimensional) -> linear -> logits. Stored as one safetensors file whose metadata holds the
config and the test accuracies; its SHA-256 names it in every score's provenance record.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, config_from_dict
from .provenance import file_sha256

Tensor = torch.Tensor
KIND = "kakusan-domain-classifier"


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    data: str = ""  # the data set spec it was trained on
    class_names: list[str] = field(default_factory=list)
    schedule: dict | None = None  # a ScheduleConfig: trained on x_t of this schedule (for classifier guidance)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ConfigError(f"classifier widths must be three positive numbers, got {self.widths}")
        if self.image_size < 8:
            raise ConfigError(f"classifier image_size must be >= 8 (three 2x poolings), got {self.image_size}")

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return config_from_dict(cls, d, "classifier")


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class _Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(c_out), nn.GELU())
        self.res = nn.Sequential(_conv_bn(c_out, c_out), _conv_bn(c_out, c_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.res(x)


class DomainClassifier(nn.Module):
    """(B, C, H, W) in [-1, 1] -> logits (B, K); ``features`` gives the (B, widths[-1]) penultimate layer."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w1, w2, w3 = cfg.widths
        self.stem = _conv_bn(cfg.in_channels, w1)
        self.stages = nn.Sequential(_Stage(w1, w1), _Stage(w1, w2), _Stage(w2, w3))
        self.head = nn.Linear(w3, cfg.num_classes)
        if cfg.schedule is not None:  # noise-level aware: a time embedding added after the stem and each stage
            self.t_embed = nn.Sequential(nn.Linear(64, 128), nn.SiLU())
            self.t_proj = nn.ModuleList(nn.Linear(128, w) for w in (w1, w1, w2, w3))

    def features(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        h = self.stem(x)
        if self.cfg.schedule is None:
            return self.stages(h).amax(dim=(2, 3))
        from ..models.unet import timestep_embedding

        t = torch.zeros(len(x), device=x.device) if t is None else torch.as_tensor(t, device=x.device).expand(len(x))
        e = self.t_embed(timestep_embedding(t, 64))
        h = h + self.t_proj[0](e)[:, :, None, None]
        for stage, proj in zip(self.stages, self.t_proj[1:]):
            h = stage(h) + proj(e)[:, :, None, None]
        return h.amax(dim=(2, 3))

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Logits; ``t`` (the schedule's timestep, default 0 = clean) for a noise-level-aware classifier."""
        return self.head(self.features(x, t))


# --------------------------------------------------------------------------------------------------------------
# Training


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-image random translation by up to ``pad`` pixels (reflect padding) and optional horizontal flip."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
        x = xp.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        f = torch.rand(n, generator=generator) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


@torch.no_grad()
def predict(model: DomainClassifier, images_u8: Tensor, batch_size: int = 500, what: str = "logits",
            on_batch=None) -> Tensor:
    """Logits (or features) of uint8 images, in eval mode, batched; ``on_batch(n)`` after each batch of n."""
    model.eval()
    fn = model if what == "logits" else model.features
    out = []
    for i in range(0, len(images_u8), batch_size):
        out.append(fn(to_unit(images_u8[i:i + batch_size])))
        if on_batch is not None:
            on_batch(len(out[-1]))
    return torch.cat(out)


def to_unit(images_u8: Tensor) -> Tensor:
    return images_u8.float() / 127.5 - 1.0


def per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    return [float((pred[labels == k] == k).float().mean()) if (labels == k).any() else float("nan")
            for k in range(num_classes)]


def train_classifier(data: str, out: str | Path, *, epochs: int = 10, batch_size: int = 256, lr: float = 0.2,
                     widths: tuple[int, ...] = (32, 64, 128), seed: int = 0, augment: str = "auto",
                     label_smoothing: float = 0.1, limit: int | None = None, progress: bool = True,
                     noisy_schedule: str | None = None) -> dict:
    """Train a :class:`DomainClassifier` on ``data``'s train split, evaluate it on the test split, and write
    ``out`` (a .safetensors file). SGD with Nesterov momentum, a one-cycle learning rate, label smoothing;
    ``augment``: ``auto`` (translation by 2 px; plus flips for colour data), ``none``, ``crop``, ``crop-flip``.
    ``noisy_schedule`` (a schedule name): train on x_t = alpha_t x + sigma_t eps at uniform t, with t as an input,
    for classifier guidance; the report then has the accuracy at several t too."""
    from ..data import load_dataset

    train = load_dataset(data, "train", limit=limit)
    test = load_dataset(data, "test")
    if train.labels is None:
        raise ConfigError(f"{data}: a domain classifier needs a labelled data set")
    c, h, w = train.shape
    if augment == "auto":
        augment = "crop-flip" if c == 3 else "crop"
    if augment not in ("none", "crop", "crop-flip"):
        raise ConfigError(f"unknown augment {augment!r}; choose auto, none, crop or crop-flip")
    schedule = None
    if noisy_schedule:
        from ..schedules import make_schedule

        schedule = make_schedule(noisy_schedule)
    cfg = ClassifierConfig(in_channels=c, image_size=h, num_classes=train.num_classes, widths=widths, data=data,
                           class_names=list(train.class_names),
                           schedule=schedule.config.to_dict() if schedule is not None else None)
    torch.manual_seed(seed)
    model = DomainClassifier(cfg).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25,
                                                anneal_strategy="linear", div_factor=10, final_div_factor=100)
    gen = torch.Generator().manual_seed(seed)
    images = to_unit(train.images)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"classifier {data}", disable=None if progress else True, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = images[idx]
            if augment != "none":
                x = random_crop_flip(x, 2 if augment == "crop" else 4, augment == "crop-flip", gen)
            t = None
            if schedule is not None:
                t = torch.randint(0, schedule.num_timesteps, (len(x),), generator=gen).double()
                alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
                x = alpha * x + sigma * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last), t), train.labels[idx],
                                   label_smoothing=label_smoothing)
            if not math.isfinite(loss.item()):
                raise ConfigError(f"classifier training diverged at epoch {epoch} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    noisy_ts = (250, 500, 750) if schedule is not None else ()
    if progress:  # the test set takes a while (10,000 images, and again at each noise level): say so
        print(f"evaluating on the {len(test):,} test images of {data}"
              + (f", clean and at t = {', '.join(map(str, noisy_ts))}" if noisy_ts else ""), file=sys.stderr,
              flush=True)
    ebar = tqdm(total=len(test) * (1 + len(noisy_ts)), desc="evaluating", unit="img",
                disable=None if progress else True, dynamic_ncols=True)
    pred = predict(model, test.images, on_batch=ebar.update).argmax(1)
    acc = float((pred == test.labels).float().mean())
    noisy_acc = {}
    if schedule is not None:
        g = torch.Generator().manual_seed(seed + 1)
        model.eval()
        for t_eval in noisy_ts:
            alpha, sigma = (float(v) for v in schedule.alpha_sigma(float(t_eval)))
            chunks = []
            with torch.no_grad():
                for i in range(0, len(test), 500):
                    chunks.append(model(alpha * to_unit(test.images[i:i + 500]) + sigma * torch.randn(
                        test.images[i:i + 500].shape, generator=g), torch.tensor(float(t_eval))))
                    ebar.update(len(chunks[-1]))
            noisy_acc[str(t_eval)] = float((torch.cat(chunks).argmax(1) == test.labels).float().mean())
    ebar.close()
    report = {"data": data, "test_accuracy": acc, "noisy_test_accuracy": noisy_acc,
              "per_class_accuracy": per_class_accuracy(pred, test.labels, cfg.num_classes), "test_size": len(test),
              "train_size": len(train), "epochs": epochs, "batch_size": batch_size, "lr": lr, "augment": augment,
              "seed": seed, "train_seconds": train_s}
    path = save_classifier(model, out, report)
    report["path"] = str(path)
    report["sha256"] = file_sha256(path)
    return report


# --------------------------------------------------------------------------------------------------------------
# Files


def save_classifier(model: DomainClassifier, path: str | Path, report: dict | None = None) -> Path:
    from ..checkpoints import save_file_atomic

    path = Path(path)
    meta = {"kind": KIND, "config": json.dumps(model.cfg.to_dict()), "report": json.dumps(report or {})}
    return save_file_atomic(path, model.state_dict(), meta)


def load_classifier(path: str | Path) -> tuple[DomainClassifier, dict]:
    """The classifier and its training report (test accuracy etc.) from a file written by :func:`save_classifier`."""
    from ..checkpoints import load_state_dict_into, load_tagged

    tensors, meta = load_tagged(path, KIND, "domain classifier")
    model = DomainClassifier(ClassifierConfig.from_dict(json.loads(meta["config"])))
    load_state_dict_into(model, tensors, Path(path))
    return model.eval(), json.loads(meta.get("report", "{}"))
