"""Textual-inversion embeddings (Gal et al. 2023): new words for a frozen text encoder.

A placeholder string (``<my-cat>``) becomes K new tokens of the tokenizer (``<my-cat>``, ``<my-cat>_1``, ...,
``<my-cat>_{K-1}``; a prompt's placeholder is expanded to all K, as diffusers does), each with one learned input
embedding (a row of the encoder's token table). The encoder's own table is not touched: :class:`ExtendedEmbedding`
stands in for it, looking ids below the first added id up in the original table and the added ids in
:class:`TokenVectors` modules, the only thing textual inversion trains.

Files (``read_embedding_file``), converted here at the boundary:
- diffusers' ``learned_embeds.safetensors`` (what kakusan writes): one tensor (K, D) named by its placeholder;
  kakusan adds its own metadata (kind ``kakusan-embedding``, the text encoder's record);
- the A1111 / kohya layouts: a safetensors file with ``emb_params`` (K, D), or ``string_to_param.*``; A1111's
  ``.pt`` (``{"string_to_param": {"*": (K, D)}, "name": ...}``, read with ``torch.load(weights_only=True)``,
  nothing unpickled beyond tensors and plain values). As in A1111, such a file's word is its file name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError

Tensor = torch.Tensor

EMBEDDING_KIND = "kakusan-embedding"
MAX_VECTORS = 75  # tokens a placeholder may expand to (a CLIP prompt holds 75 between its start and end tokens)


def token_strings(placeholder: str, k: int) -> list[str]:
    """The K tokens of a placeholder: the placeholder itself, then ``<placeholder>_1`` .. ``_{K-1}`` (diffusers')."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, k)]


def check_placeholder(placeholder) -> str:
    if not isinstance(placeholder, str) or not placeholder.strip() or re.search(r"\s", placeholder):
        raise ConfigError(f"a placeholder is one word without spaces, e.g. '<my-cat>', got {placeholder!r}")
    return placeholder


def expand_placeholders(prompt: str, placeholders: dict[str, list[str]]) -> str:
    """``prompt`` with each multi-vector placeholder written as its K tokens (``<p>`` -> ``<p> <p>_1 <p>_2``)."""
    for p, tokens in placeholders.items():
        if len(tokens) > 1:  # the placeholder, not the start of one of its own _i tokens
            prompt = re.sub(re.escape(p) + r"(?!_\d)", lambda _m, t=" ".join(tokens): t, prompt)
    return prompt


class TokenVectors(nn.Module):
    """The input embeddings of K added tokens: ``weight`` (K, D)."""

    def __init__(self, vectors: Tensor):
        super().__init__()
        if vectors.ndim != 2:
            raise ConfigError(f"token vectors must be (K, D), got {tuple(vectors.shape)}")
        self.weight = nn.Parameter(vectors.detach().clone().float())


class ExtendedEmbedding(nn.Module):
    """A token table with rows added after it: ids below ``first_id`` read ``base`` (the encoder's own
    ``nn.Embedding``, unchanged), ids from ``first_id`` on read the rows of ``parts`` in order."""

    def __init__(self, base: nn.Embedding, first_id: int):
        super().__init__()
        self.base, self.first_id = base, int(first_id)
        self.parts = nn.ModuleList()

    @property
    def weight(self) -> Tensor:  # (for code that asks a token table its dtype or device)
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_added(self) -> int:
        return sum(p.weight.shape[0] for p in self.parts)

    def forward(self, ids: Tensor) -> Tensor:  # (B, L) -> (B, L, D)
        added = ids >= self.first_id
        out = self.base(torch.where(added, torch.zeros_like(ids), ids))
        if not len(self.parts):
            return out
        rows = torch.cat([p.weight for p in self.parts]).to(out.dtype)  # (K_all, D)
        new = rows[(ids - self.first_id).clamp(0, len(rows) - 1)]
        return torch.where(added[..., None], new, out)


# --------------------------------------------------------------------------------------------------------------
# Files


@dataclass
class EmbeddingFile:
    """One embedding read from a file: its word (placeholder), vectors (K, D), the layout it came in, and (kakusan's
    own files) the record of the text encoder it was trained for."""

    token: str
    vectors: Tensor
    layout: str
    text_encoder: dict | None = None


def embedding_file_contents(placeholder: str, vectors: Tensor, text_encoder: dict, extra: dict | None = None
                            ) -> tuple[dict, dict]:
    """(tensors, metadata) of an embedding file: diffusers' ``learned_embeds.safetensors`` layout ({placeholder:
    (K, D) float32}) with kakusan's metadata (the text encoder's record, and ``extra``, as JSON strings)."""
    meta = {"kind": EMBEDDING_KIND, "token": placeholder, "num_vectors": str(vectors.shape[0]),
            "text_encoder": json.dumps(text_encoder), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    return {placeholder: vectors.detach().float().contiguous().cpu()}, meta


def save_embedding(path: str | Path, placeholder: str, vectors: Tensor, text_encoder: dict,
                   extra: dict | None = None) -> Path:
    from ..checkpoints import save_file_atomic

    return save_file_atomic(Path(path), *embedding_file_contents(placeholder, vectors, text_encoder, extra))


def _as_vectors(t, path: Path) -> Tensor:
    if not torch.is_tensor(t) or t.ndim not in (1, 2) or not t.is_floating_point():
        raise CheckpointError(f"{path}: an embedding is a float tensor (K, D) or (D,), got "
                              f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    t = (t[None] if t.ndim == 1 else t).detach().float()
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{path}: the embedding has NaN or inf values")
    return t


def read_embedding_file(path: str | Path) -> EmbeddingFile:
    """The embedding in ``path``: diffusers' layout (kakusan's too), or A1111 / kohya's (``emb_params``,
    ``string_to_param``; the word is the file name, as A1111 has it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"embedding file not found: {path}")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            data = load_file(str(path))
        else:  # A1111 .pt / diffusers .bin: tensors and plain values only
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors / pickle raise many kinds for a damaged file
        raise CheckpointError(f"{path}: not a readable embedding file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: not an embedding file (no tensors)")
    stem = path.name.split(".")[0]
    if isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        params = list(data["string_to_param"].values())
        if len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} tensors; one was expected")
        return EmbeddingFile(stem, _as_vectors(params[0], path), "a1111")
    if "emb_params" in data:  # A1111 / kohya safetensors
        return EmbeddingFile(stem, _as_vectors(data["emb_params"], path), "a1111")
    flat = [k for k in data if k.startswith("string_to_param.")]
    if len(flat) == 1:
        return EmbeddingFile(stem, _as_vectors(data[flat[0]], path), "a1111")
    if {"clip_l", "clip_g"} & set(data):
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l / clip_g, one per text tower); kakusan reads "
                              f"embeddings for one text encoder")
    tensors = {k: v for k, v in data.items() if torch.is_tensor(v)}
    if len(tensors) != 1:
        raise CheckpointError(f"{path}: not an embedding layout kakusan reads (tensors {sorted(tensors)[:4]}; "
                              f"expected one tensor named by its token, 'emb_params' or 'string_to_param')")
    token, vectors = next(iter(tensors.items()))
    record = None
    if meta.get("kind") == EMBEDDING_KIND:
        try:
            record = json.loads(meta["text_encoder"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: incomplete kakusan embedding metadata ({e})") from None
    return EmbeddingFile(token, _as_vectors(vectors, path), "diffusers", record)
