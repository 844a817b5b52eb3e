"""LPIPS offline: the formula on random backbones and heads (against a hand computation and, where the lpips
package is installed, against its own code with the same weights), the hash check, the refusals without weights,
the labelled stand-in, and sweep --reference."""

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kakusan.cli import main
from kakusan.errors import CheckpointError, ConfigError
from kakusan.metrics import lpips as lp
from kakusan.metrics.classifier import ClassifierConfig, DomainClassifier, save_classifier
from kakusan.metrics.provenance import file_sha256


def _random_lpips(net: str, seed: int = 0) -> lp.LPIPSNet:
    torch.manual_seed(seed)
    model = lp.LPIPSNet(net)
    for lin in model.lins:  # LPIPS's heads are non-negative
        lin.weight.data = torch.rand_like(lin.weight)
    return model


def _by_hand(model: lp.LPIPSNet, x, y):
    """Zhang et al. eq. 1 written out: convolutions, ReLUs and pools of the backbone from its parameters, each
    tapped layer's channel vectors scaled to unit length, squared differences weighted per channel, averaged over
    positions, summed over layers."""
    sd = model.state_dict()
    shift = torch.tensor(lp.SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(lp.SCALE).view(1, 3, 1, 1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total, tap = torch.zeros(len(x)), 0
    for i, layer in enumerate(model.features):
        if isinstance(layer, torch.nn.Conv2d):
            w, b = sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]
            hx, hy = (F.conv2d(h, w, b, stride=layer.stride, padding=layer.padding) for h in (hx, hy))
        elif isinstance(layer, torch.nn.ReLU):
            hx, hy = hx.clamp_min(0), hy.clamp_min(0)
        else:
            hx, hy = (F.max_pool2d(h, layer.kernel_size, layer.stride) for h in (hx, hy))
        if i in model.taps:
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = sd[f"lins.{tap}.weight"].view(1, -1, 1, 1)
            total += (w * (nx - ny) ** 2).sum(1).mean((1, 2))
            tap += 1
    assert tap == 5
    return total


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 32)])
def test_lpips_is_zero_for_identical_images_and_equals_the_hand_computation(net, size):
    model = _random_lpips(net)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(3, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    d = model(x, y)
    assert torch.equal(model(x, x), torch.zeros(3))
    assert d.min() > 0
    torch.testing.assert_close(d, _by_hand(model, x, y), rtol=1e-5, atol=1e-7)
    assert [k for k in model.state_dict() if k.startswith("features.")][:2] == ["features.0.weight",
                                                                                   "features.0.bias"]


def test_uint8_images_grey_and_small_are_taken_as_lpips_takes_them():
    model = _random_lpips("alex")
    dist = lp.PerceptualDistance(model, {"name": "lpips"}, "lpips", lp._lpips_input)
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g) for _ in range(2))
    d = dist(a, b, batch_size=3)
    up = lambda u: F.interpolate((u.float() / 127.5 - 1).expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear",
                                 align_corners=False)
    torch.testing.assert_close(d, _by_hand(model, up(a), up(b)), rtol=1e-5, atol=1e-7)
    assert torch.equal(dist(a, a), torch.zeros(4))
    with pytest.raises(ConfigError, match="two uint8 batches of one shape"):
        dist(a, b[:2])


def _torchvision_like_file(path, net="alex", seed=0):
    """A random state dict laid out as torchvision's file (features.* and classifier.*), saved as .pth."""
    sd = {k: v.clone() for k, v in _random_lpips(net, seed).state_dict().items() if k.startswith("features.")}
    sd["classifier.1.weight"] = torch.zeros(2, 2)
    torch.save(sd, path)
    return path


def _heads_file(path, net="alex"):
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(lp.BACKBONES[net]["channels"])},
               path)
    return path


def test_backbone_weights_are_hash_checked_and_absent_ones_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    heads = _heads_file(tmp_path / "heads.pth")
    # absent: the message names torchvision's file, where it was looked for, and how to pass it
    with pytest.raises(CheckpointError, match=r"alexnet-owt-7be5be79\.pth.*not found.*lpips:alex:FILE"):
        lp.load_distance("lpips:alex")
    # present under its published name but with other bytes: refused by its SHA-256
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    fake = _torchvision_like_file(hub / "alexnet-owt-7be5be79.pth")
    with pytest.raises(CheckpointError, match=r"SHA-256 [0-9a-f]{16}\.\.\. is not torchvision's alexnet-owt-7be5be79"):
        lp.load_lpips("alex", heads=heads)
    # the hash check off (tests only): the random backbone loads with its heads, recorded by their hashes
    model, record = lp.load_lpips("alex", fake, heads, check_hash=False)
    assert record["backbone_sha256"] == file_sha256(fake) and record["heads_sha256"] == file_sha256(heads)
    want = torch.load(fake, weights_only=True)
    assert torch.equal(model.state_dict()["features.3.weight"], want["features.3.weight"])
    with pytest.raises(CheckpointError, match="not LPIPS-vgg weights"):
        lp.load_lpips("vgg", fake, _heads_file(tmp_path / "vh.pth", "vgg"), check_hash=False)
    # the heads ship in the lpips package: without it, the message says what to install
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps lpips"):
        lp.load_lpips("alex", fake, check_hash=False)
    with pytest.raises(ConfigError, match="unknown LPIPS backbone"):
        lp.load_lpips("resnet")


def test_sweep_refuses_missing_lpips_weights_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    args = ["sweep", "--checkpoint", str(tmp_path / "none"), "--extractor", "inception", "--ref", "digits"]
    for extra, words in ((["--reference", "ddpm:1000", "--distance", "lpips:alex"], "alexnet-owt-7be5be79.pth"),
                         (["--reference", "ddpm:1000"], "no LPIPS weights on disk"),
                         (["--reference", "ddpm"], "SAMPLER:STEPS"),
                         (["--distance", "lpips:alex"], "--reference")):
        capsys.readouterr()
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kakusan: error:") and words in err and "\n" not in err, err


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="the lpips package is not installed")
def test_equals_the_lpips_package_with_the_same_weights(monkeypatch):
    """The lpips package's own code (its torchvision replaced by kakusan's stacks, which have torchvision's
    layout) with its shipped heads, and kakusan's LPIPS with the same backbone weights: the same distances."""
    tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.alexnet = lambda *a, **k: types.SimpleNamespace(features=lp.alexnet_features())
    models.vgg16 = lambda *a, **k: types.SimpleNamespace(features=lp.vgg16_features())
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips

    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    for net in ("alex", "vgg"):
        torch.manual_seed(0)
        theirs = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        # their slices keep torchvision's indices (slice2.3.weight = features.3.weight)
        backbone = {"features." + k.split(".", 1)[1]: v for k, v in theirs.net.state_dict().items()}
        heads = torch.load(lp.lpips_heads_file(net), map_location="cpu", weights_only=True)
        ours = lp.LPIPSNet(net)
        ours.load_state_dict({**backbone, **{f"lins.{k[3]}.weight": v for k, v in heads.items()}})
        torch.testing.assert_close(ours(x, y), theirs(x, y).detach().flatten(), rtol=1e-5, atol=1e-7)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        del sys.modules[name]


def test_the_stand_in_is_labelled_and_sweep_reference_is_zero_on_itself(tmp_path, digits):
    from kakusan.metrics.evaluate import reference_features, sweep
    from kakusan.metrics.features import load_extractor
    from kakusan.training import Trainer, TrainConfig

    torch.manual_seed(0)
    cls = save_classifier(DomainClassifier(ClassifierConfig(1, 8, 10, (4, 8, 12), data="digits")),
                          tmp_path / "cls.safetensors")
    dist = lp.load_distance(f"classifier:{cls}")
    assert dist.label == "feature_distance" and dist.record["stand_in_for"] == "lpips"
    assert "not LPIPS" in dist.record["note"]
    a = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    b = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(dist(a, a), torch.zeros(5)) and dist(a, b).min() > 0
    # by hand: the four layers' unit-normalised squared differences, summed over channels, mean over positions
    net = dist.net.model
    xa, xb = a.float() / 127.5 - 1, b.float() / 127.5 - 1
    hand, ha, hb = torch.zeros(5), net.stem(xa), net.stem(xb)
    for k in range(4):
        if k:
            ha, hb = net.stages[k - 1](ha), net.stages[k - 1](hb)
        na, nb = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for h in (ha, hb))
        hand += (na - nb).pow(2).sum(1).mean((1, 2)) / 4
    torch.testing.assert_close(dist(a, b), hand.detach())
    run = Trainer(TrainConfig(preset="unet-tiny", cond="class", steps=2, batch_size=8, limit=64, sample_every=0,
                              progress=False, out=str(tmp_path / "run")), digits).fit()
    ex = load_extractor(f"classifier:{cls}")
    rows = sweep(ex, run, reference_features(ex, "digits", limit=300), ["ddim", "ddpm"], [3], [None], 40,
                 batch_size=20, reference="ddpm:3", distance=dist)
    by = {r["sampler"]: r for r in rows}
    assert by["ddpm"]["feature_distance"] == 0.0 and by["ddim"]["feature_distance"] > 0
    rec = by["ddim"]["result"]["record"]["distance"]
    assert rec["name"] == "classifier-feature-distance" and rec["to"]["sampler"] == "ddpm" and rec["to"]["steps"] == 3
    # a reference that is not one of the points is scored as the last row, the same as when it was one
    again = sweep(ex, run, reference_features(ex, "digits", limit=300), ["ddim"], [3], [None], 40, batch_size=20,
                  reference="ddpm:3", distance=dist)
    assert [(r["sampler"], r.get("reference", False)) for r in again] == [("ddim", False), ("ddpm", True)]
    assert again[1]["feature_distance"] == 0.0 and again[1]["fid"] == by["ddpm"]["fid"]
    assert again[0]["fid"] == by["ddim"]["fid"] and again[0]["feature_distance"] == by["ddim"]["feature_distance"]
