"""Consistency distillation (LCM): the boundary condition, the skipping grid, the loss on the exact-score oracle
(a distilled student samples in one step what DDIM needs four for), and distillation through the trainer and
the CLI (checkpoint, exact resume, 'lcm' as the checkpoint's default sampler)."""

import copy
import json

import pytest
import torch

from kakusan.cli import main
from kakusan.consistency import (ConsistencyDenoiser, boundary_coefficients, distillation_loss, pseudo_huber,
                                 skipping_grid)
from kakusan.data import load_digits
from kakusan.diffusion import Denoiser, DiffusionConfig
from kakusan.errors import CheckpointError, ConfigError
from kakusan.models.layers import sinusoidal
from kakusan.samplers import sample_ddim
from kakusan.schedules import NoiseLevels, make_schedule, noise_levels, timesteps
from kakusan.testing import GaussianMixture, MixtureConsistency, MixtureDenoiser, exact_endpoint
from kakusan.checkpoints import apply_checkpoint_lora, load_denoiser
from kakusan.training import Trainer, TrainConfig
from safetensors.torch import load_file

MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.0, 1.0]]), torch.tensor([0.3, 0.4]), torch.tensor([0.4, 0.6]))


def test_boundary_condition_and_grid():
    c_skip, c_out = boundary_coefficients(torch.tensor([0.0, 1.0, 20.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    # c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2), sd = 0.5
    assert torch.allclose(c_skip[1], torch.tensor(0.25 / 100.25, dtype=torch.float64))
    assert torch.allclose(c_out[2], torch.tensor(200 / (40000.25) ** 0.5, dtype=torch.float64))
    assert c_skip[3] < 1e-6 and abs(c_out[3] - 1) < 1e-6
    t, prev = skipping_grid(1000, 50)
    assert t[0] == 19 and t[-1] == 999 and prev[0] == 0 and torch.equal(prev[1:], t[:-1])
    assert (t[1:] - t[:-1] == 20).all()
    with pytest.raises(ValueError):
        skipping_grid(1000, 0)
    a, b = torch.zeros(2, 3), torch.tensor([[0.0, 0, 0], [3.0, 4, 0]])
    assert torch.allclose(pseudo_huber(a, b, 0.0), torch.tensor([0.0, 7 / 3]))
    assert pseudo_huber(a, b, 1.0)[1] < 7 / 3


def test_the_exact_consistency_function_is_consistent():
    """f(x_t, t) = f(x_s, s) for two points of one probability-flow ODE trajectory (the property the loss
    trains for): the oracle's f, at t = 600 and at the point a fine DDIM reaches from there at t = 300."""
    s = make_schedule("linear")
    f = MixtureConsistency(MIX, s, tol=1e-10)
    x0 = MIX.sample(64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
    a, sg = (v.item() for v in s.alpha_sigma(600))
    x_t = a * x0 + sg * eps
    lv = noise_levels(s, torch.linspace(600, 300, 401, dtype=torch.float64))
    lv = NoiseLevels(lv.t[:-1], lv.alpha[:-1], lv.sigma[:-1])  # end at t = 300, not at the clean level
    x_mid = sample_ddim(MixtureDenoiser(MIX, s), x_t, lv)
    end_a = f(x_t, torch.full((64,), 600.0))
    end_b = f(x_mid, torch.full((64,), 300.0))
    assert (end_a - end_b).abs().max() < 2e-3


class _MLP(torch.nn.Module):
    """A small backbone (x_t, t) -> x0 for points in 2-D."""

    def __init__(self, hidden=128):
        super().__init__()
        self.t = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.SiLU())
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, self.t(sinusoidal(t, 64).to(x.dtype))], 1))


def test_distillation_on_the_oracle_samples_in_one_step_what_ddim_needs_four_for():
    """Teacher: the mixture's exact denoiser; student: a fresh MLP; 1,000 steps of the consistency loss (a
    20-point grid). Its one-step output is compared with the exact ODE endpoints of 512 new starts."""
    torch.manual_seed(0)
    s = make_schedule("linear")
    teacher = MixtureDenoiser(MIX, s)
    net = _MLP().double()
    student = ConsistencyDenoiser(Denoiser(net, s, DiffusionConfig("x0")))
    target = copy.deepcopy(student).requires_grad_(False)
    grid = skipping_grid(1000, 20)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1000):
        x0 = MIX.sample(256, generator=g)
        n = torch.randint(0, 20, (256,), generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        loss = distillation_loss(student, target, teacher, s, x0, None, n, eps, grid, 0.001).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 0.05)
    a0, s0 = (v.item() for v in s.alpha_sigma(999))
    a1, s1 = (v.item() for v in s.alpha_sigma(0))
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * s0
    ref = exact_endpoint(MIX, x_T, a0, s0, a1, s1, rtol=1e-9, atol=1e-9)
    rmse = lambda out: (out - ref).pow(2).mean().sqrt().item()  # noqa: E731
    with torch.no_grad():
        one = rmse(target(x_T, torch.full((512,), 999.0)))
    ddim = {k: rmse(sample_ddim(teacher, x_T, noise_levels(s, timesteps(s, k, "trailing")))) for k in (1, 2, 4)}
    # measured: one step 0.32; DDIM with the exact denoiser 0.99 / 0.69 / 0.34 in 1 / 2 / 4 steps
    assert one < 0.5 * ddim[1] and one < ddim[2] and one < 1.2 * ddim[4], (one, ddim)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    ds = load_digits()
    ds.images, ds.labels = ds.images[:200], ds.labels[:200]
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = TrainConfig(out=str(out), preset="unet-tiny", cond="class", batch_size=16, steps=20, log_every=5,
                      sample_every=1000, checkpoint_every=1000, progress=False, warmup_steps=5, lr=1e-3,
                      sample_steps=4)
    return Trainer(cfg, ds).fit(), ds


def _distill_cfg(out, teacher, **kw):
    base = dict(preset="unet-tiny", cond="class", batch_size=16, log_every=5, sample_every=1000,
                checkpoint_every=1000, progress=False, warmup_steps=0, lr=1e-4, init_from=str(teacher),
                distill=True, distill_guidance=2.0, distill_points=10)
    return TrainConfig(out=str(out), **{**base, **kw})


def test_distillation_through_the_trainer_resumes_exactly_and_samples_with_lcm(tmp_path, teacher_run):
    teacher, ds = teacher_run
    full = Trainer(_distill_cfg(tmp_path / "full", teacher, steps=10, sample_every=10), ds).fit()
    config = json.loads((full / "config.json").read_text())
    assert config["consistency"]["guidance"] == 2.0 and config["init_from"]["path"] == str(teacher)
    assert (tmp_path / "full" / "samples" / "step-00000010.png").is_file()  # the grid, sampled with lcm
    log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in log)
    den, _ = load_denoiser(full)
    assert isinstance(den, ConsistencyDenoiser)
    Trainer(_distill_cfg(tmp_path / "cut", teacher, steps=5), ds).fit()
    tr = Trainer(_distill_cfg(tmp_path / "cut", teacher, steps=10), ds)
    tr.resume()
    cut = tr.fit()
    for f in ("model.safetensors", "ema.safetensors", "target.safetensors", "optimizer.safetensors"):
        a, b = load_file(full / f), load_file(cut / f)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((full / "state.json").read_text())["generator"] == json.loads((cut / "state.json").read_text())["generator"]


def test_distillation_cli_and_mistakes(tmp_path, teacher_run, capsys):
    teacher, _ = teacher_run
    run = tmp_path / "lcm"
    assert main(["train", "--data", "digits", "--limit", "200", "--init-from", str(teacher), "--distill",
                 "--distill-guidance", "2", "--distill-points", "10", "--cond", "class", "--steps", "3",
                 "--batch-size", "8", "--log-every", "3", "--sample-every", "100", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "-n", "2", "--class", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert "lcm, 4 steps (4 model evaluations)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs its teacher"):
        TrainConfig(distill=True)
    with pytest.raises(ConfigError, match="distill_guidance"):
        TrainConfig(init_from=str(teacher), distill_guidance=2.0)
    with pytest.raises(ConfigError, match="distill_points"):
        TrainConfig(init_from=str(teacher), distill=True, distill_points=0)
    with pytest.raises(CheckpointError, match="a distilled consistency model"):
        Trainer(_distill_cfg(tmp_path / "again", run, steps=2))


def test_lcm_lora_distils_into_adapters(tmp_path, teacher_run):
    """--distill with --lora-rank: the student is the frozen teacher plus adapters; its checkpoint loads as a
    consistency model with the adapters merged, and the adapter file alone holds what changed."""
    pytest.importorskip("peft")
    teacher, ds = teacher_run
    ckpt = Trainer(_distill_cfg(tmp_path / "lcm-lora", teacher, steps=4, lora_rank=2, lr=1e-3), ds).fit()
    config = json.loads((ckpt / "config.json").read_text())
    assert "consistency" in config and config["lora"]["rank"] == 2
    assert (ckpt / "lora.safetensors").is_file() and (ckpt / "target.safetensors").is_file()
    den, _ = load_denoiser(ckpt)
    assert isinstance(den, ConsistencyDenoiser) and not any(".lora_" in k for k in den.backbone.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = den(x, torch.tensor([999.0, 999.0]), torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the teacher's weights stay frozen, bitwise, under the adapters (in the trained and the EMA weights)
    base_w = load_file(teacher / "ema.safetensors")  # the weights init_from starts from
    for f in ("model.safetensors", "ema.safetensors"):
        run_w = load_file(ckpt / f)
        # an adapted layer keeps its weight as <layer>.base_layer.weight
        names = {k: k if k in run_w else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
                 for k in base_w}
        assert set(names.values()) == {k for k in run_w if ".lora_" not in k}, f
        assert any(k != v for k, v in names.items())  # some layers were adapted
        for k, v in base_w.items():
            assert torch.equal(run_w[names[k]], v), (f, k)
    # the adapters learned (lora_B starts at zero), and they alone make the student: teacher + adapter file
    adapter = load_file(ckpt / "lora.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)
    teacher_den, _ = load_denoiser(teacher)
    applied = apply_checkpoint_lora(load_denoiser(teacher)[0], teacher, ckpt / "lora.safetensors")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([50.0, 300.0, 600.0, 999.0]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        student, base = den.backbone(x, t, y), teacher_den.backbone(x, t, y)
        assert torch.allclose(applied.backbone(x, t, y), student, atol=1e-5)
    # not the teacher: measured 1.6e-3 after the 4 steps (float round-off would be ~1e-7)
    assert (student - base).abs().max() > 2e-4, (student - base).abs().max()
