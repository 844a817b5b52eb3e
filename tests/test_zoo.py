"""Shipped models by name, and `kakusan export` (one reduced-precision model file for sampling)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kakusan import zoo
from kakusan.checkpoints import export_model, read_config, resolve_checkpoint
from kakusan.cli import main
from kakusan.errors import CheckpointError, ConfigError
from kakusan.pipeline import Pipeline

TINY = Path(__file__).parent / "data" / "reference" / "tiny-class.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A shipped-models folder holding the tiny class model as 'tiny' (fp16)."""
    folder = tmp_path / "shipped"
    export_model(TINY, folder / "tiny.safetensors", dtype="fp16")
    entry = {"name": "tiny", "file": "tiny.safetensors", "sha256": _sha(folder / "tiny.safetensors"),
             "bytes": (folder / "tiny.safetensors").stat().st_size, "dtype": "fp16", "title": "the tiny test model",
             "example": "kakusan sample --checkpoint tiny", "scores": [{"summary": "none"}]}
    (folder / "index.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(zoo, "SHIPPED_DIR", folder)
    monkeypatch.setattr(zoo, "INDEX", folder / "index.json")
    zoo._index.cache_clear()
    yield folder
    zoo._index.cache_clear()


def test_export_halves_the_file_and_keeps_the_samples(tmp_path):
    fp32 = export_model(TINY, tmp_path / "fp32.safetensors")
    fp16 = export_model(TINY, tmp_path / "fp16.safetensors", dtype="fp16")
    with safe_open(str(fp16), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    # the weights dominate the file: fp16 is close to half of fp32
    assert 0.45 < fp16.stat().st_size / fp32.stat().st_size < 0.6
    config = read_config(fp16)
    assert config["export"]["dtype"] == "fp16" and config["export"]["weights"] == "ema"
    assert config["export"]["source_sha256"] == _sha(TINY)
    # the fp32 export samples bitwise as the source; fp16 differs by the weights' rounding only
    kw = dict(class_label=[0, 3, 7], steps=4, seed=1, device="cpu")
    src = Pipeline.load(TINY, device="cpu", precision="fp32")(**{k: v for k, v in kw.items() if k != "device"})
    same = Pipeline.load(fp32, device="cpu", precision="fp32")(**{k: v for k, v in kw.items() if k != "device"})
    half = Pipeline.load(fp16, device="cpu", precision="fp32")(**{k: v for k, v in kw.items() if k != "device"})
    assert torch.equal(src.images, same.images)
    diff = (src.images - half.images).abs().max().item()
    assert 0 < diff < 0.05


def test_export_refuses_a_bad_dtype(tmp_path):
    with pytest.raises(ConfigError, match="export dtype 'int8'"):
        export_model(TINY, tmp_path / "x.safetensors", dtype="int8")


def test_a_shipped_name_resolves_and_is_hash_checked(fake_zoo, tmp_path, monkeypatch):
    assert resolve_checkpoint("tiny") == fake_zoo / "tiny.safetensors"
    pipe = Pipeline.load("tiny", device="cpu")
    assert pipe.source == str(fake_zoo / "tiny.safetensors")
    out = pipe(class_label=[3], steps=2, seed=0)
    assert out.images.shape == (1, 1, 8, 8)
    # a path that exists wins over the name
    monkeypatch.chdir(tmp_path)
    export_model(TINY, tmp_path / "tiny" / "model.safetensors")
    with pytest.raises(CheckpointError):  # ./tiny is a folder without a config: the folder is read, not the name
        resolve_checkpoint("tiny")
    # an unknown name says which names exist
    with pytest.raises(CheckpointError, match=r"nor the name of a shipped model: tiny"):
        resolve_checkpoint("no-such-model")
    # a damaged file is refused, not sampled from
    path = fake_zoo / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    monkeypatch.chdir(fake_zoo.parent.parent)
    with pytest.raises(CheckpointError, match="damaged or replaced"):
        resolve_checkpoint("tiny")
    path.unlink()
    with pytest.raises(CheckpointError, match="missing from this installation"):
        resolve_checkpoint("tiny")


def test_models_lists_the_shipped_ones(fake_zoo, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "kakusan sample --checkpoint tiny" in out and "fp16" in out


def test_cli_export_and_sample_by_name(fake_zoo, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(TINY), "--out", str(tmp_path / "m.safetensors"), "--dtype", "bf16"]) == 0
    assert "bf16" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", "tiny", "--class", "4", "-n", "2", "--steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


# ---- the models that ship ------------------------------------------------------------------------------------

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_every_shipped_model_is_listed_small_and_intact():
    models = zoo.shipped_models()
    assert {m["name"] for m in models} >= {"mnist", "fashion-mnist", "emoji"}
    for m in models:
        path = zoo.shipped_file(m["name"])  # the sha256 is checked here
        assert path.stat().st_size == m["bytes"] < 6e6  # "a few MB each": the repository stays small
        config = read_config(path)
        assert config["export"]["weights"] == "ema" and config["export"]["dtype"] == m["dtype"]
        assert m["data"]["sha256"] and m["train"]["command"].startswith("kakusan train")
        assert m["scores"] and all(s["record"] for s in m["scores"])  # how each number was made


@pytest.mark.parametrize("name,classifier,at_least", [("mnist", "classifier-mnist", 0.9),
                                                      ("fashion-mnist", "classifier-fashion-mnist", 0.8)])
def test_a_shipped_class_model_draws_the_class_asked(name, classifier, at_least):
    from kakusan.metrics.features import load_extractor

    pipe = Pipeline.load(name, device="cpu")
    labels = [c for c in range(10) for _ in range(3)]
    out = pipe(class_label=labels, steps=10, guidance=2.0, seed=0)
    _, logits = load_extractor(f"classifier:{WEIGHTS / (classifier + '.safetensors')}")(out.uint8())
    agree = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert agree >= at_least, f"{name}: {agree:.0%} of 30 samples read as the class asked"


def test_the_shipped_text_model_follows_colour_words():
    pipe = Pipeline.load("emoji", device="cpu")
    out = pipe(prompt=["red heart"] * 4 + ["blue heart"] * 4, steps=10, guidance=3.0, seed=0)
    rgb = out.images.mean((2, 3))  # (8, 3) in [-1, 1]
    red, blue = rgb[:4], rgb[4:]
    # red hearts are redder than blue (red minus blue channel), blue hearts bluer, by a clear margin
    assert (red[:, 0] - red[:, 2]).mean() - (blue[:, 0] - blue[:, 2]).mean() > 0.2


def test_serve_with_no_checkpoint_offers_the_shipped_models(fake_zoo, tmp_path, monkeypatch):
    from kakusan.serve import ModelPool, default_checkpoints

    monkeypatch.chdir(tmp_path)
    assert default_checkpoints() == ["tiny"]
    assert list(ModelPool(default_checkpoints()).info) == ["tiny"]
    (fake_zoo / "index.json").write_text(json.dumps({"models": []}))
    zoo._index.cache_clear()
    with pytest.raises(CheckpointError, match="no --checkpoint given, no model at runs/demo"):
        default_checkpoints()
