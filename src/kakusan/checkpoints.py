"""Checkpoints: safetensors for every tensor, JSON for everything else; nothing is unpickled on load.

A checkpoint is a folder:
    config.json            the full run config (model, schedule, diffusion, data, training) + format version
    model.safetensors      the trained weights (the config is also in its metadata: the file alone can sample)
    ema.safetensors        the EMA weights (what sampling uses by default)
    optimizer.safetensors  optimizer tensors, flattened as "state.<param index>.<name>"
    state.json             step, optimizer scalars and param groups, RNG states (hex), log position
It is written into a temporary folder, fsynced, and renamed into place; ``latest`` (a text file, replaced
atomically) names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .diffusion import DiffusionConfig, Denoiser
from .errors import CheckpointError, ConfigError
from .metrics.provenance import file_sha256
from .models import build_model, model_config_from_dict
from .models.autoencoder import Autoencoder, AutoencoderConfig
from .schedules import ScheduleConfig, make_schedule

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not all file systems allow it
        pass


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_file_atomic(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """One safetensors file, written beside its final name, fsynced and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _save_tensors(tmp, tensors, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, config: dict, model: torch.nn.Module | dict,
                    ema: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | None, state: dict, keep: int = 3,
                    keep_every: int = 0, extras: dict | None = None) -> Path:
    """Write checkpoint ``step-XXXXXXXX`` under ``ckpt_root`` atomically; keep the newest ``keep`` and, with
    ``keep_every`` > 0, every checkpoint whose step is a multiple of it. ``model`` / ``ema``: modules or their
    state dicts. ``extras``: more safetensors files written inside it, {file name: (tensors, metadata)}."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    full_config = {"format": FORMAT_VERSION, "kakusan_version": __version__, **config}
    meta = {"kakusan_config": json.dumps(full_config)}
    _write_json(tmp / "config.json", full_config)
    for name, weights in (("model.safetensors", model), ("ema.safetensors", ema)):
        _save_tensors(tmp / name, weights if isinstance(weights, dict) else weights.state_dict(), meta)
    if optimizer is not None:
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        state = {**state, "optimizer": opt_meta}
    _write_json(tmp / "state.json", {"step": step, **state})
    for name, (tensors, metadata) in (extras or {}).items():
        _save_tensors(tmp / name, tensors, metadata)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    latest_tmp = ckpt_root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    best = _pointer(ckpt_root / "best")  # the best so far of a run evaluated while training: kept
    for p in old[:-keep] if keep > 0 else []:
        if (keep_every > 0 and int(p.name.split("-")[1]) % keep_every == 0) or p.name == best:
            continue
        shutil.rmtree(p, ignore_errors=True)
    return final


def _pointer(path: Path) -> str | None:
    """The checkpoint folder name a pointer file (``checkpoints/latest``, ``checkpoints/best``) holds, or None."""
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The training generator's, the global CPU and (on CUDA) the device's RNG states, as hex for state.json."""
    s = {"generator": generator.get_state().numpy().tobytes().hex(),
         "torch_rng": torch.get_rng_state().numpy().tobytes().hex()}
    if device.type == "cuda":
        s["cuda_rng"] = torch.cuda.get_rng_state(device).numpy().tobytes().hex()
    return s


def restore_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Set the RNG states saved by :func:`rng_state` (the CUDA one only when it was saved and runs on CUDA)."""
    u8 = lambda h: torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8)  # noqa: E731
    generator.set_state(u8(state["generator"]))
    torch.set_rng_state(u8(state["torch_rng"]))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(u8(state["cuda_rng"]), device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest checkpoint), a model .safetensors file, or the name of a
    shipped model (``kakusan models``)."""
    from .zoo import locate, names, plain_name

    path = Path(locate(path)).expanduser()
    if not path.exists():
        shipped = f" (nor the name of a shipped model: {', '.join(names())})" if names() and plain_name(str(path)) \
            else ""
        raise CheckpointError(f"checkpoint not found: {path}{shipped}")
    if (path / "model_index.json").is_file():
        from .sd import not_kakusan_message

        raise CheckpointError(not_kakusan_message(path, "folder"))
    if path.is_file() and path.name in ("latest", "best"):  # a pointer: checkpoints/best names the best so far
        named = path.parent / (_pointer(path) or "")
        if not (named / "model.safetensors").is_file():
            raise CheckpointError(f"{path} names {named.name!r}, which is not a checkpoint folder there")
        return named
    if path.is_file():
        return path
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path  # a checkpoint folder
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / "latest").is_file():
        named = root / (root / "latest").read_text().strip()
        if (named / "model.safetensors").is_file():
            return named
    steps = sorted(p for p in root.glob("step-*") if (p / "model.safetensors").is_file())
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path}: not a kakusan checkpoint (no model.safetensors, no checkpoints/latest)")


def read_config(path: Path) -> dict:
    """The run config of a checkpoint folder or model file, checked for format and version."""
    try:
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("kakusan_config")
            if raw is None:
                from .sd import not_kakusan_message, sd_layout

                if sd_layout(path) == "single-file":
                    raise CheckpointError(not_kakusan_message(path, "single-file"))
                raise CheckpointError(f"{path}: a safetensors file without kakusan's config in its metadata")
            config = json.loads(raw)
        else:
            config = json.loads((path / "config.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        damaged = "damaged or truncated? " if isinstance(e, SafetensorError) else ""
        raise CheckpointError(f"{path}: not a readable kakusan checkpoint ({damaged}{type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path}: not a kakusan checkpoint (config has no model section)")
    fmt = config.get("format")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} (kakusan {config.get('kakusan_version')}) "
                              f"is not the format {FORMAT_VERSION} this kakusan {__version__} reads")
    return config


def load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def load_tagged(path: str | Path, kind: str, what: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a single safetensors file whose metadata says ``kind`` (a classifier, a stats
    file, ...); a missing, unreadable or other-kind file is refused naming ``what`` was expected."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: not a kakusan {what} (kind {meta.get('kind')!r})")
    return tensors, meta


def load_state_dict_into(module: torch.nn.Module, tensors: dict, path: Path, only=None) -> None:
    """Load ``tensors`` into ``module`` exactly; a mismatch names the missing, unexpected and mis-shaped keys.
    ``only`` (a test of a key): the file holds exactly those of the module's tensors (e.g. a LoRA run's adapters);
    the others are left as they are."""
    own = module.state_dict()
    if only is not None:
        own = {k: v for k, v in own.items() if only(k)}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                if keys]
    if shapes:
        k = shapes[0]
        problems[-1] += f"; {k}: {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model"
    if problems:
        raise CheckpointError(f"{path}: weights do not match the configured model: {'; '.join(problems)}")
    try:
        module.load_state_dict(tensors, strict=only is None)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the configured model ({first})") from None


# --------------------------------------------------------------------------------------------------------------
# Loading a checkpoint for sampling: the denoiser, its autoencoder (latent models), LoRA adapters


def load_denoiser(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                  precision: str = "auto") -> tuple[Denoiser, dict]:
    """Rebuild the denoiser (EMA weights by default) from a checkpoint folder, run folder or model file; its
    forward pass runs in bf16 autocast on CUDA and on CPUs with native bf16 unless ``precision`` says otherwise (see Denoiser.set_precision)."""
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    if "controlnet" in config:
        raise CheckpointError(f"{ckpt}: a ControlNet, not a model: load it with Pipeline.load / --checkpoint (which "
                              f"brings its base, {config['controlnet']['base']['path']}) or --controlnet")
    if (config.get("lora") or {}).get("saved") == "adapters":
        raise CheckpointError(f"{ckpt}: a LoRA run whose checkpoints hold the adapters alone: load it with "
                              f"Pipeline.load / --checkpoint (which brings its base, {config['init_from']['path']})")
    from .training.personalization import refuse_as_model

    refuse_as_model(ckpt, config)
    model = build_model(model_config_from_dict(config["model"], str(ckpt)))
    weights_path = weights_file(ckpt, use_ema)
    if "lora" in config:  # a LoRA run: base + adapters, merged into plain weights for sampling
        from .lora import add_lora, merge_lora

        lr = config["lora"]
        add_lora(model, lr["rank"], lr["alpha"], lr["targets"], layers=lr["layers"])
        load_state_dict_into(model, load_tensors(weights_path), weights_path)
        merge_lora(model)
    else:
        load_state_dict_into(model, load_tensors(weights_path), weights_path)
    schedule = make_schedule(ScheduleConfig.from_dict(config["schedule"]))
    denoiser = Denoiser(model.to(device).eval(), schedule, DiffusionConfig(**config["diffusion"]))
    denoiser.set_precision(precision, device)
    if "consistency" in config:  # a distilled few-step model: its consistency function is the denoiser
        from .consistency import ConsistencyDenoiser

        c = config["consistency"]
        return ConsistencyDenoiser(denoiser, c["sigma_data"], c["timestep_scaling"]), config
    return denoiser, config


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_model(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", use_ema: bool = True,
                 extra: dict | None = None) -> Path:
    """One model file for sampling: a checkpoint's EMA (or raw) weights in ``dtype``, the run's config in the
    metadata (with an ``export`` record: where from, which weights, the dtype and the source file's sha256), without
    the optimizer, the raw weights or the run's state. Loading casts the weights back to float32, so fp16 / bf16
    halve the file at the cost of the weights' rounding (measure it: ``kakusan eval`` on both). ``extra``: more
    fields for the export record."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: one of {', '.join(EXPORT_DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint)
    config = read_config(ckpt)
    for part, why in (("controlnet", "a ControlNet"), ("textual_inversion", "a textual-inversion run")):
        if part in config:
            raise CheckpointError(f"{ckpt}: {why} is not a model on its own; export the model it was trained on")
    if (config.get("lora") or {}).get("saved") == "adapters":
        raise CheckpointError(f"{ckpt}: a LoRA run on a Stable Diffusion base holds its adapters alone; share its "
                              f"lora.safetensors instead")
    weights = weights_file(ckpt, use_ema)
    if "lora" in config:  # adapters merged into plain weights: the exported file is an ordinary model
        denoiser, _ = load_denoiser(ckpt, use_ema=use_ema, precision="fp32")
        tensors = denoiser.backbone.state_dict()
        config = {k: v for k, v in config.items() if k != "lora"}
    else:
        tensors = load_tensors(weights)
    cast = {k: (v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    record = {"source": str(ckpt), "weights": "ema" if use_ema else "raw", "dtype": dtype,
              "source_sha256": file_sha256(weights), **(extra or {})}
    full = {**config, "format": FORMAT_VERSION, "kakusan_version": __version__, "export": record}
    return save_file_atomic(Path(out).expanduser(), cast, {"kakusan_config": json.dumps(full)})


def sampling_defaults(config: dict) -> tuple[str, int]:
    """The sampler and steps a checkpoint samples with when none are given: 'lcm' in 4 steps for a distilled
    consistency model, EDM's Heun in 18 steps (35 evaluations on the Karras grid, rho = 7; Karras et al. 2022,
    Alg. 1) for a model trained with EDM's preconditioning, the default solver in 20 steps otherwise."""
    from .samplers import DEFAULT_SAMPLER

    if "consistency" in config:
        return "lcm", 4
    if config.get("diffusion", {}).get("prediction") == "edm":
        return "heun", 18
    return DEFAULT_SAMPLER, 20


def weights_file(ckpt: Path, use_ema: bool) -> Path:
    return ckpt if ckpt.is_file() else ckpt / ("ema.safetensors" if use_ema else "model.safetensors")


def apply_checkpoint_lora(denoiser: Denoiser, checkpoint: str | Path, adapter: str | Path, use_ema: bool = True,
                          scale: float = 1.0) -> Denoiser:
    """Apply a LoRA adapter file to a denoiser loaded from ``checkpoint`` (the base the adapter was trained on,
    checked by the hash of its weights file) and merge it, ``scale`` times its strength."""
    from .lora import apply_lora

    weights = weights_file(resolve_checkpoint(checkpoint), use_ema)
    apply_lora(denoiser.backbone, adapter, base_sha256=file_sha256(weights), scale=scale)
    return denoiser


class LoadedAutoencoder(nn.Module):
    """The interface latent diffusion uses, over a kakusan ``Autoencoder`` or a diffusers ``AutoencoderKL``."""

    def __init__(self, module: nn.Module, kind: str, factor: int, latent_channels: int, in_channels: int,
                 scale: float | None, sha256: str, source: str):
        super().__init__()
        self.module, self.kind = module, kind
        self.factor, self.latent_channels, self.in_channels = factor, latent_channels, in_channels
        self.scale, self.sha256, self.source = scale, sha256, source

    @property
    def module_device(self) -> torch.device:
        return next(self.module.parameters()).device

    def record(self) -> dict:
        return {"path": self.source, "kind": self.kind, "sha256": self.sha256, "factor": self.factor,
                "latent_channels": self.latent_channels, "in_channels": self.in_channels, "scale_factor": self.scale}

    def _posterior(self, x: torch.Tensor):
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"the autoencoder takes {self.in_channels}-channel images, got {x.shape[1]}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ConfigError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's "
                              f"downsampling factor {self.factor}")
        if self.kind == "kakusan":
            return self.module.encode(x)
        return self.module.encode(x).latent_dist

    @torch.no_grad()
    def to_latent(self, x: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None):
        if self.scale is None:
            raise ConfigError(f"{self.source}: the autoencoder has no latent scale (measure it first)")
        q = self._posterior(x.to(self.module_device))  # the autoencoder may live elsewhere (offloaded)
        z = q.mean if mode == "mean" else q.mean + q.std * torch.randn(q.mean.shape, generator=generator,
                                                                       device=q.mean.device)
        return (z * self.scale).to(x.device)

    @torch.no_grad()
    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.latent_channels:
            raise ConfigError(f"the decoder takes {self.latent_channels}-channel latents, got {z.shape[1]}")
        return self.decode((z / self.scale).to(self.module_device)).to(z.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images."""
        return self.module.decode(z) if self.kind == "kakusan" else self.module.decode(z).sample


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> LoadedAutoencoder:
    """A kakusan autoencoder checkpoint (folder, run folder or model file), or a diffusers ``AutoencoderKL``
    folder (``config.json`` with ``_class_name`` AutoencoderKL + weights), whose latent scale is then measured on
    the training data (``measure_latent_scale``), never read from a constant."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"autoencoder not found: {path}")
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        if raw.get("_class_name") == "AutoencoderKL":
            return _load_diffusers(path, raw, device)
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    model_cfg = dict(config["model"])
    if model_cfg.pop("type", None) != "autoencoder":
        raise CheckpointError(f"{ckpt}: not an autoencoder checkpoint (model type "
                              f"{config['model'].get('type', 'unet')!r}); train one with kakusan train-autoencoder")
    ae_cfg = AutoencoderConfig.from_dict(model_cfg)
    ae = Autoencoder(ae_cfg)
    weights = ckpt if ckpt.is_file() else ckpt / "model.safetensors"
    tensors = load_tensors(weights)
    prefix = "autoencoder."
    load_state_dict_into(ae, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, weights)
    return LoadedAutoencoder(ae.to(device).eval().requires_grad_(False), "kakusan", ae_cfg.factor,
                             ae_cfg.latent_channels, ae_cfg.in_channels, ae_cfg.scale_factor,
                             file_sha256(weights), str(ckpt))


def _load_diffusers(path: Path, raw: dict, device) -> LoadedAutoencoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("loading a diffusers AutoencoderKL needs the diffusers package (pip install diffusers)") \
            from None
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the AutoencoderKL ({e})") from None
    weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
    factor = 2 ** (len(raw.get("block_out_channels", [0])) - 1)
    # the folder's ``scaling_factor`` is not trusted (diffusers writes its default into every config): the scale
    # is measured on the training data, like a kakusan autoencoder's
    return LoadedAutoencoder(vae.to(device).eval().requires_grad_(False), "diffusers", factor,
                             int(raw.get("latent_channels", 4)), int(raw.get("in_channels", 3)), None,
                             file_sha256(*weights), str(path))


def autoencoder_for_checkpoint(config: dict, override: str | None = None, device: str | torch.device = "cpu"
                               ) -> LoadedAutoencoder | None:
    """The decoder of a latent diffusion checkpoint (None for a pixel model): the autoencoder it records, or
    ``override`` (the same one moved elsewhere); refused if its latent channels or weights differ. The latent
    scale is the one the model was trained with."""
    record = config.get("autoencoder")
    if not record:
        if override:
            raise ConfigError("--autoencoder given, but this checkpoint is a pixel-space model")
        return None
    ae = load_autoencoder(override or record["path"], device)
    want = config["model"]["in_channels"]
    if ae.latent_channels != want:
        raise CheckpointError(f"the autoencoder {ae.source} has {ae.latent_channels} latent channels, this latent "
                              f"model was trained on {want}")
    if ae.sha256 != record["sha256"]:
        raise CheckpointError(f"the autoencoder {ae.source} (weights sha256 {ae.sha256[:12]}) is not the one this "
                              f"model was trained with ({record['path']}, sha256 {record['sha256'][:12]})")
    ae.scale = record["scale_factor"]
    return ae
