import math

import numpy as np
import pytest
import torch

from kakusan.errors import ConfigError
from kakusan.models import PRESETS, UNet, UNetConfig, get_preset, timestep_embedding

DDPM_CIFAR10_PARAMS = 35_746_307  # DDPM's CIFAR-10 U-Net; diffusers' UNet2DModel in that config has the same


def _randomise(model, std=0.05):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if isinstance(c, UNetConfig)])  # DiTs: test_dit
def test_presets_build_and_keep_shape(name):
    cfg = PRESETS[name]
    if name == "ddpm-cifar10":
        cfg = get_preset(name, image_size=8)  # same network, small input, to stay fast
    m = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert m(x, torch.tensor([0.0, 999.0])).shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)


def test_ddpm_cifar10_parameter_count():
    m = UNet(get_preset("ddpm-cifar10"))
    assert sum(p.numel() for p in m.parameters()) == DDPM_CIFAR10_PARAMS
    assert sum(isinstance(b, torch.nn.GroupNorm) for b in m.modules()) > 0


def test_same_parameter_count_as_diffusers():
    diffusers = pytest.importorskip("diffusers")
    d = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1)
    assert sum(p.numel() for p in d.parameters()) == DDPM_CIFAR10_PARAMS


def _load_unet2d_weights(d, model):
    """Map a diffusers UNet2DModel's state dict onto kakusan's U-Net names (q, k, v fused into qkv) and load it
    strictly: every parameter of both networks is used once."""
    sd, out = d.state_dict(), {}
    for k in ("conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"):
        out[k] = sd[k]
    for src, dst in (("time_embedding.linear_1", "time_mlp.0"), ("time_embedding.linear_2", "time_mlp.2"),
                     ("conv_norm_out", "norm_out"), ("class_embedding", "label_emb")):
        out.update({f"{dst}.{kind}": sd[f"{src}.{kind}"] for kind in ("weight", "bias") if f"{src}.{kind}" in sd})

    def res(src, dst):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "temb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("conv_shortcut", "skip")):
            out.update({f"{dst}.{b}.{kind}": sd[f"{src}.{a}.{kind}"] for kind in ("weight", "bias")
                        if f"{src}.{a}.{kind}" in sd})

    def attn(src, dst):
        for kind in ("weight", "bias"):
            out[f"{dst}.norm.{kind}"] = sd[f"{src}.group_norm.{kind}"]
            out[f"{dst}.qkv.{kind}"] = torch.cat([sd[f"{src}.to_{n}.{kind}"] for n in "qkv"])
            out[f"{dst}.proj.{kind}"] = sd[f"{src}.to_out.0.{kind}"]

    for side, blocks, sampler, ours in (("down", d.down_blocks, "downsamplers", "downsamples"),
                                        ("up", d.up_blocks, "upsamplers", "upsamples")):
        for i, blk in enumerate(blocks):
            for j in range(len(blk.resnets)):
                res(f"{side}_blocks.{i}.resnets.{j}", f"{side}.{i}.blocks.{j}")
            for j in range(len(getattr(blk, "attentions", None) or [])):
                attn(f"{side}_blocks.{i}.attentions.{j}", f"{side}.{i}.attns.{j}")
            if getattr(blk, sampler, None):
                for kind in ("weight", "bias"):
                    out[f"{ours}.{i}.conv.{kind}"] = sd[f"{side}_blocks.{i}.{sampler}.0.conv.{kind}"]
    res("mid_block.resnets.0", "mid_block1")
    res("mid_block.resnets.1", "mid_block2")
    attn("mid_block.attentions.0", "mid_attn")
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    model.load_state_dict(out)  # strict: no parameter of ours is left out
    return model


# google/ddpm-cifar10-32's configuration (DDPM's network converted from its TensorFlow checkpoint), less wide
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=8, dropout=0.1)


@pytest.mark.parametrize("case", ["ddpm-cifar10", "class-conditional"])
def test_matches_diffusers_unet2dmodel_with_the_same_weights(case):
    """diffusers' UNet2DModel with random weights, mapped into ours, gives the same output (to float32 round-off)
    for (a) the ddpm-cifar10 preset against google/ddpm-cifar10-32's configuration, 4x narrower (the same blocks,
    attention at 16x16, DDPM's bottom-right padded downsampling, one attention head, sin-first time features
    with frequencies 10000^(-k / (half - 1)), GroupNorm eps 1e-6); (b) a class-conditional model with
    scale-shift time conditioning, several attention heads and symmetric downsampling padding. (diffusers
    leaves the middle attention without its GroupNorm under scale-shift unless attn_norm_num_groups is given;
    kakusan always has it.)"""
    diffusers = pytest.importorskip("diffusers")
    if case == "ddpm-cifar10":
        d = diffusers.UNet2DModel(**DDPM_CIFAR10_DIFFUSERS)
        cfg = get_preset("ddpm-cifar10", channels=32, norm_groups=8)
        x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([3.0, 250.0, 999.0]), None
    else:
        d = diffusers.UNet2DModel(
            sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
            norm_num_groups=8, attn_norm_num_groups=8, num_class_embeds=4, resnet_time_scale_shift="scale_shift")
        cfg = UNetConfig(image_size=16, in_channels=1, out_channels=1, channels=16, channel_mults=(1, 2),
                         num_res_blocks=1, attention_resolutions=(8,), attention_head_dim=8, norm_groups=8,
                         num_classes=3, time_conditioning="scale-shift")
        x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([3.0, 250.0, 600.0, 999.0]), torch.tensor([0, 1, 2, 3])
    _randomise(d, std=0.05).eval()
    with torch.no_grad():  # normalisation gains near 1, as trained networks have them: attention logits of order 1
        for name, p in d.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    ours = _load_unet2d_weights(d, UNet(cfg)).eval()
    with torch.no_grad():
        want = d(x, t, class_labels=y).sample
        got = ours(x, t, y)
    assert got.shape == want.shape == x.shape and want.abs().max() > 1.0
    # float32 round-off: measured 3.8e-6 (ddpm-cifar10, outputs up to 2.8) and 1.8e-6 (class-conditional, 1.4);
    # an attention scaled by 1/d instead of 1/sqrt(d) is off by 0.016 and 0.006
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item()), (got - want).abs().max()


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = timestep_embedding(t, 32).double().numpy()
    half = 16
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    ref = np.concatenate([np.sin(t.numpy()[:, None] * freqs), np.cos(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(emb, ref, atol=2e-4)  # float32 arguments up to 999 rad
    assert timestep_embedding(t, 33).shape == (4, 33)


def test_output_depends_on_time_and_label_and_input():
    cfg = get_preset("unet-tiny", num_classes=3)
    m = _randomise(UNet(cfg)).eval()
    x = torch.randn(1, 1, 8, 8)
    base = m(x, torch.tensor([10.0]), torch.tensor([0]))
    assert not torch.allclose(base, m(x, torch.tensor([500.0]), torch.tensor([0])))
    assert not torch.allclose(base, m(x, torch.tensor([10.0]), torch.tensor([1])))
    assert not torch.allclose(base, m(x + 0.1, torch.tensor([10.0]), torch.tensor([0])))
    # no label means the null label
    torch.testing.assert_close(m(x, torch.tensor([10.0])), m(x, torch.tensor([10.0]), torch.tensor([3])))


def test_zero_initialised_output_and_batch_independence():
    m = UNet(get_preset("unet-tiny")).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.count_nonzero(m(x, torch.zeros(4))) == 0  # the output conv starts at zero (ADM)
    _randomise(m)
    full = m(x, torch.arange(4.0))
    single = torch.cat([m(x[i:i + 1], torch.tensor([float(i)])) for i in range(4)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter():
    m = _randomise(UNet(get_preset("unet-tiny", num_classes=2)))
    m(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=28, channel_mults=(1, 2, 2, 2)), "not divisible by 8"),
    (dict(channels=30), "norm_groups"),
    (dict(dropout=1.0), "dropout"),
    (dict(time_conditioning="film"), "time_conditioning"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(downsample_padding="same"), "downsample_padding"),
    (dict(norm_groups=0), "norm_groups must be >= 1"),  # was a ZeroDivisionError
    (dict(attention_head_dim=0), "attention_head_dim must be >= 1"),  # was taken as one head
    (dict(attention_head_dim=-8), "attention_head_dim must be >= 1"),  # was a crash in the forward pass
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("unet-tiny", **kw)


def test_unknown_preset_and_labels_on_unconditional():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("unet-huge")
    with pytest.raises(ConfigError, match="unconditional"):
        UNet(get_preset("unet-tiny"))(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_config_round_trip():
    cfg = get_preset("ddpm-cifar10")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown U-Net config keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "depth": 3})
    # a checkpoint's record from before downsample_padding existed rebuilds the network it was trained as
    before = {k: v for k, v in cfg.to_dict().items() if k != "downsample_padding"}
    assert cfg.downsample_padding == "bottom-right" and UNetConfig.from_dict(before).downsample_padding == "symmetric"


@pytest.mark.parametrize("text", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(text):
    """Recomputing the blocks in the backward pass changes memory, not maths: the same output and the same
    gradients, dropout included (its random draws are replayed), for class and text models."""
    from kakusan.conditioning.text import TextCond

    kw = dict(image_size=16, in_channels=3, out_channels=3, channels=16, channel_mults=(1, 2), num_res_blocks=1,
              attention_resolutions=(8,), dropout=0.2, norm_groups=8)
    kw.update(context_dim=12) if text else kw.update(num_classes=3)
    torch.manual_seed(0)
    plain = _randomise(UNet(UNetConfig(**kw))).train()  # the zero-initialised output would hide the gradients
    ckpt = UNet(UNetConfig(**kw)).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([3.0, 100.0, 500.0, 900.0])
    cond = (TextCond(torch.randn(4, 5, 12, generator=g), torch.tensor([[True] * 5] * 2 + [[True] * 3 + [False] * 2] * 2))
            if text else torch.tensor([0, 1, 2, 3]))
    outs, grads = [], []
    for m in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout draws
        y = m(x, t, cond)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(plain.parameters()))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    # with dropout the draws matter: a different seed gives a different output (so the equality above is earned)
    torch.manual_seed(8)
    assert not torch.equal(ckpt(x, t, cond), outs[0])
