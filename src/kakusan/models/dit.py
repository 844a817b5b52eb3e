"""The Diffusion Transformer (DiT; Peebles & Xie 2023): a ViT over patches of the image or latent, conditioned
through adaptive LayerNorm with zero-initialised gates (adaLN-Zero).

Shape walk for ``dit-s2`` on 32x32x4 latents (B, 4, 32, 32):
    patchify (2x2 conv, stride 2) -> (B, 256, 384) + fixed 2-D sin-cos positions
    | c = MLP(sinusoidal(t)) + label embedding  (B, 384)
    | 12 blocks: x += gate * attn(modulate(LN(x), c)); x += gate * mlp(modulate(LN(x), c))
    | final: modulate(LN(x), c) -> linear to 2*2*4 per token -> unpatchify (B, 4, 32, 32).
Like the U-Net it maps (x_t, t, cond) -> output and knows nothing of the noise schedule. A text model
(``context_dim``) adds a cross-attention to the prompt's tokens after each self-attention (as PixArt-alpha) and
the prompt's masked-mean embedding to c.

Parameter names follow the paper's released code (``x_embedder.proj``, ``t_embedder.mlp``,
``y_embedder.embedding_table``, ``blocks.N.attn.qkv``, ``blocks.N.adaLN_modulation.1``, ``final_layer.linear``,
``pos_embed``), its timestep features are the same (cos first, frequencies 10000^(-k/half)) and ``learn_sigma``
gives its 2x output channels (the variance half is dropped), so its class-conditional checkpoints load as they
are (``kakusan.models.dit.load_reference_state_dict``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, config_from_dict, need
from .layers import CrossAttention, masked_mean, sinusoidal, split_condition

Tensor = torch.Tensor


@dataclass
class DiTConfig:
    image_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # in the MLPs
    num_classes: int = 0  # > 0: class-conditional, with a learned null label at index num_classes
    context_dim: int = 0  # > 0: text-conditional (cross-attention to the prompt's tokens in every block)
    learn_sigma: bool = False  # the paper's models also predict a variance: 2x output channels, the second half unused
    frequency_dim: int = 256  # sinusoidal features of t before the embedding MLP

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "out_channels", "patch_size", "depth", "num_heads"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not divisible by the DiT's patch_size {self.patch_size}")
        need(self.hidden_size >= 4 and self.hidden_size % 4 == 0,
             f"hidden_size must be a positive multiple of 4 (the 2-D sin-cos positions), got {self.hidden_size}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.mlp_ratio > 0 and int(self.hidden_size * self.mlp_ratio) >= 1,
             f"mlp_ratio must be positive (an MLP of at least one unit), got {self.mlp_ratio}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.context_dim >= 0, f"context_dim must be >= 0, got {self.context_dim}")
        need(not (self.num_classes and self.context_dim),
             "a model is conditioned on class labels (num_classes) or on text (context_dim), not both")
        need(self.frequency_dim >= 2 and self.frequency_dim % 2 == 0,
             f"frequency_dim must be even and >= 2, got {self.frequency_dim}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return config_from_dict(cls, d, "DiT")


def sincos_2d(dim: int, grid: int) -> Tensor:
    """The fixed 2-D sin-cos position table of MAE / DiT: (grid * grid, dim), row-major over (h, w); the first
    half of each row encodes the column, the second the row (the order of the released code)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return torch.from_numpy(np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, c_in: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal(t, self.frequency_dim, shift=0.0, cos_first=True))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null label (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c gives shift, scale and gate for the attention and the MLP; the gates start at zero,
    so every block starts as the identity. A text model's block also attends to the prompt (ungated, its output
    projection zero-initialised)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        if context_dim:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, c_out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * c_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        dim, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(p, cfg.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim, cfg.frequency_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, dim) if cfg.num_classes else None
        self.text_pool = nn.Linear(cfg.context_dim, dim) if cfg.context_dim else None
        # fixed, not learned; a buffer kept in the state dict, as the released checkpoints hold it
        self.register_buffer("pos_embed", sincos_2d(dim, cfg.image_size // p)[None])
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.context_dim)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, p, self.out_channels)
        self.gradient_checkpointing = False  # a training-time choice, not part of the architecture
        self._init_weights()

    def _init_weights(self) -> None:
        """As the paper: Xavier-uniform linears (the patch projection as a linear), N(0, 0.02) for the time MLP
        and the label table, and zeros for every adaLN modulation, the output layer and the cross-attention's
        output, so the network starts as a function that outputs 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        zero = [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                               self.final_layer.linear]
        zero += [b.cross_attn.out for b in self.blocks if hasattr(b, "cross_attn")]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def enable_gradient_checkpointing(self, on: bool = True) -> "DiT":
        """Recompute each block in the backward pass instead of keeping its activations (training only)."""
        self.gradient_checkpointing = on
        return self

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p * p * C) -> (B, C, H, W), the token order of the patch embedding."""
        p, c = self.config.patch_size, self.out_channels
        g = self.config.image_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        """x: (B, C_in, H, W); t: (B,) the schedule's time; cond: class labels (B,) ints (num_classes = null)
        for a class model, a ``TextCond`` for a text model, None for an unconditional model."""
        cfg = self.config
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size or x.shape[1] != cfg.in_channels:
            raise ConfigError(f"this DiT takes (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) inputs "
                              f"(its position table is fixed to the size), got {tuple(x.shape)}")
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        labels, context, mask = split_condition(cond, cfg.num_classes, cfg.context_dim, x.shape[0], x.device)
        if labels is not None:
            c = c + self.y_embedder(labels)
        if context is not None:
            context = context.to(c.dtype)
            c = c + self.text_pool(masked_mean(context, mask))
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(block, h, c, context, mask, use_reentrant=False)
            else:
                h = block(h, c, context, mask)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, :cfg.out_channels] if cfg.learn_sigma else out


def read_reference_state(path) -> dict:
    """The tensors of a DiT checkpoint of the paper's released code: a ``.pt`` state dict such as
    DiT-XL-2-256x256.pt (read with ``weights_only``, so no code is unpickled; a training checkpoint's ``ema``
    weights are taken), or a ``.safetensors`` file with the same names."""
    from pathlib import Path

    from ..errors import CheckpointError
    from ..checkpoints import load_tensors

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"DiT weights not found: {path}")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a state dict of plain tensors
        raise CheckpointError(f"{path}: not a DiT state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]  # a training checkpoint of the released code: its EMA weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a DiT state dict (expected a mapping of names to tensors)")
    return state


# heads of the paper's sizes, by width (the weights do not show the number of heads)
PAPER_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def config_from_state(state: dict, num_heads: int | None = None, where: str = "DiT weights") -> DiTConfig:
    """The DiTConfig a released state dict was made with, read off its shapes (heads: ``num_heads``, or the
    paper's for its widths)."""
    from ..errors import CheckpointError

    need = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight")
    if any(k not in state for k in need):
        raise CheckpointError(f"{where}: not a DiT state dict (no {', '.join(k for k in need if k not in state)})")
    hidden, c_in, p, _ = state["x_embedder.proj.weight"].shape
    grid = int(round(state["pos_embed"].shape[1] ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    table = state.get("y_embedder.embedding_table.weight")
    heads = num_heads or PAPER_HEADS.get(hidden)
    if heads is None:
        raise CheckpointError(f"{where}: width {hidden} is none of the paper's sizes; give its number of heads")
    context = state["blocks.0.cross_attn.kv.weight"].shape[1] if "blocks.0.cross_attn.kv.weight" in state else 0
    learn_sigma = out == 2 * c_in
    return DiTConfig(image_size=grid * p, in_channels=c_in, out_channels=out // 2 if learn_sigma else out,
                     patch_size=p, hidden_size=hidden,
                     depth=depth, num_heads=heads,
                     mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                     num_classes=table.shape[0] - 1 if table is not None else 0, context_dim=context,
                     learn_sigma=learn_sigma)


def load_reference_state_dict(path, config: DiTConfig | None = None) -> DiT:
    """A DiT with the weights of a checkpoint of the paper's released code (see ``read_reference_state``), built
    from ``config`` or from the shapes of the weights. Keys or shapes that do not match are named in the error."""
    from ..checkpoints import load_state_dict_into

    state = read_reference_state(path)
    model = DiT(config or config_from_state(state, where=str(path)))
    load_state_dict_into(model, state, path)
    return model
