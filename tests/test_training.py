import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kakusan.data import load_digits
from kakusan.errors import CheckpointError, ConfigError
from kakusan.checkpoints import load_denoiser
from kakusan.training import Trainer, TrainConfig
from kakusan.checkpoints import flatten_optimizer_state, resolve_checkpoint, unflatten_optimizer_state
from kakusan.training.trainer import batch_indices, lr_at

TINY = dict(preset="unet-tiny", batch_size=16, log_every=5, sample_every=1000, checkpoint_every=1000,
            sample_steps=4, progress=False, warmup_steps=5, lr=1e-3)


def _run(tmp_path, digits, name, **kw):
    cfg = TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})
    tr = Trainer(cfg, digits)
    return tr, tr.fit()


def test_training_writes_log_grid_and_checkpoint(tmp_path, digits):
    tr, ckpt = _run(tmp_path, digits, "run", steps=12, cond="class", sample_every=12)
    for f in ("config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"):
        assert (ckpt / f).is_file(), f
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 12]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in log)
    assert (tmp_path / "run" / "samples" / "step-00000012.png").is_file()
    # the model file alone carries the config: enough to sample
    den, config = load_denoiser(ckpt / "model.safetensors")
    assert config["model"]["num_classes"] == 10 and config["schedule"]["name"] == "cosine"
    x = torch.randn(2, 1, 8, 8)
    out = den(x, torch.tensor([500.0, 500.0]), torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_loss_goes_down_on_real_digits(tmp_path, digits):
    tr, _ = _run(tmp_path, digits, "learn", steps=120, log_every=20, prediction="eps", weighting="simple")
    log = [json.loads(line) for line in (tmp_path / "learn" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.75 * log[0]["loss"], [r["loss"] for r in log]


def test_rectified_flow_trains_and_samples_from_its_checkpoint(tmp_path, digits):
    """schedule 'flow' + prediction 'flow' (eps - x0): the loss falls, the checkpoint names both, and the loaded
    denoiser samples finite images from pure noise (alpha = 0 at the first level)."""
    from kakusan.samplers import sample
    from kakusan.schedules import ScheduleConfig, make_schedule

    _, ckpt = _run(tmp_path, digits, "flow", steps=60, log_every=10, schedule="flow", prediction="flow",
                   weighting="simple")
    log = [json.loads(line) for line in (tmp_path / "flow" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [r["loss"] for r in log]
    den, config = load_denoiser(ckpt / "model.safetensors")
    assert config["schedule"]["name"] == "flow" and config["diffusion"]["prediction"] == "flow"
    schedule = make_schedule(ScheduleConfig.from_dict(config["schedule"]))
    assert schedule.flow and schedule.alpha_sigma(999)[0].item() == 0
    x = sample(den, schedule, (4, 1, 8, 8), steps=6)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_resume_is_exact(tmp_path, digits):
    """12 steps straight == 6 steps, checkpoint, a fresh process-like Trainer resumed, 6 more (bitwise, CPU)."""
    kw = dict(steps=12, cond="class", model={"dropout": 0.1})
    _, full = _run(tmp_path, digits, "full", **kw)
    _run(tmp_path, digits, "split", **{**kw, "steps": 6})
    tr = Trainer(TrainConfig(out=str(tmp_path / "split"), **{**TINY, **kw}), digits)
    tr.resume()
    assert tr.step == 6
    tr.fit()
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / f), load_file(tmp_path / "split" / "checkpoints" / "step-00000012" / f)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f
    la = [json.loads(x)["loss"] for x in (full.parents[1] / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert la[-1] == lb[-1]


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, digits):
    """--gradient-checkpointing reaches the U-Net and changes memory only: 10 steps with dropout give the same
    losses and weights as without (to float round-off)."""
    kw = dict(steps=10, cond="class", model={"dropout": 0.1})
    plain, a = _run(tmp_path, digits, "plain", **kw)
    ckpt, b = _run(tmp_path, digits, "ckpt", gradient_checkpointing=True, **kw)
    assert ckpt.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ckpt" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C compiler")
def test_compiled_training_matches_eager(tmp_path, digits):
    """--compile runs the training forward through torch.compile: the same losses as eager (to the round-off of
    fused kernels), and checkpoints hold the plain module's weights (no '_orig_mod.' prefix)."""
    kw = dict(steps=3, log_every=1, model={"dropout": 0.0}, precision="fp32")  # bf16 round-off is another matter
    _, a = _run(tmp_path, digits, "eager", **kw)
    tr, b = _run(tmp_path, digits, "compiled", compile=True, **kw)
    assert tr.train_denoiser.backbone is not tr.model  # the compiled wrapper
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "eager" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "compiled" / "log.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-3)


def test_checkpoint_retention_and_latest(tmp_path, digits):
    _run(tmp_path, digits, "keep", steps=8, checkpoint_every=2, keep_checkpoints=2)
    root = tmp_path / "keep" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000006", "step-00000008"]
    _run(tmp_path, digits, "every", steps=10, checkpoint_every=1, keep_checkpoints=2, keep_every=4)
    kept = sorted(p.name for p in (tmp_path / "every" / "checkpoints").glob("step-*"))
    assert kept == ["step-00000004", "step-00000008", "step-00000009", "step-00000010"]
    assert (root / "latest").read_text().strip() == "step-00000008"
    assert resolve_checkpoint(tmp_path / "keep") == root / "step-00000008"
    assert not list(root.glob(".tmp-*"))


def test_bad_checkpoints(tmp_path, digits):
    with pytest.raises(CheckpointError, match="not found"):
        load_denoiser(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a kakusan checkpoint"):
        load_denoiser(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_denoiser(tmp_path / "junk.safetensors")
    _, ckpt = _run(tmp_path, digits, "ok", steps=2)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "format": 99, "kakusan_version": "9.0"}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_denoiser(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "channels": 32}}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_denoiser(ckpt)


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    t, meta = flatten_optimizer_state(opt.state_dict())
    back = unflatten_optimizer_state(t, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(back)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_nan_loss_is_skipped_or_stops(tmp_path, digits):
    tr = Trainer(TrainConfig(out=str(tmp_path / "nan"), steps=3, **TINY), digits)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.images[:] = float("nan")
    loss = tr.train_step()
    assert loss != loss and tr.skipped_steps == 1  # NaN, skipped
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    tr.cfg.nan_policy = "stop"
    with pytest.raises(Exception, match="stopping; the last good checkpoint"):
        tr.train_step()


def test_schedule_of_data_and_lr():
    a = batch_indices(10, 4, 0, seed=0).tolist() + batch_indices(10, 4, 1, seed=0).tolist()
    assert len(set(a[:8])) == 8  # no repeats within an epoch
    assert sorted(batch_indices(10, 10, 0, 0).tolist()) == list(range(10))
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=100, lr_decay="cosine")
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 99) == pytest.approx(0.1)


def test_lr_warm_up_slope_cosine_shape_and_constant_mode():
    """lr_at: a linear warm-up from lr / warmup_steps at step 0 to lr at step warmup_steps - 1, then constant, or
    a cosine from lr to 10% of it at the last step (multiplied by the warm-up while it lasts)."""
    const = TrainConfig(lr=2.0, warmup_steps=8, steps=50)
    assert [lr_at(const, k) for k in range(10)] == pytest.approx([2.0 * (k + 1) / 8 for k in range(8)] + [2.0, 2.0])
    assert all(lr_at(const, k) == 2.0 for k in range(8, 50)) and lr_at(const, 10_000) == 2.0
    assert lr_at(TrainConfig(lr=2.0, warmup_steps=0, steps=50), 0) == 2.0  # no warm-up: the full rate at once
    cos = TrainConfig(lr=2.0, warmup_steps=5, steps=101, lr_decay="cosine")  # frac = step / 100
    for k in (5, 25, 50, 75, 90, 100):
        assert lr_at(cos, k) == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 100)))), k
    assert lr_at(cos, 50) == pytest.approx(1.1) and lr_at(cos, 100) == pytest.approx(0.2)
    assert lr_at(cos, 2) == pytest.approx(2.0 * 3 / 5 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.02))))
    rates = [lr_at(cos, k) for k in range(5, 101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # decreasing after the warm-up
    assert lr_at(cos, 500) == pytest.approx(0.2)  # past the end: the floor


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(lr=0), "lr"),
    (dict(cond="image"), "cond"), (dict(text_max_length=1), "text_max_length"), (dict(prediction="score"), "prediction"),
    (dict(zero_terminal_snr=True, prediction="eps"), "zero-terminal-SNR"), (dict(precision="fp8"), "precision"),
    (dict(schedule="flow", prediction="eps"), "rectified flow needs prediction"),
    (dict(min_snr_gamma=0.0), "min_snr_gamma"), (dict(min_snr_gamma=-5.0), "min_snr_gamma"),  # were negative weights
])
def test_bad_train_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_class_conditioning_needs_labels(tmp_path, digits):
    ds = load_digits()
    ds.labels = None
    with pytest.raises(ConfigError, match="needs labels"):
        Trainer(TrainConfig(out=str(tmp_path / "x"), cond="class", **TINY), ds)
