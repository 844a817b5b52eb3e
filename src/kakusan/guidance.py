"""Guidance as denoiser -> denoiser wrappers: classifier-free, autoguidance, classifier (each result is still a
denoiser, usable by every sampler)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .conditioning.control import ControlCond
from .conditioning.text import broadcast_cond, cat_conds
from .diffusion import _bc, eps_from_x0, x0_from_prediction
from .errors import ConfigError


def _alpha_sigma(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) per sample, float64 on the CPU (the conversions broadcast them against x)."""
    return schedule.alpha_sigma(t.double().cpu())


def check_interval(interval, schedule=None, *, need_schedule: bool = True) -> None:
    """A guidance interval (lo, hi) on sigma / alpha, or None: two numbers, lo finite and >= 0, hi > lo (hi may be
    inf). ``need_schedule``: the wrappers read sigma / alpha through the noise schedule, so they need it."""
    if interval is None:
        return
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        raise ConfigError(f"guidance interval must be (lo, hi), got {interval!r}") from None
    for name, v in (("low", lo), ("high", hi)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"guidance_interval {name} must be a number, got {v!r}")
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or (math.isinf(hi) and hi < 0):
        raise ConfigError(f"guidance_interval must be finite (high may be inf), got {interval}")
    if not 0 <= lo < hi:
        raise ConfigError(f"guidance interval must be (lo, hi) with 0 <= lo < hi, got {interval}")
    if need_schedule and schedule is None:
        raise ConfigError("a guidance interval needs the noise schedule")


def in_interval(interval: tuple[float, float] | None, schedule, t: torch.Tensor) -> bool:
    """Whether a guidance interval (Kynkaanniemi et al. 2024) holds the batch's noise level: lo < sigma_t / alpha_t
    <= hi, read at the first sample (samplers step a batch at one level); True without an interval."""
    if interval is None:
        return True
    sigma_tilde = float(schedule.sigma_tilde_at(t[:1].double().cpu())[0])
    return interval[0] < sigma_tilde <= interval[1]


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), in x0 space, one batched forward pass:
        D~(x, t, c) = D(x, t, n) + w (D(x, t, c) - D(x, t, n)),
    with n the null condition, or a ``negative`` one (a negative class / prompt) in its place. Conditions are
    class labels (the null label an int) or encoded prompts (``TextCond``; the null one the empty prompt). For a fixed
    (alpha_t, sigma_t) this equals guiding eps (or v), since each is affine in x0_hat. w = 1 is the conditional
    model, w = 0 the unconditional one.

    Options (both need ``schedule``, the denoiser's noise schedule):
    - ``rescale`` = phi in [0, 1] (Lin et al. 2024, eq. 15-16, diffusers' ``guidance_rescale``): the guided
      eps is scaled to the per-sample standard deviation of the conditional eps, mixed with weight phi;
    - ``interval`` = (lo, hi): guide only where lo < sigma_t / alpha_t <= hi (Kynkaanniemi et al. 2024); outside
      it the conditional model alone is used."""

    def __init__(self, denoiser: nn.Module, scale: float, null_cond: torch.Tensor | int,
                 negative: torch.Tensor | int | None = None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None, schedule=None):
        super().__init__()
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"guidance rescale must lie in [0, 1], got {rescale}")
        check_interval(interval, schedule)
        if rescale > 0 and schedule is None:
            raise ConfigError("guidance rescale needs the noise schedule")
        self.denoiser, self.scale, self.null_cond = denoiser, float(scale), null_cond
        self.negative, self.rescale, self.interval, self.schedule = negative, float(rescale), interval, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ConfigError("classifier-free guidance needs a condition (e.g. class labels)")
        if self.scale == 1.0 and self.rescale == 0.0:
            return self.denoiser(x_t, t, cond)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        if not in_interval(self.interval, self.schedule, t):
            return self.denoiser(x_t, t, cond)
        other = self.null_cond if self.negative is None else self.negative
        other = broadcast_cond(other, cond)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conds(cond, other))
        x0_cond, x0_other = both.chunk(2)
        guided = x0_other + self.scale * (x0_cond - x0_other)
        if self.rescale > 0:
            alpha, sigma = _alpha_sigma(self.schedule, t)
            if (alpha > 0).all():
                dims = tuple(range(1, x_t.ndim))
                eps_cond, eps_cfg = eps_from_x0(x0_cond, x_t, alpha, sigma), eps_from_x0(guided, x_t, alpha, sigma)
                factor = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True).clamp_min(1e-12)
                eps = eps_cfg * (self.rescale * factor + (1 - self.rescale))
                guided = x0_from_prediction("eps", eps, x_t, alpha, sigma)
        return guided


class AutoGuidance(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", eq. 1 with the
    guide in place of the unconditional model), in x0 space, one forward pass of each network:
        D~(x, t, c) = D_guide(x, t, c) + w (D_main(x, t, c) - D_guide(x, t, c)),
    both networks given the same condition c (class labels, an encoded prompt, or None for an unconditional pair).
    The guide is a weaker model of the same data and conditioning (a smaller one, or an earlier checkpoint). w = 1
    is the main model alone. Under a ControlNet condition (``ControlCond``) the control steers the main model only:
    the guide gets the inner condition.

    ``interval`` = (lo, hi): guide only where lo < sigma_t / alpha_t <= hi, as :class:`ClassifierFreeGuidance`
    (outside it the main model alone); it needs ``schedule``, the main model's noise schedule.

    ``guide_schedule``: the guide's own schedule when it is not the main one's (None: the same, and the guide is
    called with the main model's (x_t, t)). It is then called at the same noise level sigma~ = sigma_t / alpha_t,
    at its own t (``t_at_sigma_tilde``) and on x_t rescaled to its own signal scale (x * alpha_guide / alpha_main;
    sigma_guide / sigma_main at alpha = 0). Where the guide's schedule does not reach the main one's noise level
    (beyond either end of its table), those samples get the main model alone."""

    def __init__(self, main: nn.Module, guide: nn.Module, scale: float, interval: tuple[float, float] | None = None,
                 schedule=None, guide_schedule=None):
        super().__init__()
        check_interval(interval, schedule)
        if guide_schedule is not None and schedule is None:
            raise ConfigError("a guide with its own noise schedule needs the main model's schedule too")
        self.main, self.guide, self.scale = main, guide, float(scale)
        self.interval, self.schedule, self.guide_schedule = interval, schedule, guide_schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        if self.scale == 1.0 or not in_interval(self.interval, self.schedule, t):
            return self.main(x_t, t, cond)
        x_g, t_g, reached = self._guide_input(x_t, t)
        if reached is not None and not reached.any():
            return self.main(x_t, t, cond)
        x0_main = self.main(x_t, t, cond)  # (B, C, H, W)
        x0_guide = self.guide(x_g, t_g, cond.inner if isinstance(cond, ControlCond) else cond)
        guided = x0_guide + self.scale * (x0_main - x0_guide)
        return guided if reached is None else torch.where(_bc(reached, guided).bool(), guided, x0_main)

    def _guide_input(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x, t) for the guide at the main model's noise level, and the (B,) samples whose level the guide's
        schedule reaches (None: the schedules are the same, all of them)."""
        if self.guide_schedule is None:
            return x_t, t, None
        t64 = t.double().cpu()
        st = self.schedule.sigma_tilde_at(t64)  # sigma~ = sigma / alpha, the level both models share
        t_g = self.guide_schedule.t_at_sigma_tilde(st)  # (clamped to the guide's table)
        st_g = self.guide_schedule.sigma_tilde_at(t_g)
        reached = torch.isclose(st_g, st, rtol=1e-6, atol=0.0) | (st.isinf() & st_g.isinf())
        a_m, s_m = self.schedule.alpha_sigma(t64)
        a_g, s_g = self.guide_schedule.alpha_sigma(t_g)
        ratio = torch.where(a_m > 0, a_g / a_m.clamp_min(1e-300), s_g / s_m.clamp_min(1e-300))
        # t_g stays float64 (as the ratio): a denoiser reads t in float64 anyway
        return x_t * _bc(ratio, x_t), t_g.to(x_t.device), reached.to(x_t.device)


class ClassifierGuidance(nn.Module):
    """Classifier guidance (Dhariwal & Nichol 2021) in x0 space, for any differentiable ``classifier(x_t, t) ->
    logits`` that knows the noise level (a noisy classifier, or a CLIP-style score of x_t):
        D~(x, t, y) = D(x, t) + s * sigma_t^2 / alpha_t * grad_x log p(y | x, t).
    With s = 1 and the exact classifier this is exactly E[x0 | x_t, y] (Tweedie's formula applied to
    log p(x_t | y) = log p(x_t) + log p(y | x_t)). ``pass_cond`` also hands y to the denoiser (a class-conditional
    model); otherwise the denoiser is called unconditionally. Where alpha_t = 0 (zero terminal SNR) there is
    no signal to guide and D is returned unchanged.

    ``normalize=False`` takes the picked output itself as the log-score instead of its log-softmax: the hook for
    CLIP-style guidance, where the "classifier" is a similarity to one prompt (``CLIPScore``)."""

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, scale: float, schedule, pass_cond: bool = False,
                 normalize: bool = True):
        super().__init__()
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.schedule, self.pass_cond, self.normalize = schedule, pass_cond, normalize

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ConfigError("classifier guidance needs the target class of every sample")
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        if isinstance(cond, ControlCond):  # a ControlNet-steered model: the labels are the inner condition
            x0 = self.denoiser(x_t, t, cond if self.pass_cond else cond.with_inner(None))
            cond = cond.inner
        else:
            x0 = self.denoiser(x_t, t, cond if self.pass_cond else None)
        alpha, sigma = _alpha_sigma(self.schedule, t)
        if self.scale == 0 or not (alpha > 0).all():
            return x0
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logits = self.classifier(x, t)
            logp = torch.log_softmax(logits, dim=-1) if self.normalize else logits
            picked = logp.gather(1, cond.view(-1, 1).long()).sum()
            (grad,) = torch.autograd.grad(picked, x)
        return x0 + self.scale * _bc(sigma**2 / alpha, x0) * grad.to(x0.dtype)


class CLIPScore(nn.Module):
    """CLIP similarity as a guidance score: ``score(x, t) -> (B, P)`` = logit_scale * cos(image embedding of x,
    text embedding of prompt p), for a Hugging Face ``CLIPModel`` saved in a local folder. Images in [-1, 1] are
    resized (bilinear, differentiable) to CLIP's input size and normalised with its mean / std. Use it with
    ``ClassifierGuidance(..., normalize=False)`` and ``cond`` = the index of each sample's prompt. Plain CLIP has
    never seen noise, so this guides well only where x_t is nearly clean (late steps, or with a guidance interval
    in the sampler's hands); t is accepted and ignored."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's

    def __init__(self, folder: str, prompts: list[str], device: str | torch.device = "cpu"):
        super().__init__()
        from pathlib import Path

        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError:
            raise ConfigError("CLIP guidance needs the transformers package: pip install 'kakusan[text]'") from None
        if not Path(folder).is_dir():
            raise ConfigError(f"CLIP model folder not found: {folder}")
        try:
            self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder}: cannot load a CLIP model ({e})") from None
        self.size = self.model.config.vision_config.image_size
        batch = tokenizer(list(prompts), padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            text = self.model.get_text_features(**batch)
        text = getattr(text, "pooler_output", text)
        self.register_buffer("text", torch.nn.functional.normalize(text.float(), dim=-1))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)
        image = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image).float(), dim=-1)
        return self.model.logit_scale.exp() * image @ self.text.T
