"""Post-hoc EMA: gamma <-> sigma_rel, the tracker against its continuous profile, the least-squares reconstruction
(tracked profiles exactly, untracked ones closely), the trainer's snapshots and exact resume, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kakusan.errors import ConfigError
from kakusan.training import Trainer, TrainConfig
from kakusan.training.posthoc_ema import (SIGMA_REL_MAX, PowerEMA, beta, combine_snapshots, gamma_of_sigma_rel,
                                          list_snapshots, profile_inner, reconstruct, reconstruction_coefficients,
                                          sigma_rel_of_gamma)

from test_training import TINY, _run


# ---- gamma <-> sigma_rel -----------------------------------------------------------------------------------------

def test_sigma_rel_is_the_profile_std_and_round_trips():
    # sigma_rel from the density itself, by quadrature: std of (g+1) tau^g on [0, 1]
    tau = (np.arange(200_000) + 0.5) / 200_000
    for g in (0.0, 1.0, 6.94, 16.97):
        p = (g + 1) * tau ** g / len(tau)
        mean = (p * tau).sum()
        assert math.sqrt((p * (tau - mean) ** 2).sum()) == pytest.approx(sigma_rel_of_gamma(g), rel=1e-6)
    # gamma = 0 is the running mean (std of U(0, 1)); the paper's pair: gamma 6.94 ~ sigma_rel 0.10, 16.97 ~ 0.05
    assert sigma_rel_of_gamma(0) == pytest.approx(1 / math.sqrt(12), rel=1e-15)
    assert sigma_rel_of_gamma(6.94) == pytest.approx(0.10, abs=1e-4)
    assert sigma_rel_of_gamma(16.97) == pytest.approx(0.05, abs=1e-4)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    for g in (0.0, 1e-6, 0.3, 2.0, 6.94, 50.0, 1e3, 1e5):
        assert gamma_of_sigma_rel(sigma_rel_of_gamma(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    for s in (1e-5, 0.01, 0.05, 0.1, 0.15, 0.2, 0.28, SIGMA_REL_MAX):
        g = gamma_of_sigma_rel(s)
        assert g >= 0 and sigma_rel_of_gamma(g) == pytest.approx(s, rel=1e-12)
        s2 = s * s  # the root solves the cubic
        assert s2 * g ** 3 + 7 * s2 * g ** 2 + (16 * s2 - 1) * g + 12 * s2 - 1 == pytest.approx(0, abs=1e-9 * (1 + g))


@pytest.mark.parametrize("bad", [0, -0.1, 0.29, 0.5, float("nan"), float("inf")])
def test_sigma_rel_out_of_range_is_refused_naming_it(bad):
    with pytest.raises(ConfigError, match=f"sigma_rel {bad!r}"):
        gamma_of_sigma_rel(bad)
    with pytest.raises(ConfigError, match="posthoc_ema"):
        TrainConfig(posthoc_ema=(0.05, bad))


def test_train_config_posthoc_fields():
    assert TrainConfig(posthoc_ema=[0.05, 0.1]).posthoc_ema == (0.05, 0.1)
    assert TrainConfig.from_dict(TrainConfig(posthoc_ema=(0.05,)).to_dict()).posthoc_ema == (0.05,)
    with pytest.raises(ConfigError, match="posthoc_every"):
        TrainConfig(posthoc_ema=(0.05,), posthoc_every=0)
    with pytest.raises(ConfigError, match="three decimals"):
        TrainConfig(posthoc_ema=(0.1, 0.1001))


# ---- the discrete tracker against the continuous profile ---------------------------------------------------------

def test_discrete_weights_follow_the_continuous_profile():
    """The weight of step k in the EMA at step t, (1 - beta_k) prod_{j>k} beta_j from the betas, is the profile's
    mass on [k-1, k] and, for a long run, its density at k - 1/2; the tracker's float32 lerps give the same."""
    t = 5000
    for s in (0.05, 0.10, 0.2):
        g = gamma_of_sigma_rel(s)
        b = np.array([beta(k, g) for k in range(1, t + 1)])
        later = np.concatenate([np.cumprod(b[::-1])[::-1][1:], [1.0]])  # prod_{j=k+1..t} beta_j
        w = (1 - b) * later
        assert w.sum() == pytest.approx(1, abs=1e-12)
        k = np.arange(1, t + 1, dtype=np.float64)
        mass = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
        np.testing.assert_allclose(w, mass, rtol=1e-9, atol=1e-15)
        density = (g + 1) * (k - 0.5) ** g / t ** (g + 1)
        assert np.abs(w - density).max() < 1e-3 * density.max()

    # the tracker on weights theta_k = e_k (one-hot): its average is the weight vector itself
    t, g = 400, gamma_of_sigma_rel(0.1)
    net = torch.nn.Linear(t, 1, bias=False)
    tracker = PowerEMA(net, (0.1,))
    for step in range(1, t + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, step - 1] = 1.0
        tracker.update(net)
    k = np.arange(1, t + 1, dtype=np.float64)
    expect = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
    np.testing.assert_allclose(tracker.averages[0][0][0].double().numpy(), expect, atol=2e-7)


# ---- the reconstruction ------------------------------------------------------------------------------------------

def _toy_run(tmp_path, sigma_rels, steps=1000, every=100, dim=64, seed=0):
    """A 'model' whose weights drift with noise; snapshots every ``every`` steps; the weights of every step."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(dim, 1)
    drift = torch.randn(dim + 1, generator=gen)
    tracker = PowerEMA(net, sigma_rels)
    config = {"model": {"type": "toy"}, "train": {}}  # what reconstruct reads of a run: its config
    (tmp_path / "config.json").write_text(json.dumps(config))
    history = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            w = torch.sin(step / steps * 3 + drift) * (1 + step / steps) + 0.3 * torch.randn(dim + 1, generator=gen)
            net.weight.copy_(w[:dim][None])
            net.bias.copy_(w[dim:])
        history.append(w.clone())
        tracker.update(net)
        if step % every == 0:
            tracker.save_snapshots(net, tmp_path, step * 4)
    return net, tracker, torch.stack(history)


def _direct_ema(history, sigma_rel):
    net = torch.nn.Linear(history.shape[1] - 1, 1)
    tracker = PowerEMA(net, (sigma_rel,))
    for w in history:
        with torch.no_grad():
            net.weight.copy_(w[:-1][None])
            net.bias.copy_(w[-1:])
        tracker.update(net)
    return torch.cat([tracker.averages[0][0].flatten(), tracker.averages[0][1]])


def _flat(weights):
    return torch.cat([weights["weight"].flatten(), weights["bias"]]).double()


def test_reconstructing_a_tracked_profile_gives_it_back(tmp_path):
    net, tracker, _ = _toy_run(tmp_path, (0.05, 0.10))
    snaps = list_snapshots(tmp_path)
    assert len(snaps) == 20 and snaps[-1].step == 1000 and {s.sigma_rel for s in snaps} == {0.05, 0.10}
    for target in (snaps[-1], snaps[-2], snaps[9]):  # the last of each profile, and one at step 500
        use = [s for s in snaps if s.step <= target.step]
        x, err = reconstruction_coefficients([s.step for s in use], [s.gamma for s in use], target.step,
                                             target.gamma)
        unit = np.array([float(s is target) for s in use])
        np.testing.assert_allclose(x, unit, atol=1e-9)
        assert err < 1e-6
        rebuilt = combine_snapshots([s.path for s in use], x)
        tracked = load_file(target.path)
        assert rebuilt.keys() == tracked.keys()
        for k in tracked:
            torch.testing.assert_close(rebuilt[k], tracked[k], rtol=1e-6, atol=1e-6)
    weights, record, _ = reconstruct(tmp_path, 0.10)
    torch.testing.assert_close(weights["weight"], tracker.averages[1][0], rtol=1e-6, atol=1e-6)


def test_an_untracked_width_is_reconstructed_closer_than_the_nearest_tracked_one(tmp_path):
    _, _, history = _toy_run(tmp_path, (0.05, 0.15), steps=2000, every=100)
    for want, nearest in ((0.10, 0.15), (0.08, 0.05), (0.12, 0.15)):
        direct = _direct_ema(history, want).double()
        rebuilt, record, _ = reconstruct(tmp_path, want)
        err = (_flat(rebuilt) - direct).norm() / direct.norm()
        near = (_direct_ema(history, nearest).double() - direct).norm() / direct.norm()
        assert err < 0.1 * near, (want, err.item(), near.item())
        assert record["fit_error"] < 0.05 and len(record["snapshots"]) == 40
    # an earlier end: only the snapshots up to that step are used
    rebuilt, record, _ = reconstruct(tmp_path, 0.10, step=1000)
    assert max(s["step"] for s in record["snapshots"]) == 1000
    direct = _direct_ema(history[:1000], 0.10).double()
    assert (_flat(rebuilt) - direct).norm() / direct.norm() < 0.02
    with pytest.raises(ConfigError, match="reach step 2,000"):
        reconstruct(tmp_path, 0.10, step=2001)


def test_coefficients_sum_to_one_and_a_poor_fit_is_warned(tmp_path):
    """sum x = 1 (a constraint of the fit: unconstrained, 0.25 from (0.05, 0.10) every 500 steps to 20k summed to
    0.9959); a target the snapshots cannot fit (a step between snapshots, a width far outside) is warned about."""
    grid = range(500, 20_001, 500)
    steps = [s for s in grid for _ in range(2)]
    gammas = [gamma_of_sigma_rel(r) for _ in grid for r in (0.05, 0.10)]
    for target in (0.25, 0.2, 0.07, 0.05, 0.02):
        x, err = reconstruction_coefficients(steps, gammas, 20_000, gamma_of_sigma_rel(target))
        assert x.sum() == pytest.approx(1.0, abs=1e-9), target
    _toy_run(tmp_path, (0.05, 0.10))  # snapshots every 100 steps to 1000
    for sigma_rel, step in ((0.10, 550), (0.28, 1000)):
        with pytest.warns(UserWarning, match=f"sigma_rel {sigma_rel:g} at step {step:,}: .* fit its profile poorly"):
            _, record, _ = reconstruct(tmp_path, sigma_rel, step=step)
        assert record["fit_error"] > 0.05
        assert sum(s["coefficient"] for s in record["snapshots"]) == pytest.approx(1.0, abs=1e-9)


def test_profile_inner_products_are_the_integrals():
    tau = (np.arange(400_000) + 0.5) / 400_000 * 3.0
    d = tau[1] - tau[0]
    for (ta, ga), (tb, gb) in (((3.0, 6.94), (2.0, 16.97)), ((1.0, 0.0), (3.0, 2.5)), ((2.5, 40.0), (2.5, 40.0))):
        pa = np.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0)
        pb = np.where(tau <= tb, (gb + 1) * tau ** gb / tb ** (gb + 1), 0)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx((pa * pb).sum() * d, rel=1e-4)
    assert np.isfinite(profile_inner(1e6, 5000.0, 9e5, 8000.0))  # no overflow at large steps and exponents


# ---- in training ---------------------------------------------------------------------------------------------------

POSTHOC = dict(posthoc_ema=(0.05, 0.15), posthoc_every=4)


@pytest.mark.filterwarnings("ignore:post-hoc EMA sigma_rel 0.07")  # (three snapshots: a loose fit, the same in both)
def test_training_snapshots_and_resume_are_exact(tmp_path, digits, capsys):
    """12 steps straight == 6 steps (stopped there: an extra last-step snapshot at 6), resumed to 10 (snapshots 8,
    10), then resumed again from the checkpoint at step 6 to 12: the abandoned trajectory's snapshots (8, 10) and
    the extra one at 6 are moved aside, the trackers in the checkpoint and the snapshots bitwise equal the straight
    run's, and so is a reconstruction from them. The run id: one per run, kept by each resume."""
    kw = dict(steps=12, cond="class", **POSTHOC)
    _, full = _run(tmp_path, digits, "full", **kw)
    assert "post-hoc EMA: sigma_rel 0.05, 0.15" in capsys.readouterr().out
    _run(tmp_path, digits, "split", **{**kw, "steps": 6, "checkpoint_every": 6})
    snapdir = tmp_path / "split" / "posthoc-ema"
    assert {s.step: s.regular for s in list_snapshots(tmp_path / "split")} == {4: True, 6: False}
    tr = Trainer(TrainConfig(out=str(tmp_path / "split"), **{**TINY, **kw, "steps": 10, "checkpoint_every": 6}),
                 digits)
    tr.resume()
    run_id = tr.posthoc.run_id
    tr.fit()
    out = capsys.readouterr().out
    assert "2 snapshot(s) not of this run's trajectory up to step 6" in out and "abandoned-" in out
    assert sorted({s.step for s in list_snapshots(tmp_path / "split")}) == [4, 8, 10]
    tr = Trainer(TrainConfig(out=str(tmp_path / "split"), **{**TINY, **kw, "checkpoint_every": 6}), digits)
    tr.resume(tmp_path / "split" / "checkpoints" / "step-00000006")  # an earlier checkpoint: 8, 10 abandoned
    assert tr.posthoc.step == 6 and tr.posthoc.run_id == run_id
    tr.fit()
    assert "4 snapshot(s) not of this run's trajectory up to step 6" in capsys.readouterr().out
    aside = sorted(p.name for p in snapdir.glob("abandoned-*/*.safetensors"))
    assert aside == sorted(f"step-{s:08d}-sr{r}.safetensors" for s in (6, 8, 10) for r in ("0.050", "0.150"))
    split = tmp_path / "split" / "checkpoints" / "step-00000012"
    a, b = load_file(full / "posthoc_ema.safetensors"), load_file(split / "posthoc_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (tmp_path / "full" / "posthoc-ema").glob("*.safetensors"))
    assert names == [f"step-{s:08d}-sr{r}.safetensors" for s in (4, 8, 12) for r in ("0.050", "0.150")]
    assert names == sorted(p.name for p in snapdir.glob("*.safetensors"))
    for name in names:
        x, y = load_file(tmp_path / "full" / "posthoc-ema" / name), load_file(snapdir / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    # the same reconstruction of an untracked width from either run
    wa, ra, _ = reconstruct(tmp_path / "full", 0.07)
    wb, rb, _ = reconstruct(tmp_path / "split", 0.07)
    assert [s["file"] for s in ra["snapshots"]] == [s["file"] for s in rb["snapshots"]]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run id: in each snapshot and the checkpoint's state; the split run's one id throughout, not the full one's
    with safe_open(str(split / "posthoc_ema.safetensors"), "pt") as f:
        assert f.metadata()["run_id"] == run_id
    assert {s.run_id for s in list_snapshots(tmp_path / "split")} == {run_id} == {rb["run_id"]}
    assert {s.run_id for s in list_snapshots(tmp_path / "full")} == {ra["run_id"]} != {run_id}
    with safe_open(str(tmp_path / "full" / "posthoc-ema" / names[-1]), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "12" and float(meta["sigma_rel"]) == 0.15 and meta["images_seen"] == str(12 * 16)
    assert float(meta["gamma"]) == pytest.approx(gamma_of_sigma_rel(0.15))
    # the last step's snapshot holds the tracker's weights, over the model's state dict keys
    snap = load_file(tmp_path / "full" / "posthoc-ema" / names[-1])
    assert snap.keys() == load_file(full / "ema.safetensors").keys()
    assert torch.equal(snap[tr.posthoc.names[0]], a[f"profile1.{tr.posthoc.names[0]}"])
    # a fresh run in the folder sets all of the old run's snapshots aside
    _run(tmp_path, digits, "split", **{**kw, "steps": 4})
    assert "6 snapshot(s) not of this run's trajectory up to step 0" in capsys.readouterr().out
    assert [s.step for s in list_snapshots(tmp_path / "split")] == [4, 4]


def test_reconstruct_cli_writes_a_checkpoint_that_loads(tmp_path, digits, capsys):
    from kakusan.checkpoints import load_denoiser
    from kakusan.cli import main
    from kakusan.pipeline import Pipeline

    run = tmp_path / "run"
    _run(tmp_path, digits, "run", steps=10, cond="class", **POSTHOC)
    assert main(["ema", "list", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "sigma_rel 0.05" in out and "sigma_rel 0.15" in out and "6 snapshots" in out
    dest = tmp_path / "sr0.1"
    assert main(["ema", "reconstruct", "--run", str(run), "--sigma-rel", "0.1", "--out", str(dest)]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    ckpt = dest / "step-00000010"
    config = json.loads((ckpt / "config.json").read_text())
    rec = config["ema_reconstruction"]
    assert rec["sigma_rel"] == 0.1 and rec["step"] == 10 and len(rec["snapshots"]) == 6
    assert config["model"] == json.loads((run / "config.json").read_text())["model"]
    pipe = Pipeline.load(dest, device="cpu")
    images = pipe(class_label=[1, 2], steps=2, seed=0).images
    assert images.shape[0] == 2
    den, _ = load_denoiser(dest)
    assert den is not None
    # a tracked width at its last step gives back the snapshot
    assert main(["ema", "reconstruct", "--run", str(run), "--sigma-rel", "0.15", "--step", "8"]) == 0
    got = load_file(run / "posthoc-ema" / "sr0.150" / "step-00000008" / "ema.safetensors")
    want = load_file(run / "posthoc-ema" / "step-00000008-sr0.150.safetensors")
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6) for k in want)


def test_no_snapshots_is_one_line_naming_the_flag(tmp_path, digits, capsys):
    from kakusan.cli import main

    _run(tmp_path, digits, "plain", steps=2)
    for argv in (["ema", "reconstruct", "--run", str(tmp_path / "plain"), "--sigma-rel", "0.1"],
                 ["ema", "list", "--run", str(tmp_path / "plain")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--posthoc-ema" in err, err
    _run(tmp_path, digits, "tracked", steps=2, **POSTHOC)
    assert main(["ema", "reconstruct", "--run", str(tmp_path / "tracked"), "--sigma-rel", "0.4"]) == 2
    assert "sigma_rel 0.4 is outside" in capsys.readouterr().err


def test_sweep_scores_each_reconstructed_width(tmp_path, digits, capsys):
    from kakusan.cli import main
    from kakusan.metrics.classifier import train_classifier

    run, cls, out = tmp_path / "run", tmp_path / "cls.safetensors", tmp_path / "sweep"
    _run(tmp_path, digits, "run", steps=8, cond="class", **POSTHOC)
    train_classifier("digits", cls, epochs=1, widths=(8, 16, 24), batch_size=16, limit=320, progress=False)
    assert main(["sweep", "--checkpoint", str(run), "--ema", "0.05,0.1", "--samplers", "ddim", "--steps", "2",
                 "-n", "40", "--extractor", f"classifier:{cls}", "--ref", "digits", "--ref-limit", "200",
                 "--out", str(out)]) == 0
    assert "sigma_rel" in capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.1]
    assert all(r["fid"] > 0 and r["ema_reconstruction"]["step"] == 8 for r in rows)
    assert rows[1]["result"]["record"]["samples"]["checkpoint"].startswith(str(out / "ema-sr0.100"))
    assert (out / "sweep.png").is_file()
    assert main(["sweep", "--checkpoint", str(run), "--ema", "0.3", "--extractor", f"classifier:{cls}",
                 "--ref", "digits"]) == 2
    assert "sigma_rel 0.3 is outside" in capsys.readouterr().err
