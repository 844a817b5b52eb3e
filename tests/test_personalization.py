"""Teaching a text model a subject: textual inversion (new words for the frozen encoder, embedding files in each
layout, sample --embedding) and DreamBooth (prior preservation with the base's class images), their exact resume
and the refused combinations. A tiny CLIP-style encoder and unet-tiny at 8x8 keep every test to seconds."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_resume_exact
from PIL import Image
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from kakusan.checkpoints import load_denoiser, resolve_checkpoint  # noqa: E402
from kakusan.cli import main  # noqa: E402
from kakusan.conditioning import load_text_encoder  # noqa: E402
from kakusan.conditioning.embeddings import read_embedding_file  # noqa: E402
from kakusan.errors import CheckpointError, ConfigError  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402
from kakusan.training import Trainer, TrainConfig  # noqa: E402
from kakusan.training.personalization import prior_preservation_loss  # noqa: E402
from test_text import _captioned_folder, tiny_encoder_folder  # noqa: E402

RUN = dict(batch_size=4, log_every=2, sample_every=0, checkpoint_every=1000, sample_steps=2, progress=False,
           warmup_steps=2, lr=1e-2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny text model (base) trained on random captioned 8x8 images with a tiny CLIP encoder, and a folder of
    five images of 'the subject'."""
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAKUSAN_CACHE", str(root / "cache"))
        clip = tiny_encoder_folder(root / "clip")
        data = _captioned_folder(root / "data", n=12)
        base = Trainer(TrainConfig(data=f"captions:{data}", image_size=8, channels=3, preset="unet-tiny", cond="text",
                                   text_encoder=str(clip), steps=3, out=str(root / "base"), **RUN)).fit()
    subject = root / "subject"
    subject.mkdir()
    rng = np.random.default_rng(7)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(subject / f"{i}.png")
    return {"clip": clip, "base": base, "subject": subject}


def _subject(world):
    from kakusan.data import load_dataset

    return load_dataset(f"folder:{world['subject']}", image_size=8, channels=3)


def _ti(world, tmp_path, **kw):
    return TrainConfig(**{**RUN, "data": f"folder:{world['subject']}", "init_from": str(world["base"]),
                          "text_encoder": str(world["clip"]), "textual_inversion": True, "placeholder": "<my-cat>",
                          "initializer": "cat", "num_vectors": 2, "steps": 4, "out": str(tmp_path / "ti"), **kw})


def _db(world, tmp_path, **kw):
    return TrainConfig(**{**RUN, "data": f"folder:{world['subject']}", "init_from": str(world["base"]),
                          "text_encoder": str(world["clip"]), "dreambooth": True, "instance_prompt": "red cat",
                          "steps": 4, "out": str(tmp_path / "db"), **kw})


# ---- the encoder's new words --------------------------------------------------------------------------------

def test_added_words_read_their_vectors_and_leave_the_encoder_alone(world):
    enc = load_text_encoder(str(world["clip"]), 8)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    plain = enc.encode(["red cat", "green apple face"])
    vectors = torch.randn(3, 16)
    part = enc.add_tokens("<my-cat>", vectors)
    assert enc.tokenizer("<my-cat> red", add_special_tokens=False)["input_ids"] == [12, 4]
    # prompts without the word encode exactly as before; the word expands to its three tokens
    again = enc.encode(["red cat", "green apple face"])
    assert torch.equal(again.tokens, plain.tokens) and torch.equal(again.mask, plain.mask)
    out = enc.encode(["red <my-cat>"], grad=True)
    assert out.tokens.shape[1] == 6  # [BOS] red <my-cat> <my-cat>_1 <my-cat>_2 [EOS]
    table = enc.model.get_input_embeddings()
    ids = torch.tensor([[2, 4, 12, 13, 14, 3]])
    assert torch.equal(table(ids)[0, 2:5], vectors) and torch.equal(table(ids)[0, 1], before[
        "embeddings.token_embedding.weight"][4])
    # the gradient reaches the new rows only (the encoder is frozen)
    out.tokens.square().sum().backward()
    assert part.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in enc.model.named_parameters() if "parts" not in n)
    with pytest.raises(ConfigError, match="'cat' is already a token"):
        enc.add_tokens("cat", torch.randn(1, 16))
    with pytest.raises(ConfigError, match="8-wide vectors; the tokens of this text encoder .* are 16-wide"):
        enc.add_tokens("<dog>", torch.randn(1, 8))
    with pytest.raises(ConfigError, match="one word without spaces"):
        enc.add_tokens("my cat", torch.randn(1, 16))


# ---- textual inversion ---------------------------------------------------------------------------------------

def test_textual_inversion_trains_only_the_new_rows(world, tmp_path):
    tr = Trainer(_ti(world, tmp_path))
    base_unet = load_file(resolve_checkpoint(world["base"]) / "ema.safetensors")
    enc = tr.objective.encoder
    frozen = {k: v.clone() for k, v in enc.model.state_dict().items() if "parts" not in k}
    cat = frozen["embeddings.token_embedding.base.weight"][7]
    start = tr.model.weight.detach().clone()
    assert start.shape == (2, 16) and torch.equal(start, cat.expand(2, -1))  # both vectors start at 'cat'
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(params) == 1 and params[0] is tr.model.weight
    ckpt = tr.fit()
    # the U-Net and the encoder are bitwise the base's; the new rows moved
    unet = tr.objective.unet.state_dict()
    assert unet.keys() == base_unet.keys() and all(torch.equal(unet[k], base_unet[k]) for k in unet)
    after = {k: v for k, v in enc.model.state_dict().items() if "parts" not in k}
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    assert (tr.model.weight - start).abs().min() > 0
    # the checkpoint holds the vectors; learned_embeds.safetensors the EMA's, in diffusers' layout
    assert load_file(ckpt / "model.safetensors").keys() == {"weight"}
    learned = load_file(ckpt / "learned_embeds.safetensors")
    assert learned.keys() == {"<my-cat>"} and torch.equal(learned["<my-cat>"], tr.ema.model.weight)
    emb = read_embedding_file(ckpt / "learned_embeds.safetensors")
    assert emb.layout == "diffusers" and emb.text_encoder["sha256"] == tr.text_record["sha256"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["textual_inversion"]["tokens"] == ["<my-cat>", "<my-cat>_1"]
    with pytest.raises(CheckpointError, match="a textual-inversion run .* --embedding"):
        load_denoiser(ckpt)


def test_textual_inversion_resume_is_exact(world, tmp_path):
    kw = _ti(world, tmp_path).to_dict()
    for k in ("out", "data", "steps"):
        kw.pop(k)
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "learned_embeds.safetensors")
    assert_resume_exact(tmp_path, _subject(world), 4, files=files, **kw)


def test_embedding_files_in_each_layout(world, tmp_path):
    vec = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    files = {"diffusers": tmp_path / "learned_embeds.safetensors", "a1111": tmp_path / "ginger.safetensors",
             "pt": tmp_path / "tabby.pt", "flat": tmp_path / "ghost.safetensors"}
    save_file({"<my-cat>": vec}, str(files["diffusers"]))
    save_file({"emb_params": vec + 1}, str(files["a1111"]))
    torch.save({"string_to_param": {"*": vec + 2}, "name": "tabby-cat", "step": 100}, files["pt"])
    save_file({"string_to_param.*": vec[:1]}, str(files["flat"]))
    got = {k: read_embedding_file(f) for k, f in files.items()}
    assert [(e.token, e.layout) for e in got.values()] == [("<my-cat>", "diffusers"), ("ginger", "a1111"),
                                                           ("tabby", "a1111"), ("ghost", "a1111")]
    assert torch.equal(got["pt"].vectors, vec + 2) and got["flat"].vectors.shape == (1, 16)

    pipe = Pipeline.load(world["base"], embedding=[files["diffusers"], files["a1111"], files["pt"]])
    enc = load_text_encoder(str(world["clip"]), 32)
    enc.add_tokens("<my-cat>", vec), enc.add_tokens("ginger", vec + 1), enc.add_tokens("tabby", vec + 2)
    prompts = ["red <my-cat>", "ginger tabby face"]
    want = enc.encode(prompts)
    assert torch.equal(pipe.text_encoder.encode(prompts).tokens, want.tokens)
    gen = pipe(prompt=prompts, steps=2, guidance=2.0)
    assert [e["token"] for e in gen.records[0]["embeddings"]] == ["<my-cat>", "ginger", "tabby"]
    png = gen.save_image(tmp_path / "one.png", 1)
    again = Pipeline.from_png(png)  # loads the recorded embeddings again
    assert torch.equal(again.images, gen.images[1:2])
    # refusals
    with pytest.raises(ConfigError, match="'<my-cat>' is already loaded"):
        Pipeline.load(world["base"], embedding=[files["diffusers"], files["diffusers"]])
    save_file({"emb_params": torch.randn(1, 8)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ConfigError, match="8-wide vectors; this model's text encoder .* 16-wide"):
        Pipeline.load(world["base"], embedding=tmp_path / "narrow.safetensors")
    save_file({"clip_l": torch.randn(1, 16), "clip_g": torch.randn(1, 32)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="an SDXL embedding"):
        read_embedding_file(tmp_path / "xl.safetensors")
    from kakusan.conditioning.embeddings import save_embedding

    other = save_embedding(tmp_path / "other.safetensors", "<dog>", vec, {"spec": "x", "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="an embedding for another text encoder"):
        Pipeline.load(world["base"], embedding=other)
    with pytest.raises(CheckpointError, match="embedding file not found"):
        Pipeline.load(world["base"], embedding=tmp_path / "none.safetensors")


def test_sample_with_embeddings_and_a_textual_inversion_run(world, tmp_path, capsys):
    ckpt = Trainer(_ti(world, tmp_path, steps=2)).fit()
    learned = ckpt / "learned_embeds.safetensors"
    save_file({"emb_params": torch.randn(1, 16)}, str(tmp_path / "ginger.safetensors"))
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(world["base"]), "--embedding", str(learned), "--embedding",
                 str(tmp_path / "ginger.safetensors"), "--prompt", "red <my-cat>", "--prompt", "ginger face",
                 "--guidance", "2", "-n", "2", "--steps", "2", "--out", str(out)]) == 0
    # a textual-inversion run as --checkpoint: its base with its word, the same images
    out2 = tmp_path / "s2.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "ti"), "--embedding", str(tmp_path / "ginger.safetensors"),
                 "--prompt", "red <my-cat>", "--prompt", "ginger face", "--guidance", "2", "-n", "2", "--steps", "2",
                 "--out", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(world["base"]), "--embedding", str(learned), "--prompt", "x",
                 "-n", "1", "--steps", "1", "--out", str(out)]) == 0
    class_run = Trainer(TrainConfig(data="digits", preset="unet-tiny", cond="class", steps=1, out=str(tmp_path / "c"),
                                    **{**RUN, "batch_size": 4})).fit()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(class_run), "--embedding", str(learned), "-n", "1", "--steps", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not text-conditional" in err


# ---- DreamBooth ----------------------------------------------------------------------------------------------

def test_prior_preservation_loss_on_a_known_batch(world, tmp_path):
    tr = Trainer(_db(world, tmp_path, class_prompt="cat face", num_class_images=6, prior_loss_weight=0.5))
    assert len(tr.images) == 11 and tr.data.captions == ["red cat"] * 5 + ["cat face"] * 6
    assert json.loads(json.dumps(tr.config["dreambooth"]))["prior_loss_weight"] == 0.5
    state = tr.generator.get_state()
    x0, cond, noise, is_class = tr.objective.batch(3)
    assert is_class.tolist() == [False] * 4 + [True] * 4
    from kakusan.training.trainer import batch_indices

    want = torch.cat([batch_indices(5, 4, 3, 0), 5 + batch_indices(6, 4, 3, 1)])
    assert torch.equal(x0, tr.images[want])  # no flips: the images themselves, subject first
    per = tr.train_denoiser.loss(x0, cond, noise=noise).detach()
    tr.generator.set_state(state)
    got = tr.objective.loss(3).detach()
    assert torch.allclose(got, per[:4].mean() + 0.5 * per[4:].mean(), rtol=1e-6, atol=0)
    assert abs(got - per[:4].mean()) > 1e-4  # the class term counts
    # the formula itself, on numbers, and under two processes (each its share, times two)
    losses, cls = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]), torch.tensor([False] * 3 + [True] * 3)
    assert prior_preservation_loss(losses, cls, 0.1, 3, 3).item() == pytest.approx(2.0 + 0.1 * 20.0)
    halves = [prior_preservation_loss(losses[s], cls[s], 0.1, 3, 3, world=2) for s in (slice(0, 3), slice(3, 6))]
    assert (sum(halves) / 2).item() == pytest.approx(4.0)


@pytest.mark.parametrize("prior", [{}, {"class_prompt": "cat face", "prior_loss_weight": 0.0}])
def test_dreambooth_without_prior_is_plain_fine_tuning(world, tmp_path, prior):
    """No --class-prompt (or weight 0): exactly a fine-tuning run on the subject's images captioned with the
    instance prompt: the same losses and weights, bit for bit; no class images are drawn."""
    db = Trainer(_db(world, tmp_path, steps=3, **prior))
    plain_data = db.data
    assert plain_data.captions == ["red cat"] * 5 and not (tmp_path / "db" / "class-images").exists()
    ft = Trainer(TrainConfig(**{**RUN, "data": f"folder:{world['subject']}", "init_from": str(world["base"]),
                                "cond": "text", "text_encoder": str(world["clip"]), "steps": 3,
                                "out": str(tmp_path / "ft")}), plain_data)
    assert [db.train_step() for _ in range(3)] == [ft.train_step() for _ in range(3)]
    a, b = db.model.state_dict(), ft.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_class_images_are_drawn_once_with_their_provenance(world, tmp_path, monkeypatch):
    import kakusan.training.personalization as P

    cfg = _db(world, tmp_path, class_prompt="cat face", num_class_images=5, class_guidance=3.0, steps=1)
    tr = Trainer(cfg)
    folder = tmp_path / "db" / "class-images"
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["prompt"] == "cat face" and prov["guidance"] == 3.0 and prov["base"]["sha256"]
    # they are the base's images of the class prompt, drawn through the pipeline (records in each PNG)
    gen = Pipeline.load(world["base"])(prompt="cat face", n=5, guidance=3.0, seed=0, batch_size=16)
    assert torch.equal(tr.images[5:], gen.images.clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1))
    rec = json.loads(Image.open(folder / "class-00002.png").info["kakusan"])
    assert rec["prompt"] == "cat face" and rec["index"] == 2
    # reused, not drawn again: by a second run in the same folder (resume), and a lost image is drawn again as it was
    monkeypatch.setattr(P, "_draw_class_images", lambda *a: (_ for _ in ()).throw(AssertionError("drawn again")))
    assert torch.equal(Trainer(cfg).images, tr.images)
    monkeypatch.undo()
    (folder / "class-00003.png").unlink()
    assert torch.equal(Trainer(cfg).images, tr.images)
    # another class prompt in the same folder is refused, naming what differs
    with pytest.raises(ConfigError, match="class images made with other settings .*prompt: \"cat face\" there, "
                                          "\"red heart\" now"):
        Trainer(_db(world, tmp_path, class_prompt="red heart", num_class_images=5, class_guidance=3.0))
    # a folder of your own class images (no provenance) is read as it is
    own = tmp_path / "own"
    own.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(own / f"{i}.png")
    tr2 = Trainer(_db(world, tmp_path / "b", class_prompt="cat face", num_class_images=3, class_data=str(own)))
    assert tr2.images[5:].flatten(1).mean(1).tolist() == pytest.approx([-1.0, -1 + 40 / 127.5, -1 + 80 / 127.5])


@pytest.mark.parametrize("lora", [0, 2])
def test_dreambooth_resume_is_exact(world, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    kw = _db(world, tmp_path, class_prompt="cat face", num_class_images=4, hflip=True, lora_rank=lora).to_dict()
    for k in ("out", "data", "steps"):
        kw.pop(k)
    files = ("model.safetensors", "ema.safetensors", "optimizer.safetensors") + (("lora.safetensors",) if lora else ())
    full = assert_resume_exact(tmp_path, _subject(world), 4, files=files, **kw)
    assert json.loads((full / "config.json").read_text())["dreambooth"]["class_images"]["n"] == 4


# ---- the command line ----------------------------------------------------------------------------------------

def test_cli_refuses_bad_combinations(world, tmp_path, capsys):
    base, subject = str(world["base"]), f"folder:{world['subject']}"
    common = ["train", "--init-from", base, "--instance-data", subject, "--text-encoder", str(world["clip"]),
              "--steps", "1", "--out", str(tmp_path / "x")]
    cases = [
        (["--dreambooth"], "needs --instance-prompt"),
        (["--dreambooth", "--instance-prompt", "red cat", "--textual-inversion"], "choose one"),
        (["--dreambooth", "--instance-prompt", "red cat", "--train-text-encoder"], "frozen encoder"),
        (["--dreambooth", "--instance-prompt", "red cat", "--placeholder", "<x>"], "textual inversion's options"),
        (["--dreambooth", "--instance-prompt", "red cat", "--class-data", str(tmp_path)], "needs --class-prompt"),
        (["--dreambooth", "--instance-prompt", "red cat", "--class-prompt", "cat", "--prior-loss-weight", "-1"],
         "prior-loss-weight must be"),
        (["--dreambooth", "--instance-prompt", "red cat", "--num-class-images", "0"], "num-class-images must be"),
        (["--textual-inversion", "--placeholder", "<my-cat>"], "needs --placeholder .* and --initializer"),
        (["--textual-inversion", "--placeholder", "<my-cat>", "--initializer", "cat", "--lora-rank", "2"],
         "not with --lora-rank"),
        (["--textual-inversion", "--placeholder", "<my-cat>", "--initializer", "cat", "--class-prompt", "cat"],
         "DreamBooth's prior preservation"),
        (["--textual-inversion", "--placeholder", "<my-cat>", "--initializer", "cat", "--instance-prompt",
          "red cat"], "must contain the placeholder"),
        (["--textual-inversion", "--placeholder", "cat", "--initializer", "cat"], "already a token"),
        (["--textual-inversion", "--placeholder", "<my-cat>", "--initializer", "green apple face"],
         "3 tokens .* exactly --num-vectors 1"),
        (["--textual-inversion", "--placeholder", "<my-cat>", "--initializer", "cat", "--cond", "class"],
         "text-conditional models"),
    ]
    for args, match in cases:
        capsys.readouterr()
        assert main(common + args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("kakusan: error:") and re.search(match, err), (args, err)
    capsys.readouterr()
    assert main(["train", "--placeholder", "<my-cat>", "--dry-run"]) == 2
    assert "give --dreambooth or --textual-inversion" in capsys.readouterr().err
    assert main(["train", "--instance-data", subject, "--steps", "1", "--dry-run"]) == 2
    assert "subject's images of --dreambooth" in capsys.readouterr().err
    assert main(["train", "--dreambooth", "--instance-prompt", "red cat", "--instance-data", subject, "--steps", "1",
                 "--dry-run"]) == 2
    assert "give it with --init-from" in capsys.readouterr().err


# ---- judging the result: eval --subject ---------------------------------------------------------------------

CIFAR_CLASSIFIER = Path(__file__).resolve().parents[1] / "weights" / "classifier-cifar10.safetensors"  # (3 channels)


def test_subject_numbers_by_hand():
    from kakusan.metrics.subject import mean_cosine, paired_drift

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    # cosines: (1,0).(1,1)/sqrt2 = .7071, (1,0).(1,0) = 1, (0,1).(1,1)/sqrt2 = .7071, (0,1).(1,0) = 0
    assert mean_cosine(a, b) == pytest.approx((2 ** -0.5 * 2 + 1) / 4, abs=1e-12)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    y = x.clone()
    y[0] = 255  # image 0: black against white, RMS 2 in [-1, 1]; image 1: the same
    y[1, 0, 0, 0] = 255  # ... one pixel of four changed by 2: RMS sqrt(4 / 4) = 1
    d = paired_drift(x, y, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    assert d["pixel_rms"] == pytest.approx((2 + 1) / 2) and d["feature_cosine_distance"] == pytest.approx(0.5)


def test_eval_subject_on_image_folders_and_models(world, tmp_path, capsys):
    """eval --subject: an image folder against itself and a one-image folder (cosine 1); the base against itself
    and with a textual-inversion embedding (drift exactly 0: the model is the base's), a DreamBooth run (drift >
    0); prompt fidelity not computed without a CLIP, and said so."""
    from kakusan.metrics.evaluate import read_image_folder
    from kakusan.metrics.features import load_extractor

    ext = f"classifier:{CIFAR_CLASSIFIER}"
    out = tmp_path / "self.json"
    assert main(["eval", "--images", str(world["subject"]), "--subject", str(world["subject"]), "--extractor", ext,
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    f = load_extractor(ext)(read_image_folder(world["subject"]))[0]
    u = torch.nn.functional.normalize(f.double(), dim=1)
    assert res["scores"]["subject_fidelity"] == pytest.approx(float((u @ u.T).mean()), abs=1e-9)
    off = (u @ u.T)[~torch.eye(5, dtype=torch.bool)].mean()
    assert res["scores"]["subject_self_similarity"] == pytest.approx(float(off), abs=1e-9)
    assert res["scores"]["prompt_fidelity"] is None and "no CLIP model" in res["notes"]["prompt_fidelity"]
    assert res["record"]["subject"]["n"] == 5 and res["record"]["feature_space"]["name"] == "kakusan-domain-classifier"
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((world["subject"] / "0.png").read_bytes())
    assert main(["eval", "--images", str(one), "--subject", str(one), "--extractor", ext, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["scores"]["subject_fidelity"] == pytest.approx(1.0, abs=1e-12)

    ckpt = Trainer(_ti(world, tmp_path, steps=2)).fit()
    db = Trainer(_db(world, tmp_path, steps=2, lr=5e-2)).fit()
    common = ["--subject", str(world["subject"]), "--extractor", ext, "-n", "4", "--steps", "2", "--guidance", "2",
              "--base", str(world["base"]), "--out", str(out)]
    drift_file = tmp_path / "drift.txt"
    drift_file.write_text("green apple face\nred face\n\ngreen cat\n")
    runs = {"base": ["--checkpoint", str(world["base"]), "--prompt", "red cat"],
            "ti": ["--checkpoint", str(world["base"]), "--embedding", str(ckpt / "learned_embeds.safetensors"),
                   "--prompt", "red <my-cat>", "--drift-prompts", str(drift_file)],
            "db": ["--checkpoint", str(db), "--prompt", "red cat", "--drift-prompts", str(drift_file)]}
    got = {}
    for name, args in runs.items():
        capsys.readouterr()
        assert main(["eval", *args, *common]) == 0, name
        got[name] = json.loads(out.read_text())
        assert "subject fidelity" in capsys.readouterr().out
    for name in ("base", "ti"):
        d = got[name]["scores"]["prior_drift"]
        assert d["pixel_rms"] == 0.0 and d["feature_cosine_distance"] == pytest.approx(0.0, abs=1e-12), name
    assert len(got["base"]["record"]["prior_drift"]["prompts"]) == 50
    assert got["db"]["scores"]["prior_drift"]["pixel_rms"] > 1e-3
    assert got["db"]["record"]["prior_drift"]["prompts"] == ["green apple face", "red face", "green cat"]
    assert got["ti"]["record"]["samples"]["embeddings"][0]["token"] == "<my-cat>"
    assert got["base"]["scores"]["subject_fidelity"] != got["ti"]["scores"]["subject_fidelity"]
    assert got["base"]["record"]["samples"]["checkpoint_sha256"] == got["db"]["record"]["prior_drift"]["base"][
        "checkpoint_sha256"]
    # refusals, one line each
    for args, match in [(["--images", str(one), "--subject", str(one)], "give --extractor .* or --clip"),
                        (["--images", str(one), "--extractor", ext, "--base", str(world["base"]), "--ref", "x"],
                         "options of --subject"),
                        (["--images", str(one), "--subject", str(one), "--extractor", ext, "--ref", "digits"],
                         "not options of --subject"),
                        (["--images", str(one), "--subject", str(tmp_path / "none"), "--extractor", ext],
                         "image folder not found"),
                        (["--images", str(one), "--subject", str(one), "--extractor", ext, "--base",
                          str(world["base"])], "give --checkpoint, not --images"),
                        (["--checkpoint", str(world["base"]), "--subject", str(one), "--extractor", ext],
                         "give a text-conditional --checkpoint and its prompts")]:
        capsys.readouterr()
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), (args, err)


def _tiny_clip(folder):
    """A random CLIP (text and vision towers, 16 px images) with an offline CLIP tokenizer."""
    from kakusan.testing import write_clip_tokenizer

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=516, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=514, eos_token_id=515,
                         pad_token_id=515),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def test_eval_subject_with_a_clip_folder(world, tmp_path):
    """--clip: subject fidelity in CLIP's image embeddings, prompt fidelity = the mean cosine of each sample with
    its own prompt, checked against the CLIP model called directly."""
    from kakusan.metrics.subject import ClipScorer, evaluate_subject

    folder = _tiny_clip(tmp_path / "clip-model")
    clip = ClipScorer(folder)
    res = evaluate_subject(world["base"], str(world["subject"]), ["red cat", "green face"], n=4, clip=clip,
                           steps=2, guidance=2.0, device="cpu")
    images = res["images"]
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images.float() / 255, size=(16, 16), mode="bicubic", antialias=True)
        x = (x.clamp(0, 1) - clip.mean) / clip.std
        img = clip._as_tensor(model.get_image_features(pixel_values=x))
        txt = clip._as_tensor(model.get_text_features(**tok(["red cat", "red cat", "green face", "green face"],
                                                            padding=True, return_tensors="pt")))
    want = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=1).mean()
    assert res["scores"]["prompt_fidelity"] == pytest.approx(float(want), abs=1e-6)
    assert res["record"]["feature_space"]["name"] == "clip" and "prompt_fidelity" not in res["notes"]
    with pytest.raises(ConfigError, match="not a CLIP model folder"):
        ClipScorer(tmp_path)


def test_embedding_on_eval_and_sweep(world, tmp_path):
    """--embedding loads the word for eval's and sweep's samples (their prompts use it; the record names it)."""
    ckpt = Trainer(_ti(world, tmp_path, steps=2)).fit()
    learned = str(ckpt / "learned_embeds.safetensors")
    ext = f"classifier:{CIFAR_CLASSIFIER}"
    common = ["--checkpoint", str(world["base"]), "--embedding", learned, "--prompt", "red <my-cat>",
              "--extractor", ext, "--ref", f"folder:{world['subject']}", "--guidance", "2"]
    assert main(["eval", *common, "-n", "4", "--metrics", "kid", "--steps", "2",
                 "--out", str(tmp_path / "e.json")]) == 0
    rec = json.loads((tmp_path / "e.json").read_text())["record"]["samples"]
    assert [e["token"] for e in rec["embeddings"]] == ["<my-cat>"] and rec["prompts"] == ["red <my-cat>"]
    assert main(["sweep", *common, "-n", "130", "--samplers", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "sw")]) == 0
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert rows[0]["result"]["record"]["samples"]["embeddings"][0]["token"] == "<my-cat>"
    assert main(["eval", "--checkpoint", str(world["base"]), "--prompt", "red <my-cat>", "--extractor", ext,
                 "--ref", f"folder:{world['subject']}", "-n", "4", "--steps", "2", "--metrics", "kid",
                 "--embedding", str(tmp_path / "none.safetensors")]) == 2


def test_serve_loads_embeddings_into_its_text_models(world, tmp_path):
    """serve --embedding: every text model served reads the word (the page's prompts may use it), the same
    images as sample --embedding; a missing file, or no text model to take it, is refused."""
    from kakusan.serve import Limits, ModelPool, Request, Service

    ckpt = Trainer(_ti(world, tmp_path, steps=2)).fit()
    learned = ckpt / "learned_embeds.safetensors"
    svc = Service(ModelPool([world["base"]], embeddings=[learned]), Limits(), tmp_path / "out")
    name = svc.pool.names[0]
    res = svc.generate(Request(model=name, prompt="red <my-cat>", steps=2, guidance=2.0, seed=3, n=2))
    want = Pipeline.load(world["base"], embedding=learned)("red <my-cat>", n=2, steps=2, guidance=2.0, seed=3)
    assert [e["token"] for e in svc.pool.get(name).embeddings] == ["<my-cat>"]
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                       for p in res.paths])
    assert torch.equal(got, want.uint8())
    with pytest.raises(ConfigError, match="--embedding .*: file not found"):
        ModelPool([world["base"]], embeddings=[tmp_path / "none.safetensors"])
    class_run = Trainer(TrainConfig(data="digits", preset="unet-tiny", cond="class", steps=1, out=str(tmp_path / "c"),
                                    **RUN)).fit()
    with pytest.raises(ConfigError, match="none of the served models is text-conditional"):
        ModelPool([class_run], embeddings=[learned])
