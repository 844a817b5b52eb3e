"""An exact-score oracle: data from an isotropic Gaussian mixture, whose denoiser E[x0 | x_t] is analytic.

For x0 ~ sum_k pi_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps:
    x_t | k ~ N(alpha mu_k, v_k I),  v_k = alpha^2 s_k^2 + sigma^2,
    E[x0 | x_t, k] = mu_k + (alpha s_k^2 / v_k) (x_t - alpha mu_k),
    E[x0 | x_t] = sum_k r_k(x_t) E[x0 | x_t, k],  r_k = softmax_k(log pi_k + log N(x_t; alpha mu_k, v_k I)).
Used by the tests to check samplers against closed forms; works on any shape (B, ...) with prod(...) = D.
"""

from __future__ import annotations

import math

import torch

from .schedules import Schedule


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # (K,)
        K = len(self.means)
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.weights = w.to(torch.float64) / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def _terms(self, x_t: torch.Tensor, alpha, sigma):
        """a (B|1, 1, 1), the per-component variance of x_t v (B|1, K, 1), x_t - a mu_k (B, K, D), and
        log p(k | x_t) (B, K), in float64."""
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)  # (B, D)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        v = a**2 * self.stds[None, :, None] ** 2 + s**2
        diff = x[:, None, :] - a * self.means[None]
        logp = (torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / v[..., 0]
                - 0.5 * self.dim * torch.log(2 * math.pi * v[..., 0]))
        return a, v, diff, torch.log_softmax(logp, dim=1)

    def denoise(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t] for per-sample or scalar (alpha, sigma); returns x_t's shape and dtype."""
        a, v, diff, log_r = self._terms(x_t, alpha, sigma)
        x0_k = self.means[None] + a * self.stds[None, :, None] ** 2 / v * diff  # (B, K, D)
        return (log_r.exp()[..., None] * x0_k).sum(1).reshape(x_t.shape).to(x_t.dtype)

    def component(self, x0: torch.Tensor) -> torch.Tensor:
        """The most probable component of clean points x0, (B,) int64: which mode a sample landed in."""
        return self.log_posterior(x0, 1.0, 0.0).argmax(1)

    def log_posterior(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """log p(k | x_t), (B, K), float64, differentiable in x_t: the exact noise-level-aware classifier."""
        return self._terms(x_t, alpha, sigma)[3]


class MixtureDenoiser(torch.nn.Module):
    """The mixture's exact denoiser D(x_t, t) for a schedule, in the sampler contract."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t).cpu())
        return self.mixture.denoise(x_t, alpha, sigma)


class MixtureConsistency(torch.nn.Module):
    """The mixture's exact consistency function f(x_t, t): the probability-flow ODE from x_t to the schedule's
    first level, then the final denoise (``exact_endpoint``): what consistency distillation approximates, and
    what makes multistep consistency sampling exact. Each call integrates the ODE (DOP853, tolerance ``tol``)."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, tol: float = 1e-8):
        super().__init__()
        self.mixture, self.schedule, self.tol = mixture, schedule, tol
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        if not (t == t[0]).all():
            raise ValueError("MixtureConsistency takes one t per call")
        (a, s), (a1, s1) = (tuple(v.item() for v in self.schedule.alpha_sigma(tt)) for tt in (t[0], t.new_zeros(())))
        if t[0] == 0:
            return self.mixture.denoise(x_t, a1, s1)
        return exact_endpoint(self.mixture, x_t, a, s, a1, s1, rtol=self.tol, atol=self.tol).to(x_t.dtype)


def exact_endpoint(mixture: GaussianMixture, x_start: torch.Tensor, alpha_start: float, sigma_start: float,
                   alpha_end: float, sigma_end: float, rtol: float = 1e-11, atol: float = 1e-11) -> torch.Tensor:
    """The exact probability-flow ODE map followed by the final denoise: start at x_start (level alpha_start,
    sigma_start), follow the ODE to (alpha_end, sigma_end) and return E[x0 | x] there. What every deterministic
    sampler approaches as its steps grow (with a grid ending at that level).

    The ODE is integrated by scipy's DOP853 in u = log sigma~ (sigma~ = sigma / alpha, x~ = x / alpha), where it
    reads dx~/du = x~ - D(x~); a start at zero SNR (alpha = 0) begins from its exact asymptote
    x~ = E[x0] + sigma~ x_start / sigma at sigma~ = 1e8."""
    from scipy.integrate import solve_ivp

    shape = x_start.shape
    x = x_start.reshape(shape[0], -1).to(torch.float64)
    if alpha_start == 0:
        st0 = 1e8
        mean = (mixture.weights[:, None] * mixture.means).sum(0)
        xt0 = mean[None] + st0 * x / sigma_start
    else:
        st0 = sigma_start / alpha_start
        xt0 = x / alpha_start
    st1 = sigma_end / alpha_end

    def D(u, xt):  # x~ -> E[x0 | x] at sigma~ = e^u
        st = math.exp(u)
        a = 1.0 / math.sqrt(1.0 + st * st)
        return mixture.denoise(torch.from_numpy(xt).reshape(x.shape) * a, a, st * a)

    def rhs(u, y):
        return (torch.from_numpy(y).reshape(x.shape) - D(u, y)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (math.log(st0), math.log(st1)), xt0.reshape(-1).numpy(), method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ODE solve failed: {sol.message}")
    xt_end = torch.from_numpy(sol.y[:, -1]).reshape(x.shape)
    a_end = 1.0 / math.sqrt(1.0 + st1 * st1)
    return mixture.denoise(xt_end * a_end, a_end, st1 * a_end).reshape(shape)


class MixtureClassifier(torch.nn.Module):
    """The mixture's exact noisy classifier: (x_t, t) -> log p(k | x_t) as logits, for classifier guidance tests."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64).reshape(-1))
        return self.mixture.log_posterior(x_t, alpha, sigma)


def write_clip_tokenizer(folder, merges: tuple[tuple[str, str], ...] = ()):
    """A CLIP tokenizer written offline into ``folder`` (vocab.json, merges.txt, save_pretrained's files): the
    byte alphabet of GPT-2 / CLIP's BPE with and without the end-of-word mark, the tokens the ``merges`` make, and
    CLIP's two special tokens. For tests and benchmarks that need an SD-format text tower without a download."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    merged = [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), *merged, "<|startoftext|>",
                                         "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)
    return folder
