"""Faults a real run meets: a SIGKILL mid-training, a kill during a checkpoint write, crafted files, and the
whole configuration space (property-based)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import check_built_and_refusals, names_fields
from kakusan.checkpoints import load_denoiser
from kakusan.errors import CheckpointError, ConfigError, KakusanError
from kakusan.models import UNet, UNetConfig, get_preset
from kakusan.training.trainer import TrainConfig, lr_at

TRAIN = ["train", "--preset", "unet-tiny", "--cond", "class", "--steps", "150", "--batch-size", "16",
         "--limit", "256", "--checkpoint-every", "10", "--sample-every", "100000", "--log-every", "10",
         "--seed", "3", "--model", '{"dropout": 0.1}']


def _cli(*args):
    return [sys.executable, "-m", "kakusan.cli", *map(str, args)]


def _latest_step(run):
    latest = run / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A run killed with SIGKILL at an arbitrary step and resumed ends with the same weights, EMA, optimizer
    state and logged losses as an uninterrupted run (bitwise, CPU)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert subprocess.run(_cli(*TRAIN, "--out", full), capture_output=True, timeout=600).returncode == 0
    p = subprocess.Popen(_cli(*TRAIN, "--out", cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_step(cut) < 40 and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.13)  # land somewhere between checkpoints
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _latest_step(cut)
    assert 40 <= killed_at < 150
    r = subprocess.run(_cli(*TRAIN, "--out", cut, "--resume"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resumed at step {killed_at}" in r.stderr, r.stderr
    a, b = full / "checkpoints" / "step-00000150", cut / "checkpoints" / "step-00000150"
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(a / f), load_file(b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert sa["generator"] == sb["generator"] and sa["torch_rng"] == sb["torch_rng"]
    # every logged loss of the interrupted run (including steps logged twice around the kill) is the same
    ref = {r["step"]: (r["loss"], r["lr"]) for r in _log(full)}
    for rec in _log(cut):
        assert (rec["loss"], rec["lr"]) == ref[rec["step"]], rec["step"]


KILL_DURING_WRITE = textwrap.dedent("""
    import os, sys, time
    import kakusan.checkpoints as ck
    from kakusan.training import Trainer, TrainConfig
    tr = Trainer(TrainConfig(preset="unet-tiny", steps=4, batch_size=8, limit=64, out=sys.argv[1],
                             sample_every=1000, checkpoint_every=1000, progress=False))
    tr.train_step(); tr.save()                      # a good checkpoint at step 1
    real = ck._save_tensors
    def slow(path, *a, **k):                         # the second write stalls after its first file
        real(path, *a, **k)
        print("WRITING", flush=True); time.sleep(60)
    ck._save_tensors = slow
    tr.train_step(); tr.save()
""")


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", KILL_DURING_WRITE, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "WRITING"
    p.send_signal(signal.SIGKILL)
    p.wait()
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert list(root.glob(".tmp-step-00000002-*"))  # the half-written one never took the final name
    den, config = load_denoiser(run)  # the previous checkpoint loads
    assert config["train"]["steps"] == 4 and isinstance(den.backbone, UNet)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("name", ["model.safetensors", "evil.pt"])
def test_a_crafted_pickle_is_refused_as_a_checkpoint(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / name
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_denoiser(evil)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_denoiser(folder)
    assert not (tmp_path / "pwned").exists()


def test_same_seed_same_samples_bitwise(tmp_path):
    run = tmp_path / "r"
    assert subprocess.run(_cli(*TRAIN[:6], "4", *TRAIN[7:], "--out", run), capture_output=True).returncode == 0
    outs = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        r = subprocess.run(_cli("sample", "--checkpoint", run, "-n", "4", "--steps", "5", "--seed", "11",
                                "--sampler", "dpmpp-2m-sde", "--out", "", "--out-dir", d), capture_output=True)
        assert r.returncode == 0, r.stderr
        outs.append([p.read_bytes() for p in sorted(d.glob("*.png"))])
    assert outs[0] == outs[1] and len(outs[0]) == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_size=st.integers(1, 24), channels=st.sampled_from([1, 3, 8, 12]),
       mults=st.lists(st.integers(0, 3), min_size=0, max_size=4), blocks=st.integers(-1, 2),
       groups=st.sampled_from([1, 4, 8, 16]), dropout=st.floats(-0.5, 1.5),
       attn=st.lists(st.sampled_from([1, 2, 4, 8, 16]), max_size=2), num_classes=st.integers(-1, 3),
       tc=st.sampled_from(["add", "scale-shift", "film"]))
def test_any_unet_config_builds_and_runs_or_says_why(image_size, channels, mults, blocks, groups, dropout, attn,
                                                     num_classes, tc):
    try:
        cfg = get_preset("unet-tiny", image_size=image_size, channels=channels, channel_mults=tuple(mults),
                         num_res_blocks=blocks, norm_groups=groups, dropout=dropout,
                         attention_resolutions=tuple(attn), num_classes=num_classes, time_conditioning=tc)
    except KakusanError as e:
        assert any(names_fields(str(e), [f]) for f in UNetConfig.__dataclass_fields__), e
        return
    m = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, image_size, image_size)
    labels = torch.tensor([0, num_classes]) if num_classes else None
    assert m(x, torch.tensor([0.0, 999.0]), labels).shape == x.shape


@settings(max_examples=80, deadline=None)
@given(steps=st.integers(-2, 3), batch_size=st.integers(-1, 3), lr=st.one_of(st.floats(-1, 1), st.just(float("nan"))),
       prediction=st.sampled_from(["eps", "x0", "v", "score"]), weighting=st.sampled_from(["simple", "min-snr", "p2"]),
       zts=st.booleans(), cond=st.sampled_from(["none", "class", "text"]), dropout=st.floats(-0.5, 1.5),
       nan_policy=st.sampled_from(["skip", "stop", "ignore"]), warmup=st.integers(-5, 5))
def test_any_train_config_is_valid_or_refused_with_a_reason(steps, batch_size, lr, prediction, weighting, zts,
                                                            cond, dropout, nan_policy, warmup):
    try:
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, prediction=prediction, weighting=weighting,
                          zero_terminal_snr=zts, cond=cond, label_dropout=dropout, nan_policy=nan_policy,
                          warmup_steps=warmup)
    except KakusanError as e:
        assert any(names_fields(str(e), [f]) for f in TrainConfig.__dataclass_fields__), e
        return
    assert cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.lr > 0 and cfg.warmup_steps >= 0
    assert not (cfg.zero_terminal_snr and cfg.prediction == "eps")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---- the configuration spaces, drawn valid: every example builds, and every single-field break of it is refused ----

PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def unet_cases(draw, cond, several_heads):
    """A valid U-Net configuration of conditioning ``cond`` with one attention head or several (the size divisible
    by the total downsampling, every width by the groups and the head size, attention for a text model) and its
    single-field breaks, each with the field(s) its refusal must name."""
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = max(groups * draw(st.integers(1, 3)), 2 if several_heads else 1)
    size = 2 ** (levels - 1) * draw(st.integers(1, 3))
    resolutions = [size // 2**i for i in range(levels)]
    attn = draw(st.lists(st.sampled_from(resolutions), max_size=2, unique=True)) or (
        [resolutions[-1]] if cond == "text" else [])
    mults = tuple(draw(st.lists(st.integers(1, 3), min_size=levels, max_size=levels)))
    kw = dict(image_size=size, in_channels=draw(st.integers(1, 3)), out_channels=draw(st.integers(1, 3)),
              channels=channels, channel_mults=mults, num_res_blocks=draw(st.integers(1, 2)),
              attention_resolutions=tuple(attn),
              attention_head_dim=draw(st.sampled_from([d for d in (1, 2, 4) if channels % d == 0 and d < channels]))
              if several_heads else None,
              dropout=draw(st.floats(0.0, 0.9)), norm_groups=groups,
              time_conditioning=draw(st.sampled_from(["add", "scale-shift"])),
              num_classes=draw(st.integers(1, 3)) if cond == "class" else 0,
              context_dim=draw(st.sampled_from([4, 6])) if cond == "text" else 0,
              transformer_depth=draw(st.integers(1, 2)),
              downsample_padding=draw(st.sampled_from(["symmetric", "bottom-right"])))
    breaks = [({"image_size": 0}, ["image_size"]), ({"in_channels": 0}, ["in_channels"]),
              ({"out_channels": -1}, ["out_channels"]), ({"channels": 0}, ["channels"]),
              ({"channel_mults": mults[:-1] + (0,)}, ["channel_mults"]), ({"channel_mults": ()}, ["channel_mults"]),
              ({"num_res_blocks": 0}, ["num_res_blocks"]), ({"norm_groups": 0}, ["norm_groups"]),
              ({"norm_groups": channels + 1}, ["norm_groups"]), ({"attention_head_dim": 0}, ["attention_head_dim"]),
              ({"attention_head_dim": channels + 1}, ["attention_head_dim"]),
              ({"dropout": draw(st.sampled_from([-0.1, 1.0, 1.5]))}, ["dropout"]),
              ({"time_conditioning": "film"}, ["time_conditioning"]),
              ({"downsample_padding": "same"}, ["downsample_padding"]),
              ({"num_classes": -1, "context_dim": 0}, ["num_classes"]),
              ({"context_dim": -2, "num_classes": 0}, ["context_dim"]),
              ({"transformer_depth": 0}, ["transformer_depth"]),
              ({"num_classes": 2, "context_dim": 4}, ["num_classes", "context_dim"]),
              ({"num_classes": 0, "context_dim": 4, "attention_resolutions": ()}, ["attention_resolutions"])]
    if levels > 1:
        breaks.append(({"image_size": size + 1}, ["image_size"]))
    return kw, breaks


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _condition(cfg, n=2):
    from kakusan.conditioning import TextCond

    if cfg.num_classes:
        return torch.tensor([0, cfg.num_classes])[:n]  # a label and the null label
    if cfg.context_dim:
        return TextCond(torch.randn(n, 3, cfg.context_dim), torch.tensor([[True, True, False], [True] * 3])[:n])
    return None


@pytest.mark.parametrize("several_heads", [False, True])
@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_unet_configurations_build_run_round_trip_and_refusals_name_the_field(cond, several_heads):
    """14 valid U-Net configurations of each conditioning and head count (1-3 levels, sizes up to 12, both time
    conditionings and paddings) each build, run (randomised: a finite, non-zero output of the right shape) and
    survive a checkpoint record's JSON round trip; each of its ~20 single-field breaks is refused with a
    ConfigError that names the field. (Hypothesis's draws depend on the modules loaded, so the kinds that must be
    met are parameters, not hopes; one thread: these networks are too small to share.)"""
    built, refused = [], set()

    @settings(max_examples=14, **PROPERTY_SETTINGS)
    @given(case=unet_cases(cond, several_heads))
    def check(case):
        kw, breaks = case
        cfg = UNetConfig(**kw)
        m = _randomise(UNet(cfg)).eval()
        check_built_and_refusals(m, cfg, _condition(cfg), UNetConfig, kw, breaks, refused)
        built.append(cfg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check()
    finally:
        torch.set_num_threads(threads)
    assert len(built) >= 12 and len(refused) >= 19, (len(built), sorted(refused))  # every break of a 1-level U-Net
    assert all((c.attention_head_dim is not None) == several_heads for c in built)
    assert all(bool(c.context_dim) == (cond == "text") and bool(c.num_classes) == (cond == "class") for c in built)


@st.composite
def train_cases(draw):
    """A valid TrainConfig (prediction 'eps' only where alpha never reaches 0; LoRA and distillation only with
    init_from; distill_guidance only for a conditional distillation) and its breaks, each with the field(s) its
    refusal must name."""
    schedule = draw(st.sampled_from(["cosine", "linear", "flow"]))
    zts = schedule != "flow" and draw(st.booleans())
    cond = draw(st.sampled_from(["none", "class", "text"]))
    init = draw(st.sampled_from([None, "runs/base"]))
    distill = init is not None and draw(st.booleans())
    kw = dict(schedule=schedule, zero_terminal_snr=zts,
              prediction=draw(st.sampled_from(["v", "x0", "flow"] + ([] if zts or schedule == "flow" else ["eps"]))),
              weighting=draw(st.sampled_from(["simple", "min-snr"])), min_snr_gamma=draw(st.floats(0.5, 10.0)),
              steps=draw(st.integers(1, 5000)), batch_size=draw(st.integers(1, 256)), lr=draw(st.floats(1e-6, 1.0)),
              warmup_steps=draw(st.integers(0, 100)), lr_decay=draw(st.sampled_from(["constant", "cosine"])),
              cond=cond, label_dropout=draw(st.floats(0.0, 0.99)), nan_policy=draw(st.sampled_from(["skip", "stop"])),
              precision=draw(st.sampled_from(["auto", "fp32", "bf16"])), text_max_length=draw(st.integers(2, 77)),
              init_from=init, lora_rank=draw(st.integers(0, 4)) if init else 0, distill=distill,
              distill_guidance=draw(st.sampled_from([None, 2.0])) if distill and cond != "none" else None,
              distill_points=draw(st.integers(1, 1000)), lora_targets=draw(st.sampled_from(["attention", "all"])),
              latent_mode=draw(st.sampled_from(["mean", "sample"])), hflip=draw(st.booleans()))
    no_init = {"init_from": None, "lora_rank": 0, "distill": False, "distill_guidance": None}
    breaks = [({"steps": 0}, ["steps"]), ({"steps": 2.5}, ["steps"]), ({"batch_size": -1}, ["batch_size"]),
              ({"log_every": 0}, ["log_every"]), ({"checkpoint_every": 0}, ["checkpoint_every"]),
              ({"num_timesteps": 0}, ["num_timesteps"]), ({"lr": 0.0}, ["lr"]), ({"lr": float("nan")}, ["lr"]),
              ({"warmup_steps": -1}, ["warmup_steps"]), ({"cond": "image"}, ["cond"]),
              ({"text_max_length": 1}, ["text_max_length"]),
              ({"label_dropout": draw(st.sampled_from([-0.1, 1.0]))}, ["label_dropout"]),
              ({"precision": "fp8"}, ["precision"]), ({"nan_policy": "ignore"}, ["nan_policy"]),
              ({"latent_mode": "random"}, ["latent_mode"]), ({"lr_decay": "linear"}, ["lr_decay"]),
              ({"prediction": "score"}, ["prediction"]), ({"weighting": "p2"}, ["weighting"]),
              ({"min_snr_gamma": 0.0}, ["min_snr_gamma"]),
              ({"schedule": "linear", "zero_terminal_snr": True, "prediction": "eps"}, ["prediction"]),
              ({"schedule": "flow", "zero_terminal_snr": False, "prediction": "eps"}, ["prediction"]),
              ({"lora_rank": -1}, ["lora_rank"]), ({**no_init, "lora_rank": 2}, ["init_from"]),
              ({**no_init, "distill": True}, ["init_from"]), ({"distill": False, "distill_guidance": 2.0},
                                                               ["distill_guidance"]),
              ({"lora_alpha": -1.0}, ["lora_alpha"]), ({"distill_points": 0}, ["distill_points"]),
              ({"huber_c": -1.0}, ["huber_c"]), ({"lora_targets": "mlp"}, ["lora_targets"]),
              ({"autoencoder": "ae", "hflip": True}, ["hflip", "autoencoder"])]
    return kw, breaks


def test_train_configurations_round_trip_and_refusals_name_the_field():
    """100 valid training configurations pass validation, survive the JSON round trip of a checkpoint's config and
    give a learning rate in (0, lr] at every step; each of its 30 breaks is refused with a ConfigError naming the
    field."""
    built, refused = [], set()

    @settings(max_examples=100, **PROPERTY_SETTINGS)
    @given(case=train_cases())
    def check(case):
        kw, breaks = case
        cfg = TrainConfig(**kw)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert all(0 < lr_at(cfg, k) <= cfg.lr for k in (0, cfg.warmup_steps, cfg.steps // 2, cfg.steps - 1))
        built.append(cfg)
        for i, (override, fields) in enumerate(breaks):
            with pytest.raises(ConfigError) as e:
                TrainConfig(**{**kw, **override})
            assert names_fields(str(e.value), fields), (override, str(e.value))
            refused.add(i)

    check()
    assert len(built) >= 75 and len(refused) == 30, (len(built), sorted(refused))
    assert any(c.distill for c in built) and any(c.lora_rank for c in built)
    assert {c.prediction for c in built} == {"eps", "v", "x0", "flow"} and any(c.zero_terminal_snr for c in built)
