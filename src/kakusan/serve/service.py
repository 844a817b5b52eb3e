"""What the page does, without the page: the checkpoints it may serve, the caps on a request, safe decoding of
uploads, and one generation through :class:`kakusan.Pipeline` (no sampling logic of its own).

The browser names a model only by the name this server gave it (``ModelPool.names``); a path it sends is
refused like any other unknown name. The Gradio page (:mod:`kakusan.serve.app`) is a thin layer over
:meth:`Service.generate` and :meth:`Service.restore`.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import read_config, resolve_checkpoint, sampling_defaults, weights_file
from ..errors import CheckpointError, ConfigError, DataError
from ..metrics.provenance import file_sha256

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what PIL may decode from a browser upload


@dataclass(frozen=True)
class Limits:
    """The caps on what one request may ask for (each a ``kakusan serve`` flag)."""

    max_n: int = 16  # --max-n: images per request
    max_steps: int = 200  # --max-steps
    max_batch: int = 16  # --max-batch: images per sampler batch (larger n runs in several batches)
    max_upload_bytes: int = 8 * 1024 * 1024  # --max-upload-mb
    max_pixels: int = 16 * 1024 * 1024  # --max-upload-pixels: width x height of an uploaded image
    max_models: int = 2  # --max-models kept in memory
    queue_size: int = 8  # --queue-size: requests waiting at once (more are told the queue is full)

    def __post_init__(self):
        for name in ("max_n", "max_steps", "max_batch", "max_upload_bytes", "max_pixels", "max_models",
                     "queue_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


def capped_int(name: str, v, lo: int, hi: int | None, flag: str | None = None) -> int:
    """``v`` (an int, or a float with no fraction, as a slider sends) in [lo, hi], else an error naming it."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{name} must be a whole number, got {v!r}")
    if v < lo:
        raise ConfigError(f"{name} must be at least {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{name} = {v} is over this server's cap of {hi}" + (f" ({flag})" if flag else ""))
    return v


# --------------------------------------------------------------------------------------------------------------
# Uploads


def open_upload(path, limits: Limits, what: str = "upload"):
    """An uploaded file as a loaded PIL image, refused (DataError naming the problem) before decoding when it is
    too large in bytes or pixels, not an image, or of a format not in :data:`UPLOAD_FORMATS`."""
    from PIL import Image

    if path is None:
        raise DataError(f"{what}: no image was given")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: the uploaded file is missing")
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise DataError(f"{what}: the file is {size / 2**20:.1f} MB, over this server's limit of "
                        f"{limits.max_upload_bytes / 2**20:.1f} MB (--max-upload-mb)")
    try:
        im = Image.open(path)  # reads the header only
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise DataError(f"{what}: not a readable image ({type(e).__name__})") from None
    if im.format not in UPLOAD_FORMATS:
        im.close()
        raise DataError(f"{what}: {im.format} images are not accepted (give {', '.join(UPLOAD_FORMATS)})")
    w, h = im.size
    if w * h > limits.max_pixels:
        im.close()
        raise DataError(f"{what}: {w} x {h} = {w * h:,} pixels, over this server's limit of {limits.max_pixels:,} "
                        f"(--max-upload-pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt body
        im.close()
        raise DataError(f"{what}: the image data is corrupt ({type(e).__name__})") from None
    return im


def image_tensor(im, channels: int, size: int):
    """A loaded PIL image as uint8 (1, C, size, size): composited on white, centre-cropped, resized (the rule
    kakusan's data loading uses)."""
    import numpy as np
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())[None]


def mask_tensor(im, size: int):
    """A drawn mask layer (strokes on a transparent layer, or white on black) as float (1, 1, size, size) in
    {0, 1}: a model pixel is repainted when at least a quarter of its area was painted."""
    import numpy as np
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
        painted = im.convert("RGBA").getchannel("A")
    else:
        painted = im.convert("L")
    w, h = painted.size
    side = min(w, h)
    painted = painted.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    binary = painted.point(lambda v: 255 if v >= 128 else 0)
    area = np.asarray(binary.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return torch.from_numpy((area >= 0.25).astype(np.float32))[None, None]


# --------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelInfo:
    """What the page needs to know of a checkpoint, read from its config alone (no weights loaded)."""

    name: str
    path: Path
    kind: str  # "text" | "class" | "unconditional"
    class_names: list[str]
    image_shape: tuple[int, int, int]
    sampler: str
    steps: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _model_info(name: str, path: Path) -> ModelInfo:
    cfg = read_config(path)
    mc = cfg["model"]
    k = int(mc.get("num_classes", 0) or 0)
    names = list(cfg.get("data", {}).get("class_names") or [])
    names = [str(n) for n in names] if len(names) == k else [str(i) for i in range(k)]
    kind = "text" if cfg.get("text_encoder") else ("class" if k else "unconditional")
    c, s = mc["in_channels"], mc["image_size"]
    if cfg.get("autoencoder"):  # a latent model: the image is the decoder's (read when loaded)
        c, s = None, None
    sampler, steps = sampling_defaults(cfg)
    return ModelInfo(name, path, kind, names if kind == "class" else [], (c, s, s), sampler, steps)


def chosen(name) -> bool:
    """Whether a page's optional choice (a LoRA, a guide model) names something: None, "" and "none" do not."""
    return name not in (None, "", "none")


class ModelPool:
    """The checkpoints given on the command line, by name; each loaded on first use, at most ``max_models``
    kept (least recently used dropped); one generation at a time per model (``use``)."""

    def __init__(self, checkpoints, *, max_models: int = 2, device: str = "auto", loras=None, embeddings=None):
        if not checkpoints:
            raise ConfigError("no checkpoint to serve")
        self.device, self.max_models = device, max_models
        self.info: dict[str, ModelInfo] = {}
        for p in checkpoints:
            path = resolve_checkpoint(p)
            stem = Path(p).name.removesuffix(".safetensors") or "model"
            if stem in ("checkpoints", "latest") or stem.startswith("step-"):
                stem = path.parent.parent.name if path.parent.name == "checkpoints" else stem
            name, i = stem, 2
            while name in self.info:
                name, i = f"{stem}-{i}", i + 1
            self.info[name] = _model_info(name, path)
        self.loras = [Path(f) for f in (loras or [])]
        for f in self.loras:
            if not f.is_file():
                raise ConfigError(f"--lora {f}: file not found")
        # textual-inversion words: loaded into every text model served (their prompts may use them)
        self.embeddings = [Path(f) for f in (embeddings or [])]
        for f in self.embeddings:
            if not f.is_file():
                raise ConfigError(f"--embedding {f}: file not found")
        if self.embeddings and not any(i.kind == "text" for i in self.info.values()):
            raise ConfigError("--embedding: none of the served models is text-conditional (embeddings are new words "
                              "for a text model's prompts)")
        self._loaded: OrderedDict = OrderedDict()
        self._pool_lock = threading.Lock()
        self._model_locks = {name: threading.Lock() for name in self.info}
        self._sha: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return list(self.info)

    @property
    def lora_names(self) -> list[str]:
        return [f.name for f in self.loras]

    def model_info(self, name) -> ModelInfo:
        """The model called ``name``; anything else (a path included) is refused."""
        if not isinstance(name, str) or name not in self.info:
            shown = repr(name) if len(repr(name)) < 80 else repr(name)[:77] + "..."
            raise ConfigError(f"unknown model {shown}: this server serves only {', '.join(self.info)}")
        return self.info[name]

    def _lora_file(self, lora) -> Path | None:
        if not chosen(lora):
            return None
        for f in self.loras:
            if f.name == lora:
                return f
        raise ConfigError(f"unknown LoRA {lora!r}: this server has {', '.join(self.lora_names) or 'none'}")

    def get(self, name: str, lora: str | None = None, lora_scale: float = 1.0, guide: str | None = None):
        """The loaded :class:`kakusan.Pipeline` for model ``name`` (with LoRA ``lora`` merged at ``lora_scale``;
        with ``guide``, another served model's name, attached as its autoguidance guide)."""
        from ..pipeline import Pipeline

        info = self.model_info(name)
        adapter = self._lora_file(lora)
        guide_info = self.model_info(guide) if chosen(guide) else None
        key = (name, None if adapter is None else adapter.name, round(float(lora_scale), 3) if adapter else None)
        if guide_info is not None:
            key += (guide_info.name,)
        with self._pool_lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        pipe = Pipeline.load(info.path, device=self.device, lora=None if adapter is None else str(adapter),
                             lora_scale=float(lora_scale), guide=None if guide_info is None else guide_info.path,
                             embedding=[str(f) for f in self.embeddings] if info.kind == "text" else None)
        with self._pool_lock:
            self._loaded[key] = pipe
            while len(self._loaded) > self.max_models:
                self._loaded.popitem(last=False)
        return pipe

    @property
    def loaded(self) -> list[tuple]:
        with self._pool_lock:
            return list(self._loaded)

    @contextmanager
    def use(self, name: str):
        """Hold model ``name`` for one generation (others for it wait)."""
        lock = self._model_locks[self.model_info(name).name]
        with lock:
            yield

    def name_for_sha(self, sha: str | None) -> str | None:
        """The served model whose EMA weights have this sha256, if any."""
        for name, info in self.info.items():
            if name not in self._sha:
                self._sha[name] = file_sha256(weights_file(info.path, True))
            if self._sha[name] == sha:
                return name
        return None


# --------------------------------------------------------------------------------------------------------------
# A request


@dataclass
class Request:
    """One press of a generate button, as the page's controls give it."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None  # None: one row per class (a class model), or unconditional
    negative_class: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    n: int = 1
    lora: str | None = None
    lora_scale: float = 1.0
    guide: str | None = None  # autoguidance: another served model's name ("none" / None: classifier-free guidance)
    init_image: str | None = None  # img2img / inpaint: an uploaded file
    strength: float | None = None
    mask: str | None = None  # inpaint: an uploaded mask layer
    mask_name: str | None = None  # or a named region (lower-half, ...)


@dataclass
class Result:
    paths: list[Path]  # one PNG per image, each carrying its record
    records: list[dict]
    seconds: float


class Service:
    """The page's work: ``generate`` a request through the pipeline into PNGs under ``out_dir``; ``restore`` the
    settings a kakusan PNG carries."""

    def __init__(self, pool: ModelPool, limits: Limits, out_dir: str | Path):
        self.pool, self.limits = pool, limits
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def pipeline_kwargs(self, req: Request, pipe) -> dict:
        """The pipeline's arguments for ``req``, every value checked against the caps (errors name the field)."""
        from ..pipeline import MASKS

        lim = self.limits
        n = capped_int("n", req.n, 1, lim.max_n, "--max-n")
        default_sampler, default_steps = pipe.defaults()
        steps = capped_int("steps", default_steps if req.steps in (None, "") else req.steps, 1, lim.max_steps,
                           "--max-steps")
        seed = capped_int("seed", req.seed, 0, 2**63 - 1)
        kw = dict(n=n, steps=steps, seed=seed, sampler=req.sampler or default_sampler,
                  batch_size=min(n, lim.max_batch))
        if req.guidance not in (None, "") and float(req.guidance) != 0:
            kw["guidance"] = float(req.guidance)
        if pipe.is_text:
            if req.prompt and req.prompt.strip():
                kw["prompt"] = req.prompt.strip()
            if req.negative_prompt and req.negative_prompt.strip():
                kw["negative_prompt"] = req.negative_prompt.strip()
        else:
            if req.prompt and req.prompt.strip():
                raise ConfigError(f"model {req.model!r} is not text-conditional: pick a class, not a prompt")
            if req.class_label not in (None, "", -1):
                kw["class_label"] = capped_int("class", req.class_label, 0, pipe.num_classes - 1)
            if req.negative_class not in (None, "", -1):
                kw["negative_class"] = capped_int("negative class", req.negative_class, 0, pipe.num_classes - 1)
        c, h, _ = pipe.image_shape
        if req.init_image is not None:
            im = open_upload(req.init_image, lim, "image")
            kw["init_image"] = image_tensor(im, c, h)
            if req.strength is not None:
                kw["strength"] = float(req.strength)
            if req.mask_name not in (None, "", "drawn"):
                if req.mask_name not in MASKS:
                    raise ConfigError(f"unknown mask {req.mask_name!r}: draw one or choose {', '.join(MASKS)}")
                kw["mask"] = req.mask_name
            elif req.mask is not None:
                m = mask_tensor(open_upload(req.mask, lim, "mask"), h)
                if not m.any():
                    raise ConfigError("the mask is empty: paint the region to repaint on the image")
                kw["mask"] = m
        elif req.mask is not None or req.mask_name not in (None, "", "drawn"):
            raise DataError("inpainting needs an image: upload one, then draw the region to repaint")
        return kw

    def generate(self, req: Request, on_step=None) -> Result:
        """Make the images of ``req`` (one at a time per model); ``on_step(done, total, x0_hat)`` after each
        sampler step, with the batch's predicted clean images (in [-1, 1], decoded for a latent model)."""
        info = self.pool.model_info(req.model)
        guided = req.guidance not in (None, "") and float(req.guidance) != 0
        if chosen(req.guide) and not guided:
            raise ConfigError(f"guide model {req.guide!r} chosen with guidance 0: autoguidance needs a guidance scale "
                              f"w > 0 (e.g. 2; 1 = the model alone): set the guidance slider, or choose guide model "
                              f"none")
        if info.kind == "unconditional" and guided and not chosen(req.guide):
            raise ConfigError(f"model {req.model!r} is unconditional: guidance needs a guide model (autoguidance), "
                              f"or set guidance to 0")
        if chosen(req.lora):
            scale = float(req.lora_scale)
            if not -4.0 <= scale <= 4.0:
                raise ConfigError(f"LoRA scale must lie in [-4, 4], got {scale}")
        with self.pool.use(req.model):
            pipe = self.pool.get(req.model, req.lora, req.lora_scale, req.guide)
            kw = self.pipeline_kwargs(req, pipe)
            callback = None if on_step is None else self._step_callback(pipe, kw, on_step)
            gen = pipe(**kw, callback=callback)
        self._prune()
        folder = self.out_dir / uuid.uuid4().hex[:12]
        paths = [gen.save_image(folder / f"kakusan-{req.model}-seed{kw['seed']}-{i:02d}.png", i)
                 for i in range(len(gen))]
        return Result(paths, gen.records, gen.seconds)

    @staticmethod
    def _step_callback(pipe, kw: dict, on_step):
        """A pipeline callback counting steps over all batches and handing on the predicted x0."""
        steps, n, bs = kw["steps"], kw["n"], kw["batch_size"]
        if "strength" in kw or ("init_image" in kw and "mask" not in kw):
            per = max(min(int(steps * kw.get("strength", 0.8)), steps), 1)
        else:
            per = steps
        total = per * -(-n // bs)
        done = [0]

        def cb(info):
            done[0] += 1
            x0 = info["x0_hat"]
            if pipe.autoencoder is not None and x0.shape[1] != pipe.image_shape[0]:
                x0 = pipe.autoencoder.from_latent(x0)
            on_step(min(done[0], total), total, x0.float().clamp(-1, 1).cpu())

        return cb

    KEEP = 500  # request folders kept under out_dir (the page has copied each into its own cache by then)

    def _prune(self) -> None:
        """Bound the disk used: only the newest :attr:`KEEP` request folders stay."""
        import shutil

        folders = sorted((p for p in self.out_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for p in folders[:max(0, len(folders) - self.KEEP + 1)]:
            shutil.rmtree(p, ignore_errors=True)

    def restore(self, png) -> tuple[dict, str]:
        """(settings, message) of a kakusan PNG dropped on the page: the record's settings as the page's
        controls take them, and which served model made it (or that none of them did)."""
        from ..pipeline import read_png_record

        open_upload(png, self.limits, "PNG").close()
        rec = read_png_record(png)
        name = self.pool.name_for_sha(rec.get("checkpoint_sha256"))
        settings = {k: rec.get(k) for k in ("sampler", "steps", "guidance", "seed", "negative_prompt",
                                            "negative_class", "strength")}
        cond = rec.get("cond")
        settings["prompt"] = rec.get("prompt") if isinstance(rec.get("prompt"), str) else \
            (cond if isinstance(cond, str) else "")
        label = rec.get("class_label")
        settings["class_label"] = label if isinstance(label, int) else (cond if isinstance(cond, int) else None)
        settings["n"] = min(int(rec.get("n") or 1), self.limits.max_n)
        settings["model"] = name
        guide = rec.get("guide") if rec.get("guidance") is not None else None
        guide_name = self.pool.name_for_sha(guide.get("sha256")) if guide else None
        settings["guide"] = guide_name or "none"  # an unserved guide: none, said below (not the dropdown's old one)
        if name is None:
            msg = (f"restored the settings; the model that made it ({Path(str(rec.get('checkpoint'))).name}, "
                   f"weights {str(rec.get('checkpoint_sha256'))[:12]}) is not one this server serves")
        else:
            msg = f"restored the settings of image {rec.get('index', 0)} (seed {rec.get('seed')}) made with {name}"
        if guide and guide_name is None:
            msg += (f"; it was autoguided by a guide model ({Path(str(guide.get('path'))).name}, weights "
                    f"{str(guide.get('sha256'))[:12]}) this server does not serve: the guide model is set to none "
                    f"(Generate will not autoguide; choose a served guide model to)")
        return settings, msg


def default_checkpoints() -> list:
    """What ``kakusan serve`` serves with no --checkpoint: the model ``make demo`` trained (runs/demo) when there is
    one, and the models shipped with kakusan (``kakusan models``), so a fresh clone has a page to open."""
    from ..zoo import names

    found = []
    try:
        resolve_checkpoint("runs/demo")
        found.append(Path("runs/demo"))
    except CheckpointError:
        pass
    found += names()
    if not found:
        raise CheckpointError("no --checkpoint given, no model at runs/demo and no shipped models: train one with "
                              "`make demo` (a few minutes on a CPU), or pass --checkpoint PATH")
    return found

