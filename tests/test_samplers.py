import pytest
import torch

from kakusan.errors import ConfigError
from kakusan.samplers import SAMPLERS, get_sampler, sample, sample_ddim, sample_ddpm
from kakusan.schedules import make_schedule, noise_levels, timesteps
from kakusan.testing import GaussianMixture, MixtureDenoiser


class _Fixed(torch.nn.Module):
    """A denoiser that always answers the same x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, cond=None):
        return self.x0.expand_as(x)


@pytest.mark.parametrize("variance", ["posterior", "upper"])
def test_ddpm_step_matches_closed_form_posterior(variance):
    """One ancestral step t -> t-1 with a known x0 has DDPM eq. 7's mean and variance beta-tilde (or beta)."""
    s = make_schedule("linear")
    t = 500
    ab, ab_prev, beta = s.alpha_bar[t], s.alpha_bar[t - 1], s.betas[t]
    x0, x_t = torch.tensor(0.4, dtype=torch.float64), 0.9
    n = 200_000
    levels = noise_levels(s, torch.tensor([float(t), float(t - 1)]))
    levels = levels._replace(t=levels.t[:2], alpha=levels.alpha[:2], sigma=levels.sigma[:2])  # one step only
    x = torch.full((n, 1), x_t, dtype=torch.float64)
    out = sample_ddpm(_Fixed(x0), x, levels, generator=torch.Generator().manual_seed(0), variance=variance)
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    var = beta * (1 - ab_prev) / (1 - ab) if variance == "posterior" else beta
    assert out.mean().item() == pytest.approx(mean.item(), abs=5 * (var.item() / n) ** 0.5)
    assert out.var().item() == pytest.approx(var.item(), rel=5 * (2 / n) ** 0.5)


def test_ddim_eta1_is_ddpm_and_eta0_is_deterministic():
    s = make_schedule("linear")
    mix = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.2, 0.3]))
    den = MixtureDenoiser(mix, s)
    levels = noise_levels(s, timesteps(s, 20))
    x = torch.randn(64, 2, dtype=torch.float64)
    a = sample_ddpm(den, x, levels, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(den, x, levels, generator=torch.Generator().manual_seed(5), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    c = sample_ddim(den, x, levels, generator=torch.Generator().manual_seed(1))
    d = sample_ddim(den, x, levels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_contract(name):
    """Shape, seeded determinism, finite values, exactly one model call per step, a clean endpoint."""
    s = make_schedule("cosine")
    mix = GaussianMixture(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), torch.full((3,), 0.1))
    den = MixtureDenoiser(mix, s)
    a = sample(den, s, (8, 1, 4, 4), sampler=name, steps=10, seed=7, dtype=torch.float64)
    assert den.calls == 10 * get_sampler(name).nfe_per_step
    b = sample(den, s, (8, 1, 4, 4), sampler=name, steps=10, seed=7, dtype=torch.float64)
    assert a.shape == (8, 1, 4, 4) and torch.isfinite(a).all() and torch.equal(a, b)
    # the endpoint is (close to) a sample of the mixture: each lies near one of the means
    dist = torch.cdist(a.reshape(8, 16), mix.means).min(1).values
    assert (dist < 1.0).all(), dist


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_samplers_reproduce_a_gaussian_mixture(name):
    """Samples of a 1-D two-mode mixture (weights 0.3 / 0.7) have the right mode shares and spreads."""
    s = make_schedule("linear")
    mix = GaussianMixture(torch.tensor([[-2.0], [1.5]]), torch.tensor([0.3, 0.5]), torch.tensor([0.3, 0.7]))
    x = sample(MixtureDenoiser(mix, s), s, (20_000, 1), sampler=name, steps=100, seed=0, dtype=torch.float64)
    left = x[x < 0]
    assert len(left) / len(x) == pytest.approx(0.3, abs=0.015)
    assert left.mean().item() == pytest.approx(-2.0, abs=0.03)
    assert left.std().item() == pytest.approx(0.3, abs=0.03)
    assert x[x > 0].std().item() == pytest.approx(0.5, abs=0.03)


def test_ddim_converges_with_steps():
    """Deterministic DDIM from fixed starts: the error to a 1000-step solution shrinks as steps grow (order ~1)."""
    s = make_schedule("linear")
    mix = GaussianMixture(torch.tensor([[-1.0] * 4, [1.0] * 4]), torch.tensor([0.2, 0.2]))
    den = MixtureDenoiser(mix, s)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda n: sample_ddim(den, x, noise_levels(s, timesteps(s, n, "linspace")))  # noqa: E731
    ref = run(1000)
    errs = [(run(n) - ref).pow(2).mean().sqrt().item() for n in (10, 20, 40, 80)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.25 * errs[0]


def test_sampler_errors():
    s = make_schedule("linear")
    den = _Fixed(torch.zeros(()))
    with pytest.raises(ConfigError, match="unknown sampler"):
        sample(den, s, (1, 1), sampler="euler-magic")
    with pytest.raises(ConfigError, match="positive"):
        sample(den, s, (1, 1), steps=0)
    with pytest.raises(ConfigError, match="eta"):
        sample(den, s, (1, 1), sampler="ddim", steps=2, eta=1.5)
    with pytest.raises(ConfigError, match="variance"):
        sample_ddpm(den, torch.zeros(1, 1), noise_levels(s, timesteps(s, 2)), variance="big")
