"""LoRA (Hu et al. 2021) on kakusan's backbones, through peft: low-rank adapters on chosen linear / conv layers
of a frozen, trained model.

``add_lora`` injects the adapters in place (the base weights are frozen; every adapter starts as zero, so the
model starts as the base exactly). A LoRA run's checkpoints hold the whole adapted model (base + adapters: it
resumes exactly like any run) and, beside it, ``lora.safetensors``: the adapters alone with what they need
(rank, alpha, target layers, the base model's config and weights hash), small enough to share, applied to the
base with ``apply_lora`` (``kakusan sample --checkpoint BASE --lora FILE [--lora-scale S]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError

ADAPTER_KIND = "kakusan-lora"
TARGETS = ("attention", "all")
SD_UNET = "unet."  # where diffusers' U-Net sits in kakusan's SD backbone (SDUNet.unet): its LoRA keys' prefix too
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key for a LoRA's config


def target_layers(model: nn.Module, targets: str) -> list[str]:
    """Names of the layers that get adapters: 'attention', the linear layers of every attention (self- and
    cross-attention, q / k / v / output projections: diffusers' usual LoRA targets); 'all', every linear and
    convolution of the backbone."""
    from .models.dit import Attention as DiTAttention
    from .models.layers import CrossAttention
    from .models.sd_unet import ATTENTION_PROJECTIONS
    from .models.unet import AttentionBlock

    if targets not in TARGETS:
        raise ConfigError(f"lora targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if targets == "all":
        return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    attention = (AttentionBlock, CrossAttention, DiTAttention)
    names = []
    for name, m in model.named_modules():
        if isinstance(m, attention):
            names += [f"{name}.{c}" for c, sub in m.named_children() if isinstance(sub, nn.Linear)]
        elif _is_diffusers_attention(m):  # Stable Diffusion's U-Net (diffusers): its q / k / v / output linears
            names += [f"{name}.{c}" for c in ATTENTION_PROJECTIONS if _has(m, c)]
    if not names:
        raise ConfigError("this model has no attention layers for LoRA; use lora targets 'all'")
    return names


def _is_diffusers_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and type(m).__module__.startswith("diffusers.") and _has(m, "to_q")


def _has(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def _require_peft():
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:
        raise ConfigError("LoRA needs the peft package (pip install 'kakusan[lora]')") from None
    return LoraConfig, LoraModel


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = "attention",
             layers: list[str] | None = None) -> nn.Module:
    """Inject rank-``rank`` adapters (scale alpha / rank; alpha defaults to the rank) into ``model`` in place and
    freeze everything else. Returns the model (its forward unchanged until the adapters train)."""
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora rank must be a positive integer, got {rank!r}")
    LoraConfig, LoraModel = _require_peft()
    layers = layers if layers is not None else target_layers(model, targets)
    model.requires_grad_(False)
    LoraModel(model, LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=layers,
                                init_lora_weights=True), "default")
    return model


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key of a model with LoRA injected is one of its adapters' tensors."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' entries of ``model.state_dict()``, under their own keys (what a run whose checkpoints hold
    the adapters alone saves and resumes from)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of a model with LoRA injected, by the names of the layers they adapt:
    ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``."""
    return {k.replace(".default.", "."): p.detach().contiguous().clone() for k, p in adapter_state(model).items()}


def lora_metadata(rank: int, alpha: float | None, targets: str, layers: list[str], base: dict) -> dict:
    """What an adapter file records besides its tensors (JSON strings, as safetensors metadata). On a Stable
    Diffusion U-Net (layers ``unet.*``) the tensors' keys are already diffusers' / peft's, and the rank and alpha
    are also written as diffusers reads them (``lora_adapter_metadata``), so ``load_lora_weights`` takes the file
    as it is."""
    alpha = alpha if alpha is not None else rank
    meta = {"kind": ADAPTER_KIND, "rank": str(rank), "alpha": str(alpha), "targets": targets,
            "layers": json.dumps(layers), "base": json.dumps(base)}
    if layers and all(name.startswith(SD_UNET) for name in layers):
        meta[DIFFUSERS_METADATA] = json.dumps({"unet.r": rank, "unet.lora_alpha": alpha,
                                               "unet.target_modules": [n[len(SD_UNET):] for n in layers]})
    return meta


def merge_lora(model: nn.Module, scale: float = 1.0) -> nn.Module:
    """Fold the adapters (times ``scale``) into the base weights and remove them: the plain backbone, as fast
    as the base model."""
    from peft.tuners.lora import LoraLayer

    if scale != 1.0:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.scale_layer(scale)
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            m.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.get_base_layer())
    return model


def read_adapter(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a ``lora.safetensors`` file; anything else is refused naming the file."""
    from .checkpoints import load_tagged

    tensors, meta = load_tagged(path, ADAPTER_KIND, "LoRA adapter (lora.safetensors)")
    try:
        meta = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "targets": meta["targets"],
                "layers": json.loads(meta["layers"]), "base": json.loads(meta["base"])}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete LoRA adapter metadata ({e})") from None
    return tensors, meta


def apply_lora(model: nn.Module, path: str | Path, base_sha256: str | None = None, scale: float = 1.0,
               text_model: nn.Module | None = None) -> nn.Module:
    """Apply the adapter file ``path`` to ``model`` (the base it was trained on: refused when ``base_sha256``,
    the base weights' hash, differs from the one the adapter records) and merge it. A file made elsewhere for a
    Stable Diffusion model (diffusers / peft keys, or kohya's ``lora_unet_*`` / ``lora_te_*`` with ``alpha``;
    see :func:`adapter_format`) is merged too, its text-encoder part into ``text_model``."""
    fmt = adapter_format(path)
    if fmt != "kakusan":
        merge_foreign(model, text_model, path, fmt, scale)
        return model
    tensors, meta = read_adapter(path)
    want = meta["base"].get("sha256")
    if base_sha256 is not None and want and want != base_sha256:
        raise CheckpointError(f"{path}: this LoRA adapter was trained on another base model (weights sha256 "
                              f"{want[:12]}, {meta['base'].get('path')}); this checkpoint's is {base_sha256[:12]}")
    try:
        add_lora(model, meta["rank"], meta["alpha"], meta["targets"], layers=meta["layers"])
    except ValueError as e:  # peft: a named layer is not in this model
        raise CheckpointError(f"{path}: the adapter's layers are not in this model ({e})") from None
    state = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in tensors.items()}
    own = {k for k in model.state_dict() if ".lora_" in k}
    if set(state) != own:
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        raise CheckpointError(f"{path}: the adapter does not fit this model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    shapes = [k for k in state if state[k].shape != model.state_dict()[k].shape]
    if shapes:
        raise CheckpointError(f"{path}: adapter tensors of another shape, e.g. {shapes[0]}")
    model.load_state_dict(state, strict=False)
    return merge_lora(model, scale)


# --------------------------------------------------------------------------------------------------------------
# LoRA files of the Stable Diffusion ecosystem: diffusers / peft keys and kohya's, read and written

KOHYA_UNET, KOHYA_TE = "lora_unet_", "lora_te_"
FORMATS = ("kakusan", "diffusers", "kohya")


def _file_keys_and_metadata(path: Path) -> tuple[list[str], dict]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"LoRA adapter not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable LoRA file ({type(e).__name__}: {e})") from None


def adapter_format(path: str | Path) -> str:
    """'kakusan' (a ``--lora-rank`` run's lora.safetensors), 'diffusers' (``unet.`` / ``text_encoder.`` keys with
    ``lora_A`` / ``lora_B``: diffusers' and peft's layout) or 'kohya' (``lora_unet_*`` / ``lora_te_*`` with
    ``lora_down`` / ``lora_up`` and ``alpha``); anything else is refused naming what it holds."""
    path = Path(path).expanduser()
    keys, meta = _file_keys_and_metadata(path)
    if meta.get("kind") == ADAPTER_KIND:
        return "kakusan"
    if keys and all(k.startswith((KOHYA_UNET, KOHYA_TE)) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k) for k in keys):
        return "diffusers"
    raise CheckpointError(f"{path}: not a LoRA file kakusan reads (kakusan's lora.safetensors, diffusers / peft "
                          f"keys 'unet.*.lora_A.weight', or kohya's 'lora_unet_*.lora_down.weight'); it holds "
                          f"{len(keys)} tensors, e.g. {keys[:3]}")


def _foreign_pairs(path: Path, fmt: str) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """{(part, layer): (down A, up B, alpha)} of a diffusers / kohya file; part 'unet' or 'text_encoder', layer the
    module's name in that part (diffusers' names) or, for kohya, its name with '_' for '.' (resolved later)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    _, meta = _file_keys_and_metadata(path)
    pairs: dict = {}
    if fmt == "kohya":
        for k, v in tensors.items():
            if k.endswith(".lora_down.weight"):
                stem = k[: -len(".lora_down.weight")]
                part, name = ("unet", stem[len(KOHYA_UNET):]) if stem.startswith(KOHYA_UNET) else \
                    ("text_encoder", stem[len(KOHYA_TE):])
                up = tensors.get(stem + ".lora_up.weight")
                if up is None:
                    raise CheckpointError(f"{path}: {stem} has lora_down but no lora_up")
                alpha = tensors.get(stem + ".alpha")
                pairs[part, name] = (v, up, float(alpha) if alpha is not None else float(v.shape[0]))
        unused = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
        if unused:
            raise CheckpointError(f"{path}: kohya keys kakusan does not read (LoCon / LoHa / DoRA?), e.g. {unused[:3]}")
        return pairs
    config = json.loads(meta.get(DIFFUSERS_METADATA) or "{}")
    for k, v in tensors.items():
        if ".lora_A." in k:
            part, _, rest = k.partition(".")
            name = rest.rsplit(".lora_A.", 1)[0]
            up = tensors.get(k.replace(".lora_A.", ".lora_B."))
            if up is None:
                raise CheckpointError(f"{path}: {k} has no lora_B")
            alpha = config.get(f"{part}.lora_alpha", v.shape[0])
            alpha = (config.get(f"{part}.alpha_pattern") or {}).get(name, alpha)
            pairs[part, name] = (v, up, float(alpha))
    return pairs


def _kohya_names(module: nn.Module) -> dict[str, str]:
    """{kohya's name ('_' for '.'): the module's own name} of every layer of ``module``; a text model's
    ``text_model.`` prefix may be in kohya's name or not."""
    table = {}
    for n, _ in module.named_modules():
        table.setdefault(n.replace(".", "_"), n)
        if n.startswith("text_model."):
            table.setdefault(n[len("text_model."):].replace(".", "_"), n)
        else:
            table.setdefault("text_model_" + n.replace(".", "_"), n)
    return table


def _resolve(module: nn.Module, name: str, kohya: dict[str, str] | None, where: str) -> nn.Module:
    """The layer a file's name means in ``module``: diffusers' dotted name, or (``kohya``: the module's
    :func:`_kohya_names`) kohya's with '_' for '.'."""
    if kohya is None:
        try:
            return module.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: the LoRA names a layer this model does not have: {name}") from None
    if name not in kohya:
        raise CheckpointError(f"{where}: the LoRA names a layer this model does not have: {name} (a kohya file for "
                              f"another model family, or in the original LDM naming?)")
    return module.get_submodule(kohya[name])


@torch.no_grad()
def merge_foreign(model: nn.Module, text_model: nn.Module | None, path: str | Path, fmt: str,
                  scale: float = 1.0) -> None:
    """Merge a diffusers / kohya LoRA file into a Stable Diffusion backbone (``SDUNet``: its ``unet``) and,
    where the file adapts the text encoder too, into ``text_model``: W += scale * alpha / rank * up @ down
    (1x1 up-projections onto a convolution's kernel)."""
    path = Path(path).expanduser()
    unet = getattr(model, "unet", None)
    if unet is None:
        raise CheckpointError(f"{path}: a {fmt} LoRA file is for a Stable Diffusion U-Net; this model is kakusan's "
                              f"own (its adapters come from --lora-rank runs)")
    pairs = _foreign_pairs(path, fmt)
    if any(part == "text_encoder" for part, _ in pairs) and text_model is None:
        raise CheckpointError(f"{path}: this LoRA adapts the text encoder too, and none was given to merge it into")
    parts = {"unet": unet, "text_encoder": text_model}
    kohya = {}  # each part's kohya names, listed once
    for (part, name), (down, up, alpha) in pairs.items():
        if fmt == "kohya" and part not in kohya:
            kohya[part] = _kohya_names(parts[part])
        layer = _resolve(parts[part], name, kohya.get(part), str(path))
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"{path}: {name} is a {type(layer).__name__}; LoRA adapts linears and convolutions")
        w = layer.weight
        rank = down.shape[0]
        delta = (up.reshape(up.shape[0], -1).double() @ down.reshape(rank, -1).double()).reshape(w.shape[0], -1)
        if delta.numel() != w.numel():
            raise CheckpointError(f"{path}: {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit "
                                  f"the layer's weight {tuple(w.shape)}")
        w.add_((scale * alpha / rank * delta).reshape(w.shape).to(w.dtype))


def to_kohya(path: str | Path, out: str | Path) -> Path:
    """Write the kakusan LoRA file ``path`` (of a Stable Diffusion run) in kohya's layout: ``lora_unet_<layer with
    _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, which kohya's scripts, AUTOMATIC1111 / ComfyUI and
    diffusers' ``load_lora_weights`` read."""
    from .checkpoints import save_file_atomic

    tensors, meta = read_adapter(path)
    if not all(name.startswith(SD_UNET) for name in meta["layers"]):
        raise ConfigError(f"{path}: kohya's layout names Stable Diffusion layers; this adapter is for a kakusan "
                          f"model (share its lora.safetensors as it is)")
    out_t = {}
    for name in meta["layers"]:
        stem = KOHYA_UNET + name[len(SD_UNET):].replace(".", "_")
        out_t[stem + ".lora_down.weight"] = tensors[f"{name}.lora_A.weight"].contiguous()
        out_t[stem + ".lora_up.weight"] = tensors[f"{name}.lora_B.weight"].contiguous()
        out_t[stem + ".alpha"] = torch.tensor(float(meta["alpha"]))
    return save_file_atomic(Path(out), out_t, {"ss_network_dim": str(meta["rank"]),
                                                "ss_network_alpha": str(meta["alpha"]),
                                                "ss_network_module": "networks.lora"})
