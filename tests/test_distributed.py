"""`kakusan train` under torchrun (2 CPU processes, gloo) follows the single-process run with the same global
batch, writes one log and one checkpoint series, and resumes."""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ARGS = ["train", "--preset", "unet-tiny", "--cond", "class", "--steps", "6", "--batch-size", "8", "--limit", "64",
        "--model", '{"dropout": 0.0}', "--log-every", "1", "--sample-every", "100", "--checkpoint-every", "3",
        "--hflip"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)


def _torchrun(*args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kakusan.cli", *args])


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = _run([sys.executable, "-m", "kakusan.cli", *ARGS, "--out", one])
    assert r.returncode == 0, r.stderr
    r = _torchrun(*ARGS, "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("checkpoint:") == 1  # rank 0 alone reports, logs and saves
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4)
    assert json.loads((two / "log.jsonl").read_text().splitlines()[0])["processes"] == 2
    wa, wb = (load_file(str(p / "checkpoints" / "step-00000006" / "ema.safetensors")) for p in (one, two))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    # resume on two processes from step 6 to 9, against the single process doing the same
    for run, launch in ((one, lambda *a: _run([sys.executable, "-m", "kakusan.cli", *a])), (two, _torchrun)):
        r = launch(*[("9" if v == "6" else v) for v in ARGS], "--out", run, "--resume")
        assert r.returncode == 0 and "resumed at step 6" in r.stderr, r.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 9
    for x, y in zip(a[6:], b[6:]):
        assert y == pytest.approx(x, rel=1e-4)


def test_global_batch_must_divide_over_the_processes(monkeypatch, tmp_path):
    from kakusan.errors import ConfigError
    from kakusan.training.trainer import TrainConfig, Trainer

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="global batch and must divide evenly over 3 processes"):
        Trainer(TrainConfig(preset="unet-tiny", batch_size=8, out=str(tmp_path)))
