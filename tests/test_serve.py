"""``kakusan serve``: the page's functions through gradio_client against a real server on a free loopback port
(generate, img2img, inpaint, restore, bad and over-size uploads, over-cap values, a path as the model), a bounded
load test, the non-loopback warning, and a real headless Chromium clicking through the page
(tests/test_serve_browser.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "reference" / "tiny-class.safetensors"  # class-conditional, 8x8 digits
ARTIFACTS = Path(os.environ.get("KAKUSAN_TEST_ARTIFACTS", ROOT / "runs" / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(*flags: str, host: str = "127.0.0.1"):
    """A ``kakusan serve`` process on a free port of ``host``; yields (url, process)."""
    pytest.importorskip("gradio")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "kakusan.cli", "serve", "--checkpoint", str(TINY), "--host", host,
                             "--port", str(port), "--device", "cpu", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"kakusan serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("kakusan serve did not answer within 90 s")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


CAPS = ("--max-n", "4", "--max-steps", "40", "--max-upload-mb", "0.05", "--max-upload-pixels", "65536",
        "--queue-size", "8", "--preview-every", "2")


@pytest.fixture(scope="module")
def server():
    with served(*CAPS) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def client(server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(server[0], verbose=False)


def settings(**kw) -> list:
    """The generate endpoint's inputs in order (model, lora, lora scale, prompt, negative prompt, class,
    negative class, sampler, steps, guidance, guide model, seed, n)."""
    s = dict(model="tiny-class", lora="none", lora_scale=1.0, prompt="", negative_prompt="", class_label=3,
             negative_class=-1, sampler="ddim", steps=8, guidance=2.0, guide="none", seed=7, n=2)
    s.update(kw)
    return list(s.values())


def png_record(path) -> dict:
    from kakusan.pipeline import read_png_record

    return read_png_record(path)


def pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def direct(**kw) -> torch.Tensor:
    """The same images from kakusan.Pipeline in this process, as uint8 (N, 8, 8)."""
    from kakusan.pipeline import Pipeline

    gen = Pipeline.load(TINY, device="cpu")(**kw)
    return gen.uint8()[:, 0]


def app_error(e: BaseException) -> str:
    return str(e)


def digit_png(tmp_path: Path, name="digit.png", size=8) -> Path:
    """A real digit (scikit-learn's 8x8 '4'), enlarged to ``size``, as a PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    arr = (d.images[4] * (255 / 16)).astype(np.uint8)
    p = tmp_path / name
    Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST).save(p)
    return p


# ---------------------------------------------------------------------------------------------------------------
# (a) the page's functions through gradio_client


def test_generate_matches_the_pipeline_and_records_the_settings(client):
    job = client.submit(*settings(), api_name="/generate")
    preview, progress, results, files, _history = job.result(timeout=120)
    assert len(files) == 2
    for i, f in enumerate(files):
        rec = png_record(f)
        assert (rec["seed"], rec["steps"], rec["sampler"], rec["class_label"], rec["guidance"], rec["n"],
                rec["index"]) == (7, 8, "ddim", 3, 2.0, 2, i)
        assert pixels(f).std() > 20  # a drawn digit, not a flat image
    got = np.stack([pixels(f) for f in files])
    want = direct(class_label=3, n=2, steps=8, seed=7, guidance=2.0, sampler="ddim", batch_size=2).numpy()
    assert np.array_equal(got, want)  # the page is the pipeline: the same pixels, bit for bit
    # streamed progress: every step counted out of 8, a live x0 preview among the updates
    states = [o[1] for o in job.outputs() if isinstance(o[1], str)]
    assert any('data-total="8"' in s and 'data-done="8"' in s for s in states)
    assert [f'data-done="{d}"' in " ".join(states) for d in (2, 4, 6)] == [True] * 3  # --preview-every 2
    previews = [o[0] for o in job.outputs() if isinstance(o[0], str) and o[0]]
    assert previews and max(pixels(previews[-1]).shape) >= 256  # enlarged for the eye
    assert 'data-done="8" data-total="8"' in progress


def test_restore_from_a_dropped_png(client):
    files = client.predict(*settings(seed=123, steps=5, class_label=6, n=1), api_name="/generate")[3]
    from gradio_client import handle_file

    out = client.predict(handle_file(files[0]), api_name="/restore")
    model, prompt, neg_prompt, cls, neg_cls, sampler, steps, guidance, guide, seed, n, msg = out
    assert (model, cls, sampler, steps, guidance, guide, seed, n) == ("tiny-class", 6, "ddim", 5, 2.0, "none", 123, 1)
    assert "seed 123" in msg and "tiny-class" in msg
    seeds = {client.predict(api_name="/random_seed") for _ in range(3)}  # the "random" button
    assert all(isinstance(v, int) and 0 <= v < 2**31 for v in seeds) and len(seeds) > 1


def test_img2img_and_inpaint(client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    src = digit_png(tmp_path, size=64)
    job = client.submit(*settings(n=1, steps=10), handle_file(str(src)), 0.5, api_name="/img2img")
    files = job.result(timeout=120)[3]
    rec = png_record(files[0])
    assert rec["strength"] == 0.5 and "tensor_sha256" in rec["init_image"] and rec["steps"] == 10
    assert any('data-total="5"' in o[1] for o in job.outputs() if isinstance(o[1], str))  # strength 0.5 of 10
    assert pixels(files[0]).std() > 20

    # inpaint: a painted layer over the lower half (transparent elsewhere): the upper half is kept exactly
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[32:, :, 0], layer[32:, :, 3] = 255, 255
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    edited = {"background": handle_file(str(src)), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": None, "id": None}
    files = client.predict(*settings(n=1, steps=6), edited, "drawn", api_name="/inpaint")[3]
    rec = png_record(files[0])
    assert "tensor_sha256" in rec["mask"] and rec["strength"] == 1.0
    out, original = pixels(files[0]), pixels(src)
    from kakusan.serve.service import image_tensor

    with Image.open(src) as im:
        known = image_tensor(im, 1, 8)[0, 0].numpy()
    assert np.array_equal(out[:4], known[:4])  # kept where nothing was painted
    assert not np.array_equal(out[4:], known[4:])  # repainted below
    assert original.shape == (64, 64)


def test_bad_uploads_and_over_cap_values_are_refused_and_the_server_goes_on(client, server, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG\n" * 10)
    with pytest.raises(Exception) as e:
        client.predict(*settings(n=1), handle_file(str(bad)), 0.5, api_name="/img2img")
    assert "not a readable image" in app_error(e.value)

    bomb = tmp_path / "wide.png"  # 300 x 300 = 90,000 pixels > the 65,536 cap, a few hundred bytes
    Image.new("L", (300, 300), 0).save(bomb)
    assert bomb.stat().st_size < 5000
    with pytest.raises(Exception) as e:
        client.predict(*settings(n=1), handle_file(str(bomb)), 0.5, api_name="/img2img")
    assert "90,000 pixels" in app_error(e.value) and "--max-upload-pixels" in app_error(e.value)

    big = tmp_path / "big.png"  # 200 x 200 of noise: about 120 KB, over the 0.05 MB cap
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 0.05 * 2**20
    with pytest.raises(Exception) as e:
        client.predict(*settings(n=1), handle_file(str(big)), 0.5, api_name="/img2img")
    assert "size" in app_error(e.value).lower() or "large" in app_error(e.value).lower() or \
        "MB" in app_error(e.value)

    for field, value, cap in (("steps", 1000, 40), ("n", 50, 4), ("seed", -1, None)):
        with pytest.raises(Exception) as e:  # the page's sliders carry the server's caps
            client.predict(*settings(**{field: value}), api_name="/generate")
        msg = app_error(e.value)
        assert (f"greater than maximum value {cap}" if cap else "less than minimum value 0") in msg, msg

    # the browser may name only the served models: a path (even of the served checkpoint) is refused
    for name in (str(TINY), "/etc/passwd", "../tiny-class"):
        with pytest.raises(Exception) as e:
            client.predict(*settings(model=name), api_name="/generate")
        assert "tiny-class" in app_error(e.value) or "not in" in app_error(e.value).lower()

    assert server[1].poll() is None  # still serving, and still right
    files = client.predict(*settings(n=1, steps=4, seed=1), api_name="/generate")[3]
    assert png_record(files[0])["seed"] == 1


def test_the_service_refuses_a_path_for_a_model(tmp_path):
    """The check behind the page (Gradio's own choice check aside): only the names the server gave."""
    from kakusan.errors import ConfigError
    from kakusan.serve import Limits, ModelPool, Request, Service

    svc = Service(ModelPool([TINY]), Limits(), tmp_path)
    for name in (str(TINY), str(TINY.parent), "tiny-class.safetensors"):
        with pytest.raises(ConfigError, match="unknown model .* serves only tiny-class"):
            svc.generate(Request(model=name, class_label=1, steps=2))
    assert svc.pool.loaded == []  # nothing was loaded for them


def test_the_service_caps_requests_naming_the_field_and_flag(tmp_path):
    from kakusan.errors import ConfigError
    from kakusan.serve import Limits, ModelPool, Request, Service

    svc = Service(ModelPool([TINY]), Limits(max_n=4, max_steps=40, max_batch=2), tmp_path)
    for kw, message in ((dict(steps=41), r"steps = 41 is over this server's cap of 40 \(--max-steps\)"),
                        (dict(n=5), r"n = 5 is over this server's cap of 4 \(--max-n\)"),
                        (dict(steps=2.5), "steps must be a whole number"),
                        (dict(seed=-3), "seed must be at least 0"),
                        (dict(class_label=10), r"class = 10 is over this server's cap of 9"),
                        (dict(prompt="a seven"), "not text-conditional: pick a class")):
        with pytest.raises(ConfigError, match=message):
            svc.generate(Request(model="tiny-class", **{"class_label": 1, **kw}))
    r = svc.generate(Request(model="tiny-class", class_label=1, steps=3.0, n=3))  # a slider's 3.0 is 3
    assert len(r.paths) == 3 and r.records[0]["batch_size"] == 2  # --max-batch: 3 images in batches of 2
    svc.KEEP = 2  # the disk stays bounded: only the newest request folders are kept
    for seed in range(3):
        svc.generate(Request(model="tiny-class", class_label=1, steps=1, seed=seed))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_upload_checks_before_decoding(tmp_path):
    from PIL import Image

    from kakusan.errors import DataError
    from kakusan.serve import Limits, open_upload

    lim = Limits(max_upload_bytes=10_000, max_pixels=100 * 100)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (100, 100), (10, 200, 30)).save(ok)
    assert open_upload(ok, lim).size == (100, 100)
    wide = tmp_path / "wide.png"
    Image.new("L", (101, 100)).save(wide)
    with pytest.raises(DataError, match=r"101 x 100 = 10,100 pixels, over this server's limit of 10,000"):
        open_upload(wide, lim)
    heavy = tmp_path / "heavy.bmp"
    Image.new("RGB", (60, 60)).save(heavy)  # an uncompressed 10.8 KB
    with pytest.raises(DataError, match=r"over this server's limit of 0.0 MB \(--max-upload-mb\)"):
        open_upload(heavy, lim)
    tiff = tmp_path / "x.tiff"
    Image.new("L", (8, 8)).save(tiff)
    with pytest.raises(DataError, match="TIFF images are not accepted"):
        open_upload(tiff, lim)
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:400])
    with pytest.raises(DataError, match="corrupt"):
        open_upload(cut, lim)


def test_non_loopback_bind_warns():
    pytest.importorskip("gradio")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "kakusan.cli", "serve", "--checkpoint", str(TINY), "--host",
                             "0.0.0.0", "--port", str(free_port())], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the warning comes before the page is built
    finally:
        proc.terminate()
        proc.wait(10)
    assert "warning: serving on 0.0.0.0, not loopback" in line and "no login" in line


def test_no_checkpoint_serves_the_shipped_models_or_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from kakusan import zoo
    from kakusan.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--dry-run"]) == 0  # no runs/demo: the models that ship with kakusan
    assert json.loads(capsys.readouterr().out)["checkpoints"] == ["mnist", "fashion-mnist", "emoji"] == zoo.names()
    monkeypatch.setattr(zoo, "_index", lambda: ())  # an installation without them
    assert main(["serve", "--dry-run"]) == 2
    assert "no model at runs/demo and no shipped models: train one with `make demo`" in capsys.readouterr().err


def test_no_checkpoint_serves_the_demo_model(tmp_path, monkeypatch, capsys):
    """With no --checkpoint: runs/demo, where `make demo` writes its run (here a run folder made from the tiny
    model's file), then the shipped models."""
    import shutil

    from kakusan.checkpoints import read_config
    from kakusan.cli import main
    from kakusan.serve import ModelPool

    step = tmp_path / "runs" / "demo" / "checkpoints" / "step-00000040"
    step.mkdir(parents=True)
    (step / "config.json").write_text(json.dumps(read_config(TINY)))
    for name in ("model.safetensors", "ema.safetensors"):
        shutil.copy(TINY, step / name)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"] == ["runs/demo", "mnist", "fashion-mnist", "emoji"]
    assert ModelPool(["runs/demo"]).model_info("demo").class_names == [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------------------------------
# (c) a bounded load test


def test_load_20_concurrent_requests(tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    psutil = pytest.importorskip("psutil")
    from gradio_client.utils import QueueError

    with served("--queue-size", "6", "--max-steps", "40") as (url, proc):
        ps = psutil.Process(proc.pid)
        warm = gradio_client.Client(url, verbose=False)
        warm.predict(*settings(n=1, steps=2), api_name="/generate")  # the model loaded once
        rss0 = ps.memory_info().rss
        peak, stop = [rss0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], ps.memory_info().rss)
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        clients = [gradio_client.Client(url, verbose=False) for _ in range(20)]
        t0 = time.perf_counter()
        jobs = [c.submit(*settings(n=4, steps=30, seed=i, sampler="heun"), api_name="/generate")
                for i, c in enumerate(clients)]
        completed, refused, other = [], 0, []
        for i, job in enumerate(jobs):
            try:
                files = job.result(timeout=300)[3]
                completed.append((i, files))
            except QueueError:
                refused += 1
            except Exception as e:  # noqa: BLE001
                if "queue is full" in str(e).lower():
                    refused += 1
                else:
                    other.append(repr(e))
        seconds = time.perf_counter() - t0
        stop.set()
        assert not other, other
        assert len(completed) + refused == 20 and len(completed) >= 6
        for i, files in completed:  # each completed request got its own images
            assert len(files) == 4 and png_record(files[0])["seed"] == i
        after = warm.predict(*settings(n=1, steps=3, seed=99), api_name="/generate")[3]
        assert png_record(after[0])["seed"] == 99 and proc.poll() is None
        growth = (peak[0] - rss0) / 2**20
        assert growth < 400, f"the server grew {growth:.0f} MB under load"
    figures = {"requests": 20, "completed": len(completed), "refused_queue_full": refused,
               "queue_size": 6, "seconds": round(seconds, 2), "rss_before_mb": round(rss0 / 2**20, 1),
               "rss_peak_mb": round(peak[0] / 2**20, 1), "rss_growth_mb": round(growth, 1),
               "request": "n=4, heun, 30 steps, guidance 2, tiny-class (8x8)"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "serve-load.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


def test_an_unconditional_model_autoguided_on_the_service(tmp_path, digits):
    """Two checkpoints of an unconditional run: the guidance slider is shown (a guide can be chosen), a chosen guide
    with guidance 0 is refused naming the slider, with w > 0 it autoguides; guidance with no guide is refused."""
    from kakusan.errors import ConfigError
    from kakusan.serve import Limits, ModelPool, Request, Service
    from kakusan.serve.app import build_app
    from kakusan.training import Trainer, TrainConfig

    Trainer(TrainConfig(out=str(tmp_path / "u"), steps=2, checkpoint_every=1, cond="none",
                        preset="unet-tiny", batch_size=8, sample_every=0, progress=False), digits).fit()
    ckpts = tmp_path / "u" / "checkpoints"
    svc = Service(ModelPool([ckpts / "step-00000002", ckpts / "step-00000001"]), Limits(), tmp_path / "out")
    assert svc.pool.names == ["u", "u-2"] and svc.pool.model_info("u").kind == "unconditional"
    for w in (0, None):
        with pytest.raises(ConfigError, match="guide model 'u-2' chosen with guidance 0: .* set the guidance slider"):
            svc.generate(Request(model="u", guide="u-2", steps=2, guidance=w))
    with pytest.raises(ConfigError, match="'u' is unconditional: guidance needs a guide model"):
        svc.generate(Request(model="u", steps=2, guidance=2.0))
    assert svc.pool.loaded == []  # refused before loading
    r = svc.generate(Request(model="u", guide="u-2", steps=2, guidance=2.0))
    assert r.records[0]["guidance_kind"] == "auto" and r.records[0]["guide"]["path"] == str(ckpts / "step-00000001")
    assert "guide" not in svc.generate(Request(model="u", steps=2, guidance=0)).records[0]
    settings, msg = svc.restore(r.paths[0])
    assert (settings["model"], settings["guide"], settings["guidance"]) == ("u", "u-2", 2.0)
    # restored where its guide is not served: the guide dropdown is set to none, and the message says so
    alone = Service(ModelPool([ckpts / "step-00000002"]), Limits(), tmp_path / "out1")
    settings, msg = alone.restore(r.paths[0])
    assert settings["guide"] == "none" and "guide model is set to none" in msg and "does not serve" in msg
    demo = build_app(svc)
    slider = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "guidance")
    assert slider.visible and slider.value == 0
