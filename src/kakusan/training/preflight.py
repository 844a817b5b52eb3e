"""What ``kakusan train`` settles before a run starts: the config of a run being resumed (its own, from the run
folder), the checks ``--dry-run`` makes without loading any data, and the cost of a step on this machine.

Resuming: the run folder's ``config.json`` holds the run's training config (``train``). ``--resume`` starts from
it; values given beside it (flags or ``--config``) must equal the saved ones, except the pure run-control fields
of :data:`MAY_CHANGE_ON_RESUME`, which only decide how long, where and how visibly the run goes on, not what it
computes; everything else is refused, naming each difference.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, KakusanError
from .trainer import TrainConfig

# Fields a resumed run may change: how long it runs and where it stops (steps, max_minutes), what it writes and how
# often (logs, grids, checkpoints, the bar), where it computes (device; compile and gradient checkpointing give
# the same gradients) and where it finds its inputs (data, autoencoder, latent cache: the same data set at
# another path, whose name, size and shape are then checked against the run's; the autoencoder by its weights
# hash, the latent cache by its provenance). Everything else (model, schedule, optimizer, data order, seed, ...)
# would make the resumed run a different run.
RUN_CONTROL = ("steps", "max_minutes", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
               "keep_every", "progress", "device", "compile", "gradient_checkpointing", "nan_policy", "sample_sampler",
               "sample_steps", "guidance", "download", "posthoc_every",
               # metrics while training: what is measured, not what is trained (the evaluation draws no training
               # randomness); a changed evaluation forgets the best so far (kakusan.metrics.training_eval)
               "eval_every", "eval_n", "eval_extractor", "eval_ref", "eval_ref_split", "eval_sampler", "eval_steps",
               "eval_guidance", "eval_seed", "eval_batch_size", "eval_best")
MOVABLE_PATHS = ("data", "autoencoder", "latent_cache")  # may move, not change kind (data) or appear / vanish
MAY_CHANGE_ON_RESUME = RUN_CONTROL + MOVABLE_PATHS  # and out: the run folder resumed, wherever it now is


def saved_run_config(out: str | Path) -> tuple[dict, Path]:
    """The run config of the run folder ``out`` (its ``config.json``, else its newest checkpoint's) and its file."""
    from ..checkpoints import read_config, resolve_checkpoint

    out = Path(out)
    path = out / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not readable ({type(e).__name__}: {e})") from None
    elif out.is_dir():
        ckpt = resolve_checkpoint(out)
        config, path = read_config(ckpt), ckpt / "config.json"
    else:
        raise CheckpointError(f"nothing to resume: {out} is not a run folder (give the run's --out)")
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise CheckpointError(f"{path}: not a kakusan run config (no 'train' section)")
    return config, path


def _show(v) -> str:
    return json.dumps(v)


def resume_config(out: str | Path, given: dict) -> tuple[TrainConfig, list[tuple[str, object, object]], dict]:
    """The config a ``--resume`` of run folder ``out`` trains with: the saved one, with the values ``given``
    (flags / --config) that may change; returns (config, [(field, saved, given) changed], saved run config).
    Any other difference is refused in one ConfigError naming each field with its saved and given value."""
    run_config, path = saved_run_config(out)
    try:
        saved = TrainConfig.from_dict(run_config["train"])
    except KakusanError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        merged = TrainConfig.from_dict({**saved.to_dict(), **given, "out": str(out)})
    except KakusanError as e:
        raise ConfigError(f"resuming {out}: {e}") from None
    before, after = saved.to_dict(), merged.to_dict()
    changed, refused = [], []
    for field in after:
        old, new = before[field], after[field]
        if old == new or (field == "out"):
            continue
        ok = field in MAY_CHANGE_ON_RESUME
        if field in MOVABLE_PATHS:
            ok = old is not None and new is not None and (
                field != "data" or str(old).partition(":")[0] == str(new).partition(":")[0])
        (changed if ok else refused).append((field, old, new))
    if refused:
        listed = "; ".join(f"{f}: saved {_show(a)}, given {_show(b)}" for f, a, b in refused)
        raise ConfigError(f"cannot resume {out} with settings other than its own ({path}): {listed}. Leave them out "
                          f"(the run folder alone resumes it); only {', '.join(RUN_CONTROL)} and the paths of "
                          f"{', '.join(MOVABLE_PATHS)} may change")
    return merged, changed, run_config


def check_same_data(run_config: dict, new_config: dict, out: str | Path) -> None:
    """A resumed run whose data moved: the data set found at the new path must be the run's (name, size, shape)."""
    a, b = run_config.get("data", {}), new_config.get("data", {})
    diff = [f"{k}: saved {_show(a.get(k))}, now {_show(b.get(k))}" for k in ("name", "size", "shape")
            if k in a and a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(f"cannot resume {out}: {b.get('spec')} is not the data it was trained on ({'; '.join(diff)})")


def resumed_step(out: str | Path) -> int:
    """The step the newest checkpoint of run folder ``out`` holds (0 without one)."""
    from ..checkpoints import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(out)
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (KakusanError, OSError, KeyError, ValueError, TypeError):
        return 0


# --------------------------------------------------------------------------------------------------------------
# --dry-run: checks without data, and the cost of a step


def check_train_config(cfg: TrainConfig) -> None:
    """What can be checked without loading data or weights: the preset and its overrides, the schedule, the data
    spec's form, the init_from checkpoint's config, that the autoencoder exists, the grids' sampler, the device's
    name (TrainConfig itself checks the plain values)."""
    from ..data.datasets import check_spec
    from ..models import get_preset
    from ..samplers import get_sampler
    from ..schedules import ScheduleConfig, make_schedule

    if not isinstance(cfg.model, dict):
        raise ConfigError(f"--model takes a JSON object of preset fields, got {cfg.model!r}")
    get_preset(cfg.preset, **cfg.model)  # an unknown preset, an unknown field or a bad value
    if cfg.init_from and cfg.model:
        raise ConfigError("--model overrides the architecture, which a fine-tuning run takes from --init-from")
    make_schedule(ScheduleConfig(cfg.schedule, cfg.num_timesteps, cfg.schedule_params, cfg.zero_terminal_snr))
    check_spec(cfg.data)
    if cfg.init_from:  # the checkpoint a fine-tuning run starts from: there, and kakusan's
        from ..training.trainer import check_base_path

        check_base_path(cfg.init_from)
    if cfg.autoencoder and not Path(cfg.autoencoder).expanduser().exists():
        raise CheckpointError(f"autoencoder not found: {cfg.autoencoder}")
    if cfg.sample_sampler is not None:  # None: the checkpoint's default sampler
        get_sampler(cfg.sample_sampler)
    if cfg.eval_every:  # the evaluation's extractor file (its weights are read when the run starts)
        kind, _, path = cfg.eval_extractor.partition(":")
        if kind not in ("classifier", "inception"):
            raise ConfigError(f"unknown feature extractor {cfg.eval_extractor!r}; use inception, inception:FILE or "
                              f"classifier:FILE")
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"--extractor {cfg.eval_extractor}: {path} not found")
    try:
        torch.device(cfg.device if cfg.device != "auto" else "cpu")
    except RuntimeError:
        raise ConfigError(f"unknown device {cfg.device!r}") from None


_NATIVE_SHAPES = {"digits": (1, 8), "mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}


def _random_data(cfg: TrainConfig, n: int):
    """Random uint8 images (and labels, captions) of the shape ``cfg``'s data would have, read from nothing."""
    from ..data import ImageDataset

    name = cfg.data.partition(":")[0]
    classes = 10
    if cfg.init_from:  # a fine-tuning run: the base model's data shape and classes
        from .trainer import base_record

        base = base_record(cfg.init_from)
        c, h, _ = base.get("data", {}).get("shape") or (base["model"]["in_channels"], base["model"]["image_size"], 0)
        classes = base["model"].get("num_classes") or classes
    else:
        c, h = _NATIVE_SHAPES.get(name, (3, 64))
    c, h = cfg.channels or c, cfg.image_size or h
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=g),
                        torch.randint(0, classes, (n,), generator=g), [str(k) for k in range(classes)],
                        f"random {c}x{h}x{h} images", captions=[f"caption {k % 8}" for k in range(n)])


def _random_class_images(folder: Path, images: torch.Tensor) -> str:
    """A DreamBooth estimate's class images: ``images`` (uint8 (N, C, H, W)) as PNGs in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i}.png")
    return str(folder)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_step_seconds(cfg: TrainConfig, max_steps: int = 3, budget_s: float = 10.0) -> dict:
    """Seconds per training step of ``cfg`` on this machine: the real model, optimizer, EMA (and teacher, LoRA,
    text encoder, autoencoder) on random data of the data's shape: one untimed warm-up step, then up to
    ``max_steps`` timed ones (fewer once ``budget_s`` is spent), their median. Nothing is read but the init_from / autoencoder checkpoints, and
    nothing is written outside a temporary folder. Batches over 256 are timed at 256 on a CPU and scaled."""
    from ..diffusion import resolve_device
    from .trainer import Trainer

    device = resolve_device(cfg.device)
    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, 256)
    with tempfile.TemporaryDirectory(prefix="kakusan-estimate-") as tmp:
        old_cache = os.environ.get("KAKUSAN_CACHE")
        os.environ["KAKUSAN_CACHE"] = tmp  # text-embedding / latent caches of the random data go here
        try:
            probe = replace(cfg, batch_size=batch, progress=False, compile=False, latent_cache=None,
                            out=str(Path(tmp) / "run"), eval_every=0)
            data = _random_data(probe, max(batch, 8))
            if probe.dreambooth and probe.class_prompt:  # random class images of its own: none drawn, none written
                probe = replace(probe, class_data=_random_class_images(Path(tmp) / "class", data.images[:8]),
                                num_class_images=8)
            tr = Trainer(probe, data=data)
            tr.train_step()  # warm-up, untimed: the first step pays for allocations and kernel selection
            times, start = [], time.perf_counter()
            while len(times) < max_steps and (not times or time.perf_counter() - start < budget_s):
                t0 = time.perf_counter()
                tr.train_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        finally:
            if old_cache is None:
                os.environ.pop("KAKUSAN_CACHE", None)
            else:
                os.environ["KAKUSAN_CACHE"] = old_cache
    per_step = statistics.median(times) * cfg.batch_size / batch
    return {"seconds_per_step": per_step, "timed_steps": len(times), "timed_batch": batch, "device": str(device),
            "threads": torch.get_num_threads()}


def estimate_line(cfg: TrainConfig, est: dict, from_step: int = 0) -> str:
    """One line on what the run will cost, from :func:`estimate_step_seconds`."""
    todo = max(0, cfg.steps - from_step)
    total = est["seconds_per_step"] * todo
    where = est["device"] + (f", {est['threads']} threads" if est["device"] == "cpu" else "")
    how = (f"median of {est['timed_steps']} timed step{'s' if est['timed_steps'] > 1 else ''} after a warm-up, "
           f"on random data")
    if est["timed_batch"] != cfg.batch_size:
        how += f", timed at batch {est['timed_batch']} and scaled"
    budget = ""
    if cfg.max_minutes is not None and total > 60 * cfg.max_minutes:
        budget = f"; --max-minutes {cfg.max_minutes:g} stops it after ~{int(60 * cfg.max_minutes / est['seconds_per_step']):,}"
    steps = f"{todo:,} steps" + (f" (from step {from_step:,})" if from_step else "")
    return (f"estimate on this machine ({where}): {est['seconds_per_step']:.3g} s per step of {cfg.batch_size} "
            f"images ({how}), so {steps} take about {_duration(total)}{budget}; "
            + (f"sample grids (every {cfg.sample_every:,} steps and at the end) and checkpoints come on top"
               if cfg.sample_every else "checkpoints come on top"))


def estimate_or_reason(cfg: TrainConfig, steps: int, from_step: int = 0) -> str:
    """The estimate line, or why there is none (under torchrun, on a device this machine lacks, for an imported
    latent base). Building the run on random data also checks what needs the weights (a fine-tuning base's
    conditioning, an autoencoder's channels): a run that would fail is refused here too."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "no time estimate under torchrun (run --dry-run in one process)"
    if cfg.init_from:
        from .trainer import base_record

        base = base_record(cfg.init_from)
        if base.get("imported", {}).get("kind") == "dit" and "autoencoder" in base:  # its pixel size is not
            return "no time estimate for fine-tuning an imported latent model"  # recorded, only the latents'

    try:
        est = estimate_step_seconds(cfg, max_steps=steps)
    except ConfigError as e:
        if "no CUDA GPU" in str(e):
            return f"no time estimate: {e}"
        raise  # a run that would fail: the dry run fails too
    if not math.isfinite(est["seconds_per_step"]):
        return "no time estimate (the timed steps did not finish)"
    return estimate_line(cfg, est, from_step)
