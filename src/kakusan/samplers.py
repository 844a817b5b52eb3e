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

import math
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


def _denoise(denoiser, x: Tensor, t: float, cond):
    """D(x, t, cond) with t broadcast to the batch, (B,)."""
    return denoiser(x, torch.full((x.shape[0],), t, device=x.device), cond)


def _coeffs(levels: NoiseLevels, i: int):
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
        t, a_t, s_t, a_s, s_s = _coeffs(levels, i)
        x0_hat = _denoise(denoiser, x, t, cond)
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
        t, a_t, s_t, a_s, s_s = _coeffs(levels, i)
        x0_hat = _denoise(denoiser, x, t, cond)
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
# Exponential integrators in log-SNR (DPM-Solver++, UniPC)
#
# With lambda = log(alpha / sigma), h = lambda_s - lambda_t and data prediction D, the probability-flow ODE
# (eta = 0) and the reverse SDE (eta = 1) have the exact step (Lu et al. 2022, DPM-Solver++, eq. 9 and its SDE form)
#     x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s int_0^h g e^{-g (h - u)} D(lambda_t + u) du
#           + sigma_s sqrt(1 - e^{-2 eta h}) z,          g = 1 + eta.
# Replacing D by the polynomial through the last few evaluations and integrating exactly gives a multistep method
# of that order (lower where a step outruns its history: MAX_STEP_RATIO). The weights need the moments
# m_k = int_0^h g e^{-g(h-u)} u^k du, which obey
#     m_0 = 1 - e^{-g h},   m_k = h^k - (k / g) m_{k-1}   (integration by parts).


def _moments(h: float, g: float, n: int) -> list[float]:
    """m_k / h^k for k < n (scaled, so the weights below stay well conditioned)."""
    m = [-math.expm1(-g * h)]
    for k in range(1, n):
        m.append(1.0 - k / (g * h) * m[-1])
    return m


def _interpolation_weights(nodes: list[float], h: float, g: float) -> list[float]:
    """Weights w_j with int_0^h g e^{-g(h-u)} P(u) du = sum_j w_j D_j for the polynomial P through (nodes_j, D_j),
    nodes given as offsets u_j in lambda from the current point (0), i.e. w = V^{-T} m (V the Vandermonde)."""
    r = torch.tensor(nodes, dtype=torch.float64) / h
    n = len(nodes)
    V = r[:, None] ** torch.arange(n, dtype=torch.float64)[None]  # (n, n): V[j, k] = r_j^k
    m = torch.tensor(_moments(h, g, n), dtype=torch.float64)
    return torch.linalg.solve(V.T, m).tolist()


def _lambda(alpha: float, sigma: float) -> float:
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def _exp_step(x, t_lvl, s_lvl, history, eta, generator):
    """One exponential-integrator step from level t to s using ``history`` [(lambda_j, D_j)], newest first
    (the current point first). Returns x_s."""
    (a_t, s_t, lam_t), (a_s, s_s, lam_s) = t_lvl, s_lvl
    if s_s == 0:  # the clean level: x_0 = D (the final denoise, exact for any method)
        return history[0][1]
    if a_t == 0:  # from zero SNR the only information is D (lambda_t = -inf): the exact first-order step
        return a_s * history[0][1] + (s_s / s_t) * x
    h = lam_s - lam_t
    g = 1.0 + eta
    nodes = [lam - lam_t for lam, _ in history]
    w = _interpolation_weights(nodes, h, g)
    x_s = (s_s / s_t) * math.exp(-eta * h) * x + a_s * sum(wj * d for wj, (_, d) in zip(w, history))
    if eta > 0:
        x_s = x_s + s_s * math.sqrt(-math.expm1(-2 * eta * h)) * randn(x.shape, generator, x.device, x.dtype)
    return x_s


# A multistep method extrapolates the polynomial through its last few D's over the next step. When that step is
# much longer than the spacing of those points (the last steps of a 'linspace' or 'leading' grid, where h jumps
# from ~0.3 to ~3 in lambda) the extrapolation is unstable and the samples blow up (measured on the oracle: 3M and
# UniPC-3 on a 10-step 'linspace' grid sent 2,594 of 4,096 starts to other modes). So a history point is used only
# while the step is at most MAX_STEP_RATIO times its distance from the current point; the order drops for that
# step instead. Grids with smoothly growing steps (log-SNR, Karras) never trigger it.
MAX_STEP_RATIO = 2.0


def _usable_history(history: list[tuple[float, Tensor]], lam_t: float, lam_s: float, n: int):
    """The first ``n`` of ``history`` (newest first, before the current point) a step lam_t -> lam_s may use:
    finite lambdas (a zero-SNR start carries no slope) within reach of the step (see MAX_STEP_RATIO)."""
    h = abs(lam_s - lam_t)
    out = []
    for lam, d in history[:n]:
        if not math.isfinite(lam) or (math.isfinite(h) and MAX_STEP_RATIO * abs(lam - lam_t) < h):
            break
        out.append((lam, d))
    return out


def _level(levels: NoiseLevels, i: int):
    a, s = levels.alpha[i].item(), levels.sigma[i].item()
    return a, s, _lambda(a, s)


@torch.no_grad()
def sample_dpmpp(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None,
    order: int = 2, eta: float = 0.0, progress: bool = False,
) -> Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, Alg. 2) of ``order`` 1-3, data prediction; ``eta`` = 0 follows the
    probability-flow ODE, eta = 1 the reverse SDE (SDE-DPM-Solver++). The first steps use the history available;
    history from a zero-SNR start (lambda = -inf) carries no slope and is dropped, and so is history a step
    outruns (MAX_STEP_RATIO)."""
    if order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    history: list[tuple[float, Tensor]] = []
    for i in _step_iter(levels, progress):
        t_lvl, s_lvl = _level(levels, i), _level(levels, i + 1)
        x0_hat = _denoise(denoiser, x, levels.t[i].item(), cond)
        history = [(t_lvl[2], x0_hat)] + _usable_history(history, t_lvl[2], s_lvl[2], order - 1)
        x = _exp_step(x, t_lvl, s_lvl, history, eta, generator)
        if callback is not None:
            callback({"i": i, "t": levels.t[i].item(), "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_unipc(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None,
    order: int = 2, last_step: str = "denoise", progress: bool = False,
) -> Tensor:
    """UniPC (Zhao et al. 2023, Alg. 2/3; B(h) = e^h - 1, 'bh2'), data prediction. Each step predicts x_s with the
    order-p multistep (UniP), evaluates D(x_s) once, and corrects x_s with the order-(p+1) formula that includes
    that evaluation (UniC); the evaluation is reused by the next step's predictor, so one model call per step.
    The predictor and corrector integrate the interpolating polynomial exactly; where the paper fixes a
    coefficient to 1/2 (the order-2 predictor and the order-1 corrector) that choice, scaled by B(h), is kept.

    ``last_step`` 'gaussian' ends a grid whose last level before the clean one is well above zero (the default
    grid's floor) with :func:`gaussian_last_step` instead of the plain final denoise."""
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3, got {order}")
    if last_step not in LAST_STEPS:
        raise ConfigError(f"last_step must be one of {', '.join(LAST_STEPS)}, got {last_step!r}")
    n = levels.num_steps
    history: list[tuple[float, Tensor]] = []
    x0_hat = None
    evals: list[tuple[Tensor, Tensor, int]] = []  # the last two evaluations: (input, x0_hat, level)
    for i in _step_iter(levels, progress):
        t_lvl, s_lvl = _level(levels, i), _level(levels, i + 1)
        if x0_hat is None:  # the first evaluation; later ones come from the corrector's call
            x0_hat = _denoise(denoiser, x, levels.t[i].item(), cond)
            evals = [(x, x0_hat, i)]
        history = [(t_lvl[2], x0_hat)] + _usable_history(history, t_lvl[2], s_lvl[2], order - 1)
        x_pred = _unipc_predict(x, t_lvl, s_lvl, history)
        if i == n - 1:  # the final denoise needs no corrector
            x = x_pred
            if last_step == "gaussian" and s_lvl[1] == 0 and len(evals) == 2:
                (x_p, d_p, j), (x_f, d_f, _) = evals
                x = gaussian_last_step(x_f, d_f, t_lvl[:2], x_p, d_p, _level(levels, j)[:2])
            if callback is not None:
                callback({"i": i, "t": levels.t[i].item(), "x": x, "x0_hat": x0_hat})
            break
        x0_next = _denoise(denoiser, x_pred, levels.t[i + 1].item(), cond)
        evals = [evals[-1], (x_pred, x0_next, i + 1)]
        x = _unipc_correct(x, t_lvl, s_lvl, history, x0_next) if math.isfinite(t_lvl[2]) else x_pred
        if callback is not None:
            callback({"i": i, "t": levels.t[i].item(), "x": x, "x0_hat": x0_hat})
        x0_hat = x0_next
    return x


LAST_STEPS = ("denoise", "gaussian")


def gaussian_last_step(x_f: Tensor, d_f: Tensor, level_f: tuple[float, float], x_p: Tensor, d_p: Tensor,
                       level_p: tuple[float, float]) -> Tensor:
    """The step from the last level sigma~_f > 0 to the clean image, solved for a locally Gaussian data set.

    Near a mode that is an isotropic Gaussian of width s, the probability-flow ODE in x~ = x / alpha carries a
    sample's offset from the mode as sqrt(s^2 + sigma~^2): the exact step to sigma~ = 0 keeps s / sqrt(s^2 +
    sigma_f^2) of it, where the plain final denoise D(x_f) keeps s^2 / (s^2 + sigma_f^2) (for s = 0.1 from 0.2: 0.45
    against 0.2). With c = s^2 / (s^2 + sigma_f^2) the exact endpoint is D + sqrt(c) / (1 + sqrt(c)) (x~_f - D).

    s is read per sample from the last two evaluations, (x_p, D_p) at sigma~_p and (x_f, D_f) at sigma~_f: the
    residual x~ - D = sigma~^2 (x~ - mu) / (s^2 + sigma~^2) shrinks between them by a factor that fixes s
    (Q = (|r_f| sigma_p^2 / (|r_p| sigma_f^2))^2 = (s^2 + sigma_p^2) / (s^2 + sigma_f^2)). Where the two
    evaluations do not fit the model (Q <= 1: the residual did not shrink as a Gaussian's would) the plain denoise
    is kept; Q >= sigma_p^2 / sigma_f^2 reads as s = 0, which is the plain denoise too. ``level_*``: (alpha, sigma)."""
    (a_f, s_f), (a_p, s_p) = level_f, level_p
    sf2, sp2 = (s_f / a_f) ** 2, (s_p / a_p) ** 2
    dims = tuple(range(1, x_f.ndim))
    dt = torch.promote_types(d_f.dtype, torch.float32)  # float64 stays float64 (the oracle); half types go up
    r_f = x_f.to(dt) / a_f - d_f.to(dt)
    r_p = x_p.to(dt) / a_p - d_p.to(dt)
    q = r_f.pow(2).sum(dims, keepdim=True) / r_p.pow(2).sum(dims, keepdim=True).clamp_min(1e-30) * (sp2 / sf2) ** 2
    s2 = ((sp2 - q * sf2) / (q - 1)).clamp_min(0.0)
    c = s2 / (s2 + sf2)
    gain = torch.where(q > 1, c.sqrt() / (1 + c.sqrt()), torch.zeros_like(c))
    return (d_f.to(dt) + gain * r_f).to(x_f.dtype)


def _b_h(h: float) -> float:
    return -math.expm1(-h)  # B(h) = 1 - e^{-h} in data-prediction form ('bh2')


def _unipc_predict(x, t_lvl, s_lvl, history):
    if len(history) != 2 or s_lvl[1] == 0 or t_lvl[0] == 0:
        return _exp_step(x, t_lvl, s_lvl, history, 0.0, None)
    # UniP-2: the slope term with the fixed coefficient 1/2 (x B(h)), as in the paper
    (_, s_t, lam_t), (a_s, s_s, lam_s) = t_lvl, s_lvl
    h = lam_s - lam_t
    (_, d0), (lam_1, d1) = history
    r1 = (lam_1 - lam_t) / h
    return (s_s / s_t) * x + a_s * (_b_h(h) * d0 + 0.5 * _b_h(h) * (d1 - d0) / r1)


def _unipc_correct(x, t_lvl, s_lvl, history, x0_next):
    (_, s_t, lam_t), (a_s, s_s, lam_s) = t_lvl, s_lvl
    h = lam_s - lam_t
    if len(history) == 1:  # UniC-1: the fixed coefficient 1/2 (x B(h)) on the new slope
        d0 = history[0][1]
        return (s_s / s_t) * x + a_s * (_b_h(h) * d0 + 0.5 * _b_h(h) * (x0_next - d0))
    return _exp_step(x, t_lvl, s_lvl, [(lam_s, x0_next)] + history, 0.0, None)  # UniC-p: one more point


# --------------------------------------------------------------------------------------------------------------
# Heun (EDM, Karras et al. 2022, Alg. 2), in the variance-exploding variables x~ = x / alpha, sigma~ = sigma / alpha


# Heun's trapezoid in sigma~ weights the slope at the end of a step by half the step's span. Over a step from
# sigma~ = 2e4 (the cosine schedule's first level) to 10 that multiplies the denoiser's change across the step by
# ~1000: on the oracle, 25 steps on a Karras grid capped at 10 stayed 20x worse than DDIM, and diffusers' Heun does
# the same. A step over which sigma~ falls by more than HEUN_MAX_RATIO is therefore taken as its Euler step (exact
# when the denoiser is constant across the step), as EDM already does for the last step to 0. The rule also takes
# the last steps of a short Karras grid (e.g. 0.44 -> 0.0064 on cosine): measured on the oracle, the Euler step is
# the more accurate there too (5-12 Karras steps on cosine and flow: RMSE 0.24-0.62 against 0.27-4.9).
HEUN_MAX_RATIO = 8.0


@torch.no_grad()
def sample_heun(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
    schedule=None, progress: bool = False,
) -> Tensor:
    """EDM's second-order Heun sampler with optional stochastic 'churn': before step i, if s_tmin <= sigma~_i
    <= s_tmax, raise the noise level to sigma^ = sigma~_i (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1), by
    adding fresh noise of scale sqrt(sigma^2 - sigma~_i^2) s_noise. The last step (to sigma = 0) is an Euler step,
    and so is a step whose sigma~ falls by more than HEUN_MAX_RATIO (one model call fewer each).
    Churn evaluates the network between grid points, so it needs the schedule (to map sigma~ to t).
    A step from zero SNR (sigma~ = inf) is taken in its exact first-order form."""
    if s_churn < 0 or s_noise < 0:
        raise ConfigError("s_churn and s_noise must be >= 0")
    if s_churn > 0 and schedule is None:
        raise ConfigError("Heun with s_churn > 0 needs the schedule (pass schedule=...)")
    n = levels.num_steps
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)

    for i in _step_iter(levels, progress):
        t, a_t, s_t, a_s, s_s = _coeffs(levels, i)
        t_s = levels.t[i + 1].item()
        if a_t == 0:  # sigma~ = inf: the exact step from zero SNR
            x0_hat = _denoise(denoiser, x, t, cond)
            x = a_s * x0_hat + (s_s / s_t) * x
        else:
            st, ss = s_t / a_t, s_s / a_s
            xt = x / a_t  # x~
            gamma = gamma_max if s_tmin <= st <= s_tmax else 0.0
            if gamma > 0:  # not above the schedule's top level (the network has not seen more noise)
                st_hat = min(st * (1 + gamma), schedule.sigma_tilde_at(schedule.num_timesteps - 1).item())
                gamma = st_hat / st - 1
            if gamma > 0:
                xt = xt + math.sqrt(st_hat**2 - st**2) * s_noise * randn(x.shape, generator, x.device, x.dtype)
                t = schedule.t_at_sigma_tilde(st_hat).item()
                st = st_hat
            a_hat = schedule.alpha_sigma(t)[0].item() if gamma > 0 else a_t  # alpha at the raised level
            x0_hat = _denoise(denoiser, a_hat * xt, t, cond)
            d = (xt - x0_hat) / st
            xt_next = xt + (ss - st) * d
            if ss > 0 and st <= HEUN_MAX_RATIO * ss:  # Heun's correction
                d2 = (xt_next - _denoise(denoiser, a_s * xt_next, t_s, cond)) / ss
                xt_next = xt + (ss - st) * 0.5 * (d + d2)
            x = a_s * xt_next
        if callback is not None:
            callback({"i": i, "t": levels.t[i].item(), "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_consistency(
    denoiser, x: Tensor, levels: NoiseLevels, *, cond=None, generator=None, callback=None, progress: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM's sampler): at each level the consistency
    function's x0_hat = f(x_t, t), then fresh noise to the next level, x_s = alpha_s x0_hat + sigma_s z (the last
    level is clean: x0_hat itself). Exact in distribution when f is the exact ODE endpoint map; for a model
    distilled for it (``kakusan train --distill``), not for an ordinary denoiser (whose x0_hat is a mean)."""
    for i in _step_iter(levels, progress):
        t, _, _, a_s, s_s = _coeffs(levels, i)
        x0_hat = _denoise(denoiser, x, t, cond)
        x = a_s * x0_hat
        if s_s > 0:
            x = x + s_s * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0_hat": x0_hat})
    return x


# --------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    order: int  # global order p of a deterministic sampler (ODE error ~ steps^-p, tests/test_samplers.py)
    nfe_per_step: int  # model evaluations per step
    stochastic: bool
    default_spacing: str
    summary: str
    last_step_nfe: int = 1  # model evaluations of the final step (Heun's is an Euler step)
    default_sigma_max: float | None = None  # cap of the default spacing (see schedules.timesteps)
    needs_schedule: bool = False  # takes schedule= (Heun's churn evaluates between grid points)
    consistency: bool = False  # made for a consistency model (its x0_hat is a sample, not a mean)

    def nfe(self, steps: int) -> int:
        """Model evaluations for ``steps`` steps (Heun: at most; see HEUN_MAX_RATIO)."""
        return (steps - 1) * self.nfe_per_step + self.last_step_nfe


def _with(fn, **fixed):
    def run(*args, **kwargs):
        return fn(*args, **{**fixed, **kwargs})
    return run


SAMPLERS: dict[str, SamplerInfo] = {
    "ddpm": SamplerInfo(sample_ddpm, 1, 1, True, "trailing", "DDPM ancestral sampling, posterior variance"),
    "ddpm-upper": SamplerInfo(_with(sample_ddpm, variance="upper"), 1, 1, True, "trailing",
                              "DDPM ancestral sampling, beta_t ('upper') variance"),
    "ddim": SamplerInfo(sample_ddim, 1, 1, False, "trailing", "DDIM, deterministic (eta = 0; pass eta for more)"),
    "euler": SamplerInfo(sample_ddim, 1, 1, False, "karras",
                         "Euler on the probability-flow ODE in sigma~ = sigma/alpha (the same update as DDIM)"),
    "euler-ancestral": SamplerInfo(_with(sample_ddim, eta=1.0), 1, 1, True, "karras",
                                   "Euler ancestral (= DDIM with eta = 1, DDPM's posterior step)"),
    "heun": SamplerInfo(sample_heun, 2, 2, False, "karras", "EDM's Heun (s_churn > 0: stochastic)",
                        last_step_nfe=1, needs_schedule=True),
    "dpmpp-2m": SamplerInfo(_with(sample_dpmpp, order=2), 2, 1, False, "logsnr", "DPM-Solver++(2M), multistep"),
    "dpmpp-3m": SamplerInfo(_with(sample_dpmpp, order=3), 3, 1, False, "logsnr", "DPM-Solver++(3M), multistep"),
    "dpmpp-2m-sde": SamplerInfo(_with(sample_dpmpp, order=2, eta=1.0), 1, 1, True, "logsnr",
                                "SDE-DPM-Solver++(2M)"),
    "dpmpp-3m-sde": SamplerInfo(_with(sample_dpmpp, order=3, eta=1.0), 1, 1, True, "logsnr",
                                "SDE-DPM-Solver++(3M)"),
    "unipc-2": SamplerInfo(_with(sample_unipc, order=2), 3, 1, False, "karras",
                           "UniPC, order-2 predictor + corrector (bh2)"),  # its grid: DEFAULT_GRIDS
    "unipc-3": SamplerInfo(_with(sample_unipc, order=3), 4, 1, False, "logsnr",
                           "UniPC, order-3 predictor + corrector (bh2)"),
    "lcm": SamplerInfo(sample_consistency, 1, 1, True, "trailing",
                       "multistep consistency sampling (LCM), for distilled models (train --distill)",
                       consistency=True),
}


# what a user gets without choosing: measured against diffusers in benchmarks/sampler_accuracy.py
DEFAULT_SAMPLER = "unipc-2"

# The default sampler's grid by step budget: the one rule that picks it (``sampling_grid``), reported in every
# pipeline record. Karras spacing (rho) between a cap sigma~ <= sigma_max, reached in one step from t = T-1, and a
# floor sigma_min, left in one final denoise (None: the schedule's t = 0). Rows: (most steps, grid).
#
# Measured on the exact-score oracle (benchmarks/sampler_accuracy.py; chosen on 1,024 starts of another seed
# than the benchmark's, among caps 3-20, floors 0.012-0.45, rho 3/5/7 and UniPC order 2/3; docs/RESULTS.md,
# "Samplers, round two"): with few steps the last model call is better spent at sigma~ ~ 0.2 than between two
# nearly clean levels (the final denoise from there is the exact answer for all but the narrowest modes), and a
# lower cap leaves more of five calls where the modes separate. On the search's starts, against the best diffusers
# configuration per cell: at 5 steps the geometric mean of the eight RMSE ratios went from 1.95 to 0.83 (cells at
# or below 1: 1 -> 6 of 8), at 10 it stayed 0.63 while the cells went 6 -> 8 of 8. From 15 steps on a floor costs
# the narrowest modes more than it gains (0.03 at 20 steps: ratio 4.6 on the 2-D mixture), and the grid is the one
# used before. Order 3 lost on every grid tried (5 steps, same grid: 0.90; 10 steps: 0.64-1.7).
#
# From 8 to 14 steps the step from the floor to the clean image is gaussian_last_step (the exact step for a locally
# Gaussian mode, its width read from the last two evaluations) rather than the plain denoise, and the floor it makes
# best is 0.1 (rho 7): on the search's starts the geometric mean of the RMSE ratios went 0.63 -> 0.51 and the cells
# with median <= 0.5x 4 -> 7 of 8; on the benchmark's 4,096 starts 8 of 8 on both. On the MNIST and Fashion-MNIST
# models (5,000 samples, benchmarks/sampler_models.py) it is closer to the 60-step reference than the plain
# denoise from the same floor (0.0227 against 0.0279, 0.0283 against 0.0330), and on Fashion-MNIST its FID is
# nearer the reference's own (6.59 against 5.07; the reference 6.21). At 5 steps it was not kept: with the floor
# it favours there (0.35) it took the oracle's median cells from 1 to 5 of 8, but on Fashion-MNIST it carried the
# noise of the floor level into the image (FID 4.4 -> 9.5 where the exact ODE's samples score 6.2; visibly
# grainy), so that row stays a plain denoise from 0.2.
# With no floor (from 15 steps, last level ~0.01) it lost (the 2-D mixture 0.98 -> 1.85).
DEFAULT_GRIDS: tuple[tuple[int, dict], ...] = (
    (7, {"rho": 7.0, "sigma_max": 5.0, "sigma_min": 0.2}),
    (14, {"rho": 7.0, "sigma_max": 10.0, "sigma_min": 0.1, "last_step": "gaussian"}),
    (2**31, {"rho": 7.0, "sigma_max": 10.0, "sigma_min": None}),
)


@dataclass(frozen=True)
class Grid:
    """Where a sampler's steps go: a spacing (schedules.timesteps) with its parameters, and what chose it
    (``rule``: 'default grid for N steps' when DEFAULT_GRIDS did, None when the caller or the sampler's fixed
    default did)."""

    spacing: str
    rho: float = 7.0
    sigma_max: float | None = None
    sigma_min: float | None = None
    last_step: str = "denoise"
    rule: str | None = None

    def timesteps(self, schedule: Schedule, steps: int) -> Tensor:
        return timesteps(schedule, steps, self.spacing, rho=self.rho, sigma_max=self.sigma_max,
                         sigma_min=self.sigma_min)

    def options(self) -> dict:
        """What the grid asks of the sampler itself (UniPC's ``last_step``), for run_sampler."""
        return {"last_step": self.last_step} if self.last_step != "denoise" else {}

    def record(self) -> dict:
        """The fields a pipeline record carries (rho, sigma_min and last_step only where the rule chose them)."""
        out = {"spacing": self.spacing, "sigma_max": self.sigma_max}
        if self.rule is not None:
            out.update(rho=self.rho, sigma_min=self.sigma_min, last_step=self.last_step, grid_rule=self.rule)
        return out


def sampling_grid(sampler: str, steps: int, spacing: str | None = None, sigma_max: float | None = None) -> Grid:
    """The grid :func:`sample` and the pipeline use: ``spacing`` (with ``sigma_max``) when given; else for the
    default sampler the row of DEFAULT_GRIDS for ``steps`` (its cap replaced by ``sigma_max`` if given), for the
    others their fixed default spacing and cap. The same rule for every schedule family (VP, zero terminal SNR,
    rectified flow): it is written in sigma~ = sigma / alpha, which they share."""
    info = get_sampler(sampler)
    if spacing is not None:
        return Grid(spacing, sigma_max=sigma_max)
    if sampler == DEFAULT_SAMPLER:
        most, row = next((most, row) for most, row in DEFAULT_GRIDS if steps <= most)
        row = {**row, **({"sigma_max": sigma_max} if sigma_max is not None else {})}
        return Grid(info.default_spacing, **row, rule=f"default grid for {steps} steps (samplers.DEFAULT_GRIDS)")
    return Grid(info.default_spacing, sigma_max=sigma_max if sigma_max is not None else info.default_sigma_max)


def sampling_plan(schedule: Schedule, sampler: str, steps: int, spacing: str | None = None,
                  sigma_max: float | None = None) -> tuple[Grid, NoiseLevels]:
    """The grid (:func:`sampling_grid`: what to record, and the options it asks of the sampler, ``grid.options()``)
    and the levels :func:`sample` walks with ``sampler``: the two halves of one choice, asked of the rule once."""
    info = get_sampler(sampler)
    grid = sampling_grid(sampler, steps, spacing, sigma_max)
    # DDIM on a schedule imported with diffusers' set_alpha_to_one = False ends, as diffusers' does, at t = 0's level
    final = schedule.config.final_level if info.fn is sample_ddim and schedule.config is not None else "clean"
    return grid, noise_levels(schedule, grid.timesteps(schedule, steps), final)


def sampling_levels(schedule: Schedule, sampler: str, steps: int, spacing: str | None = None,
                    sigma_max: float | None = None) -> NoiseLevels:
    """The levels :func:`sample` walks with ``sampler``: ``spacing`` or the sampler's default grid
    (:func:`sampling_grid`). A caller that runs the sampler itself wants :func:`sampling_plan`, whose grid also
    says how to leave the levels (the default's ``last_step``)."""
    return sampling_plan(schedule, sampler, steps, spacing, sigma_max)[1]


def model_calls(sampler: str, schedule: Schedule, steps: int, spacing: str | None = None,
                sigma_max: float | None = None) -> int:
    """The exact number of model evaluations :func:`sample` makes with these arguments (``SamplerInfo.nfe`` less
    the corrections Heun skips: steps from zero SNR and steps over HEUN_MAX_RATIO)."""
    info = get_sampler(sampler)
    if info.fn is not sample_heun:
        return info.nfe(steps)
    levels = sampling_levels(schedule, sampler, steps, spacing, sigma_max)
    a, s = levels.alpha[:-1], levels.sigma[:-1]
    st = torch.where(a > 0, s / a.clamp_min(1e-300), torch.full_like(s, math.inf))
    euler = (a[:-1] == 0) | (st[:-1] > HEUN_MAX_RATIO * st[1:])
    return info.nfe(steps) - int(euler.sum())


def get_sampler(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def run_sampler(sampler: str, denoiser, x: Tensor, levels: NoiseLevels, schedule: Schedule, *, cond=None,
                generator: torch.Generator | None = None, callback=None, progress: bool = False,
                **options) -> Tensor:
    """Run a named sampler from the state ``x`` at ``levels[0]`` down the given levels (a whole grid, or a part
    of one: img2img starts lower, inpainting walks it one interval at a time)."""
    info = get_sampler(sampler)
    if info.needs_schedule:
        options.setdefault("schedule", schedule)
    return info.fn(denoiser, x, levels, cond=cond, generator=generator, callback=callback, progress=progress,
                   **options)


@torch.no_grad()
def sample(
    denoiser, schedule: Schedule, shape: tuple[int, ...], *, sampler: str = "ddim", steps: int = 50,
    spacing: str | None = None, sigma_max: float | None = None, cond=None, seed: int | None = 0,
    generator: torch.Generator | None = None,
    device="cpu", dtype=torch.float32, callback=None, progress: bool = False, **options,
) -> Tensor:
    """Draw x_T ~ N(0, sigma_T^2 I) and run a named sampler over ``steps`` timesteps of ``schedule``. Without
    ``spacing`` the sampler's default grid is used (and its default sigma_max cap, unless one is given)."""
    grid, levels = sampling_plan(schedule, sampler, steps, spacing, sigma_max)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    x = randn(shape, generator, device, dtype) * levels.sigma[0].item()
    options = {**grid.options(), **options}
    return run_sampler(sampler, denoiser, x, levels, schedule, cond=cond, generator=generator, callback=callback,
                       progress=progress, **options)
