"""Metrics while a model trains (``train --eval-every N``).

Every N steps the EMA weights sample ``eval_n`` images through the same pipeline and code as ``kakusan eval``
(:func:`~kakusan.metrics.evaluate.generate`), from one fixed set of noises (``eval_seed``, the same batches each
time, so successive scores differ by the weights alone), and ``kakusan eval``'s extractor scores them against the
reference features: FID, KID, precision / recall, and the class agreement of a class model with a domain
classifier. The reference side is computed once and cached with its record (kakusan's stats cache, or a stats file
given as ``eval_ref``).

Each evaluation is one ``log.jsonl`` line: the step, images seen, the scores, the best so far, the seconds it took,
the training time so far without the evaluations, and the record of how the scores were made. The best score's
checkpoint is named by ``checkpoints/best`` (and kept by the pruning of old checkpoints). Nothing here draws from
the training's random streams: the pipeline samples with its own seeded generators, KID with numpy's.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..errors import ConfigError

# the scores that may name the best checkpoint, and which way is better
BEST = {"fid": "min", "kid": "min", "precision": "max", "recall": "max", "class_agreement": "max"}
BEST_FILE = "best"  # checkpoints/best: the folder name of the best checkpoint so far (as checkpoints/latest)


def check_eval_config(cfg) -> None:
    """The eval_* fields of a TrainConfig: each refused with one line naming it."""
    every = cfg.eval_every
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(f"eval_every must be an integer >= 0 (0: no evaluation while training), got {every!r}")
    for name in ("eval_n", "eval_batch_size"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if cfg.eval_best not in BEST:
        raise ConfigError(f"eval_best must be one of {', '.join(BEST)}, got {cfg.eval_best!r}")
    if cfg.eval_steps is not None and (not isinstance(cfg.eval_steps, int) or cfg.eval_steps < 1):
        raise ConfigError(f"eval_steps must be a positive integer, got {cfg.eval_steps!r}")
    if cfg.eval_guidance is not None and not (isinstance(cfg.eval_guidance, (int, float))
                                              and math.isfinite(cfg.eval_guidance) and cfg.eval_guidance >= 0):
        raise ConfigError(f"eval_guidance must be a finite number >= 0, got {cfg.eval_guidance!r}")
    if every:
        missing = [flag for flag, v in (("--extractor (eval_extractor)", cfg.eval_extractor),
                                        ("--ref (eval_ref)", cfg.eval_ref)) if not v]
        if missing:
            raise ConfigError(f"eval_every {every} scores samples against real data: give {' and '.join(missing)}, "
                              f"e.g. --extractor classifier:weights/classifier-mnist.safetensors --ref mnist:DIR")
        if cfg.controlnet:
            raise ConfigError("eval_every: evaluating a ControlNet while it trains is not supported (its samples "
                              "need control images)")
        if cfg.eval_guidance is not None and cfg.cond == "none":
            raise ConfigError("eval_guidance: an unconditional model has no classifier-free guidance")
        if cfg.eval_sampler is not None:
            from ..samplers import get_sampler

            get_sampler(cfg.eval_sampler)


class TrainingEvaluator:
    """Scores a trainer's EMA weights every ``cfg.eval_every`` steps (main process only); keeps the best so far and
    the time spent, both saved in every checkpoint's state so that a resumed run goes on with them."""

    def __init__(self, cfg, device, data_channels: int | None = None):
        from .evaluate import reference_set
        from .features import load_extractor

        self.cfg, self.device = cfg, device
        self.extractor = load_extractor(cfg.eval_extractor)
        if data_channels is not None and self.extractor.channels not in (None, data_channels):
            raise ConfigError(f"--extractor {cfg.eval_extractor} takes {self.extractor.channels}-channel images; "
                              f"this run's data has {data_channels}")
        if cfg.eval_n <= self.extractor.feature_dim:
            raise ConfigError(f"eval_n {cfg.eval_n}: a Frechet distance of {self.extractor.feature_dim}-D features "
                              f"needs more than {self.extractor.feature_dim} samples (--eval-n)")
        # the real side: a stats file (``kakusan stats``) or a data set's split, computed once into the stats cache
        stats = Path(cfg.eval_ref).expanduser() if cfg.eval_ref.endswith(".safetensors") else None
        self.ref = reference_set(self.extractor, None if stats else cfg.eval_ref, cfg.eval_ref_split, stats=stats,
                                 device=device)
        self.best: dict | None = None  # {"metric", "value", "step"}
        self.train_s = self.eval_s = 0.0  # totals over the run (resumes included)
        self.evaluations = 0
        self._clock = None

    # ---- what identifies the evaluation (a best of another one is not comparable) ----------------------------
    @property
    def key(self) -> dict:
        c = self.cfg
        return {"extractor_sha256": self.extractor.weights_sha256, "reference": self.ref.source.get("data"),
                "reference_split": self.ref.source.get("split"), "reference_n": self.ref.n, "n": c.eval_n,
                "sampler": c.eval_sampler, "steps": c.eval_steps, "guidance": c.eval_guidance, "seed": c.eval_seed,
                "batch_size": c.eval_batch_size, "metric": c.eval_best}

    # ---- time --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the clock of this session (a fit call): the time not spent evaluating is training time."""
        self._clock = (time.perf_counter(), self.train_s, self.eval_s)

    def _train_seconds(self) -> float:
        if self._clock is None:  # evaluated outside a fit: the clock starts now
            self.start()
        t0, train0, eval0 = self._clock
        return train0 + (time.perf_counter() - t0) - (self.eval_s - eval0)

    # ---- one evaluation ------------------------------------------------------------------------------------
    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.eval_every == 0 or last

    def evaluate(self, pipe, step: int, images_seen: int, prompts: list[str] | None = None) -> dict:
        """Sample, score, update the best; returns the log record (``new_best`` says whether this step is it)."""
        from .evaluate import FeatureSet, generate, nan_to_none, score

        c = self.cfg
        train_s = self._train_seconds()
        t0 = time.perf_counter()
        images, labels, source = generate(pipe, c.eval_n, sampler=c.eval_sampler, steps=c.eval_steps,
                                          guidance=c.eval_guidance, seed=c.eval_seed, batch_size=c.eval_batch_size,
                                          device=self.device, prompt=prompts)
        feats, logits = self.extractor(images, device=self.device, what=f"samples at step {step}")
        source.update(checkpoint_sha256=None, weights="ema (in training)", training_step=step,
                      images_seen=images_seen)
        result = score(self.extractor, FeatureSet(feats, logits, source, labels), self.ref,
                       ("fid", "kid", "is", "pr"))
        seconds = time.perf_counter() - t0
        self.eval_s += seconds
        self.evaluations += 1
        scores = flat_scores(result["scores"])
        value = scores.get(c.eval_best)
        new_best = value is not None and math.isfinite(value) and (
            self.best is None or (value < self.best["value"] if BEST[c.eval_best] == "min"
                                  else value > self.best["value"]))
        if new_best:
            self.best = {"metric": c.eval_best, "value": value, "step": step}
        return nan_to_none({"step": step, "images_seen": images_seen, "eval": scores,
                            "per_class_agreement": result["scores"].get("per_class_agreement"),
                            "best": dict(self.best) if self.best else None, "new_best": new_best,
                            "eval_s": seconds, "eval_total_s": self.eval_s, "train_s": train_s,
                            "preliminary": result["preliminary"], "record": result["record"]})

    @staticmethod
    def line(rec: dict) -> str:
        """One printed line of an evaluation's record."""
        s = rec["eval"]
        shown = ", ".join(f"{k} {s[k]:.4g}" for k in ("fid", "kid", "precision", "recall", "class_agreement")
                          if s.get(k) is not None)
        return f"step {rec['step']:,}: {shown} ({rec['eval_s']:.0f} s)" + (" best" if rec["new_best"] else "")

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"key": self.key, "best": self.best, "train_s": self._train_seconds() if self._clock else self.train_s,
                "eval_s": self.eval_s, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict | None, ckpt_root: Path) -> str | None:
        """Go on from a checkpoint's evaluation state; ``checkpoints/best`` is set back to its best (a killed run
        may have moved it past the checkpoint). Returns a line to print when the best was dropped."""
        note = None
        if state:
            self.train_s, self.eval_s = state.get("train_s", 0.0), state.get("eval_s", 0.0)
            self.evaluations = state.get("evaluations", 0)
            if state.get("key") == self.key:
                self.best = state.get("best")
            elif state.get("best"):
                diff = [k for k in self.key if state["key"].get(k) != self.key[k]]
                note = (f"evaluation settings changed ({', '.join(diff)}): the best so far (step "
                        f"{state['best']['step']:,}) is not comparable and is forgotten")
        if self.best is not None and (ckpt_root / f"step-{self.best['step']:08d}").is_dir():
            write_best(ckpt_root, self.best["step"])
        else:
            (ckpt_root / BEST_FILE).unlink(missing_ok=True)
        return note

    def summary(self) -> str:
        total = self.train_s if self._clock is None else self._train_seconds()
        best = (f"; best {self.best['metric']} {self.best['value']:.4g} at step {self.best['step']:,}"
                if self.best else "")
        share = 100 * self.eval_s / max(total, 1e-9)
        return (f"evaluation: {self.evaluations} run(s), {self.eval_s:.0f} s = {share:.1f}%"
                f" of the training time ({total:.0f} s without them){best}")


def flat_scores(scores: dict) -> dict:
    """One number per score (KID's mean with its standard error beside it; IS's mean)."""
    out = {}
    for k, v in scores.items():
        if k == "kid":
            out["kid"], out["kid_stderr"] = v["mean"], v["stderr"]
        elif isinstance(v, dict):
            out[k] = v["mean"]
        elif isinstance(v, (int, float)) and k not in ("pr_k", "pr_n"):
            out[k] = v
    return out


def write_best(ckpt_root: Path, step: int) -> None:
    """``checkpoints/best`` names ``step-XXXXXXXX``, replaced atomically (as ``checkpoints/latest``)."""
    tmp = ckpt_root / f".best-{os.getpid()}"
    tmp.write_text(f"step-{step:08d}\n")
    os.replace(tmp, ckpt_root / BEST_FILE)


def read_eval_log(path: str | Path) -> list[dict]:
    """The evaluation records of a run's log.jsonl (the last one of each step, where a resumed run logged a
    step twice), in step order."""
    from ..errors import DataError

    path = Path(path)
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise DataError(f"training log not found: {log}")
    by_step = {}
    for i, line in enumerate(log.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{log}: line {i + 1} is not JSON (a truncated write?)") from None
        if isinstance(rec, dict) and "eval" in rec:
            by_step[rec["step"]] = rec
    if not by_step:
        raise DataError(f"{log}: no evaluation records (train with --eval-every N --extractor ... --ref ...)")
    return [by_step[s] for s in sorted(by_step)]
