"""Samplers: one stateless function each, over a denoiser and a tensor of noise levels.

Contract (every sampler):
    sampler(denoiser, x, levels, *, cond=None, generator=None, callback=None, **options) -> x0
- ``denoiser(x_t, t, cond) -> x0_hat``; ``x`` is the start x_T ~ N(0, sigma_0^2 I) of shape (B, C, H, W);
- ``levels``: :class:`~kakusan.schedules.NoiseLevels`, noisiest first, ending at the clean level (sigma = 0);
- ``generator`` drives every random draw; ``callback(info)`` is called after each step with a dict holding
  ``i``, ``t``, ``x`` (the new state) and ``x0_hat``.
Nothing is kept between calls: no step index, no object to reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import eps_from_x0, randn
from .errors import ConfigError
from .schedules import NoiseLevels, Schedule, noise_levels, timesteps

Tensor = torch.Tensor


def _step_iter(levels: NoiseLevels, progress: bool):
    n = levels.num_steps
    return tqdm(range(n), desc="sampling", leave=False, disable=None if progress else True)


def _coeffs(levels: NoiseLevels, i: int, x: Tensor):
    """(t, alpha_t, sigma_t, alpha_s, sigma_s) for the step from level i (t) to level i + 1 (s), as Python
    floats computed in float64 (so small differences such as sigma_t^2 - ... keep their digits)."""
    return (levels.t[i].item(), levels.alpha[i].item(), levels.sigma[i].item(),
            levels.alpha[i + 1].item(), levels.sigma[i + 1].item())


@torch.no_grad()
def sample_ddpm(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None,
    variance: str = "posterior", progress: bool = False,
) -> Tensor:
    """Ancestral sampling (DDPM, Ho et al. 2020, Alg. 2), for any pair of levels t > s.

    With alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2, the posterior
    q(x_s | x_t, x0) (VDM, Kingma et al. 2021, eq. 28-30) has
        mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0,
        var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2               ('posterior', DDPM's beta-tilde)
    or var = sigma_{t|s}^2 ('upper', DDPM's beta_t). x0 is replaced by the denoiser's x0_hat."""
    if variance not in ("posterior", "upper"):
        raise ConfigError(f"unknown DDPM variance {variance!r}; choose 'posterior' or 'upper'")
    for i in _step_iter(levels, progress):
        t, a_t, s_t, a_s, s_s = _coeffs(levels, i, x)
        x0_hat = denoiser(x, torch.full((x.shape[0],), t, device=x.device), cond)
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2  # sigma_{t|s}^2
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0_hat
        var = var_ts * s_s**2 / s_t**2 if variance == "posterior" else var_ts
        if s_s > 0 and var > 0:
            x = mean + var**0.5 * randn(x.shape, generator, x.device, x.dtype)
        else:  # the last step lands on the clean level without noise
            x = mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_ddim(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None,
    eta: float = 0.0, progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z, with
    c = eta * sqrt(posterior variance). eta = 0 is the deterministic DDIM; eta = 1 is DDPM's ancestral step."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"DDIM eta must lie in [0, 1], got {eta}")
    for i in _step_iter(levels, progress):
        t, a_t, s_t, a_s, s_s = _coeffs(levels, i, x)
        x0_hat = denoiser(x, torch.full((x.shape[0],), t, device=x.device), cond)
        eps_hat = eps_from_x0(x0_hat, x, a_t, s_t)
        a_ts = a_t / a_s
        c2 = eta**2 * (s_t**2 - a_ts**2 * s_s**2) * s_s**2 / s_t**2
        x = a_s * x0_hat + max(s_s**2 - c2, 0.0) ** 0.5 * eps_hat
        if c2 > 0:
            x = x + c2**0.5 * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0_hat": x0_hat})
    return x


# --------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    order: int  # convergence order of the deterministic limit
    nfe_per_step: int  # model evaluations per step
    stochastic: bool
    default_spacing: str
    summary: str


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, 1, 1, True, "trailing", "DDPM ancestral sampling, posterior variance"),
    "ddpm-upper": SamplerInfo(
        lambda *a, **k: sample_ddpm(*a, variance="upper", **k), 1, 1, True, "trailing",
        "DDPM ancestral sampling, beta_t ('upper') variance"),
    "ddim": SamplerInfo(sample_ddim, 1, 1, False, "trailing", "DDIM, deterministic (eta = 0; pass eta for more)"),
}


def get_sampler(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def sample(
    denoiser, schedule: Schedule, shape: tuple[int, ...], *, sampler: str = "ddim", steps: int = 50,
    spacing: str | None = None, cond=None, seed: int | None = 0, generator: torch.Generator | None = None,
    device="cpu", dtype=torch.float32, callback=None, progress: bool = False, **options,
) -> Tensor:
    """Draw x_T ~ N(0, sigma_max^2 I) and run a named sampler over ``steps`` timesteps of ``schedule``."""
    info = get_sampler(sampler)
    levels = noise_levels(schedule, timesteps(schedule, steps, spacing or info.default_spacing))
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    x = randn(shape, generator, device, dtype) * levels.sigma[0].item()
    return info.fn(denoiser, x, levels, cond=cond, generator=generator, callback=callback,
                   progress=progress, **options)
