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
    """What an adapter file records besides its tensors (JSON strings, as safetensors metadata)."""
    return {"kind": ADAPTER_KIND, "rank": str(rank), "alpha": str(alpha if alpha is not None else rank),
            "targets": targets, "layers": json.dumps(layers), "base": json.dumps(base)}


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


def apply_lora(model: nn.Module, path: str | Path, base_sha256: str | None = None, scale: float = 1.0
               ) -> nn.Module:
    """Apply the adapter file ``path`` to ``model`` (the base it was trained on: refused when ``base_sha256``,
    the base weights' hash, differs from the one the adapter records) and merge it."""
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
