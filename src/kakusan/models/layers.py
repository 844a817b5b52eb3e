"""Pieces the denoiser backbones share: sinusoidal features of the time, cross-attention to text tokens, and
the reading of a condition (class labels, a ``TextCond`` or nothing) against what a model was built for."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

Tensor = torch.Tensor


def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0, shift: float = 1.0,
               cos_first: bool = False) -> Tensor:
    """[sin(t w_k), cos(t w_k)] (or cos first) with w_k = max_period^(-k / (half - shift)), k = 0 .. half - 1,
    zero-padded to ``dim``. ``shift`` = 1 is DDPM's spacing, 0 (with ``cos_first``) DiT's. (B,) -> (B, dim)."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / max(half - shift, 1))
    args = t.float()[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t (Vaswani et al. 2017; DDPM appendix B): [sin(t w_k), cos(t w_k)] with
    w_k = max_period^(-k / (half - 1)), k = 0 .. half - 1 (DDPM's spacing). (B,) -> (B, dim)."""
    return sinusoidal(t, dim, max_period, shift=1.0)


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (B, N, C) to context tokens (B, L, D) with a padding mask."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L), True = attend
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(h.transpose(1, 2).reshape(B, N, C))


def split_condition(cond, num_classes: int, context_dim: int, batch: int, device) -> tuple:
    """Check ``cond`` against a model built with ``num_classes`` / ``context_dim`` and return
    (labels, tokens, mask): class indices (None = the null label, index num_classes) for a class model, the
    prompt's token embeddings and padding mask for a text model, all None for an unconditional one."""
    if num_classes:
        if cond is None:  # unconditional: the null label
            return torch.full((batch,), num_classes, device=device, dtype=torch.long), None, None
        if not isinstance(cond, Tensor) or cond.is_floating_point():
            raise ConfigError("this model is class-conditional; its condition is a tensor of class indices")
        return cond, None, None
    if context_dim:
        if cond is None or isinstance(cond, Tensor):
            raise ConfigError("this model is text-conditional; its condition is an encoded prompt (TextCond), "
                              "the empty prompt's encoding for unconditional samples")
        if cond.dim != context_dim:
            raise ConfigError(f"the text embeddings are {cond.dim}-wide, the model was trained on "
                              f"{context_dim}-wide ones (a different text encoder?)")
        return None, cond.tokens, cond.mask
    if cond is not None:
        raise ConfigError("this model is unconditional; it takes no class labels or prompts")
    return None, None, None


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """The mean of the unpadded tokens: (B, L, D), (B, L) bool -> (B, D)."""
    m = mask[..., None].to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1)
