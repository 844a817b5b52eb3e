import math

import numpy as np
import pytest
import torch

from kakusan.errors import ConfigError
from kakusan.schedules import (Schedule, make_schedule, noise_levels, rescale_zero_terminal_snr,
                               timesteps)

# alpha_bar of the DDPM linear schedule (beta 1e-4..0.02, T = 1000, 0-indexed), computed once in float64 as
# prod(1 - beta) and cross-checked against the first-order closed form exp(-sum beta - sum beta^2 / 2) below and
# against diffusers' DDPMScheduler (when installed).
LINEAR_REFERENCE = {100: 0.895142, 300: 0.394011, 500: 0.077797, 700: 0.006868, 999: 0.000040}


def test_linear_reference_values():
    ab = make_schedule("linear").alpha_bar
    for t, ref in LINEAR_REFERENCE.items():
        assert round(ab[t].item(), 6) == pytest.approx(ref, abs=1e-6), t


def test_linear_matches_log_series_closed_form():
    # log prod(1 - b) = -sum_k sum(b^k)/k (Mercator series); with b <= 0.02, eight terms leave < 1e-14
    beta = np.linspace(1e-4, 0.02, 1000)
    ab = make_schedule("linear").alpha_bar.numpy()
    for t in (0, 10, 100, 500, 999):
        b = beta[: t + 1]
        approx = math.exp(-sum((b**k).sum() / k for k in range(1, 9)))
        assert ab[t] == pytest.approx(approx, rel=1e-10)


def test_linear_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    torch.testing.assert_close(make_schedule("linear").alpha_bar, ref, rtol=1e-5, atol=1e-9)


def test_cosine_matches_closed_form():
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = make_schedule("cosine").alpha_bar
    for t in (0, 100, 500, 900):  # away from the end, where beta is clipped at 0.999
        assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert (make_schedule("cosine").betas <= 0.999 + 1e-12).all()


def test_sigmoid_matches_closed_form():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    start, end, tau = -3.0, 3.0, 1.0
    abar = lambda u: (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))  # noqa: E731,E501
    ab = make_schedule("sigmoid").alpha_bar
    for t in (0, 250, 500, 750):
        assert ab[t].item() == pytest.approx(abar((t + 1) / 1000), rel=1e-9)


def test_quadratic_and_scaled_linear():
    q = make_schedule("quadratic").betas
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    assert torch.allclose(q.sqrt().diff(), q.sqrt().diff()[0].expand(999), atol=1e-12)  # sqrt(beta) linear
    sl = make_schedule("scaled-linear").betas
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic", "sigmoid", "scaled-linear"])
def test_every_schedule_valid_and_zero_terminal_snr(name):
    s = make_schedule(name)
    assert (s.alpha_bar.diff() < 0).all() and 0 < s.alpha_bar[0] < 1
    z = make_schedule(name, zero_terminal_snr=True)
    assert z.alpha_bar[-1].item() == 0.0 and z.zero_terminal_snr
    assert z.alpha_bar[0].item() == pytest.approx(s.alpha_bar[0].item(), rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the original (Lin et al., Alg. 1)
    a, b = s.alpha_bar.sqrt(), z.alpha_bar.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, slope * (a - a[-1]), rtol=0, atol=1e-12)
    alpha, sigma = z.alpha_sigma(999)
    assert alpha.item() == 0 and sigma.item() == 1 and z.log_snr(999).item() == -math.inf


def test_rectified_flow_schedule():
    """'flow': alpha = 1 - tau, sigma = tau at every grid point, tau = (t + 1) / T (SD3's shift moves it to
    shift tau / (1 + (shift - 1) tau)); alpha + sigma = 1 also between grid points; the same noise levels
    sigma~ = tau / (1 - tau) as its VP-equivalent table; bad parameters named."""
    T = 1000
    for shift in (1.0, 3.0):
        s = make_schedule("flow", shift=shift)
        tau = torch.arange(1, T + 1, dtype=torch.float64) / T
        tau = shift * tau / (1 + (shift - 1) * tau)
        alpha, sigma = s.alpha_sigma(torch.arange(T, dtype=torch.float64))
        torch.testing.assert_close(alpha, 1 - tau, rtol=0, atol=1e-12)
        torch.testing.assert_close(sigma, tau, rtol=0, atol=1e-12)
        torch.testing.assert_close(s.sigma_tilde_at(torch.arange(T - 1.0, dtype=torch.float64)),
                                   tau[:-1] / (1 - tau[:-1]), rtol=1e-9, atol=0)
        a, b = s.alpha_sigma(torch.tensor([0.5, 123.25, 998.9]))
        torch.testing.assert_close(a + b, torch.ones(3, dtype=torch.float64))
        assert s.zero_terminal_snr and s.log_snr(999).item() == -math.inf
    assert make_schedule("flow").flow and not make_schedule("linear").flow
    with pytest.raises(ConfigError, match="shift"):
        make_schedule("flow", shift=0.0)
    with pytest.raises(ConfigError, match="bad parameters for schedule 'flow'"):
        make_schedule("flow", s=0.008)
    with pytest.raises(ConfigError, match="zero SNR by construction"):
        make_schedule("flow", zero_terminal_snr=True)


def test_continuous_t_interpolates():
    s = make_schedule("cosine")
    ts = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(s.alpha_bar_at(ts), s.alpha_bar)
    mid = s.alpha_bar_at(torch.tensor(10.5))
    assert s.alpha_bar[11] < mid < s.alpha_bar[10]
    a, sg = s.alpha_sigma(torch.rand(100) * 999)
    torch.testing.assert_close(a**2 + sg**2, torch.ones(100, dtype=torch.float64))
    with pytest.raises(ValueError):
        s.alpha_bar_at(1000.0)


@pytest.mark.parametrize("name,params,match", [
    ("linear", {"beta_start": 0.03, "beta_end": 0.02}, "must not exceed"),
    ("linear", {"beta_start": -1e-4}, r"\(0, 1\)"),
    ("cosine", {"s": -0.1}, "offset"),
    ("sigmoid", {"start": 3, "end": -3}, "start < end"),
    ("sigmoid", {"tau": 0}, "tau"),
    ("linear", {"bogus": 1}, "bad parameters"),
    ("nonsense", {}, "unknown schedule"),
])
def test_invalid_schedules(name, params, match):
    with pytest.raises(ConfigError, match=match):
        make_schedule(name, **params)


def test_invalid_tables():
    with pytest.raises(ConfigError):
        make_schedule("linear", num_timesteps=1)
    with pytest.raises(ConfigError, match="non-increasing"):
        Schedule(torch.tensor([0.5, 0.9]))


def test_spacings_match_published_tables():
    s = make_schedule("linear")
    # Lin et al. 2024, table 2 (T = 1000, 10 steps)
    assert timesteps(s, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(s, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps(s, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    for sp in ("leading", "trailing", "linspace"):
        assert timesteps(s, 1000, sp).tolist() == list(range(999, -1, -1))
    with pytest.raises(ConfigError, match="positive"):
        timesteps(s, 0)
    with pytest.raises(ConfigError, match="exceed"):
        timesteps(s, 1001)
    with pytest.raises(ConfigError, match="unknown spacing"):
        timesteps(s, 10, "karras-ish")


def test_noise_levels_end_clean_and_reject_bad_order():
    s = make_schedule("linear")
    lv = noise_levels(s, timesteps(s, 5))
    assert lv.num_steps == 5 and lv.sigma[-1] == 0 and lv.alpha[-1] == 1
    assert (lv.sigma.diff() < 0).all()
    with pytest.raises(ConfigError, match="decreasing"):
        noise_levels(s, torch.tensor([10.0, 20.0]))


def test_rescale_keeps_first_value():
    ab = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    out = rescale_zero_terminal_snr(ab)
    assert out[0].item() == pytest.approx(0.99) and out[-1].item() == 0


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
@pytest.mark.parametrize("zts", [False, True])
def test_sigma_spacings(spacing, zts):
    s = make_schedule("cosine", zero_terminal_snr=zts)
    ts = timesteps(s, 12, spacing)
    assert len(ts) == 12 and ts[0] == 999 and ts[-1] == 0 and (ts.diff() < 0).all()
    alpha, sigma = s.alpha_sigma(ts[1:] if zts else ts)
    st = sigma / alpha  # sigma~ = sigma / alpha
    if spacing == "karras":  # sigma~^(1/7) equally spaced (EDM eq. 5)
        d = (st ** (1 / 7)).diff()
    else:  # log sigma~ equally spaced
        d = st.log().diff()
    torch.testing.assert_close(d, d[0].expand_as(d), rtol=1e-6, atol=1e-9)


def test_schedule_inverse():
    s = make_schedule("linear")
    ts = torch.rand(100, dtype=torch.float64) * 999
    torch.testing.assert_close(s.t_at_alpha_bar(s.alpha_bar_at(ts)), ts, rtol=0, atol=1e-9)
    a, sg = s.alpha_sigma(ts)
    torch.testing.assert_close(s.t_at_sigma_tilde(sg / a), ts, rtol=0, atol=1e-7)


def test_sigma_max_cap_starts_at_T_and_spaces_below_the_cap():
    s = make_schedule("cosine")
    ts = timesteps(s, 10, "karras", sigma_max=10.0)
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0
    a, sg = s.alpha_sigma(ts[1])
    assert (sg / a).item() == pytest.approx(10.0, rel=1e-9)
    d = ((s.alpha_sigma(ts[1:])[1] / s.alpha_sigma(ts[1:])[0]) ** (1 / 7)).diff()
    torch.testing.assert_close(d, d[0].expand_as(d))
    # a cap above the schedule's range changes nothing
    assert torch.equal(timesteps(s, 10, "karras", sigma_max=1e9), timesteps(s, 10, "karras"))
    with pytest.raises(ConfigError, match="sigma_max"):
        timesteps(s, 10, "logsnr", sigma_max=-1.0)
