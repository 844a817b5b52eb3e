"""EDM's training objective (Karras et al. 2022): the preconditioning's exact conversions in the (alpha, sigma)
representation, its loss weighting, log-normal noise levels, the EDM noise table, and a run through the trainer."""

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_resume_exact

from kakusan.diffusion import (PREDICTIONS, Denoiser, DiffusionConfig, edm_scalings, loss_weight, prediction_target,
                               q_sample, x0_error_scale, x0_from_prediction)
from kakusan.errors import ConfigError
from kakusan.schedules import make_schedule

SD = 0.5


def _levels(schedule_name="edm"):
    s = make_schedule(schedule_name)
    t = torch.tensor([0.0, 3.5, 100.0, 412.25, 700.0, 998.0, 999.0], dtype=torch.float64)
    return s, t, *s.alpha_sigma(t)


@pytest.mark.parametrize("schedule_name", ["edm", "cosine", "flow"])
def test_preconditioning_equals_edm_table_1_in_the_variance_exploding_form(schedule_name):
    """On any schedule, D(x_t) = c_skip' x_t + c_out F(c_in' x_t) is EDM's D(x; sigma) = c_skip x + c_out F(c_in x)
    of the same state in VE form x = x_t / alpha, sigma = sigma_t / alpha_t (table 1)."""
    _, _, alpha, sigma = _levels(schedule_name)
    keep = alpha > 0
    alpha, sigma = alpha[keep], sigma[keep]
    st = sigma / alpha
    c_skip, c_out, c_in = edm_scalings(alpha, sigma, SD)
    torch.testing.assert_close(c_skip * alpha, SD**2 / (st**2 + SD**2), rtol=1e-12, atol=0)  # times x_VE
    torch.testing.assert_close(c_out, st * SD / (st**2 + SD**2).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_in * alpha, 1 / (st**2 + SD**2).sqrt(), rtol=1e-12, atol=0)

    g = torch.Generator().manual_seed(0)
    x_ve = torch.randn(len(st), 3, 4, 4, generator=g, dtype=torch.float64) * (1 + st.view(-1, 1, 1, 1))
    f = lambda z: torch.tanh(z) * 0.7 + 0.1  # noqa: E731  any network output
    st4 = st.view(-1, 1, 1, 1)
    d_edm = SD**2 / (st4**2 + SD**2) * x_ve + st4 * SD / (st4**2 + SD**2).sqrt() * f(x_ve / (st4**2 + SD**2).sqrt())
    x_t = x_ve * alpha.view(-1, 1, 1, 1)
    d_ours = x0_from_prediction("edm", f(x_t * c_in.view(-1, 1, 1, 1)), x_t, alpha, sigma, SD)
    torch.testing.assert_close(d_ours, d_edm, rtol=1e-10, atol=1e-12)


def test_target_and_reading_invert_each_other_and_hold_at_zero_snr():
    """x0_from_prediction(target) = x0 exactly at every level, including alpha = 0 (zero terminal SNR), where
    D = sigma_data F and the network input is x_t / sigma."""
    s = make_schedule("cosine", zero_terminal_snr=True)
    t = torch.tensor([0.0, 10.0, 500.0, 990.0, 999.0], dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    assert alpha[-1] == 0
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    target = prediction_target("edm", x0, eps, alpha, sigma, SD)
    assert torch.isfinite(target).all()
    x_t = q_sample(x0, alpha, sigma, eps)
    torch.testing.assert_close(x0_from_prediction("edm", target, x_t, alpha, sigma, SD), x0, rtol=1e-9, atol=1e-9)
    c_skip, c_out, c_in = edm_scalings(alpha, sigma, SD)
    assert c_skip[-1] == 0 and c_out[-1] == SD and c_in[-1] == 1 / sigma[-1]


def test_the_target_keeps_float32_precision_at_the_smallest_levels():
    """F = (x0 - c_skip' x_t) / c_out cancels almost exactly where sigma~ is tiny; the closed form does not."""
    s = make_schedule("edm")
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    g = torch.Generator().manual_seed(4)
    x0, eps = (torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    exact = prediction_target("edm", x0, eps, alpha, sigma, SD)
    f32 = prediction_target("edm", x0.float(), eps.float(), alpha.float(), sigma.float(), SD)
    assert (f32.double() - exact).abs().max() < 1e-5


def test_unit_variance_input_and_target_for_data_of_std_sigma_data():
    """EDM's reason for the preconditioning (appendix B.6): for data of standard deviation sigma_data, the
    network's input and its training target both have unit variance at every noise level; for Gaussian data the
    ideal F is 0 (D* = c_skip x is the exact posterior mean), so the loss at F = 0 is exactly 1."""
    s, t, alpha, sigma = _levels()
    n = 400_000
    g = torch.Generator().manual_seed(2)
    for a, sg in zip(alpha[1:-1], sigma[1:-1]):
        x0 = SD * torch.randn(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        x_t = a * x0 + sg * eps
        c_skip, c_out, c_in = edm_scalings(a, sg, SD)
        assert abs((c_in * x_t).var().item() - 1) < 0.01
        target = prediction_target("edm", x0, eps, a, sg, SD)
        assert abs(target.var().item() - 1) < 0.01
        # the posterior mean of Gaussian data in VE form: SD^2 / (SD^2 + sigma~^2) x_VE = c_skip' x_t
        st = sg / a
        torch.testing.assert_close(c_skip * x_t, SD**2 / (SD**2 + st**2) * (x_t / a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_error_scale_is_the_squared_derivative_of_x0_hat(prediction):
    """Each weighting stated in x0 space reaches the network's own error through (d x0_hat / d out)^2: checked by
    autograd on the conversion itself."""
    _, _, alpha, sigma = _levels("cosine")
    x_t = torch.randn(len(alpha), 1, 1, 1, dtype=torch.float64)
    out = torch.randn(len(alpha), 1, 1, 1, dtype=torch.float64, requires_grad=True)
    x0_from_prediction(prediction, out, x_t, alpha, sigma, SD).sum().backward()
    torch.testing.assert_close(out.grad.flatten() ** 2, x0_error_scale(prediction, alpha, sigma, SD),
                               rtol=1e-10, atol=0)


def test_edm_weighting_is_lambda_in_x0_space_and_one_on_edm_output():
    _, _, alpha, sigma = _levels()
    st = sigma / alpha
    lam = (st**2 + SD**2) / (st * SD) ** 2
    torch.testing.assert_close(loss_weight("edm", "edm", alpha, sigma, sigma_data=SD), torch.ones_like(alpha))
    torch.testing.assert_close(loss_weight("edm", "x0", alpha, sigma, sigma_data=SD), lam)
    torch.testing.assert_close(loss_weight("edm", "eps", alpha, sigma, sigma_data=SD), lam * st**2)
    # min-SNR on the EDM output: min(SNR, gamma) in x0 space, times c_out^2
    snr = 1 / st**2
    torch.testing.assert_close(loss_weight("min-snr", "edm", alpha, sigma, 5.0, SD),
                               snr.clamp(max=5.0) * edm_scalings(alpha, sigma, SD)[1] ** 2)


def test_edm_schedule_spans_edm_levels_log_uniformly():
    s = make_schedule("edm")
    st = s.sigma_tilde_at(torch.arange(1000, dtype=torch.float64))
    assert math.isclose(st[0].item(), 0.002, rel_tol=1e-9) and math.isclose(st[-1].item(), 80.0, rel_tol=1e-9)
    steps = st.log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, math.log(40_000) / 999), rtol=1e-8, atol=0)
    s2 = make_schedule("edm", sigma_min=0.01, sigma_max=10.0, num_timesteps=50)
    assert math.isclose(s2.sigma_tilde_at(49).item(), 10.0, rel_tol=1e-9)
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        make_schedule("edm", sigma_min=5.0, sigma_max=1.0)


def test_lognormal_noise_levels_follow_p_mean_and_p_std():
    s = make_schedule("edm")
    d = Denoiser(nn.Identity(), s, DiffusionConfig("edm", "edm", noise_levels="lognormal", p_mean=-1.2, p_std=1.2))
    t, eps = d.draw_noise(torch.zeros(20_000, 1, 1, 1), torch.Generator().manual_seed(3))
    assert t.dtype == torch.float64 and eps.shape == (20_000, 1, 1, 1)
    log_st = s.sigma_tilde_at(t).log()
    assert abs(log_st.mean().item() + 1.2) < 0.03 and abs(log_st.std().item() - 1.2) < 0.03
    with pytest.raises(ConfigError, match="noise-level distribution"):
        DiffusionConfig("edm", noise_levels="beta")
    with pytest.raises(ConfigError, match="p_std > 0"):
        DiffusionConfig("edm", noise_levels="lognormal", p_std=0.0)
    with pytest.raises(ConfigError, match="sigma_data must be positive"):
        DiffusionConfig("edm", sigma_data=-1.0)
    # records of other models keep their old fields only
    assert set(DiffusionConfig("v", "min-snr").to_dict()) == {"prediction", "weighting", "min_snr_gamma"}


def test_train_edm_runs_resumes_exactly_and_samples_with_heun_18(tmp_path, digits, capsys):
    from kakusan.cli import main
    from kakusan.pipeline import Pipeline
    from kakusan.samplers import model_calls
    from kakusan.training import Trainer, TrainConfig
    from kakusan.training.trainer import EDM_RECIPE

    kw = dict(preset="unet-tiny", cond="class", batch_size=16, log_every=5, sample_every=0, checkpoint_every=10,
              progress=False, warmup_steps=5, lr=1e-3, **EDM_RECIPE)
    ckpt = assert_resume_exact(tmp_path, digits, 20, **kw)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["schedule"]["name"] == "edm"
    assert config["diffusion"] == {"prediction": "edm", "weighting": "edm", "min_snr_gamma": 5.0, "sigma_data": 0.5,
                                   "noise_levels": "lognormal", "p_mean": -1.2, "p_std": 1.2}
    pipe = Pipeline.load(ckpt, device="cpu")
    assert pipe.defaults() == ("heun", 18)
    assert model_calls("heun", pipe.denoiser.schedule, 18) == 35
    out = pipe(class_label=[1, 2], seed=0, guidance=2.0)
    assert out.record["sampler"] == "heun" and out.record["steps"] == 18
    assert torch.isfinite(out.images).all() and out.images.shape == (2, 1, 8, 8)
    # every sampler reads the model through (alpha, sigma)
    for sampler in ("ddpm", "ddim", "dpmpp-2m", "unipc-2", "euler-ancestral"):
        assert torch.isfinite(pipe(class_label=3, sampler=sampler, steps=6, seed=0).images).all()
    # fine-tuning an EDM base keeps its sigma_data, and says so when the objective changes
    with pytest.raises(ConfigError, match="sigma_data 0.5, which a fine-tuning run keeps"):
        Trainer(TrainConfig(out=str(tmp_path / "ft"), init_from=str(ckpt), sigma_data=0.7, steps=1, **{
            k: v for k, v in kw.items() if k not in EDM_RECIPE}), digits)
    with pytest.warns(UserWarning, match="trained with EDM's preconditioning"):
        Trainer(TrainConfig(out=str(tmp_path / "ft"), init_from=str(ckpt), steps=1, **{
            k: v for k, v in kw.items() if k not in EDM_RECIPE}), digits)
    with pytest.raises(ConfigError, match="drop --noise-levels"):
        TrainConfig(init_from=str(ckpt), distill=True, noise_levels="lognormal")
    # the CLI flag is the recipe, and flags beside it win
    assert main(["train", "--edm", "--prediction", "v", "--preset", "unet-tiny", "--dry-run", "--estimate-steps", "0",
                 "--out", str(tmp_path / "dry")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["schedule"], printed["prediction"], printed["weighting"], printed["noise_levels"]) == (
        "edm", "v", "edm", "lognormal")
