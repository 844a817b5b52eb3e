"""Scoring generated images against real ones, with provenance; and sweeps over samplers x steps x guidance.

    extractor = load_extractor("classifier:runs/cls/mnist.safetensors")
    ref = reference_features(extractor, "mnist", split="test")
    fake = sample_features(extractor, "runs/mnist", n=10_000, sampler="unipc-2", steps=20, guidance=2)
    result = score(extractor, fake, ref)      # {"scores": {...}, "record": {...}, "preliminary": ...}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .features import FeatureExtractor
from .provenance import environment, load_stats, sample_count_label, save_stats, tensor_sha256
from .stats import (GaussianStats, fid_from_stats, inception_score, kernel_inception_distance, knn_radii,
                    precision_recall)

Tensor = torch.Tensor


@dataclass
class FeatureSet:
    """Features (and logits) of one side of a comparison, with the record of where they came from.
    ``labels``: true labels of real data, or the requested class of class-conditional samples."""

    features: Tensor
    logits: Tensor | None
    source: dict
    labels: Tensor | None = None
    stats: GaussianStats | None = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.features)

    def gaussian(self, name: str) -> GaussianStats:
        if self.stats is None:
            self.stats = GaussianStats.of(self.features, name)
        return self.stats


# --------------------------------------------------------------------------------------------------------------
# The real side


def reference_features(extractor: FeatureExtractor, data: str, split: str = "test", limit: int | None = None,
                       cache: bool = True, device="cpu") -> FeatureSet:
    """Features of a real data set split, cached under kakusan's cache keyed by extractor + data + split + n."""
    from ..data import load_dataset
    from ..data.datasets import cache_dir

    key = json.dumps([extractor.record, data, split, limit], sort_keys=True)
    path = cache_dir() / "stats" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
    if cache and path.is_file():
        return stats_features(path, extractor)
    if data.startswith("folder:"):  # a folder of real images is read at its own size, like generated ones
        images, labels = read_image_folder(data.partition(":")[2], limit), None
    else:
        ds = load_dataset(data, split, limit=limit)
        images, labels = ds.images, ds.labels
    feats, logits = extractor(images, device=device, what=f"{data} ({split})")
    source = {"kind": "dataset", "data": data, "split": split, "n": len(images),
              "images_sha256": tensor_sha256(images)}
    if cache:
        save_stats(path, feats, logits, {"extractor": extractor.record, "source": source, **environment()}, labels)
    return FeatureSet(feats, logits, source, labels)


def reference_set(extractor: FeatureExtractor, data: str | None = None, split: str = "test", limit: int | None = None,
                  stats: str | Path | None = None, device="cpu") -> FeatureSet:
    """The real side of a score (``eval``, ``sweep``, ``train --eval-every``): a stats file written by ``kakusan
    stats`` (refused if another extractor made it), or a data set's split through the stats cache."""
    if stats:
        return stats_features(stats, extractor)
    if not data:
        raise ConfigError("give the real side: --ref DATA (e.g. mnist) or --ref-stats FILE")
    return reference_features(extractor, data, split, limit, device=device)


def stats_features(path: str | Path, extractor: FeatureExtractor) -> FeatureSet:
    """A feature set from a stats file (refused if another extractor made it)."""
    tensors, record = load_stats(path, extractor.record)
    source = {**record["source"], "stats_file": str(path)}
    fs = FeatureSet(tensors["features"], tensors.get("logits"), source, tensors.get("labels"))
    fs.stats = GaussianStats(tensors["mu"].numpy(), tensors["sigma"].numpy(), len(tensors["features"]))
    return fs


def write_stats(extractor: FeatureExtractor, fs: FeatureSet, path: str | Path) -> Path:
    return save_stats(path, fs.features, fs.logits, {"extractor": extractor.record, "source": fs.source,
                                                      **environment()}, fs.labels)


# --------------------------------------------------------------------------------------------------------------
# The generated side


def read_image_folder(path: str | Path, limit: int | None = None) -> Tensor:
    """Every image in a folder, at its own size; all must share one size and channel count (else an error
    naming the counts of each). Greyscale (L) -> 1 channel; RGB / RGBA (composited on white) / P -> 3."""
    from PIL import Image

    from ..data.datasets import IMAGE_EXTENSIONS, load_image_folder

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{root}: no image files found")
    shapes: Counter = Counter()
    for p in files:
        try:
            with Image.open(p) as im:
                shapes[(1 if im.mode in ("L", "1", "I", "I;16") else 3, im.size)] += 1
        except Exception:  # noqa: BLE001 - unreadable files are skipped (and reported) by the loader
            continue
    if len(shapes) > 1:
        desc = ", ".join(f"{n} x {w}x{h} with {c} channel(s)" for (c, (w, h)), n in shapes.most_common())
        raise DataError(f"{root}: the images differ in size or channels ({desc}); a score needs one format")
    if not shapes:
        raise DataError(f"{root}: none of the {len(files)} image files could be read")
    (channels, (w, h)), = shapes
    if w != h:
        raise DataError(f"{root}: images are {w}x{h}; kakusan scores square images")
    return load_image_folder(root, w, channels, limit).images


def folder_features(extractor: FeatureExtractor, path: str | Path, limit: int | None = None,
                    device="cpu") -> FeatureSet:
    images = read_image_folder(path, limit)
    feats, logits = extractor(images, device=device, what=str(path))
    return FeatureSet(feats, logits, {"kind": "folder", "path": str(path), "n": len(images),
                                      "images_sha256": tensor_sha256(images)})


def _pipeline(checkpoint, guide=None, embedding=None, **load):
    """``checkpoint`` as a :class:`~kakusan.pipeline.Pipeline`: itself if it is one (its guide and embeddings, if
    any, already attached), else loaded with ``load`` options, ``guide`` and textual-inversion ``embedding``
    file(s)."""
    from ..pipeline import Pipeline

    if not isinstance(checkpoint, Pipeline):
        return Pipeline.load(checkpoint, guide=guide, embedding=embedding, **load)
    if guide is not None:
        raise ConfigError("a loaded pipeline brings its own guide model: attach it there (Pipeline.attach_guide)")
    if embedding:
        raise ConfigError("a loaded pipeline brings its own embeddings: add them there (Pipeline.add_embedding)")
    return checkpoint


def generate(checkpoint, n: int, *, sampler: str | None = None, steps: int | None = None,
             spacing: str | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 250,
             device="cpu", progress: bool = False, precision: str = "auto", prompt: list[str] | None = None,
             compile: bool = False, guide: str | Path | None = None, embedding=None,
             **options) -> tuple[Tensor, Tensor | None, dict]:
    """``n`` samples (uint8) from a checkpoint (a path or a loaded :class:`~kakusan.pipeline.Pipeline`), balanced
    over classes for a class-conditional model and over ``prompt`` for a text model; ``options``: more pipeline
    arguments (negative prompt / class, guidance rescale / interval, ...). Returns (images, requested labels or
    None, source record with the wall time). ``guide``: a guide model for autoguidance (with a loaded pipeline,
    attach it there instead); ``embedding``: textual-inversion file(s) whose words the prompts may use."""
    from ..samplers import get_sampler

    if sampler is not None:
        get_sampler(sampler)  # a bad name fails before the checkpoint is read
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    pipe = _pipeline(checkpoint, guide, embedding, device=device, precision=precision, compile=compile)
    labels = None
    if pipe.is_text:
        if not prompt:
            raise ConfigError(f"{pipe.source} is text-conditional: give the prompts to sample (--prompt TEXT, "
                              f"repeated), spread evenly over the {n} samples")
        prompts = [prompt[i * len(prompt) // n] for i in range(n)]  # n samples in len(prompt) even blocks
        kw = {"prompt": prompts}
    elif pipe.num_classes:
        labels = torch.arange(n) % pipe.num_classes
        kw = {"class_label": labels.tolist()}
    else:
        if prompt:
            raise ConfigError("prompts were given, but this checkpoint is not text-conditional")
        kw = {"n": n}
    gen = pipe(**kw, sampler=sampler, steps=steps, spacing=spacing, guidance=guidance, seed=seed,
               batch_size=batch_size, progress=progress, **options)
    rec = gen.record
    source = {"kind": "samples", "checkpoint": pipe.source, "checkpoint_sha256": pipe.weights_sha256,
              "weights": Path(pipe.source).name if Path(pipe.source).is_file() else
              ("ema.safetensors" if pipe.use_ema else "model.safetensors"),
              "sampler": rec["sampler"], "steps": rec["steps"], "nfe": rec["nfe"], "spacing": rec["spacing"],
              "sigma_max": rec["sigma_max"], "guidance": guidance, "seed": seed, "n": n, "batch_size": batch_size,
              "device": str(pipe.device), "sample_seconds": gen.seconds,
              "precision": pipe.precision, "compiled": getattr(pipe.denoiser, "denoiser", pipe.denoiser).compiled,
              "classes": "balanced" if labels is not None else None}
    for key in ("negative_prompt", "negative_class", "guidance_rescale", "guidance_interval", "lora",
                "guidance_kind", "guide", "rho", "sigma_min", "grid_rule"):
        if rec.get(key):
            source[key] = rec[key]
    if pipe.is_text:
        source["prompts"] = list(prompt)
    if pipe.embeddings:  # the textual-inversion words the prompts could use: files and hashes
        source["embeddings"] = pipe.embeddings
    if pipe.autoencoder is not None:
        source["autoencoder_sha256"] = pipe.autoencoder.sha256
    return gen.uint8(), labels, source


def sample_features(extractor: FeatureExtractor, checkpoint, n: int, device="cpu", **kw) -> FeatureSet:
    images, labels, source = generate(checkpoint, n, device=device, **kw)
    feats, logits = extractor(images, device=device, what="samples")
    fs = FeatureSet(feats, logits, source, labels)
    fs.extra["images"] = images
    return fs


# --------------------------------------------------------------------------------------------------------------
# Scores


def score(extractor: FeatureExtractor, fake: FeatureSet, ref: FeatureSet,
          metrics: tuple[str, ...] = ("fid", "kid", "is", "pr"), kid_subset: int = 1000, kid_subsets: int = 100,
          pr_k: int = 3, pr_max: int = 10_000) -> dict:
    """Every metric asked for, between generated ``fake`` and real ``ref`` features, with the full record."""
    unknown = set(metrics) - {"fid", "kid", "is", "pr"}
    if unknown:
        raise ConfigError(f"unknown metric(s) {sorted(unknown)}; choose from fid, kid, is, pr")
    scores: dict = {}
    if "fid" in metrics:
        scores["fid"] = fid_from_stats(fake.gaussian("generated features"), ref.gaussian("reference features"))
    if "kid" in metrics:
        r = kernel_inception_distance(fake.features, ref.features, kid_subset, kid_subsets)
        scores["kid"] = {"mean": r.mean, "std": r.std, "stderr": r.stderr, "subsets": r.subsets,
                         "subset_size": r.subset_size}
    if "is" in metrics and fake.logits is not None:
        mean, std = inception_score(fake.logits, splits=min(10, fake.n))
        scores["is"] = {"mean": mean, "std": std, "splits": min(10, fake.n)}
    if "pr" in metrics:
        key = ("knn_radii", pr_k, pr_max)  # the real side's radii: the same for every score against ``ref``
        if key not in ref.extra:
            ref.extra[key] = knn_radii(ref.features[:pr_max], pr_k)
        scores["precision"], scores["recall"] = precision_recall(ref.features[:pr_max], fake.features[:pr_max],
                                                                 pr_k, ref.extra[key])
        scores["pr_k"], scores["pr_n"] = pr_k, min(pr_max, fake.n, ref.n)
    if fake.labels is not None and fake.logits is not None and extractor.name == "kakusan-domain-classifier":
        k = extractor.extra.get("num_classes")
        if fake.logits.shape[1] == k and int(fake.labels.max()) < k:
            from .classifier import per_class_accuracy

            pred = fake.logits.argmax(1)
            scores["class_agreement"] = float((pred == fake.labels).float().mean())
            scores["per_class_agreement"] = per_class_accuracy(pred, fake.labels, k)
    record = {"extractor": extractor.record, "reference": ref.source, "samples": fake.source,
              "metrics": {"kid": {"kernel": "polynomial (x.y/d + 1)^3", "subset_size": kid_subset},
                          "pr": {"k": pr_k, "method": "k-NN manifolds (Kynkaanniemi et al. 2019)"},
                          "fid": {"method": "float64, eigenvalues of S1^1/2 S2 S1^1/2"}},
              **environment()}
    label = sample_count_label(fake.n, ref.n)
    return {"format": 1, "scores": scores, "preliminary": label, "record": record}


def format_scores(result: dict) -> str:
    s = result["scores"]
    parts = []
    if "fid" in s:
        parts.append(f"FID {s['fid']:.3f}")
    if "kid" in s:
        parts.append(f"KID {1e3 * s['kid']['mean']:.3f} +- {1e3 * s['kid']['stderr']:.3f} (x1e-3)")
    if "is" in s:
        parts.append(f"IS {s['is']['mean']:.3f} +- {s['is']['std']:.3f}")
    if "precision" in s:
        parts.append(f"precision {s['precision']:.3f} recall {s['recall']:.3f}")
    if "class_agreement" in s:
        parts.append(f"class agreement {100 * s['class_agreement']:.1f}%")
    out = ", ".join(parts)
    if result.get("preliminary"):
        out += f"\n  [{result['preliminary']}]"
    return out


# --------------------------------------------------------------------------------------------------------------
# Sweeps


def sweep(extractor: FeatureExtractor, checkpoint, ref: FeatureSet, samplers: list[str], steps: list[int],
          guidance: list[float | None], n: int, seed: int = 0, device="cpu", batch_size: int = 250,
          metrics: tuple[str, ...] = ("fid", "kid", "pr"), on_row=None, grid_dir: str | Path | None = None,
          grid_n: int = 40, guide: str | Path | None = None, reference: str | None = None, distance=None,
          embedding=None, **options) -> list[dict]:
    """Score every (sampler, steps, guidance); each row has the scores, NFE and sampling wall time. With
    ``grid_dir``, the first ``grid_n`` samples of every point are also saved as a grid there. ``guide``: a guide
    model: the guided points are autoguided. ``reference`` (``SAMPLER:STEPS``, e.g. ``ddpm:1000``) with
    ``distance`` (a :class:`~kakusan.metrics.lpips.PerceptualDistance`): each row also has the mean distance of
    its samples to the reference sampler's from the same noises (same seed, batches and classes or prompts, same
    guidance), under the distance's label (``lpips``, or ``feature_distance`` for the stand-in); the reference's
    own samples are scored too, as the last row (``reference``: True) when they are not one of the points, so a
    sweep against ``ddpm:1000`` also says what DDPM-1000 scores and costs. ``embedding``: textual-inversion
    file(s) loaded with the checkpoint."""
    from ..samplers import get_sampler

    for s in samplers:
        get_sampler(s)  # fail before any sampling
    ref_sampler = parse_reference(reference) if reference else None
    if ref_sampler and distance is None:
        raise ConfigError("a reference sampler needs a distance to measure (lpips:alex, classifier:FILE, ...)")
    pipe = _pipeline(checkpoint, guide, embedding, device=device)
    rows = []
    points = [(s, st) for s in samplers for st in steps]
    if ref_sampler and ref_sampler not in points:  # the reference is scored too (its FID, its time): the last row
        points.append(ref_sampler)
    for g in guidance:
        ref_fake = None
        if ref_sampler:  # the reference samples of this guidance scale, from the same noises as every row's
            ref_fake = sample_features(extractor, pipe, n, device=device, sampler=ref_sampler[0],
                                       steps=ref_sampler[1], guidance=g, seed=seed, batch_size=batch_size, **options)
            ref_images, ref_source = ref_fake.extra["images"], ref_fake.source
        for s, st in points:
            is_ref = (s, st) == ref_sampler
            fake = ref_fake if is_ref else sample_features(extractor, pipe, n, device=device, sampler=s, steps=st,
                                                           guidance=g, seed=seed, batch_size=batch_size, **options)
            res = score(extractor, fake, ref, metrics)
            if grid_dir is not None:
                from ..data.datasets import to_model_range
                from ..images import save_grid

                k = extractor.extra.get("num_classes") if fake.labels is not None else None
                name = f"{s}-{st}" + ("" if g is None else f"-w{g:g}") + ".png"
                save_grid(to_model_range(fake.extra["images"][:grid_n]), Path(grid_dir) / name, nrow=k)
            row = {"sampler": s, "steps": st, "nfe": fake.source["nfe"], "guidance": g,
                   "sample_seconds": fake.source["sample_seconds"], **_flat(res["scores"]), "result": res,
                   **({"reference": True} if is_ref else {})}
            if ref_sampler:
                d = distance(fake.extra["images"], ref_images, device=device).double()
                row[distance.label] = float(d.mean())
                row[distance.label + "_stderr"] = float(d.std() / len(d) ** 0.5) if len(d) > 1 else None
                res["record"]["distance"] = {**distance.record, "to": {
                    k: ref_source[k] for k in ("sampler", "steps", "nfe", "spacing", "seed", "n", "batch_size",
                                               "guidance", "sample_seconds")}}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def parse_reference(spec: str) -> tuple[str, int]:
    """``SAMPLER:STEPS`` (e.g. ``ddpm:1000``), the sampler checked by name."""
    from ..samplers import get_sampler

    name, _, steps = spec.partition(":")
    try:
        n = int(steps)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--reference takes SAMPLER:STEPS (e.g. ddpm:1000), got {spec!r}")
    get_sampler(name)
    return name, n


def ema_sweep(extractor: FeatureExtractor, run, ref: FeatureSet, sigma_rels: list[float], samplers: list[str],
              steps: list[int], guidance: list[float | None], n: int, out_dir: str | Path, step: int | None = None,
              on_row=None, grid_dir: str | Path | None = None, **kw) -> list[dict]:
    """:func:`sweep` over the post-hoc EMA reconstructions of ``run`` (trained with ``posthoc_ema``): each width
    in ``sigma_rels`` is reconstructed into ``out_dir/ema-srS`` (a checkpoint the rows' records point at) and
    scored; each row has ``sigma_rel`` and the ``ema_reconstruction`` record (snapshots, coefficients)."""
    from ..training.posthoc_ema import check_reconstructable, reconstruct_checkpoint

    check_reconstructable(run, sigma_rels)  # every width, and the snapshots, before any sampling
    rows = []
    for sr in sigma_rels:
        ckpt = reconstruct_checkpoint(run, sr, step, Path(out_dir) / f"ema-sr{sr:.3f}")
        record = json.loads((ckpt / "config.json").read_text())["ema_reconstruction"]

        def tag(row, sr=sr, record=record):
            row.update(sigma_rel=sr, ema_reconstruction=record)
            if on_row:
                on_row(row)

        rows += sweep(extractor, ckpt, ref, samplers, steps, guidance, n, on_row=tag,
                      grid_dir=None if grid_dir is None else Path(grid_dir) / f"sr{sr:.3f}", **kw)
    return rows


def _flat(scores: dict) -> dict:
    out = {}
    for k, v in scores.items():
        if isinstance(v, dict):
            out[k] = v["mean"]
        elif not isinstance(v, list):
            out[k] = v
    return out


def plot_sweep(rows: list[dict], path: str | Path, metric: str = "fid") -> Path:
    """Two panels: ``metric`` against model evaluations and against sampling wall time, a line per
    (sampler, guidance). When every point has the same NFE but the guidance varies, the panels show
    ``metric`` and the class agreement (or recall) against the guidance scale instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_sigma_rel = len({r.get("sigma_rel") for r in rows}) > 1
    by_guidance = not by_sigma_rel and len({r["nfe"] for r in rows}) == 1 and len({r["guidance"] for r in rows}) > 1
    second = "class_agreement" if all("class_agreement" in r for r in rows) else "recall"  # the right-hand plot
    if by_sigma_rel:  # post-hoc EMA widths: a line per (sampler, steps, guidance)
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["sampler"], r["steps"], r["guidance"]), []).append(r)
        for (s, st, g), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["sigma_rel"])
            label = f"{s}, {st} steps" + ("" if g is None else f", w={g:g}")
            for ax, key in zip(axes, (metric, second)):
                ax.plot([r["sigma_rel"] for r in rs], [r[key] for r in rs], "o-", label=label)
        for ax, key in zip(axes, (metric.upper(), second.replace("_", " "))):
            ax.set_xlabel("post-hoc EMA width sigma_rel")
            ax.set_ylabel(key)
            ax.grid(True, alpha=0.3)
    elif by_guidance:
        for s in dict.fromkeys(r["sampler"] for r in rows):
            rs = sorted((r for r in rows if r["sampler"] == s and r["guidance"] is not None),
                        key=lambda r: r["guidance"])
            label = f"{s}, {rs[0]['steps']} steps" if rs else s
            for ax, key in zip(axes, (metric, second)):
                ax.plot([r["guidance"] for r in rs], [r[key] for r in rs], "o-", label=label)
        for ax, key in zip(axes, (metric.upper(), second.replace("_", " "))):
            ax.set_xlabel("guidance scale w")
            ax.set_ylabel(key)
            ax.grid(True, alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(ScalarFormatter())
        axes[0].yaxis.set_minor_formatter(ScalarFormatter())
    else:
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["sampler"], r["guidance"]), []).append(r)
        for (s, g), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            label = s if g is None else f"{s}, w={g:g}"
            axes[0].plot([r["nfe"] for r in rs], [r[metric] for r in rs], "o-", label=label)
            axes[1].plot([r["sample_seconds"] for r in rs], [r[metric] for r in rs], "o-", label=label)
        for ax, xl in zip(axes, ("model evaluations (NFE)", "sampling wall time (s)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(which="minor", labelsize=7)
            ax.set_xlabel(xl)
            ax.set_ylabel(metric.upper())
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    n = rows[0]["result"]["record"]["samples"]["n"] if rows and "result" in rows[0] else None
    fig.suptitle(f"{metric.upper()} vs " + ("EMA width" if by_sigma_rel else "guidance" if by_guidance else "cost")
                 + (f" ({n:,} samples per point)" if n else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nan_to_none(obj):
    """JSON-safe copy: NaN/inf -> None, tensors dropped."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items() if not torch.is_tensor(v)}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
