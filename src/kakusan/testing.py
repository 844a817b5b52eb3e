"""An exact-score oracle: data from an isotropic Gaussian mixture, whose denoiser E[x0 | x_t] is analytic.

For x0 ~ sum_k pi_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps:
    x_t | k ~ N(alpha mu_k, v_k I),  v_k = alpha^2 s_k^2 + sigma^2,
    E[x0 | x_t, k] = mu_k + (alpha s_k^2 / v_k) (x_t - alpha mu_k),
    E[x0 | x_t] = sum_k r_k(x_t) E[x0 | x_t, k],  r_k = softmax_k(log pi_k + log N(x_t; alpha mu_k, v_k I)).
Used by the tests to check samplers against closed forms; works on any shape (B, ...) with prod(...) = D.
"""

from __future__ import annotations

import math

import torch

from .schedules import Schedule


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # (K,)
        K = len(self.means)
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.weights = w.to(torch.float64) / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def denoise(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t] for per-sample or scalar (alpha, sigma); returns x_t's shape and dtype."""
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.reshape(shape[0], -1).to(torch.float64)  # (B, D)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)  # (B|1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        v = a**2 * self.stds[None, :, None] ** 2 + s**2  # (B|1, K, 1)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        logp = (torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / v[..., 0]
                - 0.5 * self.dim * torch.log(2 * math.pi * v[..., 0]))  # (B, K)
        r = torch.softmax(logp, dim=1)
        x0_k = self.means[None] + a * self.stds[None, :, None] ** 2 / v * diff  # (B, K, D)
        return (r[..., None] * x0_k).sum(1).reshape(shape).to(dtype)


class MixtureDenoiser(torch.nn.Module):
    """The mixture's exact denoiser D(x_t, t) for a schedule, in the sampler contract."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t).cpu())
        return self.mixture.denoise(x_t, alpha, sigma)
