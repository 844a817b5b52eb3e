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

from kakusan.errors import CheckpointError, KakusanError
from kakusan.models import UNet, get_preset
from kakusan.checkpoints import load_denoiser
from kakusan.training.trainer import TrainConfig

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
        assert str(e)  # a message that names the problem
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
        assert str(e)
        return
    assert cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.lr > 0 and cfg.warmup_steps >= 0
    assert not (cfg.zero_terminal_snr and cfg.prediction == "eps")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
