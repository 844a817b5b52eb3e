"""Autoguidance (Karras et al. 2024): the wrapper's formula, its interval and schedule conversion on toy
denoisers; through the pipeline a class model guided by an earlier checkpoint of itself (records, PNG
regeneration), the refusals, and ``kakusan sample --guide-model``."""

import json
import shutil

import pytest
import torch

from kakusan.cli import main
from kakusan.conditioning.control import ControlCond
from kakusan.errors import CheckpointError, ConfigError
from kakusan.guidance import AutoGuidance, ClassifierFreeGuidance
from kakusan.pipeline import Pipeline, read_png_record
from kakusan.schedules import make_schedule
from kakusan.training import Trainer, TrainConfig

TINY = dict(preset="unet-tiny", batch_size=16, log_every=5, sample_every=1000, sample_steps=4, progress=False,
            warmup_steps=2, lr=1e-3)


class Gaussian(torch.nn.Module):
    """The exact denoiser of x0 ~ N(mu, s^2 I) under ``schedule``: E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 +
    sigma^2) (x_t - alpha mu); ``mu`` may depend on the class (cond) to tell conditions apart."""

    def __init__(self, schedule, mu: float = 0.3, s: float = 0.5):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append(cond)
        a, sg = (v.to(x.dtype).view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t.double().cpu()))
        mu = self.mu if cond is None else self.mu + 0.1 * cond.to(x.dtype).view(-1, 1, 1, 1)
        return mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x - a * mu)


def _x(b=3):
    return torch.randn(b, 1, 4, 4, generator=torch.Generator().manual_seed(0))


# ---- the wrapper -------------------------------------------------------------------------------------------------

def test_a_guide_equal_to_the_main_model_changes_nothing_and_w1_is_the_main_model():
    sched = make_schedule("cosine")
    main_d, other = Gaussian(sched), Gaussian(sched, mu=-0.4, s=0.9)
    x, t, y = _x(), torch.full((3,), 400.0), torch.tensor([0, 1, 2])
    want = main_d(x, t, y)
    for w in (0.0, 1.0, 2.5, 7.0):
        assert torch.equal(AutoGuidance(main_d, main_d, w)(x, t, y), want)
    assert torch.equal(AutoGuidance(main_d, other, 1.0)(x, t, y), want)
    assert AutoGuidance(main_d, other, 2.5)(x, t, None).shape == x.shape  # an unconditional pair


def test_the_formula_and_the_interval():
    sched = make_schedule("cosine")
    main_d, guide = Gaussian(sched), Gaussian(sched, mu=-0.4, s=0.9)
    x, y = _x(), torch.tensor([0, 1, 2])
    t = torch.full((3,), 600.0)
    d_main, d_guide = main_d(x, t, y), guide(x, t, y)
    got = AutoGuidance(main_d, guide, 3.0)(x, t, y)
    assert torch.allclose(got, d_guide + 3.0 * (d_main - d_guide), atol=1e-6)
    assert not torch.allclose(got, d_main)
    # the interval (on sigma / alpha, as classifier-free guidance's): outside it the main model alone
    st = float(sched.sigma_tilde_at(600.0))
    inside = AutoGuidance(main_d, guide, 3.0, interval=(st / 2, st * 2), schedule=sched)(x, t, y)
    outside = AutoGuidance(main_d, guide, 3.0, interval=(st * 2, st * 4), schedule=sched)(x, t, y)
    assert torch.allclose(inside, got) and torch.equal(outside, d_main)
    cfg = ClassifierFreeGuidance(main_d, 3.0, null_cond=0, interval=(st * 2, st * 4), schedule=sched)
    assert torch.equal(cfg(x, t, y), d_main)  # the same interval rule, shared
    with pytest.raises(ConfigError, match="needs the noise schedule"):
        AutoGuidance(main_d, guide, 3.0, interval=(0.1, 1.0))


def test_a_controlnet_condition_steers_the_main_model_only():
    sched = make_schedule("cosine")
    main_d, guide = Gaussian(sched), Gaussian(sched, mu=-0.4)
    y = torch.tensor([0, 1, 2])
    cond = ControlCond.of(y, torch.zeros(3, 1, 4, 4))
    main_d.forward = lambda x, t, c: Gaussian.forward(main_d, x, t, c.inner)  # a controlled model reads .inner
    AutoGuidance(main_d, guide, 2.0)(_x(), torch.full((3,), 300.0), cond)
    assert torch.equal(guide.seen[-1], y)


def test_a_guide_with_another_schedule_is_called_at_the_same_noise_level():
    """Exact denoisers of the same data under a VP (linear) and a rectified-flow schedule agree once the guide is
    called at the same sigma / alpha with x rescaled to its alpha: guiding then changes nothing. A guide whose
    schedule does not reach the level leaves the main model alone there."""
    vp, flow = make_schedule("linear"), make_schedule("flow")
    main_d, guide = Gaussian(vp), Gaussian(flow)
    x, y = _x(), torch.tensor([0, 1, 2])
    for tv in (10.0, 250.0, 700.0, 990.0):
        t = torch.full((3,), tv)
        want = main_d(x, t, y)
        got = AutoGuidance(main_d, guide, 4.0, schedule=vp, guide_schedule=flow)(x, t, y)
        assert torch.allclose(got, want, atol=2e-4), tv
        if tv < 900:  # (near pure noise both say "the mean" anyway)
            assert not torch.allclose(AutoGuidance(main_d, guide, 4.0)(x, t, y), want, atol=1e-2)  # unconverted
    short = make_schedule("linear", beta_end=0.005)  # a guide that never gets as noisy as the main model
    wrong = Gaussian(short, mu=-0.4)
    t = torch.full((3,), 999.0)
    assert torch.equal(AutoGuidance(main_d, wrong, 4.0, schedule=vp, guide_schedule=short)(x, t, y), main_d(x, t, y))


# ---- through the pipeline ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A class model on the digits with checkpoints at steps 4 (the guide) and 8 (the main model)."""
    out = tmp_path_factory.mktemp("ag") / "run"
    Trainer(TrainConfig(out=str(out), steps=8, checkpoint_every=4, cond="class", **TINY), digits).fit()
    return out / "checkpoints" / "step-00000008", out / "checkpoints" / "step-00000004"


CALL = dict(class_label=[1, 7], steps=4, sampler="ddim", seed=3, guidance=2.0)


def test_a_class_model_guided_by_an_earlier_checkpoint_of_itself(run, tmp_path):
    main_ckpt, guide_ckpt = run
    pipe = Pipeline.load(main_ckpt, device="cpu", precision="fp32", guide=guide_ckpt)
    auto = pipe(**CALL)
    rec = auto.records[1]
    assert rec["guidance_kind"] == "auto" and rec["guidance"] == 2.0
    assert rec["guide"]["path"] == str(guide_ckpt) and len(rec["guide"]["sha256"]) == 64
    assert rec["guide"]["sha256"] != rec["checkpoint_sha256"]
    plain = Pipeline.load(main_ckpt, device="cpu", precision="fp32")
    cfg, unguided = plain(**CALL), plain(**{**CALL, "guidance": None})
    assert "guidance_kind" not in cfg.records[0] and "guide" not in cfg.records[0]
    assert (auto.images - cfg.images).abs().max() > 1e-3 and (auto.images - unguided.images).abs().max() > 1e-3
    assert torch.equal(pipe(**{**CALL, "guidance": 1.0}).images, plain(**{**CALL, "guidance": None}).images)
    # the PNG remembers the guide: from_png attaches it again and makes the same pixels
    png = auto.save_image(tmp_path / "auto.png", 1)
    from PIL import Image

    with Image.open(png) as im:
        assert "Autoguidance scale: 2.0" in im.info["parameters"] and "CFG" not in im.info["parameters"]
    again = Pipeline.from_png(png)
    assert torch.equal(again.images, auto.images[1:2]) and again.records[0]["guide"] == rec["guide"]
    # ... and refuses to remake it without its guide, or a CFG image with a guide attached
    with pytest.raises(CheckpointError, match="guide model sha256 .* recorded, no guide model"):
        plain.regenerate(read_png_record(png))
    with pytest.raises(CheckpointError, match="no guide model .* recorded, guide model sha256"):
        pipe.regenerate(cfg.records[0])


def test_a_guide_with_another_schedule_through_the_pipeline(run, tmp_path):
    main_ckpt, guide_ckpt = run
    other = tmp_path / "linear-guide"
    shutil.copytree(guide_ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["schedule"]["name"] = "linear"
    (other / "config.json").write_text(json.dumps(cfg))
    same = Pipeline.load(main_ckpt, device="cpu", precision="fp32", guide=guide_ckpt)
    conv = Pipeline.load(main_ckpt, device="cpu", precision="fp32", guide=other)
    d_same, _, _ = same.guided_denoiser(guidance=2.0)
    d_conv, _, _ = conv.guided_denoiser(guidance=2.0)
    assert d_same.guide_schedule is None and d_conv.guide_schedule is conv._guide_denoiser.schedule
    # the pipeline's denoiser is the hand-built one over the two networks, loaded on their own
    from kakusan.checkpoints import load_denoiser
    from kakusan.diffusion import ClippedDenoiser

    main_d, _ = load_denoiser(main_ckpt, precision="fp32")
    guide_d, _ = load_denoiser(other, precision="fp32")
    assert guide_d.schedule.config.name == "linear" != main_d.schedule.config.name
    hand = AutoGuidance(ClippedDenoiser(main_d), ClippedDenoiser(guide_d), 2.0, schedule=main_d.schedule,
                        guide_schedule=guide_d.schedule)
    unconverted = AutoGuidance(ClippedDenoiser(main_d), ClippedDenoiser(guide_d), 2.0)
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    for tv in (100.0, 500.0, 900.0):
        t = torch.full((2,), tv)
        with torch.no_grad():
            got = d_conv(x, t, y)
            assert torch.equal(got, hand(x, t, y)), tv
            assert (got - unconverted(x, t, y)).abs().max() > 1e-4, tv  # the conversion is used
    # sampling through it: finite, and not the unguided model nor the guide taken at the main model's t
    out = conv(**CALL).images
    assert torch.isfinite(out).all()
    assert (out - conv(**{**CALL, "guidance": None}).images).abs().max() > 1e-3
    assert (out - same(**CALL).images).abs().max() > 1e-3


def _edited(src, tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refusals(run, tmp_path, digits):
    main_ckpt, guide_ckpt = run
    channels = _edited(guide_ckpt, tmp_path, "rgb", lambda c: c["model"].update(in_channels=3))
    classes = _edited(guide_ckpt, tmp_path, "five", lambda c: c["model"].update(num_classes=5))
    with pytest.raises(ConfigError, match=r"guide model .*rgb: draws \(3, 8, 8\) tensors, the model \(1, 8, 8\)"):
        Pipeline.load(main_ckpt, device="cpu", guide=channels)
    with pytest.raises(ConfigError, match="guide model .*five: has 5 classes, the model 10"):
        Pipeline.load(main_ckpt, device="cpu", guide=classes)
    uncond = Trainer(TrainConfig(out=str(tmp_path / "uncond"), steps=1, checkpoint_every=1, cond="none", **TINY),
                     digits).fit()
    with pytest.raises(ConfigError, match="is unconditional, the model class-conditional"):
        Pipeline.load(main_ckpt, device="cpu", guide=uncond)
    pipe = Pipeline.load(main_ckpt, device="cpu", guide=guide_ckpt)
    with pytest.raises(ConfigError, match="already attached"):
        pipe.attach_guide(guide_ckpt)
    with pytest.raises(ConfigError, match="classifier guidance do not combine"):
        pipe(class_label=1, steps=2, classifier=str(tmp_path / "clf.safetensors"))
    with pytest.raises(ConfigError, match="negative prompt / class is classifier-free guidance's"):
        pipe(class_label=1, steps=2, guidance=2.0, negative_class=3)
    with pytest.raises(ConfigError, match="rescale is classifier-free guidance's"):
        pipe(class_label=1, steps=2, guidance=2.0, guidance_rescale=0.5)
    # an unconditional pair guides too
    upipe = Pipeline.load(uncond, device="cpu", guide=uncond)
    out = upipe(n=2, steps=2, guidance=2.0)
    assert out.record["guidance_kind"] == "auto" and torch.equal(out.images, upipe(n=2, steps=2).images)


def test_cli_sample_with_a_guide_model(run, tmp_path, capsys):
    main_ckpt, guide_ckpt = run
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(main_ckpt), "--guide-model", str(guide_ckpt), "--guidance", "2",
                 "--class", "4", "-n", "2", "--steps", "3", "--out", str(grid)]) == 0
    rec = read_png_record(grid)
    assert rec["guidance_kind"] == "auto" and rec["guide"]["path"] == str(guide_ckpt)
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(grid), "--out", str(again)]) == 0
    from PIL import Image
    import numpy as np

    with Image.open(grid) as a, Image.open(again) as b:
        assert np.array_equal(np.array(a), np.array(b))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(main_ckpt), "--guide-model", str(guide_ckpt), "--class", "4", "-n",
                 "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) != 0
    assert "--guide-model needs --guidance" in capsys.readouterr().err


def test_eval_and_sweep_refuse_a_guide_model_without_guidance(tmp_path, capsys):
    """The check sample makes, before anything is loaded (the paths need not even exist)."""
    ckpt, guide = str(tmp_path / "main"), str(tmp_path / "guide")
    common = ["--checkpoint", ckpt, "--guide-model", guide, "--extractor", "inception", "--ref", "digits"]
    for argv in (["eval", *common], ["sweep", *common], ["sweep", *common, "--guidance", "none"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--guide-model needs --guidance" in err and len(err.strip().splitlines()) == 1, argv


def test_eval_samples_record_the_guide(run):
    from kakusan.metrics.evaluate import generate

    main_ckpt, guide_ckpt = run
    images, labels, source = generate(main_ckpt, 2, steps=2, guidance=2.0, guide=guide_ckpt)
    assert images.shape == (2, 1, 8, 8) and source["guidance_kind"] == "auto"
    assert source["guide"]["sha256"] == Pipeline.load(guide_ckpt, device="cpu").weights_sha256
    with pytest.raises(ConfigError, match="attach it there"):
        generate(Pipeline.load(main_ckpt, device="cpu"), 2, steps=2, guidance=2.0, guide=guide_ckpt)


def test_the_page_service_guides_with_another_served_model(run, tmp_path):
    from kakusan.serve import Limits, ModelPool, Request, Service

    main_ckpt, guide_ckpt = run
    svc = Service(ModelPool([main_ckpt, guide_ckpt]), Limits(), tmp_path)
    assert svc.pool.names == ["run", "run-2"]
    r = svc.generate(Request(model="run", guide="run-2", class_label=1, steps=2, guidance=2.0))
    assert r.records[0]["guidance_kind"] == "auto" and r.records[0]["guide"]["path"] == str(guide_ckpt)
    settings, msg = svc.restore(r.paths[0])
    assert (settings["model"], settings["guide"]) == ("run", "run-2")
    with pytest.raises(ConfigError, match="unknown model 'elsewhere'"):
        svc.generate(Request(model="run", guide="elsewhere", class_label=1, steps=2, guidance=2.0))
