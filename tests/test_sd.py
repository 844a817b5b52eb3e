"""Stable Diffusion checkpoints: small random SD-shaped models in diffusers' folder layout and the original
single-file layout (written here from the folder with the LDM key names), loaded by kakusan and compared with
diffusers' own StableDiffusionPipeline."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from kakusan.testing import write_clip_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from kakusan.cli import main  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402

PROMPT, NEGATIVE = "a cat", "a blurry cat"


# --------------------------------------------------------------------------------------------------------------
# Building tiny SD-shaped models offline


def write_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer with the byte alphabet, a few merges and CLIP's special tokens (516 tokens)."""
    return write_clip_tokenizer(folder, merges=(("c", "a"), ("ca", "t</w>")))


FAMILY = {  # SD1-like: CLIP (quick_gelu), 8 heads, conv projections, eps, PNDM; SD2-like: 64-wide heads, v, DDIM
    "sd1": dict(channels=(32, 64), heads=8, linear=False, hidden=32, act="quick_gelu", prediction="epsilon"),
    "sd2": dict(channels=(64, 128), heads=[1, 2], linear=True, hidden=64, act="gelu", prediction="v_prediction"),
}


def build_sd_folder(folder: Path, family: str) -> Path:
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    f = FAMILY[family]
    torch.manual_seed({"sd1": 1, "sd2": 2}[family])
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=f["channels"], layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=f["hidden"], attention_head_dim=f["heads"], use_linear_projection=f["linear"],
        upcast_attention=family == "sd2")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=516, hidden_size=f["hidden"], intermediate_size=2 * f["hidden"],
                                        num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                        hidden_act=f["act"], projection_dim=f["hidden"], bos_token_id=514,
                                        eos_token_id=515, pad_token_id=515))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=32, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
              set_alpha_to_one=False, prediction_type=f["prediction"])
    scheduler = (PNDMScheduler(skip_prk_steps=True, **kw) if family == "sd1" else
                 DDIMScheduler(clip_sample=False, **kw))
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"tok-{family}"))
    if family == "sd2":
        tok.pad_token = "!"  # as SD 2.x's tokenizer pads (the single file's reader knows it from the family)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"  # as SD 1.5's PNDM config says it, for DDIM's sake
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "clip_sample": False}))
    return folder


# ---- the original single-file layout, written from the diffusers one (LDM / CompVis key names) ------------------

RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
       "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_to_ldm(sd: dict, layers: int) -> dict:
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "time_embedding":
            n = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]] + "." + p[2]
        elif p[0] == "conv_in":
            n = "input_blocks.0.0." + p[1]
        elif p[0] == "conv_norm_out":
            n = "out.0." + p[1]
        elif p[0] == "conv_out":
            n = "out.2." + p[1]
        elif p[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            down = p[0] == "down_blocks"
            base = 1 + i * (layers + 1) if down else i * (layers + 1)
            if kind == "resnets":
                sub, name = rest.split(".", 1)[0], rest.split(".", 1)[1]
                n = f"{'input' if down else 'output'}_blocks.{base + j}.0.{RES[sub]}.{name}"
            elif kind == "attentions":
                n = f"{'input' if down else 'output'}_blocks.{base + j}.1.{rest}"
            elif down:  # downsamplers.0.conv
                n = f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest.split('.', 1)[1]}"
            else:  # upsamplers.0.conv: after the level's last res block (and its attention, if any)
                has_attn = any(q.startswith(f"up_blocks.{i}.attentions.") for q in sd)
                n = f"output_blocks.{base + layers}.{2 if has_attn else 1}.conv.{rest.split('.', 1)[1]}"
        elif p[0] == "mid_block":
            idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
            rest = ".".join(p[3:])
            if p[1] == "resnets":
                rest = RES[p[3]] + "." + ".".join(p[4:])
            n = f"middle_block.{idx}.{rest}"
        else:
            raise AssertionError(k)
        out["model.diffusion_model." + n] = v
    return out


def _vae_to_ldm(sd: dict, levels: int) -> dict:
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        n = k
        if p[0] in ("encoder", "decoder"):
            side, rest = p[0], p[1:]
            if rest[0] == "conv_norm_out":
                n = f"{side}.norm_out.{rest[1]}"
            elif rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1]) if side == "encoder" else levels - 1 - int(rest[1])
                ud = "down" if side == "encoder" else "up"
                if rest[2] == "resnets":
                    name = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                    n = f"{side}.{ud}.{i}.block.{rest[3]}.{name}"
                else:
                    n = f"{side}.{ud}.{i}.{'downsample' if ud == 'down' else 'upsample'}.conv.{rest[-1]}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    n = f"{side}.mid.block_{int(rest[2]) + 1}.{'.'.join(rest[3:])}"
                else:
                    sub = ".".join(rest[3:-1])
                    n = f"{side}.mid.attn_1.{VAE_ATTN[sub]}.{rest[-1]}"
                    if v.ndim == 2:
                        v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + n] = v
    return out


def _clip_to_ldm(sd: dict, family: str, hidden: int) -> dict:
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}  # (transformers 5: flat)
    if family == "sd1":
        return {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
    p, out = "cond_stage_model.model.", {}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    n_layers = 0
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out[p + "token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out[p + "positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out[p + "ln_final." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("text_model.encoder.layers."):
            layer, rest = k.split(".")[3], ".".join(k.split(".")[4:])
            n_layers = max(n_layers, int(layer) + 1)
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [sd[f"text_model.encoder.layers.{layer}.self_attn.{c}_proj.{kind}"] for c in "qkv"]
                out[f"{p}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
            elif rest.split(".")[1] in ("k_proj", "v_proj"):
                continue
            else:
                sub, kind = rest.rsplit(".", 1)
                out[f"{p}transformer.resblocks.{layer}.{names[sub]}.{kind}"] = v
    # the last OpenCLIP layer, which SD 2.x does not use, and the projection it does not use either
    g = torch.Generator().manual_seed(5)
    for name, shape in (("ln_1.weight", (hidden,)), ("ln_1.bias", (hidden,)), ("attn.in_proj_weight", (3 * hidden, hidden)),
                        ("attn.in_proj_bias", (3 * hidden,)), ("attn.out_proj.weight", (hidden, hidden)),
                        ("attn.out_proj.bias", (hidden,)), ("ln_2.weight", (hidden,)), ("ln_2.bias", (hidden,)),
                        ("mlp.c_fc.weight", (2 * hidden, hidden)), ("mlp.c_fc.bias", (2 * hidden,)),
                        ("mlp.c_proj.weight", (hidden, 2 * hidden)), ("mlp.c_proj.bias", (hidden,))):
        out[f"{p}transformer.resblocks.{n_layers}.{name}"] = torch.randn(shape, generator=g)
    out[p + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def write_single_file(folder: Path, path: Path, family: str) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = {**_unet_to_ldm(unet.state_dict(), unet.config.layers_per_block),
             **_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)),
             **_clip_to_ldm(text.state_dict(), family, text.config.hidden_size)}
    state["alphas_cumprod"] = torch.ones(1000)  # the LDM file's diffusion buffers (ignored)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """{family: (folder, single file, tokenizer folder)} for an SD1-like (eps) and an SD2-like (v) model."""
    root = tmp_path_factory.mktemp("sd")
    out = {}
    for family in FAMILY:
        folder = build_sd_folder(root / family, family)
        out[family] = (folder, write_single_file(folder, root / f"{family}.safetensors", family),
                       root / f"tok-{family}")
    return out


def _load(sd, family, layout, **kw):
    """The pipeline over a test SD model; fp32 unless asked (the equality checks are against diffusers' fp32)."""
    kw.setdefault("precision", "fp32")
    folder, single, tok = sd[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layout == "folder":
            return Pipeline.load(folder, device="cpu", **kw)
        return Pipeline.load(single, device="cpu", tokenizer=str(tok), prediction="eps" if family == "sd1" else "v",
                             image_size=16, **kw)


# --------------------------------------------------------------------------------------------------------------
# Equality with diffusers


def _diffusers_pipe(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SD's config: leading, offset 1
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_output_equals_diffusers_in_both_layouts(sd, family):
    """The denoiser's network output (eps or v) on the encoded prompt equals diffusers' U-Net on diffusers'
    encoding of the same prompt, loaded from the folder and from the single file."""
    from diffusers import UNet2DConditionModel

    folder = sd[family][0]
    ref = _diffusers_pipe(folder)
    with torch.no_grad():
        emb, _ = ref.encode_prompt([PROMPT, NEGATIVE], "cpu", 1, False)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([951.0, 301.0])
    with torch.no_grad():
        want = unet(x, t.long(), encoder_hidden_states=emb).sample
    for layout in ("folder", "single-file"):
        pipe = _load(sd, family, layout)
        assert pipe.denoiser.prediction == ("eps" if family == "sd1" else "v")
        with torch.no_grad():
            cond = pipe._encode([PROMPT, NEGATIVE])
            got = pipe.denoiser.raw(x, t, cond)
        assert cond.tokens.shape == (2, 77, FAMILY[family]["hidden"])
        assert (cond.tokens - emb).abs().max().item() < 1e-5, layout
        assert want.abs().mean().item() > 0.05  # a real output, not zeros
        assert (got - want).abs().max().item() < 1e-4, layout


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_holds_the_folders_weights(sd, family):
    from kakusan.sd import read_sd

    folder, single, tok = sd[family]
    a = read_sd(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = read_sd(single, tokenizer=str(tok), prediction="eps" if family == "sd1" else "v", image_size=16)
    for part in ("unet", "vae", "text_model"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert a.schedule == b.schedule and a.prediction == b.prediction
    assert dict(a.unet.config)["attention_head_dim"] == dict(b.unet.config)["attention_head_dim"]
    assert a.tokenizer("a cat", padding="max_length")["input_ids"] == b.tokenizer("a cat", padding="max_length")[
        "input_ids"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_txt2img_equals_diffusers_ddim_cfg_negative_prompt(sd, family):
    """DDIM 20 steps, guidance 7.5, a negative prompt, the same starting latents: the same image as diffusers'
    StableDiffusionPipeline with SD's DDIM (kakusan's noise argument is in units of the first level's sigma)."""
    folder = sd[family][0]
    pipe = _load(sd, family, "folder")
    levels_t = [951 - 50 * i for i in range(20)]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma0 = pipe.schedule.alpha_sigma(torch.tensor(951.0))[1].item()
    got = pipe(PROMPT, negative_prompt=NEGATIVE, sampler="ddim", steps=20, spacing="leading", guidance=7.5,
               noise=noise, n=1)
    ref = _diffusers_pipe(folder)
    want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=20, guidance_scale=7.5, height=16, width=16,
               latents=noise * sigma0, output_type="pt").images
    assert ref.scheduler.timesteps.tolist() == levels_t
    img = (got.images + 1) / 2
    assert img.shape == want.shape == (1, 3, 16, 16)
    assert want.std().item() > 0.02  # an image, not a flat field
    assert (img - want).abs().max().item() < 1e-3


# --------------------------------------------------------------------------------------------------------------
# Everything downstream: samplers, img2img / inpainting / inversion, the CLI, import-sd


def test_every_sampler_and_the_other_starts(sd):
    from kakusan.samplers import SAMPLERS

    pipe = _load(sd, "sd1", "folder")
    for name in SAMPLERS:
        out = pipe(PROMPT, sampler=name, steps=3, seed=1)  # (guidance: the equality test above)
        assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all(), name
        assert out.images.std().item() > 0.01, name
    init = pipe(PROMPT, sampler="ddim", steps=4).images
    same = pipe(PROMPT, init_image=init, strength=0.0, steps=4)  # strength 0: the image itself
    assert (same.images - init).abs().max().item() < 1 / 127
    changed = pipe(PROMPT, init_image=init, strength=0.5, sampler="ddim", steps=4, guidance=3.0,
                   negative_prompt=NEGATIVE)
    assert (changed.images - init).abs().mean().item() > 1e-3
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1
    painted = pipe(PROMPT, init_image=init, mask=mask, sampler="ddim", steps=4)
    keep = (1 - mask).bool().expand_as(init)
    assert (painted.images - init)[keep].abs().max().item() < 1 / 127  # the kept half is the init image's
    inv = pipe.invert(init, prompt=PROMPT, steps=4)
    assert inv.noise.shape == (1, 4, 8, 8) and torch.isfinite(inv.noise).all()
    again = pipe(noise=inv.noise, **inv.regenerate)
    assert again.images.shape == init.shape


def test_gradient_checkpointing_bf16_and_offload(sd):
    pipe = _load(sd, "sd2", "folder")
    unet = pipe.denoiser.backbone
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    cond = pipe._encode([PROMPT, NEGATIVE])
    unet.train().requires_grad_(True)
    grads = []
    for on in (False, True):
        unet.zero_grad()
        unet.enable_gradient_checkpointing(on)
        unet(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert grads[0].abs().max().item() > 0
    assert (grads[0] - grads[1]).abs().max().item() < 1e-5 * grads[0].abs().max().item() + 1e-7
    fp32 = pipe(PROMPT, sampler="ddim", steps=4, guidance=3.0).images
    half = _load(sd, "sd2", "folder", precision="bf16", offload=True)
    bf16 = half(PROMPT, sampler="ddim", steps=4, guidance=3.0).images
    assert 0 < (bf16 - fp32).abs().mean().item() < 0.05  # bf16 forward passes: close, not bitwise
    # the U-Net's weights are held in bf16: the outputs of autocast over the fp32 weights, bitwise
    assert {p.dtype for p in half.denoiser.backbone.parameters()} == {torch.bfloat16}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = unet.eval().requires_grad_(False).enable_gradient_checkpointing(False)(x, t, cond)
    with torch.no_grad():
        assert torch.equal(half.denoiser.raw(x, t, cond), want)


def test_cli_sample_and_import_sd(sd, tmp_path, capsys):
    folder, single, tok = sd["sd1"]
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                 "--guidance", "7.5", "--sampler", "ddim", "--steps", "5", "--spacing", "leading", "-n", "2",
                 "--device", "cpu", "--out", str(grid)]) == 0
    assert grid.is_file() and "2 samples, ddim, 5 steps" in capsys.readouterr().out
    from kakusan.pipeline import read_png_record

    assert read_png_record(grid)["negative_prompt"] == NEGATIVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["import-sd", str(single), "--tokenizer", str(tok), "--prediction", "eps", "--image-size", "16",
                     "--out", str(tmp_path / "imported")]) == 0
    kw = dict(negative_prompt=NEGATIVE, guidance=7.5, sampler="ddim", steps=5, spacing="leading", seed=4)
    imported = Pipeline.load(tmp_path / "imported", device="cpu", precision="fp32")(PROMPT, **kw).images
    direct = _load(sd, "sd1", "folder")(PROMPT, **kw).images
    assert (imported - direct).abs().max().item() < 1e-5


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kakusan: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_inputs_are_one_line_exit_2(sd, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    folder, single, tok = sd["sd1"]
    sample = ["sample", "--prompt", PROMPT, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    # a folder missing a component
    broken = tmp_path / "no-vae"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    assert main([*sample, "--checkpoint", str(broken)]) == 2
    assert "without its vae/ component" in _error_line(capsys)
    # a single file of an unknown family (no SD 1.x / 2.x text tower)
    state = {k: v for k, v in load_file(str(single)).items() if not k.startswith("cond_stage_model.")}
    state["conditioner.foo.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "unknown.safetensors"))
    assert main([*sample, "--checkpoint", str(tmp_path / "unknown.safetensors"), "--tokenizer", str(tok)]) == 2
    assert "unknown family" in _error_line(capsys)
    # a truncated safetensors
    data = single.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main([*sample, "--checkpoint", str(tmp_path / "cut.safetensors")]) == 2
    assert "damaged or truncated" in _error_line(capsys)
    # an SD base trains on captioned images only; a single file is imported first; a kakusan checkpoint is not SD
    assert main(["train", "--init-from", str(folder), "--data", "digits", "--steps", "1", "--lora-rank", "8",
                 "--out", str(tmp_path / "run")]) == 2
    assert "digits has 1 channel(s); the model expects 3" in _error_line(capsys)
    assert main(["train", "--init-from", str(single), "--data", "digits", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    assert "import this single file first (kakusan import-sd" in _error_line(capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["import-sd", str(folder), "--out", str(tmp_path / "imp")])
    capsys.readouterr()
    assert main(["import-sd", str(tmp_path / "imp"), "--out", str(tmp_path / "imp2")]) == 2
    assert "is a kakusan checkpoint, not a Stable Diffusion one" in _error_line(capsys)
    assert main(["train", "--init-from", str(tmp_path / "imp"), "--data", "digits", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    assert "trains LoRA adapters: give --lora-rank" in _error_line(capsys)
    # a single file without a tokenizer
    assert main([*sample, "--checkpoint", str(single)]) == 2
    assert "--tokenizer" in _error_line(capsys)


def test_scheduler_mapping_matches_diffusers():
    from diffusers import DDIMScheduler

    from kakusan.samplers import sampling_levels
    from kakusan.schedules import make_schedule
    from kakusan.sd import family_scheduler, schedule_from_scheduler

    for zero_snr in (False, True):
        cfg = {**family_scheduler("v"), "rescale_betas_zero_snr": zero_snr}
        sc, pred = schedule_from_scheduler(cfg, "test")
        assert pred == "v" and sc.steps_offset == 1 and sc.final_level == "first"
        ours = make_schedule(sc)
        ref = DDIMScheduler(**{k: v for k, v in cfg.items()}, clip_sample=False)
        assert (ours.alpha_bar - ref.alphas_cumprod.double()).abs().max().item() < 1e-6
        ref.set_timesteps(20)
        levels = sampling_levels(ours, "ddim", 20, "leading")
        assert levels.t[:-1].tolist() == ref.timesteps.tolist()
        assert abs(levels.alpha[-1].item() ** 2 - ref.final_alpha_cumprod.item()) < 1e-6  # set_alpha_to_one False


# --------------------------------------------------------------------------------------------------------------
# LoRA fine-tuning on an SD base: latents through its autoencoder, captions through its CLIP, adapters on its
# attention, checkpoints that hold the adapters alone


CAPTIONS = ["a cat", "a red cat", "a cat cat", "a blue cat", "cat", "a tac", "a cat a", "ca ca"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """Eight 24x24 RGB images (resized to the model's 16 px on load) with captions, as a captions folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captioned")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        img = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _lora_cfg(captioned, base, **kw):
    return dict(data=f"captions:{captioned}", init_from=str(base), lora_rank=4, batch_size=4, lr=1e-2,
                warmup_steps=0, sample_every=0, checkpoint_every=2, log_every=1, precision="fp32", device="cpu",
                progress=False, **kw)


def test_lora_training_on_an_sd_folder(sd, captioned, tmp_path):
    """The trainer's x0 are the SD autoencoder's scaled latents and its conditions SD's padded CLIP states (as
    diffusers computes them); only the adapters train, are saved, resume exactly, and sample through the base."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from conftest import assert_resume_exact
    from kakusan.data import load_dataset, to_model_range
    from kakusan.training import Trainer, TrainConfig

    folder = sd["sd1"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(TrainConfig(out=str(tmp_path / "probe"), steps=4, **_lora_cfg(captioned, folder)))
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    pixels = to_model_range(load_dataset(f"captions:{captioned}", image_size=16, channels=3).images)
    with torch.no_grad():
        want = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        states = clip(ids)[0]
    assert tuple(tr.images.shape) == (8, 4, 8, 8) and (tr.images - want).abs().max().item() < 1e-5
    got = tr.text[torch.tensor([tr.text_index[c] for c in CAPTIONS])]
    assert got.tokens.shape == (8, 77, 32) and bool(got.mask.all())
    assert (got.tokens - states).abs().max().item() < 1e-5
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(n.endswith("attn2.to_k.lora_A.default.weight") for n in trainable)  # cross-attention adapted too

    ckpt = assert_resume_exact(tmp_path, None, 4, **_lora_cfg(captioned, folder))
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)  # the adapters alone, not the U-Net again
    assert set(saved) == {n for n in trainable}
    assert any(v.abs().max().item() > 0 for k, v in saved.items() if "lora_B" in k)  # they trained
    kw = dict(negative_prompt=NEGATIVE, guidance=7.5, sampler="ddim", steps=4, seed=3)
    run = Pipeline.load(tmp_path / "full", device="cpu", precision="fp32")
    assert [lr["path"] for lr in run.loras] == [str(ckpt / "lora.safetensors")]
    tuned = run(PROMPT, **kw).images
    by_file = Pipeline.load(folder, device="cpu", precision="fp32", lora=ckpt / "lora.safetensors")(PROMPT, **kw)
    base = _load(sd, "sd1", "folder")(PROMPT, **kw).images
    assert torch.equal(tuned, by_file.images)
    assert (tuned - base).abs().max().item() > 1e-3
    off = Pipeline.load(folder, device="cpu", precision="fp32", lora=ckpt / "lora.safetensors", lora_scale=0.0)
    assert (off(PROMPT, **kw).images - base).abs().max().item() < 1e-6  # the base weights were not touched
    regenerated = Pipeline.from_png(by_file.save_grid(tmp_path / "g.png"), device="cpu")
    assert torch.equal(regenerated.images, tuned)


def test_lora_training_on_an_imported_sd_and_refusals(sd, captioned, tmp_path, capsys):
    from kakusan.checkpoints import load_denoiser
    from kakusan.errors import CheckpointError
    from kakusan.lora import adapter_state as lora_state
    from kakusan.training import Trainer, TrainConfig

    folder, single, tok = sd["sd2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["import-sd", str(single), "--tokenizer", str(tok), "--prediction", "v", "--image-size", "16",
                     "--out", str(tmp_path / "imported")]) == 0
        ckpt = Trainer(TrainConfig(out=str(tmp_path / "run"), steps=2,
                                   **_lora_cfg(captioned, tmp_path / "imported"))).fit()
        # gradient checkpointing recomputes diffusers' blocks: the same step, the same adapters
        steps = [Trainer(TrainConfig(out=str(tmp_path / f"gc{on}"), steps=1, gradient_checkpointing=on,
                                     **_lora_cfg(captioned, tmp_path / "imported"))) for on in (False, True)]
    for tr in steps:
        tr.train_step()
    a, b = (lora_state(tr.model) for tr in steps)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    kw = dict(guidance=3.0, sampler="unipc-2", steps=4, seed=1)
    tuned = Pipeline.load(tmp_path / "run", device="cpu", precision="fp32")(PROMPT, **kw).images
    by_file = Pipeline.load(tmp_path / "imported", device="cpu", precision="fp32", lora=ckpt / "lora.safetensors")
    assert torch.equal(tuned, by_file(PROMPT, **kw).images)
    with pytest.raises(CheckpointError, match="holds? the adapters alone"):
        load_denoiser(ckpt)
    with pytest.raises(CheckpointError, match="another base model"):  # the sd2 adapters on the sd1 model
        Pipeline.load(sd["sd1"][0], device="cpu", lora=ckpt / "lora.safetensors")
    train = ["train", "--init-from", str(folder), "--data", f"captions:{captioned}", "--steps", "1",
             "--out", str(tmp_path / "bad")]
    with warnings.catch_warnings():  # the dry run builds the run on random data of the base's pixel size
        warnings.simplefilter("ignore")
        assert main([*train, "--lora-rank", "4", "--dry-run", "--estimate-steps", "1"]) == 0
    dry = capsys.readouterr()
    assert f'"init_from": "{folder}"' in dry.out and "s per step of" in dry.err and "1 steps take about" in dry.err
    for extra, message in ((["--lora-rank", "4", "--image-size", "32"], "is sized for 16 px images"),
                           (["--lora-rank", "4", "--cond", "class"], "is text-conditional"),
                           (["--lora-rank", "4", "--autoencoder", str(folder / "vae")], "brings its own autoencoder"),
                           (["--controlnet"], "not supported yet; LoRA fine-tuning is"),
                           ([], "give --lora-rank")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main([*train, *extra]) == 2, extra
        assert message in _error_line(capsys), extra


def test_eval_and_sweep_on_sd_prompts(sd, tmp_path):
    """`eval` and `sweep` read an SD folder directly, sample its prompts with a negative prompt, and record them
    (the shipped CIFAR-10 classifier's features against a folder of real-format RGB images)."""
    from PIL import Image

    from kakusan.metrics.provenance import file_sha256

    folder = sd["sd1"][0]
    ref = tmp_path / "ref"
    ref.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(160):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(ref / f"{i}.png")
    cls = Path(__file__).resolve().parents[1] / "weights" / "classifier-cifar10.safetensors"
    common = ["--checkpoint", str(folder), "--prompt", PROMPT, "--prompt", "a red cat", "--negative-prompt", NEGATIVE,
              "--guidance", "3", "-n", "140", "--extractor", f"classifier:{cls}", "--ref", f"folder:{ref}",
              "--device", "cpu"]
    out = tmp_path / "eval.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", *common, "--steps", "2", "--metrics", "fid,kid", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["scores"]["fid"] > 0 and "stderr" in res["scores"]["kid"]
    rec = res["record"]["samples"]
    assert rec["n"] == 140 and rec["guidance"] == 3.0 and rec["steps"] == 2
    assert rec["checkpoint_sha256"] == file_sha256(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert json.dumps(rec).count(NEGATIVE) >= 1 and "a red cat" in json.dumps(rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["sweep", *common, "--samplers", "ddim,euler", "--steps", "1,2",
                     "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {(r["sampler"], r["steps"]) for r in rows} == {("ddim", 1), ("ddim", 2), ("euler", 1), ("euler", 2)}
    fid = {(r["sampler"], r["steps"]): r["fid"] for r in rows}
    assert all(v > 0 for v in fid.values())
    # one step of DDIM and of Euler is the same step (x0_hat at the next level); at two steps they differ
    assert abs(fid["ddim", 1] - fid["euler", 1]) < 1e-6 and abs(fid["ddim", 2] - fid["euler", 2]) > 1e-6


def _same_image_as_diffusers(ours, ref, atol=1e-3, prompt=PROMPT):
    """kakusan's pipeline and diffusers' from the same latents: DDIM 10, guidance 7.5, a negative prompt."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma0 = ours.schedule.alpha_sigma(torch.tensor(901.0))[1].item()
    got = ours(prompt, negative_prompt=NEGATIVE, sampler="ddim", steps=10, spacing="leading", guidance=7.5,
               noise=noise, n=1).images
    want = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=16, width=16,
               latents=noise * sigma0, output_type="pt").images
    assert ref.scheduler.timesteps[0].item() == 901
    diff = ((got + 1) / 2 - want).abs().max().item()
    assert diff < atol, diff
    return got


def test_lora_files_travel_between_kakusan_diffusers_and_kohya(sd, captioned, tmp_path, capsys):
    """A kakusan SD LoRA (alpha != rank) loads in diffusers' load_lora_weights as it is, and in kohya's layout
    after `kakusan lora convert`; a LoRA saved by diffusers (U-Net and text encoder, peft keys) and its kohya
    form load in kakusan: each gives diffusers' image from the same latents."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from kakusan.training import Trainer, TrainConfig

    folder = sd["sd1"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = Trainer(TrainConfig(out=str(tmp_path / "run"), steps=2, lora_alpha=8.0,
                                   **_lora_cfg(captioned, folder))).fit()
    ours_file, kohya_file = ckpt / "lora.safetensors", tmp_path / "kohya.safetensors"
    assert main(["lora", "convert", str(ours_file), "--out", str(kohya_file)]) == 0
    assert main(["lora", "info", str(kohya_file)]) == 0 and "kohya layout" in capsys.readouterr().out
    base = _load(sd, "sd1", "folder")(PROMPT, sampler="ddim", steps=10, seed=0).images
    images = []
    for f in (ours_file, kohya_file):
        ref = _diffusers_pipe(folder)
        ref.load_lora_weights(str(f))
        images.append(_same_image_as_diffusers(_load(sd, "sd1", "folder", lora=f), ref))
    assert (images[0] - images[1]).abs().max().item() < 1e-5
    assert (_load(sd, "sd1", "folder", lora=ours_file)(PROMPT, sampler="ddim", steps=10, seed=0).images
            - base).abs().max().item() > 1e-3  # the adapters change the image

    # a LoRA made by diffusers / peft on the U-Net and the text encoder
    ref = _diffusers_pipe(folder)
    torch.manual_seed(7)
    ref.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(te_config, ref.text_encoder)  # (transformers' own add_adapter wants a newer peft)
    with torch.no_grad():  # random adapters (init_lora_weights=False), a tenth of peft's scale: they move the
        for name, p in [*ref.unet.named_parameters(), *ref.text_encoder.named_parameters()]:  # image, and leave
            if ".lora_B." in name:  # the random network well-conditioned (fused and unfused agree)
                p.mul_(0.1)
    theirs = tmp_path / "theirs"
    ref.save_lora_weights(theirs, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                          text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
                          unet_lora_adapter_metadata=ref.unet.peft_config["default"].to_dict(),
                          text_encoder_lora_adapter_metadata=te_config.to_dict())
    theirs_file = theirs / "pytorch_lora_weights.safetensors"
    got = _same_image_as_diffusers(_load(sd, "sd1", "folder", lora=theirs_file), ref)  # ref: adapters live
    assert (got - _load(sd, "sd1", "folder")(PROMPT, negative_prompt=NEGATIVE, sampler="ddim", steps=10,
                                             spacing="leading", guidance=7.5, n=1,
                                             noise=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
                                             ).images).abs().max().item() > 1e-3
    from kakusan.lora import adapter_format

    assert [adapter_format(f) for f in (ours_file, kohya_file, theirs_file)] == ["kakusan", "kohya", "diffusers"]
    with pytest.raises(Exception, match="not a LoRA file kakusan reads"):
        adapter_format(folder / "unet" / "diffusion_pytorch_model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# Teaching an SD model a subject: textual inversion (its CLIP's new rows) and DreamBooth + LoRA


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """Four 24x24 RGB images of 'the subject' (resized to the model's 16 px on load), as a plain image folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("subject")
    g = torch.Generator().manual_seed(11)
    for i in range(4):
        Image.fromarray((torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
    return root


def _teach_cfg(subject, base, **kw):
    return dict(data=f"folder:{subject}", init_from=str(base), batch_size=2, lr=1e-2, warmup_steps=0,
                sample_every=0, checkpoint_every=2, log_every=1, precision="fp32", device="cpu", progress=False, **kw)


TI = dict(textual_inversion=True, placeholder="<my-cat>", initializer="cat", num_vectors=2)


def test_textual_inversion_on_an_sd_folder(sd, subject, tmp_path, capsys):
    """Only the new word's two CLIP rows train: the U-Net, the VAE and the text encoder are bitwise the folder's;
    learned_embeds.safetensors loads in diffusers' load_textual_inversion and in kakusan (--embedding, or the run
    as a checkpoint), each giving diffusers' image from the same latents; the resume is exact."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from conftest import assert_resume_exact
    from kakusan.training import Trainer, TrainConfig

    folder = sd["sd1"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(TrainConfig(out=str(tmp_path / "ti"), steps=4, **TI, **_teach_cfg(subject, folder)))
        fresh = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(),
                 "vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
                 "text": {k.removeprefix("text_model."): v for k, v in  # (transformers 5: flat keys)
                          CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict().items()}}
    enc = tr.objective.encoder
    cat = fresh["text"]["embeddings.token_embedding.weight"][enc.tokenizer.convert_tokens_to_ids("cat</w>")]
    start = tr.model.weight.detach().clone()
    assert start.shape == (2, 32) and torch.equal(start, cat.expand(2, -1))
    assert [p for g in tr.optimizer.param_groups for p in g["params"]] == [tr.model.weight]
    tr.fit()
    unet = tr.objective.unet.unet.state_dict()
    vae = tr.autoencoder.module.state_dict()
    text = {k.removeprefix("text_model.").replace("token_embedding.base.", "token_embedding."): v
            for k, v in enc.model.state_dict().items() if ".parts." not in k}
    for name, now in (("unet", unet), ("vae", vae), ("text", text)):
        want = fresh[name]
        assert now.keys() == want.keys() and all(torch.equal(now[k], want[k]) for k in want), name
    assert (tr.model.weight - start).abs().min() > 0  # every number of the word moved
    ckpt = assert_resume_exact(tmp_path, None, 4, files=("model.safetensors", "ema.safetensors",
                                                         "optimizer.safetensors", "learned_embeds.safetensors"),
                               **TI, **_teach_cfg(subject, folder))
    learned = ckpt / "learned_embeds.safetensors"
    tensors = load_file(learned)
    assert tensors.keys() == {"<my-cat>"} and tensors["<my-cat>"].shape == (2, 32)
    ref = _diffusers_pipe(folder)
    ref.load_textual_inversion(str(learned))
    assert ref.tokenizer.convert_tokens_to_ids(["<my-cat>", "<my-cat>_1"]) == [516, 517]
    prompt = "a <my-cat>"
    got = _same_image_as_diffusers(_load(sd, "sd1", "folder", embedding=learned), ref, prompt=prompt)
    as_run = _load(sd, "sd1", "folder").__class__.load(tmp_path / "full", device="cpu", precision="fp32")
    assert [e["token"] for e in as_run.embeddings] == ["<my-cat>"]
    assert torch.equal(_same_image_as_diffusers(as_run, ref, prompt=prompt), got)
    assert (got - _same_image_as_diffusers(_load(sd, "sd1", "folder"), _diffusers_pipe(folder))).abs().max() > 1e-3
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(folder), "--embedding", str(learned), "--prompt", prompt, "-n", "1",
                 "--steps", "2", "--precision", "fp32", "--out", str(tmp_path / "s.png")]) == 0


def test_dreambooth_with_lora_on_an_sd_folder(sd, subject, tmp_path, capsys):
    """The class images are the folder's own samples of the class prompt (drawn once, with the base's hash in
    their provenance), encoded to latents after the subject's; only LoRA adapters train, the resume is exact, the
    run samples as its base with its adapters. Full-weight DreamBooth on SD is refused, naming --lora-rank."""
    from kakusan.pipeline import Pipeline as P
    from kakusan.sd import weights_sha256
    from kakusan.training import Trainer, TrainConfig

    from conftest import assert_resume_exact

    folder = sd["sd1"][0]
    db = dict(dreambooth=True, instance_prompt="a sks cat", class_prompt="a cat", num_class_images=3, lora_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Trainer(TrainConfig(out=str(tmp_path / "probe"), steps=1, **db, **_teach_cfg(subject, folder)))
        prov = json.loads((tmp_path / "probe" / "class-images" / "provenance.json").read_text())
        assert prov["base"] == {"path": str(folder), "sha256": weights_sha256(folder)} and prov["prompt"] == "a cat"
        assert tr.data.captions == ["a sks cat"] * 4 + ["a cat"] * 3 and tuple(tr.images.shape) == (7, 4, 8, 8)
        drawn = _load(sd, "sd1", "folder", precision="auto")("a cat", n=3, guidance=2.0, seed=0, batch_size=16)
        from kakusan.data import load_dataset

        cls = load_dataset(f"folder:{tmp_path / 'probe' / 'class-images'}", image_size=16, channels=3).images
        assert torch.equal(cls, drawn.uint8().cpu())  # the base's images of the class prompt, as PNGs
        trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
        ckpt = assert_resume_exact(tmp_path, None, 4, **db, **_teach_cfg(subject, folder))
        kw = dict(guidance=3.0, sampler="ddim", steps=4, seed=1)
        tuned = P.load(tmp_path / "full", device="cpu", precision="fp32")("a sks cat", **kw).images
        by_file = P.load(folder, device="cpu", precision="fp32", lora=ckpt / "lora.safetensors")("a sks cat", **kw)
        assert torch.equal(tuned, by_file.images)
        assert (tuned - _load(sd, "sd1", "folder")("a sks cat", **kw).images).abs().max().item() > 1e-3
    capsys.readouterr()
    assert main(["train", "--init-from", str(folder), "--dreambooth", "--instance-data", f"folder:{subject}",
                 "--instance-prompt", "a sks cat", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DreamBooth on a Stable Diffusion U-Net trains LoRA adapters" in err
