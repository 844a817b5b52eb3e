"""Models of other codebases as kakusan checkpoints: a converted checkpoint (config + safetensors, nothing
pickled) samples and evaluates like one kakusan trained.

``import_dit``: a checkpoint of the DiT paper's released code (Peebles & Xie 2023; e.g. DiT-XL-2-256x256.pt,
class-conditional ImageNet in the latent space of Stable Diffusion's f = 8 autoencoder). Its diffusion is
DDPM's linear schedule over 1,000 steps with eps prediction (the learned variance is not used by kakusan's
samplers); its latents are the autoencoder's times 0.18215, the constant it was trained with.

The other way round, ``sample_with_diffusers``: diffusers' schedulers driving a kakusan denoiser, so that both
libraries' samplers can be compared on the same trained network from the same noise
(benchmarks/sampler_models.py).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

from .diffusion import DiffusionConfig
from .errors import CheckpointError
from .metrics.provenance import file_sha256
from .models import model_record
from .models.dit import DiT, config_from_state, read_reference_state
from .schedules import ScheduleConfig
from .checkpoints import load_state_dict_into, save_checkpoint

DIT_LATENT_SCALE = 0.18215  # the released DiTs' latent scale (Stable Diffusion's autoencoder)


def import_dit(weights: str | Path, out: str | Path, *, autoencoder: str | Path | None = None,
               latent_scale: float = DIT_LATENT_SCALE, num_heads: int | None = None,
               class_names: list[str] | None = None) -> Path:
    """Convert a released DiT checkpoint into the run folder ``out``; returns the checkpoint folder.

    ``autoencoder``: the diffusers ``AutoencoderKL`` folder of its latent space (sd-vae-ft-ema / -mse), recorded
    by hash with ``latent_scale`` so that ``kakusan sample`` decodes; without it the checkpoint samples latents.
    """
    weights = Path(weights).expanduser()
    state = read_reference_state(weights)
    cfg = config_from_state(state, num_heads, where=str(weights))
    model = DiT(cfg)
    load_state_dict_into(model, state, weights)
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a model of {cfg.num_classes} classes")
    config = {
        "model": model_record(cfg),
        "schedule": ScheduleConfig("linear", 1000).to_dict(),
        "diffusion": DiffusionConfig("eps", "simple").to_dict(),
        "data": {"spec": f"imported:{weights}", "name": f"imported from {weights.name}", "size": 0,
                 "shape": [cfg.in_channels, cfg.image_size, cfg.image_size], "class_names": class_names or []},
        "imported": {"kind": "dit", "path": str(weights), "sha256": file_sha256(weights)},
    }
    if autoencoder is not None:
        from .checkpoints import load_autoencoder

        ae = load_autoencoder(autoencoder)
        if ae.latent_channels != cfg.in_channels:
            raise CheckpointError(f"the autoencoder {ae.source} has {ae.latent_channels} latent channels, the DiT "
                                  f"takes {cfg.in_channels}")
        ae.scale = latent_scale
        config["autoencoder"] = ae.record()
    out = Path(out)
    with torch.no_grad():
        return save_checkpoint(out / "checkpoints", 0, config, model, model, None, {"imported": True})


# --------------------------------------------------------------------------------------------------------------
# diffusers' schedulers driving a kakusan denoiser
#
# To compare samplers on a trained network (benchmarks/sampler_models.py) both libraries must sample the same
# model function from the same noise. A diffusers scheduler asks, at each step, for the model's output at the noise
# level it is at; the adapter answers with kakusan's denoiser D at that level, converted to the eps diffusers is
# told to expect. The level is read from the scheduler itself (its sigma~ for the sigma-based schedulers and for
# the Karras / exponential grids, whose timesteps are fractional; alphas_cumprod[t] for DDIM / DDPM), so the
# network sees the noise level diffusers' update assumes, whatever its grid. Guidance, clipping and precision are
# the denoiser's: pass the guided denoiser of a Pipeline (Pipeline.guided_denoiser) to sample the guided model.


def diffusers_scheduler(cls, schedule, **options):
    """A diffusers scheduler (class or class name, e.g. "DDIMScheduler") on kakusan's ``schedule``: its betas as
    ``trained_betas``, eps prediction (the adapter converts D to eps), and ``options`` (timestep_spacing,
    use_karras_sigmas, solver_order, ...). DDIM gets set_alpha_to_one = True and no clipping unless told otherwise
    (its last step then ends at the clean image, as kakusan's)."""
    import diffusers

    from .errors import ConfigError

    if isinstance(cls, str):
        if not hasattr(diffusers, cls):
            raise ConfigError(f"diffusers {diffusers.__version__} has no scheduler {cls!r}")
        cls = getattr(diffusers, cls)
    if schedule.flow or schedule.zero_terminal_snr:
        raise ConfigError("diffusers' DDPM-family schedulers take a variance-preserving schedule with SNR > 0 at "
                          "t = T-1; this one is " + ("rectified flow" if schedule.flow else "zero-terminal-SNR"))
    kw = {"num_train_timesteps": schedule.num_timesteps, "trained_betas": schedule.betas.to(torch.float32).numpy(),
          "prediction_type": "epsilon"}
    if cls.__name__ == "DDIMScheduler":
        kw.update(set_alpha_to_one=True, clip_sample=False)
    return cls(**{**kw, **options})


def _scheduler_level(sched, i: int) -> float:
    """sigma~ = sigma / alpha of the level the scheduler's next step starts from (step ``i`` of its timesteps)."""
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None and len(sigmas) > 1:
        idx = sched.step_index if getattr(sched, "step_index", None) is not None else i
        return float(sigmas[idx])
    t = int(sched.timesteps[i])
    ab = float(sched.alphas_cumprod[t])
    return math.sqrt((1 - ab) / ab)


@torch.no_grad()
def sample_with_diffusers(scheduler, denoiser, noise: torch.Tensor, steps: int, *, cond=None,
                          generator: torch.Generator | None = None, schedule=None,
                          state_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sample ``denoiser`` (D(x_t, t, cond) -> x0_hat on its ``schedule``) with a diffusers ``scheduler`` (see
    :func:`diffusers_scheduler`) in ``steps`` steps of the scheduler (Heun: 2 model calls per step but the
    last), from unit ``noise`` (B, ...): x_T = noise x the scheduler's init_noise_sigma, as diffusers' pipelines
    start. kakusan starts the same noise at x_T = noise x sigma_T (the VP level of t = T-1), so with the same grid
    both start from the same state. ``generator``: the noise of stochastic schedulers (DDPM, SDE-DPM-Solver++).

    The scheduler's state is kept in ``state_dtype`` (float64 unless told otherwise) and the network called in
    ``noise``'s dtype: in eps form a float32 state loses the image at low SNR (x0 = (x - sigma eps) / alpha with
    alpha = 5e-5 at the cosine schedule's t = T-1 keeps ~3 digits), an error of the state's precision, not of the
    solver. A float32 state would put that round-off on diffusers' side of a comparison; float64 keeps it out.
    Returns the sample in ``noise``'s dtype. ``schedule``: the denoiser's (read from ``denoiser.schedule`` unless
    given: a guided or clipped wrapper may not carry it)."""
    schedule = schedule if schedule is not None else denoiser.schedule
    scheduler.set_timesteps(steps)
    x = noise.to(state_dtype) * float(scheduler.init_noise_sigma)
    kw = {"generator": generator} if generator is not None and "generator" in \
        inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)  # the VP state (Euler / Heun divide by sqrt(1 + sigma~^2))
        st = _scheduler_level(scheduler, i)
        a = 1.0 / math.sqrt(1.0 + st * st)
        s = st * a
        t_k = schedule.t_at_sigma_tilde(st).item()
        x0 = denoiser(x_in.to(noise.dtype), torch.full((x.shape[0],), t_k, device=x.device), cond).to(state_dtype)
        eps = (x_in - a * x0) / s
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x.to(noise.dtype)
