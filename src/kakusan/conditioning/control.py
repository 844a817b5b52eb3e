"""The condition of a ControlNet-steered model: the base's own condition plus the control images.

``ControlCond(inner, hints, scales, keep, cond_only)``: ``inner`` is what the base takes (class labels, a
``TextCond`` or None), ``hints`` one (B, C, H, W) control image batch per ControlNet (values in [0, 1]),
``scales`` one float each, ``keep`` (B,) per-sample factors on the residuals (1 = controlled, 0 = not).

Under classifier-free guidance the other branch (null / negative condition) keeps the same hints (diffusers'
default), or, with ``cond_only`` (diffusers' guess mode without its scale ramp), gets keep = 0: the control then
steers only the conditional branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

Tensor = torch.Tensor


def _index(c, idx):
    return None if c is None else c[idx]


@dataclass
class ControlCond:
    inner: object
    hints: tuple[Tensor, ...]
    scales: tuple[float, ...]
    keep: Tensor
    cond_only: bool = False

    def __post_init__(self):
        self.hints, self.scales = tuple(self.hints), tuple(float(s) for s in self.scales)
        if not self.hints or len(self.hints) != len(self.scales):
            raise ConfigError(f"a control condition needs one scale per control image ({len(self.hints)} images, "
                              f"{len(self.scales)} scales)")
        n = len(self.keep)
        if any(h.ndim != 4 or h.shape[0] != n for h in self.hints):
            raise ConfigError(f"control images must be (B, C, H, W) with B = {n}, got "
                              f"{[tuple(h.shape) for h in self.hints]}")
        if self.inner is not None and len(self.inner) != n:
            raise ConfigError(f"the condition holds {len(self.inner)} samples, the control images {n}")

    @classmethod
    def of(cls, inner, hints, scales=None, cond_only: bool = False) -> "ControlCond":
        hints = (hints,) if torch.is_tensor(hints) else tuple(hints)
        scales = (1.0,) * len(hints) if scales is None else scales
        keep = torch.ones(hints[0].shape[0], device=hints[0].device)
        return cls(inner, hints, scales, keep, cond_only)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx) -> "ControlCond":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return ControlCond(_index(self.inner, idx), tuple(h[idx] for h in self.hints), self.scales, self.keep[idx],
                           self.cond_only)

    @property
    def device(self) -> torch.device:
        return self.keep.device

    def with_inner(self, inner, keep: Tensor | None = None) -> "ControlCond":
        return ControlCond(inner, self.hints, self.scales, self.keep if keep is None else keep, self.cond_only)

    @staticmethod
    def cat(a: "ControlCond", b: "ControlCond", cat_inner) -> "ControlCond":
        if len(a.hints) != len(b.hints) or a.scales != b.scales:
            raise ConfigError("two control conditions with different ControlNets or scales cannot share a batch")
        inner = None if a.inner is None else cat_inner(a.inner, b.inner)
        return ControlCond(inner, tuple(torch.cat([x, y]) for x, y in zip(a.hints, b.hints)), a.scales,
                           torch.cat([a.keep, b.keep]), a.cond_only)
