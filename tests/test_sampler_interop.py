"""diffusers' schedulers driving a kakusan denoiser (kakusan.interop.sample_with_diffusers): with the same grid
and update rule both libraries must give the same samples from the same noise, so that benchmarks comparing them
on a trained network (benchmarks/sampler_models.py) compare samplers and nothing else."""

from pathlib import Path

import pytest
import torch

from kakusan.errors import ConfigError
from kakusan.interop import diffusers_scheduler, sample_with_diffusers
from kakusan.pipeline import Pipeline
from kakusan.samplers import sample_ddim, sample_unipc
from kakusan.schedules import make_schedule, noise_levels, timesteps

diffusers = pytest.importorskip("diffusers")

TINY = Path(__file__).parent / "data" / "reference" / "tiny-class.safetensors"  # unet-tiny, class-conditional


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    pipe = Pipeline.load(TINY, device="cpu", precision="fp32")
    d, _, _ = pipe.guided_denoiser(guidance=2.0)  # the guided, clipped model function a call samples
    return pipe, d


def _kakusan(fn, d, schedule, noise, steps, spacing, cond, **kw):
    lv = noise_levels(schedule, timesteps(schedule, steps, spacing))
    return fn(d, noise * lv.sigma[0].item(), lv, cond=cond, **kw)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_diffusers_ddim_driving_a_kakusan_model_is_kakusans_ddim(tiny, spacing):
    """DDIM is one closed-form update on a grid both libraries lay the same way: diffusers' DDIMScheduler through
    the adapter and kakusan's sample_ddim on the same tiny network agree to float32 round-off. (Not 'linspace':
    diffusers' DDIM steps from t to t - T // steps whatever its grid, so on a 'linspace' grid it steps to levels
    that are not the next timestep; test_diffusers_ddim_linspace_steps_off_its_grid.)"""
    pipe, d = tiny
    noise = torch.randn(4, *pipe.shape, generator=torch.Generator().manual_seed(0))
    cond = pipe._encode([1, 3, 5, 7])
    ours = _kakusan(sample_ddim, d, pipe.schedule, noise, 8, spacing, cond)
    theirs = sample_with_diffusers(diffusers_scheduler("DDIMScheduler", pipe.schedule, timestep_spacing=spacing),
                                   d, noise, 8, cond=cond)
    # diffusers starts every spacing from unit noise (init_noise_sigma = 1); kakusan from sigma at its first level
    # (1 - 6e-5 for 'trailing', less for 'leading', whose first step is t = 875): compare where they start alike
    if spacing == "leading":
        ours = _kakusan(sample_ddim, d, pipe.schedule, noise / noise_levels(
            pipe.schedule, timesteps(pipe.schedule, 8, spacing)).sigma[0].item(), 8, spacing, cond)
    assert ours.abs().max() > 0.5  # images, not zeros
    assert (ours - theirs).abs().max().item() < 2e-5


def test_diffusers_ddim_linspace_steps_off_its_grid(tiny):
    """What keeps 'linspace' out of the test above, pinned: diffusers' DDIM on 8 'linspace' steps (999, 856, ...,
    143, 0) steps each time to t - 125, so it differs from kakusan's DDIM on the same timesteps (which steps to the
    next one) by far more than round-off."""
    pipe, d = tiny
    noise = torch.randn(2, *pipe.shape, generator=torch.Generator().manual_seed(0))
    cond = pipe._encode([1, 3])
    ours = _kakusan(sample_ddim, d, pipe.schedule, noise, 8, "linspace", cond)
    theirs = sample_with_diffusers(diffusers_scheduler("DDIMScheduler", pipe.schedule, timestep_spacing="linspace"),
                                   d, noise, 8, cond=cond)
    assert (ours - theirs).abs().max().item() > 1e-2


def test_diffusers_unipc_driving_a_kakusan_model_matches_kakusans(tiny):
    """UniPC-2 (bh2) on the same 'trailing' grid: the same predictor-corrector in both libraries, to 2e-4 (diffusers
    solves its order conditions in float32; a level off by one timestep moves the samples by ~1e-2). DPM-Solver++
    is not compared: kakusan's integrates the interpolating polynomial exactly, diffusers' uses the paper's
    midpoint coefficient 1/2, a different second-order method (they differ by 8e-3 here)."""
    pipe, d = tiny
    noise = torch.randn(4, *pipe.shape, generator=torch.Generator().manual_seed(1))
    cond = pipe._encode([0, 2, 4, 6])
    ours = _kakusan(sample_unipc, d, pipe.schedule, noise, 10, "trailing", cond, order=2)
    theirs = sample_with_diffusers(diffusers_scheduler("UniPCMultistepScheduler", pipe.schedule,
                                                       timestep_spacing="trailing", solver_order=2),
                                   d, noise, 10, cond=cond)
    assert (ours - theirs).abs().max().item() < 2e-4


def test_diffusers_sigma_schedulers_see_the_noise_level_they_step_from(tiny):
    """Euler on Karras sigmas (fractional timesteps, VE-scaled state): the adapter hands D the VP state at the
    scheduler's own sigma~, so diffusers' Euler equals kakusan's DDIM (the same update) on the same levels."""
    pipe, d = tiny
    noise = torch.randn(3, *pipe.shape, generator=torch.Generator().manual_seed(2))
    cond = pipe._encode([8, 9, 1])
    sched = diffusers_scheduler("EulerDiscreteScheduler", pipe.schedule, use_karras_sigmas=True)
    theirs = sample_with_diffusers(sched, d, noise, 6, cond=cond)
    st = sched.sigmas[:-1].double()  # the sigma~ diffusers walked
    lv = noise_levels(pipe.schedule, pipe.schedule.t_at_sigma_tilde(st))
    ours = sample_ddim(d, noise * lv.sigma[0].item(), lv, cond=cond)
    assert (ours - theirs).abs().max().item() < 2e-5


def test_diffusers_scheduler_refuses_what_it_cannot_sample():
    with pytest.raises(ConfigError, match="rectified flow"):
        diffusers_scheduler("DDIMScheduler", make_schedule("flow"))
    with pytest.raises(ConfigError, match="zero-terminal-SNR"):
        diffusers_scheduler("DDIMScheduler", make_schedule("linear", zero_terminal_snr=True))
    with pytest.raises(ConfigError, match="no scheduler 'NoSuchScheduler'"):
        diffusers_scheduler("NoSuchScheduler", make_schedule("linear"))
