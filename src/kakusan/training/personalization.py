"""Teaching a trained text model one subject from a few images: DreamBooth and textual inversion, as objectives of
the one trainer (the loss of a step, what trains, what a checkpoint holds besides the trainer's own files).

- **DreamBooth** (Ruiz et al. 2023): the model (all weights, or LoRA adapters) is fine-tuned on the instance images
  captioned with ``instance_prompt`` ("a sks cat"). With ``class_prompt`` ("a cat"), the base model first draws
  ``num_class_images`` images of the class through the pipeline (kept in the run folder with their provenance, so
  a resumed or repeated run reads them again), and every step adds a batch of them to the batch of the subject:
  L = L_instance + w L_class (eq. 2's prior-preservation term, w = ``prior_loss_weight``), so the model keeps
  what it knew of the class while it learns the subject.
- **Textual inversion** (Gal et al. 2023): the model and the text encoder stay frozen; a new word
  (``placeholder``, K = ``num_vectors`` tokens) is added to the tokenizer and only its K input embeddings train,
  on the instance images captioned with ``instance_prompt`` (default: the placeholder alone), through the frozen
  encoder and U-Net. The checkpoints hold the vectors (``model.safetensors``, ``ema.safetensors``: resume
  exactly) and ``learned_embeds.safetensors`` (the EMA's vectors in diffusers' layout), which ``sample
  --embedding`` loads into any model with this text encoder.

Both are for text models: kakusan's own (with its frozen encoder recorded by hash) and Stable Diffusion bases (a
pipeline folder or an imported checkpoint: DreamBooth trains LoRA adapters of the U-Net, textual inversion new
rows for its CLIP, whose tokens are the same ``TextEncoder`` contract; the file is diffusers' own layout, which
``load_textual_inversion`` reads).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from ..data import ImageDataset, load_dataset
from ..errors import CheckpointError, ConfigError

CLASS_IMAGES_BATCH = 16  # the class images are drawn in batches of this size (image i: seed + i // 16, position)
PROVENANCE = "provenance.json"
TRAIN_TEXT_ENCODER_REFUSAL = (
    "--train-text-encoder: kakusan's text models read a frozen encoder, recorded in the checkpoint by its weights "
    "hash, its caption embeddings computed once and cached; sampling loads that encoder and refuses another (a "
    "Stable Diffusion run's adapter file holds the U-Net's adapters alone). A tuned encoder would have to be saved "
    "with the run and loaded in its place, which kakusan does not do yet: DreamBooth here tunes the U-Net (all "
    "weights or --lora-rank); for a new word, use --textual-inversion")


def check_config(cfg) -> None:
    """TrainConfig's checks of the DreamBooth / textual-inversion fields (one line each, naming the flags)."""
    db, ti = cfg.dreambooth, cfg.textual_inversion
    if db and ti:
        raise ConfigError("--dreambooth and --textual-inversion are two ways to teach a subject: choose one")
    if cfg.train_text_encoder:
        raise ConfigError(TRAIN_TEXT_ENCODER_REFUSAL if db else "--train-text-encoder is DreamBooth's option "
                          "(and not supported yet: see --dreambooth)")
    if not (db or ti):
        given = [f for f, v in (("--instance-prompt", cfg.instance_prompt), ("--class-prompt", cfg.class_prompt),
                                ("--class-data", cfg.class_data), ("--placeholder", cfg.placeholder),
                                ("--initializer", cfg.initializer)) if v is not None]
        if cfg.num_vectors != 1:
            given.append("--num-vectors")
        if given:
            raise ConfigError(f"{', '.join(given)}: DreamBooth's / textual inversion's options; give --dreambooth or "
                              f"--textual-inversion (with --init-from BASE)")
        return
    method = "DreamBooth" if db else "textual inversion"
    if not cfg.init_from:
        raise ConfigError(f"{method} teaches a trained text model a subject: give it with --init-from")
    if cfg.cond == "none":
        cfg.cond = "text"
    if cfg.cond != "text":
        raise ConfigError(f"{method} here is for text-conditional models (--cond text), not --cond {cfg.cond}")
    if cfg.distill or cfg.controlnet:
        raise ConfigError(f"{method} does not combine with --distill or --controlnet")
    for name in ("instance_prompt", "class_prompt"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"--{name.replace('_', '-')} must be some text, got {v!r}")
    if db:
        if not cfg.instance_prompt:
            raise ConfigError("--dreambooth needs --instance-prompt, the caption of the subject's images (e.g. 'a "
                              "sks cat'; with --class-prompt 'a cat' for prior preservation)")
        if cfg.placeholder is not None or cfg.initializer is not None or cfg.num_vectors != 1:
            raise ConfigError("--placeholder / --initializer / --num-vectors are textual inversion's options, not "
                              "DreamBooth's")
        if not (isinstance(cfg.num_class_images, int) and cfg.num_class_images >= 1):
            raise ConfigError(f"--num-class-images must be a positive integer, got {cfg.num_class_images!r}")
        if not (isinstance(cfg.prior_loss_weight, (int, float)) and math.isfinite(cfg.prior_loss_weight)
                and cfg.prior_loss_weight >= 0):
            raise ConfigError(f"--prior-loss-weight must be a finite number >= 0, got {cfg.prior_loss_weight!r}")
        if not (isinstance(cfg.class_guidance, (int, float)) and math.isfinite(cfg.class_guidance)
                and cfg.class_guidance >= 0):
            raise ConfigError(f"--class-guidance must be a finite number >= 0, got {cfg.class_guidance!r}")
        if cfg.class_data is not None and not cfg.class_prompt:
            raise ConfigError("--class-data holds prior-preservation images: it needs --class-prompt")
        return
    from ..conditioning.embeddings import MAX_VECTORS, check_placeholder

    if cfg.class_prompt is not None or cfg.class_data is not None:
        raise ConfigError("--class-prompt / --class-data are DreamBooth's prior preservation: textual inversion "
                          "trains only the new word, the model is unchanged")
    if cfg.lora_rank:
        raise ConfigError("textual inversion trains only the new word's vectors: not with --lora-rank")
    if cfg.placeholder is None or cfg.initializer is None:
        raise ConfigError("--textual-inversion needs --placeholder (the new word, e.g. '<my-cat>') and "
                          "--initializer (a word it starts from, e.g. 'cat')")
    check_placeholder(cfg.placeholder)
    if not isinstance(cfg.initializer, str) or not cfg.initializer.strip():
        raise ConfigError(f"--initializer must be a word, got {cfg.initializer!r}")
    if not (isinstance(cfg.num_vectors, int) and 1 <= cfg.num_vectors <= MAX_VECTORS):
        raise ConfigError(f"--num-vectors must be an integer in 1 .. {MAX_VECTORS}, got {cfg.num_vectors!r}")
    if cfg.instance_prompt is not None and cfg.placeholder not in cfg.instance_prompt:
        raise ConfigError(f"--instance-prompt {cfg.instance_prompt!r} must contain the placeholder "
                          f"{cfg.placeholder!r} (the word being learned)")


# --------------------------------------------------------------------------------------------------------------
# Data: the subject's images (+ the base's class images), captioned


def _base_pixel_shape(base) -> tuple[int | None, int | None]:
    """(image size, channels) of the images a base model draws (None, None for a kakusan latent model: give
    --image-size; a Stable Diffusion base's were set from its own configs when the run adopted it)."""
    config = base.config
    if config.get("autoencoder") and not base.is_sd:
        return None, None
    c, h, _ = config["data"]["shape"] if base.is_sd else (config["model"]["in_channels"],
                                                             config["model"]["image_size"], None)
    return h, c


def personalization_data(cfg, data: ImageDataset | None, device, base) -> ImageDataset:
    """The images a DreamBooth / textual-inversion run trains on, each captioned with its prompt: the subject's
    (``cfg.data``, or ``data``), and for DreamBooth with prior preservation the base model's class images after
    them (made once, see :func:`class_images`). ``base``: the run's BaseModel (a kakusan checkpoint or a Stable
    Diffusion folder)."""
    if data is None:
        if cfg.data.partition(":")[0] not in ("folder", "captions", "emoji"):
            raise ConfigError(f"--instance-data takes the subject's images as folder:DIR, got {cfg.data!r}")
        size, channels = _base_pixel_shape(base)
        data = load_dataset(cfg.data, image_size=cfg.image_size or size, channels=cfg.channels or channels,
                            limit=cfg.limit)
    prompt = cfg.instance_prompt or cfg.placeholder
    images, captions = data.images, [prompt] * len(data)
    if prior_preservation(cfg):
        extra = class_images(cfg, data.shape, device, base)
        images, captions = torch.cat([images, extra]), captions + [cfg.class_prompt] * len(extra)
    return ImageDataset(images, None, [], data.name, skipped=data.skipped, captions=captions)


def prior_preservation(cfg) -> bool:
    return bool(cfg.dreambooth and cfg.class_prompt and cfg.prior_loss_weight > 0)


def class_images_folder(cfg) -> Path:
    return Path(cfg.class_data).expanduser() if cfg.class_data else Path(cfg.out) / "class-images"


def class_images(cfg, shape: tuple[int, int, int], device, base) -> torch.Tensor:
    """The ``num_class_images`` prior-preservation images (uint8 (M, C, H, W)) of ``class_prompt``, drawn by the base
    model through the pipeline (its default sampler and steps, guidance ``class_guidance``, seed ``seed``) into
    ``class-images/`` (or ``class_data``) with ``provenance.json``: what exists with the same provenance is read
    again (a resumed run trains on the very images it started with), missing ones are drawn (each image is a
    function of the seed and its index, so an interrupted folder completes to the same images), other provenance
    is refused. A ``class_data`` folder without ``provenance.json`` holds class images of your own (the first M
    in sorted order are used)."""
    from ..checkpoints import sampling_defaults
    from ..data.datasets import load_image

    folder, m = class_images_folder(cfg), cfg.num_class_images
    c, h, _ = shape
    if cfg.class_data and folder.is_dir() and not (folder / PROVENANCE).is_file() and any(folder.iterdir()):
        own = load_dataset(f"folder:{folder}", image_size=h, channels=c)
        if len(own) < m:
            raise ConfigError(f"{folder}: {len(own)} class images of your own, --num-class-images is {m}")
        return own.images[:m]
    ckpt = base.ckpt
    sampler, steps = sampling_defaults(base.config)
    want = {"base": {"path": str(ckpt), "sha256": base.sha256},
            "prompt": cfg.class_prompt, "guidance": float(cfg.class_guidance), "seed": cfg.seed,
            "batch_size": CLASS_IMAGES_BATCH, "sampler": sampler, "steps": steps}
    prov = folder / PROVENANCE
    if prov.is_file():
        have = json.loads(prov.read_text())
        diff = [f"{k}: {json.dumps(have.get(k))} there, {json.dumps(v)} now" for k, v in want.items()
                if k != "base" and have.get(k) != v]
        if have.get("base", {}).get("sha256") != want["base"]["sha256"]:
            diff.insert(0, f"base weights sha256 {str(have.get('base', {}).get('sha256'))[:12]} there, "
                           f"{want['base']['sha256'][:12]} now")
        if diff:
            raise ConfigError(f"{folder}: class images made with other settings ({'; '.join(diff)}); give another "
                              f"--class-data folder, or remove that one to draw them again")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        prov.write_text(json.dumps(want, indent=2))
    paths = [folder / f"class-{i:05d}.png" for i in range(m)]
    missing = sorted({i // CLASS_IMAGES_BATCH for i, p in enumerate(paths) if not p.is_file()})
    if missing:
        _draw_class_images(cfg, ckpt, paths, missing, device)
    return torch.stack([torch.from_numpy(load_image(p, h, c).copy()) for p in paths])


def _draw_class_images(cfg, ckpt: Path, paths: list[Path], batches: list[int], device) -> None:
    from ..pipeline import Pipeline

    todo = sum(min(len(paths), (j + 1) * CLASS_IMAGES_BATCH) - j * CLASS_IMAGES_BATCH for j in batches)
    print(f"prior preservation: drawing {todo} class images of {cfg.class_prompt!r} with the base model into "
          f"{paths[0].parent}", file=sys.stderr, flush=True)
    pipe = Pipeline.load(ckpt, device=device)
    for j in batches:
        gen = pipe(prompt=cfg.class_prompt, n=len(paths), guidance=cfg.class_guidance or None, seed=cfg.seed,
                   batch_size=CLASS_IMAGES_BATCH, batches=[j])
        for k, rec in enumerate(gen.records):
            final = paths[rec["index"]]
            tmp = final.with_name(f".tmp-{final.name}")
            gen.save_image(tmp, k)
            os.replace(tmp, final)


# --------------------------------------------------------------------------------------------------------------
# The objectives


def run_config_entries(cfg) -> dict:
    """What a DreamBooth / textual-inversion run's config records of the method."""
    if cfg.dreambooth:
        rec = {"instance_prompt": cfg.instance_prompt, "class_prompt": cfg.class_prompt,
               "prior_loss_weight": cfg.prior_loss_weight if prior_preservation(cfg) else 0.0}
        if prior_preservation(cfg):
            rec["class_images"] = {"folder": str(class_images_folder(cfg)), "n": cfg.num_class_images,
                                   "guidance": cfg.class_guidance}
        return {"dreambooth": rec}
    from ..conditioning.embeddings import token_strings

    return {"textual_inversion": {"placeholder": cfg.placeholder, "tokens": token_strings(cfg.placeholder,
                                                                                          cfg.num_vectors),
                                  "initializer": cfg.initializer, "prompt": cfg.instance_prompt or cfg.placeholder,
                                  "embedding_file": EMBEDDING_FILE}}


EMBEDDING_FILE = "learned_embeds.safetensors"


def make_objective(trainer, net):
    return DreamBooth(trainer) if trainer.cfg.dreambooth else TextualInversion(trainer, net)


def prior_preservation_loss(per_example: torch.Tensor, is_class: torch.Tensor, weight: float, n_instance: int,
                            n_class: int, world: int = 1) -> torch.Tensor:
    """DreamBooth's loss (Ruiz et al. 2023, eq. 2) from this process's share of a global batch of ``n_instance``
    subject and ``n_class`` class examples: mean(instance losses) + weight * mean(class losses); times the
    number of processes, as data-parallel training averages the processes' gradients."""
    w = torch.where(is_class, weight / n_class, 1.0 / n_instance).to(per_example.dtype)
    return world * (per_example * w).sum()


class DreamBooth:
    """Fine-tuning (all weights or LoRA: the trainer's model as for any --init-from run) on the subject's images,
    with the prior-preservation batch of the base's class images when there are class images."""

    trainable = None  # the trainer's own model trains

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer, self.cfg = trainer, cfg
        self.n_class = cfg.num_class_images if prior_preservation(cfg) else 0
        self.n_instance = len(trainer.images) - self.n_class
        self.weight = float(cfg.prior_loss_weight) if self.n_class else 0.0
        trainer.grid_captions = [cfg.instance_prompt] + ([cfg.class_prompt] if self.n_class else [])

    def batch(self, step: int):
        """(x0, cond, noise, is_class) of ``step``: this process's share of the global batch of ``batch_size``
        subject images followed by ``batch_size`` class images, each drawn as the trainer draws (a pure function
        of seed and step)."""
        from .trainer import batch_indices

        tr, b = self.trainer, self.cfg.batch_size
        idx = torch.cat([batch_indices(self.n_instance, b, step, self.cfg.seed),
                         self.n_instance + batch_indices(self.n_class, b, step, self.cfg.seed + 1)])
        x0, cond, noise = tr.get_batch(step, idx)
        is_class = (torch.arange(2 * b) >= b)[tr.dist.slice(2 * b)]
        return x0, cond, noise, is_class

    def loss(self, step: int) -> torch.Tensor:
        tr = self.trainer
        if not self.n_class:  # no prior preservation: the plain fine-tuning loss on the subject's images
            x0, cond, noise = tr.get_batch(step)
            return tr.train_denoiser.loss(x0, cond, noise=noise).mean()
        x0, cond, noise, is_class = self.batch(step)
        per = tr.train_denoiser.loss(x0, cond, noise=noise)
        b = self.cfg.batch_size
        return prior_preservation_loss(per, is_class.to(per.device), self.weight, b, b, tr.dist.world)

    def sampling_parts(self, net, encoder):
        return net, encoder

    def extras(self) -> dict:
        return {}


class TextualInversion:
    """The new word's K vectors train (``trainable``: the optimizer's, the EMA's and the checkpoints' module); the
    U-Net and the text encoder are frozen and run in eval mode (the encoder as when the captions were cached)."""

    def __init__(self, trainer, unet):
        from ..conditioning import load_text_encoder
        from ..conditioning.embeddings import TokenVectors

        cfg = trainer.cfg
        if trainer.dist.world > 1:
            raise ConfigError("textual inversion trains a few vectors: run it as one process (not under torchrun)")
        self.trainer, self.cfg = trainer, cfg
        base = trainer.base  # a Stable Diffusion base brings its own CLIP (the captions were cached with it)
        self.encoder = (base.text_encoder(trainer.device) if base.is_sd else
                        load_text_encoder(cfg.text_encoder, cfg.text_max_length, trainer.device))
        if self.encoder.sha256 != trainer.text_record["sha256"]:
            raise ConfigError("the text encoder changed between caching the captions and loading it")
        self.trainable = TokenVectors(self._initial_vectors())
        self.encoder.add_tokens(cfg.placeholder, self.trainable)
        self.unet = unet.requires_grad_(False).eval()
        self.prompt = cfg.instance_prompt or cfg.placeholder
        trainer.grid_captions = [self.prompt]

    def _initial_vectors(self) -> torch.Tensor:
        """(K, D): the initializer's token embedding repeated K times, or its K token embeddings in order."""
        enc, word, k = self.encoder, self.cfg.initializer, self.cfg.num_vectors
        ids = enc.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) not in (1, k):
            pieces = enc.tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(f"--initializer {word!r} is {len(ids)} tokens {pieces} for this text encoder; give a "
                              f"word that is one token, or exactly --num-vectors {k} tokens")
        table = enc.model.get_input_embeddings().weight  # (V, D)
        rows = table[torch.tensor(ids, device=table.device)].detach().float()
        return rows.expand(k, -1).clone() if len(ids) == 1 else rows.clone()

    def loss(self, step: int) -> torch.Tensor:
        tr = self.trainer
        x0, _, noise = tr.get_batch(step)  # the subject's images, flips and noise; the prompt is encoded live:
        cond = self.encoder.encode([self.prompt], grad=True).expand(len(x0))
        return tr.train_denoiser.loss(x0, cond, noise=noise).mean()

    def sampling_parts(self, net, encoder):
        """The grids: the frozen U-Net, and the encoder reading the EMA's vectors."""
        return self.unet, _EncoderWith(self.encoder, self.trainer.ema.model)

    def extras(self) -> dict:
        from ..conditioning.embeddings import embedding_file_contents

        init = self.trainer.config["init_from"]
        return {EMBEDDING_FILE: embedding_file_contents(
            self.cfg.placeholder, self.trainer.ema.model.weight, self.trainer.text_record,
            {"base": {"path": init["path"], "sha256": init["sha256"]}, "step": self.trainer.step})}


class _EncoderWith:
    """A text encoder whose trained word reads other vectors (the EMA's) for the duration of each encode."""

    def __init__(self, encoder, vectors):
        self.encoder, self.vectors = encoder, vectors

    def encode(self, prompts):
        parts = self.encoder.model.get_input_embeddings().parts
        own, parts[0] = parts[0], self.vectors
        try:
            return self.encoder.encode(prompts)
        finally:
            parts[0] = own


def refuse_as_model(ckpt, config: dict) -> None:
    """A textual-inversion checkpoint holds a word's vectors, not a model: say what to do instead."""
    if "textual_inversion" in config:
        word = config["textual_inversion"]["placeholder"]
        file = Path(ckpt) / EMBEDDING_FILE if Path(ckpt).is_dir() else EMBEDDING_FILE
        raise CheckpointError(f"{ckpt}: a textual-inversion run (the vectors of {word!r}, not a model); sample its "
                              f"base {config['init_from']['path']} with --embedding {file}")
