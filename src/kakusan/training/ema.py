"""Exponential moving average of weights (Polyak averaging), the weights sampling uses."""

from __future__ import annotations

import copy

import torch


class EMA:
    """``ema = decay_k * ema + (1 - decay_k) * model`` after each step, with the warm-up
    decay_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the random init."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
