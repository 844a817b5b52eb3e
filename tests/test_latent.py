"""Latent diffusion: the KL autoencoder, its training and measured scale, the latent cache and its staleness
checks, latent training and decoding samplers, and diffusers' AutoencoderKL from a local folder."""

import json
import re

import pytest
import torch
from conftest import save_tiny_autoencoder_kl

from kakusan.cli import main
from kakusan.data import load_digits
from kakusan.errors import CheckpointError, ConfigError, DataError
from kakusan.latents import latent_cache
from kakusan.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from kakusan.training import Trainer, TrainConfig
from kakusan.checkpoints import load_autoencoder
from kakusan.training.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer, measure_latent_scale

SMALL = {"channels": 16, "norm_groups": 8}


@pytest.mark.parametrize("factor,mults", [(4, (1, 2, 2)), (8, (1, 2, 2, 4))])
def test_autoencoder_shapes(factor, mults):
    ae = Autoencoder(AutoencoderConfig(in_channels=3, latent_channels=4, channel_mults=mults, **SMALL))
    assert ae.factor == factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    q = ae.encode(x)
    assert q.mean.shape == (2, 4, 32 // factor, 32 // factor)
    assert ae.decode(q.mean).shape == x.shape
    with pytest.raises(ConfigError, match=f"not divisible by the autoencoder's downsampling factor {factor}"):
        ae.encode(torch.zeros(1, 3, 36 if factor == 8 else 30, 32))
    with pytest.raises(ConfigError, match="takes \\(B, 3, H, W\\)"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="no measured latent scale"):
        ae.to_latent(x)


def test_posterior_kl_matches_the_closed_form():
    moments = torch.randn(3, 4, 2, 2)
    q = DiagonalGaussian(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(q.kl(), ref, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([q.sample(g) for _ in range(4000)])
    assert torch.allclose(draws.mean(0), q.mean, atol=0.15 * q.std.max())
    assert torch.allclose(draws.std(0), q.std, rtol=0.1)


def _ae_config(tmp_path, **kw):
    base = dict(data="digits", factor=4, latent_channels=2, model=SMALL, steps=60, batch_size=32, lr=1e-3,
                log_every=20, checkpoint_every=30, out=str(tmp_path / "ae"), progress=False, scale_images=500)
    return AutoencoderTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    tr = AutoencoderTrainer(_ae_config(tmp))
    ckpt = tr.fit()
    return tr, ckpt


def test_autoencoder_training_learns_and_measures_its_scale(trained_ae):
    tr, ckpt = trained_ae
    log = [json.loads(line) for line in (tr.out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["psnr"] > log[0]["psnr"] + 2.0  # reconstruction improves (dB)
    config = json.loads((ckpt / "config.json").read_text())
    scale = config["model"]["scale_factor"]
    # the stored scale is 1 / std of the encoded means of the training images it names
    ae = load_autoencoder(ckpt)
    pick = torch.linspace(0, len(tr.images) - 1, 500).round().long()
    with torch.no_grad():
        z = ae.module.encode(tr.images[pick]).mean
    assert scale == pytest.approx(1 / z.std().item(), rel=1e-4)
    assert ae.to_latent(tr.images[:64]).std().item() == pytest.approx(1.0, rel=0.25)
    assert ae.factor == 4 and ae.latent_channels == 2 and len(ae.sha256) == 64


def test_autoencoder_resume_is_exact(tmp_path):
    full = AutoencoderTrainer(_ae_config(tmp_path, steps=4, checkpoint_every=2, log_every=2))
    full.fit()
    again = AutoencoderTrainer(_ae_config(tmp_path / "b", steps=4, checkpoint_every=2, log_every=2))
    again.resume(tmp_path / "ae" / "checkpoints" / "step-00000002")
    assert again.step == 2
    again.train_step(), again.train_step()
    # bitwise: the autoencoder, the discriminator and the optimizer's state
    for name, a, b in (("autoencoder", again.ae.state_dict(), full.ae.state_dict()),
                       ("discriminator", again.disc.state_dict(), full.disc.state_dict())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    oa, ob = again.optimizer.state_dict()["state"], full.optimizer.state_dict()["state"]
    assert oa and oa.keys() == ob.keys()
    assert all(oa[i].keys() == ob[i].keys() and all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i]) for i in oa)


def test_autoencoder_bad_configs():
    from kakusan.models.autoencoder import AutoencoderConfig

    with pytest.raises(ConfigError, match="norm_groups must be >= 1"):  # was a ZeroDivisionError
        AutoencoderConfig(norm_groups=0)
    with pytest.raises(ConfigError, match="factor must be one of"):
        AutoencoderTrainConfig(factor=3)
    with pytest.raises(ConfigError, match="rec_loss"):
        AutoencoderTrainConfig(rec_loss="l3")
    with pytest.raises(ConfigError, match="not divisible by the downsampling factor 8"):
        AutoencoderTrainer(AutoencoderTrainConfig(data="digits", image_size=12, factor=8, model=SMALL,
                                                  progress=False))


def test_latent_cache_is_reused_and_refused_when_stale(trained_ae, tmp_path, monkeypatch):
    _, ckpt = trained_ae
    ae = load_autoencoder(ckpt)
    digits = load_digits()
    latents, path = latent_cache(ae, digits, "digits", cache_dir=tmp_path)
    assert latents.shape == (len(digits), 2, 2, 2) and path.is_file()
    import kakusan.latents as lat

    monkeypatch.setattr(lat, "encode_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded")))
    again, _ = latent_cache(ae, digits, "digits", cache_dir=tmp_path)
    assert torch.equal(again, latents)
    # an explicit cache file that no longer matches its inputs is refused, naming why
    changed = load_digits()
    changed.images = changed.images.flip(-1)
    with pytest.raises(DataError, match="stale latent cache \\(the data changed\\)"):
        latent_cache(ae, changed, "digits", path=path)
    ae.scale *= 2
    with pytest.raises(DataError, match="the latent scale changed"):
        latent_cache(ae, digits, "digits", path=path)
    ae.sha256 = "0" * 64
    with pytest.raises(DataError, match="the autoencoder changed"):
        latent_cache(ae, digits, "digits", path=path)
    with pytest.raises(DataError, match="the encoding mode differs"):
        latent_cache(load_autoencoder(ckpt), digits, "digits", mode="sample", path=path)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable latent cache"):
        latent_cache(load_autoencoder(ckpt), digits, "digits", path=path)


def test_latent_diffusion_trains_samples_and_checks_its_autoencoder(trained_ae, tmp_path, capsys):
    _, ckpt = trained_ae
    cfg = TrainConfig(data="digits", autoencoder=str(ckpt), preset="unet-tiny", cond="class", steps=4, batch_size=8,
                      out=str(tmp_path / "ld"), sample_every=4, sample_steps=3, progress=False)
    tr = Trainer(cfg)
    assert tr.model_cfg.in_channels == 2 and tr.model_cfg.image_size == 2
    scale = json.loads((ckpt / "config.json").read_text())["model"]["scale_factor"]
    assert tr.config["autoencoder"]["scale_factor"] == scale
    tr.fit()
    run = str(tmp_path / "ld")
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", run, "-n", "10", "--steps", "3", "--guidance", "2", "--out", str(out),
                 "--out-dir", str(tmp_path / "each")]) == 0
    from PIL import Image

    with Image.open(next((tmp_path / "each").glob("*.png"))) as im:
        assert im.size == (8, 8)  # decoded to pixels
    # another autoencoder (other channels, or other weights) is refused
    other = AutoencoderTrainer(_ae_config(tmp_path / "o", steps=1, latent_channels=3)).fit()
    same_shape = AutoencoderTrainer(_ae_config(tmp_path / "p", steps=1, seed=5)).fit()

    def fails(args, match):
        capsys.readouterr()
        assert main(["sample", "--checkpoint", run, "-n", "2", "--steps", "2", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err

    fails(["--autoencoder", str(other)], "has 3 latent channels, this latent model was trained on 2")
    fails(["--autoencoder", str(same_shape)], "is not the one this model was trained with")
    with pytest.raises(ConfigError, match="cannot be combined with --autoencoder"):
        TrainConfig(autoencoder=str(ckpt), hflip=True)
    pixel = Trainer(TrainConfig(data="digits", preset="unet-tiny", steps=1, out=str(tmp_path / "px"),
                                sample_every=1, sample_steps=2, progress=False))
    pixel.fit()
    assert main(["sample", "--checkpoint", str(tmp_path / "px"), "--autoencoder", str(ckpt), "-n", "1",
                 "--steps", "1", "--out", str(out)]) == 2
    assert "pixel-space model" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "px")


def test_diffusers_autoencoder_kl_from_a_local_folder(tmp_path):
    vae = save_tiny_autoencoder_kl(tmp_path / "vae", channels=1)
    ae = load_autoencoder(tmp_path / "vae")
    assert ae.kind == "diffusers" and ae.factor == 2 and ae.latent_channels == 4 and ae.scale is None
    digits = load_digits()
    scale = measure_latent_scale(ae, digits.images, n=300)  # measured, not the config's constant
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        ref = vae.eval().encode(x).latent_dist.mean
        assert torch.allclose(ae.to_latent(x), ref * scale, atol=1e-5)
        assert torch.allclose(ae.from_latent(ref * scale), vae.decode(ref).sample, atol=1e-5)
    # and a latent model trains on it, recording it
    cfg = TrainConfig(data="digits", autoencoder=str(tmp_path / "vae"), preset="unet-tiny", steps=2, batch_size=8,
                      model={"attention_resolutions": []}, out=str(tmp_path / "ld"), sample_every=2, sample_steps=2,
                      progress=False)
    tr = Trainer(cfg)
    assert tr.model_cfg.in_channels == 4 and tr.model_cfg.image_size == 4
    assert tr.config["autoencoder"]["kind"] == "diffusers"
    full = measure_latent_scale(load_autoencoder(tmp_path / "vae"), digits.images)  # every image: the trainer's
    assert tr.config["autoencoder"]["scale_factor"] == pytest.approx(full, rel=1e-5)
    assert tr.images.std().item() == pytest.approx(1.0, rel=0.05)
    tr.fit()
    assert main(["sample", "--checkpoint", str(tmp_path / "ld"), "-n", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_train_autoencoder_cli_reports_reconstruction_psnr(tmp_path, capsys):
    from kakusan.metrics.stats import psnr
    from kakusan.training.autoencoder import reconstruction_report

    out = tmp_path / "ae"
    assert main(["train-autoencoder", "--data", "digits", "--factor", "4", "--latent-channels", "2", "--model",
                 json.dumps(SMALL), "--steps", "3", "--batch-size", "16", "--out", str(out), "--eval-limit", "64"]) == 0
    printed = capsys.readouterr().out
    assert "latent scale" in printed and "PSNR" in printed and (out / "reconstructions-test.png").is_file()
    r = reconstruction_report(out, "digits", limit=64)
    ae = load_autoencoder(out)
    x = load_digits().images[:64]
    from kakusan.data import to_model_range, to_uint8

    with torch.no_grad():
        rec = to_uint8(ae.module.decode(ae.module.encode(to_model_range(x)).mean))
    assert r["n"] == 64 and r["psnr_mean"] == pytest.approx(psnr(rec, x).mean().item(), rel=1e-5)
    mse = (rec.float() - x.float()).square().mean()
    assert r["psnr_of_mean_mse"] == pytest.approx(10 * torch.log10(255**2 / mse).item(), rel=1e-5)
    assert psnr(x, x).min() > 90  # identical images: the MSE floor, not a NaN
