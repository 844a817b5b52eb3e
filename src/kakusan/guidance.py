"""Guidance as denoiser -> denoiser wrappers (the result is still a denoiser, usable by every sampler)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import ConfigError


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), in x0 space, one batched forward pass:
        D~(x, t, c) = D(x, t, null) + w (D(x, t, c) - D(x, t, null)).
    For a fixed (alpha_t, sigma_t) this equals guiding eps (or v), since each is affine in x0_hat.
    w = 1 is the conditional model, w = 0 the unconditional one. ``negative`` replaces the null condition."""

    def __init__(self, denoiser: nn.Module, scale: float, null_cond: torch.Tensor | int):
        super().__init__()
        self.denoiser, self.scale, self.null_cond = denoiser, float(scale), null_cond

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ConfigError("classifier-free guidance needs a condition (e.g. class labels)")
        if self.scale == 1.0:
            return self.denoiser(x_t, t, cond)
        null = torch.as_tensor(self.null_cond, device=cond.device, dtype=cond.dtype).expand_as(cond)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        x0_cond, x0_null = both.chunk(2)
        return x0_null + self.scale * (x0_cond - x0_null)
