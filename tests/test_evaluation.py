"""Feature extractors, provenance records, cached stats, `kakusan eval / sweep / compare / plot`, bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kakusan.data import load_dataset
from kakusan.data.datasets import FASHION_SYSTEM_DIR
from kakusan.errors import CheckpointError, ConfigError, DataError
from kakusan.metrics.classifier import (ClassifierConfig, DomainClassifier, file_sha256, load_classifier,
                                        random_crop_flip, save_classifier, train_classifier)
from kakusan.metrics.evaluate import FeatureSet, read_image_folder, score, stats_features, write_stats
from kakusan.metrics.features import load_extractor
from kakusan.metrics.inception import FIDInceptionV3, load_fid_inception
from kakusan.metrics.provenance import check_comparable, differences, sample_count_label

from conftest import SHARED_DATA
from test_cli import _one_line_error, kakusan


# ---- the FID Inception network -----------------------------------------------------------------------------

def test_fid_inception_architecture_and_weight_loading(tmp_path):
    net = FIDInceptionV3()
    # torchvision's Inception-v3 without the aux head has 23,834,568 parameters with 1,000 classes; the FID
    # graph's 1,008-way classifier adds 8 x 2,049
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    with torch.no_grad():
        feats, logits = net.eval()(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        grey, _ = net(torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and grey.shape == (1, 2048)
    assert (feats >= 0).all()  # pool3 of ReLU activations

    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    digest = file_sha256(path)
    loaded, d2 = load_fid_inception(path, expected_sha256=digest[:8])
    assert d2 == digest
    x = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], net(x)[0])
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_fid_inception(path, expected_sha256="00000000")
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not FID Inception-v3 weights"):
        load_fid_inception(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_fid_inception(junk)
    with pytest.raises(CheckpointError, match="not in .*download"):
        load_fid_inception(None)  # the published file is not cached and downloading was not allowed
    ex = load_extractor(f"inception:{path}")
    assert ex.record["weights_sha256"] == digest and ex.feature_dim == 2048


def _pytorch_fid_inception():
    """pytorch-fid's inception module, or a skip saying why it cannot be imported here. It builds on torchvision's
    Inception-v3, and torchvision's compiled part must match the installed torch build (PyPI's wheels are built
    for CUDA torch: next to a CPU-only torch ``import torchvision`` fails)."""
    try:
        from pytorch_fid import inception
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on a mismatched build
        pytest.skip(f"pytorch-fid is not importable here ({type(e).__name__}: {e}); pip install 'kakusan[fid-check]' "
                    f"with a torchvision built for this torch")
    return inception


def _random_inception_state(net, seed=0):
    """He-scaled random weights and random BatchNorm statistics, so that activations keep their scale through the
    ~100 layers (a wrong pooling or branch order then changes the features by far more than round-off)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.clone()
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("conv.weight") or k == "fc.weight":
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            state[k] = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        else:  # BatchNorm bias and running mean, the classifier's bias
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    return state


def test_fid_inception_equals_pytorch_fid_with_the_same_weights(monkeypatch):
    """pytorch-fid's InceptionV3 (block 3: the 2,048-D pool3 features FID is computed on), given the same random
    state dict through its own loader (strictly: every tensor has its counterpart), gives the same features as
    kakusan's network to float32 round-off. That covers what FID depends on: the padding-excluded average pools
    of Mixed_5b-d / 6b-e / 7b, the max pool of Mixed_7c, every block's branch order, the final average pool, the
    bilinear resize to 299x299 and the scaling to [-1, 1]."""
    pfid = _pytorch_fid_inception()
    ours = FIDInceptionV3().eval()
    state = _random_inception_state(ours)
    ours.load_state_dict(state)
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: dict(state))  # no download
    theirs = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, _ = ours(x)
        want = theirs(x.float() / 255)[0].flatten(1)  # pytorch-fid takes [0, 1] floats
    assert feats.shape == want.shape == (2, 2048) and want.std() > 0.1
    # measured: bitwise equal (the same operations in the same order); the bound allows other kernels' round-off
    assert (feats - want).abs().max() < 1e-5 * want.abs().max(), (feats - want).abs().max()


# ---- the domain classifier ---------------------------------------------------------------------------------------

def test_classifier_round_trip_and_augmentation(tmp_path):
    cfg = ClassifierConfig(in_channels=3, image_size=16, num_classes=4, widths=(8, 16, 24), data="x")
    model = DomainClassifier(cfg).eval()
    path = save_classifier(model, tmp_path / "c.safetensors", {"test_accuracy": 0.5})
    loaded, report = load_classifier(path)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and loaded.features(x).shape == (5, 24)
    assert report == {"test_accuracy": 0.5} and loaded.cfg.widths == (8, 16, 24)
    g = torch.Generator().manual_seed(0)
    img = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(50, 1, 1, 1)
    out = random_crop_flip(img, 1, False, g)
    assert out.shape == img.shape
    # a translation by at most 1 pixel: the centre 2x2 of every output comes from the centre 4x4
    assert set(out[:, 0, 1:3, 1:3].unique().tolist()) <= set(img[0, 0].unique().tolist())
    assert (out != img).any(dim=(1, 2, 3)).float().mean() > 0.5
    with pytest.raises(CheckpointError, match="not a kakusan domain classifier"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_classifier(tmp_path / "other.safetensors")


def test_classifier_learns_real_mnist(shared_data, tmp_path):
    r = train_classifier(f"mnist:{shared_data / 'mnist'}", tmp_path / "m.safetensors", epochs=2, limit=6000,
                         widths=(8, 16, 32), batch_size=64, progress=False)
    assert r["test_accuracy"] > 0.95 and r["test_size"] == 10_000 and len(r["per_class_accuracy"]) == 10
    ex = load_extractor(f"classifier:{r['path']}")
    assert ex.record["weights_sha256"] == r["sha256"] and ex.feature_dim == 32



def test_classifier_says_what_its_final_evaluation_does(tmp_path, capsys):
    """The evaluation after training (10,000 MNIST test images, again at each noise level: about a minute on two
    cores) is announced in one line, and shows a progress bar on a terminal."""
    r = train_classifier("digits", tmp_path / "c.safetensors", epochs=1, widths=(4, 8, 8), batch_size=256,
                         noisy_schedule="cosine")
    err = capsys.readouterr().err
    assert f"evaluating on the {r['test_size']:,} test images of digits, clean and at t = 250, 500, 750" in err
    train_classifier("digits", tmp_path / "q.safetensors", epochs=1, widths=(4, 8, 8), batch_size=256,
                     progress=False)
    assert "evaluating" not in capsys.readouterr().err

# ---- provenance and cached statistics -----------------------------------------------------------------------------

def _extractor(tmp_path, seed=0, name="c"):
    torch.manual_seed(seed)
    model = DomainClassifier(ClassifierConfig(1, 8, 10, (4, 8, 12), data="digits"))
    return load_extractor(f"classifier:{save_classifier(model, tmp_path / f'{name}.safetensors')}")


def test_stats_files_keep_their_record_and_refuse_another_extractor(tmp_path):
    ex, other = _extractor(tmp_path, 0, "a"), _extractor(tmp_path, 1, "b")
    images = torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8)
    f, z = ex(images)
    fs = FeatureSet(f, z, {"kind": "dataset", "data": "digits", "split": "test", "n": 200})
    path = write_stats(ex, fs, tmp_path / "ref.safetensors")
    back = stats_features(path, ex)
    assert torch.equal(back.features, f) and back.source["data"] == "digits"
    np.testing.assert_allclose(back.stats.mu, f.double().mean(0).numpy(), rtol=1e-12)
    with pytest.raises(CheckpointError, match="another feature extractor.*weights_sha256"):
        stats_features(path, other)
    with pytest.raises(DataError, match="channel"):
        ex(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    # scores: a result carries the record; comparing two made differently is refused
    res_a = score(ex, FeatureSet(f[:100], z[:100], {"kind": "folder", "n": 100}), back)
    res_b = score(ex, FeatureSet(f[100:150], z[100:150], {"kind": "folder", "n": 50}), back)
    assert res_a["record"]["extractor"]["weights_sha256"] == file_sha256(tmp_path / "a.safetensors")
    assert res_a["record"]["reference"]["stats_file"] == str(path)
    assert "preliminary" in res_a["preliminary"] and "100" in res_a["preliminary"]
    assert differences(res_a["record"], res_a["record"]) == []
    with pytest.raises(ConfigError, match="samples.n: 100 vs 50"):
        check_comparable(res_a["record"], res_b["record"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_comparable(res_a["record"], res_b["record"], strict=False)
    assert "not comparable" in str(w[0].message)
    assert sample_count_label(10_000, 50_000) is None


def test_image_folders_of_mixed_formats_are_refused(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(d / f"a{i}.png")
    assert read_image_folder(d).shape == (3, 3, 16, 16)
    Image.new("RGB", (32, 32)).save(d / "big.png")
    with pytest.raises(DataError, match=r"3 x 16x16 with 3 channel\(s\), 1 x 32x32"):
        read_image_folder(d)
    (d / "big.png").unlink()
    Image.new("L", (16, 16)).save(d / "grey.png")
    with pytest.raises(DataError, match="1 channel"):
        read_image_folder(d)


# ---- the CLI end to end ---------------------------------------------------------------------------------------------

def test_eval_sweep_compare_and_plots_from_the_cli(tmp_path):
    run, cls = tmp_path / "run", tmp_path / "cls.safetensors"
    r = kakusan("train", "--preset", "unet-tiny", "--cond", "class", "--steps", "3", "--batch-size", "8",
                "--limit", "64", "--sample-every", "100", "--log-every", "1", "--out", run)
    assert r.returncode == 0, r.stderr
    assert (run / "loss.png").is_file()  # training draws its loss curve as it goes
    r = kakusan("train-classifier", "--data", "digits", "--out", cls, "--epochs", "2", "--widths", "8,16,24",
                "--batch-size", "64")
    assert r.returncode == 0 and "test accuracy" in r.stdout, r.stderr
    common = ["--extractor", f"classifier:{cls}", "--ref", "digits", "--steps", "2"]

    # classifier guidance with a noise-aware classifier of the model's schedule (cosine)
    noisy = tmp_path / "noisy.safetensors"
    r = kakusan("train-classifier", "--data", "digits", "--out", noisy, "--epochs", "1", "--widths", "8,16,24",
                "--noisy", "cosine")
    assert r.returncode == 0 and "at t = 500" in r.stdout, r.stderr
    r = kakusan("sample", "--checkpoint", run, "--classifier", noisy, "--classifier-scale", "2", "--class", "3",
                "-n", "4", "--steps", "3", "--out", tmp_path / "cg.png")
    assert r.returncode == 0, r.stderr
    _one_line_error(kakusan("sample", "--checkpoint", run, "--classifier", cls, "--steps", "2"), "--noisy")
    _one_line_error(kakusan("sample", "--checkpoint", run, "--classifier", noisy, "--guidance", "2"), "choose one")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    r = kakusan("eval", "--checkpoint", run, "-n", "40", "--guidance", "2", "--out", a, *common)
    assert r.returncode == 0, r.stderr
    assert "FID" in r.stdout and "class agreement" in r.stdout and "preliminary" in r.stdout
    res = json.loads(a.read_text())
    s, rec = res["scores"], res["record"]
    assert s["fid"] > 0 and 1 <= s["is"]["mean"] <= 10 and 0 <= s["precision"] <= 1 and "stderr" in s["kid"]
    assert rec["samples"]["sampler"] == "unipc-2" and rec["samples"]["guidance"] == 2.0
    assert rec["samples"]["checkpoint_sha256"] and rec["reference"]["n"] == 1797
    assert rec["extractor"]["weights_sha256"] == file_sha256(cls)
    assert kakusan("eval", "--checkpoint", run, "-n", "30", "--out", b, *common).returncode == 0
    _one_line_error(kakusan("compare", a, b), "not comparable", "samples.n")
    assert kakusan("compare", a, a).returncode == 0

    # a folder of images against cached reference statistics; stats from another extractor are refused
    imgs, ref = tmp_path / "imgs", tmp_path / "ref.safetensors"
    assert kakusan("sample", "--checkpoint", run, "--steps", "2", "-n", "40", "--out", "",
                   "--out-dir", imgs).returncode == 0
    r = kakusan("stats", "--data", "digits", "--extractor", f"classifier:{cls}", "--out", ref)
    assert r.returncode == 0 and "1,797 feature vectors" in r.stdout, r.stderr
    r = kakusan("eval", "--images", imgs, "--ref-stats", ref, "--extractor", f"classifier:{cls}", "--out", b)
    assert r.returncode == 0, r.stderr
    rec = json.loads(b.read_text())["record"]
    assert rec["samples"]["kind"] == "folder" and rec["samples"]["n"] == 40 and len(rec["samples"]["images_sha256"]) == 64
    assert rec["reference"]["stats_file"] == str(ref) and rec["reference"]["n"] == 1797
    other = tmp_path / "other.safetensors"
    assert kakusan("train-classifier", "--data", "digits", "--out", other, "--epochs", "1",
                   "--widths", "8,16,24").returncode == 0
    _one_line_error(kakusan("eval", "--images", imgs, "--ref-stats", ref, "--extractor", f"classifier:{other}"),
                    "another feature extractor", "weights_sha256")

    out = tmp_path / "sweep"
    r = kakusan("sweep", "--checkpoint", run, "--samplers", "ddim,unipc-2", "--steps", "1,2", "-n", "40",
                "--guidance", "none,2", "--out", out, "--extractor", f"classifier:{cls}", "--ref", "digits", "--grids")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows) == 8 and {(x["sampler"], x["steps"], x["guidance"]) for x in rows} >= {("ddim", 1, None)}
    assert all(x["fid"] > 0 and x["sample_seconds"] > 0 for x in rows)
    assert Image.open(out / "sweep.png").size[0] > 500
    assert len(list((out / "grids").glob("*.png"))) == 8 and (out / "grids" / "unipc-2-2-w2.png").is_file()

    for what, extra in (("schedules", []), ("forward", []), ("embedding", []), ("loss", ["--run", run]),
                        ("trajectory", ["--checkpoint", run, "--steps", "3", "--class", "4"]),
                        ("samplers", ["--checkpoint", run, "--configs", "ddim:2,unipc-2:3,ddpm:4", "--guidance", "2"])):
        png = tmp_path / f"{what}.png"
        r = kakusan("plot", what, "--out", png, *extra)
        assert r.returncode == 0, (what, r.stderr)
        assert Image.open(png).size[0] > 300

    # bad input: one clear line each
    _one_line_error(kakusan("eval", "--checkpoint", run, "-n", "10", *common), "10 samples for 24-dimensional")
    _one_line_error(kakusan("eval", "--checkpoint", run, "-n", "40", "--extractor", "resnet", "--ref", "digits"),
                    "unknown feature extractor")
    _one_line_error(kakusan("eval", "-n", "40", *common), "exactly one of")
    _one_line_error(kakusan("eval", "--checkpoint", run, "-n", "40", "--extractor", f"classifier:{cls}",
                            "--ref-stats", tmp_path / "nope.safetensors"), "not found")
    _one_line_error(kakusan("plot", "loss", "--run", tmp_path / "empty"), "not found")
    _one_line_error(kakusan("plot", "trajectory", "--checkpoint", run, "--class", "11"), "out of range")
    _one_line_error(kakusan("plot", "samplers", "--checkpoint", run, "--configs", "ddim:ten"), "SAMPLER[:STEPS]")
    _one_line_error(kakusan("plot", "samplers", "--checkpoint", run, "--configs", "euler-maruyama:4"),
                    "unknown sampler")


# ---- the shipped domain classifiers, re-measured on the real test splits --------------------------------------------

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
# the test split of each shipped classifier's data set, and the folder or file whose absence means that data set
# is not on this machine (../shared/data; Fashion-MNIST from Debian's dataset-fashion-mnist package)
SHIPPED_DATA = {
    "mnist": (f"mnist:{SHARED_DATA / 'mnist'}", SHARED_DATA / "mnist"),
    "fashion-mnist": (f"fashion-mnist:{FASHION_SYSTEM_DIR}", FASHION_SYSTEM_DIR),
    "cifar10": (f"cifar10:{SHARED_DATA / 'cifar10-jpeg' / 'cifar10-jpeg.tar.gz'}",
                SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"),
}


def _shipped_test_split(name):
    """The real test split; a skip only where the data set is absent. A loader error is a failure."""
    spec, where = SHIPPED_DATA[name]
    if not where.exists():
        pytest.skip(f"the {name} data set is not on this machine ({where} does not exist)")
    return load_dataset(spec, "test")


@pytest.mark.slow
@pytest.mark.parametrize("name, floor", [("mnist", 0.99), ("fashion-mnist", 0.90), ("cifar10", 0.85)])
def test_shipped_classifiers_reach_their_accuracy(name, floor):
    from kakusan.metrics.classifier import predict

    model, report = load_classifier(WEIGHTS / f"classifier-{name}.safetensors")
    test = _shipped_test_split(name)
    assert len(test) == report["test_size"] == 10_000
    acc = float((predict(model, test.images).argmax(1) == test.labels).float().mean())
    assert acc >= floor and acc == pytest.approx(report["test_accuracy"], abs=1e-4)


@pytest.mark.slow
def test_shipped_noisy_mnist_classifier_reaches_its_recorded_accuracy_at_t500():
    """The noise-aware MNIST classifier (classifier guidance; cosine schedule) on x_t of the 10,000 test digits at
    t = 500 (alpha = 0.71): the accuracy recorded in its file, on the very noise train_classifier drew for it (its
    seed + 1, batches of 500; the t = 250 pass first, whose draws are skipped here)."""
    from kakusan.metrics.classifier import to_unit
    from kakusan.schedules import ScheduleConfig, make_schedule

    model, report = load_classifier(WEIGHTS / "classifier-mnist-noisy-cosine.safetensors")
    schedule = make_schedule(ScheduleConfig.from_dict(model.cfg.schedule))
    assert schedule.config.name == "cosine" and list(report["noisy_test_accuracy"]) == ["250", "500", "750"]
    test = _shipped_test_split("mnist")
    g = torch.Generator().manual_seed(report["seed"] + 1)
    for i in range(0, len(test), 500):  # the t = 250 pass's draws
        torch.randn(test.images[i:i + 500].shape, generator=g)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(500.0))
    with torch.no_grad():
        logits = torch.cat([model(alpha * to_unit(x) + sigma * torch.randn(x.shape, generator=g), torch.tensor(500.0))
                            for x in test.images.split(500)])
    acc = float((logits.argmax(1) == test.labels).float().mean())
    assert acc > 0.95 and acc == pytest.approx(report["noisy_test_accuracy"]["500"], abs=1e-4), acc
