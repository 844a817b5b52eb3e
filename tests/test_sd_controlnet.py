"""Stable Diffusion ControlNets: a tiny random diffusers ControlNetModel built on the tiny SD model of test_sd.py,
saved as a diffusers folder and as the original single file (``control_model.*`` keys, written here from the
diffusers names with test_sd's own LDM map), loaded by kakusan and compared with diffusers' U-Net fed by diffusers'
ControlNet, and with StableDiffusionControlNetPipeline."""

import inspect
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_sd import NEGATIVE, PROMPT, _unet_to_ldm, build_sd_folder  # noqa: E402

from kakusan.conditioning.control import ControlCond  # noqa: E402
from kakusan.conditioning.text import TextCond  # noqa: E402
from kakusan.errors import CheckpointError, ConfigError  # noqa: E402
from kakusan.models.controlnet import ControlledUNet, controlnet_from_checkpoint_config  # noqa: E402
from kakusan.models.sd_unet import SDUNet, SDUNetConfig  # noqa: E402
from kakusan.sd import is_sd_controlnet, load_sd_controlnet  # noqa: E402

HINTS = {"factor2": (16, 32), "factor8": (16, 32, 96, 256)}  # the tiny VAE's factor 2; SD's 512 -> 64 encoder


# --------------------------------------------------------------------------------------------------------------
# Building tiny ControlNets offline


def build_controlnet(unet, widths, seed: int, **override):
    """A diffusers ControlNetModel on ``unet`` (its copy started from the U-Net's weights, as from_unet does),
    every weight then moved off its initial value, the zero convolutions and the hint encoder's zero-initialised
    output included (so a residual that is not applied, or applied at the wrong skip, shows)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    if override:
        cfg = {**{k: v for k, v in dict(ControlNetModel.from_unet(unet).config).items() if not k.startswith("_")},
               "conditioning_embedding_out_channels": widths, **override}
        net = ControlNetModel.from_config(cfg)
    else:
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    with torch.no_grad():
        for name, p in net.named_parameters():
            zero = name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                    "controlnet_cond_embedding.conv_out"))
            p.add_(torch.randn_like(p) * (0.1 if zero else 0.02))
    return net.eval()


def controlnet_to_ldm(sd: dict, layers: int) -> dict:
    """diffusers' ControlNetModel keys -> the original ControlNet file's (``control_model.*``): the copied way
    down and middle as the U-Net's (test_sd's map), the zero convolutions (``zero_convs.i.0``,
    ``middle_block_out.0``) and the hint encoder (a Sequential of convolutions with SiLUs between: conv_in at 0,
    the stages' convolutions at 2, 4, ..., conv_out last)."""
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    out, unet_part = {}, {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "controlnet_down_blocks":
            out[f"zero_convs.{p[1]}.0.{p[2]}"] = v
        elif p[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{p[1]}"] = v
        elif p[0] == "controlnet_cond_embedding":
            idx = {"conv_in": 0, "conv_out": 2 + 2 * n_blocks}.get(p[1])
            idx = 2 + 2 * int(p[2]) if idx is None else idx
            out[f"input_hint_block.{idx}.{p[-1]}"] = v
        else:
            unet_part[k] = v
    ldm = _unet_to_ldm(unet_part, layers)
    out.update({k.replace("model.diffusion_model.", ""): v for k, v in ldm.items()})
    return {"control_model." + k: v.contiguous() for k, v in out.items()}


def save_controlnet(net, root: Path, name: str, base_unet=None) -> dict:
    """The ControlNet as a diffusers folder, an original .safetensors and an original .pth (the latter also
    holding a base U-Net's ``model.diffusion_model.*`` keys, as lllyasviel's control_sd15_*.pth files do)."""
    from safetensors.torch import save_file

    folder = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.save_pretrained(folder, safe_serialization=True)
    ldm = controlnet_to_ldm(net.state_dict(), net.config.layers_per_block)
    single = root / f"{name}.safetensors"
    save_file(ldm, str(single))
    pth = root / f"{name}.pth"
    full = dict(ldm)
    if base_unet is not None:
        full.update(_unet_to_ldm(base_unet.state_dict(), base_unet.config.layers_per_block))
    torch.save({"state_dict": full}, str(pth))
    return {"folder": folder, "single-file": single, "pth": pth}


@pytest.fixture(scope="module")
def cn(tmp_path_factory):
    """The tiny SD 1.x-like folder, its U-Net, and ControlNets for it (both hint encoders, and one for another
    text width), each in the three layouts."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sdcn")
    folder = build_sd_folder(root / "sd1", "sd1")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    nets, files = {}, {}
    for i, (name, widths) in enumerate(HINTS.items()):
        nets[name] = build_controlnet(unet, widths, seed=10 + i)
        files[name] = save_controlnet(nets[name], root, name, base_unet=unet if name == "factor2" else None)
    other = build_controlnet(unet, HINTS["factor2"], seed=20, cross_attention_dim=48)
    files["other"] = save_controlnet(other, root, "other")
    return {"root": root, "folder": folder, "unet": unet, "nets": nets, "files": files,
            "unet_config": SDUNetConfig.of(unet).unet}


def _inputs(factor: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([951.0, 301.0])
    tokens = torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 8 * factor, 8 * factor, generator=g)
    return x, t, tokens, hint


# --------------------------------------------------------------------------------------------------------------
# The network: equal to diffusers' U-Net fed by diffusers' ControlNet


@pytest.mark.parametrize("name", list(HINTS))
def test_controlled_unet_equals_diffusers(cn, name):
    """ControlledUNet(SDUNet, [SDControlNet]) on a ControlCond equals diffusers' U-Net given diffusers'
    ControlNet's residuals (conditioning_scale 0.7), for the ControlNet loaded from each layout; all layouts load
    to the same tensors as the ControlNet that was saved."""
    unet, ref = cn["unet"], cn["nets"][name]
    factor = 2 ** (len(HINTS[name]) - 1)
    x, t, tokens, hint = _inputs(factor)
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=tokens, controlnet_cond=hint, conditioning_scale=0.7,
                        return_dict=False)
        want = unet(x, t, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        plain = unet(x, t, encoder_hidden_states=tokens).sample
    assert (want - plain).abs().max().item() > 0.05  # the control does change the output
    base = SDUNet(SDUNetConfig.of(unet), unet)
    cond = ControlCond.of(TextCond(tokens, torch.ones(2, 77, dtype=torch.bool)), hint, [0.7])
    sd_ref = ref.state_dict()
    for layout, path in cn["files"][name].items():
        net, record = load_sd_controlnet(path, cn["unet_config"])
        got_sd = net.controlnet.state_dict()
        assert set(got_sd) == set(sd_ref), layout
        assert all(torch.equal(got_sd[k], sd_ref[k]) for k in sd_ref), layout
        assert record["layout"] == ("folder" if layout == "folder" else "single-file")
        assert net.config.hint_factor == factor
        with torch.no_grad():
            got = ControlledUNet(base, [net])(x, t, cond)
            assert (base(x, t, cond.inner) - plain).abs().max().item() < 1e-6  # no control: as before
        assert (got - want).abs().max().item() < 1e-5, layout


def test_two_controlnets_sum_and_keep(cn):
    """Two ControlNets (each its own hint and scale) add their scaled residuals; keep = 0 leaves a sample
    uncontrolled."""
    unet, ref = cn["unet"], cn["nets"]["factor2"]
    x, t, tokens, hint = _inputs(2)
    hint2 = _inputs(2, seed=1)[3]
    with torch.no_grad():
        d1, m1 = ref(x, t, encoder_hidden_states=tokens, controlnet_cond=hint, return_dict=False)
        d2, m2 = ref(x, t, encoder_hidden_states=tokens, controlnet_cond=hint2, return_dict=False)
        want = unet(x, t, encoder_hidden_states=tokens,
                    down_block_additional_residuals=[0.5 * a + 1.5 * b for a, b in zip(d1, d2)],
                    mid_block_additional_residual=0.5 * m1 + 1.5 * m2).sample
        plain = unet(x, t, encoder_hidden_states=tokens).sample
    a, _ = load_sd_controlnet(cn["files"]["factor2"]["folder"], cn["unet_config"])
    b, _ = load_sd_controlnet(cn["files"]["factor2"]["single-file"], cn["unet_config"])
    model = ControlledUNet(SDUNet(SDUNetConfig.of(unet), unet), [a, b])
    text = TextCond(tokens, torch.ones(2, 77, dtype=torch.bool))
    cond = ControlCond.of(text, [hint, hint2], [0.5, 1.5])
    with torch.no_grad():
        got = model(x, t, cond)
        half = model(x, t, cond.with_inner(text, keep=torch.tensor([1.0, 0.0])))
    assert (got - want).abs().max().item() < 1e-5
    assert (half[0] - want[0]).abs().max().item() < 1e-5
    assert (half[1] - plain[1]).abs().max().item() < 1e-5


def test_record_rebuilds_and_identifies(cn):
    from kakusan.metrics.provenance import file_sha256

    files = cn["files"]["factor2"]
    net, record = load_sd_controlnet(files["single-file"], cn["unet_config"])
    assert record["type"] == "sd-controlnet" and record["path"] == str(files["single-file"])
    assert record["sha256"] == file_sha256(files["single-file"])
    _, frec = load_sd_controlnet(files["folder"], cn["unet_config"])
    assert frec["sha256"] == file_sha256(files["folder"] / "diffusion_pytorch_model.safetensors")
    assert frec["config"] == record["config"]  # the inferred config is the saved one
    empty = controlnet_from_checkpoint_config(record)
    empty.load_state_dict(net.state_dict())
    x, t, tokens, hint = _inputs(2)
    text = TextCond(tokens, torch.ones(2, 77, dtype=torch.bool))
    with torch.no_grad():
        a, b = net(x, t, text, hint), empty.eval()(x, t, text, hint)
    assert all(torch.equal(p, q) for p, q in zip(a[0] + [a[1]], b[0] + [b[1]]))
    for path in files.values():
        assert is_sd_controlnet(path), path
    assert not is_sd_controlnet(cn["folder"]) and not is_sd_controlnet(cn["folder"] / "unet")
    assert not is_sd_controlnet(cn["root"] / "missing.safetensors")


# --------------------------------------------------------------------------------------------------------------
# Refusals


def test_mismatched_damaged_and_misused_controlnets_are_refused(cn, tmp_path):
    for layout in ("folder", "single-file", "pth"):
        with pytest.raises(CheckpointError) as e:
            load_sd_controlnet(cn["files"]["other"][layout], cn["unet_config"])
        msg = str(e.value)
        assert "\n" not in msg and "cross_attention_dim is 48, the U-Net's 32" in msg, msg
    wider = {**cn["unet_config"], "block_out_channels": [32, 96]}
    with pytest.raises(CheckpointError, match=r"block_out_channels is \[32, 64\], the U-Net's \[32, 96\]"):
        load_sd_controlnet(cn["files"]["factor2"]["single-file"], wider)
    # truncated files, in each layout
    single = cn["files"]["factor2"]["single-file"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_sd_controlnet(cut, cn["unet_config"])
    pth = cn["files"]["factor2"]["pth"]
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not readable as a weights-only checkpoint"):
        load_sd_controlnet(cut_pth, cn["unet_config"])
    import shutil

    folder = tmp_path / "cut-folder"
    shutil.copytree(cn["files"]["factor2"]["folder"], folder)
    w = folder / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_sd_controlnet(folder, cn["unet_config"])
    # a file missing a tensor, and one with a tensor too many
    from safetensors.torch import load_file, save_file

    state = load_file(str(single))
    save_file({k: v for k, v in state.items() if k != "control_model.zero_convs.3.0.weight"},
              str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing"):
        load_sd_controlnet(tmp_path / "missing.safetensors", cn["unet_config"])
    save_file({**state, "control_model.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="no place in diffusers' ControlNetModel"):
        load_sd_controlnet(tmp_path / "extra.safetensors", cn["unet_config"])
    with pytest.raises(CheckpointError, match="not an SD ControlNet"):
        load_sd_controlnet(cn["root"] / "sd1" / "unet" / "diffusion_pytorch_model.safetensors", cn["unet_config"])
    # the wrong hint or condition
    net, _ = load_sd_controlnet(cn["files"]["factor2"]["folder"], cn["unet_config"])
    x, t, tokens, hint = _inputs(2)
    text = TextCond(tokens, torch.ones(2, 77, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"takes \(2, 3, 16, 16\)"):
        net(x, t, text, hint[:, :, :8, :8])
    with pytest.raises(ConfigError, match="needs an encoded prompt"):
        net(x, t, None, hint)
    with pytest.raises(ConfigError, match="32-wide tokens"):
        net(x, t, TextCond(torch.zeros(2, 77, 16), torch.ones(2, 77, dtype=torch.bool)), hint)


# --------------------------------------------------------------------------------------------------------------
# The pipeline: equal to diffusers' StableDiffusionControlNetPipeline (needs Pipeline.load(controlnet=...))


def _has_controlnet_wiring() -> bool:
    from kakusan.pipeline import Pipeline

    return ("controlnet" in inspect.signature(Pipeline.load).parameters
            and "control" in inspect.signature(Pipeline.__call__).parameters)


@pytest.mark.skipif(not _has_controlnet_wiring(),
                    reason="Pipeline.load(controlnet=...) / pipe(control=..., control_scale=...) not wired yet")
@pytest.mark.parametrize("layout", ["folder", "single-file"])
def test_pipeline_equals_diffusers_controlnet_pipeline(cn, layout):
    """DDIM 10 steps, guidance 7.5 with a negative prompt, a control image (PIL) at scale 0.8, the same starting
    latents (kakusan's noise = diffusers' latents / sigma of the first level): the same image as diffusers'
    StableDiffusionControlNetPipeline, the ControlNet loaded from either layout."""
    import numpy as np
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    from kakusan.pipeline import Pipeline

    folder = cn["folder"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionControlNetPipeline.from_pretrained(
            folder, controlnet=ControlNetModel.from_pretrained(cn["files"]["factor2"]["folder"]),
            safety_checker=None, requires_safety_checker=False)
        pipe = Pipeline.load(folder, device="cpu", precision="fp32", controlnet=[cn["files"]["factor2"][layout]])
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler.set_timesteps(10)
    t0 = float(ref.scheduler.timesteps[0])
    sigma0 = pipe.schedule.alpha_sigma(torch.tensor(t0))[1].item()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt=NEGATIVE, sampler="ddim", steps=10, spacing="leading", guidance=7.5, noise=noise, n=1)
    got = pipe(PROMPT, control=image, control_scale=0.8, **kw)
    plain = pipe(PROMPT, **kw)
    want = ref(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
               controlnet_conditioning_scale=0.8, height=16, width=16, latents=noise * sigma0,
               output_type="pt").images
    img, plain_img = (got.images + 1) / 2, (plain.images + 1) / 2
    assert img.shape == want.shape == (1, 3, 16, 16)
    assert want.std().item() > 0.02  # an image, not a flat field
    assert (plain_img - want).abs().max().item() > 1e-2  # the control changed it
    assert (img - want).abs().max().item() < 1e-3
