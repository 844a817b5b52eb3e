"""Sampler accuracy against an exact-score oracle: kakusan's samplers and diffusers' schedulers, driven by the same
analytic Gaussian-mixture denoiser from the same starts, scored by RMSE to the exact probability-flow ODE endpoint
(scipy DOP853, tight tolerances; `kakusan.testing.exact_endpoint`). Float64 throughout.

Next to the RMSE over all starts, two figures show where it comes from: the median over starts of each start's
RMS error (the typical start), and the number of starts that end in another mixture component than the exact
endpoint ("flips": a start near the boundary between two modes sent the wrong way; each adds an error of the order
of the distance between the modes, and a few of them decide the RMSE).

Each diffusers scheduler is swept over its spacing options and reported at its best per NFE; kakusan's samplers
likewise, and its recommended default (what `kakusan sample` uses without --sampler/--spacing) separately.

Flips are rare events (a few per thousand starts), so the ratio default / best diffusers comes with two checks
on its noise: a 90% bootstrap interval (starts resampled, both configurations held fixed), and a held-out ratio,
where the best diffusers configuration is chosen on the first half of the starts and both are scored on the
second half (choosing the best of ~50 configurations on the same starts it is scored on flatters it).

    python benchmarks/sampler_accuracy.py                 # table + benchmarks/results/sampler_accuracy.json
    python benchmarks/sampler_accuracy.py --quick         # fewer mixtures and starts
    python benchmarks/sampler_accuracy.py --starts 512    # faster, noisier (the default is 4,096 starts)
    python benchmarks/sampler_accuracy.py --summary benchmarks/results/sampler_accuracy.json   # re-print a run

Next to the default, each table shows the best kakusan configuration per cell chosen after the fact (any
sampler x spacing): no single default among kakusan's configurations can do better than that line, so where it
is above 0.5 the figure of issue #3 is out of reach for every default these solvers and grids offer. The fewest
flips per library show whether one solver family resolves mode boundaries better than the other.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.samplers import DEFAULT_GRIDS, DEFAULT_SAMPLER, SAMPLERS, get_sampler, sampling_plan  # noqa: E402
from kakusan.schedules import make_schedule, noise_levels, timesteps  # noqa: E402
from kakusan.testing import GaussianMixture, MixtureDenoiser, exact_endpoint  # noqa: E402

NFES = (5, 10, 20, 50)
DEFAULT_LABEL = "default grid"  # the default sampler on the grid samplers.DEFAULT_GRIDS picks for each NFE


def mixtures(quick: bool) -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(1234)
    out = {
        # 16-D, 4 narrow components (stiff at the end of sampling)
        "d16-k4-narrow": GaussianMixture(torch.randn(4, 16, generator=g), torch.full((4,), 0.1)),
        # 16-D, 8 components of mixed widths and weights
        "d16-k8-mixed": GaussianMixture(torch.randn(8, 16, generator=g) * 1.2,
                                        torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.05, 0.15, 0.4]),
                                        torch.rand(8, generator=g) + 0.2),
    }
    if not quick:
        # 64-D, 10 components, moderately wide
        out["d64-k10"] = GaussianMixture(torch.randn(10, 64, generator=g) * 0.5, torch.full((10,), 0.3))
        # 2-D, 2 very narrow components far apart
        out["d2-k2-verynarrow"] = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.02, 0.03]))
    return out


KAKUSAN_SPACINGS = ("logsnr", "karras", "linspace", "trailing", "logsnr@10", "karras@10")  # @: sigma_max cap


def kakusan_runs(mix, schedule, x_T):
    """{(sampler, spacing): {nfe: output}} for every deterministic kakusan sampler."""
    den = MixtureDenoiser(mix, schedule)
    out = {}
    for name, info in SAMPLERS.items():
        if info.stochastic or name == "euler":  # 'euler' is the DDIM update
            continue
        for sp in KAKUSAN_SPACINGS:
            res = {}
            for nfe in NFES:
                steps = (nfe + 1) // 2 if info.nfe_per_step == 2 else nfe
                name_sp, _, cap = sp.partition("@")
                try:
                    lv = noise_levels(schedule, timesteps(schedule, steps, name_sp,
                                                          sigma_max=float(cap) if cap else None))
                except Exception:
                    continue
                kw = {"schedule": schedule} if info.needs_schedule else {}
                res[nfe] = info.fn(den, x_T, lv, **kw)
            out[(name, sp)] = res
    # the default: its grid chosen per NFE by samplers.DEFAULT_GRIDS
    info = get_sampler(DEFAULT_SAMPLER)
    plans = {nfe: sampling_plan(schedule, DEFAULT_SAMPLER, nfe) for nfe in NFES}
    out[(DEFAULT_SAMPLER, DEFAULT_LABEL)] = {nfe: info.fn(den, x_T, lv, **grid.options())
                                             for nfe, (grid, lv) in plans.items()}
    return out


# ---- diffusers ----------------------------------------------------------------------------------------------


def diffusers_configs(beta_schedule: str, betas: torch.Tensor):
    import diffusers as D

    base = dict(num_train_timesteps=1000, trained_betas=betas.numpy(), prediction_type="epsilon")
    spacing = [{"timestep_spacing": s} for s in ("linspace", "leading", "trailing")]
    sigma_opts = spacing + [{"use_karras_sigmas": True}]
    cfgs = []
    cfgs += [("DDIM", D.DDIMScheduler, {**base, "set_alpha_to_one": True, "clip_sample": False, **o}) for o in spacing]
    for order in (2, 3):
        for o in sigma_opts + [{"use_lu_lambdas": True}]:
            cfgs.append((f"DPM++{order}M", D.DPMSolverMultistepScheduler,
                         {**base, "solver_order": order, "algorithm_type": "dpmsolver++", **o}))
        for o in sigma_opts:
            cfgs.append((f"UniPC-{order}", D.UniPCMultistepScheduler, {**base, "solver_order": order, **o}))
    cfgs += [("DEIS-3", D.DEISMultistepScheduler, {**base, "solver_order": 3, **o}) for o in sigma_opts]
    cfgs += [("Euler", D.EulerDiscreteScheduler, {**base, **o}) for o in sigma_opts]
    cfgs += [("Heun", D.HeunDiscreteScheduler, {**base, **o}) for o in sigma_opts]
    return cfgs


def run_diffusers(cls, kwargs, mix, nfe, x_T, alphas_cumprod):
    """Drive a diffusers scheduler with the exact eps at the noise level it is at. Returns the output or None."""
    sched = cls(**kwargs)
    steps = (nfe + 1) // 2 if cls.__name__.startswith("Heun") else nfe
    sched.set_timesteps(steps)
    sigmas = getattr(sched, "sigmas", None)
    x = x_T.clone() * (float(sched.init_noise_sigma) / _vp_sigma0(sched, alphas_cumprod))
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        if sigmas is not None and len(sigmas) > 1:
            idx = sched.step_index if getattr(sched, "step_index", None) is not None else i
            st = float(sigmas[idx])
            a = 1.0 / math.sqrt(1.0 + st * st)
            s = st * a
        else:
            ab = float(alphas_cumprod[int(t)])
            a, s = math.sqrt(ab), math.sqrt(1 - ab)
        x0 = mix.denoise(x_in, a, s)
        eps = (x_in - a * x0) / s
        x = sched.step(eps, t, x).prev_sample
    return x


def _vp_sigma0(sched, alphas_cumprod) -> float:
    """The VP sigma of the first noise level (our x_T is scaled to it); schedulers that start from VE noise
    (init_noise_sigma > 1) get x_T / sigma_VP * init_noise_sigma."""
    if float(sched.init_noise_sigma) == 1.0:
        return 1.0
    st = float(sched.sigmas[0])
    return st / math.sqrt(1 + st * st)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--starts", type=int, default=4096)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "sampler_accuracy.json"))
    p.add_argument("--summary", metavar="JSON", help="print the tables of a stored run and exit (runs nothing)")
    args = p.parse_args()
    if args.summary:
        summarize(Path(args.summary))
        return
    try:
        import diffusers
    except ImportError:
        diffusers = None
        print("diffusers is not installed: kakusan only (pip install 'kakusan[bench]')", file=sys.stderr)

    default_name, default_spacing = DEFAULT_SAMPLER, DEFAULT_LABEL
    results, t0 = [], time.time()
    for sched_name in ("linear", "cosine"):
        schedule = make_schedule(sched_name)
        ab = schedule.alpha_bar
        a0, s0 = (v.item() for v in schedule.alpha_sigma(999))
        a1, s1 = (v.item() for v in schedule.alpha_sigma(0))
        for mix_name, mix in mixtures(args.quick).items():
            g = torch.Generator().manual_seed(7)
            n = 16 if args.quick else args.starts
            x_T = torch.randn(n, mix.dim, generator=g, dtype=torch.float64) * s0  # x_T ~ N(0, sigma_T^2)
            ref = exact_endpoint(mix, x_T, a0, s0, a1, s1)
            ref_k = mix.component(ref)
            rmse = lambda out: (out - ref).pow(2).mean().sqrt().item()  # noqa: E731
            rows, extra = {}, {}  # extra[key][nfe] = (median per-start error, flips)
            sq = {}  # sq[key][nfe]: per-start squared error, for the bootstrap and the held-out ratio

            def score(key, nfe, out):
                ok = bool(torch.isfinite(out).all())
                per_start = (out - ref).pow(2).mean(1).sqrt()
                sq.setdefault(key, {})[nfe] = per_start.pow(2) if ok else None
                extra.setdefault(key, {})[nfe] = ((per_start.median().item(), int((mix.component(out) != ref_k).sum()))
                                                  if ok else (float("inf"), len(out)))
                return rmse(out) if ok else float("inf")

            for (name, sp), outs in kakusan_runs(mix, schedule, x_T).items():
                rows[("kakusan", name, sp)] = {nfe: score(("kakusan", name, sp), nfe, o) for nfe, o in outs.items()}
            if diffusers is not None:
                betas = schedule.betas.to(torch.float32)
                for label, cls, kw in diffusers_configs(sched_name, betas):
                    opt = next(f"{k}={v}" for k, v in kw.items() if k in ("timestep_spacing", "use_karras_sigmas",
                                                                          "use_lu_lambdas"))
                    res = {}
                    for nfe in NFES:
                        try:
                            out = run_diffusers(cls, kw, mix, nfe, x_T, ab)
                            res[nfe] = score(("diffusers", label, opt), nfe, out)
                        except Exception as e:  # a configuration diffusers refuses
                            res[nfe] = float("nan")
                            print(f"  {label} {opt} nfe {nfe}: {type(e).__name__}: {e}", file=sys.stderr)
                    rows[("diffusers", label, opt)] = res
            default_key = ("kakusan", default_name, default_spacing)
            noise = {nfe: _ratio_noise(sq, default_key, nfe) for nfe in NFES}
            results.append({"schedule": sched_name, "mixture": mix_name,
                            "starts": n,
                            "default_vs_best_diffusers": {str(nfe): v for nfe, v in noise.items() if v},
                            "rows": [{"library": k[0], "sampler": k[1], "spacing": k[2],
                                      "rmse": {str(n): v for n, v in r.items()},
                                      "median": {str(n): e[0] for n, e in extra.get(k, {}).items()},
                                      "flips": {str(n): e[1] for n, e in extra.get(k, {}).items()}}
                                     for k, r in rows.items()]})
            _print_table(sched_name, mix_name, rows, extra, default_name, default_spacing, noise)
    meta = {"benchmark": "sampler_accuracy", "nfe": NFES, "default": [default_name, default_spacing],
            "default_grids": [[most, row] for most, row in DEFAULT_GRIDS],
            "torch": torch.__version__, "diffusers": getattr(diffusers, "__version__", None),
            "seconds": time.time() - t0}
    _print_figures(results, default_name, default_spacing)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=1))
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)")


def summarize(path: Path) -> None:
    """Re-print the tables of a run from its JSON (rows, medians, flips and the ratio checks as stored)."""
    if not path.is_file():
        raise SystemExit(f"sampler_accuracy: no such results file: {path}")
    data = json.loads(path.read_text())
    if data.get("benchmark") != "sampler_accuracy":
        raise SystemExit(f"sampler_accuracy: {path} is not a sampler_accuracy results file")
    default_name, default_spacing = data["default"]
    print(f"{path}: torch {data.get('torch')}, diffusers {data.get('diffusers')}, {data.get('seconds', 0):.0f} s")
    for cell in data["results"]:
        rows, extra = {}, {}
        for r in cell["rows"]:
            key = (r["library"], r["sampler"], r["spacing"])
            rows[key] = {int(n): (float("nan") if v is None else v) for n, v in r["rmse"].items()}
            extra[key] = {int(n): (r["median"][n], r["flips"][n]) for n in r["flips"]}
        noise = {int(n): v for n, v in cell.get("default_vs_best_diffusers", {}).items()}
        _print_table(cell["schedule"], f"{cell['mixture']} ({cell['starts']} starts)", rows, extra,
                     default_name, default_spacing, noise)
    _print_figures(data["results"], default_name, default_spacing)


def _print_figures(results, default_name, default_spacing, nfes=(5, 10, 20)):
    """Issue #22's figures over all cells: RMSE(default) <= RMSE(best diffusers, chosen after the fact) in every
    cell, and the ratio of the median per-start errors <= 0.5 in at least 18 of the 24 cells at NFE 5, 10, 20."""
    print(f"\n== the default ({default_name} / {default_spacing}) against the best diffusers configuration ==")
    print(f"{'schedule':<8} {'mixture':<18}" + "".join(f"{'NFE ' + str(n) + ': RMSE / median':>24}" for n in nfes))
    met_rmse, met_median, cells = 0, 0, 0
    for cell in results:
        rows = {(r["library"], r["sampler"], r["spacing"]): r for r in cell["rows"]}
        d = rows.get(("kakusan", default_name, default_spacing))
        line = f"{cell['schedule']:<8} {cell['mixture']:<18}"
        for n in map(str, nfes):
            cands = [r for k, r in rows.items() if k[0] == "diffusers" and r["rmse"].get(n) is not None
                     and r["rmse"][n] == r["rmse"][n]]
            if d is None or not cands or n not in d["rmse"]:
                line += f"{'-':>24}"
                continue
            b = min(cands, key=lambda r: r["rmse"][n])
            ratio, med = d["rmse"][n] / b["rmse"][n], d["median"][n] / b["median"][n]
            cells += 1
            met_rmse += ratio <= 1
            met_median += med <= 0.5
            line += f"{ratio:>16.2f} / {med:<5.2f}"
        print(line)
    print(f"RMSE <= best diffusers: {met_rmse} of {cells} cells; median ratio <= 0.5: {met_median} of {cells}")
    _print_reach(results, nfes)


def _print_reach(results, nfes):
    """What any single kakusan configuration (sampler x spacing, the default among them) reaches per NFE, over
    the same cells: a rule that picks one configuration per NFE can do no better than the best line here."""
    print("\n== the best single kakusan configuration per NFE (cells: RMSE <= best diffusers / median <= 0.5x) ==")
    for n in map(str, nfes):
        counts = {}
        for cell in results:
            rows = {(r["library"], r["sampler"], r["spacing"]): r for r in cell["rows"]}
            cands = [r for k, r in rows.items() if k[0] == "diffusers" and r["rmse"].get(n) is not None
                     and r["rmse"][n] == r["rmse"][n]]
            if not cands:
                continue
            b = min(cands, key=lambda r: r["rmse"][n])
            for k, r in rows.items():
                if k[0] != "kakusan" or r["rmse"].get(n) is None or r["median"].get(n) is None:
                    continue
                c = counts.setdefault(k[1:], [0, 0])
                c[0] += r["rmse"][n] <= b["rmse"][n]
                c[1] += r["median"][n] <= 0.5 * b["median"][n]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:3]
        print(f"NFE {n:>2}: " + "; ".join(f"{a} / {sp}: {c[0]} / {c[1]} of {len(results)}" for (a, sp), c in ranked))


def _best(rows, library, nfe):
    cands = [(r.get(nfe, float("inf")), k) for k, r in rows.items() if k[0] == library]
    cands = [(v, k) for v, k in cands if v == v]  # drop NaN
    return min(cands) if cands else (float("nan"), None)


def _ratio_noise(sq, default_key, nfe, draws: int = 1000):
    """The ratio RMSE(default) / RMSE(best diffusers) at one NFE, with a 90% bootstrap interval over the starts
    (configurations fixed) and the held-out ratio (best diffusers chosen on the first half of the starts, both
    scored on the second). None without diffusers."""
    d = sq.get(default_key, {}).get(nfe)
    cands = {k: v[nfe] for k, v in sq.items() if k[0] == "diffusers" and v.get(nfe) is not None}
    if d is None or not cands:
        return None
    best = min(cands, key=lambda k: cands[k].mean().item())
    b = cands[best]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(d), (draws, len(d)), generator=g)
    boot = (d[idx].mean(1) / b[idx].mean(1)).sqrt()
    lo, hi = torch.quantile(boot, torch.tensor([0.05, 0.95], dtype=boot.dtype)).tolist()
    half = len(d) // 2
    chosen = min(cands, key=lambda k: cands[k][:half].mean().item())
    held = (d[half:].mean() / cands[chosen][half:].mean()).sqrt().item()
    return {"ratio": (d.mean() / b.mean()).sqrt().item(), "best": list(best), "interval90": [lo, hi],
            "held_out_ratio": held, "held_out_best": list(chosen)}


def _print_table(sched_name, mix_name, rows, extra, default_name, default_spacing, noise=None):
    print(f"\n== {sched_name} schedule, mixture {mix_name}: RMSE to the exact endpoint ==")
    print(f"{'':<44}" + "".join(f"{'NFE ' + str(n):>11}" for n in NFES))
    best_per_sampler = {}
    for k, r in rows.items():
        key = (k[0], k[1])
        for n in NFES:
            v = r.get(n, float("inf"))
            if v == v and v < best_per_sampler.setdefault(key, {}).get(n, (float("inf"), ""))[0]:
                best_per_sampler[key][n] = (v, k[2])
    for (lib, name), per in best_per_sampler.items():
        print(f"{lib + ' ' + name + ' (best spacing)':<44}" +
              "".join(f"{per.get(n, (float('nan'),))[0]:>11.2e}" for n in NFES))
    d = rows.get(("kakusan", default_name, default_spacing), {})
    print(f"{'kakusan default: ' + default_name + ' / ' + default_spacing:<44}" +
          "".join(f"{d.get(n, float('nan')):>11.2e}" for n in NFES))
    for label, num in (("default / best diffusers", lambda n: d.get(n, float("nan"))),
                       ("best kakusan (after the fact) / best diff.", lambda n: _best(rows, "kakusan", n)[0])):
        line = f"{label:<44}"
        for n in NFES:
            b, _ = _best(rows, "diffusers", n)
            line += f"{num(n) / b:>11.2f}" if b == b and b > 0 else f"{'-':>11}"
        print(line)
    if noise and any(noise.values()):
        for label, f in (("  90% interval (bootstrap over starts)",
                          lambda v: f"{v['interval90'][0]:.2f}-{v['interval90'][1]:.2f}"),
                         ("  held out (best chosen on other starts)", lambda v: f"{v['held_out_ratio']:.2f}")):
            print(f"{label:<44}" + "".join(f"{f(noise[n]) if noise.get(n) else '-':>11}" for n in NFES))
    dk = ("kakusan", default_name, default_spacing)
    for label, idx, fmt in (("median per-start error", 0, ">11.2e"), ("flips (starts in another mode)", 1, ">11d")):
        for lib, key in (("default", dk), ("best diffusers", None)):
            line = f"{label + ', ' + lib:<44}"
            for n in NFES:
                k = key if key is not None else _best(rows, "diffusers", n)[1]
                v = extra.get(k, {}).get(n)
                line += f"{v[idx]:{fmt}}" if v is not None else f"{'-':>11}"
            print(line)
    for lib in ("kakusan", "diffusers"):
        line = f"{'fewest flips of any ' + lib + ' configuration':<44}"
        for n in NFES:
            fl = [e[n][1] for k, e in extra.items() if k[0] == lib and n in e]
            line += f"{min(fl):>11d}" if fl else f"{'-':>11}"
        print(line)


if __name__ == "__main__":
    main()
