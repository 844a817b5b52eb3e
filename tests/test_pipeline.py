"""The pipeline: checkpoint -> images, its starts (noise, img2img, inpainting, inversion), its records."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kakusan.cli import main
from kakusan.errors import ConfigError, DataError, KakusanError
from kakusan.metrics.stats import psnr
from kakusan.pipeline import Pipeline, read_png_record

REF = Path(__file__).parent / "data" / "reference"
TINY = REF / "tiny-class.safetensors"  # unet-tiny on the bundled digits, 40 steps, class-conditional


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(TINY, device="cpu")


# ---- the same images as before the pipeline --------------------------------------------------------------

# grids made by `kakusan sample` before sampling went through the pipeline (the PNGs in tests/data/reference)
BEFORE = {
    "default-w2-s3-n20": ["-n", "20", "--guidance", "2", "--seed", "3"],
    "ddpm50-w1.5-neg3-s1-n10": ["-n", "10", "--sampler", "ddpm", "--steps", "50", "--guidance", "1.5",
                                "--negative-class", "3", "--seed", "1"],
    "ddim10-eta0.5-c7-w3-r0.5-s5-n12": ["-n", "12", "--sampler", "ddim", "--steps", "10", "--eta", "0.5", "--class",
                                        "7", "--guidance", "3", "--guidance-rescale", "0.5", "--seed", "5"],
    "heun6-s2-n8": ["-n", "8", "--sampler", "heun", "--steps", "6", "--seed", "2"],
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_sample_makes_bitwise_the_images_it_made_before_the_pipeline(name, tmp_path):
    """The references were sampled in fp32 on a CPU (then the default): fp32 makes them again bit for bit."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(TINY), *BEFORE[name], "--precision", "fp32", "--out", str(out)]) == 0
    new, old = _pixels(out), _pixels(REF / f"{name}.png")
    assert new.shape == old.shape and int((new != old).sum()) == 0


@pytest.mark.parametrize("name", ["default-w2-s3-n20", "heun6-s2-n8"])
def test_bf16_sampling_stays_close_to_the_fp32_images(name, tmp_path):
    """The network in bf16 autocast (the default on CPUs with native bf16), the sampler in fp32: the same
    pictures as fp32 (measured: 0.003-0.005 grey levels on average, at most 1), and the record says which precision ran."""
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(TINY), *BEFORE[name], "--precision", "bf16", "--out", str(out)]) == 0
    new, old = _pixels(out).astype(np.float64), _pixels(REF / f"{name}.png").astype(np.float64)
    diff = np.abs(new - old)
    assert 0 < diff.mean() < 0.25 and diff.max() <= 16
    assert read_png_record(out)["precision"] == "bf16"


# ---- records and --from-png ----------------------------------------------------------------------------------

def test_every_png_carries_its_record_and_from_png_makes_it_again(tmp_path, capsys):
    each = tmp_path / "each"
    assert main(["sample", "--checkpoint", str(TINY), "-n", "6", "--class", "4", "--guidance", "2",
                 "--sampler", "dpmpp-2m-sde", "--steps", "8", "--seed", "11", "--batch-size", "4",
                 "--out", str(tmp_path / "grid.png"), "--out-dir", str(each)]) == 0
    files = sorted(each.glob("*.png"))
    assert len(files) == 6
    rec = read_png_record(files[5])
    assert rec["index"] == 5 and rec["cond"] == 4 and rec["seed"] == 11 and rec["sampler"] == "dpmpp-2m-sde"
    assert rec["batch_size"] == 4 and rec["guidance"] == 2.0 and len(rec["checkpoint_sha256"]) == 64
    with Image.open(files[5]) as im:
        assert "Sampler: dpmpp-2m-sde" in im.info["parameters"]
    # one image of the second batch (stochastic sampler), alone; and the whole grid
    again = tmp_path / "again.png"
    assert main(["sample", "--from-png", str(files[5]), "--out", str(again), "--device", "cpu"]) == 0
    assert np.array_equal(_pixels(again), _pixels(files[5]))
    assert main(["sample", "--from-png", str(tmp_path / "grid.png"), "--out", str(tmp_path / "g2.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "g2.png"), _pixels(tmp_path / "grid.png"))
    # Python: the same
    gen = Pipeline.from_png(files[2])
    assert torch.equal(gen.uint8()[0].permute(1, 2, 0).squeeze(-1), torch.from_numpy(_pixels(files[2])))

    # another checkpoint is refused, naming what differs; a PNG without a record too
    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(TINY), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(TINY))
    tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(other), metadata=meta)
    capsys.readouterr()
    assert main(["sample", "--from-png", str(files[0]), "--checkpoint", str(other), "--out", str(again)]) == 2
    assert re.search(r"not made with this checkpoint: weights sha256 \w+ recorded", capsys.readouterr().err)
    Image.new("L", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(DataError, match="no kakusan generation record"):
        read_png_record(tmp_path / "plain.png")


def test_sample_summary_and_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--checkpoint", str(TINY), "-n", "3", "--class", "2", "--steps", "2",
                 "--out-dir", "each"]) == 0
    out = capsys.readouterr().out
    assert "(class 2)" in out and "3 samples" in out and not (tmp_path / "samples.png").exists()
    with pytest.warns(UserWarning, match="below the model's 10 classes: only classes 0..3"):
        assert main(["sample", "--checkpoint", str(TINY), "-n", "4", "--steps", "2"]) == 0
    assert "(classes 0, 1, 2, 3)" in capsys.readouterr().out and (tmp_path / "samples.png").is_file()
    # dry run: the values that would be used
    assert main(["sample", "--checkpoint", str(TINY), "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sampler"] == "unipc-2" and shown["steps"] == 20 and shown["spacing"] == "karras"


# ---- img2img -------------------------------------------------------------------------------------------------

def _digits(n=4, label=None):
    from kakusan.data import load_dataset

    ds = load_dataset("digits")
    idx = torch.arange(len(ds.labels))
    if label is not None:
        idx = idx[ds.labels == label]
    return ds.images[idx[:n]]


def test_img2img_strength_zero_returns_the_input_and_one_is_plain_generation(pipe):
    x = _digits(4)
    same = pipe(init_image=x, strength=0.0, class_label=[1, 2, 3, 4], steps=10, seed=0)
    assert torch.equal(same.uint8(), x)
    plain = pipe(class_label=[1, 2, 3, 4], steps=10, seed=7, sampler="ddim")
    full = pipe(init_image=x, strength=1.0, class_label=[1, 2, 3, 4], steps=10, seed=7, sampler="ddim")
    assert torch.equal(plain.images, full.images)
    # in between: closer to the input the lower the strength, and never the input itself
    dist = [(pipe(init_image=x, strength=s, class_label=[1, 2, 3, 4], steps=10, seed=7, sampler="ddim").images
             - (x.float() / 127.5 - 1)).abs().mean().item() for s in (0.3, 0.6, 1.0)]
    assert 0 < dist[0] < dist[1] < dist[2]
    rec = pipe(init_image=x, strength=0.3, class_label=[1, 2, 3, 4], steps=10).records[0]
    assert rec["strength"] == 0.3 and "tensor_sha256" in rec["init_image"]


def test_img2img_from_a_file_through_the_cli_and_back_from_its_png(tmp_path):
    src = tmp_path / "digit.png"
    Image.fromarray(_digits(1)[0, 0].numpy()).resize((32, 32)).save(src)  # another size: resized to 8x8
    out = tmp_path / "each"
    assert main(["sample", "--checkpoint", str(TINY), "--init-image", str(src), "--strength", "0.5", "--class", "3",
                 "-n", "2", "--steps", "10", "--out-dir", str(out)]) == 0
    first = sorted(out.glob("*.png"))[1]
    rec = read_png_record(first)
    assert rec["init_image"]["path"] == str(src) and rec["strength"] == 0.5
    assert main(["sample", "--from-png", str(first), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(first))
    src.write_bytes(b"not a png")
    assert main(["sample", "--from-png", str(first), "--out", str(tmp_path / "again.png")]) == 2
    assert main(["sample", "--checkpoint", str(TINY), "--init-image", str(src), "--out", str(tmp_path / "x.png")]) == 2


# ---- inpainting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,resample", [("ddpm", 1), ("unipc-2", 1), ("ddim", 3)])
def test_inpainting_keeps_the_known_pixels_exactly(pipe, sampler, resample):
    x = _digits(3)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 4:] = 1  # repaint the lower half
    gen = pipe(init_image=x, mask=mask, class_label=[0, 5, 9], sampler=sampler, steps=10, resample_steps=resample,
               seed=1)
    u8 = gen.uint8()
    assert torch.equal(u8[:, :, :4], x[:, :, :4])  # the upper half unchanged, bit for bit
    assert (u8[:, :, 4:] != x[:, :, 4:]).any()
    nothing = pipe(init_image=x, mask=torch.zeros(3, 1, 8, 8), class_label=[0, 5, 9], steps=5)
    assert torch.equal(nothing.uint8(), x)


def test_inpainting_re_imposes_the_known_region_at_every_level(pipe):
    """Each state the sampler hands on is, outside the mask, the known image noised to that level."""
    x = _digits(2)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :3] = 1
    seen = []
    pipe(init_image=x, mask=mask, class_label=[1, 1], sampler="ddim", steps=6,
         callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(6))
    # RePaint's jump back is the forward process from level s to t: its variance is exact for a constant image
    from kakusan.samplers import sampling_levels

    lv = sampling_levels(pipe.schedule, "ddim", 6)
    a_t, s_t, a_s, s_s = (lv.alpha[2].item(), lv.sigma[2].item(), lv.alpha[3].item(), lv.sigma[3].item())
    r = a_t / a_s
    var = s_t**2 - (r * s_s) ** 2
    assert r**2 * s_s**2 + var == pytest.approx(s_t**2, rel=1e-12)  # composed with q(x_s|x0): q(x_t|x0)


# ---- inversion -----------------------------------------------------------------------------------------------

def test_ddim_inversion_regenerates_the_image(pipe, tmp_path, capsys):
    x = _digits(4, label=3)
    inv = pipe.invert(x, class_label=3, steps=50)
    back = pipe(noise=inv.noise, **inv.regenerate)
    p2 = psnr(back.uint8(), x).mean().item()
    plain = pipe.invert(x, class_label=3, steps=50, iterations=0)
    p0 = psnr(pipe(noise=plain.noise, **plain.regenerate).uint8(), x).mean().item()
    assert p2 > 30 and p2 > p0  # the fixed-point refinement is what makes it exact
    # an edit: the same noise with another class changes the image (a little: this tiny model knows few classes)
    other = pipe(noise=inv.noise, **{**inv.regenerate, "class_label": 8})
    assert (other.images - back.images).abs().max() > 1e-3
    # the CLI: invert -> noise file -> sample --noise
    src = tmp_path / "three.png"
    Image.fromarray(x[0, 0].numpy()).save(src)
    noise = tmp_path / "noise.safetensors"
    assert main(["invert", "--checkpoint", str(TINY), "--image", str(src), "--class", "3", "--out", str(noise),
                 "--check"]) == 0
    shown = float(re.search(r"PSNR ([\d.]+) dB", capsys.readouterr().out).group(1))
    assert shown > 30
    assert main(["sample", "--checkpoint", str(TINY), "--noise", str(noise), "--class", "3",
                 "--out", str(tmp_path / "re.png"), "--out-dir", str(tmp_path / "re")]) == 0
    re_img = _pixels(next((tmp_path / "re").glob("*.png")))
    assert psnr(torch.from_numpy(re_img)[None, None], x[:1]).item() == pytest.approx(shown, abs=1e-3)
    with pytest.raises(ConfigError, match="needs the images' class"):
        pipe.invert(x)


# ---- numeric options -----------------------------------------------------------------------------------------

OPTIONS = {
    "guidance": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    "steps": st.one_of(st.none(), st.integers(-3, 30)),
    "n": st.one_of(st.none(), st.integers(-2, 5)),
    "eta": st.one_of(st.none(), st.floats(-1, 2, width=32), st.just(float("nan"))),
    "guidance_rescale": st.one_of(st.just(0.0), st.floats(-1, 2, width=32), st.just(float("nan"))),
    "seed": st.integers(-2, 2**31),
    "batch_size": st.one_of(st.none(), st.integers(-1, 4)),
    "strength": st.one_of(st.none(), st.floats(-0.5, 1.5, width=32), st.just(float("inf"))),
}
NAMES = {"guidance": "guidance", "steps": "steps", "n": "n", "eta": "eta", "guidance_rescale": "guidance.rescale",
         "seed": "seed", "batch_size": "batch_size", "strength": "strength"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries(OPTIONS))
def test_every_numeric_option_is_checked(pipe, options):
    opts = {k: v for k, v in options.items() if v is not None}
    sampler = "ddim" if "eta" in opts else "unipc-2"
    init = _digits(1) if "strength" in opts else None
    try:
        gen = pipe(class_label=1, sampler=sampler, init_image=init, **{k: v for k, v in opts.items()})
    except ConfigError as e:
        bad = [k for k in opts if re.search(NAMES[k].replace("_", "[_ ]"), str(e))]
        assert bad, f"refusal names no option: {e}"
        return
    assert torch.isfinite(gen.images).all() and gen.images.abs().max() <= 1
    assert len(gen) == opts.get("n", 1)


@pytest.mark.parametrize("flag,value,match", [
    ("--guidance", "nan", "guidance must be finite"), ("--guidance", "inf", "guidance must be finite"),
    ("--steps", "0", "steps must be a positive integer"), ("-n", "0", "n must be a positive integer"),
    ("--strength", "1.5", "strength"), ("--eta", "2", "eta must lie in"), ("--batch-size", "0", "batch_size"),
])
def test_bad_numbers_on_the_command_line(tmp_path, capsys, flag, value, match):
    extra = ["--init-image", str(REF / "heun6-s2-n8.png")] if flag == "--strength" else []
    extra += ["--sampler", "ddim"] if flag == "--eta" else []
    assert main(["sample", "--checkpoint", str(TINY), flag, value, *extra, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kakusan: error:") and match in err, err


# ---- every consumer goes through it --------------------------------------------------------------------------

def test_eval_and_trainer_grids_sample_through_the_pipeline(tmp_path, monkeypatch):
    import kakusan.pipeline as pl

    calls = []
    real = pl.Pipeline.__call__
    monkeypatch.setattr(pl.Pipeline, "__call__", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    from kakusan.metrics.evaluate import generate
    from kakusan.training import Trainer, TrainConfig

    images, labels, source = generate(TINY, 12, steps=2, guidance=2.0, batch_size=5, seed=3)
    assert images.shape == (12, 1, 8, 8) and labels.tolist() == [i % 10 for i in range(12)]
    assert source["nfe"] == 2 and source["checkpoint_sha256"] == Pipeline.load(TINY).weights_sha256
    direct = Pipeline.load(TINY)(class_label=labels.tolist(), steps=2, guidance=2.0, batch_size=5, seed=3)
    assert torch.equal(direct.uint8(), images)
    Trainer(TrainConfig(data="digits", preset="unet-tiny", cond="class", steps=2, batch_size=8, sample_every=2,
                        out=str(tmp_path / "run"), progress=False)).fit()
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()
    assert len(calls) == 3 and calls[-1]["sampler"] is None  # the grid: the checkpoint's default sampler
    rec = read_png_record(tmp_path / "run" / "samples" / "step-00000002.png")
    assert rec["sampler"] == "unipc-2" and rec["grid"]
    # no grids at all with sample_every 0
    Trainer(TrainConfig(data="digits", preset="unet-tiny", steps=2, batch_size=8, sample_every=0,
                        out=str(tmp_path / "quiet"), progress=False)).fit()
    assert not (tmp_path / "quiet" / "samples").exists()


def test_latent_checkpoint_img2img_inpaint_invert(tmp_path):
    from conftest import save_tiny_autoencoder_kl
    from kakusan.training import Trainer, TrainConfig

    save_tiny_autoencoder_kl(tmp_path / "vae", channels=1)
    Trainer(TrainConfig(data="digits", autoencoder=str(tmp_path / "vae"), preset="unet-tiny", cond="class",
                        steps=2, batch_size=8, sample_every=2, sample_steps=2, out=str(tmp_path / "ld"),
                        progress=False)).fit()
    p = Pipeline.load(tmp_path / "ld")
    assert p.is_latent and p.image_shape == (1, 8, 8) and p.shape == (4, 4, 4)
    x = _digits(2)
    assert torch.equal(p(init_image=x, strength=0.0, class_label=[1, 2], steps=4).uint8(), x)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1
    u8 = p(init_image=x, mask=mask, class_label=[1, 2], steps=4, seed=2).uint8()
    assert torch.equal(u8[:, :, :4], x[:, :, :4])  # outside the mask: the original pixels, composited
    inv = p.invert(x, class_label=[1, 2], steps=10)
    assert inv.noise.shape == (2, 4, 4, 4) and torch.isfinite(inv.noise).all()


def test_text_checkpoint_through_the_pipeline(tmp_path):
    pytest.importorskip("transformers")
    from test_text import _text_run, tiny_encoder_folder
    from kakusan.training import Trainer

    clip = tiny_encoder_folder(tmp_path / "clip")
    Trainer(_text_run(tmp_path, clip)).fit()
    p = Pipeline.load(tmp_path / "run")
    gen = p(prompt=["red apple", "green cat"], n=4, guidance=2, negative_prompt="blue heart", steps=3)
    assert len(gen) == 4 and [r["cond"] for r in gen.records] == ["red apple", "red apple", "green cat",
                                                                  "green cat"]
    x = gen.uint8()
    assert torch.equal(p(init_image=x, strength=0.0, prompt="red apple", n=4, steps=3).uint8(), x)
    mask = torch.zeros(4, 1, 8, 8)
    mask[..., :4] = 1
    assert torch.equal(p(init_image=x, mask=mask, prompt="star", n=4, steps=3).uint8()[..., 4:], x[..., 4:])
    inv = p.invert(x[:2], prompt="red apple", steps=10)
    back = p(noise=inv.noise, **inv.regenerate)
    assert back.images.shape == (2, 3, 8, 8)
    png = tmp_path / "one"
    gen.save_images(png)
    again = Pipeline.from_png(sorted(png.glob("*.png"))[3])
    assert torch.equal(again.uint8()[0], x[3])
    with pytest.raises(KakusanError, match="text-conditional"):
        p(class_label=1)
    # eval / sweep sample text models too, spread over the prompts given, with the guidance options
    from kakusan.metrics.evaluate import generate

    images, labels, source = generate(p, 6, prompt=["red apple", "star"], steps=2, guidance=2.0,
                                      negative_prompt="face", batch_size=4)
    assert images.shape == (6, 3, 8, 8) and labels is None
    assert source["prompts"] == ["red apple", "star"] and source["negative_prompt"] == "face"
    with pytest.raises(ConfigError, match="give the prompts"):
        generate(p, 2, steps=2)


def test_guidance_on_a_distilled_model_says_what_it_does(pipe):
    distilled = Pipeline(pipe.denoiser, {**pipe.config, "consistency": {"guidance": 3.0}}, source=pipe.source,
                         weights_sha256=pipe.weights_sha256)
    assert distilled.defaults() == ("lcm", 4)
    with pytest.warns(UserWarning, match="distilled with guidance 3 baked in; guidance 2 is applied on top"):
        distilled(class_label=1, guidance=2.0, steps=2)


def test_named_masks_are_the_regions_they_name(pipe):
    from kakusan.pipeline import named_mask

    m = named_mask("lower-half", 8)
    assert m[0, 0, 4:].eq(1).all() and m[0, 0, :4].eq(0).all() and named_mask("center", 8).sum() == 16
    x = _digits(2)
    a = pipe(init_image=x, mask="lower-half", class_label=[3, 4], steps=3, seed=4)
    b = pipe(init_image=x, mask=m.expand(2, 1, 8, 8), class_label=[3, 4], steps=3, seed=4)
    assert torch.equal(a.images, b.images) and a.records[0]["mask"] == {"name": "lower-half"}


def test_record_says_which_grid_the_default_rule_chose(pipe):
    """Without --sampler / --spacing the default sampler's grid is chosen by the step budget
    (samplers.DEFAULT_GRIDS); the record names the rule and everything it chose, and regenerating from the record
    asks the rule again and gets the same image. A record whose rule this version would answer otherwise is
    refused, naming both grids."""
    gen = pipe(n=2, class_label=3, steps=10, seed=4)
    rec = gen.record
    assert (rec["sampler"], rec["spacing"], rec["sigma_max"], rec["rho"], rec["sigma_min"], rec["last_step"]) == \
        ("unipc-2", "karras", 10.0, 7.0, 0.1, "gaussian")
    assert rec["grid_rule"] == "default grid for 10 steps (samplers.DEFAULT_GRIDS)" and rec["nfe"] == 10
    assert torch.equal(pipe.regenerate(rec).uint8(), gen.uint8())
    # a named spacing is the caller's: no rule in the record
    assert "grid_rule" not in pipe(n=1, class_label=3, steps=5, spacing="karras").record
    assert pipe(n=1, class_label=3, steps=5).record["last_step"] == "denoise"
    with pytest.raises(KakusanError, match=r"default grid of its day \(karras, rho 7.0, sigma~ 0.3..10.0, last step "
                                           r"gaussian\)"):
        pipe.regenerate({**rec, "sigma_min": 0.3})
    # a record from before the last step was part of the rule ended in the plain denoise: not this image
    before = {k: v for k, v in rec.items() if k != "last_step"}
    with pytest.raises(KakusanError, match=r"last step denoise\); this version's default .* last step gaussian"):
        pipe.regenerate(before)
