"""Fine-tuning from a trained checkpoint: full fine-tuning and LoRA adapters (peft), their checkpoints, the
adapter file, applying it to the base, exact resume and the mistakes that are refused."""

import json

import pytest
import torch
from conftest import assert_resume_exact
from safetensors.torch import load_file

pytest.importorskip("peft")

from kakusan.cli import main  # noqa: E402
from kakusan.errors import CheckpointError, ConfigError  # noqa: E402
from kakusan.models import DiT, UNet, get_preset  # noqa: E402
from kakusan.checkpoints import apply_checkpoint_lora, load_denoiser  # noqa: E402
from kakusan.training import Trainer, TrainConfig  # noqa: E402
from kakusan.checkpoints import resolve_checkpoint  # noqa: E402
from kakusan.lora import add_lora, target_layers  # noqa: E402

TINY = dict(preset="unet-tiny", batch_size=16, log_every=5, sample_every=1000, checkpoint_every=1000,
            sample_steps=4, progress=False, warmup_steps=5, lr=1e-3, cond="class")


@pytest.fixture(scope="module")
def base(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("base") / "run"
    return Trainer(TrainConfig(out=str(out), steps=20, schedule="linear", prediction="eps", **TINY), digits).fit()


def _probe(den):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return den(x, torch.tensor([50.0, 300.0, 600.0, 950.0]), torch.tensor([0, 3, 7, 10]))


def test_lora_starts_at_the_base_and_trains_only_the_adapters(tmp_path, digits, base):
    tr = Trainer(TrainConfig(out=str(tmp_path / "lora"), steps=15, init_from=str(base), lora_rank=4,
                             lora_targets="all", **{**TINY, "lr": 1e-2}), digits)
    # the run takes the base's diffusion, whatever its own flags said
    assert tr.config["schedule"]["name"] == "linear" and tr.config["diffusion"]["prediction"] == "eps"
    base_den, _ = load_denoiser(base, precision="fp32")
    assert torch.equal(_probe(tr.denoiser), _probe(base_den))  # adapters start at zero
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ckpt = tr.fit()
    base_w = load_file(base / "ema.safetensors")
    run_w = load_file(ckpt / "model.safetensors")
    for k, v in base_w.items():  # every base weight frozen, bitwise
        key = k if k in run_w else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(run_w[key], v), k
    adapter = load_file(ckpt / "lora.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # it learned
    assert sum(v.numel() for v in adapter.values()) < 0.5 * sum(v.numel() for v in base_w.values())

    # the run's checkpoint (adapters merged) == the base + its adapter file; and differs from the base
    run_den, config = load_denoiser(ckpt, precision="fp32")
    assert config["lora"]["rank"] == 4 and config["init_from"]["sha256"]
    assert isinstance(run_den.backbone, UNet) and not any(".lora_" in k for k in run_den.backbone.state_dict())
    applied = apply_checkpoint_lora(load_denoiser(base, precision="fp32")[0], base, ckpt / "lora.safetensors")
    assert torch.allclose(_probe(run_den), _probe(applied), atol=1e-5)
    assert (_probe(run_den) - _probe(base_den)).abs().max() > 1e-3
    # strength 0 is the base, strength 0.5 lies between
    zero = apply_checkpoint_lora(load_denoiser(base, precision="fp32")[0], base, ckpt / "lora.safetensors", scale=0.0)
    assert torch.allclose(_probe(zero), _probe(base_den), atol=1e-6)
    half = apply_checkpoint_lora(load_denoiser(base, precision="fp32")[0], base, ckpt / "lora.safetensors", scale=0.5)
    mid = (_probe(run_den) + _probe(base_den)) / 2  # the adapter's delta is linear in its scale (per layer)
    full = (_probe(run_den) - _probe(base_den)).abs().max()
    assert (_probe(half) - mid).abs().max() < 0.25 * full < (_probe(half) - _probe(run_den)).abs().max()


def test_lora_resume_is_exact(tmp_path, digits, base):
    assert_resume_exact(tmp_path, digits, 10, ("model.safetensors", "ema.safetensors", "lora.safetensors"),
                        init_from=str(base), lora_rank=2, **TINY)


def test_full_fine_tuning_starts_from_the_base_weights(tmp_path, digits, base):
    tr = Trainer(TrainConfig(out=str(tmp_path / "ft"), steps=5, init_from=str(base), **TINY), digits)
    assert torch.equal(_probe(tr.denoiser), _probe(load_denoiser(base, precision="fp32")[0]))
    ckpt = tr.fit()
    config = json.loads((ckpt / "config.json").read_text())
    assert config["init_from"]["path"] == str(base) and "lora" not in config
    assert (_probe(load_denoiser(ckpt, precision="fp32")[0]) - _probe(load_denoiser(base, precision="fp32")[0])).abs().max() > 0


def test_fine_tuning_mistakes_are_named(tmp_path, digits, base):
    with pytest.raises(ConfigError, match="--init-from"):
        TrainConfig(lora_rank=4)
    with pytest.raises(ConfigError, match="lora_targets"):
        TrainConfig(init_from=str(base), lora_rank=4, lora_targets="mlp")
    run = lambda **kw: Trainer(TrainConfig(out=str(tmp_path / "x"), steps=2,  # noqa: E731
                                           **{**TINY, "init_from": str(base), **kw}), digits)
    with pytest.raises(ConfigError, match="class-conditional; fine-tune it with --cond class"):
        run(cond="none")
    with pytest.raises(ConfigError, match="--model overrides the architecture"):
        run(model={"channels": 32})
    with pytest.raises(ConfigError, match="8x8 inputs"):
        Trainer(TrainConfig(out=str(tmp_path / "y"), steps=2, image_size=16, **{**TINY, "init_from": str(base)}))
    with pytest.raises(ConfigError, match="pixel-space model"):
        run(autoencoder=str(tmp_path / "nowhere"))
    # a LoRA run is no base; an adapter is refused on another base
    lora_ckpt = Trainer(TrainConfig(out=str(tmp_path / "l"), steps=2, init_from=str(base), lora_rank=2, **TINY),
                        digits).fit()
    with pytest.raises(CheckpointError, match="a LoRA run"):
        run(init_from=str(lora_ckpt))
    other = Trainer(TrainConfig(out=str(tmp_path / "other"), steps=3, seed=5, **TINY), digits).fit()
    with pytest.raises(CheckpointError, match="another base model"):
        apply_checkpoint_lora(load_denoiser(other)[0], other, lora_ckpt / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not a LoRA file kakusan reads"):
        apply_checkpoint_lora(load_denoiser(base, precision="fp32")[0], base, base / "ema.safetensors")
    with pytest.raises(ConfigError, match="no attention layers"):
        target_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 1, 3)), "attention")


def test_lora_targets_cover_attention_of_both_backbones():
    unet = target_layers(UNet(get_preset("unet-tiny")), "attention")
    assert unet and all(n.endswith((".qkv", ".proj")) for n in unet)
    dit = DiT(get_preset("dit-tiny", context_dim=8))
    names = target_layers(dit, "attention")
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.cross_attn.q", "blocks.0.cross_attn.kv",
            "blocks.0.cross_attn.out"} <= set(names) and not any("mlp" in n for n in names)
    add_lora(dit, 2, targets="attention")
    assert all(".lora_" in n for n, p in dit.named_parameters() if p.requires_grad)


def test_lora_through_the_cli(tmp_path, base, capsys):
    run = tmp_path / "cli-lora"
    assert main(["train", "--data", "digits", "--limit", "200", "--init-from", str(base), "--lora-rank", "2",
                 "--cond", "class", "--steps", "4", "--batch-size", "8", "--log-every", "2", "--sample-every", "100",
                 "--out", str(run)]) == 0
    adapter = resolve_checkpoint(run) / "lora.safetensors"
    assert adapter.is_file()
    grid = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(base), "--lora", str(adapter), "--lora-scale", "0.8", "-n", "2",
                 "--steps", "2", "--out", str(grid)]) == 0 and grid.is_file()
    assert main(["sample", "--checkpoint", str(base), "--lora-scale", "0.5", "-n", "2", "--steps", "2"]) == 2
    assert "--lora-scale needs --lora" in capsys.readouterr().err
