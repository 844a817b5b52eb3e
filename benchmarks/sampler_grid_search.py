"""The search behind samplers.DEFAULT_GRIDS: the default solver (UniPC, order 2 or 3) on Karras grids between a
cap sigma~ <= sigma_max (reached in one step from t = T-1) and a floor sigma_min, scored on the exact-score oracle
of benchmarks/sampler_accuracy.py (its mixtures, linear and cosine) against the best diffusers configuration per
cell, chosen after the fact on the same starts.

The starts are drawn with another seed than the benchmark's (9, not 7), so that the rule is not fitted on the
starts it is then scored on. diffusers' per-start errors are computed once per (starts, seed) and cached.

    python benchmarks/sampler_grid_search.py --nfe 5 --order 2 --rho 3,7 --cap 3,5,7,10,20 --floor 0.12,0.2,0.3,0.45
    python benchmarks/sampler_grid_search.py --nfe 10 --order 2,3 --rho 5,7 --cap 5,10 --floor 0.015,0.03,0.06
    python benchmarks/sampler_grid_search.py --seed 7 --default --nfe 5,10,20   # the rule on the benchmark's seed

Per candidate and NFE: the cells (of 8) whose RMSE is at most the best diffusers', the cells whose median
per-start error is at most half the best diffusers', the geometric mean of the 8 RMSE ratios, and each cell's
RMSE / median ratio. A floor of 0 means the schedule's t = 0 (no floor).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sampler_accuracy as B  # noqa: E402
from kakusan.samplers import sample_unipc  # noqa: E402
from kakusan.schedules import make_schedule, noise_levels, timesteps  # noqa: E402
from kakusan.testing import MixtureDenoiser, exact_endpoint  # noqa: E402


def cache(starts: int, seed: int, nfes, path: Path) -> dict:
    """{(schedule, mixture): {"x_T", "ref", "diff": {(label, option, nfe): per-start squared error}}}."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    out = {}
    for sn in ("linear", "cosine"):
        schedule = make_schedule(sn)
        (a0, s0), (a1, s1) = (tuple(v.item() for v in schedule.alpha_sigma(t)) for t in (999, 0))
        for mn, mix in B.mixtures(False).items():
            x_T = torch.randn(starts, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * s0
            ref = exact_endpoint(mix, x_T, a0, s0, a1, s1)
            cell = {"x_T": x_T, "ref": ref, "diff": {}}
            for label, cls, kw in B.diffusers_configs(sn, schedule.betas.to(torch.float32)):
                opt = next(f"{k}={v}" for k, v in kw.items()
                           if k in ("timestep_spacing", "use_karras_sigmas", "use_lu_lambdas"))
                for nfe in nfes:
                    try:
                        o = B.run_diffusers(cls, kw, mix, nfe, x_T, schedule.alpha_bar)
                    except Exception:  # a configuration diffusers refuses
                        continue
                    if torch.isfinite(o).all():
                        cell["diff"][(label, opt, nfe)] = (o - ref).pow(2).mean(1)
            out[(sn, mn)] = cell
            print(f"  diffusers on {sn} {mn}: done", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=1024)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--nfe", default="5")
    p.add_argument("--order", default="2")
    p.add_argument("--rho", default="7")
    p.add_argument("--cap", default="10")
    p.add_argument("--floor", default="0,0.2")
    p.add_argument("--last-step", default="denoise", help="UniPC's last step: denoise, gaussian, or both (csv)")
    p.add_argument("--cache", default=None, help="diffusers' errors (default: a file in the system's temp dir)")
    p.add_argument("--default", action="store_true",
                   help="score the default instead (the grid samplers.DEFAULT_GRIDS picks per NFE), with round "
                        "one's grid (Karras below sigma~ = 10, down to t = 0) in brackets")
    args = p.parse_args()
    torch.set_num_threads(1)
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    nfes = [int(v) for v in args.nfe.split(",")]
    import tempfile

    path = Path(args.cache or Path(tempfile.gettempdir()) / f"kakusan-grid-search-{args.starts}-{args.seed}.pt")
    data = cache(args.starts, args.seed, (5, 10, 20), path)
    mixes, schedules = B.mixtures(False), {s: make_schedule(s) for s in ("linear", "cosine")}
    t0 = time.time()
    if args.default:
        score_default(data, mixes, schedules, nfes)
        return
    for order, rho, cap, floor, last in itertools.product([int(v) for v in args.order.split(",")], floats(args.rho),
                                                          floats(args.cap), floats(args.floor),
                                                          args.last_step.split(",")):
        for nfe in nfes:
            cells = []
            for (sn, mn), cell in data.items():
                s = schedules[sn]
                lv = noise_levels(s, timesteps(s, nfe, "karras", rho=rho, sigma_max=cap, sigma_min=floor or None))
                e = (sample_unipc(MixtureDenoiser(mixes[mn], s), cell["x_T"], lv, order=order, last_step=last)
                     - cell["ref"]).pow(2).mean(1)
                best = min((v for k, v in cell["diff"].items() if k[2] == nfe), key=lambda v: v.mean().item())
                cells.append(((e.mean() / best.mean()).sqrt().item(), (e.sqrt().median() / best.sqrt().median()).item()))
            gm = math.exp(sum(math.log(r) for r, _ in cells) / len(cells))
            print(f"order {order} rho {rho:g} cap {cap:g} floor {floor:g} last {last} NFE {nfe:>2}: RMSE <= best "
                  f"diffusers "
                  f"{sum(r <= 1 for r, _ in cells)}/{len(cells)}, median <= 0.5x {sum(m <= 0.5 for _, m in cells)}/"
                  f"{len(cells)}, geometric mean {gm:.2f} | " + " ".join(f"{r:.2f}/{m:.2f}" for r, m in cells),
                  flush=True)
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)


def score_default(data, mixes, schedules, nfes) -> None:
    """The default's cells as a Markdown table: RMSE ratio / median ratio (RMSE ratio of round one's grid), and
    issue #22's counts."""
    from kakusan.samplers import DEFAULT_SAMPLER, sampling_plan

    met_rmse = met_median = cells = 0
    print("| schedule | mixture | " + " | ".join(f"NFE {n}: RMSE / median (round one)" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for (sn, mn), cell in data.items():
        s, den = schedules[sn], MixtureDenoiser(mixes[mn], schedules[sn])
        line = f"| {sn} | {mn} |"
        for nfe in nfes:
            best = min((v for k, v in cell["diff"].items() if k[2] == nfe), key=lambda v: v.mean().item())
            ratios = []
            grid, lv = sampling_plan(s, DEFAULT_SAMPLER, nfe)
            for lv, opts in ((lv, grid.options()), (noise_levels(s, timesteps(s, nfe, "karras", sigma_max=10.0)), {})):
                e = (sample_unipc(den, cell["x_T"], lv, order=2, **opts) - cell["ref"]).pow(2).mean(1)
                ratios.append(((e.mean() / best.mean()).sqrt().item(),
                               (e.sqrt().median() / best.sqrt().median()).item()))
            (r, m), (r_old, _) = ratios
            cells += 1
            met_rmse += r <= 1
            met_median += m <= 0.5
            line += f" {f'**{r:.2f}**' if r <= 1 else f'{r:.2f}'} / {m:.2f} ({r_old:.2f}) |"
        print(line, flush=True)
    print(f"RMSE <= best diffusers in {met_rmse} of {cells} cells; median ratio <= 0.5 in {met_median} of {cells}")


if __name__ == "__main__":
    main()
