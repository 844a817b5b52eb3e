"""The forward process, what a network predicts, the training loss, and the denoiser wrapper.

Notation (Kingma et al. 2021, 'Variational diffusion models'; the DDPM special case in brackets):
    x_t = alpha_t x0 + sigma_t eps                      [alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)]
    v_t = alpha_t eps - sigma_t x0                      (Salimans & Ho 2022, 'Progressive distillation', eq. 8)
    u_t = eps - x0   ('flow')                           (rectified flow's velocity dx_t/dtau when alpha = 1 - tau,
                                                         sigma = tau; Liu et al. 2022; a valid target on any schedule)
    score  grad log p(x_t) = -E[eps | x_t] / sigma_t
    'edm': EDM's preconditioned output F (Karras et al. 2022, 'Elucidating the design space', eq. 7 and table 1),
           D = c_skip x + c_out F(c_in x, c_noise) with sigma~ = sigma_t / alpha_t the variance-exploding level
           (written below for the VP state x_t = alpha_t x_VE, so it is finite at alpha_t = 0 too)
Everything here takes per-sample ``alpha, sigma`` of shape (B,) and images of shape (B, C, H, W).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .schedules import Schedule

Tensor = torch.Tensor
Prediction = Literal["eps", "x0", "v", "flow"]
PREDICTIONS = ("eps", "x0", "v", "flow", "edm")
WEIGHTINGS = ("simple", "min-snr", "edm")
NOISE_LEVELS = ("uniform", "lognormal")  # how training draws t: uniform in {0..T-1}, or EDM's log-normal sigma~


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    """Standard normal noise drawn with ``generator`` (on the generator's device, then moved), so that a seed
    gives the same numbers whichever device the result lives on."""
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _bc(a: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample coefficients (B,) (or a scalar) against x (B, ...), in x's dtype."""
    if not torch.is_tensor(a):  # a Python float: straight to x's dtype (never through float32)
        return torch.tensor(a, device=x.device, dtype=x.dtype)
    a = a.to(device=x.device, dtype=x.dtype)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def q_sample(x0: Tensor, alpha: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Draw from the forward marginal q(x_t | x0) = N(alpha_t x0, sigma_t^2 I) (DDPM eq. 4)."""
    return _bc(alpha, x0) * x0 + _bc(sigma, x0) * eps


def edm_scalings(alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, table 1) as factors on the VP-form state x_t = alpha x_VE:
    (c_skip', c_out, c_in') with D = c_skip' x_t + c_out F(c_in' x_t). With sigma~ = sigma / alpha and
    r = sqrt(sigma^2 + sigma_data^2 alpha^2): c_skip' = c_skip / alpha = sigma_data^2 alpha / r^2,
    c_out = sigma~ sigma_data / sqrt(sigma~^2 + sigma_data^2) = sigma sigma_data / r and
    c_in' = c_in / alpha = 1 / r, all finite at alpha = 0 (zero SNR: D = sigma_data F)."""
    if not sigma_data > 0:
        raise ConfigError(f"sigma_data must be positive, got {sigma_data}")
    r2 = sigma**2 + sigma_data**2 * alpha**2
    return sigma_data**2 * alpha / r2, sigma * sigma_data / r2.sqrt(), 1.0 / r2.sqrt()


def prediction_target(prediction: Prediction, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor,
                      sigma_data: float = 0.5) -> Tensor:
    """What the network is trained to output (for 'edm': F = (x0 - c_skip' x_t) / c_out, EDM eq. 8, written without
    the cancellation as (sigma x0 / sigma_data - sigma_data alpha eps) c_in', c_in' = 1 / sqrt(sigma^2 +
    sigma_data^2 alpha^2))."""
    if prediction == "edm":
        c_in = _bc(edm_scalings(alpha, sigma, sigma_data)[2], x0)
        return (_bc(sigma, x0) * x0 / sigma_data - sigma_data * _bc(alpha, x0) * eps) * c_in
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _bc(alpha, x0) * eps - _bc(sigma, x0) * x0
    if prediction == "flow":
        return eps - x0
    raise ConfigError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def x0_from_prediction(prediction: Prediction, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
                       sigma_data: float = 0.5) -> Tensor:
    """Convert a network output to the denoised estimate x0_hat = E[x0 | x_t]."""
    if prediction == "edm":
        c_skip, c_out, _ = edm_scalings(torch.as_tensor(alpha), torch.as_tensor(sigma), sigma_data)
        return _bc(c_skip, x_t) * x_t + _bc(c_out, x_t) * out
    a, s = _bc(alpha, x_t), _bc(sigma, x_t)
    if prediction == "eps":
        if (torch.as_tensor(alpha) == 0).any():
            raise ConfigError(
                "an eps-prediction model cannot denoise at zero SNR (alpha_t = 0: x0 = (x - sigma eps) / 0); "
                "train with prediction 'v', 'x0' or 'flow' for a zero-terminal-SNR or rectified-flow schedule"
            )
        return (x_t - s * out) / a
    if prediction == "x0":
        return out
    if prediction == "v":
        # x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2); the denominator is 1 for variance-preserving schedules
        return (a * x_t - s * out) / (a**2 + s**2)
    if prediction == "flow":
        # x_t = alpha x0 + sigma (u + x0)  =>  x0 = (x_t - sigma u) / (alpha + sigma)  (= x_t - tau u on 'flow')
        return (x_t - s * out) / (a + s)
    raise ConfigError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def eps_from_x0(x0_hat: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps_hat = (x_t - alpha x0_hat) / sigma (undefined at sigma = 0, the clean level)."""
    return (x_t - _bc(alpha, x_t) * x0_hat) / _bc(sigma, x_t)


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return _bc(alpha, x0) * eps - _bc(sigma, x0) * x0


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """The score view: grad_x log p_t(x) = -eps / sigma_t (Song et al. 2021, eq. 8 and Tweedie's formula)."""
    return -eps / _bc(sigma, eps)


def score_from_x0(x0_hat: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """grad_x log p_t(x) = (alpha_t x0_hat - x_t) / sigma_t^2 (Tweedie)."""
    return (_bc(alpha, x_t) * x0_hat - x_t) / _bc(sigma, x_t) ** 2


def snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha**2 / sigma**2


def x0_error_scale(prediction: Prediction, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """(d x0_hat / d output)^2: the factor by which a squared error in the network's output shows in x0_hat, so
    that a weighting stated in x0 space becomes a weight on each prediction's own error: sigma^2 / alpha^2 for eps
    (1 / SNR), 1 for x0, sigma^2 / (alpha^2 + sigma^2)^2 for v, sigma^2 / (alpha + sigma)^2 for flow, c_out^2 for
    edm."""
    if prediction == "eps":
        return sigma**2 / alpha**2
    if prediction == "x0":
        return torch.ones_like(alpha)
    if prediction == "v":
        return sigma**2 / (alpha**2 + sigma**2) ** 2
    if prediction == "flow":
        return sigma**2 / (alpha + sigma) ** 2
    if prediction == "edm":
        return edm_scalings(alpha, sigma, sigma_data)[1] ** 2
    raise ConfigError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")


def loss_weight(weighting: str, prediction: Prediction, alpha: Tensor, sigma: Tensor, gamma: float = 5.0,
                sigma_data: float = 0.5) -> Tensor:
    """Per-sample weight of the MSE on the network output.

    'simple' is DDPM's unweighted loss (eq. 14) on whatever the network predicts. The others are stated in x0 space
    and carried to the prediction's own error by :func:`x0_error_scale`:
    - 'min-snr' (Hang et al. 2023, 'Efficient diffusion training via Min-SNR weighting', eq. 8): min(SNR, gamma),
      i.e. min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v on a VP schedule;
    - 'edm' (Karras et al. 2022, eq. 8 and table 1): lambda(sigma~) = (sigma~^2 + sigma_data^2) / (sigma~ sigma_data)^2,
      which on EDM's preconditioned output F is exactly 1 (lambda c_out^2 = 1: the unit-variance training target)."""
    if weighting == "simple":
        return torch.ones_like(alpha)
    if weighting == "min-snr":
        if gamma <= 0:
            raise ConfigError(f"min-SNR gamma must be positive, got {gamma}")
        return snr(alpha, sigma).clamp(max=gamma) * x0_error_scale(prediction, alpha, sigma, sigma_data)
    if weighting == "edm":
        lam = (sigma**2 + sigma_data**2 * alpha**2) / (sigma**2 * sigma_data**2)
        return lam * x0_error_scale(prediction, alpha, sigma, sigma_data)
    raise ConfigError(f"unknown loss weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")


# --------------------------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig:
    """How a backbone's output is read and trained; saved in every checkpoint."""

    prediction: str = "eps"
    weighting: str = "simple"
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.5  # EDM's data standard deviation (prediction or weighting 'edm')
    noise_levels: str = "uniform"  # training's t: 'uniform' in {0..T-1}, or 'lognormal' (log sigma~ normal)
    p_mean: float = -1.2  # EDM's log-normal noise levels (Karras et al. 2022, table 1)
    p_std: float = 1.2

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.prediction!r}; choose from {', '.join(PREDICTIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data > 0):
            raise ConfigError(f"sigma_data must be positive, got {self.sigma_data!r}")
        if self.noise_levels not in NOISE_LEVELS:
            raise ConfigError(f"unknown noise-level distribution {self.noise_levels!r}; choose from "
                              f"{', '.join(NOISE_LEVELS)}")
        if not (isinstance(self.p_std, (int, float)) and self.p_std > 0) or not isinstance(self.p_mean, (int, float)):
            raise ConfigError(f"the log-normal noise levels need a number p_mean and p_std > 0, got {self.p_mean!r} "
                              f"and {self.p_std!r}")

    @property
    def edm(self) -> bool:
        return "edm" in (self.prediction, self.weighting) or self.noise_levels == "lognormal"

    def to_dict(self) -> dict:
        """The fields, the EDM ones only where they are used (the records of earlier checkpoints stay as they were)."""
        d = asdict(self)
        if not self.edm:
            for key in ("sigma_data", "noise_levels", "p_mean", "p_std"):
                del d[key]
        return d


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension), read off
    the CPU rather than assumed. Without it bf16 is emulated and slower than fp32, so 'auto' stays fp32 there."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    try:  # other architectures (and older PyTorch): the kernel's list of CPU features
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


# On a CPU, bf16 pays only when one image's forward pass is enough work: below this, the conversions and oneDNN's
# small-shape kernels cost more than the faster multiplies save. Measured on 2 AVX512-BF16 cores
# (benchmarks/cpu_speed.py, docs/RESULTS.md): unet-digits (0.05 GFLOP an image) is faster in fp32 for training
# and for sampling up to batch 16; unet-mnist (0.38), the DiT and ddpm-cifar10 (12) are faster in bf16.
CPU_BF16_MIN_GFLOP = 0.2


def forward_gflop(backbone: nn.Module) -> float | None:
    """GFLOP of one image's forward pass (torch's FlopCounterMode over a batch of one at the network's own size
    and a null condition), or None where the network does not say its input size or refuses the null condition
    (e.g. Stable Diffusion's U-Net, which needs an encoded prompt; large enough that bf16 pays anyway)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = getattr(backbone, "config", None)
    c, size = getattr(cfg, "in_channels", None), getattr(cfg, "image_size", None)
    if not (isinstance(c, int) and isinstance(size, int)):
        return None
    dev = next(backbone.parameters()).device
    cond = None
    if getattr(cfg, "context_dim", 0):
        from .conditioning.text import TextCond

        cond = TextCond(torch.zeros(1, 1, cfg.context_dim, device=dev), torch.ones(1, 1, dtype=torch.bool, device=dev))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            backbone(torch.zeros(1, c, size, size, device=dev), torch.full((1,), 500.0, device=dev), cond)
    except (ConfigError, RuntimeError, TypeError, ValueError):  # a network that takes another kind of condition
        return None
    return fc.get_total_flops() / 1e9


def autocast_dtype(precision: str, device: str | torch.device, backbone: nn.Module | None = None
                   ) -> torch.dtype | None:
    """The autocast dtype a precision setting means on ``device``: 'auto' is bf16 on CUDA, and on a CPU with
    native bf16 (:func:`cpu_native_bf16`) for a ``backbone`` whose forward pass per image is at least
    ``CPU_BF16_MIN_GFLOP`` (or any, when no backbone is named); fp32 (None: no autocast) elsewhere. 'fp32' is
    None, 'bf16' bf16. Training and sampling both read their setting here."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else None
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind != "cpu" or not cpu_native_bf16():
        return None
    if backbone is not None:
        gflop = forward_gflop(backbone)
        if gflop is not None and gflop < CPU_BF16_MIN_GFLOP:
            return None
    return torch.bfloat16


def compile_cache() -> str:
    """Where torch.compile keeps its compiled graphs across runs: ``$KAKUSAN_CACHE/inductor`` (default
    ~/.cache/kakusan/inductor; PyTorch's default is under /tmp) unless TORCHINDUCTOR_CACHE_DIR is set."""
    from .data.datasets import cache_dir

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' (CUDA if present, else the CPU), or a device name that exists here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available")
    return dev


class Denoiser(nn.Module):
    """A backbone plus the schedule it was trained on: D(x_t, t, cond) -> x0_hat.

    The backbone maps (x_t, t, class_labels) to its prediction (eps, x0, v or flow) and never sees alpha or sigma;
    this wrapper owns the conversion. ``t`` is the schedule's (possibly fractional) time, shape (B,) or scalar."""

    def __init__(self, backbone: nn.Module, schedule: Schedule, config: DiffusionConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.config = config or DiffusionConfig()
        self.autocast_dtype: torch.dtype | None = None  # the backbone's compute precision at inference
        # torch.compile'd forward (see compile); kept out of the module tree so state_dict is the backbone's alone
        object.__setattr__(self, "_compiled", None)
        self.compile_seconds = 0.0  # time spent in first calls of the compiled forward (tracing + compiling)
        self._compiled_shapes: set = set()

    def set_precision(self, precision: str, device: str | torch.device) -> "Denoiser":
        """The backbone's forward pass in ``precision`` (see :func:`autocast_dtype`); the sampler's own arithmetic
        (the x_t updates, the eps/v -> x0 conversion) stays in x_t's dtype. Set before :meth:`compile`."""
        dtype = autocast_dtype(precision, device, self.backbone)
        if self._compiled is not None and dtype != self.autocast_dtype:
            raise ConfigError("the denoiser was compiled in another precision; set the precision before compiling")
        self.autocast_dtype = dtype
        return self

    def compile(self, frozen: bool = False) -> "Denoiser":
        """Run the backbone's inference forward through ``torch.compile`` (inductor: C++/OpenMP kernels on a CPU,
        Triton on CUDA) in the precision set now. ``frozen``: the weights will not change (a loaded checkpoint,
        not a training run's EMA), so inductor may fold them into the graph and pre-pack them for its kernels.
        Compiled graphs are cached on disk (``$KAKUSAN_CACHE/inductor`` unless TORCHINDUCTOR_CACHE_DIR is set),
        so a later process with the same model and shapes skips most of the compile time; the first call for
        each input shape still traces, and its time is added to ``compile_seconds``."""
        compile_cache()
        fwd = _PrecisionForward(self.backbone, self.autocast_dtype)
        object.__setattr__(self, "_compiled", torch.compile(fwd, dynamic=False,
                                                            options={"freezing": True} if frozen else None))
        self.compile_seconds, self._compiled_shapes = 0.0, set()
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    @property
    def prediction(self) -> str:
        return self.config.prediction

    def net_input(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """What the backbone sees of x_t: x_t itself, or for 'edm' EDM's unit-variance c_in x (c_in' x_t)."""
        if self.prediction != "edm":
            return x_t
        return x_t * _bc(edm_scalings(alpha, sigma, self.config.sigma_data)[2], x_t)

    def raw(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
        if self._compiled is not None and not torch.is_grad_enabled():
            key = (tuple(x_t.shape), x_t.dtype, type(cond).__name__)
            if key in self._compiled_shapes:
                return self._compiled(x_t, t, cond)
            t0 = time.perf_counter()
            out = self._compiled(x_t, t, cond)
            self.compile_seconds += time.perf_counter() - t0
            self._compiled_shapes.add(key)
            return out
        return _PrecisionForward.run(self.backbone, self.autocast_dtype, x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0])
        alpha, sigma = self.schedule.alpha_sigma(t.cpu())
        alpha, sigma = alpha.to(x_t.device), sigma.to(x_t.device)
        out = self.raw(self.net_input(x_t, alpha, sigma), t, cond).to(x_t.dtype)
        return x0_from_prediction(self.prediction, out, x_t, alpha, sigma, self.config.sigma_data)

    def draw_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The training noise for a batch: t (float64, CPU) and eps ~ N(0, I). t is uniform in {0..T-1}, or with
        ``noise_levels`` 'lognormal' EDM's log sigma~ ~ N(p_mean, p_std^2) (Karras et al. 2022, table 1) mapped to
        the schedule's (fractional) t, levels beyond the table's range held at its ends."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = x0.shape[0]
        if self.config.noise_levels == "lognormal":
            z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64).cpu()
            t = self.schedule.t_at_sigma_tilde(torch.exp(self.config.p_mean + self.config.p_std * z))
        else:
            t = torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator,
                              device=gen_device).cpu().to(torch.float64)
        return t, randn(x0.shape, generator, x0.device, x0.dtype)

    def loss(self, x0: Tensor, cond: Tensor | None = None, generator: torch.Generator | None = None,
             noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Per-sample weighted MSE at t drawn by :meth:`draw_noise` (DDPM Alg. 1; EDM's loss, eq. 8, for its
        objective); shape (B,). ``noise``:
        a (t, eps) pair drawn beforehand (e.g. by :meth:`draw_noise` for a global batch, then sliced)."""
        t, eps = noise if noise is not None else self.draw_noise(x0, generator)
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = alpha.to(x0.device), sigma.to(x0.device)
        x_t = q_sample(x0, a, s, eps)
        target = prediction_target(self.prediction, x0, eps, a, s, self.config.sigma_data)
        out = self.raw(self.net_input(x_t, a, s), t.to(x0.device), cond)
        mse = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x0.ndim)))
        w = loss_weight(self.config.weighting, self.prediction, alpha, sigma, self.config.min_snr_gamma,
                        self.config.sigma_data)
        return mse * w.to(mse.device, mse.dtype)


class _PrecisionForward(nn.Module):
    """backbone(x_t, t, cond) under autocast to ``dtype`` (None: as is), returned in float32: the piece of the
    denoiser that torch.compile sees (the autocast region inside the compiled graph)."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.backbone, self.dtype = backbone, dtype

    @staticmethod
    def run(backbone, dtype, x_t, t, cond):
        if dtype is None:
            return backbone(x_t, t, cond)
        with torch.autocast(x_t.device.type, dtype=dtype):
            return backbone(x_t, t, cond).float()

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.run(self.backbone, self.dtype, x_t, t, cond)


class ClippedDenoiser(nn.Module):
    """Clamp x0_hat to the data range (DDPM's 'clip_denoised'); still a denoiser."""

    def __init__(self, denoiser: nn.Module, lo: float = -1.0, hi: float = 1.0):
        super().__init__()
        self.denoiser, self.lo, self.hi = denoiser, lo, hi

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.denoiser(x_t, t, cond).clamp(self.lo, self.hi)
