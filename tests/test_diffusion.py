import pytest
import torch

from kakusan.diffusion import (Denoiser, DiffusionConfig, eps_from_x0, loss_weight, prediction_target, q_sample,
                               score_from_eps, score_from_x0, snr, x0_from_prediction)
from kakusan.errors import ConfigError
from kakusan.schedules import make_schedule


def test_forward_marginal_mean_and_variance():
    """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I): moments of 200k draws, within 5 standard errors."""
    s = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (0, 250, 999):
        alpha, sigma = s.alpha_sigma(t)
        x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
        x_t = q_sample(x0, alpha.expand(n), sigma.expand(n), torch.randn(n, 1, generator=g, dtype=torch.float64))
        se_mean = sigma.item() / n**0.5
        assert abs(x_t.mean().item() - alpha.item() * 0.7) < 5 * se_mean
        assert x_t.var().item() == pytest.approx(sigma.item() ** 2, rel=5 * (2 / n) ** 0.5)


def test_forward_marginal_equals_composed_one_step_kernels():
    """Running q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) from t = 0 composes to the marginal."""
    s = make_schedule("cosine", num_timesteps=50)
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None]
    x = x0.clone()
    for beta in s.betas:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(49)
    resid = x - alpha * x0  # should be N(0, sigma^2)
    assert resid.mean().abs().item() < 5 * sigma.item() / n**0.5
    assert resid.var().item() == pytest.approx(sigma.item() ** 2, rel=0.02)


@pytest.mark.parametrize("schedule", ["cosine", "flow"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_prediction_conversions_are_exact(prediction, schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma = make_schedule(schedule).alpha_sigma(torch.linspace(0, 990, 16))
    x_t = q_sample(x0, alpha, sigma, eps)
    target = prediction_target(prediction, x0, eps, alpha, sigma)
    x0_hat = x0_from_prediction(prediction, target, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_from_x0(x0_hat, x_t, alpha, sigma), eps, rtol=1e-7, atol=1e-7)


def test_rectified_flow_forward_process_and_velocity():
    """On 'flow', x_t = (1 - tau) x0 + tau eps with tau = (t + 1) / T: moments of 200k draws within 5 standard
    errors, and the 'flow' target is the path's velocity dx_t / dtau = eps - x0 (finite difference along it)."""
    s = make_schedule("flow")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (0, 400, 998):
        alpha, sigma = s.alpha_sigma(t)
        tau = (t + 1) / 1000
        assert alpha.item() == pytest.approx(1 - tau, abs=1e-12) and sigma.item() == pytest.approx(tau, abs=1e-12)
        x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
        x_t = q_sample(x0, alpha.expand(n), sigma.expand(n), torch.randn(n, 1, generator=g, dtype=torch.float64))
        assert abs(x_t.mean().item() - (1 - tau) * 0.7) < 5 * tau / n**0.5
        assert x_t.std().item() == pytest.approx(tau, rel=5 * (0.5 / n) ** 0.5)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    (a0, s0), (a1, s1) = s.alpha_sigma(400), s.alpha_sigma(401)
    velocity = (q_sample(x0, a1, s1, eps) - q_sample(x0, a0, s0, eps)) / (s1 - s0)  # d x_t / d tau (tau = sigma)
    torch.testing.assert_close(velocity, prediction_target("flow", x0, eps, a0, s0), rtol=1e-9, atol=1e-9)
    a_T, s_T = s.alpha_sigma(999)  # pure noise: x0 = x - u
    assert a_T.item() == 0 and s_T.item() == 1 and s.zero_terminal_snr
    torch.testing.assert_close(x0_from_prediction("flow", eps - x0, eps, a_T, s_T), x0)


def test_v_prediction_works_at_zero_terminal_snr_and_eps_refuses():
    z = make_schedule("linear", zero_terminal_snr=True)
    alpha, sigma = z.alpha_sigma(torch.tensor([999.0]))
    x_t, v = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    torch.testing.assert_close(x0_from_prediction("v", v, x_t, alpha, sigma), -v)  # x0 = alpha x - sigma v
    with pytest.raises(ConfigError, match="zero SNR"):
        x0_from_prediction("eps", v, x_t, alpha, sigma)


def test_score_view_matches_gaussian_closed_form():
    """For x0 ~ N(mu, s^2 I): p_t = N(alpha mu, alpha^2 s^2 + sigma^2) and its score is known in closed form."""
    mu, s2 = 0.3, 0.25
    alpha, sigma = make_schedule("linear").alpha_sigma(torch.tensor([400.0]))
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)[:, None]
    var_t = alpha**2 * s2 + sigma**2
    true_score = -(x - alpha * mu) / var_t
    x0_hat = mu + alpha * s2 / var_t * (x - alpha * mu)  # E[x0 | x_t]
    torch.testing.assert_close(score_from_x0(x0_hat, x, alpha, sigma), true_score)
    torch.testing.assert_close(score_from_eps(eps_from_x0(x0_hat, x, alpha, sigma), sigma), true_score)


@pytest.mark.parametrize("schedule", ["linear", "flow"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_min_snr_weights_equal_clipped_snr_in_x0_space(prediction, schedule):
    """Each prediction's weighted error equals min(SNR, gamma) * ||x0_hat - x0||^2 (Hang et al. 2023), on a
    variance-preserving schedule and on rectified flow (alpha + sigma = 1)."""
    g = torch.Generator().manual_seed(0)
    alpha, sigma = make_schedule(schedule).alpha_sigma(torch.tensor([5.0, 100.0, 500.0, 900.0]))
    x0, eps = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    x_t = q_sample(x0, alpha, sigma, eps)
    x0_hat = x0 + 0.1 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    eps_hat = eps_from_x0(x0_hat, x_t, alpha, sigma)
    pred = prediction_target(prediction, x0_hat, eps_hat, alpha, sigma)
    target = prediction_target(prediction, x0, eps, alpha, sigma)
    weighted = loss_weight("min-snr", prediction, alpha, sigma, 5.0) * ((pred - target) ** 2).sum(1)
    expected = snr(alpha, sigma).clamp(max=5.0) * ((x0_hat - x0) ** 2).sum(1)
    torch.testing.assert_close(weighted, expected)
    assert (loss_weight("simple", prediction, alpha, sigma) == 1).all()


def test_bad_names():
    with pytest.raises(ConfigError, match="unknown prediction"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ConfigError, match="unknown loss weighting"):
        DiffusionConfig(weighting="p2")


class _Const(torch.nn.Module):
    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


def test_denoiser_loss_shape_and_seeded_determinism():
    d = Denoiser(_Const(), make_schedule("linear"), DiffusionConfig("eps"))
    x0 = torch.randn(8, 1, 4, 4)
    a = d.loss(x0, generator=torch.Generator().manual_seed(3))
    b = d.loss(x0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (8,) and torch.equal(a, b)
    # predicting zero eps: the loss is the mean squared noise, ~1
    big = d.loss(torch.randn(4096, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert big.mean().item() == pytest.approx(1.0, abs=0.03)


def test_denoiser_precision_bf16_autocast_keeps_the_samplers_dtype(monkeypatch):
    """bf16 runs the network under autocast (its answer moves by bf16 round-off, ~1e-2 relative) while the
    x0 the sampler sees stays float32; 'auto' means bf16 on a CPU with native bf16 for a network with enough work
    per image, fp32 for a smaller one and on a CPU without native bf16; an unknown precision is refused."""
    import kakusan.diffusion as diffusion
    from kakusan.models import UNet, get_preset

    torch.manual_seed(0)
    net = UNet(get_preset("unet-tiny")).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    d = Denoiser(net, make_schedule("linear"), DiffusionConfig("eps"))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10.0, 200.0, 500.0, 900.0])
    with torch.no_grad():
        ref = d(x, t)
        monkeypatch.setattr(diffusion, "cpu_native_bf16", lambda: False)
        assert d.set_precision("auto", "cpu").autocast_dtype is None and torch.equal(d(x, t), ref)
        monkeypatch.setattr(diffusion, "cpu_native_bf16", lambda: True)
        # native bf16, but unet-tiny's 0.008 GFLOP an image is below the measured break-even: fp32
        assert 0.005 < diffusion.forward_gflop(net) < diffusion.CPU_BF16_MIN_GFLOP
        assert d.set_precision("auto", "cpu").autocast_dtype is None
        monkeypatch.setattr(diffusion, "CPU_BF16_MIN_GFLOP", 0.001)
        assert d.set_precision("auto", "cpu").autocast_dtype == torch.bfloat16
        assert torch.equal(d(x, t), d.set_precision("bf16", "cpu")(x, t))
        assert d.set_precision("fp32", "cpu").autocast_dtype is None and torch.equal(d(x, t), ref)
        low = d.set_precision("bf16", "cpu")(x, t)
        assert d.set_precision("auto", "cuda").autocast_dtype == torch.bfloat16
    assert low.dtype == torch.float32
    assert not torch.equal(low, ref)
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 3e-2
    with pytest.raises(ConfigError, match="precision"):
        d.set_precision("fp16", "cpu")


def test_cpu_native_bf16_reads_the_cpu():
    """The detection agrees with the kernel's list of CPU features where there is one (x86: avx512_bf16 or
    amx_bf16 among the flags)."""
    from pathlib import Path

    from kakusan.diffusion import cpu_native_bf16

    info = Path("/proc/cpuinfo")
    if not info.is_file() or "flags" not in info.read_text():
        pytest.skip("no x86 /proc/cpuinfo flags to compare with")
    flags = info.read_text().split()
    assert cpu_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_compiled_denoiser_matches_eager_and_keeps_the_state_dict(tmp_path, monkeypatch):
    """Denoiser.compile: the same x0 as the eager forward (to kernel round-off), the backbone's state_dict
    unchanged (no wrapper keys), first-call time counted once per input shape, graphs cached under
    $KAKUSAN_CACHE/inductor; gradients still flow through the eager path (training is not compiled here)."""
    import os

    from kakusan.models import UNet, get_preset

    monkeypatch.setenv("KAKUSAN_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.manual_seed(0)
    net = UNet(get_preset("unet-tiny")).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    d = Denoiser(net, make_schedule("linear"), DiffusionConfig("eps")).set_precision("fp32", "cpu")
    keys = list(d.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10.0, 200.0, 500.0, 900.0])
    with torch.no_grad():
        ref = d(x, t)
        d.compile(frozen=True)
        out = d(x, t)
        first = d.compile_seconds
        again = d(x * 0.5, t)
        assert torch.allclose(again, Denoiser(net, d.schedule, d.config)(x * 0.5, t), atol=1e-5)
    assert d.compiled and list(d.state_dict()) == keys
    assert torch.allclose(out, ref, atol=1e-5) and out.dtype == torch.float32
    assert first > 0 and d.compile_seconds == first and len(d._compiled_shapes) == 1
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert any((tmp_path / "inductor").iterdir())
    with pytest.raises(ConfigError, match="before compiling"):
        d.set_precision("bf16", "cpu")
    x.requires_grad_(True)
    d.raw(x, t).sum().backward()  # with gradients on: the eager backbone
    assert x.grad is not None and torch.isfinite(x.grad).all()
