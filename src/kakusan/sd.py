"""Stable Diffusion 1.x / 2.x checkpoints: read, turned into kakusan's pieces, sampled by the one pipeline.

Two layouts are read, neither unpickled:
- a diffusers pipeline folder: ``model_index.json`` with ``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/``,
  ``scheduler/``;
- the original single file (``.safetensors``; a ``.ckpt`` only through ``torch.load(weights_only=True)``) with
  ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (autoencoder) and ``cond_stage_model.*`` (text
  tower) keys. Its family is told by the text tower: ``cond_stage_model.transformer.*`` is SD 1.x's CLIP ViT-L/14,
  ``cond_stage_model.model.*`` SD 2.x's OpenCLIP ViT-H (used to its penultimate layer). The configs are inferred
  from the tensors' shapes and the family's fixed choices (attention heads: 8 per block in 1.x, 64 channels
  each in 2.x; the scheduler: scaled-linear betas 0.00085 .. 0.012, steps_offset 1), and the keys mapped to
  diffusers' with diffusers' own converters. What the weights cannot say is the prediction type (2.x: v for
  the 768 px models, eps for 2.x-base) and the image size: given as ``prediction`` / ``image_size``, else the
  family's default (1.x: eps, 512; 2.x: v, 768). The file has no tokenizer: ``tokenizer`` names a CLIP
  tokenizer folder (an SD pipeline's ``tokenizer/``).

The pieces, in kakusan's contracts: the U-Net as a backbone (``models.sd_unet.SDUNet``) inside a ``Denoiser`` with
the scheduler's schedule and prediction; the text encoder as a ``TextEncoder`` padding to 77 tokens without a mask
(as SD's pipelines encode); the autoencoder as a ``LoadedAutoencoder`` with the VAE's scaling factor (0.18215 for
1.x and 2.x). ``Pipeline.load(path)`` takes either layout directly; ``import_sd`` writes a kakusan checkpoint.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError

COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
FAMILIES = {  # what a single file's weights do not say
    "sd1": {"name": "SD 1.x (CLIP ViT-L/14 text tower)", "prediction": "eps", "image_size": 512,
            "hidden_act": "quick_gelu", "pad_token": "<|endoftext|>"},
    "sd2": {"name": "SD 2.x (OpenCLIP ViT-H text tower)", "prediction": "v", "image_size": 768,
            "hidden_act": "gelu", "pad_token": "!"},
}
LATENT_SCALE = 0.18215  # SD 1.x and 2.x autoencoder's latent scale (single files; folders say it in vae/config.json)
UNET, VAE = "model.diffusion_model.", "first_stage_model."
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# --------------------------------------------------------------------------------------------------------------
# What a path is


def _safetensors_keys(path: Path) -> tuple[list[str], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (damaged or truncated? "
                              f"{type(e).__name__}: {e})") from None


def sd_layout(path: str | Path) -> str | None:
    """'folder' (a diffusers SD pipeline folder), 'single-file' (an original SD checkpoint) or None (not SD)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return "folder" if (path / "model_index.json").is_file() else None
    if path.is_file() and path.suffix == ".safetensors":
        try:
            keys, meta = _safetensors_keys(path)
        except CheckpointError:  # no readable header: nothing says SD; the kakusan loader names the damage
            return None
        if "kakusan_config" in meta:
            return None
        return "single-file" if any(k.startswith(UNET) for k in keys) else None
    if path.is_file() and path.suffix == ".ckpt":
        return "single-file"
    return None


def _is_kakusan(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".safetensors" and "kakusan_config" in _safetensors_keys(path)[1]
    return ((path / "config.json").is_file() and (path / "model.safetensors").is_file()) or \
        (path / "checkpoints").is_dir() or (path / "latest").is_file()


def not_kakusan_message(path: Path, layout: str) -> str:
    what = "a Stable Diffusion pipeline folder" if layout == "folder" else "a Stable Diffusion single-file checkpoint"
    return (f"{path} is {what}, not a kakusan checkpoint: sample / eval / sweep read it directly; convert it "
            f"with 'kakusan import-sd {path} --out DIR' where a kakusan checkpoint is needed")


# --------------------------------------------------------------------------------------------------------------
# The scheduler


def schedule_from_scheduler(cfg: dict, where: str):
    """(ScheduleConfig, prediction) of a diffusers scheduler config (DDIM / PNDM / Euler / DPM-Solver ...)."""
    from .schedules import ScheduleConfig

    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: a scheduler with explicit trained_betas is not supported")
    T = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    params = {"beta_start": float(cfg.get("beta_start", 1e-4)), "beta_end": float(cfg.get("beta_end", 0.02))}
    names = {"scaled_linear": "scaled-linear", "linear": "linear"}
    if kind not in names:
        raise CheckpointError(f"{where}: beta_schedule {kind!r} is not supported (scaled_linear or linear)")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise CheckpointError(f"{where}: prediction_type {pred!r} is not supported ({', '.join(PREDICTIONS)})")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing != "leading":
        warnings.warn(f"{where}: timestep_spacing {spacing!r}: kakusan samplers take their grid from --spacing "
                      f"(the scheduler's steps_offset applies to 'leading' only)")
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        warnings.warn(f"{where}: clip_sample / thresholding is set; kakusan does not clip latents (SD's own "
                      f"configs leave both off)")
    final = "clean" if cfg.get("set_alpha_to_one", True) else "first"
    sc = ScheduleConfig(names[kind], T, params, bool(cfg.get("rescale_betas_zero_snr", False)),
                        steps_offset=int(cfg.get("steps_offset", 0)), final_level=final)
    return sc, PREDICTIONS[pred]


def family_scheduler(prediction: str) -> dict:
    """The scheduler of SD 1.x / 2.x training (as their pipeline folders ship it)."""
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
            "steps_offset": 1, "set_alpha_to_one": False,
            "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[prediction]}


# --------------------------------------------------------------------------------------------------------------
# The loaded pieces


@dataclass
class SDModel:
    """A Stable Diffusion checkpoint's pieces, built: diffusers / transformers modules and kakusan configs."""

    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    text_model: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object
    vae: torch.nn.Module  # diffusers AutoencoderKL
    schedule: object  # ScheduleConfig
    prediction: str
    image_size: int  # pixels
    latent_scale: float
    family: str
    layout: str
    source: str
    sha256: str  # of the U-Net's weights (the folder) or of the file


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("Stable Diffusion checkpoints need the diffusers and transformers packages") from None


def _quiet():
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    dl.set_verbosity_error()
    tl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.disable_progress_bar()


def _tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def _weights_of(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("*.bin"))
        raise CheckpointError(f"{folder}: no .safetensors weights" + (
            " (only pickled .bin files, which kakusan does not unpickle; convert them to safetensors)" if bins else ""))
    return files[0]


def read_folder(path: Path) -> SDModel:
    """A diffusers pipeline folder (SD 1.x / 2.x), every component checked before anything loads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/model_index.json: not readable ({e})") from None
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise CheckpointError(f"{path}: an SDXL pipeline ({index.get('_class_name')}); kakusan reads SD 1.x / 2.x "
                              f"only (SDXL's second text tower and size conditioning are not supported yet)")
    for c in COMPONENTS:
        sub = path / c
        cfg = sub / ("scheduler_config.json" if c == "scheduler" else
                     "tokenizer_config.json" if c == "tokenizer" else "config.json")
        if not sub.is_dir():
            raise CheckpointError(f"{path}: Stable Diffusion folder without its {c}/ component")
        if c == "tokenizer":
            if not _tokenizer_files(sub):
                raise CheckpointError(f"{sub}: the tokenizer needs vocab.json and merges.txt (or tokenizer.json)")
        elif not cfg.is_file():
            raise CheckpointError(f"{sub}: no {cfg.name}")
        if c in ("unet", "text_encoder", "vae"):
            _weights_of(sub)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule, prediction = schedule_from_scheduler(sched, f"{path}/scheduler")
    _quiet()
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        text_model = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load a component ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    if unet.config.get("addition_embed_type"):
        raise CheckpointError(f"{path}: the U-Net takes extra conditioning (SDXL-like); not supported yet")
    family = "sd2" if text_model.config.hidden_act == "gelu" else "sd1"
    return SDModel(unet, text_model, tokenizer, vae, schedule, prediction, folder_pixel_shape(path)[1],
                   float(vae.config.scaling_factor), family, "folder", str(path), weights_sha256(path))


def weights_sha256(path: str | Path) -> str:
    """The hash kakusan records for an SD checkpoint (:attr:`SDModel.sha256`), without loading it: of the U-Net's
    weights file in a pipeline folder, of the file itself for a single file."""
    from .metrics.provenance import file_sha256

    path = Path(path).expanduser()
    return file_sha256(_weights_of(path / "unet") if path.is_dir() else path)


def folder_pixel_shape(path: Path) -> list[int]:
    """[channels, size, size] of the images a pipeline folder's model makes, from its unet / vae configs alone."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable unet/ or vae/ config.json ({e})") from None
    size = unet.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    return [int(vae.get("in_channels", 3)), int(size) * factor, int(size) * factor]


# ---- the single file ------------------------------------------------------------------------------------------


def read_state(path: Path) -> dict:
    """The tensors of a single-file checkpoint: safetensors, or a .ckpt read with weights_only (no code run)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _safetensors_keys(path)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickler refusing anything but tensors raises many kinds
        raise CheckpointError(f"{path}: not readable as a weights-only checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); kakusan never unpickles code") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def single_file_family(state: dict, where: str) -> str:
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{where}: an SDXL single file (conditioner.embedders.* keys); kakusan reads SD 1.x / "
                              f"2.x only (SDXL's second text tower and size conditioning are not supported yet)")
    if not any(k.startswith(UNET) for k in keys):
        raise CheckpointError(f"{where}: not a Stable Diffusion checkpoint (no {UNET}* keys)")
    if not any(k.startswith(VAE) for k in keys):
        raise CheckpointError(f"{where}: no autoencoder ({VAE}* keys): an SD file must hold the whole model")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        return "sd2"
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys if not k.startswith((UNET, VAE))})[:4]
    raise CheckpointError(f"{where}: a U-Net of an unknown family: no SD 1.x (cond_stage_model.transformer.*) "
                          f"or SD 2.x (cond_stage_model.model.*) text tower (other keys: {', '.join(prefixes) or 'none'})")


def _count(keys, prefix: str) -> int:
    """How many numbered children ``prefix<N>.`` the keys have."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def _ldm_down_config(s: dict, what: str) -> dict:
    """The diffusers config of an LDM U-Net's way down (its ``input_blocks`` and cross-attention), from the
    shapes of ``s`` (keys without the model's prefix): shared by the U-Net and its ControlNets."""
    keys = list(s)
    if "input_blocks.0.0.weight" not in s:
        raise CheckpointError(f"{what}: no input_blocks.0.0 (conv_in) weight")
    n_in = _count(keys, "input_blocks.")
    channels, attn, layers, level_layers = [], [], None, 0
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in s:  # a downsampler closes a level
            layers = layers or level_layers
            level_layers = 0
            continue
        w = s.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if w is None:
            raise CheckpointError(f"{what}: input block {i} is neither a res block nor a downsampler")
        level_layers += 1
        if level_layers == 1:
            channels.append(int(w.shape[0]))
            attn.append(f"input_blocks.{i}.1.proj_in.weight" in s)
    layers = layers or level_layers
    proj = next((v for k, v in s.items() if k.endswith("proj_in.weight")), None)
    to_k = next((v for k, v in s.items() if k.endswith("attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise CheckpointError(f"{what}: no cross-attention: not a text-to-image SD network")
    return {
        "in_channels": int(s["input_blocks.0.0.weight"].shape[1]), "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "cross_attention_dim": int(to_k.shape[1]), "use_linear_projection": proj.ndim == 2,
        "transformer_layers_per_block": _count(keys, "input_blocks.1.1.transformer_blocks.") or 1,
    }


def unet_config_from_state(state: dict, family: str, latent_size: int, prediction: str) -> dict:
    """The diffusers U-Net config of an LDM U-Net state, from its shapes (and the family's attention heads)."""
    s = {k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}
    down = _ldm_down_config(s, "the U-Net")
    channels = down["block_out_channels"]
    heads = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    cfg = {
        "sample_size": latent_size, "in_channels": down["in_channels"],
        "out_channels": int(s["out.2.weight"].shape[0]), "block_out_channels": channels,
        "layers_per_block": down["layers_per_block"], "down_block_types": down["down_block_types"],
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down["down_block_types"])],
        "cross_attention_dim": down["cross_attention_dim"], "attention_head_dim": heads,
        "use_linear_projection": down["use_linear_projection"],
        "transformer_layers_per_block": down["transformer_layers_per_block"],
        "upcast_attention": family == "sd2" and prediction == "v",
    }
    return cfg


def vae_config_from_state(state: dict, image_size: int) -> dict:
    s = {k[len(VAE):]: v for k, v in state.items() if k.startswith(VAE)}
    keys = list(s)
    levels = _count(keys, "encoder.down.")
    return {
        "in_channels": int(s["encoder.conv_in.weight"].shape[1]), "out_channels": int(s["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(s["quant_conv.weight"].shape[0]) // 2,
        "block_out_channels": [int(s[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)],
        "layers_per_block": _count(keys, "encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32, "sample_size": image_size, "scaling_factor": LATENT_SCALE,
    }


def text_model_from_state(state: dict, family: str):
    """A CLIPTextModel with the single file's text tower (1.x: CLIP as is; 2.x: OpenCLIP to its penultimate
    layer, the one SD 2.x conditions on)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    if family == "sd1":
        tower = {k if ".text_model." in k or not k.startswith("cond_stage_model.transformer.") else
                 k.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."): v
                 for k, v in state.items()}
        converted = convert_ldm_clip_checkpoint(tower)
        emb = converted["text_model.embeddings.token_embedding.weight"]
        layers = _count(list(converted), "text_model.encoder.layers.")
        mlp = converted["text_model.encoder.layers.0.mlp.fc1.weight"]
        positions = converted["text_model.embeddings.position_embedding.weight"].shape[0]
    else:
        p = "cond_stage_model.model."
        emb = state[p + "token_embedding.weight"]
        layers = _count(list(state), p + "transformer.resblocks.") - 1  # penultimate
        mlp = state[p + "transformer.resblocks.0.mlp.c_fc.weight"]
        positions = state[p + "positional_embedding"].shape[0]
    hidden = int(emb.shape[1])
    config = CLIPTextConfig(vocab_size=int(emb.shape[0]), hidden_size=hidden, intermediate_size=int(mlp.shape[0]),
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            max_position_embeddings=int(positions), hidden_act=FAMILIES[family]["hidden_act"],
                            projection_dim=hidden)
    model = CLIPTextModel(config)
    if family == "sd2":
        converted = convert_open_clip_checkpoint(model, state)
    own = model.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers >= 5 names CLIP's text model flat
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # the unused layers (2.x's last) and buffers old files carry (position_ids) are left out
    converted = {k: v for k, v in converted.items() if k in own}
    _load_exactly(model, converted, "the text tower")
    return model


def _load_exactly(module, tensors: dict, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or shapes:
        raise CheckpointError(f"{what}: the weights do not fit the inferred model ({len(missing)} missing, e.g. "
                              f"{missing[:3]}; {len(shapes)} of another shape, e.g. {shapes[:3]})")
    module.load_state_dict({k: tensors[k] for k in own}, strict=True)


def read_single_file(path: Path, *, tokenizer: str | None, prediction: str | None = None,
                     image_size: int | None = None) -> SDModel:
    """An original SD 1.x / 2.x checkpoint file (see the module's notes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTokenizer

    from .metrics.provenance import file_sha256

    state = read_state(path)
    family = single_file_family(state, str(path))
    fam = FAMILIES[family]
    if tokenizer is None:
        raise ConfigError(f"{path}: a single-file checkpoint has no tokenizer: give --tokenizer DIR, a CLIP "
                          f"tokenizer folder (vocab.json, merges.txt), e.g. the tokenizer/ of an SD pipeline")
    if not _tokenizer_files(Path(tokenizer)):
        raise ConfigError(f"tokenizer folder {tokenizer}: needs vocab.json and merges.txt (or tokenizer.json)")
    if prediction is None:
        prediction = fam["prediction"]
        if family == "sd2":
            warnings.warn(f"{path.name}: an SD 2.x file; assuming v-prediction at 768 px (SD 2.x-768-v). For "
                          f"SD 2.x-base give --prediction eps --image-size 512")
    if prediction not in ("eps", "v"):
        raise ConfigError(f"prediction must be eps or v, got {prediction!r}")
    vae_cfg = vae_config_from_state(state, image_size or fam["image_size"])
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    size = image_size or (fam["image_size"] if prediction == fam["prediction"] else 512)
    if size % factor:
        raise ConfigError(f"image size {size} is not divisible by the autoencoder's factor {factor}")
    _quiet()
    unet_cfg = unet_config_from_state(state, family, size // factor, prediction)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    _load_exactly(unet, convert_ldm_unet_checkpoint(state, dict(unet.config)), "the U-Net")
    vae = AutoencoderKL.from_config(vae_cfg)
    _load_exactly(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), "the autoencoder")
    text_model = text_model_from_state(state, family)
    tok = CLIPTokenizer.from_pretrained(tokenizer)
    if fam["pad_token"] in tok.get_vocab() and tok.pad_token != fam["pad_token"]:
        tok.pad_token = fam["pad_token"]  # 2.x pads with "!", 1.x with the end token
    schedule, pred = schedule_from_scheduler(family_scheduler(prediction), f"{path} ({fam['name']})")
    return SDModel(unet.eval(), text_model.eval(), tok, vae.eval(), schedule, pred, size, LATENT_SCALE, family,
                   "single-file", str(path), file_sha256(path))


def read_sd(path: str | Path, *, tokenizer: str | None = None, prediction: str | None = None,
            image_size: int | None = None) -> SDModel:
    """Either layout (``sd_layout``); anything else is refused naming what it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Stable Diffusion checkpoint not found: {path}")
    layout = sd_layout(path)
    if layout is None:
        if _is_kakusan(path):
            raise CheckpointError(f"{path} is a kakusan checkpoint, not a Stable Diffusion one: sample it with "
                                  f"--checkpoint {path}")
        raise CheckpointError(f"{path}: not a Stable Diffusion checkpoint (a diffusers folder with "
                              f"model_index.json, or a .safetensors file with {UNET}* keys)")
    _need_diffusers()
    if layout == "folder":
        if prediction is not None or image_size is not None or tokenizer is not None:
            raise ConfigError("--prediction / --image-size / --tokenizer are for single files; a pipeline folder "
                              "says them in its scheduler, unet and tokenizer")
        return read_folder(path)
    return read_single_file(path, tokenizer=tokenizer, prediction=prediction, image_size=image_size)


# --------------------------------------------------------------------------------------------------------------
# In kakusan's contracts


def sd_config(m: SDModel, text_record: dict, ae_record: dict) -> dict:
    """The kakusan run config of an SD model (as a checkpoint's config.json holds it)."""
    from .diffusion import DiffusionConfig
    from .models.sd_unet import SDUNetConfig

    factor = ae_record["factor"]
    ucfg = SDUNetConfig.of(m.unet, m.image_size // factor)
    return {
        "model": {"type": "sd-unet", **ucfg.to_dict()},
        "schedule": m.schedule.to_dict(),
        "diffusion": DiffusionConfig(m.prediction).to_dict(),
        "data": {"spec": f"imported:{m.source}", "name": f"Stable Diffusion ({FAMILIES[m.family]['name']})",
                 "size": 0, "shape": [ae_record["in_channels"], m.image_size, m.image_size], "class_names": []},
        "text_encoder": text_record,
        "autoencoder": ae_record,
        "imported": {"kind": "stable-diffusion", "family": m.family, "layout": m.layout, "path": m.source,
                     "sha256": m.sha256},
    }


def _autoencoder(m: SDModel, device, source: str, sha256: str):
    from .checkpoints import LoadedAutoencoder

    vae = m.vae.to(device).eval().requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return LoadedAutoencoder(vae, "diffusers", factor, int(vae.config.latent_channels), int(vae.config.in_channels),
                             m.latent_scale, sha256, source)


def kakusan_parts(m: SDModel, side="cpu"):
    """(backbone, config, text encoder, autoencoder) of a read SD checkpoint in kakusan's contracts: the U-Net as
    an ``SDUNet``, the text encoder padding to 77 tokens without a mask and the autoencoder with its latent scale
    on ``side``, each recorded by the checkpoint's hash, and the run config a kakusan checkpoint of it holds."""
    from .conditioning.text import TextEncoder
    from .models.sd_unet import SDUNet, SDUNetConfig

    encoder = TextEncoder.from_loaded(m.text_model, m.tokenizer, spec=f"{m.source}#text_encoder", sha256=m.sha256,
                                      max_length=int(m.tokenizer.model_max_length), padding="max_length",
                                      device=side)
    ae = _autoencoder(m, side, f"{m.source}#vae", m.sha256)
    config = sd_config(m, encoder.record(), ae.record())
    backbone = SDUNet(SDUNetConfig.from_dict({k: v for k, v in config["model"].items() if k != "type"}), m.unet)
    return backbone, config, encoder, ae


def load_pipeline_parts(path: str | Path, *, device, precision: str = "auto", offload: bool = False,
                        tokenizer: str | None = None, prediction: str | None = None, image_size: int | None = None):
    """(denoiser, config, text encoder, autoencoder, weights sha256) of an SD checkpoint, for ``Pipeline``.
    ``offload``: the text encoder and autoencoder stay on the CPU, the U-Net alone on ``device``."""
    from .diffusion import Denoiser, DiffusionConfig
    from .schedules import make_schedule

    m = read_sd(path, tokenizer=tokenizer, prediction=prediction, image_size=image_size)
    sha = m.sha256
    backbone, config, encoder, ae = kakusan_parts(m, torch.device("cpu") if offload else device)
    denoiser = Denoiser(backbone.to(device).eval().requires_grad_(False), make_schedule(m.schedule),
                        DiffusionConfig(m.prediction))
    denoiser.set_precision(precision, device)
    return denoiser, config, encoder, ae, sha


def import_sd(path: str | Path, out: str | Path, *, tokenizer: str | None = None, prediction: str | None = None,
              image_size: int | None = None) -> Path:
    """Convert an SD checkpoint (either layout) into the kakusan run folder ``out``: the U-Net as the checkpoint's
    weights, the text encoder (with its tokenizer) in ``out/text_encoder``, the autoencoder in ``out/vae``, each
    recorded by hash. Returns the checkpoint folder."""
    from .checkpoints import save_checkpoint
    from .conditioning.text import TextEncoder
    from .metrics.provenance import file_sha256

    m = read_sd(path, tokenizer=tokenizer, prediction=prediction, image_size=image_size)
    out = Path(out)
    if (out / "checkpoints").exists():
        raise ConfigError(f"{out} already holds a run (checkpoints/); choose a new --out")
    te_dir, vae_dir = out / "text_encoder", out / "vae"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.text_model.save_pretrained(te_dir, safe_serialization=True)
        m.tokenizer.save_pretrained(te_dir)
        m.vae.save_pretrained(vae_dir, safe_serialization=True)
    encoder = TextEncoder(str(te_dir), int(m.tokenizer.model_max_length), padding="max_length")
    ae = _autoencoder(m, "cpu", str(vae_dir), file_sha256(_weights_of(vae_dir)))
    config = sd_config(m, encoder.record(), ae.record())
    from .models.sd_unet import SDUNet, SDUNetConfig

    backbone = SDUNet(SDUNetConfig.from_dict({k: v for k, v in config["model"].items() if k != "type"}), m.unet)
    with torch.no_grad():
        return save_checkpoint(out / "checkpoints", 0, config, backbone, backbone, None, {"imported": True})


# --------------------------------------------------------------------------------------------------------------
# ControlNets for SD 1.x / 2.x

CONTROL = "control_model."  # the original ControlNet files' prefix (lllyasviel's control_sd15_* / control_v11*)
CONTROLNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _file_keys(path: Path) -> list[str]:
    """The tensor names of a weights file, read without loading the tensors where the format allows."""
    if path.suffix == ".safetensors":
        return _safetensors_keys(path)[0]
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old (non-zip) file cannot be mapped: read it whole
        state = read_state(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state) if isinstance(state, dict) else []


def _is_ldm_controlnet(keys) -> bool:
    keys = set(keys)
    return any(k.startswith(CONTROL) for k in keys) or {"time_embed.0.weight", "input_hint_block.0.weight"} <= keys


def is_sd_controlnet(path: str | Path) -> bool:
    """Whether ``path`` is an SD ControlNet kakusan reads: a diffusers ``ControlNetModel`` folder (its
    config.json's ``_class_name``), or a weights file (.safetensors / .pth / .ckpt) in the original ControlNet
    layout (``control_model.*`` keys, or the same keys without the prefix)."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            return json.loads((path / "config.json").read_text()).get("_class_name") == "ControlNetModel"
        if path.is_file() and path.suffix in (".safetensors", ".pth", ".ckpt", ".pt"):
            return _is_ldm_controlnet(_file_keys(path))
    except (OSError, ValueError, AttributeError, CheckpointError):
        return False
    return False


FIT_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def _check_controlnet_fits(cfg: dict, unet_config: dict, where: str) -> None:
    """One line naming each way a ControlNet's residuals would not fit the base U-Net's skips and cross-attention."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    bad = [f"its {k} is {norm(cfg.get(k))}, the U-Net's {norm(unet_config.get(k))}" for k in FIT_KEYS
           if norm(cfg.get(k)) != norm(unet_config.get(k))]
    if bad:
        hint = (" (a ControlNet for another SD family?)" if cfg.get("cross_attention_dim") !=
                unet_config.get("cross_attention_dim") else "")
        raise CheckpointError(f"{where}: this ControlNet does not fit the U-Net: {'; '.join(bad)}{hint}")


def _hint_convs(s: dict) -> list[int]:
    """The indices of the hint encoder's convolutions (input_hint_block.N.weight), in order."""
    return sorted(int(k.split(".")[1]) for k in s if k.startswith("input_hint_block.") and k.endswith(".weight"))


def controlnet_config_from_state(s: dict, unet_config: dict, where: str) -> dict:
    """The diffusers ControlNetModel config of an original ControlNet state (keys without ``control_model.``):
    the way down from its shapes (as the U-Net's), the hint encoder's widths from its convolutions, and what
    the weights cannot say (attention heads, upcasting, the time embedding's form) from the base U-Net."""
    cfg = _ldm_down_config(s, where)
    convs = _hint_convs(s)
    if len(convs) < 2 or len(convs) % 2:
        raise CheckpointError(f"{where}: the hint encoder (input_hint_block.*) has {len(convs)} convolutions; a "
                              f"ControlNet's has conv_in, two per stage and conv_out (an even number >= 2)")
    w = [s[f"input_hint_block.{n}.weight"] for n in convs]
    widths = [int(w[0].shape[0])] + [int(w[i].shape[0]) for i in range(2, len(w) - 1, 2)]
    cfg.update(conditioning_channels=int(w[0].shape[1]), conditioning_embedding_out_channels=widths)
    for k in ("attention_head_dim", "num_attention_heads", "upcast_attention", "flip_sin_to_cos", "freq_shift",
              "norm_num_groups", "norm_eps", "resnet_time_scale_shift", "only_cross_attention", "act_fn"):
        if k in unet_config:
            cfg[k] = unet_config[k]
    return cfg


def controlnet_state_to_diffusers(s: dict, config: dict, where: str) -> dict:
    """Original ControlNet keys (without ``control_model.``) -> diffusers' ControlNetModel keys: the copied way
    down, middle, zero convolutions (``zero_convs.i.0`` -> ``controlnet_down_blocks.i``, ``middle_block_out.0`` ->
    ``controlnet_mid_block``) by diffusers' own converter; the hint encoder (``input_hint_block``: conv_in, the
    stages' convolutions, conv_out, with SiLUs between at the odd indices) here, for any number of stages.
    Every tensor of the file must land somewhere."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    hint = {k: v for k, v in s.items() if k.startswith("input_hint_block.")}
    rest = {k: v for k, v in s.items() if k not in hint}
    out = {k: v for k, v in convert_controlnet_checkpoint(rest, dict(config)).items()
           if v is not None and not k.startswith("controlnet_cond_embedding.")}
    convs = _hint_convs(hint)
    names = ["conv_in", *(f"blocks.{i}" for i in range(len(convs) - 2)), "conv_out"]
    for n, name in zip(convs, names):
        for kind in ("weight", "bias"):
            if f"input_hint_block.{n}.{kind}" in hint:
                out[f"controlnet_cond_embedding.{name}.{kind}"] = hint[f"input_hint_block.{n}.{kind}"]
    used = {id(v) for v in out.values()}
    unused = sorted(k for k, v in s.items() if id(v) not in used)
    if unused:
        raise CheckpointError(f"{where}: {len(unused)} tensor(s) of the ControlNet have no place in diffusers' "
                              f"ControlNetModel, e.g. {unused[:3]}")
    return out


def _controlnet_folder(path: Path, unet_config: dict):
    from safetensors.torch import load_file

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/config.json: not readable ({e})") from None
    if cfg.get("_class_name") != "ControlNetModel":
        raise CheckpointError(f"{path}: config.json describes a {cfg.get('_class_name')!r}, not a ControlNetModel")
    _check_controlnet_fits(cfg, unet_config, str(path))
    if (path / (CONTROLNET_WEIGHTS + ".index.json")).is_file():
        raise CheckpointError(f"{path}: sharded ControlNet weights are not supported; save them as one "
                              f"{CONTROLNET_WEIGHTS}")
    weights = path / CONTROLNET_WEIGHTS if (path / CONTROLNET_WEIGHTS).is_file() else _weights_of(path)
    _safetensors_keys(weights)  # a damaged header is named before anything is built
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors' errors are of several kinds
        raise CheckpointError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return {k: v for k, v in cfg.items() if not k.startswith("_")}, state, weights


def _controlnet_single_file(path: Path, unet_config: dict):
    state = read_state(path)
    keys = list(state)
    if any(k.startswith(CONTROL) for k in keys):
        s = {k[len(CONTROL):]: v for k, v in state.items() if k.startswith(CONTROL)}
    elif {"time_embed.0.weight", "input_hint_block.0.weight"} <= set(keys):
        s = dict(state)
    elif "controlnet_cond_embedding.conv_in.weight" in state:
        raise CheckpointError(f"{path}: a ControlNet in diffusers' key layout without its config.json: put it in a "
                              f"folder as {CONTROLNET_WEIGHTS} next to its config.json")
    else:
        raise CheckpointError(f"{path}: not an SD ControlNet (no {CONTROL}* keys)")
    if not any(k.startswith("input_blocks.") for k in s) or "input_hint_block.0.weight" not in s:
        raise CheckpointError(f"{path}: a ControlNet without its copied U-Net or hint encoder (input_blocks.* / "
                              f"input_hint_block.*): a difference or adapter file is not supported")
    cfg = controlnet_config_from_state(s, unet_config, str(path))
    _check_controlnet_fits(cfg, unet_config, str(path))
    return cfg, controlnet_state_to_diffusers(s, cfg, str(path)), path


def load_sd_controlnet(path: str | Path, unet_config: dict, device="cpu"):
    """(SDControlNet, record) of a ControlNet for the SD U-Net whose diffusers config is ``unet_config``: a
    diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model.safetensors) or an original
    single file (``control_model.*`` keys; .safetensors, or .pth / .ckpt read weights-only), its config inferred
    from its shapes and the U-Net's. A ControlNet whose widths, layers, input channels or cross-attention
    width differ from the U-Net's is refused, as is a damaged file. ``record``: path, sha256 of the weights
    file, layout, type 'sd-controlnet' and the config (``controlnet_from_checkpoint_config`` rebuilds it)."""
    from .metrics.provenance import file_sha256
    from .models.sd_unet import SDControlNet, SDControlNetConfig

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"ControlNet not found: {path}")
    _need_diffusers()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (no config.json)")
        layout, (cfg, state, weights) = "folder", _controlnet_folder(path, unet_config)
    else:
        layout, (cfg, state, weights) = "single-file", _controlnet_single_file(path, unet_config)
    _quiet()
    config = SDControlNetConfig(cfg)
    try:
        net = SDControlNet(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot build the ControlNet from its config ({e})") from None
    extra = sorted(set(state) - set(net.controlnet.state_dict()))
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensor(s) that diffusers' ControlNetModel of this config does "
                              f"not have, e.g. {extra[:3]}")
    _load_exactly(net.controlnet, state, f"{path}: the ControlNet")
    config = SDControlNetConfig.of(net.controlnet)
    net.config = config
    record = {"path": str(path), "sha256": file_sha256(weights), "layout": layout, "type": "sd-controlnet",
              "config": config.to_dict()}
    return net.to(device).eval().requires_grad_(False), record
