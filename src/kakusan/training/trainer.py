"""The training loop: AdamW, LR warm-up, gradient clipping, EMA, bf16 autocast where the hardware has it, a JSONL log, sample
grids and atomic checkpoints, and exact resume.

Everything random is a function of (seed, step) or of saved generator state: the batch at step k is read from
a per-epoch permutation seeded by (seed, epoch), and the noise / timestep / label-dropout generator and the
global RNG (dropout) are saved in each checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..conditioning import cached_embeddings, load_text_encoder
from ..data import ImageDataset, load_dataset, to_model_range
from ..data.datasets import cache_dir
from ..diffusion import DiffusionConfig, Denoiser, autocast_dtype, compile_cache
from ..errors import CheckpointError, ConfigError, KakusanError, config_from_dict
from ..guidance import ClassifierFreeGuidance
from ..models import build_model, get_preset, model_config_from_dict, model_record
from ..models.presets import ModelConfig
from ..plots import plot_loss
from ..schedules import ScheduleConfig, make_schedule
from ..checkpoints import (load_state_dict_into, load_tagged, load_tensors, read_config, resolve_checkpoint,
                         restore_rng_state, rng_state, save_checkpoint, unflatten_optimizer_state)
from .distributed import DistInfo
from .ema import EMA
from .posthoc_ema import (STATE_FILE as POSTHOC_STATE, STATE_KIND as POSTHOC_KIND, PowerEMA, disk_cost_line,
                          set_aside_stale)


@dataclass
class TrainConfig:
    data: str = "digits"
    preset: str = "unet-digits"
    model: dict = field(default_factory=dict)  # overrides of the preset's config fields (U-Net or DiT)
    schedule: str = "cosine"
    schedule_params: dict = field(default_factory=dict)
    zero_terminal_snr: bool = False
    num_timesteps: int = 1000
    prediction: str = "v"
    weighting: str = "min-snr"
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.5  # EDM's data standard deviation (prediction / weighting 'edm')
    noise_levels: str = "uniform"  # training's noise levels: 'uniform' t, or EDM's 'lognormal' sigma~
    p_mean: float = -1.2  # log sigma~ ~ N(p_mean, p_std^2) with noise_levels 'lognormal'
    p_std: float = 1.2
    cond: str = "none"  # "none", "class" or "text"
    label_dropout: float = 0.1  # the share of labels / captions replaced by the null label / empty prompt
    text_encoder: str = "minilm"  # cond "text": "minilm" (bundled all-MiniLM-L6-v2) or a local HF model folder
    text_max_length: int = 32  # tokens per prompt (longer captions are truncated with a warning)
    autoencoder: str | None = None  # latent diffusion: a kakusan autoencoder checkpoint or diffusers AutoencoderKL
    latent_mode: str = "mean"  # encode the data as posterior means or one posterior sample each
    latent_cache: str | None = None  # the latent cache file (default: keyed by its inputs in the cache folder)
    init_from: str | None = None  # fine-tune: start from this checkpoint (its EMA weights, model, schedule, prediction)
    lora_rank: int = 0  # > 0 (with init_from): train LoRA adapters of this rank on the frozen model instead
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank (default alpha = rank)
    lora_targets: str = "attention"  # "attention" (its q / k / v / output projections) or "all" (linears + convs)
    distill: bool = False  # (with init_from, the teacher) consistency distillation into a few-step model (LCM)
    distill_guidance: float | None = None  # the teacher's classifier-free guidance scale, baked into the student
    distill_points: int = 50  # the teacher's skipping grid (LCM: 50 points over the T steps)
    distill_target_ema: float = 0.95  # EMA decay of the target network in the consistency loss
    huber_c: float = 0.001  # the pseudo-Huber loss's c
    controlnet: bool = False  # (with init_from, the frozen base) train a ControlNet steering it by control maps
    control: str = "canny"  # the maps: canny, sobel, scribble (computed from the images), or folder:DIR (paired)
    # teaching a text model a subject (training/personalization.py); data: the subject's images (--instance-data)
    dreambooth: bool = False  # (with init_from) fine-tune on the subject's images captioned with instance_prompt
    instance_prompt: str | None = None  # their caption (textual inversion: default the placeholder alone)
    class_prompt: str | None = None  # DreamBooth: prior preservation with the base's images of this prompt
    num_class_images: int = 100  # ... this many, drawn once into RUN/class-images (or class_data)
    prior_loss_weight: float = 1.0  # L = L_instance + w L_class (0: no prior preservation)
    class_data: str | None = None  # the class images' folder (drawn there; or your own images, without provenance)
    class_guidance: float = 2.0  # classifier-free guidance of the class images
    train_text_encoder: bool = False  # refused: kakusan's text encoders are frozen (see personalization.py)
    textual_inversion: bool = False  # (with init_from) learn a new word's input embeddings only
    placeholder: str | None = None  # the new word, e.g. "<my-cat>"
    initializer: str | None = None  # a word whose embedding it starts from, e.g. "cat"
    num_vectors: int = 1  # tokens (vectors) the new word stands for
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 200
    lr_decay: str = "constant"  # "constant" or "cosine" (to 10% at the last step)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    posthoc_ema: tuple[float, ...] = ()  # sigma_rels of power EMAs tracked for post-hoc reconstruction, e.g. (0.05, 0.10)
    posthoc_every: int = 500  # steps between their snapshots (RUN/posthoc-ema; also one at the last step)
    hflip: bool = False
    seed: int = 0
    out: str = "runs/default"
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the newest N
    keep_every: int = 0  # > 0: also keep every checkpoint whose step is a multiple of this
    sample_sampler: str | None = None  # the grids' sampler and steps (default: the checkpoint's, as sample's)
    sample_steps: int | None = None
    guidance: float = 2.0  # for the grids of class-conditional runs
    device: str = "auto"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere), "fp32", "bf16"
    gradient_checkpointing: bool = False  # recompute U-Net blocks in the backward pass: less memory, ~+1 forward
    compile: bool = False  # torch.compile the training forward (pays on GPUs over long runs; compiling takes minutes)
    nan_policy: str = "skip"  # "skip" the step (stop after 20 in a row) or "stop" at once
    limit: int | None = None  # use only the first N training images
    image_size: int | None = None  # resize the data to this size (needed for image folders)
    channels: int | None = None  # 1 or 3 (image folders)
    download: bool = False  # fetch MNIST / Fashion-MNIST / CIFAR-10 when missing (needs a network)
    progress: bool = True
    max_minutes: float | None = None  # stop (with a checkpoint) once this much wall time has passed
    # metrics while training (kakusan.metrics.training_eval): every eval_every steps (0: never) the EMA weights
    # sample eval_n images from a fixed noise set (eval_seed), scored by eval_extractor against eval_ref
    eval_every: int = 0
    eval_n: int = 1000
    eval_extractor: str | None = None  # classifier:FILE | inception[:FILE], as kakusan eval's --extractor
    eval_ref: str | None = None  # a data spec (its eval_ref_split) or a stats file from kakusan stats
    eval_ref_split: str = "test"
    eval_sampler: str | None = None  # default: the checkpoint's own sampler and steps, as kakusan eval's
    eval_steps: int | None = None
    eval_guidance: float | None = None  # classifier-free guidance of the evaluation samples (default none)
    eval_seed: int = 0
    eval_batch_size: int = 250
    eval_best: str = "fid"  # the score that names checkpoints/best: fid | kid | precision | recall | class_agreement

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self._check_posthoc()
        from ..metrics.training_eval import check_eval_config

        check_eval_config(self)
        positive = ("steps", "batch_size", "num_timesteps", "log_every", "checkpoint_every")
        if not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ConfigError(f"sample_every must be an integer >= 0 (0: no sample grids), got {self.sample_every!r}")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.cond not in ("none", "class", "text"):
            raise ConfigError(f"cond must be 'none', 'class' or 'text', got {self.cond!r}")
        if not isinstance(self.text_max_length, int) or self.text_max_length < 2:
            raise ConfigError(f"text_max_length must be an integer >= 2, got {self.text_max_length!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        autocast_dtype(self.precision, "cpu")  # refuses an unknown setting now, not at the first step
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"nan_policy must be 'skip' or 'stop', got {self.nan_policy!r}")
        if self.latent_mode not in ("mean", "sample"):
            raise ConfigError(f"latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")
        if self.autoencoder and self.hflip:
            raise ConfigError("--hflip flips images, not latents: it cannot be combined with --autoencoder")
        if self.lr_decay not in ("constant", "cosine"):
            raise ConfigError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        diffusion_config(self)  # validates names and values
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if self.lora_rank and not self.init_from:
            raise ConfigError("LoRA adapts a trained model: give the checkpoint with --init-from")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.distill and not self.init_from:
            raise ConfigError("consistency distillation needs its teacher: give the checkpoint with --init-from")
        if self.distill_guidance is not None and (not self.distill or self.cond == "none"):
            raise ConfigError("distill_guidance is the teacher's classifier-free guidance: it needs --distill and "
                              "a class- or text-conditional model")
        if self.distill and self.noise_levels != "uniform":
            raise ConfigError("consistency distillation draws its own points of the teacher's grid (uniform over "
                              "the training times): drop --noise-levels / --edm with --distill")
        if not (isinstance(self.distill_points, int) and 1 <= self.distill_points <= self.num_timesteps):
            raise ConfigError(f"distill_points must be an integer in 1 .. {self.num_timesteps}, got "
                              f"{self.distill_points!r}")
        if not 0.0 <= self.distill_target_ema < 1.0 or not self.huber_c >= 0:
            raise ConfigError("distill_target_ema must lie in [0, 1) and huber_c be >= 0")
        if self.controlnet:
            if not self.init_from:
                raise ConfigError("a ControlNet steers a trained model: give the base checkpoint with --init-from")
            if self.lora_rank or self.distill:
                raise ConfigError("--controlnet trains a ControlNet on a frozen base: not with --lora-rank or --distill")
            from ..control import CONTROL_TYPES

            if self.control.startswith("folder:") and self.limit:
                raise ConfigError("--control folder:DIR pairs one control image with each training image; --limit "
                                  "would select other images from the two (give a data set and a folder of equal size)")
            if self.control not in CONTROL_TYPES and not self.control.startswith("folder:"):
                raise ConfigError(f"control must be one of {', '.join(CONTROL_TYPES)} or folder:DIR (paired control "
                                  f"images), got {self.control!r}")
        from .personalization import check_config as check_personalization

        check_personalization(self)
        if self.lora_targets not in ("attention", "all"):
            raise ConfigError(f"lora_targets must be 'attention' or 'all', got {self.lora_targets!r}")
        if (self.zero_terminal_snr or self.schedule == "flow") and self.prediction == "eps":
            raise ConfigError(f"{'rectified flow' if self.schedule == 'flow' else 'a zero-terminal-SNR schedule'} "
                              "needs prediction 'flow', 'v' or 'x0' (eps cannot be inverted at alpha = 0)")

    def _check_posthoc(self) -> None:
        from .posthoc_ema import gamma_of_sigma_rel

        if isinstance(self.posthoc_ema, (int, float)) and not isinstance(self.posthoc_ema, bool):
            self.posthoc_ema = (self.posthoc_ema,)
        if not isinstance(self.posthoc_ema, (list, tuple)):
            raise ConfigError(f"posthoc_ema must be a list of sigma_rels (e.g. [0.05, 0.1]), got {self.posthoc_ema!r}")
        try:
            for s in self.posthoc_ema:
                gamma_of_sigma_rel(s)  # refuses a width outside (0, 1/sqrt(12)], naming it
        except ConfigError as e:
            raise ConfigError(f"posthoc_ema: {e}") from None
        self.posthoc_ema = tuple(float(s) for s in self.posthoc_ema)
        names = [f"{s:.3f}" for s in self.posthoc_ema]
        if len(set(names)) != len(names):
            raise ConfigError(f"posthoc_ema {list(self.posthoc_ema)}: the sigma_rels must differ in their first "
                              f"three decimals (they name the snapshot files)")
        if not isinstance(self.posthoc_every, int) or isinstance(self.posthoc_every, bool) or self.posthoc_every < 1:
            raise ConfigError(f"posthoc_every must be a positive integer (steps between post-hoc EMA snapshots), "
                              f"got {self.posthoc_every!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "training")


def build_model_config(cfg: TrainConfig, data: ImageDataset, text_dim: int = 0,
                       shape: tuple[int, int, int] | None = None) -> ModelConfig:
    """The backbone's config: the preset, sized to the data (or to ``shape``, the latents of a latent model)."""
    c, h, _ = shape or data.shape
    overrides = {"in_channels": c, "out_channels": c, "image_size": h, **cfg.model}
    if cfg.cond == "class":
        if data.labels is None:
            raise ConfigError(f"--cond class needs labels, and {data.name} has none")
        overrides["num_classes"] = data.num_classes
    if cfg.cond == "text":
        overrides["context_dim"] = text_dim
    return get_preset(cfg.preset, **overrides)


# EDM's training recipe (Karras et al. 2022, table 1: preconditioning, log-normal noise levels, loss weighting) on
# EDM's noise levels; ``train --edm`` sets these (flags given beside it still win).
EDM_RECIPE = {"schedule": "edm", "prediction": "edm", "weighting": "edm", "noise_levels": "lognormal"}


def diffusion_config(cfg: TrainConfig) -> DiffusionConfig:
    return DiffusionConfig(cfg.prediction, cfg.weighting, cfg.min_snr_gamma, cfg.sigma_data, cfg.noise_levels,
                           cfg.p_mean, cfg.p_std)


def run_config(cfg: TrainConfig, model_cfg: ModelConfig, data: ImageDataset, text_encoder: dict | None = None,
               autoencoder: dict | None = None) -> dict:
    """Everything needed to rebuild and sample the model, saved in every checkpoint."""
    return {
        "model": model_record(model_cfg),
        "schedule": ScheduleConfig(cfg.schedule, cfg.num_timesteps, cfg.schedule_params,
                                   cfg.zero_terminal_snr).to_dict(),
        "diffusion": diffusion_config(cfg).to_dict(),
        "data": {"spec": cfg.data, "name": data.name, "size": len(data), "shape": list(data.shape),
                 "class_names": data.class_names if cfg.cond == "class" else []},
        "train": cfg.to_dict(),
        **({"text_encoder": text_encoder} if text_encoder else {}),
        **({"autoencoder": autoencoder} if autoencoder else {}),
    }


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 10%."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_decay == "cosine":
        frac = min(1.0, step / max(1, cfg.steps - 1))
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.lr * warm


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The data indices of the batch at ``step``: consecutive slices of per-epoch permutations, so the data
    position is a pure function of (seed, step) and a resumed run reads exactly what it would have."""
    start = step * batch_size
    parts, taken = [], 0
    while taken < batch_size:
        epoch, offset = divmod(start + taken, n)
        part = _epoch_permutation(n, seed, epoch)[offset:offset + batch_size - taken]
        parts.append(part)
        taken += len(part)
    return torch.cat(parts)


class NonFiniteLoss(KakusanError):
    pass


def check_base_path(path: str | Path) -> Path | None:
    """What a fine-tuning base is, read without loading weights: the kakusan checkpoint (an imported Stable
    Diffusion one included), or None for a Stable Diffusion pipeline folder; an SD single file is refused, naming
    the import that makes it a base."""
    from ..sd import sd_layout

    layout = sd_layout(path)
    if layout == "folder":
        return None
    if layout == "single-file":
        raise ConfigError(f"{path}: fine-tuning starts from a Stable Diffusion pipeline folder or an imported "
                          f"checkpoint; import this single file first (kakusan import-sd {path} --tokenizer DIR "
                          f"--out DIR), then --init-from DIR")
    ckpt = resolve_checkpoint(path)
    read_config(ckpt)
    return ckpt


def base_record(path: str | Path) -> dict:
    """A fine-tuning base's config, read without its weights (an SD pipeline folder's: the model's type, the
    images' shape, and that it is imported)."""
    ckpt = check_base_path(path)
    if ckpt is not None:
        return read_config(ckpt)
    from ..sd import folder_pixel_shape

    return {"model": {"type": "sd-unet"}, "data": {"shape": folder_pixel_shape(Path(path).expanduser())},
            "imported": {"kind": "stable-diffusion", "path": str(path)}}


class BaseModel:
    """The trained checkpoint a fine-tuning run starts from (``init_from``): its config, and the EMA weights
    (or the model file given) with their hash."""

    def __init__(self, ckpt: Path, config: dict, weights: Path, sha256: str | None = None):
        from ..metrics.provenance import file_sha256

        self.ckpt, self.config, self.weights = ckpt, config, weights
        self.sha256 = sha256 or file_sha256(weights)
        if "lora" in config:
            raise CheckpointError(f"{ckpt}: a LoRA run; fine-tune from its base ({config['init_from']['path']}) "
                                  f"or from a merged model")
        if "consistency" in config:
            raise CheckpointError(f"{ckpt}: a distilled consistency model; fine-tune or distill its teacher "
                                  f"({config['init_from']['path']})")
        if "controlnet" in config:
            raise CheckpointError(f"{ckpt}: a ControlNet run; fine-tune or steer its base "
                                  f"({config['controlnet']['base']['path']})")
        from .personalization import refuse_as_model

        refuse_as_model(ckpt, config)

    @classmethod
    def read(cls, path: str | Path) -> "BaseModel":
        """A kakusan checkpoint (an imported Stable Diffusion one included), or a Stable Diffusion pipeline
        folder read directly."""
        ckpt = check_base_path(path)
        if ckpt is None:
            return SDFolderBase(Path(path).expanduser())
        return cls(ckpt, read_config(ckpt), ckpt if ckpt.is_file() else ckpt / "ema.safetensors")

    @property
    def is_sd(self) -> bool:
        """A Stable Diffusion U-Net: fine-tuned as LoRA adapters, in its own latent space and text encoder."""
        return self.config["model"].get("type") == "sd-unet"

    def build(self, model_cfg: ModelConfig) -> torch.nn.Module:
        """The base network with its weights."""
        model = build_model(model_cfg)
        self.load_into(model)
        return model

    def text_encoder(self, device):
        """A Stable Diffusion base's own text encoder (other bases take --text-encoder, checked in check_data)."""
        from ..conditioning import encoder_for_checkpoint

        return encoder_for_checkpoint(self.config["text_encoder"], None, device)

    def sd_autoencoder(self, device):
        """A Stable Diffusion base's own autoencoder, with its latent scale."""
        from ..checkpoints import autoencoder_for_checkpoint

        return autoencoder_for_checkpoint(self.config, None, device)

    def check_data(self, cfg: TrainConfig, data: ImageDataset, shape: tuple[int, int, int],
                   text_record: dict | None) -> ModelConfig:
        """The base model's config, after checking that this run's data and conditioning fit it."""
        mc = model_config_from_dict(self.config["model"], str(self.ckpt))
        if cfg.model:
            raise ConfigError("--model overrides the architecture, which a fine-tuning run takes from --init-from")
        if (mc.in_channels, mc.image_size, mc.image_size) != tuple(shape):
            raise ConfigError(f"{self.ckpt} was trained on {mc.in_channels}x{mc.image_size}x{mc.image_size} "
                              f"inputs, {data.name} gives {'x'.join(map(str, shape))} (--image-size / --channels?)")
        kind = ("text" if self.is_sd else "class" if mc.num_classes else "text" if mc.context_dim else "none")
        if cfg.cond != kind:
            raise ConfigError(f"{self.ckpt} is {'unconditional' if kind == 'none' else kind + '-conditional'}; "
                              f"fine-tune it with --cond {kind}, not {cfg.cond}")
        if kind == "class" and data.num_classes > mc.num_classes:
            raise ConfigError(f"{data.name} has {data.num_classes} classes, {self.ckpt} knows {mc.num_classes}")
        if kind == "text" and text_record["sha256"] != self.config["text_encoder"]["sha256"]:
            raise ConfigError(f"the text encoder {text_record['spec']!r} is not the one {self.ckpt} was trained "
                              f"with ({self.config['text_encoder']['spec']!r}); pass it with --text-encoder")
        return mc

    def adopt(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the base model's schedule, prediction and latent space (the loss weighting, learning
        rate and everything else stay the run's own)."""
        from dataclasses import replace

        sc, dc = self.config["schedule"], self.config["diffusion"]
        adopted = dict(schedule=sc["name"], num_timesteps=sc["num_timesteps"], schedule_params=sc["params"],
                       zero_terminal_snr=sc["zero_terminal_snr"], prediction=dc["prediction"])
        if self.is_sd:
            return replace(self._adopt_sd(cfg), **adopted)
        ae = self.config.get("autoencoder")
        base_sd = dc.get("sigma_data", DiffusionConfig.sigma_data)
        if cfg.sigma_data not in (base_sd, DiffusionConfig.sigma_data):
            raise ConfigError(f"--sigma-data {cfg.sigma_data:g}: {self.ckpt} reads its output with sigma_data "
                              f"{base_sd:g}, which a fine-tuning run keeps")
        if dc["prediction"] == "edm" and (cfg.weighting, cfg.noise_levels) != ("edm", "lognormal"):
            warnings.warn(f"{self.ckpt} was trained with EDM's preconditioning; this run trains it with weighting "
                          f"{cfg.weighting!r} and {cfg.noise_levels} noise levels (--edm, or --weighting edm "
                          f"--noise-levels lognormal, keeps EDM's objective)")
        if cfg.autoencoder and not ae:
            raise ConfigError(f"{self.ckpt} is a pixel-space model: fine-tune it without --autoencoder")
        return replace(cfg, **adopted, sigma_data=base_sd, autoencoder=cfg.autoencoder or (ae["path"] if ae else None))

    def _adopt_sd(self, cfg: TrainConfig) -> TrainConfig:
        """A Stable Diffusion base: LoRA adapters on its U-Net (plain fine-tuning or DreamBooth), or a new word's
        vectors (textual inversion), trained on captioned images at its pixel size, through its own text encoder
        (77 padded tokens) and autoencoder (latents cached, scaled as SD's)."""
        from dataclasses import replace

        where = f"{self.ckpt} (Stable Diffusion)"
        if cfg.controlnet or cfg.distill:
            raise ConfigError(f"{where}: ControlNet training and consistency distillation on a Stable Diffusion "
                              f"base are not supported yet; LoRA fine-tuning is (--lora-rank)")
        if not cfg.lora_rank and not cfg.textual_inversion:
            what = ("DreamBooth on a Stable Diffusion U-Net" if cfg.dreambooth else
                    "fine-tuning a Stable Diffusion U-Net")
            raise ConfigError(f"{where}: {what} trains LoRA adapters: give --lora-rank (e.g. 8); full fine-tuning of "
                              f"its weights is not supported (its runs save and load the adapters alone, the U-Net "
                              f"being the base's by hash)")
        if cfg.posthoc_ema:
            raise ConfigError(f"{where}: --posthoc-ema is not supported for Stable Diffusion LoRA runs yet")
        if cfg.cond == "class":
            raise ConfigError(f"{where}: a Stable Diffusion model is text-conditional: train it on captioned images "
                              f"(--cond text), not with class labels")
        te, ae = self.config["text_encoder"], self.config["autoencoder"]
        if cfg.autoencoder:
            raise ConfigError(f"{where} brings its own autoencoder ({ae['path']}): drop --autoencoder")
        pixels = self.config["data"]["shape"]
        if cfg.image_size not in (None, pixels[1]):
            raise ConfigError(f"{where} is sized for {pixels[1]} px images; --image-size {cfg.image_size} differs "
                              f"(leave it out: the images are resized to {pixels[1]})")
        if cfg.channels not in (None, pixels[0]):
            raise ConfigError(f"{where} takes {pixels[0]}-channel images, not --channels {cfg.channels}")
        return replace(cfg, cond="text", text_encoder=te["spec"], text_max_length=te["max_length"],
                       image_size=pixels[1], channels=pixels[0])

    def check_autoencoder(self, ae) -> None:
        want = self.config["autoencoder"]
        if ae.sha256 != want["sha256"]:
            raise CheckpointError(f"the autoencoder {ae.source} is not the one {self.ckpt} was trained with "
                                  f"({want['path']}, sha256 {want['sha256'][:12]})")
        ae.scale = want["scale_factor"]

    def run_config_entries(self, cfg: TrainConfig) -> dict:
        """What a fine-tuning run's config takes from the base, and records about it."""
        out = {"init_from": {"path": str(self.ckpt), "weights": self.weights.name, "sha256": self.sha256,
                             "model": self.config["model"]}}
        if cfg.distill:
            from ..consistency import SIGMA_DATA, TIMESTEP_SCALING

            out["consistency"] = {"sigma_data": SIGMA_DATA, "timestep_scaling": TIMESTEP_SCALING,
                                  "points": cfg.distill_points, "guidance": cfg.distill_guidance,
                                  "target_ema": cfg.distill_target_ema, "huber_c": cfg.huber_c}
        if cfg.controlnet:  # the ControlNet's own config is filled in by the trainer, which builds it
            out["controlnet"] = {"control": cfg.control,
                                 "base": {"path": str(self.ckpt), "weights": self.weights.name, "sha256": self.sha256}}
        if cfg.lora_rank:  # (the adapted layers are filled in by the trainer, which builds the model)
            out["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha if cfg.lora_alpha is not None
                           else float(cfg.lora_rank), "targets": cfg.lora_targets, "layers": []}
            if self.is_sd:  # a run's checkpoints hold the adapters alone: the U-Net is the base's, by hash
                out["lora"]["saved"] = "adapters"
        out["schedule"] = self.config["schedule"]  # exactly the base's (an SD scheduler's steps_offset included)
        return out

    def load_into(self, model: torch.nn.Module) -> None:
        load_state_dict_into(model, load_tensors(self.weights), self.weights)


class SDFolderBase(BaseModel):
    """A Stable Diffusion pipeline folder read directly as a fine-tuning base (see :mod:`kakusan.sd`): its U-Net
    is used as read (not built again), its text encoder and autoencoder are the folder's own."""

    def __init__(self, path: Path):
        from ..sd import kakusan_parts, read_sd

        m = read_sd(path)
        self.backbone, config, self._encoder, self._ae = kakusan_parts(m)
        super().__init__(path, config, path, sha256=m.sha256)

    def build(self, model_cfg: ModelConfig) -> torch.nn.Module:
        return self.backbone

    def load_into(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.backbone.state_dict())

    def text_encoder(self, device):
        return self._encoder.to(device)

    def sd_autoencoder(self, device):
        return self._ae.to(device)


class Distiller:
    """Consistency distillation inside a Trainer: the teacher is the frozen ``init_from`` model (guided with
    ``distill_guidance``), the student the trainer's model (initialised from it, LoRA or not), the target an EMA
    of the student (``distill_target_ema``); see kakusan.consistency."""

    def __init__(self, trainer: "Trainer"):
        import copy

        from ..consistency import ConsistencyDenoiser, skipping_grid

        cfg, tr = trainer.cfg, trainer
        net = build_model(tr.model_cfg)
        tr.base.load_into(net)
        diffusion = DiffusionConfig(**tr.config["diffusion"])
        teacher = Denoiser(net.to(tr.device).eval().requires_grad_(False), tr.schedule, diffusion)
        if cfg.distill_guidance:
            null = (tr.model_cfg.num_classes if tr.model_cfg.num_classes else tr.text[tr.null_caption])
            teacher = ClassifierFreeGuidance(teacher, cfg.distill_guidance, null)
        self.teacher, self.cfg, self.schedule = teacher, cfg, tr.schedule
        self.target = copy.deepcopy(tr.model).eval().requires_grad_(False)
        self.student = ConsistencyDenoiser(tr.train_denoiser)
        self.target_f = ConsistencyDenoiser(Denoiser(self.target, tr.schedule, diffusion))
        self.grid = skipping_grid(tr.schedule.num_timesteps, cfg.distill_points)
        self.model = tr.model

    def loss(self, x0: torch.Tensor, cond, noise) -> torch.Tensor:
        from ..consistency import distillation_loss

        t, eps = noise  # t uniform over 0 .. T-1: its grid point is uniform over the N points
        n = (t * len(self.grid[0]) / self.schedule.num_timesteps).floor().long().clamp(0, len(self.grid[0]) - 1)
        return distillation_loss(self.student, self.target_f, self.teacher, self.schedule, x0, cond, n, eps,
                                 self.grid, self.cfg.huber_c)

    @torch.no_grad()
    def update_target(self) -> None:
        torch._foreach_lerp_(list(self.target.parameters()), [p.detach() for p in self.model.parameters()],
                             1.0 - self.cfg.distill_target_ema)


class Trainer:
    def __init__(self, cfg: TrainConfig, data: ImageDataset | None = None):
        self.cfg = cfg
        self.dist = DistInfo.from_env()
        if self.dist.world > 1 and cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must divide evenly over "
                              f"{self.dist.world} processes")
        self.device = self.dist.device(cfg.device)
        self.dist.init_process_group(self.device)
        self.base = BaseModel.read(cfg.init_from) if cfg.init_from else None
        if self.base is not None:  # the base model's noise schedule and prediction (sampling reads them)
            self.cfg = cfg = self.base.adopt(cfg)
        if cfg.dreambooth or cfg.textual_inversion:  # the subject's images (+ the base's class images), captioned
            from .personalization import personalization_data

            self.data = personalization_data(cfg, data, self.device, self.base)
        else:
            self.data = data or load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                                             download_if_missing=cfg.download, limit=cfg.limit)
        self.text = self.text_record = None
        if cfg.cond == "text":
            self._encode_captions()
        self.autoencoder = None
        if cfg.autoencoder or (self.base is not None and self.base.is_sd):  # latent diffusion: x0 are the cached,
            # scaled latents of the data
            self._encode_latents()
        else:
            self.images = to_model_range(self.data.images)  # (N, C, H, W) float on CPU
        if self.base is None:
            self.model_cfg = build_model_config(cfg, self.data, self.text.dim if self.text is not None else 0,
                                                tuple(self.images.shape[1:]))
        else:
            self.model_cfg = self.base.check_data(cfg, self.data, tuple(self.images.shape[1:]), self.text_record)
        self.config = run_config(cfg, self.model_cfg, self.data, self.text_record,
                                 self.autoencoder.record() if self.autoencoder else None)
        if self.base is not None:  # the base model's diffusion, and where the run started
            self.config.update(self.base.run_config_entries(cfg))
        if cfg.dreambooth or cfg.textual_inversion:
            from .personalization import run_config_entries

            self.config.update(run_config_entries(cfg))
        self.schedule = make_schedule(ScheduleConfig.from_dict(self.config["schedule"]))
        torch.manual_seed(cfg.seed)  # initial weights
        self.model = build_model(self.model_cfg) if self.base is None or cfg.controlnet else \
            self.base.build(self.model_cfg)
        self.control_base = None
        if cfg.controlnet:  # the base frozen, the model trained is the ControlNet (a copy of the base's encoder)
            self.base.load_into(self.model)
            self.control_base = self.model.to(self.device).eval().requires_grad_(False)
            # the base's way up carries the ControlNet's gradient: checkpointed too when asked (as diffusers does)
            self.control_base.enable_gradient_checkpointing(cfg.gradient_checkpointing)
            self._control_maps()
            from ..models.controlnet import ControlNet

            self.model = ControlNet.from_base(self.control_base, self.hints.shape[1],
                                              self.autoencoder.factor if self.autoencoder else 1)
            self.config["controlnet"]["config"] = self.model.config.to_dict()
        elif cfg.lora_rank:
            from ..lora import add_lora, target_layers

            self.config["lora"]["layers"] = layers = target_layers(self.model, cfg.lora_targets)
            add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, layers=layers)
        self.model = self.model.to(self.device).enable_gradient_checkpointing(cfg.gradient_checkpointing)
        net = self.model
        self.objective = None  # DreamBooth / textual inversion: the loss of a step, what trains, what is saved
        if cfg.dreambooth or cfg.textual_inversion:
            from .personalization import make_objective

            self.objective = make_objective(self, net)
            if self.objective.trainable is not None:  # textual inversion: the new word's vectors; the U-Net frozen
                self.model = self.objective.trainable.to(self.device)
        if self.control_base is not None:
            from ..models.controlnet import ControlledUNet

            net = ControlledUNet(self.control_base, [self.model])
        self.denoiser = Denoiser(net, self.schedule, DiffusionConfig(**self.config["diffusion"]))
        # under torchrun the training forward goes through DDP (gradients averaged over the processes); with
        # compile, through torch.compile of that (the weights stay self.model's: checkpoints and EMA see no wrapper)
        backbone = net if self.dist.world == 1 else torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            compile_cache()
            backbone = torch.compile(backbone)
        self.train_denoiser = self.denoiser if backbone is net else Denoiser(
            backbone, self.schedule, self.denoiser.config)
        self.ema = EMA(self.model, cfg.ema_decay)
        # the post-hoc EMA profiles (the weights are the same on every process: the main one tracks them)
        self.posthoc = PowerEMA(self.model, cfg.posthoc_ema) if cfg.posthoc_ema and self.dist.is_main else None
        self.distiller = Distiller(self) if cfg.distill else None
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW([q for q in self.model.parameters() if q.requires_grad], lr=cfg.lr,
                                           betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay, fused=fused)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.labels = self.data.labels
        self.step = 0
        self.out = Path(cfg.out)
        self.bf16 = autocast_dtype(cfg.precision, self.device, net) is not None
        self.skipped_steps = 0
        self.evaluator = None  # metrics while training (main process): kakusan.metrics.training_eval
        if cfg.eval_every and self.dist.is_main:
            from ..metrics.training_eval import TrainingEvaluator

            self.evaluator = TrainingEvaluator(cfg, self.device, self.data.shape[0])

    @property
    def adapters_only(self) -> bool:
        """A LoRA run whose checkpoints hold the adapters alone (on a Stable Diffusion base)."""
        return self.config.get("lora", {}).get("saved") == "adapters"

    def _encode_captions(self) -> None:
        """Encode every distinct caption (and the empty prompt, the null condition) once with the frozen text
        encoder, through the on-disk cache; the encoder is then released. Batches index these embeddings."""
        captions = self.data.captions
        if not captions:
            raise ConfigError(f"--cond text needs captions, and {self.data.name} has none (use emoji:PATH or "
                              f"captions:DIR, a folder with captions.jsonl / metadata.jsonl)")
        encoder = (self.base.text_encoder(self.device) if self.base is not None and self.base.is_sd else
                   load_text_encoder(self.cfg.text_encoder, self.cfg.text_max_length))
        unique = sorted(set(captions))
        index = {c: i for i, c in enumerate(unique)}
        self.caption_ids = torch.tensor([index[c] for c in captions])
        self.null_caption = len(unique)
        self.text = cached_embeddings(encoder, unique + [""], cache_dir() / "text-embeddings").to(self.device)
        self.text_index = {c: i for i, c in enumerate(unique + [""])}
        self.text_record = encoder.record()
        # the grid's prompts: eight captions spread over the data set
        picks = torch.linspace(0, len(captions) - 1, 8).round().long()
        self.grid_captions = [captions[i] for i in picks]
        self.grid_caption_ids = self.caption_ids[picks]
        del encoder

    def _encode_latents(self) -> None:
        from ..latents import latent_cache
        from ..checkpoints import load_autoencoder
        from .autoencoder import measure_latent_scale

        ae = (self.base.sd_autoencoder(self.device) if self.base is not None and self.base.is_sd else
              load_autoencoder(self.cfg.autoencoder, self.device))
        if ae.in_channels != self.data.shape[0]:
            raise ConfigError(f"the autoencoder takes {ae.in_channels}-channel images, {self.data.name} has "
                              f"{self.data.shape[0]}")
        if self.base is not None:  # fine-tuning: the base model's latent space, scale included
            self.base.check_autoencoder(ae)
        if ae.scale is None:
            measure_latent_scale(ae, self.data.images)
        self.images, self.latent_cache_path = latent_cache(
            ae, self.data, self.cfg.data, self.cfg.latent_mode, self.cfg.seed, self.cfg.latent_cache,
            cache_dir() / "latents", progress=self.cfg.progress and self.dist.is_main)
        self.autoencoder = ae

    def _control_maps(self) -> None:
        """The control map of every training image (values in [0, 1], at the pixel size), computed once from
        the images (canny / sobel / scribble, seeded by the run's seed) or read from a paired folder."""
        from ..control import control_maps

        spec = self.cfg.control
        if spec.startswith("folder:"):
            c, h, _ = self.data.shape
            paired = load_dataset(spec, image_size=h, channels=c, limit=self.cfg.limit)
            if len(paired) != len(self.data) or paired.skipped:
                raise ConfigError(f"{spec}: {len(paired)} readable control images ({paired.skipped} skipped) for "
                                  f"{len(self.data)} training images; pair them one to one (the same sorted order)")
            self.hints = paired.images
        else:  # kept as uint8 (0..255 -> [0, 1] per batch): a quarter of the memory of floats
            self.hints = torch.cat([(control_maps(self.data.images[i:i + 4096], spec, seed=self.cfg.seed + i) * 255
                                     ).round().to(torch.uint8) for i in range(0, len(self.data), 4096)])
        # the grids' control: the maps of eight images spread over the data set
        self.grid_hints = self.hints[torch.linspace(0, len(self.hints) - 1, 8).round().long()]  # uint8

    # ---- state -------------------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {**rng_state(self.generator, self.device), "skipped_steps": self.skipped_steps}
        if self.evaluator is not None:  # the best so far and the time spent evaluating
            state["eval"] = self.evaluator.state_dict()
        return state

    def save(self) -> Path:
        path = self.out / "checkpoints" / f"step-{self.step:08d}"
        if self.dist.is_main:
            extras = {}
            if "lora" in self.config:  # the adapters alone (of the EMA weights), to share and apply to the base
                from ..lora import adapter_tensors, lora_metadata

                lr = self.config["lora"]
                extras["lora.safetensors"] = (adapter_tensors(self.ema.model), lora_metadata(
                    lr["rank"], lr["alpha"], lr["targets"], lr["layers"], self.config["init_from"]))
            if self.distiller is not None:  # the consistency loss's target network, for an exact resume
                extras["target.safetensors"] = (self.distiller.target.state_dict(), {"kind": "consistency-target"})
            if self.posthoc is not None:  # the post-hoc EMA profiles, for an exact resume
                extras[POSTHOC_STATE] = (self.posthoc.state_dict(), self.posthoc.state_metadata())
            model, ema = self.model, self.ema.model
            if self.adapters_only:  # the base's weights are not saved again with every checkpoint
                from ..lora import adapter_state

                model, ema = adapter_state(model), adapter_state(ema)
            if self.objective is not None:  # textual inversion: learned_embeds.safetensors
                extras.update(self.objective.extras())
            path = save_checkpoint(self.out / "checkpoints", self.step, self.config, model, ema,
                                   self.optimizer, self.state(), self.cfg.keep_checkpoints, self.cfg.keep_every,
                                   extras=extras)
        self.dist.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> None:
        ckpt = resolve_checkpoint(path or self.out)
        if ckpt.is_file():
            raise CheckpointError(f"{ckpt}: resuming needs a checkpoint folder (with optimizer state), not a file")
        saved = read_config(ckpt)
        if saved["model"] != self.config["model"] or saved["schedule"] != self.config["schedule"]:
            raise CheckpointError(f"{ckpt}: its model or schedule differs from this run's config")
        if saved.get("controlnet") != self.config.get("controlnet"):
            raise CheckpointError(f"{ckpt}: its ControlNet (or its base) differs from this run's")
        if saved.get("autoencoder", {}).get("sha256") != self.config.get("autoencoder", {}).get("sha256"):
            raise CheckpointError(f"{ckpt}: it was trained in another autoencoder's latent space")
        from ..lora import is_adapter_key

        only = is_adapter_key if self.adapters_only else None
        load_state_dict_into(self.model, load_tensors(ckpt / "model.safetensors"), ckpt, only=only)
        load_state_dict_into(self.ema.model, load_tensors(ckpt / "ema.safetensors"), ckpt, only=only)
        if self.distiller is not None:
            load_state_dict_into(self.distiller.target, load_tensors(ckpt / "target.safetensors"), ckpt)
        state = json.loads((ckpt / "state.json").read_text())
        if self.posthoc is not None:
            if not (ckpt / POSTHOC_STATE).is_file():
                raise CheckpointError(f"{ckpt}: no {POSTHOC_STATE} (the post-hoc EMA profiles this run tracks)")
            tensors, meta = load_tagged(ckpt / POSTHOC_STATE, POSTHOC_KIND, "post-hoc EMA state")
            self.posthoc.load_state_dict(tensors, str(ckpt / POSTHOC_STATE), meta)  # (its run id too)
            if self.posthoc.step != state["step"]:
                raise CheckpointError(f"{ckpt}: its post-hoc EMA is at step {self.posthoc.step}, the run at "
                                      f"{state['step']}")
        opt_tensors = load_tensors(ckpt / "optimizer.safetensors")
        self.optimizer.load_state_dict(unflatten_optimizer_state(opt_tensors, state["optimizer"]))
        restore_rng_state(state, self.generator, self.device)
        self.step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.evaluator is not None:
            note = self.evaluator.load_state_dict(state.get("eval"), ckpt.parent)
            if note:
                print(f"kakusan: {note}", flush=True)

    # ---- one step ----------------------------------------------------------------------------------------
    def get_batch(self, step: int, idx: torch.Tensor | None = None):
        """The global batch of ``step`` (a pure function of seed and step; or the examples ``idx``) with its random
        flips, label dropout and training noise, all drawn for the whole batch; each process keeps its own slice,
        so N processes see exactly the examples and noise of one process with the same global batch."""
        if idx is None:
            idx = batch_indices(len(self.images), self.cfg.batch_size, step, self.cfg.seed)
        x0 = self.images[idx].to(self.device, non_blocking=True)
        hint = None if self.control_base is None else self.hints[idx].to(self.device, non_blocking=True).float() / 255
        if self.cfg.hflip:
            flip = torch.rand(len(idx), generator=self.generator, device=self.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            if hint is not None:  # the map of the flipped image is the flipped map
                hint = torch.where(flip[:, None, None, None], hint.flip(-1), hint)
        cond = None
        if self.cfg.cond == "class":
            cond = self.labels[idx].to(self.device)
            drop = torch.rand(len(idx), generator=self.generator, device=self.device) < self.cfg.label_dropout
            cond = torch.where(drop, torch.full_like(cond, self.model_cfg.num_classes), cond)
        elif self.cfg.cond == "text":
            ids = self.caption_ids[idx].to(self.device)
            drop = torch.rand(len(idx), generator=self.generator, device=self.device) < self.cfg.label_dropout
            cond = self.text[torch.where(drop, torch.full_like(ids, self.null_caption), ids)]
        if hint is not None:
            from ..conditioning.control import ControlCond

            cond = ControlCond.of(cond, hint)
        t, eps = self.denoiser.draw_noise(x0, self.generator)
        mine = self.dist.slice(len(idx))
        return x0[mine], None if cond is None else cond[mine], (t[mine], eps[mine])

    def train_step(self) -> float:
        cfg = self.cfg
        self.model.train()
        x0, cond, noise = self.get_batch(self.step) if self.objective is None else (None, None, None)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.objective is not None:  # it draws its own batch
                loss = self.objective.loss(self.step)
            elif self.distiller is not None:
                loss = self.distiller.loss(x0, cond, noise).mean()
            else:
                loss = self.train_denoiser.loss(x0, cond, noise=noise).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_value = self.dist.mean(loss.detach())  # the global batch's loss, the same on every process
        if not (math.isfinite(loss_value) and torch.isfinite(grad_norm)):
            self.skipped_steps += 1
            if cfg.nan_policy == "stop" or self.skipped_steps >= 20:
                raise NonFiniteLoss(f"step {self.step}: loss {loss_value}, gradient norm {grad_norm.item()}: "
                                    f"stopping; the last good checkpoint is in {self.out / 'checkpoints'}")
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.ema.update(self.model, self.step)
            if self.distiller is not None:
                self.distiller.update_target()
        if self.posthoc is not None:  # a skipped step too (its weights are the last ones): t stays the step count
            self.posthoc.update(self.model)
        self.step += 1
        return loss_value

    # ---- sampling grid -----------------------------------------------------------------------------------
    def pipeline(self):
        """The pipeline over the EMA weights as they are now (what the grids sample, through the same code
        as ``kakusan sample``); text models look their prompts up among the cached caption embeddings."""
        from ..pipeline import Pipeline

        net = self.ema.model
        if self.control_base is not None:
            from ..models.controlnet import ControlledUNet

            net = ControlledUNet(self.control_base, [self.ema.model])
        encoder = _CachedCaptions(self.text, self.text_index) if self.text is not None else None
        if self.objective is not None:  # textual inversion: the frozen U-Net, the encoder with the EMA's vectors
            net, encoder = self.objective.sampling_parts(net, encoder)
        denoiser = Denoiser(net, self.schedule, self.denoiser.config)
        denoiser.autocast_dtype = torch.bfloat16 if self.bf16 else None  # as the training forward runs
        if self.distiller is not None:  # a few-step model, guidance baked in
            from ..consistency import ConsistencyDenoiser

            denoiser = ConsistencyDenoiser(denoiser)
        pipe = Pipeline(denoiser, self.config, source=str(self.out), autoencoder=self.autoencoder,
                        text_encoder=encoder, device=self.device)
        if self.control_base is not None:
            pipe.controlnets = [{"path": str(self.out), "sha256": None, "type": "unet", "control": self.cfg.control}]
        return pipe

    @torch.no_grad()
    def sample_grid(self, path: Path, n: int = 64, seed: int = 0) -> Path:
        """A grid of EMA samples: one row per class (class models) or per grid prompt (text models), with the
        run's sampler (default: the checkpoint's own, the fast default solver) and guidance."""
        guidance = None if self.distiller is not None or not self.cfg.guidance else self.cfg.guidance
        kw = {}
        if self.cfg.cond == "class":
            k = self.model_cfg.num_classes
            kw["class_label"] = [c for c in range(k) for _ in range(max(1, n // k))]
        elif self.cfg.cond == "text":  # one row per prompt of the grid (training captions)
            kw["prompt"], kw["n"] = self.grid_captions, max(1, n // len(self.grid_captions)) * len(self.grid_captions)
        else:
            kw["n"], guidance = n, None
        if self.control_base is not None:  # each row's samples follow the eight grid maps, in order
            per = 8
            if "class_label" in kw:
                kw["class_label"] = [c for c in range(self.model_cfg.num_classes) for _ in range(per)]
            elif "prompt" in kw:
                kw["n"] = per * len(kw["prompt"])
            else:
                kw["n"] = per * max(1, n // per)
            rows = len(kw["class_label"]) // per if "class_label" in kw else kw["n"] // per
            kw["control"] = self.grid_hints.repeat(rows, 1, 1, 1)
        gen = self.pipeline()(**kw, sampler=self.cfg.sample_sampler, steps=self.cfg.sample_steps, guidance=guidance,
                              seed=seed, progress=self.cfg.progress)
        nrow = len(kw["class_label"]) // self.model_cfg.num_classes if "class_label" in kw else gen.nrow
        return gen.save_grid(path, nrow=nrow)

    def evaluate(self, log) -> bool:
        """Metrics of the EMA weights now (``eval_every``), one line in the log; True (on every process) when this
        step is the best so far, so that its checkpoint is written and named by ``checkpoints/best``."""
        rec = None
        if self.evaluator is not None:
            prompts = self.grid_captions if self.text is not None else None
            rec = self.evaluator.evaluate(self.pipeline(), self.step, self.step * self.cfg.batch_size, prompts)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(self.evaluator.line(rec), flush=True)
        return self.dist.any(bool(rec and rec["new_best"]))

    # ---- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.config, indent=2))
            if self.text is not None:  # the rows of the sample grids
                (self.out / "grid_prompts.json").write_text(json.dumps(self.grid_captions, indent=1))
        log = open(self.out / "log.jsonl", "a") if main else None
        # disable=None: tqdm turns itself off when the output is not a terminal (logs stay clean)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training",
                   disable=None if cfg.progress and main else True, dynamic_ncols=True)
        if self.posthoc is not None:
            print(disk_cost_line(self.posthoc, self.model, cfg.steps, cfg.posthoc_every, self.out), flush=True)
            folder, moved = set_aside_stale(self.out, self.posthoc.run_id, self.step)
            if moved:
                print(f"post-hoc EMA: {len(moved)} snapshot(s) not of this run's trajectory up to step {self.step:,} "
                      f"(another run's, past step {self.step:,}, or an early stop's extra last-step ones) moved to "
                      f"{folder}", flush=True)
        losses, t_last, step_last = [], time.perf_counter(), self.step
        t_start = time.perf_counter()
        if self.evaluator is not None:
            self.evaluator.start()
        ckpt = None
        try:
            while self.step < cfg.steps:
                losses.append(self.train_step())
                bar.update(1)
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.perf_counter()
                    finite = [v for v in losses if math.isfinite(v)]
                    rec = {"step": self.step, "loss": sum(finite) / max(1, len(finite)),
                           "lr": lr_at(cfg, self.step - 1),
                           "images_per_s": (self.step - step_last) * cfg.batch_size / (now - t_last),
                           "elapsed_s": now - t_start, "skipped_steps": self.skipped_steps}
                    if self.evaluator is not None:  # evaluation time so far (images_per_s leaves it out)
                        rec["eval_total_s"] = self.evaluator.eval_s
                    if self.dist.world > 1:
                        rec["processes"] = self.dist.world
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    losses, t_last, step_last = [], now, self.step
                last = self.step == cfg.steps or self.dist.any(
                    cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes)
                if main and cfg.sample_every and (self.step % cfg.sample_every == 0 or last):
                    self.sample_grid(self.out / "samples" / f"step-{self.step:08d}.png")
                    if self.step >= cfg.log_every:
                        plot_loss(self.out / "log.jsonl", self.out / "loss.png")
                if self.posthoc is not None and (self.step % cfg.posthoc_every == 0 or last):
                    self.posthoc.save_snapshots(self.model, self.out, self.step * cfg.batch_size,
                                                regular=self.step % cfg.posthoc_every == 0)
                best = False
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    t_eval = time.perf_counter()
                    best = self.evaluate(log)
                    t_last += time.perf_counter() - t_eval  # the throughput is training's alone
                if self.step % cfg.checkpoint_every == 0 or last or best:
                    ckpt = self.save()
                if best and main:
                    from ..metrics.training_eval import write_best

                    write_best(self.out / "checkpoints", self.step)
                if last and self.step < cfg.steps:
                    if main:
                        print(f"stopping at step {self.step}: the {cfg.max_minutes} minute budget is spent",
                              flush=True)
                    break
        finally:
            bar.close()
            if log:
                log.close()
        if self.evaluator is not None:
            print(self.evaluator.summary(), flush=True)
        return ckpt or resolve_checkpoint(self.out)


class _CachedCaptions:
    """The text encoder of a run's grids: the captions' embeddings were computed once, before training."""

    def __init__(self, text, index: dict[str, int]):
        self.text, self.index = text, index

    def encode(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ConfigError(f"no cached embedding for the prompts {missing[:3]} (the grids use training captions)")
        return self.text[torch.tensor([self.index[p] for p in prompts], device=self.text.tokens.device)]
