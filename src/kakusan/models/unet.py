"""The U-Net denoiser backbone of DDPM (Ho et al. 2020, appendix B), made configurable.

Shape walk for the ``ddpm-cifar10`` preset (B, 3, 32, 32):
    conv_in 3->128 @32 | level 0: 2 res blocks 128 @32, down | level 1: 2 x (res 256 + attn) @16, down
    | level 2: 2 res 256 @8, down | level 3: 2 res 256 @4 | middle: res, attn, res @4
    | up levels mirror the way down with 3 res blocks each, taking one skip per block | norm, SiLU, conv_out.
The network maps (x_t, t, cond) -> output and knows nothing of the noise schedule; cond is class labels (B,)
for a class model (``num_classes``), or a ``TextCond`` (token embeddings + padding mask) for a text model
(``context_dim``), whose attention positions then hold transformer blocks: self-attention, cross-attention to
the text tokens, feed-forward (as Stable Diffusion's U-Net), and whose masked-mean text embedding is also added
to the time embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, config_from_dict, need
from .layers import CrossAttention, masked_mean, split_condition, timestep_embedding

Tensor = torch.Tensor


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128  # base width; level i has channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    attention_head_dim: int | None = None  # None: one head spanning all channels (as DDPM)
    dropout: float = 0.1
    norm_groups: int = 32
    time_conditioning: str = "add"  # "add" (DDPM) or "scale-shift" (improved DDPM / ADM)
    num_classes: int = 0  # > 0: class-conditional, with a learned null label at index num_classes
    context_dim: int = 0  # > 0: text-conditional; attention blocks become transformer blocks with cross-attention
    transformer_depth: int = 1  # transformer layers per attention position (text models)
    # the stride-2 downsampling conv's zero padding: "symmetric" (one pixel on every side), or "bottom-right"
    # (one pixel after the last row and column only: TensorFlow's 'SAME' for a 3x3 stride-2 conv on an even
    # size, as DDPM's code and the google/ddpm-* checkpoints (diffusers' downsample_padding=0) have it)
    downsample_padding: str = "symmetric"

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "in_channels", "out_channels", "channels", "num_res_blocks"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(len(self.channel_mults) >= 1 and all(m >= 1 for m in self.channel_mults),
             f"channel_mults must be one or more positive multipliers, got {self.channel_mults}")
        need(self.norm_groups >= 1, f"norm_groups must be >= 1, got {self.norm_groups}")
        need(self.attention_head_dim is None or self.attention_head_dim >= 1,
             f"attention_head_dim must be >= 1 (or None: one head), got {self.attention_head_dim}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(self.time_conditioning in ("add", "scale-shift"),
             f"time_conditioning must be 'add' or 'scale-shift', got {self.time_conditioning!r}")
        need(self.downsample_padding in ("symmetric", "bottom-right"),
             f"downsample_padding must be 'symmetric' or 'bottom-right', got {self.downsample_padding!r}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.context_dim >= 0, f"context_dim must be >= 0, got {self.context_dim}")
        need(self.transformer_depth >= 1, f"transformer_depth must be >= 1, got {self.transformer_depth}")
        need(not (self.num_classes and self.context_dim),
             "a model is conditioned on class labels (num_classes) or on text (context_dim), not both")
        need(not self.context_dim or self.attention_resolutions,
             "a text-conditional U-Net needs attention_resolutions (its cross-attention lives there)")
        factor = 2 ** (len(self.channel_mults) - 1)
        need(self.image_size % factor == 0,
             f"image_size {self.image_size} is not divisible by {factor}, the U-Net's total downsampling "
             f"({len(self.channel_mults)} levels); choose a size divisible by {factor} or fewer levels")
        for c in (self.channels, *(self.channels * m for m in self.channel_mults)):
            need(c % self.norm_groups == 0, f"width {c} is not divisible by norm_groups {self.norm_groups}")
            if self.attention_head_dim is not None:
                need(c % self.attention_head_dim == 0,
                     f"width {c} is not divisible by attention_head_dim {self.attention_head_dim}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config_from_dict(cls, d, "U-Net")


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding (added, or as scale/shift of the second norm), GroupNorm ->
    SiLU -> dropout -> conv, plus a (1x1 conv) shortcut. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out * (2 if scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out[*2], 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (scaled dot product via PyTorch SDPA), residual."""

    def __init__(self, channels: int, head_dim: int | None, groups: int):
        super().__init__()
        self.heads = channels // head_dim if head_dim else 1
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``context`` / ``mask`` (a text model's tokens) are accepted and unused: every attention position of
        the U-Net is called the same way."""
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class NoAttention(nn.Module):
    """The identity at a resolution without attention, with the attention blocks' call signature."""

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return x


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer over the image tokens: self-attention, cross-attention to the text, GEGLU
    feed-forward (4x), each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = CrossAttention(dim, dim, heads)
        self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.ff_in = nn.Linear(dim, 8 * dim)  # GEGLU: value and gate, 4 * dim each
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, None)
        x = x + self.cross_attn(self.norm2(x), context, mask)
        value, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm -> per-pixel linear -> transformer layer(s) over the H*W tokens -> zero-initialised linear,
    residual: the text-conditional counterpart of ``AttentionBlock``."""

    def __init__(self, channels: int, context_dim: int, head_dim: int | None, groups: int, depth: int):
        super().__init__()
        heads = channels // head_dim if head_dim else max(1, channels // 64)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context, mask)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """3x3 conv, stride 2: (B, C, H, W) -> (B, C, H/2, W/2) for even H, W. ``padding``: see UNetConfig."""

    def __init__(self, channels: int, padding: str = "symmetric"):
        super().__init__()
        self.bottom_right = padding == "bottom-right"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The res blocks (each optionally followed by attention) of one resolution on one side of the U."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    """The denoiser (x_t, t, cond) -> prediction. ``decoder=False`` builds the way down and the middle only (time /
    label / text embeddings, conv_in, the down levels, the middle block): the trainable copy a ControlNet makes
    of its base (models.controlnet), whose parameter names are the base's own."""

    def __init__(self, config: UNetConfig, decoder: bool = True):
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        temb_dim = 4 * ch
        ss = cfg.time_conditioning == "scale-shift"
        res_block = lambda a, b: ResBlock(a, b, temb_dim, cfg.dropout, cfg.norm_groups, ss)  # noqa: E731
        if cfg.context_dim:
            attn = lambda c: SpatialTransformer(c, cfg.context_dim, cfg.attention_head_dim,  # noqa: E731
                                                cfg.norm_groups, cfg.transformer_depth)
        else:
            attn = lambda c: AttentionBlock(c, cfg.attention_head_dim, cfg.norm_groups)  # noqa: E731

        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # class labels: index num_classes is the null label (unconditional / classifier-free guidance)
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None
        # text: the masked mean of the prompt's tokens also joins the time embedding (global conditioning)
        self.text_pool = nn.Linear(cfg.context_dim, temb_dim) if cfg.context_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mults]
        n_levels = len(widths)
        self.down, self.downsamples = nn.ModuleList(), nn.ModuleList()
        skip_channels = [ch]
        c, res = ch, cfg.image_size
        for i, w in enumerate(widths):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res_block(c, w))
                attns.append(attn(w) if res in cfg.attention_resolutions else NoAttention())
                c = w
                skip_channels.append(c)
            self.down.append(Level(blocks, attns))
            if i < n_levels - 1:
                self.downsamples.append(Downsample(c, cfg.downsample_padding))
                skip_channels.append(c)
                res //= 2
        self.mid_block1, self.mid_attn, self.mid_block2 = res_block(c, c), attn(c), res_block(c, c)
        self.skip_channels = list(skip_channels)  # the width of each skip, in the order the way down makes them
        self.gradient_checkpointing = False  # a training-time choice (not in the config, not in checkpoints)
        if not decoder:
            return

        self.up, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res_block(c + skip_channels.pop(), w))
                attns.append(attn(w) if res in cfg.attention_resolutions else NoAttention())
                c = w
            self.up.append(Level(blocks, attns))
            if i > 0:
                self.upsamples.append(Upsample(c))
                res *= 2
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def enable_gradient_checkpointing(self, on: bool = True) -> "UNet":
        """Recompute each residual block + attention pair in the backward pass instead of keeping its
        activations: less memory for about one more forward pass. Only while training with gradients."""
        self.gradient_checkpointing = on
        return self

    def _block(self, block, attn, h: Tensor, temb: Tensor, context, mask) -> Tensor:
        # in training, or in a frozen network a gradient flows through (a ControlNet's base)
        if self.gradient_checkpointing and torch.is_grad_enabled() and (self.training or h.requires_grad):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(lambda h_, e_, c_: attn(block(h_, e_), c_, mask), h, temb, context,
                              use_reentrant=False)
        return attn(block(h, temb), context, mask)

    def embed(self, x: Tensor, t: Tensor, cond) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(time embedding (+ label or pooled text), text tokens, text mask) for a batch like ``x``."""
        cfg = self.config
        temb = self.time_mlp(timestep_embedding(t, cfg.channels).to(self.conv_in.weight.dtype))  # (B, 4ch)
        labels, context, mask = split_condition(cond, cfg.num_classes, cfg.context_dim, x.shape[0], x.device)
        if labels is not None:
            temb = temb + self.label_emb(labels)
        if context is not None:
            context = context.to(temb.dtype)
            temb = temb + self.text_pool(masked_mean(context, mask))
        return temb, context, mask

    def encode(self, h: Tensor, temb: Tensor, context, mask) -> tuple[Tensor, list[Tensor]]:
        """The way down and the middle from the features after ``conv_in``: (middle output, skips)."""
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = self._block(block, attn, h, temb, context, mask)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                skips.append(h)
        h = self.mid_block2(self._block(self.mid_block1, self.mid_attn, h, temb, context, mask), temb)
        return h, skips

    def forward(self, x: Tensor, t: Tensor, cond=None, control: tuple[list[Tensor], Tensor] | None = None
                ) -> Tensor:
        """x: (B, C_in, H, W); t: (B,) the schedule's time; cond: class labels (B,) ints (num_classes = null)
        for a class model, a ``TextCond`` for a text model, None for an unconditional model. ``control``: a
        ControlNet's residuals (one per skip, in the skips' order, and one for the middle output), added to
        them before the way up (Zhang et al. 2023, fig. 3)."""
        temb, context, mask = self.embed(x, t, cond)
        h, skips = self.encode(self.conv_in(x), temb, context, mask)
        if control is not None:
            residuals, mid = control
            if len(residuals) != len(skips):
                raise ConfigError(f"the control has {len(residuals)} skip residuals, this U-Net {len(skips)} skips")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, residuals)]
            h = h + mid.to(h.dtype)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = self._block(block, attn, torch.cat([h, skips.pop()], dim=1), temb, context, mask)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
