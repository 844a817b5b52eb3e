"""The one way from a checkpoint to images: ``Pipeline``.

    pipe = Pipeline.load("runs/mnist")                       # any kakusan checkpoint (pixel / latent, class /
    out = pipe(class_label=7, n=8, guidance=2, seed=0)       #  text / unconditional, LoRA, distilled)
    out.images, out.records, out.save_grid("sevens.png")     # (N, C, H, W) in [-1, 1]; one record per image
    out = pipe(init_image="digit.png", strength=0.5, class_label=3)           # img2img (SDEdit)
    out = pipe(init_image="digit.png", mask="lower-half.png", class_label=3)  # inpainting (RePaint)
    inv = pipe.invert("digit.png", class_label=3, steps=50)                   # DDIM inversion -> noise
    out = pipe(noise=inv.noise, sampler="ddim", steps=50, class_label=5)      # regenerate / edit from it
    out = Pipeline.from_png("sample-00003.png")                               # the same image again

Every consumer samples through here: ``kakusan sample / eval / sweep / plot``, the trainer's grids, the API. The
pipeline owns turning a checkpoint into "denoiser + condition + guidance + start + sampler + decode", and the
record of how each image was made (written into every PNG, so ``from_png`` can make it again, bitwise on the
CPU).

Seeds: the images of one call are drawn in batches of ``batch_size``; batch j draws its starting noise and all
its sampler noise from a generator seeded with ``seed + j`` (one batch: ``seed`` itself). An image is therefore
a function of (settings, seed, batch_size, its index), which is what its record holds.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .checkpoints import (LoadedAutoencoder, autoencoder_for_checkpoint, load_denoiser,
                          resolve_checkpoint, sampling_defaults, weights_file)
from .data.datasets import load_image, to_model_range, to_uint8
from .diffusion import ClippedDenoiser, randn, resolve_device
from .errors import CheckpointError, ConfigError, DataError
from .guidance import AutoGuidance, ClassifierFreeGuidance, ClassifierGuidance, check_interval
from .metrics.provenance import file_sha256, tensor_sha256
from .samplers import get_sampler, model_calls, run_sampler, sampling_grid, sampling_levels, sampling_plan
from .schedules import NoiseLevels
from .zoo import locate

Tensor = torch.Tensor

PNG_KEY = "kakusan"  # the PNG text chunk that holds an image's generation record (JSON)
MAX_N = 100_000  # images in one call
MAX_STEPS = 10_000


# --------------------------------------------------------------------------------------------------------------
# Checks of the numeric options (one line naming the option)


def _finite(name: str, v, lo: float | None = None, hi: float | None = None, allow_inf_hi: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not (allow_inf_hi and v > 0)):
        raise ConfigError(f"{name} must be finite, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{name} must lie in [{lo if lo is not None else '-inf'}, "
                          f"{hi if hi is not None else 'inf'}], got {v}")
    return v


def _int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{name} must be {kind}{f' (at most {hi:,})' if hi is not None else ''}, got {v!r}")
    return v


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Generation:
    """What a pipeline call returns: ``images`` (N, C, H, W) float in [-1, 1] on the CPU, and one generation
    record per image (``records[i]``: the call's settings plus the image's index and condition)."""

    images: Tensor
    records: list[dict]
    seconds: float = 0.0
    nfe: int = 0
    nrow: int | None = None  # images per grid row (one row per class / prompt)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def record(self) -> dict:
        """The call's settings (the records without their per-image fields)."""
        return {k: v for k, v in self.records[0].items() if k not in ("index", "cond")}

    def uint8(self) -> Tensor:
        return to_uint8(self.images)

    def pil(self) -> list:
        """The images as PIL images (mode L or RGB), each with its record in ``info``."""
        from PIL import Image

        out = []
        for img, rec in zip(self.uint8().permute(0, 2, 3, 1).numpy(), self.records):
            im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            im.info[PNG_KEY] = json.dumps(rec)
            out.append(im)
        return out

    def save_images(self, folder: str | Path, prefix: str = "sample") -> list[Path]:
        """One PNG per image, each carrying its record."""
        from .images import save_images

        return save_images(self.images, folder, prefix=prefix, records=self.records)

    def save_image(self, path: str | Path, i: int = 0) -> Path:
        """Image ``i`` alone, at its own size, carrying its record."""
        from .images import png_info

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pil()[i].save(path, pnginfo=png_info(self.records[i]))
        return path

    def save_grid(self, path: str | Path, nrow: int | None = None) -> Path:
        """A grid PNG carrying the call's record (``from_png`` remakes the whole grid)."""
        from .images import save_grid

        nrow = nrow or self.nrow
        return save_grid(self.images, path, nrow=nrow, record={**self.record, "grid": True, "nrow": nrow})


@dataclass
class Inversion:
    """DDIM inversion of images: ``noise`` (N, C, H, W) in the units of a pipeline call's ``noise`` argument
    (the starting state divided by the grid's first sigma), and the settings that regenerate them."""

    noise: Tensor
    record: dict
    residual: float = 0.0  # the largest relative fixed-point residual of the last step
    seconds: float = 0.0
    regenerate: dict = field(default_factory=dict)  # pass as pipe(noise=inv.noise, **inv.regenerate)


# --------------------------------------------------------------------------------------------------------------
# Inputs: images and masks from files or tensors


def _load_picture(src, channels: int, size: int, what: str) -> tuple[Tensor, dict]:
    """(uint8 (N, C, size, size), record) of an image path / list of paths / PIL image / uint8 or [-1, 1] float
    tensor."""
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise DataError(f"{what} not found: {path}")
        try:
            arr = load_image(path, size, channels)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
            raise DataError(f"{what} {path}: not a readable image ({type(e).__name__}: {e})") from None
        u8 = torch.from_numpy(arr.copy())[None]
        return u8, {"path": str(path), "sha256": file_sha256(path)}
    if isinstance(src, (list, tuple)):
        parts = [_load_picture(s, channels, size, what) for s in src]
        u8 = torch.cat([p[0] for p in parts])
        if not all("path" in p[1] for p in parts):
            return u8, {"tensor_sha256": tensor_sha256(u8)}
        return u8, {"path": [p[1]["path"] for p in parts], "sha256": [p[1]["sha256"] for p in parts]}
    if hasattr(src, "convert") and hasattr(src, "size"):  # a PIL image
        from .data.datasets import image_array

        u8 = torch.from_numpy(image_array(src, size, channels).copy())[None]
        return u8, {"tensor_sha256": tensor_sha256(u8)}
    if torch.is_tensor(src):
        x = src if src.ndim == 4 else src[None]
        if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != (size, size):
            raise ConfigError(f"{what}: expected a (N, {channels}, {size}, {size}) tensor, got {tuple(src.shape)}")
        u8 = x if x.dtype == torch.uint8 else to_uint8(x)
        return u8.cpu(), {"tensor_sha256": tensor_sha256(u8)}
    raise ConfigError(f"{what}: give a file path or an image tensor, got {type(src).__name__}")


MASKS = ("lower-half", "upper-half", "left-half", "right-half", "center")  # named masks, for quick experiments


def named_mask(name: str, size: int) -> Tensor:
    """(1, 1, size, size) float mask of a named region (1 = repaint): a half, or the central half-size square."""
    m = torch.zeros(1, 1, size, size)
    h = size // 2
    region = {"lower-half": (slice(h, None), slice(None)), "upper-half": (slice(None, h), slice(None)),
              "left-half": (slice(None), slice(None, h)), "right-half": (slice(None), slice(h, None)),
              "center": (slice(size // 4, size - size // 4), slice(size // 4, size - size // 4))}[name]
    m[0, 0][region] = 1
    return m


def _load_mask(src, size: int) -> tuple[Tensor, dict]:
    """A float mask (N, 1, size, size) in {0, 1}: 1 = repaint (white in a mask image), 0 = keep; or a name of
    :data:`MASKS` (when no file of that name exists)."""
    if isinstance(src, str) and src in MASKS and not Path(src).exists():
        return named_mask(src, size), {"name": src}
    if torch.is_tensor(src) and src.dtype != torch.uint8:
        m = src.float()
        m = m[None, None] if m.ndim == 2 else (m[None] if m.ndim == 3 else m)
        if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (size, size):
            raise ConfigError(f"mask: expected (N, 1, {size}, {size}) values in [0, 1], got {tuple(src.shape)}")
        return (m > 0.5).float().cpu(), {"tensor_sha256": tensor_sha256((m > 0.5).to(torch.uint8))}
    u8, rec = _load_picture(src, 1, size, "mask")
    return (u8 >= 128).float(), rec


# --------------------------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """A checkpoint ready to make images: the denoiser, its conditioning (classes or a text encoder), its
    autoencoder (latent models), and where they came from. ``Pipeline.load(path)`` builds one from any
    checkpoint kakusan makes or imports; the trainer builds one over its EMA weights."""

    def __init__(self, denoiser, config: dict, *, source: str | None = None, weights_sha256: str | None = None,
                 autoencoder: LoadedAutoencoder | None = None, text_encoder=None, device="cpu",
                 use_ema: bool = True, loras: list[dict] | None = None):
        self.denoiser, self.config = denoiser, config
        self.controlnets: list[dict] = []  # the records of the attached ControlNets (attach_controlnet)
        self.guide: dict | None = None  # the record of the attached guide model (attach_guide)
        self._guide_denoiser = None  # the attached guide model's denoiser (attach_guide)
        self.schedule = denoiser.schedule
        self.source, self.weights_sha256 = source, weights_sha256
        self.autoencoder, self.device = autoencoder, torch.device(device)
        self._text_encoder = text_encoder  # an encoder, or a callable that makes one (loaded on first use)
        # the precision the denoiser resolved ('auto' means bf16 on some machines and models, fp32 on others):
        # records say which ran, so they repeat
        self.use_ema, self.loras = use_ema, loras or []
        self.precision = "fp32" if denoiser.autocast_dtype is None else "bf16"
        self._null_text = None
        self.embeddings: list[dict] = []  # textual-inversion embeddings loaded (add_embedding): their records
        self._pending_embeddings: list = []  # ... not yet added to the (lazily loaded) text encoder

    # ---- loading -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path, *, device="auto", precision: str = "auto", use_ema: bool = True,
             lora: str | Path | list | None = None, lora_scale: float | list = 1.0, text_encoder: str | None = None,
             autoencoder: str | None = None, offload: bool = False, tokenizer: str | None = None,
             prediction: str | None = None, image_size: int | None = None, compile: bool = False,
             controlnet: str | Path | list | None = None, guide: str | Path | None = None,
             embedding: str | Path | list | None = None) -> "Pipeline":
        """Any kakusan checkpoint (folder, run folder or model file): pixel or latent, class / text /
        unconditional, a LoRA run, a distilled model; or a Stable Diffusion 1.x / 2.x checkpoint (a diffusers
        pipeline folder or the original single file; see :mod:`kakusan.sd`: ``tokenizer``, ``prediction`` and
        ``image_size`` are for single files). ``lora``: adapter file(s) of a ``--lora-rank`` run to
        merge into this base (``lora_scale`` each); ``text_encoder`` / ``autoencoder``: where the recorded
        ones are now, if they moved (their weights are checked against the record). ``offload``: keep the text
        encoder and the autoencoder on the CPU while the network runs on ``device``. ``compile``: run the network
        through torch.compile with its weights frozen (see ``Denoiser.compile``; pays over many calls).
        ``controlnet``: ControlNet checkpoint(s) to attach (see :meth:`attach_controlnet`); a ControlNet run given as
        ``checkpoint`` loads the base it was trained on, with that ControlNet attached. ``guide``: a weaker
        version of this model to guide it with (autoguidance; see :meth:`attach_guide`). ``embedding``:
        textual-inversion embedding file(s) whose words the prompts may use (see :meth:`add_embedding`); a
        textual-inversion run given as ``checkpoint`` loads its base with its learned word."""
        # every option but the checkpoint, the ControlNets and the guide, in one dict (from the signature itself,
        # so an option added to it travels through the calls below too)
        options = {k: v for k, v in locals().items() if k not in ("cls", "checkpoint", "controlnet", "guide")}
        checkpoint = locate(checkpoint)  # the name of a shipped model (kakusan models): its file
        device = options["device"] = resolve_device(device)
        if guide is not None:  # the guide itself is loaded by attach_guide: this device / precision / use_ema only
            pipe = cls.load(checkpoint, **options, controlnet=controlnet)
            pipe.attach_guide(guide)
            return pipe
        controlnets = _listed(controlnet)
        base = _controlnet_base(checkpoint)
        if base is not None:  # a ControlNet run: its base, with it attached
            if not Path(base).exists():
                raise CheckpointError(f"{checkpoint} is a ControlNet; its base {base} (as recorded in training) is not "
                                      f"there: give it as --checkpoint BASE --controlnet {checkpoint}")
            return cls.load(base, **{**options, "controlnet": [checkpoint, *controlnets]})
        if controlnets:
            pipe = cls.load(checkpoint, **{**options, "compile": False})
            for c in controlnets:
                pipe.attach_controlnet(c)
            if compile:
                getattr(pipe.denoiser, "denoiser", pipe.denoiser).compile(frozen=True)
            return pipe
        from .sd import load_pipeline_parts, sd_layout

        files = _listed(lora)
        scales = lora_scale if isinstance(lora_scale, (list, tuple)) else [lora_scale] * len(files)
        if len(scales) != len(files):
            raise ConfigError(f"{len(files)} LoRA files but {len(scales)} scales")
        for s in scales:
            _finite("lora_scale", s)
        adapters = _adapter_run(checkpoint)
        if adapters is not None:  # a LoRA run on a Stable Diffusion base: the base, with the run's adapters
            base, adapter = adapters
            if not use_ema:
                raise ConfigError(f"{checkpoint}: a LoRA run's shared adapters are its EMA weights; --no-ema does "
                                  f"not apply")
            if not Path(base).exists():
                raise CheckpointError(f"{checkpoint} is a LoRA run; its base {base} (as recorded in training) is not "
                                      f"there: give it as --checkpoint BASE --lora {adapter}")
            return cls.load(base, **{**options, "lora": [adapter, *files], "lora_scale": [1.0, *scales]})
        if sd_layout(checkpoint) is not None:
            if text_encoder or autoencoder or not use_ema:
                raise ConfigError("--text-encoder / --autoencoder / --no-ema do not apply to a Stable Diffusion "
                                  "checkpoint read directly (import it with kakusan import-sd first)")
            denoiser, config, encoder, ae, sha = load_pipeline_parts(
                checkpoint, device=device, precision=precision, offload=offload, tokenizer=tokenizer,
                prediction=prediction, image_size=image_size)
            loras = [_merge_lora(denoiser, f, s, sha, text_model=encoder.model) for f, s in zip(files, scales)]
            if denoiser.autocast_dtype == torch.bfloat16:  # (after the LoRA merge, which adds in fp32) the U-Net's
                denoiser.backbone.to(torch.bfloat16)  # weights in bf16, as autocast would cast them at every call:
                # the same outputs, without re-casting 860M weights per evaluation (1.45x faster on a CPU)
            if compile:
                denoiser.compile(frozen=True)
            return cls(denoiser, config, source=str(checkpoint), weights_sha256=sha, autoencoder=ae,
                       text_encoder=encoder, device=device, use_ema=True, loras=loras).add_embeddings(embedding)
        if tokenizer or prediction or image_size:
            raise ConfigError("--tokenizer / --prediction / --image-size are for Stable Diffusion single files")
        ckpt = resolve_checkpoint(checkpoint)
        learned = _textual_inversion_run(ckpt)
        if learned is not None:  # a textual-inversion run: its base, with its word
            base, file = learned
            return cls.load(base, **{**options, "embedding": [file, *_listed(embedding)]})
        weights = weights_file(ckpt, use_ema)
        weights_sha256 = file_sha256(weights)  # read once: each LoRA's base check and the record use it
        denoiser, config = load_denoiser(ckpt, use_ema=use_ema, device=device, precision=precision)
        side = torch.device("cpu") if offload else device  # where the text encoder and autoencoder run
        encoder = None
        if config.get("text_encoder"):
            from .conditioning import encoder_for_checkpoint

            record = config["text_encoder"]
            encoder = lambda: encoder_for_checkpoint(record, text_encoder, side)  # noqa: E731
        elif text_encoder:
            raise ConfigError("--text-encoder given, but this checkpoint is not text-conditional")
        loras = []
        for f, s in zip(files, scales):
            if encoder is not None and not hasattr(encoder, "encode") and _adapts_text_encoder(f):
                encoder = encoder()  # loaded now: this LoRA merges into it
            loras.append(_merge_lora(denoiser, f, s, weights_sha256,
                                     text_model=getattr(encoder, "model", None)))
        if compile:  # after the LoRA merge: the compiled graph holds the final weights
            getattr(denoiser, "denoiser", denoiser).compile(frozen=True)
        decoder = autoencoder_for_checkpoint(config, autoencoder, side)
        return cls(denoiser, config, source=str(ckpt), weights_sha256=weights_sha256, autoencoder=decoder,
                   text_encoder=encoder, device=device, use_ema=use_ema, loras=loras).add_embeddings(embedding)

    def add_embeddings(self, files) -> "Pipeline":
        for f in _listed(files):
            self.add_embedding(f)
        return self

    def add_embedding(self, path: str | Path) -> dict:
        """Teach this text model's encoder the word of a textual-inversion embedding file (diffusers'
        ``learned_embeds.safetensors`` layout, kakusan's own, or A1111 / kohya's ``emb_params`` /
        ``string_to_param``: see :mod:`kakusan.conditioning.embeddings`), for use in prompts. A kakusan file made
        for another text encoder is refused; so is a word already known. Returns its record (path, sha256, word,
        vectors), which goes into every image's record."""
        from .conditioning.embeddings import read_embedding_file

        if not self.is_text:
            raise ConfigError(f"--embedding {path}: this checkpoint is not text-conditional (embeddings are new "
                              f"words for a text model's prompts)")
        emb = read_embedding_file(path)
        rec = self.config["text_encoder"]
        if emb.text_encoder is not None and emb.text_encoder.get("sha256") != rec["sha256"]:
            raise CheckpointError(f"{path}: an embedding for another text encoder ({emb.text_encoder.get('spec')!r}, "
                                  f"sha256 {str(emb.text_encoder.get('sha256'))[:12]}); this model reads "
                                  f"{rec['spec']!r} (sha256 {rec['sha256'][:12]})")
        if rec.get("dim") and emb.vectors.shape[1] != rec["dim"]:
            raise ConfigError(f"{path}: {emb.vectors.shape[1]}-wide vectors; this model's text encoder "
                              f"({rec['spec']}) has {rec['dim']}-wide tokens")
        if emb.token in {e["token"] for e in self.embeddings}:
            raise ConfigError(f"{path}: the word {emb.token!r} is already loaded (from another embedding file)")
        record = {"path": str(path), "sha256": file_sha256(path), "token": emb.token,
                  "num_vectors": int(emb.vectors.shape[0])}
        self._pending_embeddings.append(emb)
        self.embeddings.append(record)
        if not callable(self._text_encoder) or hasattr(self._text_encoder, "encode"):  # already loaded: now
            self._add_pending()
        return record

    def _add_pending(self) -> None:
        while self._pending_embeddings:
            emb = self._pending_embeddings.pop(0)
            self._text_encoder.add_tokens(emb.token, emb.vectors)

    @classmethod
    def from_png(cls, png: str | Path, checkpoint: str | Path | None = None, *, device="cpu",
                 **load_options) -> Generation:
        """Make the image (or grid) of a kakusan PNG again from the record it carries: from ``checkpoint`` or
        the one recorded, which must be the same weights (else an error naming what differs)."""
        record = read_png_record(png)
        if not load_options.get("controlnet") and record.get("control") and \
                _controlnet_base(checkpoint or record["checkpoint"]) is None:  # (a ControlNet run brings its own)
            load_options["controlnet"] = [c["controlnet"] for c in record["control"]]
        if record.get("guide") and not load_options.get("guide"):
            load_options["guide"] = record["guide"]["path"]
            if not Path(load_options["guide"]).exists():
                raise CheckpointError(f"this image was autoguided by {load_options['guide']}, which is not there: "
                                      f"give the same guide model where it is now (guide=, --guide-model)")
        if record.get("embeddings") and not load_options.get("embedding"):
            load_options["embedding"] = [e["path"] for e in record["embeddings"]]
        pipe = cls.load(checkpoint or record["checkpoint"], device=device, use_ema=record.get("use_ema", True),
                        lora=[lr["path"] for lr in record.get("lora", [])] or None,
                        lora_scale=[lr["scale"] for lr in record.get("lora", [])] or 1.0,
                        precision=record.get("precision", "auto"), **load_options)
        return pipe.regenerate(record)

    def attach_controlnet(self, path: str | Path) -> dict:
        """Steer this model with a ControlNet: a kakusan ControlNet checkpoint trained on exactly these base
        weights (else refused), or for a Stable Diffusion base a diffusers ``ControlNetModel`` folder or a
        community single file. Several attach in order; calls then give one control image each (``control``)."""
        from .control import load_controlnet
        from .models.controlnet import ControlledUNet

        d = getattr(self.denoiser, "denoiser", self.denoiser)  # under a consistency wrapper: the denoiser
        if d.compiled:
            raise ConfigError("attach ControlNets before compiling (Pipeline.load(..., controlnet=..., compile=True))")
        net, record = load_controlnet(path, base_sha256=self.weights_sha256, base_config=self.config,
                                      device=self.device, base_weights_ema=self.use_ema)
        if isinstance(d.backbone, ControlledUNet):
            d.backbone.controlnets.append(net)
        else:
            d.backbone = ControlledUNet(d.backbone, [net])
        self.controlnets.append(record)
        return record

    def attach_guide(self, path: str | Path) -> dict:
        """Guide this model with a weaker version of itself (autoguidance, Karras et al. 2024): a kakusan checkpoint
        of the same image (or latent) shape and conditioning (the same classes, or the same text encoder; the
        same autoencoder for a latent model), e.g. a smaller preset or an earlier checkpoint. Its schedule and
        prediction may differ (it is then called at the same noise level, see :class:`AutoGuidance`). With a
        guide attached, ``guidance=w`` is autoguidance instead of classifier-free guidance; ControlNets and
        LoRA adapters act on this (the main) model only. Loaded with this pipeline's device, precision and
        EMA choice. Returns its record (path, weights sha256, use_ema)."""
        if self.guide is not None:
            raise ConfigError(f"a guide model is already attached ({self.guide['path']})")
        if self.distilled:
            raise ConfigError("autoguidance needs a diffusion model: this one is distilled (a consistency model)")
        ckpt = resolve_checkpoint(path)
        from .checkpoints import read_config

        problem = _guide_mismatch(self.config, read_config(ckpt))
        if problem:
            raise ConfigError(f"guide model {ckpt}: {problem}")
        self._guide_denoiser, _ = load_denoiser(ckpt, use_ema=self.use_ema, device=self.device,
                                                precision=self.precision)
        self.guide = {"path": str(ckpt), "sha256": file_sha256(weights_file(ckpt, self.use_ema)),
                      "use_ema": self.use_ema}
        return self.guide

    def _control(self, control, n: int, control_type, control_scale, cond_only: bool
                 ) -> tuple[tuple[Tensor, ...], tuple[float, ...], list[dict]]:
        """(hints (n, C, H, W) in [0, 1] per ControlNet, scales, records) of a call's control images."""
        from .control import CONTROL_TYPES, control_maps, hint_shape

        k = len(self.controlnets)
        if not k:
            raise ConfigError("control images given, but no ControlNet is attached (--controlnet PATH, or sample "
                              "a ControlNet run)")
        images = list(control) if isinstance(control, list) and k > 1 else [control]
        if len(images) != k:
            raise ConfigError(f"{len(images)} control image(s) for {k} ControlNets (give one each)")
        types = list(control_type) if isinstance(control_type, (list, tuple)) else [control_type] * k
        scales = list(control_scale) if isinstance(control_scale, (list, tuple)) else [control_scale] * k
        if len(types) != k or len(scales) != k:
            raise ConfigError(f"{k} ControlNets: give one control type and scale each (or one for all)")
        scales = [_finite("control_scale", s) for s in scales]
        nets = getattr(self.denoiser, "denoiser", self.denoiser).backbone.controlnets
        c, h, _ = self.image_shape
        hints, records = [], []
        for net, img, kind, scale, rec in zip(nets, images, types, scales, self.controlnets):
            channels, _factor = hint_shape(net)
            if kind is not None and kind not in CONTROL_TYPES:
                raise ConfigError(f"unknown control type {kind!r}; choose from {', '.join(CONTROL_TYPES)} (or none: "
                                  f"the image is the control map)")
            if isinstance(img, (list, tuple)) and img and all(torch.is_tensor(i) and i.is_floating_point()
                                                               for i in img):  # float maps, one per image
                img = torch.cat([i if i.ndim == 4 else i[None] for i in img])
            if kind is None and torch.is_tensor(img) and img.is_floating_point():  # a map in [0, 1] (diffusers')
                hint = img if img.ndim == 4 else img[None]
                if tuple(hint.shape[1:]) != (channels, h, h) or not torch.isfinite(hint).all() or \
                        hint.min() < 0 or hint.max() > 1:
                    raise ConfigError(f"control image: a float tensor is a map of shape (N, {channels}, {h}, {h}) "
                                      f"with values in [0, 1], got {tuple(img.shape)}")
                hint, pic_rec = hint.float().cpu(), {"tensor_sha256": tensor_sha256(hint.float())}
            elif kind is None:  # the control map itself: [0, 1] from the image's values
                u8, pic_rec = _load_picture(img, channels, h, "control image")
                hint = u8.float() / 255
            else:  # computed from a picture
                u8, pic_rec = _load_picture(img, c, h, "control image")
                hint = control_maps(u8, kind).expand(-1, channels, -1, -1)
            records.append({"controlnet": rec["path"], "controlnet_sha256": rec["sha256"], "image": pic_rec,
                            "type": kind, "scale": scale})
            hints.append(_expand("control image", hint, n).contiguous())
        return tuple(hints), tuple(scales), records

    # ---- what the checkpoint is --------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.config["model"].get("num_classes", 0) or 0)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("data", {}).get("class_names") or [])

    @property
    def is_text(self) -> bool:
        return bool(self.config.get("text_encoder"))

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def distilled(self) -> bool:
        return "consistency" in self.config

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the sampler draws (latents for a latent model)."""
        mc = self.config["model"]
        return mc["in_channels"], mc["image_size"], mc["image_size"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it returns."""
        c, h, w = self.shape
        if self.autoencoder is None:
            return c, h, w
        f = self.autoencoder.factor
        return self.autoencoder.in_channels, h * f, w * f

    def defaults(self) -> tuple[str, int]:
        """(sampler, steps) used when a call names none: lcm in 4 steps for a distilled model, else the default
        solver in 20 steps."""
        return sampling_defaults(self.config)

    @property
    def text_encoder(self):
        if callable(self._text_encoder) and not hasattr(self._text_encoder, "encode"):
            self._text_encoder = self._text_encoder()
            self._add_pending()
        return self._text_encoder

    # ---- conditions --------------------------------------------------------------------------------------
    def _conditions(self, n: int | None, prompt, class_label, k: int, guidance: float | None = None
                    ) -> tuple[int, list, int | None]:
        """(n, per-image conditions (class int / prompt str / None), images per grid row)."""
        if self.is_text:
            if class_label is not None:
                raise ConfigError("this checkpoint is text-conditional: give --prompt TEXT (prompt=), not --class")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if prompts:
                from .conditioning import check_prompts

                check_prompts(prompts)
            if not prompts and guidance is not None:
                raise ConfigError("--guidance on a text model needs --prompt TEXT (prompt=)")
            if not prompts:  # unconditional samples: the empty prompt, the model's null input
                n = _int("n", 1 if n is None else n, 1, MAX_N)
                return n, [""] * n, None
            per = 1 if n is None else -(-_int("n", n, 1, MAX_N) // len(prompts))
            if n is not None and per * len(prompts) != n:
                warnings.warn(f"n = {n} split over {len(prompts)} prompts: {per} each, {per * len(prompts)} in all")
            return per * len(prompts), [p for p in prompts for _ in range(per)], per if len(prompts) > 1 else None
        if prompt is not None and (not isinstance(prompt, (list, tuple)) or prompt):
            raise ConfigError("--prompt given, but this checkpoint is not text-conditional (trained without "
                              "--cond text)")
        if class_label is not None:
            if not k:
                raise ConfigError("--class given, but this checkpoint is unconditional (trained without "
                                  "--cond class)")
            labels = [class_label] if isinstance(class_label, int) else list(class_label)
            for c in labels:
                if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k:
                    raise ConfigError(f"--class {c!r} is out of range: this model has classes 0..{k - 1}")
            if isinstance(class_label, int):
                n = _int("n", 1 if n is None else n, 1, MAX_N)
                return n, labels * n, None
            if n is not None and n != len(labels):
                raise ConfigError(f"{len(labels)} class labels given for n = {n}")
            return len(labels), labels, None
        if k:  # a class model without a class: one row per class
            n = _int("n", k if n is None else n, 1, MAX_N)
            per = -(-n // k)
            if n < k:
                warnings.warn(f"n = {n} is below the model's {k} classes: only classes 0..{n - 1} are drawn")
            return n, [i // per for i in range(n)], per
        n = _int("n", 1 if n is None else n, 1, MAX_N)
        return n, [None] * n, None

    def _encode(self, conds: list):
        """The batch condition for a list of per-image conditions."""
        if self.is_text:
            position = {c: i for i, c in enumerate(dict.fromkeys(conds))}  # each distinct prompt encoded once
            encoded = self.text_encoder.encode(list(position))
            encoded = encoded[torch.tensor([position[c] for c in conds], device=encoded.device)]
            return encoded.to(self.device)  # (the encoder may be offloaded to the CPU)
        if conds[0] is None:
            return None
        return torch.tensor(conds, device=self.device)

    def null_text(self):
        if self._null_text is None:
            self._null_text = self.text_encoder.encode("")
        return self._null_text

    # ---- the guided denoiser -----------------------------------------------------------------------------
    def guided_denoiser(self, *, guidance: float | None = None, negative_prompt: str | None = None,
                        negative_class: int | None = None, guidance_rescale: float = 0.0,
                        guidance_interval: tuple[float, float] | None = None, classifier=None,
                        classifier_scale: float = 1.0, clip: bool = True) -> tuple[torch.nn.Module, int, dict]:
        """(denoiser with the chosen guidance and clipping, number of classes, record of the guidance). With a
        guide model attached (:meth:`attach_guide`), ``guidance`` is autoguidance."""
        k, record = self.num_classes, {}
        base = self.denoiser
        if self.guide is not None:
            if classifier is not None:
                raise ConfigError("a guide model (autoguidance) and classifier guidance do not combine: choose one")
            if guidance is not None:
                return self._autoguided(guidance, negative_prompt, negative_class, guidance_rescale,
                                        guidance_interval, clip)
        if guidance is not None:
            _finite("guidance", guidance, 0.0)
            if self.distilled and self.config["consistency"].get("guidance") is not None:
                warnings.warn(f"this model was distilled with guidance {self.config['consistency']['guidance']:g} "
                              f"baked in; guidance {guidance:g} is applied on top of it (1 = as distilled)")
        _finite("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_interval(guidance_interval, self.schedule)
        if classifier is not None:
            if guidance is not None:
                raise ConfigError("choose one of guidance (classifier-free) and classifier (classifier guidance)")
            if self.is_text:
                raise ConfigError("classifier guidance works with unconditional and class-conditional models, "
                                  "not text ones")
            _finite("classifier_scale", classifier_scale)
            from .metrics.classifier import load_classifier

            clf, _ = load_classifier(classifier)
            if clf.cfg.schedule is None or clf.cfg.schedule != self.config["schedule"]:
                raise ConfigError(f"{classifier}: classifier guidance needs a classifier trained on noisy images "
                                  f"of this model's schedule ({self.config['schedule']['name']}; train-classifier "
                                  f"--noisy), this one has {clf.cfg.schedule}")
            if k and clf.cfg.num_classes != k:
                raise ConfigError(f"the classifier has {clf.cfg.num_classes} classes, the model {k}")
            base = ClassifierGuidance(self.denoiser, clf.to(self.device).eval(), classifier_scale, self.schedule,
                                      pass_cond=bool(k))
            record["classifier"] = {"path": str(classifier), "sha256": file_sha256(classifier),
                                    "scale": float(classifier_scale)}
            k = clf.cfg.num_classes
        d = self._clipped(base, clip)
        if self.is_text:
            if negative_class is not None:
                raise ConfigError("this checkpoint is text-conditional: give --negative-prompt, not --negative-class")
            negative = None
            if negative_prompt is not None:
                from .conditioning import check_prompts

                check_prompts([negative_prompt])
                negative = self.text_encoder.encode(negative_prompt)
            null = self.null_text() if guidance is not None else None
        else:
            if negative_prompt is not None:
                raise ConfigError("--negative-prompt given, but this checkpoint is not text-conditional (trained "
                                  "without --cond text)")
            if negative_class is not None and not (isinstance(negative_class, int) and 0 <= negative_class < k):
                raise ConfigError(f"--negative-class {negative_class!r} is out of range: classes are 0..{k - 1}"
                                  if k else "a negative class needs a class-conditional checkpoint")
            negative, null = negative_class, k
        if guidance is not None:
            if not (self.num_classes or self.is_text):
                raise ConfigError("--guidance needs a class- or text-conditional checkpoint; this one is "
                                  "unconditional")
            d = ClassifierFreeGuidance(d, guidance, null_cond=null, negative=negative, rescale=guidance_rescale,
                                       interval=None if guidance_interval is None else tuple(guidance_interval),
                                       schedule=self.schedule)
        elif negative is not None or guidance_rescale or guidance_interval:
            raise ConfigError("--negative-class / --negative-prompt / --guidance-rescale / --guidance-interval "
                              "need --guidance W")
        record.update({"guidance": None if guidance is None else float(guidance),
                       "negative_prompt": negative_prompt, "negative_class": negative_class,
                       "guidance_rescale": float(guidance_rescale),
                       "guidance_interval": None if guidance_interval is None else [float(v) for v in
                                                                                    guidance_interval]})
        return d, k, record

    def _clipped(self, d, clip: bool):
        """``d`` with x0_hat clamped to the data range (``clip``; pixel models only: latents have no fixed range)."""
        return d if not clip or self.autoencoder is not None else ClippedDenoiser(d)

    def _autoguided(self, guidance: float, negative_prompt, negative_class, guidance_rescale, guidance_interval,
                    clip: bool) -> tuple[torch.nn.Module, int, dict]:
        """guided_denoiser's result for autoguidance with the attached guide."""
        _finite("guidance", guidance, 0.0)
        if negative_prompt is not None or negative_class is not None:
            raise ConfigError("a negative prompt / class is classifier-free guidance's: autoguidance (a guide model "
                              "attached) guides with the same condition in both models")
        if guidance_rescale:
            raise ConfigError("guidance rescale is classifier-free guidance's option, not autoguidance's")
        check_interval(guidance_interval, self.schedule)
        guide = self._guide_denoiser
        same = (torch.equal(guide.schedule.alpha_bar, self.schedule.alpha_bar)
                and guide.schedule.flow == self.schedule.flow)
        d = AutoGuidance(self._clipped(self.denoiser, clip), self._clipped(guide, clip), guidance,
                         interval=None if guidance_interval is None else tuple(guidance_interval),
                         schedule=self.schedule, guide_schedule=None if same else guide.schedule)
        record = {"guidance": float(guidance), "guidance_kind": "auto", "guide": dict(self.guide),
                  "negative_prompt": None, "negative_class": None, "guidance_rescale": 0.0,
                  "guidance_interval": None if guidance_interval is None else [float(v) for v in guidance_interval]}
        return d, self.num_classes, record

    # ---- a call ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, negative_prompt: str | None = None,
                 class_label: int | list[int] | None = None, negative_class: int | None = None,
                 n: int | None = None, sampler: str | None = None, steps: int | None = None,
                 spacing: str | None = None, sigma_max: float | None = None, eta: float | None = None,
                 guidance: float | None = None, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | None = None, classifier: str | Path | None = None,
                 classifier_scale: float = 1.0, seed: int = 0, batch_size: int | None = None,
                 noise: Tensor | None = None, init_image=None, strength: float | None = None, mask=None,
                 resample_steps: int = 1, clip: bool = True, callback=None, progress: bool = False,
                 batches: list[int] | None = None, control=None, control_type: str | list | None = None,
                 control_scale: float | list = 1.0, control_cond_only: bool = False) -> Generation:
        """Make images. ``n`` images (default: one per class for a class model, one per prompt, else 1), with
        ``sampler`` over ``steps`` (default :meth:`defaults`). Guidance: ``guidance`` (classifier-free, with a
        negative prompt / class, rescale, interval) or ``classifier`` (a noise-aware classifier file).
        Starts: fresh noise (``seed``, or ``noise``: standard-normal (n, C, H, W)); ``init_image`` with
        ``strength`` in [0, 1] (img2img: noised to that level, then sampled); ``init_image`` with ``mask``
        (white = repaint; ``resample_steps`` > 1: RePaint's resampling). ``callback(info)`` after each step
        (``batch``, ``i``, ``t``, ``x``, ``x0_hat``). ``batches``: make only these batches (regeneration).
        ``control``: with ControlNets attached, the control image (one for all n, or one per image; a list of
        those with several ControlNets): the control map itself (an image, 0..255 -> [0, 1], or a float tensor
        in [0, 1]), or a picture whose
        ``control_type`` map (canny / sobel / scribble) is computed; ``control_scale`` weighs each ControlNet's
        residuals; ``control_cond_only`` steers only the conditional branch of classifier-free guidance."""
        t_start = time.perf_counter()
        default_sampler, default_steps = self.defaults()
        sampler = sampler or default_sampler
        get_sampler(sampler)  # an unknown name fails here
        steps = default_steps if steps is None else _int("steps", steps, 1, MAX_STEPS)
        seed = _int("seed", seed, 0, 2**63 - 1)
        resample_steps = _int("resample_steps", resample_steps, 1, 100)
        options = {}
        if eta is not None:
            options["eta"] = _finite("eta", eta, 0.0, 1.0)
            if sampler not in ("ddim",):
                raise ConfigError(f"eta is DDIM's option; the {sampler} sampler does not take it")
        if sigma_max is not None:
            _finite("sigma_max", sigma_max, allow_inf_hi=True)
            if not sigma_max > 0:
                raise ConfigError(f"sigma_max must be positive, got {sigma_max}")
        d, k, guide_record = self.guided_denoiser(
            guidance=guidance, negative_prompt=negative_prompt, negative_class=negative_class,
            guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, classifier=classifier,
            classifier_scale=classifier_scale, clip=clip)
        n, conds, nrow = self._conditions(n, prompt, class_label, k, guidance)  # k: a guiding classifier's classes
        batch_size = min(n, 256) if batch_size is None else _int("batch_size", batch_size, 1, MAX_N)
        grid, levels = sampling_plan(self.schedule, sampler, steps, spacing, sigma_max)
        options.update(grid.options())

        start_record, x0_init, m = {}, None, None
        c, h, w = self.image_shape
        if strength is not None and init_image is None:
            raise ConfigError("strength is img2img's option: give an init image")
        if mask is not None and init_image is None:
            raise ConfigError("a mask needs the image it applies to: give an init image")
        if init_image is not None:
            strength = (1.0 if mask is not None else 0.8) if strength is None else \
                _finite("strength", strength, 0.0, 1.0)
            pics, pic_rec = _load_picture(init_image, c, h, "init image")
            pics = _expand("init image", pics, n)
            start_record.update({"init_image": pic_rec, "strength": strength})
            if mask is not None:
                m, mask_rec = _load_mask(mask, h)
                m = _expand("mask", m, n)
                start_record.update({"mask": mask_rec, "resample_steps": resample_steps})
            x0_init = pics
        elif resample_steps != 1:
            raise ConfigError("resample_steps is inpainting's option: give an init image and a mask")
        hints = None
        if control is not None:
            hints, control_scales, start_record["control"] = self._control(control, n, control_type, control_scale,
                                                                           control_cond_only)
            start_record["control_cond_only"] = bool(control_cond_only)
            if control_cond_only and guidance is None:
                raise ConfigError("control_cond_only steers the conditional branch of guidance: it needs guidance")
            if control_cond_only and self.guide is not None:
                raise ConfigError("control_cond_only is classifier-free guidance's option: under autoguidance the "
                                  "ControlNets steer the main model only already")
        elif control_cond_only or (control_type is not None):
            raise ConfigError("control_type / control_cond_only need a control image")
        if noise is not None:
            if not torch.is_tensor(noise) or tuple(noise.shape) != (n, *self.shape):
                raise ConfigError(f"noise must be a tensor of shape {(n, *self.shape)}, got "
                                  f"{tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}")
            if not torch.isfinite(noise).all():
                raise ConfigError("noise has NaN or inf values")
            start_record["noise_sha256"] = tensor_sha256(noise)

        record = {"kakusan_version": __version__, "checkpoint": self.source, "checkpoint_sha256": self.weights_sha256,
                  "use_ema": self.use_ema, "lora": self.loras, **({"embeddings": self.embeddings} if self.embeddings
                                                                  else {}), "sampler": sampler, "steps": steps,
                  **grid.record(), "eta": options.get("eta"),
                  "nfe": model_calls(sampler, self.schedule, steps, spacing, sigma_max),
                  **guide_record, "prompt": None, "class_label": None, "seed": seed, "n": n,
                  "batch_size": batch_size, "clip": clip, "precision": self.precision, "device": str(self.device),
                  **start_record}
        if self.is_text:
            record["prompt"] = prompt if prompt is None or isinstance(prompt, str) else list(prompt)
        else:
            record["class_label"] = class_label

        out, records = [], []
        all_batches = range(-(-n // batch_size))
        for j in (all_batches if batches is None else batches):
            lo, hi = j * batch_size, min(n, (j + 1) * batch_size)
            if not 0 <= lo < n:
                raise ConfigError(f"batch {j} is outside the call's {-(-n // batch_size)} batches")
            generator = torch.Generator().manual_seed(seed + j)
            cond = self._encode(conds[lo:hi])
            if hints is not None:
                from .conditioning.control import ControlCond

                cond = ControlCond.of(cond, [hint[lo:hi].to(self.device) for hint in hints], control_scales,
                                      cond_only=control_cond_only)
            x = self._run_batch(d, sampler, levels, (hi - lo, *self.shape), cond, generator, options,
                                None if noise is None else noise[lo:hi],
                                None if x0_init is None else x0_init[lo:hi], strength,
                                None if m is None else m[lo:hi], resample_steps, callback, progress, j)
            out.append(x.float().cpu())
            records += [{**record, "index": i, "cond": conds[i]} for i in range(lo, hi)]
        images = torch.cat(out)
        return Generation(images, records, time.perf_counter() - t_start, record["nfe"], nrow)

    def _run_batch(self, d, sampler: str, levels: NoiseLevels, shape, cond, generator, options, noise, pics,
                   strength, m, resample_steps: int, callback, progress: bool, j: int) -> Tensor:
        dev = self.device
        eps = randn(shape, generator, dev) if noise is None else noise.to(dev, torch.float32)
        cb = None if callback is None else (lambda info: callback({**info, "batch": j}))
        x0 = None
        if pics is not None:  # the known image in the sampler's space (latents: encoded means)
            x0 = to_model_range(pics).to(dev)
            if self.autoencoder is not None:
                x0 = self.autoencoder.to_latent(x0)
        steps = levels.num_steps
        if strength is not None:
            run = min(int(steps * strength), steps)  # diffusers' rule: strength 0.3 of 20 steps runs 6
            if run == 0:  # nothing to do: the input itself
                return to_model_range(pics)
            k0 = steps - run
        else:
            k0 = 0
        sub = NoiseLevels(levels.t[k0:], levels.alpha[k0:], levels.sigma[k0:])
        a0, s0 = sub.alpha[0].item(), sub.sigma[0].item()
        if k0 == 0:  # from noise alone, as plain generation (strength 1 ignores the image outside any mask)
            x = eps * s0
        else:  # SDEdit: the image noised to the start level, x = alpha x0 + sigma eps
            x = a0 * x0 + s0 * eps
        if m is None:
            x = run_sampler(sampler, d, x, sub, self.schedule, cond=cond, generator=generator, callback=cb,
                            progress=progress, **options)
        else:
            # the mask at latent resolution: a latent is repainted if any of its pixels is
            ml = (m if self.autoencoder is None else F.max_pool2d(m, self.autoencoder.factor)).to(dev)
            x = ml * x + (1 - ml) * (a0 * x0 + s0 * eps)  # the known region at the start level, the same noise
            x = self._inpaint(d, sampler, x, x0, ml, sub, cond, generator, options, resample_steps, cb, progress)
        if self.autoencoder is not None:
            x = self.autoencoder.from_latent(x)
            if m is not None:  # the decoded repaint, the original pixels elsewhere
                m = m.to(x.device)
                x = m * x.clamp(-1, 1) + (1 - m) * to_model_range(pics).to(x.device)
        return x.clamp(-1, 1)

    def _inpaint(self, d, sampler, x, x0, m, levels: NoiseLevels, cond, generator, options, resample_steps,
                 callback, progress) -> Tensor:
        """RePaint (Lugmayr et al. 2022, Alg. 1) with any sampler: each interval of the grid is one sampler
        step (multistep solvers therefore take their first-order step), after which the known region is
        replaced by the known image noised to the new level with fresh noise; with ``resample_steps`` = U > 1,
        each interval is done U times, jumping back by the forward process between tries."""
        from tqdm.auto import tqdm

        dev = x.device
        known = lambda a, s: a * x0 + s * randn(x.shape, generator, dev)  # noqa: E731
        for i in tqdm(range(levels.num_steps), desc="inpainting", leave=False, disable=None if progress else True):
            lv = NoiseLevels(levels.t[i:i + 2], levels.alpha[i:i + 2], levels.sigma[i:i + 2])
            a_t, s_t, a_s, s_s = (lv.alpha[0].item(), lv.sigma[0].item(), lv.alpha[1].item(), lv.sigma[1].item())
            for u in range(resample_steps):
                step_cb = None if callback is None else (lambda info, i=i: callback({**info, "i": i}))
                x = run_sampler(sampler, d, x, lv, self.schedule, cond=cond, generator=generator,
                                callback=step_cb if u == resample_steps - 1 else None, **options)
                x = m * x + (1 - m) * known(a_s, s_s)
                if u < resample_steps - 1:  # back to level i: q(x_t | x_s) = N((a_t/a_s) x_s, s_t^2 - (a_t s_s/a_s)^2)
                    r = a_t / a_s
                    x = r * x + max(s_t**2 - (r * s_s) ** 2, 0.0) ** 0.5 * randn(x.shape, generator, dev)
        return m * x + (1 - m) * x0

    # ---- inversion ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images, *, prompt: str | list[str] | None = None, class_label: int | list[int] | None = None,
               steps: int = 50, spacing: str | None = None, sigma_max: float | None = None,
               guidance: float | None = None, iterations: int = 2, clip: bool = True, progress: bool = False
               ) -> Inversion:
        """DDIM inversion (Song et al. 2021, sec. 4.3): the deterministic DDIM update run backwards, from the
        images to the grid's noisiest level, with the same (guided, clipped) denoiser sampling uses. Each
        backward step starts from the usual explicit guess (the denoiser evaluated at the known, less noisy
        state) and refines it by ``iterations`` fixed-point iterations of the forward step's equation (one model
        evaluation each; stopped early if they stop improving), so that DDIM sampling over the same grid from
        the result gives the images back. Regenerate with ``pipe(noise=inv.noise, **inv.regenerate)``."""
        steps = _int("steps", steps, 1, MAX_STEPS)
        iterations = _int("iterations", iterations, 0, 50)
        c, h, w = self.image_shape
        pics, pic_rec = _load_picture(images, c, h, "image")
        if self.num_classes and class_label is None:
            raise ConfigError("inverting on a class-conditional model needs the images' class (class_label)")
        n, conds, _ = self._conditions(len(pics), prompt, class_label, self.num_classes)
        if n != len(pics):
            raise ConfigError(f"{len(pics)} images but {n} conditions")
        d, _, guide_record = self.guided_denoiser(guidance=guidance, clip=clip)
        cond = self._encode(conds)
        levels = sampling_levels(self.schedule, "ddim", steps, spacing, sigma_max)
        t0 = time.perf_counter()
        x = to_model_range(pics).to(self.device)
        if self.autoencoder is not None:
            x = self.autoencoder.to_latent(x)
        D = lambda x_, t_: d(x_, torch.full((n,), t_, device=self.device), cond)  # noqa: E731
        worst = 0.0
        from tqdm.auto import tqdm

        for i in tqdm(range(steps - 1, -1, -1), desc="inverting", leave=False, disable=None if progress else True):
            # find x_t (level i) with  DDIM(x_t) = x_s (level i + 1):  x_s = a_s D(x_t) + s_s (x_t - a_t D(x_t)) / s_t
            t, a_t, s_t = levels.t[i].item(), levels.alpha[i].item(), levels.sigma[i].item()
            t_s, a_s, s_s = levels.t[i + 1].item(), levels.alpha[i + 1].item(), levels.sigma[i + 1].item()
            x_s = x
            if s_s > 0:  # explicit guess: x0_hat and eps_hat at the known state
                x0_hat = D(x_s, t_s)
                x_t = a_t * x0_hat + s_t * (x_s - a_s * x0_hat) / s_s
                update = lambda x_t: (s_t / s_s) * x_s + (a_t - a_s * s_t / s_s) * D(x_t, t)  # noqa: E731
            else:  # from the clean image: the slope taken at the target level
                x_t = a_t * x_s + s_t * (x_s - a_t * D(x_s, t)) / s_t
                update = lambda x_t: x_t + a_t * (x_s - D(x_t, t))  # noqa: E731  # until D(x_t) = x_s
            res = math.inf
            for _ in range(iterations):
                new = update(x_t)
                r = ((new - x_t).norm() / x_t.norm().clamp_min(1e-12)).item()
                if not r < res:  # diverging (a step too long for the iteration): keep the last iterate
                    break
                x_t, res = new, r
            worst = max(worst, res if math.isfinite(res) else 0.0)
            x = x_t
        noise = (x / levels.sigma[0].item()).float().cpu()
        record = {"kakusan_version": __version__, "checkpoint": self.source, "checkpoint_sha256": self.weights_sha256,
                  "image": pic_rec, "steps": steps, "spacing": spacing or get_sampler("ddim").default_spacing,
                  "sigma_max": sigma_max, "iterations": iterations, **guide_record,
                  "prompt": prompt, "class_label": class_label, "clip": clip}
        regen = {"sampler": "ddim", "steps": steps, "spacing": spacing, "sigma_max": sigma_max, "n": n,
                 "guidance": guidance, "clip": clip}
        if self.is_text:
            regen["prompt"] = prompt
        elif class_label is not None:
            regen["class_label"] = class_label
        return Inversion(noise, record, worst, time.perf_counter() - t0, regen)

    # ---- regeneration ------------------------------------------------------------------------------------
    def check_record(self, record: dict) -> None:
        """Refuse a record made with other weights, naming what differs."""
        diffs = []
        if record.get("checkpoint_sha256") != self.weights_sha256:
            diffs.append(f"weights sha256 {str(record.get('checkpoint_sha256'))[:12]} recorded "
                         f"({record.get('checkpoint')}), {str(self.weights_sha256)[:12]} here ({self.source})")
        if record.get("use_ema", True) != self.use_ema:
            diffs.append(f"use_ema {record.get('use_ema')} recorded, {self.use_ema} here")
        mine = [(lr["sha256"], lr["scale"]) for lr in self.loras]
        theirs = [(lr["sha256"], lr["scale"]) for lr in record.get("lora", [])]
        if mine != theirs:
            diffs.append(f"LoRA adapters {theirs} recorded, {mine} here")
        mine = [(e["token"], e["sha256"]) for e in self.embeddings]
        theirs = [(e["token"], e["sha256"]) for e in record.get("embeddings", [])]
        if mine != theirs:
            show = lambda es: [(t, h[:12]) for t, h in es]  # noqa: E731
            diffs.append(f"embeddings {show(theirs)} recorded, {show(mine)} here")
        mine = [c["sha256"] for c in self.controlnets]
        theirs = [c["controlnet_sha256"] for c in record.get("control", [])]
        if theirs and mine != theirs:
            diffs.append(f"ControlNets {[h[:12] for h in theirs]} recorded, {[h[:12] for h in mine]} here")
        if record.get("guidance") is not None:
            mine = None if self.guide is None else self.guide["sha256"]
            theirs = (record.get("guide") or {}).get("sha256")
            if mine != theirs:
                said = lambda h: "no guide model (classifier-free guidance)" if h is None else \
                    f"guide model sha256 {h[:12]}"  # noqa: E731
                diffs.append(f"{said(theirs)} recorded, {said(mine)} here")
        if diffs:
            raise CheckpointError("this image was not made with this checkpoint: " + "; ".join(diffs))

    def regenerate(self, record: dict) -> Generation:
        """The image (``record['index']``) or the whole call (a grid's record) a record describes."""
        self.check_record(record)
        kw = {k: record.get(k) for k in ("sampler", "steps", "spacing", "eta", "guidance", "negative_prompt",
                                         "negative_class", "guidance_interval", "seed", "n", "batch_size", "clip",
                                         "strength")}
        kw["guidance_rescale"] = record.get("guidance_rescale", 0.0)
        kw["sigma_max"] = record.get("sigma_max")  # with the recorded spacing: the same grid
        if record.get("grid_rule") is not None:  # the grid the default rule chose: ask the rule again
            grid = sampling_grid(record["sampler"], record["steps"]).record()
            recorded = {**record, "last_step": record.get("last_step", "denoise")}  # before the field existed
            if any(grid.get(k) != recorded.get(k) for k in ("spacing", "sigma_max", "rho", "sigma_min", "last_step")):
                raise CheckpointError(
                    f"this image was sampled on the default grid of its day ({record['spacing']}, rho "
                    f"{record.get('rho')}, sigma~ {record.get('sigma_min')}..{record.get('sigma_max')}, last step "
                    f"{recorded['last_step']}); this version's default for {record['steps']} steps is another "
                    f"({grid['spacing']}, rho {grid['rho']}, sigma~ {grid['sigma_min']}..{grid['sigma_max']}, last "
                    f"step {grid['last_step']}), so it would not be the same image")
            kw["spacing"], kw["sigma_max"] = None, None
        if record.get("guidance_interval") is not None:
            kw["guidance_interval"] = tuple(record["guidance_interval"])
        if self.is_text:
            kw["prompt"] = record.get("prompt")
        else:
            kw["class_label"] = record.get("class_label")
        if "classifier" in record:
            clf = record["classifier"]
            if file_sha256(clf["path"]) != clf["sha256"]:
                raise CheckpointError(f"the classifier {clf['path']} is not the one recorded")
            kw["classifier"], kw["classifier_scale"] = clf["path"], clf["scale"]
        for key in ("init_image", "mask"):
            if key in record:
                rec = record[key]
                if "name" in rec:  # a named mask
                    kw[key] = rec["name"]
                    continue
                if "path" not in rec:
                    raise ConfigError(f"this image was made from a {key.replace('_', ' ')} given as a tensor; "
                                      f"regenerate it through the API with that tensor")
                paths = rec["path"] if isinstance(rec["path"], list) else [rec["path"]]
                hashes = rec["sha256"] if isinstance(rec["sha256"], list) else [rec["sha256"]]
                for p, hsh in zip(paths, hashes):
                    if not Path(p).is_file() or file_sha256(p) != hsh:
                        raise DataError(f"the {key.replace('_', ' ')} {p} is missing or not the one recorded")
                kw[key] = rec["path"]
        if "mask" in record:
            kw["resample_steps"] = record.get("resample_steps", 1)
        if record.get("control"):
            images = []
            for c in record["control"]:
                rec = c["image"]
                if "path" not in rec:
                    raise ConfigError("this image was made from a control image given as a tensor; regenerate it "
                                      "through the API with that tensor")
                for p, hsh in zip(*(v if isinstance(v, list) else [v] for v in (rec["path"], rec["sha256"]))):
                    if not Path(p).is_file() or file_sha256(p) != hsh:
                        raise DataError(f"the control image {p} is missing or not the one recorded")
                images.append(rec["path"])
            kw["control"] = images if len(images) > 1 else images[0]
            kw["control_type"] = [c["type"] for c in record["control"]]
            kw["control_scale"] = [c["scale"] for c in record["control"]]
            kw["control_cond_only"] = record.get("control_cond_only", False)
        if "noise_sha256" in record:
            raise ConfigError("this image was sampled from a given noise tensor (an inversion); regenerate it "
                              "through the API with that noise")
        kw = {k: v for k, v in kw.items() if v is not None}
        if record.get("grid") or "index" not in record:
            return self(**kw)
        j = record["index"] // record["batch_size"]
        gen = self(**kw, batches=[j])
        i = record["index"] - j * record["batch_size"]
        return Generation(gen.images[i:i + 1], gen.records[i:i + 1], gen.seconds, gen.nfe)


def _listed(items) -> list:
    """None as [], one item as [item], a list or tuple as a list (the options that take one or several)."""
    return [] if items is None else list(items) if isinstance(items, (list, tuple)) else [items]


def _merge_lora(denoiser, adapter, scale: float, base_sha256: str, text_model=None) -> dict:
    """Merge the adapter file into the denoiser's network (a kakusan one's base checked by hash) and, where it
    adapts the text encoder too, into ``text_model``; the record of it (with the file's layout)."""
    from .lora import adapter_format, apply_lora

    apply_lora(denoiser.backbone, adapter, base_sha256=base_sha256, scale=scale, text_model=text_model)
    return {"path": str(adapter), "sha256": file_sha256(adapter), "scale": float(scale),
            "format": adapter_format(adapter)}


def _adapts_text_encoder(adapter) -> bool:
    from .lora import KOHYA_TE, _file_keys_and_metadata

    keys, _ = _file_keys_and_metadata(Path(adapter).expanduser())
    return any(k.startswith(("text_encoder.", KOHYA_TE)) for k in keys)


def _kakusan_config(checkpoint) -> tuple[Path, dict] | tuple[None, None]:
    """(checkpoint folder, config) of a kakusan checkpoint, (None, None) for anything else."""
    from .checkpoints import read_config
    from .sd import sd_layout

    path = Path(checkpoint).expanduser()
    if not path.exists() or sd_layout(path) is not None or (path / "model_index.json").is_file():
        return None, None
    try:
        ckpt = resolve_checkpoint(path)
        return ckpt, read_config(ckpt)
    except CheckpointError:
        return None, None


def _controlnet_base(checkpoint) -> str | None:
    """The recorded base of a kakusan ControlNet run / checkpoint, None for any other checkpoint."""
    _, config = _kakusan_config(checkpoint)
    record = (config or {}).get("controlnet")
    return None if record is None else record["base"]["path"]


def _adapter_run(checkpoint) -> tuple[str, Path] | None:
    """(base path, adapter file) of a LoRA run whose checkpoints hold the adapters alone (on a Stable Diffusion
    base), None for any other checkpoint."""
    ckpt, config = _kakusan_config(checkpoint)
    if config is None or (config.get("lora") or {}).get("saved") != "adapters":
        return None
    return config["init_from"]["path"], ckpt / "lora.safetensors"


def _base_sha256(path: str | Path) -> str:
    """The weights hash of a fine-tuning base as its runs record it (a Stable Diffusion checkpoint read directly:
    its U-Net's / single file's; a kakusan checkpoint: its EMA weights file)."""
    from .sd import sd_layout, weights_sha256

    if sd_layout(path) is not None:
        return weights_sha256(path)
    return file_sha256(weights_file(resolve_checkpoint(path), True))


def _textual_inversion_run(ckpt: Path) -> tuple[str, Path] | None:
    """(base checkpoint, embedding file) of a textual-inversion run's checkpoint; None for any other checkpoint.
    The base must be there with the weights it was trained on."""
    from .training.personalization import EMBEDDING_FILE

    _, config = _kakusan_config(ckpt)
    if config is None or "textual_inversion" not in config:
        return None
    file = (ckpt.parent if ckpt.is_file() else ckpt) / EMBEDDING_FILE
    base = config["init_from"]
    if not file.is_file():
        raise CheckpointError(f"{ckpt}: a textual-inversion checkpoint without its {EMBEDDING_FILE}")
    if not Path(base["path"]).exists() or _base_sha256(base["path"]) != base["sha256"]:
        raise CheckpointError(f"{ckpt} is a textual-inversion run whose base {base['path']} is not there with the "
                              f"weights it was trained on; sample a base with --embedding {file}")
    return base["path"], file


def _guide_mismatch(main: dict, guide: dict) -> str | None:
    """What makes ``guide`` (a checkpoint config) unfit to autoguide ``main``, or None: another shape of what
    the sampler draws, other conditioning (classes, text encoder), another autoencoder; a ControlNet or a
    distilled model."""
    if "controlnet" in guide:
        return "a ControlNet, not a model (attach ControlNets with controlnet= / --controlnet)"
    if "consistency" in guide:
        return "a distilled (consistency) model; a guide must be a diffusion model"
    m, g = main["model"], guide["model"]
    shape = lambda mc: (mc["in_channels"], mc["image_size"], mc["image_size"])  # noqa: E731
    if shape(m) != shape(g):
        return f"draws {shape(g)} tensors, the model {shape(m)}: a guide must have the same image / latent shape"
    kind = lambda c: "text" if c.get("text_encoder") else ("class" if c["model"].get("num_classes") else  # noqa: E731
                                                           "unconditional")
    if kind(main) != kind(guide):
        return f"is {kind(guide)}-conditional, the model {kind(main)}-conditional".replace(
            "unconditional-conditional", "unconditional")
    km, kg = int(m.get("num_classes") or 0), int(g.get("num_classes") or 0)
    if km != kg:
        return f"has {kg} classes, the model {km}"
    te_m, te_g = main.get("text_encoder") or {}, guide.get("text_encoder") or {}
    for key in ("sha256", "max_length", "padding"):
        if te_m.get(key) != te_g.get(key):
            return (f"was trained with another text encoder ({te_g.get('spec')!r}, {key} {te_g.get(key)!r}; the "
                    f"model: {te_m.get('spec')!r}, {te_m.get(key)!r})")
    ae_m, ae_g = main.get("autoencoder") or {}, guide.get("autoencoder") or {}
    if bool(ae_m) != bool(ae_g):
        return "a latent model and a pixel model cannot guide each other"
    for key in ("sha256", "scale_factor"):
        if ae_m.get(key) != ae_g.get(key):
            return (f"was trained with another autoencoder ({ae_g.get('path')}, {key} {str(ae_g.get(key))[:12]}; "
                    f"the model: {ae_m.get('path')}, {str(ae_m.get(key))[:12]})")
    return None


def _expand(what: str, x: Tensor, n: int) -> Tensor:
    if len(x) == n:
        return x
    if len(x) == 1:
        return x.expand(n, *x.shape[1:])
    raise ConfigError(f"{len(x)} {what}s for n = {n} images (give one, or one per image)")


def read_png_record(path: str | Path) -> dict:
    """The generation record a kakusan PNG carries (its ``kakusan`` text chunk)."""
    from PIL import Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"PNG not found: {path}")
    try:
        with Image.open(path) as im:
            text = im.info.get(PNG_KEY)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if text is None:
        raise DataError(f"{path}: no kakusan generation record in this image (only PNGs kakusan wrote carry one)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: its generation record is not valid JSON ({e})") from None
    if not isinstance(record, dict) or "checkpoint_sha256" not in record:
        raise DataError(f"{path}: its generation record is incomplete (no checkpoint hash)")
    return record
