"""Noise schedules as pure functions.

Every schedule is reduced to one table, ``alpha_bar[t]`` for the discrete training steps
``t = 0 .. T-1`` (0-indexed, as in diffusers), from which the one representation used everywhere follows:

    x_t = alpha_t * x0 + sigma_t * eps,   alpha_t = sqrt(alpha_bar_t),   sigma_t = sqrt(1 - alpha_bar_t)

``Schedule.alpha_sigma(t)`` also takes fractional ``t`` (linear interpolation of ``alpha_bar`` between the
grid points), so the same object serves discrete samplers and continuous-time ones.

Rectified flow ('flow': x_t = (1 - tau) x0 + tau eps, tau = (t + 1) / T; Liu et al. 2022, Esser et al. 2024) is
not variance-preserving but differs from a VP schedule only by a scale: with the VP-equivalent
alpha_bar = alpha^2 / (alpha^2 + sigma^2) the state is x_flow = x_VP / (alpha_VP + sigma_VP), the same noise level
sigma~ = sigma / alpha, the same log-SNR. So it keeps the one table and ``alpha_sigma`` applies the scale; every
sampler, written for general (alpha_t, sigma_t), works on it unchanged.

Tables are computed in float64 and cast where used: ``alpha_bar`` of the linear schedule at t = 999 is 6e-5,
and its complement loses digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch

from .errors import ConfigError

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# beta / alpha_bar tables (each a pure function returning float64 tensors of length T)


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ConfigError(f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}")
    if beta_start > beta_end:
        raise ConfigError(f"beta_start ({beta_start}) must not exceed beta_end ({beta_end})")


def _check_steps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ConfigError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM (Ho et al. 2020, sec. 4): beta_t linear from beta_start to beta_end."""
    _check_steps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDIM's 'quadratic' schedule: sqrt(beta_t) linear, i.e. beta_t = linspace(sqrt(b0), sqrt(b1))^2."""
    _check_steps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Latent/Stable Diffusion's 'scaled_linear': the quadratic form with LDM's defaults."""
    return quadratic_betas(num_timesteps, beta_start, beta_end)


def betas_from_alpha_bar(alpha_bar_fn: Callable[[Tensor], Tensor], num_timesteps: int, max_beta: float) -> Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1]: beta_t = 1 - abar((t+1)/T) / abar(t/T), clipped."""
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = alpha_bar_fn(s)
    betas = 1.0 - abar[1:] / abar[:-1]
    return betas.clamp(0.0, max_beta)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    _check_steps(num_timesteps)
    if not (0.0 <= s < 1.0):
        raise ConfigError(f"cosine offset s must lie in [0, 1), got {s}")
    if not (0.0 < max_beta <= 1.0):
        raise ConfigError(f"max_beta must lie in (0, 1], got {max_beta}")

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar(lambda u: f(u) / f(torch.zeros(())), num_timesteps, max_beta)


def sigmoid_betas(
    num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Sigmoid schedule (Chen 2023, 'On the importance of noise scheduling', Alg. 1):
    abar(t) = (sigmoid(end/tau) - sigmoid((t (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau))."""
    _check_steps(num_timesteps)
    if not start < end:
        raise ConfigError(f"sigmoid schedule needs start < end, got {start} and {end}")
    if tau <= 0:
        raise ConfigError(f"sigmoid schedule needs tau > 0, got {tau}")
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def abar(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(abar, num_timesteps, max_beta)


def flow_alpha_bar(num_timesteps: int = 1000, shift: float = 1.0) -> Tensor:
    """The VP-equivalent alpha_bar of rectified flow: tau_t = (t + 1) / T (tau = 1, pure noise, at t = T-1), moved
    by the timestep shift of SD3 (Esser et al. 2024, eq. 23) tau' = shift tau / (1 + (shift - 1) tau) (shift > 1
    spends more of the steps at high noise, for large images), then alpha = 1 - tau', sigma = tau'."""
    _check_steps(num_timesteps)
    if not shift > 0:
        raise ConfigError(f"flow shift must be positive, got {shift}")
    tau = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    tau = shift * tau / (1 + (shift - 1) * tau)
    a, s = 1 - tau, tau
    return a**2 / (a**2 + s**2)


def edm_alpha_bar(num_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, sec. 5: sigma in [0.002, 80]) as a table: sigma~_t = sigma_t / alpha_t
    log-uniform from sigma_min at t = 0 to sigma_max at t = T-1, in the variance-preserving form
    alpha_bar = 1 / (1 + sigma~^2) (x_VP = x_VE / sqrt(1 + sigma^2), the same noise level). The network's time input
    t is then affine in log sigma~, which is EDM's c_noise = log(sigma) / 4 up to an affine map."""
    _check_steps(num_timesteps)
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"the EDM schedule needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    log_st = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64)
    return 1.0 / (1.0 + torch.exp(2 * log_st))


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s)  (DDPM eq. 4)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def rescale_zero_terminal_snr(alpha_bar: Tensor) -> Tensor:
    """Lin et al. 2024 ('Common diffusion noise schedules are flawed', Alg. 1): shift and scale sqrt(alpha_bar)
    so that the last step has alpha = 0 (zero SNR) while the first keeps its value."""
    sqrt_ab = alpha_bar.to(torch.float64).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2


# --------------------------------------------------------------------------------------------------------------
# The schedule object: a frozen table plus (alpha, sigma) lookups


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "quadratic": quadratic_betas,
    "sigmoid": sigmoid_betas,
    "scaled-linear": scaled_linear_betas,
}
SCHEDULE_NAMES = (*BETA_SCHEDULES, "flow", "edm")


@dataclass
class ScheduleConfig:
    """A schedule by name and parameters; saved in every checkpoint.

    ``params`` are passed to the named beta function (e.g. ``{"beta_start": 1e-4, "beta_end": 0.02}`` for
    ``linear``, ``{"s": 0.008}`` for ``cosine``)."""

    name: str = "linear"
    num_timesteps: int = 1000
    params: dict = field(default_factory=dict)
    zero_terminal_snr: bool = False  # ('flow' has it by construction)
    # How diffusers' schedulers lay a sampling grid on this table (imported Stable Diffusion checkpoints carry
    # their scheduler's): ``steps_offset`` is added to every timestep of 'leading' spacing (SD: 1, giving
    # 951, 901, ..., 1 for 20 steps); ``final_level`` 'first' ends DDIM's last step at t = 0's level instead of
    # the clean image (diffusers' set_alpha_to_one = False: alpha_bar[0] as the level after the last step).
    steps_offset: int = 0
    final_level: str = "clean"

    def __post_init__(self):
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ConfigError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if self.final_level not in ("clean", "first"):
            raise ConfigError(f"final_level must be 'clean' or 'first', got {self.final_level!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, default in (("steps_offset", 0), ("final_level", "clean")):  # the records of older checkpoints
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        return cls(**d)


class Schedule:
    """A discrete schedule: ``alpha_bar`` for t = 0..T-1, float64; variance-preserving, or with ``flow`` the
    rectified-flow scaling of the same noise levels (alpha_t + sigma_t = 1).

    The network's time input is ``t`` itself (a float in [0, T-1]); the clean image is outside the table."""

    def __init__(self, alpha_bar: Tensor, config: ScheduleConfig | None = None, flow: bool = False):
        alpha_bar = alpha_bar.to(torch.float64)
        if alpha_bar.ndim != 1 or len(alpha_bar) < 2:
            raise ConfigError("alpha_bar must be a 1-D table of at least 2 steps")
        if not torch.isfinite(alpha_bar).all() or (alpha_bar < 0).any() or (alpha_bar >= 1).any():
            raise ConfigError("alpha_bar must lie in [0, 1)")
        if (alpha_bar[1:] > alpha_bar[:-1]).any():
            raise ConfigError("alpha_bar must be non-increasing in t")
        self.alpha_bar = alpha_bar
        self.config = config
        self.flow = flow

    @property
    def num_timesteps(self) -> int:
        return len(self.alpha_bar)

    @property
    def betas(self) -> Tensor:
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        return 1.0 - self.alpha_bar / prev

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alpha_bar[-1] == 0)

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        """alpha_bar at (possibly fractional) t in [0, T-1], by linear interpolation; float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if ((t < 0) | (t > self.num_timesteps - 1)).any():
            raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}]")
        table = self.alpha_bar.to(t.device)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        frac = t - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def t_at_alpha_bar(self, alpha_bar: Tensor | float) -> Tensor:
        """The inverse of ``alpha_bar_at``: the fractional t at which the (piecewise-linear) alpha_bar equals the
        given values, clamped to [0, T-1]. float64, the shape of the input."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        table = self.alpha_bar  # decreasing
        desc = -table  # increasing, for searchsorted
        hi = torch.searchsorted(desc, -ab.reshape(-1)).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        a_lo, a_hi = table[lo], table[hi]
        frac = ((a_lo - ab.reshape(-1)) / (a_lo - a_hi)).clamp(0, 1)
        return (lo + frac).reshape(ab.shape)

    def sigma_tilde_at(self, t: Tensor | float) -> Tensor:
        """sigma~_t = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t), the variance-exploding noise level."""
        ab = self.alpha_bar_at(t)
        return ((1 - ab) / ab).sqrt()

    def t_at_sigma_tilde(self, sigma_tilde: Tensor | float) -> Tensor:
        """t at which sigma_t / alpha_t (the variance-exploding noise level) takes the given values."""
        st = torch.as_tensor(sigma_tilde, dtype=torch.float64)
        return self.t_at_alpha_bar(1.0 / (1.0 + st**2))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), float64; for rectified flow both divided by
        their sum (so alpha = 1 - tau, sigma = tau at the grid points)."""
        ab = self.alpha_bar_at(t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.flow:
            return a / (a + s), s / (a + s)
        return a, s

    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda_t = log(alpha_t / sigma_t); -inf at zero terminal SNR."""
        ab = self.alpha_bar_at(t)
        return 0.5 * (ab.log() - (1 - ab).log())

    def __repr__(self) -> str:
        name = self.config.name if self.config else ("flow" if self.flow else "custom")
        return f"Schedule({name}, T={self.num_timesteps}, alpha_bar[-1]={self.alpha_bar[-1].item():.3g})"


def make_schedule(config: ScheduleConfig | str = "linear", **overrides) -> Schedule:
    """Build a schedule from its config (or a name and keyword parameters)."""
    if isinstance(config, str):
        num_timesteps = overrides.pop("num_timesteps", 1000)
        zts = overrides.pop("zero_terminal_snr", False)
        config = ScheduleConfig(config, num_timesteps, dict(overrides), zts)
    elif overrides:
        raise TypeError("pass overrides only with a schedule name")
    if config.name == "flow":
        if config.zero_terminal_snr:
            raise ConfigError("rectified flow reaches zero SNR by construction (alpha = 0 at t = T-1): "
                              "drop zero_terminal_snr")
        try:
            return Schedule(flow_alpha_bar(config.num_timesteps, **config.params), config, flow=True)
        except TypeError as e:
            raise ConfigError(f"bad parameters for schedule 'flow': {e}") from None
    if config.name != "edm" and config.name not in BETA_SCHEDULES:
        raise ConfigError(f"unknown schedule {config.name!r}; choose from {', '.join(SCHEDULE_NAMES)}")
    try:
        if config.name == "edm":  # a table of noise levels rather than of betas
            alpha_bar = edm_alpha_bar(config.num_timesteps, **config.params)
        else:
            alpha_bar = alpha_bar_from_betas(BETA_SCHEDULES[config.name](config.num_timesteps, **config.params))
    except TypeError as e:  # unknown parameter names
        raise ConfigError(f"bad parameters for schedule {config.name!r}: {e}") from None
    if config.zero_terminal_snr:
        alpha_bar = rescale_zero_terminal_snr(alpha_bar)
    return Schedule(alpha_bar, config)


# --------------------------------------------------------------------------------------------------------------
# Sampling grids: which timesteps a sampler visits, and the noise levels it receives


class NoiseLevels(NamedTuple):
    """The N+1 noise levels a sampler walks through, noisiest first, each a float64 tensor of shape (N+1,).

    ``t[i]`` is the network's time input; ``alpha[i], sigma[i]`` define x_i = alpha x0 + sigma eps.
    The last level is the clean image (alpha 1, sigma 0, t = -1: never passed to the network); the one exception
    is DDIM on a schedule with ``final_level`` 'first', whose grid ends at t = 0's level, as diffusers' DDIM."""

    t: Tensor
    alpha: Tensor
    sigma: Tensor

    @property
    def num_steps(self) -> int:
        return len(self.t) - 1


SPACINGS = ("leading", "trailing", "linspace", "karras", "logsnr", "exponential")


def timesteps(schedule: Schedule, num_steps: int, spacing: str = "trailing", rho: float = 7.0,
              sigma_max: float | None = None, sigma_min: float | None = None) -> Tensor:
    """The ``num_steps`` timesteps a sampler visits, noisiest first; float64 tensor of shape (num_steps,).

    Uniform in t (integer steps): 'leading', 'trailing', 'linspace' (DDIM sec. 4.2; Lin et al. 2024, table 2).
    Fractional t: 'karras' (EDM eq. 5: sigma~^(1/rho) uniform, sigma~ = sigma / alpha), 'logsnr' (uniform in
    lambda = log(alpha / sigma), as DPM-Solver), 'exponential' (uniform in log sigma~: the same grid as 'logsnr').
    A zero-terminal-SNR schedule starts at t = T-1 (sigma~ = inf); the Karras and log-SNR grids then span the
    remaining finite range. ``sigma_max`` caps those grids at sigma~ = sigma_max: the first step then goes from
    t = T-1 straight to the cap (at such noise the denoiser is nearly constant and the exponential step nearly
    exact), and the other steps are spent where the image forms. ``sigma_min`` raises the low end of those grids
    to sigma~ = sigma_min (above the schedule's t = 0): the sampler's final step then goes from there to the clean
    image in one denoise, which with few steps is a better use of the last model call than a step between two
    nearly clean levels (samplers.DEFAULT_GRIDS)."""
    T = schedule.num_timesteps
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {num_steps!r}")
    if spacing in ("leading", "trailing", "linspace") and num_steps > T:
        raise ConfigError(f"steps ({num_steps}) cannot exceed the schedule's {T} timesteps with {spacing!r} spacing")
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round()
    elif spacing == "leading":
        offset = schedule.config.steps_offset if schedule.config is not None else 0
        ts = torch.arange(num_steps, dtype=torch.float64) * (T // num_steps) + offset
        if ts[-1] > T - 1:
            raise ConfigError(f"{num_steps} steps with 'leading' spacing and steps_offset {offset} pass the "
                              f"schedule's last timestep {T - 1}")
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / num_steps, dtype=torch.float64).round() - 1).flip(0)
    elif spacing in ("karras", "logsnr", "exponential"):
        if rho <= 0:
            raise ConfigError(f"rho must be positive, got {rho}")
        st_top = schedule.sigma_tilde_at(T - 2).item()  # below T-1, which may be zero SNR
        capped = sigma_max is not None and sigma_max < st_top
        if sigma_max is not None and sigma_max <= 0:
            raise ConfigError(f"sigma_max must be positive, got {sigma_max}")
        prepend = schedule.zero_terminal_snr or capped  # t = T-1 first, then the grid
        n = num_steps - 1 if prepend else num_steps
        if capped:
            t_max = schedule.t_at_sigma_tilde(sigma_max).item()
        else:
            t_max = T - 2 if schedule.zero_terminal_snr else T - 1
        st_min, st_max = schedule.sigma_tilde_at(0), schedule.sigma_tilde_at(t_max)
        t_min = 0.0
        if sigma_min is not None:
            if not sigma_min > 0:
                raise ConfigError(f"sigma_min must be positive, got {sigma_min}")
            if sigma_min >= st_max.item():
                raise ConfigError(f"sigma_min ({sigma_min:g}) must lie below the grid's top level sigma~ = "
                                  f"{st_max.item():.4g}")
            if sigma_min > st_min.item():
                st_min = torch.tensor(float(sigma_min), dtype=torch.float64)
                t_min = schedule.t_at_sigma_tilde(st_min).item()
        u = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        if spacing == "karras":
            st = (st_max ** (1 / rho) + u * (st_min ** (1 / rho) - st_max ** (1 / rho))) ** rho
        else:
            st = torch.exp(st_max.log() + u * (st_min.log() - st_max.log()))
        ts = schedule.t_at_sigma_tilde(st).flip(0) if n > 0 else torch.zeros(0, dtype=torch.float64)
        if n > 1:  # the ends exactly on the grid, free of round-off
            ts[0], ts[-1] = t_min, float(t_max)
        if prepend:
            ts = torch.cat([ts, torch.tensor([T - 1.0], dtype=torch.float64)])
    else:
        raise ConfigError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    ts = ts.flip(0)
    if len(ts) > 1 and (ts[1:] >= ts[:-1]).any():
        raise ConfigError(f"{num_steps} steps are too many for {spacing!r} spacing on this schedule "
                          "(two steps would share a noise level)")
    return ts


def noise_levels(schedule: Schedule, ts: Tensor, final: str = "clean") -> NoiseLevels:
    """Noise levels for descending timesteps ``ts``, with the clean level appended, or with ``final`` 'first'
    t = 0's level (diffusers' DDIM with set_alpha_to_one = False; where ``ts`` already ends at 0, the clean one)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 1:
        raise ConfigError("timesteps must be a non-empty 1-D tensor")
    if (ts[1:] >= ts[:-1]).any():
        raise ConfigError("timesteps must be strictly decreasing (noisiest first)")
    alpha, sigma = schedule.alpha_sigma(ts)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    if final == "first" and ts[-1] > 0:
        a0, s0 = schedule.alpha_sigma(zero)
        return NoiseLevels(torch.cat([ts, zero]), torch.cat([alpha, a0]), torch.cat([sigma, s0]))
    return NoiseLevels(torch.cat([ts, -one]), torch.cat([alpha, one]), torch.cat([sigma, zero]))
