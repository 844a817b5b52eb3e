"""Samplers on trained models: kakusan's default against diffusers' schedulers driving the same network from the
same noise (kakusan.interop.sample_with_diffusers), at NFE 5, 10 and 20.

Two scores per configuration, on the same n samples (balanced over the classes, the same unit noise for every
configuration and both libraries):
- classifier-feature FID against the data set's test split (kakusan.metrics, as `kakusan eval`);
- the mean distance to a reference sample from the same noise: the RMS pixel difference (images in [-1, 1]) to
  a ``--ref-steps`` DPM-Solver++(3M) solve of the probability-flow ODE on the log-SNR grid (kakusan's; its
  distance to the solve with half the steps is printed, to show it has converged well below the differences
  measured). This is the trained-model counterpart of the oracle's RMSE to the exact endpoint.

diffusers' configurations are swept as in benchmarks/sampler_accuracy.py (DDIM, DPM++ 2M / 3M, SDE-DPM++ 2M,
UniPC-2 / 3, DEIS-3, Euler, Heun, each over its spacing options: ~37). Sampling all of them at the full n is
beyond a 2-core CPU, so a pilot of ``--pilot`` samples (the first of the n) scores every configuration by its
distance to the reference, and the best ``--keep`` of each NFE are run at the full n (SDE-DPM++ is stochastic:
its distance to the ODE reference is large by construction, so the pilot does not keep it; its pilot distances
are in the JSON). The best diffusers configuration is then chosen after the fact, per NFE and per score, among
those: with a small ``--keep`` the FID side is the pilot's pick by distance, not the best of all by FID.

    python benchmarks/sampler_models.py --checkpoint runs/mnist --name mnist -n 1000 \\
        --extractor classifier:weights/classifier-mnist.safetensors --ref mnist:../shared/data/mnist

Prints a table and writes benchmarks/results/sampler_models-<name>.json (every pilot and full score, the grids
the default rule chose, the sample count, the guidance). The reference's own FID is scored too: a sampler that
solved the ODE exactly would score it, so a FID below it is error that happens to suit the metric.

After a change to the default rule, ``--default-only`` scores the default alone (the diffusers rows of an earlier
run with the same -n, --seed and --ref-steps stay valid); ``--cache DIR`` keeps the reference samples between
runs.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kakusan.interop import diffusers_scheduler, sample_with_diffusers  # noqa: E402
from kakusan.metrics.evaluate import FeatureSet, nan_to_none, reference_features, score  # noqa: E402
from kakusan.metrics.features import load_extractor  # noqa: E402
from kakusan.pipeline import Pipeline  # noqa: E402
from kakusan.samplers import DEFAULT_SAMPLER, run_sampler, sampling_grid, sampling_plan  # noqa: E402
from kakusan.schedules import noise_levels, timesteps  # noqa: E402


def diffusers_configs():
    """(label, option, scheduler class name, options): the sweep of benchmarks/sampler_accuracy.py, plus
    SDE-DPM-Solver++(2M)."""
    spacing = [{"timestep_spacing": s} for s in ("linspace", "leading", "trailing")]
    sigma_opts = spacing + [{"use_karras_sigmas": True}]
    cfgs = [("DDIM", "DDIMScheduler", o) for o in spacing]
    for order in (2, 3):
        cfgs += [(f"DPM++{order}M", "DPMSolverMultistepScheduler",
                  {"solver_order": order, "algorithm_type": "dpmsolver++", **o})
                 for o in sigma_opts + [{"use_lu_lambdas": True}]]
        cfgs += [(f"UniPC-{order}", "UniPCMultistepScheduler", {"solver_order": order, **o}) for o in sigma_opts]
    cfgs += [("SDE-DPM++2M", "DPMSolverMultistepScheduler",
              {"solver_order": 2, "algorithm_type": "sde-dpmsolver++", **o}) for o in sigma_opts]
    cfgs += [("DEIS-3", "DEISMultistepScheduler", {"solver_order": 3, **o}) for o in sigma_opts]
    cfgs += [("Euler", "EulerDiscreteScheduler", o) for o in sigma_opts]
    cfgs += [("Heun", "HeunDiscreteScheduler", o) for o in sigma_opts]
    return [(label, _opt(o), cls, o) for label, cls, o in cfgs]


def _opt(o: dict) -> str:
    return next(f"{k}={v}" for k, v in o.items() if k in ("timestep_spacing", "use_karras_sigmas", "use_lu_lambdas"))


def _batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def run_kakusan(pipe, d, noise, labels, levels, sampler, batch_size, seed=0, options=None):
    out = []
    for j, sl in enumerate(_batches(len(noise), batch_size)):
        x = noise[sl] * levels.sigma[0].item()
        g = torch.Generator().manual_seed(seed + j)
        out.append(run_sampler(sampler, d, x, levels, pipe.schedule, cond=pipe._encode(labels[sl].tolist()),
                               generator=g, **(options or {})).float())
    return torch.cat(out)


def run_diffusers(pipe, d, noise, labels, cls, options, nfe, batch_size, seed=0):
    steps = (nfe + 1) // 2 if cls == "HeunDiscreteScheduler" else nfe  # Heun: 2 calls a step, 1 the last
    out = []
    for j, sl in enumerate(_batches(len(noise), batch_size)):
        g = torch.Generator().manual_seed(seed + j)
        sched = diffusers_scheduler(cls, pipe.schedule, **options)
        out.append(sample_with_diffusers(sched, d, noise[sl], steps, cond=pipe._encode(labels[sl].tolist()),
                                         generator=g, schedule=pipe.schedule).float())
    return torch.cat(out)


def distance(x, ref) -> torch.Tensor:
    """Per-sample RMS pixel difference, images clipped to [-1, 1] as they are saved."""
    return (x.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).flatten(1).mean(1).sqrt()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--extractor", required=True)
    ap.add_argument("--ref", required=True, help="the data set whose test split FID is measured against")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--pilot", type=int, default=100)
    ap.add_argument("--keep", type=int, default=4, help="diffusers configurations per NFE run at the full n")
    ap.add_argument("--nfe", default="5,10,20")
    ap.add_argument("--ref-steps", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: none)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--round-one", action="store_true",
                    help="no diffusers: the default against round one's grid (Karras below sigma~ = 10, down to "
                         "t = 0), the check that the rule does not hurt a trained model")
    ap.add_argument("--default-only", action="store_true",
                    help="no diffusers: the default alone (after a change to the rule; the diffusers rows of an "
                         "earlier run with the same -n, --seed and --ref-steps stay valid), written to "
                         "sampler_models-<name>-default.json")
    ap.add_argument("--variant", action="append", default=[], metavar="CAP,FLOOR,RHO,LAST",
                    help="with --default-only: also score the default sampler on this Karras grid (cap sigma~, floor "
                         "sigma~, rho) with this last step (denoise / gaussian); repeatable")
    ap.add_argument("--cache", default=None,
                    help="a folder where the reference samples are kept between runs (keyed by checkpoint hash, "
                         "n, seed, reference steps and precision)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    nfes = [int(v) for v in args.nfe.split(",")]
    t_start = time.perf_counter()

    pipe = Pipeline.load(args.checkpoint, device="cpu", precision=args.precision)
    d, k, _ = pipe.guided_denoiser(guidance=args.guidance)
    n = args.n
    labels = torch.arange(n) % k if k else torch.zeros(n, dtype=torch.long)
    if not k:
        raise SystemExit("sampler_models: the benchmark is written for class-conditional models")
    noise = torch.randn(n, *pipe.shape, generator=torch.Generator().manual_seed(args.seed))
    bs = args.batch_size

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    # the reference: a long ODE solve from the same noise, and its half-steps check
    ref_levels = noise_levels(pipe.schedule, timesteps(pipe.schedule, args.ref_steps, "logsnr"))
    cached = None
    if args.cache:
        cached = Path(args.cache) / (f"sampler_models-ref-{pipe.weights_sha256[:16]}-n{n}-seed{args.seed}-"
                                     f"steps{args.ref_steps}-{pipe.precision}.pt")
    if cached is not None and cached.is_file():
        ref = torch.load(cached, weights_only=True)
        log(f"reference read from {cached}")
    else:
        ref = run_kakusan(pipe, d, noise, labels, ref_levels, "dpmpp-3m", bs)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref, cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)
    p = args.pilot
    half_levels = noise_levels(pipe.schedule, timesteps(pipe.schedule, args.ref_steps // 2, "logsnr"))
    ref_check = distance(run_kakusan(pipe, d, noise[:p], labels[:p], half_levels, "dpmpp-3m", bs), ref[:p]).mean()
    log(f"reference: DPM-Solver++(3M), {args.ref_steps} log-SNR steps; {args.ref_steps // 2} steps differ from it "
        f"by {ref_check:.2e} (RMS, pilot samples)")

    # the pilot: every diffusers configuration on the first p samples, by distance to the reference
    pilot = {}
    for nfe in (nfes if not (args.round_one or args.default_only) else []):
        grid, lv = sampling_plan(pipe.schedule, DEFAULT_SAMPLER, nfe)
        dk = distance(run_kakusan(pipe, d, noise[:p], labels[:p], lv, DEFAULT_SAMPLER, bs, options=grid.options()),
                      ref[:p]).mean().item()
        pilot[("kakusan", DEFAULT_SAMPLER, "default grid", nfe)] = dk
        for label, opt, cls, o in diffusers_configs():
            try:
                x = run_diffusers(pipe, d, noise[:p], labels[:p], cls, o, nfe, bs)
                dist = distance(x, ref[:p]).mean().item() if torch.isfinite(x).all() else float("inf")
            except Exception as e:  # a configuration diffusers refuses
                print(f"  {label} {opt} NFE {nfe}: {type(e).__name__}: {e}", file=sys.stderr)
                dist = float("nan")
            pilot[("diffusers", label, opt, nfe)] = dist
        ranked = sorted((v, key) for key, v in pilot.items() if key[0] == "diffusers" and key[3] == nfe and v == v)
        log(f"pilot NFE {nfe}: default {dk:.4f}; best diffusers " +
            ", ".join(f"{key[1]} {key[2]} {v:.4f}" for v, key in ranked[:args.keep]))

    # the full runs: the default and the best diffusers configurations of the pilot, FID + distance
    extractor = load_extractor(args.extractor)
    real = reference_features(extractor, args.ref)
    by_name = {(label, opt): (cls, o) for label, opt, cls, o in diffusers_configs()}
    rows = []

    def scored(x, lib, sampler, option, nfe, seconds, grid=None):
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        feats, logits = extractor(images, device="cpu", what="samples")
        res = score(extractor, FeatureSet(feats, logits, {"kind": "samples"}, labels), real, metrics=("fid",))
        dist = distance(x, ref)
        row = {"library": lib, "sampler": sampler, "option": option, "nfe": nfe, "fid": res["scores"]["fid"],
               "class_agreement": res["scores"].get("class_agreement"), "distance": dist.mean().item(),
               "distance_stderr": (dist.std() / math.sqrt(len(dist))).item(), "seconds": seconds,
               **({"grid": grid} if grid else {})}
        rows.append(row)
        log(f"NFE {nfe:>2} {lib:>9} {sampler:<12} {option:<28} FID {row['fid']:7.3f}  distance "
            f"{row['distance']:.4f} +- {row['distance_stderr']:.4f}")

    # the reference's own FID: what a sampler that solved the ODE exactly would score (FIDs below it are a
    # sampler's error that happens to suit the metric, not accuracy)
    scored(ref, "reference", "dpmpp-3m", f"{args.ref_steps} log-SNR steps", args.ref_steps, None)
    for nfe in nfes:
        t0 = time.perf_counter()
        grid, lv = sampling_plan(pipe.schedule, DEFAULT_SAMPLER, nfe)
        x = run_kakusan(pipe, d, noise, labels, lv, DEFAULT_SAMPLER, bs, options=grid.options())
        scored(x, "kakusan", DEFAULT_SAMPLER, "default grid", nfe, time.perf_counter() - t0, grid.record())
        if args.default_only:
            for v in args.variant:
                cap, floor, rho, last = v.split(",")
                t0 = time.perf_counter()
                lv = noise_levels(pipe.schedule, timesteps(pipe.schedule, nfe, "karras", rho=float(rho),
                                                           sigma_max=float(cap), sigma_min=float(floor)))
                x = run_kakusan(pipe, d, noise, labels, lv, DEFAULT_SAMPLER, bs, options={"last_step": last})
                scored(x, "kakusan", DEFAULT_SAMPLER, f"cap {cap}, floor {floor}, rho {rho}, {last}", nfe,
                       time.perf_counter() - t0, {"spacing": "karras", "sigma_max": float(cap),
                                                  "sigma_min": float(floor), "rho": float(rho), "last_step": last})
            continue
        if args.round_one:
            t0 = time.perf_counter()
            lv = noise_levels(pipe.schedule, timesteps(pipe.schedule, nfe, "karras", sigma_max=10.0))
            x = run_kakusan(pipe, d, noise, labels, lv, DEFAULT_SAMPLER, bs)
            scored(x, "kakusan", DEFAULT_SAMPLER, "round one's grid", nfe, time.perf_counter() - t0,
                   {"spacing": "karras", "sigma_max": 10.0})
            continue
        ranked = sorted((v, key) for key, v in pilot.items() if key[0] == "diffusers" and key[3] == nfe and v == v)
        for _, (_, label, opt, _) in ranked[:args.keep]:
            t0 = time.perf_counter()
            cls, o = by_name[(label, opt)]
            x = run_diffusers(pipe, d, noise, labels, cls, o, nfe, bs)
            scored(x, "diffusers", label, opt, nfe, time.perf_counter() - t0)

    if args.round_one or args.default_only:
        out = Path(args.out) / f"sampler_models-{args.name}-{'round-one' if args.round_one else 'default'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(nan_to_none({"benchmark": "sampler_models", "checkpoint": args.checkpoint,
                                               "n": n, "guidance": args.guidance, "seed": args.seed,
                                               "reference_steps": args.ref_steps,
                                               "reference_half_steps_distance": ref_check.item(),
                                               "default": {str(nfe): sampling_grid(DEFAULT_SAMPLER, nfe).record()
                                                           for nfe in nfes},
                                               "rows": rows}), indent=1))
        print(f"wrote {out}")
        return 0
    ref_row = next(r for r in rows if r["library"] == "reference")
    print(f"\n{args.name}: {n} samples ({p} in the pilot), guidance {args.guidance}, reference "
          f"{args.ref_steps}-step DPM-Solver++(3M) (its FID {ref_row['fid']:.3f})")
    print(f"{'NFE':>4} {'default FID':>12} {'best diffusers FID':>34} {'default dist.':>14} "
          f"{'best diffusers dist.':>36}")
    summary = {}
    for nfe in nfes:
        dk = next(r for r in rows if r["library"] == "kakusan" and r["nfe"] == nfe)
        ds = [r for r in rows if r["library"] == "diffusers" and r["nfe"] == nfe]
        bf, bd = min(ds, key=lambda r: r["fid"]), min(ds, key=lambda r: r["distance"])
        summary[nfe] = {"fid": [dk["fid"], bf["fid"], f"{bf['sampler']} {bf['option']}"],
                        "distance": [dk["distance"], bd["distance"], f"{bd['sampler']} {bd['option']}"]}
        print(f"{nfe:>4} {dk['fid']:>12.3f} {bf['fid']:>8.3f} ({bf['sampler']} {bf['option']}){'':<2} "
              f"{dk['distance']:>14.4f} {bd['distance']:>8.4f} ({bd['sampler']} {bd['option']})")
    out = Path(args.out) / f"sampler_models-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nan_to_none({
        "benchmark": "sampler_models", "checkpoint": args.checkpoint, "checkpoint_sha256": pipe.weights_sha256,
        "n": n, "pilot": p, "keep": args.keep, "guidance": args.guidance, "seed": args.seed,
        "precision": pipe.precision, "extractor": args.extractor, "ref": args.ref,
        "reference": {"sampler": "dpmpp-3m", "spacing": "logsnr", "steps": args.ref_steps,
                      "half_steps_distance": ref_check.item()},
        "default": {str(nfe): sampling_grid(DEFAULT_SAMPLER, nfe).record() for nfe in nfes},
        "pilot_distance": [{"library": key[0], "sampler": key[1], "option": key[2], "nfe": key[3], "distance": v}
                           for key, v in pilot.items()],
        "rows": rows, "summary": {str(k): v for k, v in summary.items()},
        "seconds": time.perf_counter() - t_start}), indent=1))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
