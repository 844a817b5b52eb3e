"""Judging a model taught a subject (``kakusan eval --subject DIR``), DreamBooth's way (Ruiz et al. 2023, sec. 4.1):

- **subject fidelity**: the mean cosine similarity between every generated image and every image of the subject,
  in a feature space: a domain classifier's features (``--extractor classifier:FILE``), CLIP's image embeddings
  (``--clip DIR``, a Hugging Face CLIP model folder), or any extractor ``kakusan eval`` takes;
- **prompt fidelity**: the mean cosine similarity between each generated image and its prompt in CLIP's joint
  space, where a CLIP model is on disk; otherwise the record says it was not computed, and why;
- **prior drift**: how far the tuned model moved from its base on prompts that have nothing to do with the
  subject: both draw the same ``DRIFT_PROMPTS`` (50 by default) from the same noise (the same seed), and the
  drift is the mean over the pairs of (a) the root-mean-square pixel difference (images in [-1, 1]) and (b) one
  minus the cosine similarity of their features. 0 for the base against itself, and for a textual-inversion
  embedding (whose model is the base's, bitwise).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .provenance import environment, file_sha256, tensor_sha256

Tensor = torch.Tensor

# Prompts unrelated to any one subject (objects, faces, places), for prior drift; as plain emoji-style names, which
# kakusan's emoji text model and a Stable Diffusion model both read.
DRIFT_PROMPTS = (
    "red apple", "grinning face", "dog face", "rocket", "house", "pizza", "sun with face", "crescent moon",
    "snowman", "rainbow", "bicycle", "automobile", "airplane", "sailboat", "ghost", "robot", "alarm clock",
    "light bulb", "umbrella", "soccer ball", "guitar", "books", "hamburger", "birthday cake", "banana", "grapes",
    "strawberry", "carrot", "hot beverage", "rose", "sunflower", "deciduous tree", "palm tree", "cactus",
    "mountain", "volcano", "globe showing europe-africa", "fire", "water wave", "snowflake", "star", "heart",
    "thumbs up", "waving hand", "smiling face with sunglasses", "face with tears of joy", "monkey face",
    "penguin", "frog", "turtle")
assert len(DRIFT_PROMPTS) == 50


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """The mean cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D)."""
    a = torch.nn.functional.normalize(a.double().flatten(1), dim=1)
    b = torch.nn.functional.normalize(b.double().flatten(1), dim=1)
    return float((a @ b.T).mean())


def paired_drift(base_u8: Tensor, tuned_u8: Tensor, base_features: Tensor | None = None,
                 tuned_features: Tensor | None = None) -> dict:
    """Prior drift between pairs of images drawn from the same noise: the mean root-mean-square pixel difference
    (in [-1, 1]: 0 same images, 2 black against white) and, given features, the mean of 1 - their cosine."""
    if base_u8.shape != tuned_u8.shape:
        raise ConfigError(f"prior drift compares images in pairs: {tuple(base_u8.shape)} and "
                          f"{tuple(tuned_u8.shape)}")
    x = base_u8.double() / 127.5 - 1
    y = tuned_u8.double() / 127.5 - 1
    out = {"pixel_rms": float((x - y).square().flatten(1).mean(1).sqrt().mean())}
    if base_features is not None:
        cos = torch.nn.functional.cosine_similarity(base_features.double(), tuned_features.double(), dim=1)
        out["feature_cosine_distance"] = float((1 - cos).clamp_min(0).mean())  # (not -1e-16 for equal ones)
    return out


class ClipScorer:
    """A Hugging Face CLIP model folder (``CLIPModel``: vision and text towers, with their projections): image
    embeddings (resized bicubically to its input size, normalised with the processor's mean and std) and prompt
    embeddings, for subject and prompt fidelity."""

    def __init__(self, folder, device="cpu"):
        from pathlib import Path

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"--clip {path}: not a CLIP model folder (no config.json)")
        weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        if not weights:
            raise ConfigError(f"--clip {path}: no weight files (*.safetensors or *.bin)")
        try:
            from transformers import CLIPModel, CLIPTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            self.model = CLIPModel.from_pretrained(path).eval().requires_grad_(False).to(device)
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--clip {path}: cannot load a CLIP model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
        import json

        pre = {}
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        self.mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.device = torch.device(device)
        self.record = {"name": "clip", "path": str(path), "weights_sha256": file_sha256(*weights),
                       "image_size": self.size, "resize": f"to {self.size}x{self.size} bicubic (antialiased)",
                       "embedding_dim": int(self.model.config.projection_dim)}

    @staticmethod
    def _as_tensor(out) -> Tensor:
        return out if torch.is_tensor(out) else (getattr(out, "pooler_output", None)
                                                 if getattr(out, "pooler_output", None) is not None
                                                 else out[0])

    @torch.no_grad()
    def images(self, u8: Tensor, batch_size: int = 64) -> Tensor:
        out = []
        for i in range(0, len(u8), batch_size):
            x = u8[i:i + batch_size].float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                                antialias=True).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(self._as_tensor(self.model.get_image_features(pixel_values=x)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        ids = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self._as_tensor(self.model.get_text_features(**ids)).float().cpu()


def prompt_fidelity(clip: ClipScorer, images_u8: Tensor, prompts: list[str]) -> float:
    """The mean CLIP cosine similarity of each image with its own prompt (``prompts`` one per image)."""
    a, b = clip.images(images_u8), clip.texts(prompts)
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())


def _features(extractor, clip, images_u8: Tensor, what: str) -> Tensor:
    if extractor is not None:
        return extractor(images_u8, what=what)[0]
    return clip.images(images_u8)


def evaluate_subject(checkpoint, subject: str, prompts: list[str], *, n: int, extractor=None, clip=None,
                     base=None, drift_prompts: list[str] | None = None, sampler: str | None = None,
                     steps: int | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 250,
                     device="cpu", precision: str = "auto", embedding=None, images=None) -> dict:
    """The three numbers (see the module's docstring) of ``checkpoint``'s samples of ``prompts`` (``n`` spread over
    them; or the folder ``images``) against the subject's images in the folder ``subject``, with the record of how
    each was made. ``base``: the model before tuning, for prior drift (its samples and the checkpoint's of
    ``drift_prompts`` from the same noise). ``embedding``: textual-inversion files loaded into the checkpoint."""
    from .evaluate import generate, read_image_folder

    if extractor is None and clip is None:
        raise ConfigError("subject fidelity needs a feature space: --extractor (e.g. classifier:FILE) or --clip DIR")
    folder = subject.partition(":")[2] if subject.startswith("folder:") else subject
    subject_u8 = read_image_folder(folder)
    space = extractor.record if extractor is not None else clip.record
    subject_f = _features(extractor, clip, subject_u8, "subject images")
    load = dict(device=device, precision=precision, embedding=embedding)
    pipe = None
    if images is not None:
        fake_u8 = read_image_folder(images, n)
        source = {"kind": "folder", "path": str(images), "n": len(fake_u8), "images_sha256": tensor_sha256(fake_u8)}
        per_image_prompts = None
    else:
        from ..pipeline import Pipeline

        pipe = Pipeline.load(checkpoint, **load)
        if not pipe.is_text or not prompts:
            raise ConfigError("--subject judges a text model's samples of the subject: give a text-conditional "
                              "--checkpoint and its prompts (--prompt 'a sks cat', repeated)")
        fake_u8, _, source = generate(pipe, n, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                                      batch_size=batch_size, device=device, precision=precision, prompt=prompts)
        source["embeddings"] = pipe.embeddings
        per_image_prompts = [prompts[i * len(prompts) // n] for i in range(n)]
    if fake_u8.shape[1] != subject_u8.shape[1]:
        raise ConfigError(f"the samples have {fake_u8.shape[1]} channel(s), the subject's images "
                          f"{subject_u8.shape[1]}")
    fake_f = _features(extractor, clip, fake_u8, "samples")
    scores = {"subject_fidelity": mean_cosine(fake_f, subject_f),
              "subject_self_similarity": _self_similarity(subject_f)}
    notes = {}
    if clip is not None and per_image_prompts is not None:
        scores["prompt_fidelity"] = prompt_fidelity(clip, fake_u8, per_image_prompts)
    else:
        scores["prompt_fidelity"] = None
        notes["prompt_fidelity"] = ("not computed: " + ("no CLIP model was given (--clip DIR, a Hugging Face CLIP "
                                                        "folder); kakusan has no text-image model of its own"
                                                        if clip is None else "the samples came from a folder, "
                                                        "without their prompts"))
    drift_record = None
    if base is not None:
        if pipe is None:
            raise ConfigError("prior drift samples the tuned model: give --checkpoint, not --images, with --base")
        from ..pipeline import Pipeline

        drift_prompts = list(drift_prompts or DRIFT_PROMPTS)
        base_pipe = Pipeline.load(base, device=device, precision=precision)
        kw = dict(sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                  device=device, precision=precision, prompt=drift_prompts)
        b_u8, _, b_src = generate(base_pipe, len(drift_prompts), **kw)
        t_u8, _, t_src = generate(pipe, len(drift_prompts), **kw)
        scores["prior_drift"] = paired_drift(b_u8, t_u8, _features(extractor, clip, b_u8, "base samples"),
                                             _features(extractor, clip, t_u8, "tuned samples"))
        drift_record = {"base": b_src, "tuned": t_src, "prompts": drift_prompts,
                        "noise": f"the same for both: seed {seed}"}
    else:
        scores["prior_drift"] = None
        notes["prior_drift"] = "not computed: give the model before tuning with --base"
    record = {"feature_space": space, "subject": {"path": str(folder), "n": len(subject_u8),
                                                   "images_sha256": tensor_sha256(subject_u8)},
              "samples": source, "prior_drift": drift_record,
              "metrics": {"subject_fidelity": "mean cosine similarity of every sample with every subject image",
                          "subject_self_similarity": "the same among the subject images (pairs of distinct ones)",
                          "prompt_fidelity": "mean CLIP cosine similarity of each sample with its prompt",
                          "prior_drift": "base and tuned samples from the same noise, in pairs: mean RMS pixel "
                                         "difference in [-1, 1], mean 1 - feature cosine"},
              **({"clip": clip.record} if clip is not None else {}), **environment()}
    return {"format": 1, "kind": "subject", "scores": scores, "notes": notes, "record": record,
            "images": fake_u8}


def _self_similarity(f: Tensor) -> float | None:
    if len(f) < 2:
        return None
    u = torch.nn.functional.normalize(f.double().flatten(1), dim=1)
    sims = u @ u.T
    return float(sims[~torch.eye(len(u), dtype=torch.bool)].mean())


def format_subject(result: dict) -> str:
    s = result["scores"]
    parts = [f"subject fidelity {s['subject_fidelity']:.4f}"]
    if s.get("subject_self_similarity") is not None:
        parts[0] += f" (the subject's images among themselves {s['subject_self_similarity']:.4f})"
    parts.append("prompt fidelity " + (f"{s['prompt_fidelity']:.4f}" if s["prompt_fidelity"] is not None
                                       else "not computed"))
    d = s["prior_drift"]
    if d is None:
        parts.append("prior drift not computed (--base)")
    else:
        parts.append(f"prior drift {d['pixel_rms']:.4f} RMS pixels" + (
            f", {d['feature_cosine_distance']:.4f} feature cosine distance" if "feature_cosine_distance" in d else ""))
    return "; ".join(parts)
