"""Metrics while training (``train --eval-every``): the scores logged, the best checkpoint named, the training left
untouched (bitwise) and resumed exactly with its best, the refusals, and ``plot metrics``."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_resume_exact
from kakusan.checkpoints import resolve_checkpoint
from kakusan.cli import main
from kakusan.errors import ConfigError
from kakusan.metrics.classifier import ClassifierConfig, DomainClassifier, save_classifier
from kakusan.metrics.evaluate import reference_features, sample_features, score, write_stats
from kakusan.metrics.features import load_extractor
from kakusan.metrics.training_eval import TrainingEvaluator, read_eval_log
from kakusan.pipeline import Pipeline
from kakusan.training import Trainer, TrainConfig
from kakusan.training.preflight import resume_config

RUN = dict(preset="unet-tiny", cond="class", batch_size=8, limit=64, sample_every=0, log_every=2, progress=False,
           eval_n=40, eval_steps=2, eval_batch_size=20, eval_ref="digits")


@pytest.fixture
def classifier(tmp_path):
    torch.manual_seed(0)
    model = DomainClassifier(ClassifierConfig(1, 8, 10, (4, 8, 12), data="digits"))
    return f"classifier:{save_classifier(model, tmp_path / 'cls.safetensors')}"


def test_eval_every_logs_scores_names_the_best_and_scores_as_kakusan_eval(tmp_path, digits, classifier):
    run = tmp_path / "run"
    Trainer(TrainConfig(out=str(run), steps=3, eval_every=1, keep_checkpoints=1, eval_extractor=classifier, **RUN),
            digits).fit()
    recs = read_eval_log(run)
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["images_seen"] for r in recs] == [8, 16, 24]
    for r in recs:
        assert {"fid", "kid", "kid_stderr", "precision", "recall", "class_agreement"} <= r["eval"].keys()
        assert r["eval_s"] > 0 and r["train_s"] > 0 and r["record"]["samples"]["training_step"] == r["step"]
        assert r["record"]["reference"]["n"] == 1797 and r["record"]["samples"]["n"] == 40
    # checkpoints/best names the argmin of the logged FIDs, kept by pruning (keep 1) and readable as a checkpoint
    best = min(recs, key=lambda r: r["eval"]["fid"])["step"]
    assert (run / "checkpoints" / "best").read_text().strip() == f"step-{best:08d}"
    assert resolve_checkpoint(run / "checkpoints" / "best") == run / "checkpoints" / f"step-{best:08d}"
    assert recs[-1]["best"] == {"metric": "fid", "value": recs[best - 1]["eval"]["fid"], "step": best}
    # the same numbers as kakusan eval's code on the saved EMA weights with the same settings (fixed noises)
    extractor = load_extractor(classifier)
    ref = reference_features(extractor, "digits")
    fake = sample_features(extractor, Pipeline.load(run / "checkpoints" / "step-00000003"), 40, steps=2,
                           batch_size=20, seed=0)
    assert score(extractor, fake, ref)["scores"]["fid"] == pytest.approx(recs[-1]["eval"]["fid"], rel=1e-9)
    # against statistics of those very samples: FID 0, precision = recall = 1
    stats = write_stats(extractor, fake, tmp_path / "own.safetensors")
    cfg = TrainConfig(out=str(run), eval_every=2, eval_extractor=classifier, **{**RUN, "eval_ref": str(stats)})
    ev = TrainingEvaluator(cfg, torch.device("cpu"), 1)
    ev.start()
    same = ev.evaluate(Pipeline.load(run / "checkpoints" / "step-00000003"), 3, 24)["eval"]
    assert abs(same["fid"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    # the figure, and the CLI's refusal of a run that was not evaluated
    png = tmp_path / "m.png"
    assert main(["plot", "metrics", "--run", str(run), "--run", str(run), "--label", "a", "--label", "b",
                 "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert main(["plot", "metrics", "--run", str(tmp_path / "plain")]) == 2


def test_evaluating_changes_no_training_bit_and_resume_keeps_the_best(tmp_path, digits, classifier):
    cfg = dict(eval_every=1, eval_extractor=classifier, **RUN)
    full = assert_resume_exact(tmp_path, digits, 4, **cfg)  # straight vs 2 steps then --resume to 4: bitwise
    plain = Trainer(TrainConfig(out=str(tmp_path / "plain"), steps=4, **{**RUN, "eval_ref": None}), digits).fit()
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / f), load_file(plain / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f  # the evaluations drew nothing from training's RNG
    cut = tmp_path / "cut" / "checkpoints"
    sa = json.loads((full / "state.json").read_text())["eval"]
    sb = json.loads((cut / "step-00000004" / "state.json").read_text())["eval"]
    assert sa["best"] == sb["best"] and sa["evaluations"] == sb["evaluations"] == 4
    assert (full.parent / "best").read_text() == (cut / "best").read_text()
    assert sb["train_s"] > 0 and sb["eval_s"] > 0
    logged = {r["step"]: r["eval"]["fid"] for r in read_eval_log(tmp_path / "cut")}
    assert logged == {r["step"]: r["eval"]["fid"] for r in read_eval_log(tmp_path / "full")}
    # eval settings are run control: a resume may change them (the best so far is then forgotten)
    merged, changed, _ = resume_config(tmp_path / "cut", {"eval_n": 50, "eval_every": 2})
    assert merged.eval_n == 50 and {c[0] for c in changed} == {"eval_n", "eval_every"}
    tr = Trainer(merged, digits)
    tr.resume()
    assert tr.evaluator.best is None and not (cut / "best").exists()


def test_bad_eval_settings_are_refused_in_one_line(tmp_path, classifier, capsys):
    with pytest.raises(ConfigError, match=r"--extractor \(eval_extractor\) and --ref \(eval_ref\)"):
        TrainConfig(eval_every=5)
    for bad, field in (({"eval_every": -1}, "eval_every"), ({"eval_n": 0}, "eval_n"),
                       ({"eval_best": "lpips"}, "eval_best"), ({"eval_guidance": float("nan")}, "eval_guidance")):
        with pytest.raises(ConfigError, match=field):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="more than 12 samples"):
        TrainingEvaluator(TrainConfig(eval_every=2, eval_extractor=classifier, **{**RUN, "eval_n": 12}), "cpu", 1)
    with pytest.raises(ConfigError, match="takes 1-channel images"):
        TrainingEvaluator(TrainConfig(eval_every=2, eval_extractor=classifier, **RUN), "cpu", 3)
    base = ["train", "--preset", "unet-tiny", "--steps", "2", "--limit", "32", "--out", str(tmp_path / "r")]
    for extra, words in ((["--eval-every", "2", "--ref", "digits"], "--extractor"),
                         (["--eval-every", "2", "--extractor", "classifier:/nope.safetensors", "--ref", "digits"],
                          "not found"),
                         (["--eval-every", "2", "--extractor", "classifier:/nope.safetensors", "--ref", "digits",
                           "--dry-run"], "not found")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kakusan: error:") and words in err and "\n" not in err, err
