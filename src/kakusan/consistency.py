"""Consistency distillation (Song et al. 2023) in the latent-consistency form (LCM, Luo et al. 2023): a student
learns the map f(x_t, t) from any point of the teacher's probability-flow ODE trajectory to its end, so that one
to eight evaluations sample (``lcm`` in the sampler registry).

- The consistency function is built on a denoiser D (the student's x0 prediction) with the boundary condition
  f(x, 0) = x:  f(x_t, t) = c_skip(t) x_t + c_out(t) D(x_t, t),
  c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2)  (sd = 0.5, s = 10: LCM's constants;
  t is the training schedule's step, so f = D from t ~ 10 on).
- The teacher's ODE is discretised on a skipping grid of N points (t_n = (n + 1) T / N - 1; LCM's N = 50): one
  DDIM step of the (guided) teacher takes x_{t_n} to x_{t_{n-1}} (to the clean level from the first point).
- Loss: the pseudo-Huber distance sqrt(|f_theta(x_{t_n}) - f_target(x_hat_{t_{n-1}})|^2 + c^2) - c, per element,
  where f_target is an EMA of the student (decay 0.95), without gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .diffusion import eps_from_x0, q_sample

Tensor = torch.Tensor

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_coefficients(t: Tensor, sigma_data: float = SIGMA_DATA, scaling: float = TIMESTEP_SCALING):
    """(c_skip, c_out) at training steps ``t``: c_skip(0) = 1, c_out(0) = 0, and c_skip -> 0, c_out -> 1 fast."""
    st = t.to(torch.float64) * scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class ConsistencyDenoiser(nn.Module):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) D(x_t, t) over a denoiser D: still a denoiser (x_t, t, cond) -> x0,
    so every sampler, guidance wrapper and metric takes it; ``lcm`` is the sampler it is made for."""

    def __init__(self, denoiser: nn.Module, sigma_data: float = SIGMA_DATA, scaling: float = TIMESTEP_SCALING):
        super().__init__()
        self.denoiser, self.sigma_data, self.scaling = denoiser, sigma_data, scaling

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    @property
    def autocast_dtype(self):
        return self.denoiser.autocast_dtype

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0])
        c_skip, c_out = boundary_coefficients(t, self.sigma_data, self.scaling)
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        x0 = self.denoiser(x_t, t, cond)
        return c_skip.to(x_t.dtype).view(shape) * x_t + c_out.to(x_t.dtype).view(shape) * x0


def skipping_grid(num_timesteps: int, points: int) -> tuple[Tensor, Tensor]:
    """(t_n, t_{n-1}) for n = 0 .. points - 1: t_n = round((n + 1) T / points) - 1, and the step before it
    (t_{-1} = 0, the clean level). float64."""
    if not 1 <= points <= num_timesteps:
        raise ValueError(f"the skipping grid needs 1 .. {num_timesteps} points, got {points}")
    t = (torch.arange(1, points + 1, dtype=torch.float64) * (num_timesteps / points)).round() - 1
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), t[:-1]])
    return t, prev


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean over elements of sqrt((a - b)^2 + c^2) - c (c = 0: the absolute error). (B,)"""
    d = (a.float() - b.float()).pow(2)
    return ((d + c * c).sqrt() - c).mean(dim=tuple(range(1, a.ndim)))


def distillation_loss(student: nn.Module, target: nn.Module, teacher: nn.Module, schedule, x0: Tensor, cond,
                      t_index: Tensor, eps: Tensor, grid: tuple[Tensor, Tensor], huber_c: float) -> Tensor:
    """Consistency distillation loss per sample, (B,). ``student`` / ``target``: consistency functions
    (ConsistencyDenoiser); ``teacher``: a denoiser (guided or not) whose DDIM step defines the trajectory;
    ``t_index``: each sample's grid point n (long, (B,)); ``eps``: the forward noise."""
    t_n, t_prev = grid[0][t_index.cpu()], grid[1][t_index.cpu()]
    a_t, s_t = schedule.alpha_sigma(t_n)
    a_s, s_s = schedule.alpha_sigma(t_prev)
    dev, dt = x0.device, x0.dtype
    a_t, s_t, a_s, s_s = (v.to(dev, dt) for v in (a_t, s_t, a_s, s_s))
    x_t = q_sample(x0, a_t, s_t, eps)
    with torch.no_grad():
        x0_teacher = teacher(x_t, t_n.to(dev), cond).to(dt)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x_s = a_s.view(shape) * x0_teacher + s_s.view(shape) * eps_from_x0(x0_teacher, x_t, a_t, s_t)
        y = target(x_s, t_prev.to(dev), cond)
    return pseudo_huber(student(x_t, t_n.to(dev), cond), y, huber_c)
