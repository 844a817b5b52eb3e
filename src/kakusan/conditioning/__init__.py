"""Conditioning inputs: encoded text prompts (class labels are plain integer tensors)."""

from .text import (DEFAULT_TEXT_ENCODER, TextCond, TextEncoder, broadcast_cond, cached_embeddings, cat_conds,
                   check_prompts, encoder_for_checkpoint, load_text_encoder)

__all__ = ["DEFAULT_TEXT_ENCODER", "TextCond", "TextEncoder", "broadcast_cond", "cached_embeddings", "cat_conds",
           "check_prompts", "encoder_for_checkpoint", "load_text_encoder"]
