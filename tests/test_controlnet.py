"""ControlNet on kakusan's U-Net: the zero-initialised identity, the residual sum of several ControlNets, the
CFG branches, control maps, training (resume exact, the hint following flips), the pipeline (records, PNG
regeneration), and the refusals (another base, wrong shapes, no ControlNet)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kakusan.cli import main
from kakusan.conditioning.control import ControlCond
from kakusan.conditioning.text import TextCond, broadcast_cond, cat_conds
from kakusan.errors import CheckpointError, ConfigError
from kakusan.models.controlnet import ControlledUNet, ControlNet
from kakusan.models.unet import UNet, UNetConfig
from kakusan.pipeline import Pipeline
from kakusan.training import Trainer, TrainConfig

pytest.importorskip("cv2")
from kakusan.control import control_maps, edge_f1  # noqa: E402

TINY = dict(preset="unet-tiny", batch_size=16, log_every=5, sample_every=1000, checkpoint_every=1000,
            sample_steps=4, progress=False, warmup_steps=2, lr=1e-3, cond="class")


def _randomised(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _unet(**kw) -> UNet:
    cfg = UNetConfig(image_size=16, in_channels=1, out_channels=1, channels=16, channel_mults=(1, 2),
                     num_res_blocks=1, attention_resolutions=(8,), norm_groups=8, dropout=0.0, **kw)
    return _randomised(UNet(cfg), 0).eval()


def _inputs(b: int = 4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 1, 16, 16, generator=g), torch.rand(b, generator=g) * 999,
            (torch.rand(b, 1, 16, 16, generator=g) > 0.7).float())


@pytest.mark.parametrize("kind", ["class", "text"])
def test_zero_initialised_controlnet_leaves_the_base_bitwise_unchanged(kind):
    """At initialisation (its copy = the base's weights, zero convs at zero) the controlled output equals the
    base's bit for bit, and the loss still has a gradient on the zero convolutions (so training can start)."""
    base = _unet(num_classes=3) if kind == "class" else _unet(context_dim=8)
    x, t, hint = _inputs()
    cond = (torch.tensor([0, 1, 2, 3]) if kind == "class" else
            TextCond(torch.randn(4, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 4).bool()))
    net = ControlNet.from_base(base)
    base.requires_grad_(False)  # frozen, as in training
    controlled = ControlledUNet(base, [net])
    with torch.no_grad():
        plain = base(x, t, cond)
        steered = controlled(x, t, ControlCond.of(cond, hint))
    assert torch.equal(plain, steered)
    assert not torch.equal(plain, torch.zeros_like(plain))  # a real base output
    # the copy starts as the base's encoder
    own = net.copy.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.state_dict().items() if k in own)
    controlled(x, t, ControlCond.of(cond, hint)).square().mean().backward()
    assert net.mid_zero.weight.grad.abs().sum() > 0 and net.zero_convs[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_several_controlnets_sum_their_scaled_residuals_and_keep_masks_samples():
    base = _unet(num_classes=3)
    a = _randomised(ControlNet.from_base(base), 2)
    b = _randomised(ControlNet.from_base(base), 3)
    x, t, hint = _inputs()
    hint2 = hint.flip(-1)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        ra, ma = a(x, t, y, hint)
        rb, mb = b(x, t, y, hint2)
        want = base(x, t, y, control=([0.7 * u + 0.2 * v for u, v in zip(ra, rb)], 0.7 * ma + 0.2 * mb))
        got = ControlledUNet(base, [a, b])(x, t, ControlCond.of(y, [hint, hint2], [0.7, 0.2]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - base(x, t, y)).abs().max() > 1e-3  # the control does something
        # keep = 0 for the last two samples: those are the base's own outputs
        cc = ControlCond(y, (hint, hint2), (0.7, 0.2), torch.tensor([1.0, 1.0, 0.0, 0.0]))
        part = ControlledUNet(base, [a, b])(x, t, cc)
        torch.testing.assert_close(part[2:], base(x[2:], t[2:], y[2:]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part[:2], want[:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="2 ControlNet"):
        ControlledUNet(base, [a, b])(x, t, ControlCond.of(y, hint))
    with pytest.raises(ConfigError, match="control image batch"):
        ControlledUNet(base, [a])(x, t, ControlCond.of(y, hint[:, :, :8, :8]))


def test_guidance_branches_keep_or_drop_the_control():
    """Classifier-free guidance's other branch keeps the hints (diffusers' default) or, cond_only, is left
    uncontrolled (keep = 0); batching two control conditions concatenates everything."""
    hint = torch.rand(3, 1, 4, 4)
    cond = ControlCond.of(torch.tensor([1, 2, 0]), hint)
    null = broadcast_cond(10, cond)
    assert torch.equal(null.inner, torch.full((3,), 10)) and torch.equal(null.keep, torch.ones(3))
    assert null.hints[0] is hint
    both = cat_conds(cond, null)
    assert len(both) == 6 and torch.equal(both.hints[0], torch.cat([hint, hint]))
    only = broadcast_cond(10, ControlCond.of(torch.tensor([1, 2, 0]), hint, cond_only=True))
    assert torch.equal(only.keep, torch.zeros(3))
    assert torch.equal(cond[1:].inner, torch.tensor([2, 0])) and cond[1:].hints[0].shape == (2, 1, 4, 4)


def test_control_maps_and_edge_f1():
    img = torch.full((2, 1, 16, 16), 0, dtype=torch.uint8)
    img[:, :, 4:12, 4:12] = 255  # a white square: its Canny edges lie on its border
    edges = control_maps(img, "canny")
    assert edges.shape == (2, 1, 16, 16) and set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[0, 0, 8, 8] == 0 and edges[0, 0, 0, 0] == 0
    assert edges[0, 0, 3:5, 4:12].amax(0).all()  # the top border, on one of the two rows either side
    assert edge_f1(edges, img).tolist() == [1.0, 1.0]
    shifted = img.roll(3, dims=-1)
    assert (edge_f1(edges, shifted) < 0.8).all()  # 3 px away: beyond the 1 px tolerance on the vertical sides
    assert (edge_f1(edges, img.roll(1, dims=-1)) == 1.0).all()  # 1 px: within it
    sobel = control_maps(torch.rand(2, 3, 16, 16) * 2 - 1, "sobel")
    assert sobel.min() >= 0 and torch.isclose(sobel.amax(dim=(1, 2, 3)), torch.ones(2)).all()
    s1, s2 = control_maps(img, "scribble", seed=4), control_maps(img, "scribble", seed=4)
    assert torch.equal(s1, s2) and s1.sum() > edges.sum()  # seeded, and thickened
    with pytest.raises(ConfigError, match="unknown control type"):
        control_maps(img, "depth")


# ----------------------------------------------------------------------------------------------------------------
# Training and the pipeline on the 8x8 digits


@pytest.fixture(scope="module")
def base(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("cn") / "base"
    Trainer(TrainConfig(out=str(out), steps=20, **TINY), digits).fit()
    return out


def _cn_cfg(tmp_path, base, name, **kw):
    return TrainConfig(out=str(tmp_path / name), init_from=str(base), controlnet=True,
                       **{**TINY, "steps": 8, **kw})


def test_controlnet_training_resumes_exactly_and_holds_the_controlnet_alone(tmp_path, base, digits):
    full = Trainer(_cn_cfg(tmp_path, base, "full", hflip=True), digits).fit()
    Trainer(_cn_cfg(tmp_path, base, "split", steps=4, hflip=True), digits).fit()
    tr = Trainer(_cn_cfg(tmp_path, base, "split", hflip=True), digits)
    tr.resume()
    assert tr.step == 4
    tr.fit()
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / f), load_file(tmp_path / "split" / "checkpoints" / "step-00000008" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    weights = load_file(full / "ema.safetensors")
    assert any(k.startswith("zero_convs.") for k in weights) and not any(k.startswith("up.") for k in weights)
    assert any(weights[k].abs().sum() > 0 for k in weights if k.startswith("zero_convs."))  # it trained
    config = json.loads((full / "config.json").read_text())
    assert config["controlnet"]["control"] == "canny" and len(config["controlnet"]["base"]["sha256"]) == 64
    with pytest.raises(CheckpointError, match="ControlNet"):
        Trainer(_cn_cfg(tmp_path, base, "full", control="sobel"), digits).resume()


def test_the_hint_is_flipped_with_its_image(tmp_path, base, digits):
    from kakusan.training.trainer import batch_indices

    tr = Trainer(_cn_cfg(tmp_path, base, "flip", hflip=True), digits)
    x0, cond, _ = tr.get_batch(0)
    idx = batch_indices(len(digits), 16, 0, 0)
    orig, maps = tr.images[idx], tr.hints[idx].float() / 255
    flipped = [not torch.equal(x0[i], orig[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i, f in enumerate(flipped):
        assert torch.equal(x0[i], orig[i].flip(-1) if f else orig[i])
        assert torch.equal(cond.hints[0][i], maps[i].flip(-1) if f else maps[i])  # the hint goes with its image
    assert torch.equal(tr.hints[:16].float() / 255, control_maps(digits.images[:16], "canny"))


def test_pipeline_control_record_regeneration_and_refusals(tmp_path, base, digits, capsys):
    run = tmp_path / "cn"
    Trainer(_cn_cfg(tmp_path, base, "cn", steps=6), digits).fit()
    pic = tmp_path / "digit.png"
    Image.fromarray(digits.images[7, 0].numpy()).save(pic)
    pipe = Pipeline.load(run, device="cpu")  # a ControlNet run brings its base
    plain = Pipeline.load(base, device="cpu")
    assert pipe.weights_sha256 == plain.weights_sha256 and len(pipe.controlnets) == 1
    kw = dict(class_label=3, n=3, steps=6, guidance=2.0, seed=5)
    steered = pipe(**kw, control=str(pic), control_type="canny")
    assert not torch.equal(steered.images, plain(**kw).images)
    assert torch.equal(pipe(**kw).images, plain(**kw).images)  # without a control image: the base itself
    # the same map given directly: a float tensor in [0, 1], a uint8 tensor, a PIL image of it
    u8 = torch.from_numpy(np.asarray(Image.open(pic)).copy())[None, None]
    m = control_maps(u8, "canny")
    for given in (m, (m * 255).to(torch.uint8), Image.fromarray((m[0, 0].numpy() * 255).astype(np.uint8))):
        assert torch.equal(pipe(**kw, control=given).images, steered.images)
    rec = steered.records[0]["control"][0]
    assert rec["type"] == "canny" and rec["image"]["path"] == str(pic) and rec["scale"] == 1.0
    # every sampler and the other starts take the control (the same control, a different image than without)
    from kakusan.samplers import SAMPLERS

    for name in SAMPLERS:
        a_ = pipe(class_label=3, n=2, sampler=name, steps=3, seed=1, control=str(pic), control_type="canny")
        b_ = pipe(class_label=3, n=2, sampler=name, steps=3, seed=1)
        assert torch.isfinite(a_.images).all() and not torch.equal(a_.images, b_.images), name
    for start in ({"init_image": str(pic), "strength": 0.7}, {"init_image": str(pic), "mask": "lower-half"}):
        a_ = pipe(**kw, **start, control=str(pic), control_type="canny")
        assert not torch.equal(a_.images, pipe(**kw, **start).images)
        assert a_.records[0]["control"][0]["type"] == "canny" and "init_image" in a_.records[0]
    zero = pipe(**kw, control=str(pic), control_type="canny", control_scale=0.0)
    assert torch.equal(zero.images, plain(**kw).images)
    only = pipe(**kw, control=str(pic), control_type="canny", control_cond_only=True)
    assert not torch.equal(only.images, steered.images)
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(run), "--control", str(pic), "--control-type", "canny", "--class",
                 "3", "-n", "2", "--steps", "6", "--guidance", "2", "--out", str(out)]) == 0
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    # refusals, each one line naming the problem
    other = tmp_path / "other"
    Trainer(TrainConfig(out=str(other), steps=3, **{**TINY, "seed": 9}), digits).fit()
    with pytest.raises(CheckpointError, match="trained on the base"):
        Pipeline.load(other, device="cpu", controlnet=[run])
    assert main(["sample", "--checkpoint", str(other), "--controlnet", str(run), "--control", str(pic)]) == 2
    assert "trained on the base" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no ControlNet is attached"):
        plain(**kw, control=str(pic))
    with pytest.raises(ConfigError, match="control image"):
        pipe(**kw, control=torch.zeros(1, 1, 5, 5))
    with pytest.raises(ConfigError, match="need a control image"):
        pipe(**kw, control_cond_only=True)
    with pytest.raises(ConfigError, match="init-from"):
        TrainConfig(controlnet=True)
    assert main(["train", "--data", "digits", "--control", "sobel", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "needs --controlnet" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="control must be"):
        TrainConfig(controlnet=True, init_from=str(base), control="edges")
    with pytest.raises(CheckpointError, match="a ControlNet, not a model"):
        from kakusan.checkpoints import load_denoiser

        load_denoiser(run)


def test_paired_control_folder_must_match_the_data(tmp_path, base, digits):
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{i:03d}.png")
    with pytest.raises(ConfigError, match="5 readable control images .* for 200 training images"):
        Trainer(_cn_cfg(tmp_path, base, "paired", control=f"folder:{folder}"), digits)


def test_classifier_guidance_reads_the_labels_inside_a_control_condition():
    """Classifier guidance on a ControlNet-steered model: the labels are the control condition's inner ones, and
    the denoiser still gets the control (with the labels for a class model, without for an unconditional one)."""
    from kakusan.guidance import ClassifierGuidance
    from kakusan.schedules import ScheduleConfig, make_schedule

    seen = []

    def denoiser(x, t, cond):
        seen.append(cond)
        return torch.zeros_like(x)

    class Classifier(torch.nn.Module):  # (x_t, t) -> logits
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 3)

        def forward(self, x, t):
            return self.linear(x.flatten(1))

    clf = Classifier()
    schedule = make_schedule(ScheduleConfig("linear", 1000))
    x, t = torch.randn(2, 1, 4, 4), torch.full((2,), 500.0)
    y = torch.tensor([0, 2])
    cc = ControlCond.of(y, torch.rand(2, 1, 4, 4))
    for pass_cond in (False, True):
        seen.clear()
        got = ClassifierGuidance(denoiser, clf, 1.0, schedule, pass_cond=pass_cond)(x, t, cc)
        want = ClassifierGuidance(denoiser, clf, 1.0, schedule, pass_cond=pass_cond)(x, t, y)
        torch.testing.assert_close(got, want)
        assert isinstance(seen[0], ControlCond) and seen[0].hints[0] is cc.hints[0]
        assert (seen[0].inner is y) if pass_cond else seen[0].inner is None
