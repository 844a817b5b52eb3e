"""Classifier-free guidance: the formula, negative conditions, guidance rescale and the guidance interval."""

import pytest
import torch

from kakusan.errors import ConfigError
from kakusan.guidance import ClassifierFreeGuidance
from kakusan.schedules import make_schedule


class Toy(torch.nn.Module):
    """x0_hat = 0.5 x_t + (class index) * pattern: each condition pulls towards its own offset."""

    def __init__(self):
        super().__init__()
        self.pattern = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def forward(self, x_t, t, cond):
        return 0.5 * x_t + cond.view(-1, 1, 1, 1).float() * self.pattern


def test_formula_and_negative_condition():
    x = torch.randn(3, 1, 4, 4)
    t = torch.tensor(500.0)
    c = torch.tensor([1, 2, 3])
    toy = Toy()
    g = ClassifierFreeGuidance(toy, 3.0, null_cond=0)
    expect = toy(x, t, torch.zeros_like(c)) + 3.0 * (toy(x, t, c) - toy(x, t, torch.zeros_like(c)))
    torch.testing.assert_close(g(x, t, c), expect)
    neg = ClassifierFreeGuidance(toy, 3.0, null_cond=0, negative=5)
    n5 = torch.full_like(c, 5)
    torch.testing.assert_close(neg(x, t, c), toy(x, t, n5) + 3.0 * (toy(x, t, c) - toy(x, t, n5)))
    torch.testing.assert_close(ClassifierFreeGuidance(toy, 1.0, 0)(x, t, c), toy(x, t, c))
    with pytest.raises(ConfigError, match="needs a condition"):
        g(x, t, None)


def test_guidance_rescale_matches_the_conditional_eps_std():
    s = make_schedule("linear")
    x, t, c = torch.randn(4, 1, 4, 4), torch.tensor(300.0), torch.tensor([1, 2, 3, 4])
    toy = Toy()
    a, sg = (float(v) for v in s.alpha_sigma(300.0))
    eps = lambda x0: (x - a * x0) / sg  # noqa: E731
    plain = ClassifierFreeGuidance(toy, 4.0, 0)(x, t, c)
    full = ClassifierFreeGuidance(toy, 4.0, 0, rescale=1.0, schedule=s)(x, t, c)
    half = ClassifierFreeGuidance(toy, 4.0, 0, rescale=0.5, schedule=s)(x, t, c)
    torch.testing.assert_close(ClassifierFreeGuidance(toy, 4.0, 0, rescale=0.0, schedule=s)(x, t, c), plain)
    std = lambda e: e.flatten(1).std(1)  # noqa: E731
    torch.testing.assert_close(std(eps(full)), std(eps(toy(x, t, c))), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(std(eps(plain)), std(eps(toy(x, t, c))), rtol=1e-2)
    # phi = 0.5 scales the guided eps by the mean of 1 and the full factor
    factor = std(eps(toy(x, t, c))) / std(eps(plain))
    torch.testing.assert_close(eps(half), eps(plain) * (0.5 * factor + 0.5).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ClassifierFreeGuidance(toy, 2.0, 0, rescale=1.5, schedule=s)
    with pytest.raises(ConfigError, match="schedule"):
        ClassifierFreeGuidance(toy, 2.0, 0, rescale=0.5)


def test_guidance_interval():
    s = make_schedule("linear")
    toy = Toy()
    x, c = torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    g = ClassifierFreeGuidance(toy, 3.0, 0, interval=(0.5, 5.0), schedule=s)
    for t in (50.0, 300.0, 900.0):
        st = float(s.sigma_tilde_at(t))
        inside = 0.5 < st <= 5.0
        ref = ClassifierFreeGuidance(toy, 3.0, 0)(x, torch.tensor(t), c) if inside else toy(x, t, c)
        torch.testing.assert_close(g(x, torch.tensor(t), c), ref)
    assert float(s.sigma_tilde_at(50.0)) < 0.5 < float(s.sigma_tilde_at(300.0)) <= 5 < float(s.sigma_tilde_at(900.0))
    with pytest.raises(ConfigError, match="lo < hi"):
        ClassifierFreeGuidance(toy, 3.0, 0, interval=(2.0, 1.0), schedule=s)


def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional_denoiser():
    from kakusan.guidance import ClassifierGuidance
    from kakusan.testing import GaussianMixture, MixtureClassifier, MixtureDenoiser

    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 8, generator=g, dtype=torch.float64) * 2, torch.tensor([0.3, 0.5, 0.2]))
    s = make_schedule("cosine")
    guided = ClassifierGuidance(MixtureDenoiser(mix, s), MixtureClassifier(mix, s), 1.0, s)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for t in (100.0, 500.0, 900.0):
        a, sg = (float(v) for v in s.alpha_sigma(t))
        mu, sd = mix.means[y], mix.stds[y, None]
        v = a**2 * sd**2 + sg**2
        exact = mu + a * sd**2 / v * (x - a * mu)  # E[x0 | x_t, y]: one Gaussian component
        torch.testing.assert_close(guided(x, torch.tensor(t), y), exact, rtol=1e-8, atol=1e-8)
    # s = 0 is the unconditional denoiser; larger s moves further towards the class
    t = torch.tensor(500.0)
    torch.testing.assert_close(ClassifierGuidance(MixtureDenoiser(mix, s), MixtureClassifier(mix, s), 0.0, s)(x, t, y),
                               MixtureDenoiser(mix, s)(x, t))
    strong = ClassifierGuidance(MixtureDenoiser(mix, s), MixtureClassifier(mix, s), 3.0, s)
    cls = MixtureClassifier(mix, s)
    a, sg = (float(v) for v in s.alpha_sigma(500.0))
    p1 = cls(a * guided(x, t, y), t).gather(1, y[:, None]).mean()
    p3 = cls(a * strong(x, t, y), t).gather(1, y[:, None]).mean()
    assert p3 > p1
    with pytest.raises(ConfigError, match="target class"):
        guided(x, t, None)
