"""kakusan's command line: parse, build a config, (print it with --dry-run), call the library.

    kakusan train   --data mnist:DIR --preset unet-mnist --steps 20000 --out runs/mnist
    kakusan sample  --checkpoint runs/mnist --sampler ddim --steps 50 -n 64 --out grid.png
    kakusan demo
    kakusan serve  --checkpoint runs/mnist --checkpoint runs/cifar --port 7860
    kakusan samplers | presets
    kakusan train-classifier --data mnist --out runs/cls/mnist.safetensors
    kakusan eval   --checkpoint runs/mnist --extractor classifier:runs/cls/mnist.safetensors --ref mnist -n 10000
    kakusan sweep  --checkpoint runs/mnist --samplers ddim,unipc-2 --steps 5,10,20 ... --out runs/sweep
    kakusan ema    reconstruct --run runs/mnist --sigma-rel 0.08 | list --run runs/mnist
    kakusan plot   schedules | forward | embedding | loss | trajectory
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .training.trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--config", help="a JSON file of training config values (flags override it)")
    p.add_argument("--data", help=f"digits | mnist[:DIR] | fashion-mnist[:DIR] | cifar10[:DIR|.tar.gz] | "
                                  f"folder:DIR | captions:DIR | emoji:DIR|.tar.gz (default {d.data})")
    p.add_argument("--preset", help=f"model preset, a U-Net or a DiT (default {d.preset}; see 'kakusan presets')")
    p.add_argument("--model", type=json.loads, help='JSON overrides of the preset, e.g. \'{"dropout": 0.0}\'')
    p.add_argument("--schedule", help=f"linear | cosine | quadratic | sigmoid | scaled-linear | flow (rectified flow; "
                                      f"with --prediction flow) | edm (sigma~ log-uniform in [0.002, 80]) "
                                      f"(default {d.schedule})")
    p.add_argument("--zero-terminal-snr", action="store_true", default=None, help="rescale to zero terminal SNR")
    p.add_argument("--prediction", help=f"eps | x0 | v | flow (eps - x0, rectified flow's velocity) | edm (EDM's "
                                        f"preconditioned output) (default {d.prediction})")
    p.add_argument("--weighting", help=f"simple | min-snr | edm (EDM's lambda(sigma)) (default {d.weighting})")
    p.add_argument("--edm", action="store_true", default=None,
                   help="EDM's training recipe (Karras et al. 2022): --schedule edm --prediction edm --weighting edm "
                        "--noise-levels lognormal (flags given beside it win); sampled with EDM's Heun, 18 steps")
    p.add_argument("--noise-levels", help="training noise levels: uniform (t in 0..T-1) | lognormal (EDM's "
                                          "log sigma ~ N(p_mean, p_std^2))")
    p.add_argument("--p-mean", type=float, help="--noise-levels lognormal: mean of log sigma")
    p.add_argument("--p-std", type=float, help="--noise-levels lognormal: standard deviation of log sigma")
    p.add_argument("--sigma-data", type=float, help="EDM's data standard deviation (prediction / weighting edm)")
    p.add_argument("--cond", help="none | class | text (default none)")
    p.add_argument("--label-dropout", type=float,
                   help=f"share of labels / captions replaced by the null one (default {d.label_dropout})")
    p.add_argument("--text-encoder", help=f"--cond text: minilm (bundled all-MiniLM-L6-v2) or a local Hugging Face "
                                          f"CLIP / T5 / BERT folder (default {d.text_encoder})")
    p.add_argument("--text-max-length", type=int, help=f"tokens per prompt (default {d.text_max_length})")
    p.add_argument("--autoencoder", help="latent diffusion: a kakusan autoencoder checkpoint (train-autoencoder) "
                                         "or a diffusers AutoencoderKL folder")
    p.add_argument("--latent-mode", help="encode the data as posterior 'mean' (default) or one posterior 'sample'")
    p.add_argument("--latent-cache", help="the latent cache file (default: keyed by its inputs in the cache folder)")
    p.add_argument("--init-from", help="fine-tune: start from this checkpoint (its EMA weights, architecture, "
                                       "schedule, prediction and latent space)")
    p.add_argument("--lora-rank", type=int, help="with --init-from: train LoRA adapters of this rank on the frozen "
                                                 "model (the checkpoints also hold lora.safetensors, the adapters alone)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--lora-targets", help="attention (q / k / v / output projections; default) | all (every "
                                          "linear and convolution)")
    p.add_argument("--distill", action="store_true", default=None,
                   help="with --init-from (the teacher): consistency distillation into a few-step model (LCM); "
                        "sample it with --sampler lcm (the default for it) in 1-8 steps")
    p.add_argument("--distill-guidance", type=float, help="the teacher's classifier-free guidance, baked in")
    p.add_argument("--distill-points", type=int, help="points of the teacher's skipping grid (default 50)")
    p.add_argument("--distill-target-ema", type=float, help="EMA decay of the target network (default 0.95)")
    p.add_argument("--huber-c", type=float, help="the pseudo-Huber loss's c (default 0.001)")
    p.add_argument("--controlnet", action="store_true", default=None,
                   help="with --init-from (the frozen base): train a ControlNet that steers it by control maps")
    p.add_argument("--control", help="--controlnet: canny | sobel | scribble (maps computed from the training "
                                     "images) | folder:DIR (control images paired with the data in sorted order)")
    p.add_argument("--dreambooth", action="store_true", default=None,
                   help="with --init-from (a text model): fine-tune it on a subject's images (--instance-data) "
                        "captioned --instance-prompt; all weights, or --lora-rank")
    p.add_argument("--instance-data", help="DreamBooth / textual inversion: the subject's images, folder:DIR (resized "
                                           "to the base's size); the run's --data")
    p.add_argument("--instance-prompt", help="their caption, e.g. 'a sks cat' (textual inversion: must hold the "
                                             "placeholder; default the placeholder alone)")
    p.add_argument("--class-prompt", help="DreamBooth prior preservation: the base draws --num-class-images of this "
                                          "prompt once (RUN/class-images) and each step adds a batch of them")
    p.add_argument("--num-class-images", type=int, help="prior preservation's class images")
    p.add_argument("--prior-loss-weight", type=float, help="w in L = L_instance + w L_class (0: no prior "
                                                          "preservation)")
    p.add_argument("--class-data", help="the class images' folder (default RUN/class-images; a folder without "
                                        "provenance.json: class images of your own)")
    p.add_argument("--class-guidance", type=float, help="classifier-free guidance of the class images")
    p.add_argument("--train-text-encoder", action="store_true", default=None,
                   help="(refused: kakusan's text encoders are frozen, recorded by hash; see the README)")
    p.add_argument("--textual-inversion", action="store_true", default=None,
                   help="with --init-from (a text model): learn a new word (--placeholder) from a subject's images; "
                        "only its embeddings train (checkpoints hold learned_embeds.safetensors)")
    p.add_argument("--placeholder", help="textual inversion: the new word, e.g. '<my-cat>'")
    p.add_argument("--initializer", help="textual inversion: the word its vectors start from, e.g. 'cat'")
    p.add_argument("--num-vectors", type=int, help="textual inversion: tokens (vectors) the word stands for")
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, help="images per step (the global batch under torchrun)")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--ema-decay", type=float, help="decay of the weights' exponential moving average")
    p.add_argument("--posthoc-ema", type=_csv(float), metavar="SIGMA_RELS",
                   help="post-hoc EMA: track power EMAs of these relative widths, e.g. 0.05,0.10, and snapshot them "
                        "into RUN/posthoc-ema, for 'kakusan ema reconstruct' of any width later (default: none)")
    p.add_argument("--posthoc-every", type=int, help="steps between post-hoc EMA snapshots (and one at the last)")
    p.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--image-size", type=int, help="resize the data (required for folder:DIR)")
    p.add_argument("--channels", type=int, help="1 or 3, for folder:DIR")
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--download", action="store_true", default=None, help="download missing data (online)")
    p.add_argument("--seed", type=int, help="initial weights, data order, noise")
    p.add_argument("--out", help="run folder: config.json, log.jsonl, samples/, checkpoints/")
    p.add_argument("--log-every", type=int, help="a log.jsonl line every N steps")
    p.add_argument("--sample-every", type=int, help="an EMA sample grid every N steps")
    p.add_argument("--checkpoint-every", type=int, help="a checkpoint every N steps")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", help="auto | fp32 | bf16")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training forward pass (worth it on GPUs for long runs)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute the U-Net's blocks in the backward pass (less GPU memory, ~1 more forward)")
    p.add_argument("--keep-checkpoints", type=int, help="keep the newest N checkpoints (default 3)")
    p.add_argument("--keep-every", type=int, help="also keep every checkpoint whose step is a multiple of M (default "
                                                   "0: none)")
    p.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this much wall time")
    p.add_argument("--eval-every", type=int, help="score the EMA weights every N steps (FID, KID, precision / "
                                                  "recall, class agreement) into log.jsonl; checkpoints/best names "
                                                  "the best (needs --extractor and --ref)")
    p.add_argument("--eval-n", type=int, help="samples per evaluation, from the same noises each time")
    p.add_argument("--extractor", dest="eval_extractor", help="--eval-every: classifier:FILE | inception | "
                                                               "inception:FILE (as kakusan eval)")
    p.add_argument("--ref", dest="eval_ref", help="--eval-every: the real data (e.g. mnist:DIR; its --ref-split) or "
                                                  "a stats file from 'kakusan stats'")
    p.add_argument("--ref-split", dest="eval_ref_split", help="split of --ref")
    p.add_argument("--eval-sampler", help="the evaluation's sampler (default: the model's own, as kakusan eval)")
    p.add_argument("--eval-steps", type=int, help="the evaluation's sampling steps")
    p.add_argument("--eval-guidance", type=float, help="the evaluation's classifier-free guidance (default none)")
    p.add_argument("--eval-seed", type=int, help="seed of the evaluation's fixed noises")
    p.add_argument("--eval-batch-size", type=int, help="images per sampling batch of the evaluation")
    p.add_argument("--eval-best", help="the score naming checkpoints/best: fid | kid | precision | recall | "
                                       "class_agreement")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint, with the run's own config.json: "
                        "flags given beside it must match, except run control (--steps, --max-minutes, --*-every, "
                        "--keep-*, --device, ...) and moved paths (--data, --autoencoder, --latent-cache)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and print the resolved config, time a few steps on random data of the data's shape "
                        "and print the estimated time per step and for the run; then exit")
    p.add_argument("--estimate-steps", type=int, default=3,
                   help="--dry-run: time up to this many steps (at most ~10 s of them); 0: no estimate")
    for action in p._actions:  # every default in --help: the TrainConfig value an unset flag leaves
        if action.dest in d.__dataclass_fields__ and action.help and "default" not in action.help:
            value = getattr(d, action.dest)
            if value is not None and value is not False and value != {}:
                action.help += f" (default {value})"


def _config_values(args, cls) -> dict:
    """The config values given: ``--config FILE`` (JSON) overridden by the flags given on the command line."""
    base = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            from .errors import ConfigError

            raise ConfigError(f"cannot read config {args.config}: {e}") from None
        if not isinstance(base, dict):
            from .errors import ConfigError

            raise ConfigError(f"config {args.config}: expected a JSON object of config values")
    flags = {k: v for k, v in vars(args).items() if v is not None and k in cls.__dataclass_fields__}
    if getattr(args, "instance_data", None) is not None:  # DreamBooth's / textual inversion's name for --data
        from .errors import ConfigError

        if flags.get("data") not in (None, args.instance_data):
            raise ConfigError("--instance-data is the run's data: give it or --data, not both")
        if not ({**base, **flags}.get("dreambooth") or {**base, **flags}.get("textual_inversion")):
            raise ConfigError("--instance-data is the subject's images of --dreambooth or --textual-inversion")
        flags["data"] = args.instance_data
    recipe = {}
    if getattr(args, "edm", None):
        from .training.trainer import EDM_RECIPE

        recipe = EDM_RECIPE
    return {**base, **recipe, **flags}


def _config_from(args, cls):
    """A config dataclass from ``--config FILE`` (JSON) overridden by the flags given on the command line."""
    return cls.from_dict(_config_values(args, cls))


def _train_config(args):
    from .training.trainer import TrainConfig

    return _config_from(args, TrainConfig)


def cmd_train(args) -> int:
    import os

    from .errors import ConfigError
    from .training.preflight import check_same_data, check_train_config, estimate_or_reason, resume_config, resumed_step
    from .training.trainer import Trainer, TrainConfig

    main_process = os.environ.get("RANK", "0") == "0"
    run_config = None
    if args.control is not None and not (args.controlnet or _config_values(args, TrainConfig).get("controlnet")):
        raise ConfigError("--control chooses a ControlNet's maps: it needs --controlnet (and --init-from BASE)")
    if args.resume:  # the run folder's own config; flags beside --resume must match it, or be run control
        given = _config_values(args, TrainConfig)
        out = given.get("out") or TrainConfig().out
        cfg, changed, run_config = resume_config(out, given)
    else:
        cfg, changed = _train_config(args), []

    def say_changed():
        for field, old, new in changed if main_process else ():
            print(f"changed: {field} {json.dumps(old)} -> {json.dumps(new)}", file=sys.stderr)

    if args.dry_run:
        if args.estimate_steps < 0:
            raise ConfigError(f"--estimate-steps must be >= 0, got {args.estimate_steps}")
        check_train_config(cfg)
        say_changed()
        print(json.dumps(cfg.to_dict(), indent=2))
        if args.estimate_steps:
            print(estimate_or_reason(cfg, args.estimate_steps, resumed_step(cfg.out) if args.resume else 0),
                  file=sys.stderr)
        return 0
    trainer = Trainer(cfg)
    try:
        if args.resume:
            check_same_data(run_config, trainer.config, cfg.out)
            say_changed()
            trainer.resume()
            if trainer.dist.is_main:
                print(f"resumed at step {trainer.step}", file=sys.stderr)
        ckpt = trainer.fit()
    finally:
        trainer.dist.shutdown()
    if trainer.dist.is_main:
        print(f"checkpoint: {ckpt}\nlog: {Path(cfg.out) / 'log.jsonl'}\nsamples: {Path(cfg.out) / 'samples'}")
    return 0


def _pipeline_kwargs(args) -> dict:
    """The pipeline call's arguments from sample's flags."""
    return {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "class_label": args.class_label,
            "negative_class": args.negative_class, "n": args.n, "sampler": args.sampler, "steps": args.steps,
            "spacing": args.spacing, "sigma_max": args.sigma_max, "eta": args.eta, "guidance": args.guidance,
            "guidance_rescale": args.guidance_rescale, "guidance_interval": args.guidance_interval,
            "classifier": args.classifier, "classifier_scale": args.classifier_scale, "seed": args.seed,
            "batch_size": args.batch_size, "init_image": args.init_image, "strength": args.strength,
            "mask": args.mask, "resample_steps": args.resample_steps, "clip": not args.no_clip,
            **_control_kwargs(args)}


def _control_kwargs(args) -> dict:
    if not args.control:
        if args.control_type or args.control_scale or args.control_cond_only:
            from .errors import ConfigError

            raise ConfigError("--control-type / --control-scale / --control-cond-only need --control IMAGE")
        return {}
    scales = args.control_scale or [1.0]
    return {"control": args.control if len(args.control) > 1 else args.control[0],
            "control_type": None if args.control_type in (None, "none") else args.control_type,
            "control_scale": scales if len(scales) > 1 else scales[0], "control_cond_only": args.control_cond_only}


def _read_noise(path: str):
    """An inversion's noise file (kakusan invert): (noise tensor, the sampler settings it was made for)."""
    from .checkpoints import load_tagged

    tensors, meta = load_tagged(path, "kakusan-noise", "noise file (kakusan invert)")
    return tensors["noise"], json.loads(meta["regenerate"]), json.loads(meta["record"])


def cmd_sample(args) -> int:
    from .checkpoints import read_config, resolve_checkpoint, sampling_defaults
    from .errors import ConfigError
    from .pipeline import Pipeline
    from .samplers import get_sampler, sampling_grid

    if args.sampler is not None:
        get_sampler(args.sampler)  # fail fast on a bad name
    if args.from_png:
        if args.dry_run:
            from .pipeline import read_png_record

            print(json.dumps(read_png_record(args.from_png), indent=2))
            return 0
        gen = Pipeline.from_png(args.from_png, args.checkpoint, device=args.device, text_encoder=args.text_encoder,
                                autoencoder=args.autoencoder, controlnet=args.controlnet, guide=args.guide_model,
                                embedding=args.embedding)
        out = args.out or (None if args.out_dir else "regenerated.png")
        if len(gen) == 1 and out:  # one image of a call: written as it was, at its own size
            print(f"image: {gen.save_image(out)}")
            out = None
        return _write_samples(gen, out, args.out_dir, gen.record.get("nrow"))
    if not args.checkpoint:
        raise ConfigError("sample needs --checkpoint (or --from-png FILE)")
    _check_guide_model(args)
    kw = _pipeline_kwargs(args)
    noise = None
    if args.noise:
        noise, made_for, _ = _read_noise(args.noise)
        for key in ("sampler", "steps", "spacing", "sigma_max", "n"):  # the inversion's grid unless overridden
            if kw.get(key) is None and made_for.get(key) is not None:
                kw[key] = made_for[key]
        kw["n"] = len(noise) if args.n is None else kw["n"]
    if args.dry_run:  # the values that would be used, checkpoint defaults included
        from .sd import sd_layout

        config = {} if sd_layout(args.checkpoint) else read_config(resolve_checkpoint(args.checkpoint))
        default_sampler, default_steps = sampling_defaults(config)
        kw["sampler"], kw["steps"] = kw["sampler"] or default_sampler, kw["steps"] or default_steps
        kw.update(sampling_grid(kw["sampler"], kw["steps"], kw["spacing"], kw["sigma_max"]).record())
        print(json.dumps({"checkpoint": args.checkpoint, **kw, "guide_model": args.guide_model, "out": args.out,
                          "out_dir": args.out_dir}, indent=2))
        return 0
    lora = None
    if args.lora:
        lora = [item.rpartition(":")[0] if _has_scale(item) else item for item in args.lora]
        scales = [float(item.rpartition(":")[2]) if _has_scale(item) else args.lora_scale for item in args.lora]
    elif args.lora_scale != 1.0:
        raise ConfigError("--lora-scale needs --lora FILE")
    pipe = Pipeline.load(args.checkpoint, device=args.device, precision=args.precision, use_ema=not args.no_ema,
                         lora=lora, lora_scale=scales if lora else 1.0, text_encoder=args.text_encoder,
                         autoencoder=args.autoencoder, offload=args.offload, compile=args.compile,
                         controlnet=args.controlnet, guide=args.guide_model, embedding=args.embedding,
                         **_sd_args(args))
    kw["n"] = 64 if kw["n"] is None else kw["n"]
    gen = pipe(**kw, noise=noise, progress=True)
    out = args.out if args.out is not None else (None if args.out_dir else "samples.png")
    code = _write_samples(gen, out, args.out_dir, args.nrow)
    _report_compile(pipe)
    return code


def _report_compile(pipe) -> None:
    from .diffusion import compile_cache

    d = getattr(pipe.denoiser, "denoiser", pipe.denoiser)
    if getattr(d, "compiled", False):
        print(f"torch.compile: {d.compile_seconds:.1f} s of that in first calls (tracing and compiling, "
              f"{len(d._compiled_shapes)} input shape(s)); compiled graphs are cached in "
              f"{compile_cache()} for later runs")


def _sd_args(args) -> dict:
    """The Stable Diffusion single-file options given (tokenizer, prediction, image size)."""
    return {k: getattr(args, k) for k in ("tokenizer", "prediction", "image_size") if getattr(args, k, None)}


def _add_sd_args(p) -> None:
    p.add_argument("--tokenizer", help="Stable Diffusion single files: a CLIP tokenizer folder (an SD pipeline's "
                                       "tokenizer/)")
    p.add_argument("--prediction", choices=("eps", "v"), help="Stable Diffusion single files: what the U-Net "
                                                              "predicts (default: 1.x eps, 2.x v)")
    p.add_argument("--image-size", type=int, help="Stable Diffusion single files: the image size in pixels "
                                                  "(default: 1.x 512, 2.x 768)")


def cmd_import_sd(args) -> int:
    from .sd import import_sd

    ckpt = import_sd(args.path, args.out, **_sd_args(args))
    print(f"checkpoint: {ckpt}")
    return 0


def _has_scale(item: str) -> bool:
    head, sep, tail = item.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep and head)


def _write_samples(gen, out: str | None, out_dir: str | None, nrow: int | None) -> int:
    rec = gen.record
    if out:
        gen.save_grid(out, nrow=nrow)
        print(f"grid: {out}")
    if out_dir:
        gen.save_images(out_dir)
        print(f"images: {out_dir} ({len(gen)} PNGs, each with its generation record)")
    conds = list(dict.fromkeys(r["cond"] for r in gen.records if r.get("cond") is not None))
    what = ""
    if conds and isinstance(conds[0], str):
        what = " (prompts " + ", ".join(repr(c) for c in conds[:6]) + (" ..." if len(conds) > 6 else "") + ")"
    elif conds:
        what = f" (class{'es' if len(conds) > 1 else ''} " + ", ".join(str(c) for c in conds) + ")"
    print(f"{len(gen)} samples, {rec['sampler']}, {rec['steps']} steps ({gen.nfe} model evaluations), "
          f"{gen.seconds:.1f} s{what}")
    return 0


def cmd_invert(args) -> int:
    from .checkpoints import save_file_atomic
    from .metrics.stats import psnr
    from .pipeline import Pipeline

    pipe = Pipeline.load(args.checkpoint, device=args.device, precision=args.precision,
                         text_encoder=args.text_encoder, autoencoder=args.autoencoder)
    inv = pipe.invert(args.image, prompt=args.prompt, class_label=args.class_label, steps=args.steps,
                      spacing=args.spacing, guidance=args.guidance, iterations=args.iterations, progress=True)
    out = Path(args.out)
    save_file_atomic(out, {"noise": inv.noise}, {"kind": "kakusan-noise", "record": json.dumps(inv.record),
                                                 "regenerate": json.dumps(inv.regenerate)})
    print(f"noise: {out} ({len(inv.noise)} x {tuple(inv.noise.shape[1:])}, {inv.record['steps']} DDIM steps, "
          f"{inv.seconds:.1f} s)")
    if args.check:  # regenerate from the noise and compare with the input
        gen = pipe(noise=inv.noise, **inv.regenerate)
        from .pipeline import _load_picture

        c, h, _ = pipe.image_shape
        original, _ = _load_picture(args.image, c, h, "image")
        print(f"regenerated from it: PSNR {psnr(gen.uint8(), original).mean():.2f} dB to the input"
              + ("" if not args.out_image else f"; {gen.save_grid(args.out_image)}"))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.dry_run:
        from .demo import DEMO_DEFAULTS

        print(json.dumps({**DEMO_DEFAULTS, "out": args.out, **({"steps": args.steps} if args.steps else {})},
                         indent=2))
        return 0
    r = run_demo(args.out, steps=args.steps, seed=args.seed)
    print(f"\ntrained {r['steps']} steps in {r['train_s']:.0f} s; sampled 100 digits ({r['sampler']}, "
          f"{r['sample_steps']} steps) in {r['sample_s']:.1f} s")
    print(f"an independent classifier (SVM, {100 * r['classifier_held_out_accuracy']:.1f}% on held-out real "
          f"digits) reads {100 * r['agreement']:.0f}% of the samples as the digit asked for")
    print(f"grid (one row per digit 0-9): {r['grid']}\ncheckpoint: {r['checkpoint']}")
    return 0


def cmd_serve(args) -> int:
    from .serve import Limits, default_checkpoints

    limits = Limits(max_n=args.max_n, max_steps=args.max_steps, max_batch=args.max_batch,
                    max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_upload_pixels,
                    max_models=args.max_models, queue_size=args.queue_size)
    checkpoints = args.checkpoint or default_checkpoints()
    if args.dry_run:
        print(json.dumps({"checkpoints": [str(c) for c in checkpoints], "host": args.host, "port": args.port,
                          "lora": args.lora or [], "embedding": args.embedding or [], **vars(limits)}, indent=2))
        return 0
    try:
        import gradio  # noqa: F401
    except ImportError:
        from .errors import ConfigError

        raise ConfigError("kakusan serve needs Gradio: pip install 'kakusan[ui]'") from None
    from .serve import serve

    serve(checkpoints, host=args.host, port=args.port, limits=limits, device=args.device, loras=args.lora,
          preview_every=args.preview_every, embeddings=args.embedding)
    return 0


def cmd_samplers(args) -> int:
    from .samplers import DEFAULT_GRIDS, DEFAULT_SAMPLER, SAMPLERS

    print(f"{'name':<16} {'order':>5} {'evals/step':>10} {'stochastic':>10}  {'default grid':<20} description")
    for name, info in SAMPLERS.items():
        order = "-" if info.stochastic else str(info.order)
        grid = info.default_spacing + (f", sigma~ <= {info.default_sigma_max:g}" if info.default_sigma_max else
                                       ", by steps" if name == DEFAULT_SAMPLER else "")
        mark = " (default)" if name == DEFAULT_SAMPLER else ""
        print(f"{name:<16} {order:>5} {info.nfe_per_step:>10} {str(info.stochastic):>10}  {grid:<20} "
              f"{info.summary}{mark}")
    print("\norder: p in error ~ steps^-p, the error to the exact probability-flow ODE endpoint, as "
          "tests/test_samplers.py\nmeasures it on a Gaussian mixture ('-': stochastic, no single endpoint); "
          "UniPC's corrector adds one to its\npredictor's order. Default grid: the spacing of the steps unless "
          "--spacing is given; sigma~ = sigma / alpha.\nThe default sampler's grid by steps (cap, floor, rho; "
          "samplers.DEFAULT_GRIDS): " + "; ".join(
              f"{f'<= {most} steps' if most < 2**31 else 'more'}: sigma~ {row['sigma_min'] or 't=0'}.."
              f"{row['sigma_max']:g}, rho {row['rho']:g}"
              + (f", {row['last_step']} last step" if row.get("last_step", "denoise") != "denoise" else "")
              for most, row in DEFAULT_GRIDS) + ".")
    return 0


# The configuration each preset's parameter count is for: the trainer sizes a preset to its data (channels, size,
# classes, text width), so a count needs one; these are the ones the README quotes.
PRESET_COUNTED_AS = {
    "unet-text32": ({"context_dim": 384}, "text, 384-wide tokens (MiniLM)"),
    **{name: ({"num_classes": 1000, "learn_sigma": True}, "1,000 classes + learned sigma (paper)")
       for name in ("dit-s2", "dit-b2", "dit-l2", "dit-xl2")},
}


def cmd_presets(args) -> int:
    from dataclasses import replace

    import torch

    from .models import PRESETS, build_model, describe

    print(f"{'preset':<14} {'params':>8} {'exactly':>12}  {'counted for':<37} architecture")
    for name, cfg in PRESETS.items():
        overrides, counted = PRESET_COUNTED_AS.get(name, ({}, "unconditional"))
        cfg = replace(cfg, **overrides)
        with torch.device("meta"):  # count without allocating (dit-xl2 has 675M parameters)
            model = build_model(cfg)
            n = sum(p.numel() for p in model.parameters())
        if "(paper)" in counted:  # the DiT's fixed sin-cos position table, a parameter in the paper's code
            n += model.pos_embed.numel()
        print(f"{name:<14} {n / 1e6:7.2f}M {n:>12,}  {counted:<37} {describe(cfg)}")
    print("\n(paper): as the DiT paper's code counts, its fixed position table included. The trainer sizes a preset "
          "to its\ndata (channels, image size, classes, text width), so a run's count differs; its checkpoint "
          "records the architecture.")
    return 0


def cmd_models(args) -> int:
    from .zoo import SHIPPED_DIR, shipped_models

    models = shipped_models()
    if not models:
        print(f"no shipped models in {SHIPPED_DIR}")
        return 0
    print(f"{'name':<14} {'size':>8} {'weights':<8} {'score':<52} what")
    for m in models:
        score = "; ".join(s["summary"] for s in m.get("scores", [])[:1]) or "-"
        print(f"{m['name']:<14} {m['bytes'] / 1e6:6.1f}MB {m['dtype']:<8} {score:<52} {m['title']}")
    print()
    for m in models:
        print(f"  {m['example']}")
    print(f"\nUse a name wherever a checkpoint goes (--checkpoint, --init-from, Pipeline.load). FID in the domain "
          f"classifier's features\n(docs/RESULTS.md). How each was trained and scored (command, data hash, evaluation "
          f"records):\n{SHIPPED_DIR / 'index.json'}")
    return 0


def cmd_export(args) -> int:
    from .checkpoints import export_model

    out = export_model(args.checkpoint, args.out, dtype=args.dtype, use_ema=not args.no_ema)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.dtype}, "
          f"{'raw' if args.no_ema else 'EMA'} weights)")
    return 0


def cmd_import_dit(args) -> int:
    from .errors import ConfigError
    from .interop import import_dit

    names = None
    if args.class_names:
        f = Path(args.class_names)
        if not f.is_file():
            raise ConfigError(f"class names file not found: {f}")
        names = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    ckpt = import_dit(args.weights, args.out, autoencoder=args.autoencoder, latent_scale=args.latent_scale,
                      num_heads=args.num_heads, class_names=names)
    print(f"checkpoint: {ckpt}")
    return 0


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


def _guidance_list(text: str):
    return [None if v.strip().lower() in ("none", "off") else float(v) for v in text.split(",") if v.strip()]


def cmd_train_autoencoder(args) -> int:
    from .training.autoencoder import AutoencoderTrainConfig, AutoencoderTrainer, reconstruction_report

    cfg = _config_from(args, AutoencoderTrainConfig)
    if args.dry_run:
        print(json.dumps(cfg.__dict__, indent=2))
        return 0
    trainer = AutoencoderTrainer(cfg)
    if args.resume:
        trainer.resume()
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    ckpt = trainer.fit()
    print(f"checkpoint: {ckpt} (latent scale {trainer.ae_cfg.scale_factor:.4f}, factor {trainer.ae_cfg.factor}, "
          f"{trainer.ae_cfg.latent_channels} latent channels)")
    if args.eval_split:
        r = reconstruction_report(ckpt, cfg.data, args.eval_split, Path(cfg.out) / f"reconstructions-{args.eval_split}.png",
                                  limit=args.eval_limit)
        print(f"{args.eval_split} split: PSNR {r['psnr_mean']:.2f} dB over {r['n']} images; grid: {r['grid']}")
    return 0


def cmd_train_classifier(args) -> int:
    from .metrics.classifier import train_classifier

    r = train_classifier(args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         widths=tuple(args.widths), seed=args.seed, augment=args.augment, limit=args.limit,
                         noisy_schedule=args.noisy)
    worst = min(range(len(r["per_class_accuracy"])), key=lambda k: r["per_class_accuracy"][k])
    print(f"{args.data}: test accuracy {100 * r['test_accuracy']:.2f}% on {r['test_size']:,} images "
          f"(worst class {worst}: {100 * r['per_class_accuracy'][worst]:.1f}%), trained in {r['train_seconds']:.0f} s"
          + "".join(f"\nat t = {t}: {100 * a:.1f}%" for t, a in r["noisy_test_accuracy"].items())
          + f"\nclassifier: {r['path']}\nsha256: {r['sha256']}")
    return 0


def _reference(args, extractor):
    from .metrics.evaluate import reference_set

    return reference_set(extractor, args.ref, args.ref_split, args.ref_limit, args.ref_stats, args.device_resolved)


GUIDE_HELP = ("autoguidance: guide with this weaker version of the model (an earlier checkpoint or a smaller "
              "preset of the same data and conditioning); --guidance W then means D_guide + W (D - D_guide) "
              "instead of classifier-free guidance")


def _eval_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guide-model", help=GUIDE_HELP)
    p.add_argument("--prompt", action="append", help="text models: a prompt to sample (repeat; the samples are "
                                                    "spread evenly over them)")
    p.add_argument("--negative-prompt", help="text models: guide away from this prompt")
    p.add_argument("--negative-class", type=int, help="guide away from this class")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="phi in [0, 1] (Lin et al. 2024)")
    p.add_argument("--guidance-interval", type=_csv(float), help="lo,hi: guide only where lo < sigma/alpha <= hi")


def _check_guide_model(args) -> None:
    """--guide-model without a --guidance value would sample unguided: refused (sample, eval, sweep alike; a
    sweep's list may hold 'none' beside other values, as its unguided baseline)."""
    from .errors import ConfigError

    values = args.guidance if isinstance(args.guidance, (list, tuple)) else [args.guidance]
    if getattr(args, "guide_model", None) and all(v is None for v in values):
        raise ConfigError("--guide-model needs --guidance W (autoguidance's scale; 1 = the model alone)")


def _guidance_options(args) -> dict:
    return {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "negative_class": args.negative_class,
            "guidance_rescale": args.guidance_rescale, "guidance_interval": args.guidance_interval}


EMBEDDING_HELP = ("text models: a textual-inversion embedding file (learned_embeds.safetensors of a "
                  "--textual-inversion run, diffusers' or A1111 / kohya's layout), its word usable in the prompts "
                  "(repeat for several)")


def _eval_common(p: argparse.ArgumentParser, extractor_required: bool = True) -> None:
    p.add_argument("--extractor", required=extractor_required, help="classifier:FILE | inception | inception:FILE")
    p.add_argument("--embedding", action="append", help=EMBEDDING_HELP)
    p.add_argument("--ref", help="real data set spec (mnist, fashion-mnist, cifar10[:PATH], folder:DIR, ...)")
    p.add_argument("--ref-split", default="test", help="split of --ref (default test)")
    p.add_argument("--ref-limit", type=int, help="use only the first N reference images")
    p.add_argument("--ref-stats", help="a stats file written by 'kakusan stats' instead of --ref")
    p.add_argument("--download", action="store_true", help="allow downloading the Inception weights (online)")
    p.add_argument("--seed", type=int, default=0, help="the samples' seed")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dry-run", action="store_true", help="print the resolved arguments and exit")


def cmd_eval(args) -> int:
    from .errors import ConfigError
    from .metrics.evaluate import folder_features, format_scores, sample_features, score
    from .metrics.features import load_extractor
    from .diffusion import resolve_device

    if bool(args.checkpoint) == bool(args.images):
        raise ConfigError("give exactly one of --checkpoint (sample from it) or --images DIR")
    _check_guide_model(args)
    subject_only = [f for f, v in (("--base", args.base), ("--clip", args.clip),
                                   ("--drift-prompts", args.drift_prompts)) if v]
    if subject_only and not args.subject:
        raise ConfigError(f"{', '.join(subject_only)}: options of --subject DIR (judging a model taught a subject)")
    if not args.extractor and not (args.subject and args.clip):
        raise ConfigError("give --extractor (classifier:FILE | inception | inception:FILE)"
                          + (" or --clip DIR" if args.subject else ""))
    if args.dry_run:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2))
        return 0
    args.device_resolved = resolve_device(args.device)
    if args.subject:
        return _eval_subject(args)
    extractor = load_extractor(args.extractor, download=args.download)
    ref = _reference(args, extractor)
    if args.checkpoint:
        fake = sample_features(extractor, args.checkpoint, args.n, device=args.device_resolved,
                               sampler=args.sampler, steps=args.steps, spacing=args.spacing, guidance=args.guidance,
                               seed=args.seed, batch_size=args.batch_size, progress=True, precision=args.precision,
                               compile=args.compile, guide=args.guide_model, embedding=args.embedding,
                               **_guidance_options(args))
    else:
        fake = folder_features(extractor, args.images, args.n, device=args.device_resolved)
    result = score(extractor, fake, ref, tuple(args.metrics))
    print(format_scores(result))
    _write_scores(args.out, result)
    return 0


def _write_scores(out, result: dict) -> None:
    """eval's --out: the scores with their record, as JSON (NaN written as null)."""
    from .metrics.evaluate import nan_to_none

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(nan_to_none(result), indent=2))
        print(f"scores and record: {out}")


def _eval_subject(args) -> int:
    """``eval --subject DIR``: subject fidelity, prompt fidelity, prior drift (kakusan.metrics.subject)."""
    from .errors import ConfigError
    from .metrics.features import load_extractor
    from .metrics.subject import ClipScorer, evaluate_subject, format_subject

    not_here = [f for f, v in (("--ref", args.ref), ("--ref-stats", args.ref_stats), ("--guide-model",
                                                                                       args.guide_model),
                               ("--negative-prompt", args.negative_prompt)) if v]
    if not_here:
        raise ConfigError(f"{', '.join(not_here)}: not options of --subject (its reference is the subject's images)")
    drift = None
    if args.drift_prompts:
        try:
            drift = [ln.strip() for ln in Path(args.drift_prompts).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ConfigError(f"--drift-prompts {args.drift_prompts}: {e.strerror or e}") from None
        if not drift:
            raise ConfigError(f"--drift-prompts {args.drift_prompts}: no prompts in it")
    extractor = load_extractor(args.extractor, download=args.download) if args.extractor else None
    clip = ClipScorer(args.clip, args.device_resolved) if args.clip else None
    result = evaluate_subject(args.checkpoint, args.subject, args.prompt or [], n=args.n, extractor=extractor,
                              clip=clip, base=args.base, drift_prompts=drift, sampler=args.sampler, steps=args.steps,
                              guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                              device=args.device_resolved, precision=args.precision, embedding=args.embedding,
                              images=args.images)
    result.pop("images")
    print(format_subject(result))
    _write_scores(args.out, result)
    return 0


def cmd_stats(args) -> int:
    from .metrics.evaluate import reference_features, write_stats
    from .metrics.features import load_extractor
    from .diffusion import resolve_device

    extractor = load_extractor(args.extractor, download=args.download)
    device = resolve_device(args.device)
    fs = reference_features(extractor, args.data, args.split, args.limit, cache=False, device=device)
    path = write_stats(extractor, fs, args.out)
    print(f"{fs.n:,} feature vectors ({extractor.feature_dim}-D, {extractor.name}) of {args.data} -> {path}")
    return 0


def _read_scores(path: str) -> dict:
    """A score file written by ``kakusan eval --out``, or a ConfigError saying in one line why it is not one."""
    from .errors import ConfigError

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict) or not isinstance(d.get("record"), dict):
        raise ConfigError(f"{path}: not a kakusan score file (no 'record' of how its scores were made; "
                          f"'kakusan eval --out FILE' writes one)")
    if not isinstance(d.get("scores", {}), dict):
        raise ConfigError(f"{path}: its 'scores' are not a JSON object")
    return d


def _score_value(v) -> str | None:
    if isinstance(v, dict):  # kid, is: mean and spread
        v = v.get("mean")
    if v is None:  # NaN / inf are written as null
        return "n/a"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.4g}"
    return None


def cmd_compare(args) -> int:
    from .metrics.provenance import check_comparable

    a, b = _read_scores(args.a), _read_scores(args.b)
    diff = check_comparable(a["record"], b["record"], strict=not args.warn_only)
    for name, r in (("A", a), ("B", b)):
        shown = ((k, _score_value(v)) for k, v in r.get("scores", {}).items())
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown if v is not None))
    print("comparable" if not diff else f"NOT comparable ({len(diff)} differences above)")
    return 0


def cmd_sweep(args) -> int:
    from .metrics.evaluate import ema_sweep, nan_to_none, plot_sweep, sweep
    from .metrics.features import load_extractor
    from .diffusion import resolve_device

    _check_guide_model(args)
    if args.dry_run:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2))
        return 0
    if args.ema:  # refuse a bad width or a run without snapshots before any feature is computed
        from .training.posthoc_ema import check_reconstructable

        check_reconstructable(args.checkpoint, args.ema)
    distance = None
    if args.reference:  # the distance to the reference sampler's samples: checked and loaded before sampling
        from .metrics.evaluate import parse_reference
        from .metrics.lpips import default_distance, load_distance

        parse_reference(args.reference)
        spec = args.distance
        if spec is None:
            spec, note = default_distance(args.extractor)
            if note:
                print(f"kakusan: {note}", file=sys.stderr)
        distance = load_distance(spec)
    elif args.distance:
        from .errors import ConfigError

        raise ConfigError("--distance measures each point against --reference SAMPLER:STEPS (e.g. ddpm:1000): "
                          "give it")
    args.device_resolved = resolve_device(args.device)
    extractor = load_extractor(args.extractor, download=args.download)
    ref = _reference(args, extractor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist_col = {"lpips": "LPIPS", "feature_distance": "featdist"}.get(distance.label) if distance else None
    header = ("sigma_rel " if args.ema else "") + f"{'sampler':<16} {'steps':>5} {'NFE':>4} {'w':>5} {'FID':>9} " \
             f"{'KID x1e3':>9} {'prec':>6} {'recall':>6} {'agree':>6} {'time s':>7}" \
             + (f" {dist_col:>8}" if dist_col else "")
    print(header)

    def show(r):
        g = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        agree = f"{100 * r['class_agreement']:5.1f}%" if "class_agreement" in r else "     -"
        sr = f"{r['sigma_rel']:>9g} " if "sigma_rel" in r else ""
        print(f"{sr}{r['sampler']:<16} {r['steps']:>5} {r['nfe']:>4} {g:>5} {r.get('fid', float('nan')):>9.3f} "
              f"{1e3 * r.get('kid', float('nan')):>9.3f} {r.get('precision', float('nan')):>6.3f} "
              f"{r.get('recall', float('nan')):>6.3f} {agree} {r['sample_seconds']:>7.1f}"
              + (f" {r[distance.label]:>8.4f}" if distance else ""), flush=True)

    kw = dict(seed=args.seed, device=args.device_resolved, batch_size=args.batch_size, on_row=show,
              grid_dir=out / "grids" if args.grids else None, guide=args.guide_model, reference=args.reference,
              distance=distance, embedding=args.embedding, **_guidance_options(args))
    if args.ema:  # --checkpoint is the run; each width reconstructed into OUT/ema-srS, then swept
        rows = ema_sweep(extractor, args.checkpoint, ref, args.ema, args.samplers, args.steps, args.guidance, args.n,
                         out, **kw)
    else:
        rows = sweep(extractor, args.checkpoint, ref, args.samplers, args.steps, args.guidance, args.n, **kw)
    (out / "sweep.json").write_text(json.dumps(nan_to_none(rows), indent=2))
    png = plot_sweep(rows, out / "sweep.png")
    label = rows[0]["result"]["preliminary"]
    print(f"table: {out / 'sweep.json'}\nplot: {png}" + (f"\n[{label}]" if label else ""))
    return 0


def cmd_ema_reconstruct(args) -> int:
    from .training.posthoc_ema import reconstruct_checkpoint

    ckpt = reconstruct_checkpoint(args.run, args.sigma_rel, args.step, args.out)
    rec = json.loads((ckpt / "config.json").read_text())["ema_reconstruction"]
    snaps = rec["snapshots"]
    big = sorted(snaps, key=lambda s: -abs(s["coefficient"]))[:4]
    print(f"sigma_rel {rec['sigma_rel']:g} (gamma {rec['gamma']:.3f}) at step {rec['step']:,} from {len(snaps)} "
          f"snapshots of steps {snaps[0]['step']:,} .. {snaps[-1]['step']:,}, profile fit error "
          f"{100 * rec['fit_error']:.2g}%; largest coefficients: "
          + ", ".join(f"{s['file']} {s['coefficient']:+.3f}" for s in big) + " (all in its config.json)")
    print(f"checkpoint: {ckpt}\nsample it: kakusan sample --checkpoint {ckpt.parent}")
    return 0


def cmd_lora_convert(args) -> int:
    from .lora import to_kohya

    out = to_kohya(args.file, args.out)
    print(f"{out}: kohya's layout (lora_unet_*.lora_down / lora_up / alpha), for AUTOMATIC1111, ComfyUI, kohya's "
          f"scripts and diffusers' load_lora_weights")
    return 0


def cmd_lora_info(args) -> int:
    from .lora import _file_keys_and_metadata, adapter_format

    fmt = adapter_format(args.file)
    keys, meta = _file_keys_and_metadata(Path(args.file).expanduser())
    downs = [k for k in keys if k.endswith((".lora_A.weight", ".lora_down.weight"))]
    te = [k for k in downs if k.startswith(("text_encoder.", "lora_te_"))]
    print(f"{args.file}: {fmt} layout, {len(downs)} adapted layers ({len(downs) - len(te)} U-Net / backbone, "
          f"{len(te)} text encoder)" + (f", rank {meta['rank']}, alpha {meta['alpha']}" if fmt == "kakusan" else ""))
    return 0


def cmd_ema_list(args) -> int:
    from .training.posthoc_ema import SNAPSHOT_DIR, run_snapshots

    _, snaps = run_snapshots(args.run)  # none: refused, naming --posthoc-ema
    profiles = sorted({(s.sigma_rel, s.gamma) for s in snaps})
    print("profiles: " + ", ".join(f"sigma_rel {sr:g} (gamma {g:.3f})" for sr, g in profiles))
    print(f"{'step':>10} {'images seen':>13} {'sigma_rel':>9} {'size':>10}  file")
    total = 0
    for s in snaps:
        size = s.path.stat().st_size
        total += size
        print(f"{s.step:>10,} {s.images_seen:>13,} {s.sigma_rel:>9g} {size / 1e6:>7.2f} MB  {s.path.name}")
    print(f"{len(snaps)} snapshots, {total / 1e6:.1f} MB in {Path(args.run) / SNAPSHOT_DIR}; reconstruct any "
          f"sigma_rel up to step {snaps[-1].step:,}: kakusan ema reconstruct --run {args.run} --sigma-rel S")
    return 0


def cmd_plot(args) -> int:
    from . import plots

    what = args.what
    out = args.out or f"{what}.png"
    if what == "schedules":
        path = plots.plot_schedules(out)
    elif what == "forward":
        path = plots.plot_forward(out, schedule=args.schedule)
    elif what == "embedding":
        path = plots.plot_embedding(out, dim=args.dim)
    elif what == "loss":
        from .errors import ConfigError

        if not args.run or len(args.run) > 1:
            raise ConfigError("plot loss needs one --run RUN_DIR (or a log.jsonl path)")
        path = plots.plot_loss(args.run[0], out)
    elif what == "metrics":
        path = plots.plot_metrics(args.run or [], out, args.label)
    elif what == "samplers":
        from .errors import ConfigError

        if not args.checkpoint:
            raise ConfigError("plot samplers needs --checkpoint")
        configs = []
        for item in args.configs:
            name, _, steps = item.partition(":")
            try:
                configs.append((name, int(steps) if steps else args.steps))
            except ValueError:
                raise ConfigError(f"--configs takes SAMPLER[:STEPS] items, got {item!r}") from None
        path = plots.sampler_rows(args.checkpoint, out, configs, guidance=args.guidance, seed=args.seed)
    else:
        from .errors import ConfigError

        if not args.checkpoint:
            raise ConfigError("plot trajectory needs --checkpoint")
        path = plots.trajectory(args.checkpoint, out, sampler=args.sampler, steps=args.steps,
                                class_label=args.class_label, guidance=args.guidance, seed=args.seed)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .samplers import DEFAULT_SAMPLER

    parser = argparse.ArgumentParser(prog="kakusan", description="Image diffusion models: train, sample, evaluate, plot, demo.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a diffusion model")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint folder, run folder, model .safetensors, or a shipped model's "
                                        "name ('kakusan models')")
    p.add_argument("--from-png", help="make the image (or grid) of a kakusan PNG again, from the record it carries "
                                      "(--checkpoint: the same weights in another place)")
    p.add_argument("--sampler", help=f"see 'kakusan samplers' (default {DEFAULT_SAMPLER}; lcm for a distilled model)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20; 4 for a distilled model)")
    p.add_argument("--spacing", help="leading | trailing | linspace | karras | logsnr | exponential "
                                     "(default: the sampler's)")
    p.add_argument("--sigma-max", type=float, help="cap the karras / logsnr grid at this sigma/alpha")
    p.add_argument("--eta", type=float, help="DDIM eta in [0, 1]")
    p.add_argument("-n", type=int, help="number of samples (default 64; with --noise, one per noise)")
    p.add_argument("--batch-size", type=int, help="images per sampler batch (default min(n, 256)); batch j is "
                                                  "seeded with seed + j")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-image", help="img2img / inpainting: start from this image (resized to the model's size)")
    p.add_argument("--strength", type=float, help="img2img: how much to change it, 0 (return it) .. 1 (ignore it) "
                                                  "(default 0.8; 1 with --mask)")
    p.add_argument("--mask", help="inpainting: a mask image (resized to the model's size; white = repaint, black = "
                                  "keep), or lower-half | upper-half | left-half | right-half | center")
    p.add_argument("--resample-steps", type=int, default=1,
                   help="inpainting: RePaint's resampling, each step done this many times (default 1)")
    p.add_argument("--noise", help="start from this noise file (kakusan invert): its grid unless --sampler/--steps")
    p.add_argument("--class", dest="class_label", type=int, help="class index (class-conditional models)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (class- or text-conditional models)")
    p.add_argument("--negative-class", type=int, help="guide away from this class (replaces the null label)")
    p.add_argument("--guide-model", help=GUIDE_HELP)
    p.add_argument("--prompt", action="append", help="text models: the prompt (repeat for one row per prompt)")
    p.add_argument("--negative-prompt", help="text models: guide away from this prompt (replaces the empty one)")
    p.add_argument("--text-encoder", help="text models: the encoder's folder, if not where it was in training")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="phi in [0, 1] (Lin et al. 2024)")
    p.add_argument("--guidance-interval", type=_csv(float), help="lo,hi: guide only where lo < sigma/alpha <= hi")
    p.add_argument("--classifier", help="classifier guidance with this noise-aware classifier (train-classifier --noisy)")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance scale s (default 1)")
    p.add_argument("--out", help="grid PNG path (default samples.png unless --out-dir; '' for none)")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--out-dir", help="also write one PNG per sample here")
    p.add_argument("--autoencoder", help="latent models: the autoencoder, if not where it was in training")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--lora", action="append", help="a LoRA adapter (lora.safetensors of a --lora-rank run) to apply "
                                                   "to this checkpoint, the base it was trained on; FILE:SCALE sets "
                                                   "its strength; repeat to stack adapters")
    p.add_argument("--embedding", action="append", help=EMBEDDING_HELP)
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of adapters given without :SCALE "
                                                                 "(default 1)")
    p.add_argument("--precision", default="auto",
                   help="the network's forward pass: auto (bf16 autocast on CUDA and on CPUs with native bf16, "
                        "fp32 elsewhere) | fp32 | bf16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (pays for many images: compiling takes tens of seconds on a "
                        "CPU the first time, less once cached)")
    p.add_argument("--no-clip", action="store_true", help="do not clamp x0_hat to [-1, 1]")
    p.add_argument("--controlnet", action="append",
                   help="a ControlNet to steer the model (a kakusan --controlnet run trained on this checkpoint, or "
                        "for Stable Diffusion a diffusers ControlNetModel folder / single file); repeat for several. "
                        "A ControlNet run given as --checkpoint brings its base")
    p.add_argument("--control", action="append",
                   help="the control image (one per ControlNet, in order): the map itself, or a picture with "
                        "--control-type")
    p.add_argument("--control-type", help="compute the map from each --control: canny | sobel | scribble (default "
                                          "none: the image is the map; one type for all ControlNets, a list in Python)")
    p.add_argument("--control-scale", type=float, action="append",
                   help="weight of each ControlNet's residuals (default 1; repeat per ControlNet)")
    p.add_argument("--control-cond-only", action="store_true",
                   help="with --guidance: steer only the conditional branch (as diffusers' guess mode, without "
                        "its residual scale ramp)")
    p.add_argument("--offload", action="store_true", help="keep the text encoder and autoencoder on the CPU while "
                                                          "the network runs on --device")
    _add_sd_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("invert", help="DDIM inversion: the noise an image comes from (sample --noise regenerates it)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, action="append", help="the image(s) to invert (repeat for several)")
    p.add_argument("--class", dest="class_label", type=int, help="class-conditional models: the images' class")
    p.add_argument("--prompt", help="text models: the images' prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--spacing", help="the grid (default DDIM's: trailing)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance during inversion (default none)")
    p.add_argument("--iterations", type=int, default=2,
                   help="fixed-point refinements per step (default 2; 0 = plain DDIM inversion)")
    p.add_argument("--out", required=True, help="the noise file to write (.safetensors)")
    p.add_argument("--check", action="store_true", help="regenerate from the noise and print the PSNR to the input")
    p.add_argument("--out-image", help="with --check: write the regenerated image(s) here")
    p.add_argument("--text-encoder")
    p.add_argument("--autoencoder")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("demo", help="train briefly on the bundled real digits, sample, write a grid")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-autoencoder", help="train the KL autoencoder of latent diffusion")
    p.add_argument("--config", help="a JSON file of autoencoder training values (flags override it)")
    p.add_argument("--data", help="a data spec, as for train (e.g. cifar10:PATH)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--channels", type=int)
    p.add_argument("--factor", type=int, help="downsampling factor 4 or 8 (default 4)")
    p.add_argument("--latent-channels", type=int, help="default 4")
    p.add_argument("--model", type=json.loads, help='JSON overrides, e.g. \'{"channels": 64, "num_res_blocks": 2}\'')
    p.add_argument("--rec-loss", help="l1 (default) | l2")
    p.add_argument("--kl-weight", type=float)
    p.add_argument("--disc-weight", type=float, help="> 0: patch-discriminator hinge loss with this weight")
    p.add_argument("--disc-start", type=int, help="the step the discriminator starts at")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--hflip", action="store_true", default=None)
    p.add_argument("--limit", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/autoencoder)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--device")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--eval-split", default="test", help="after training: PSNR + grid on this split ('' for none)")
    p.add_argument("--eval-limit", type=int, default=10000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("train-classifier", help="train the domain classifier used for offline evaluation")
    p.add_argument("--data", required=True, help="mnist[:DIR] | fashion-mnist[:DIR] | cifar10[:PATH] | folder:DIR")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split (one MNIST epoch: ~7 min "
                                                             "on 2 shared CPU cores), then the test split is scored")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2, help="peak of the one-cycle SGD learning rate")
    p.add_argument("--widths", type=_csv(int), default=[32, 64, 128], help="three stage widths, e.g. 32,64,128")
    p.add_argument("--augment", default="auto", help="auto | none | crop | crop-flip")
    p.add_argument("--limit", type=int, help="use only the first N training images (the test split stays whole)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noisy", metavar="SCHEDULE", help="train on noisy x_t of this schedule, with t as input "
                                                       "(for classifier guidance; e.g. cosine)")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("eval", help="FID / KID / IS / precision-recall of a checkpoint's samples or an image folder")
    p.add_argument("--checkpoint", help="sample from this checkpoint")
    p.add_argument("--images", help="or score the images in this folder")
    p.add_argument("-n", type=int, default=10_000, help="number of samples (default 10,000)")
    p.add_argument("--sampler", help=f"default {DEFAULT_SAMPLER} (lcm for a distilled model)")
    p.add_argument("--steps", type=int, help="default 20 (4 for a distilled model)")
    p.add_argument("--spacing", help="leading | trailing | linspace | karras | logsnr | exponential "
                                     "(default: the sampler's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: none)")
    p.add_argument("--metrics", type=_csv(str), default=["fid", "kid", "is", "pr"], help="subset of fid,kid,is,pr")
    p.add_argument("--out", help="write scores + provenance record as JSON here")
    p.add_argument("--precision", default="auto", help="the network's forward pass when sampling: auto | fp32 | bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for sampling")
    p.add_argument("--subject", metavar="DIR", help="judge a model taught a subject against the subject's images in "
                   "DIR (DreamBooth's numbers): subject fidelity in --extractor's features (or --clip's), prompt "
                   "fidelity (with --clip), prior drift (with --base); instead of FID and the others")
    p.add_argument("--base", help="with --subject: the model before tuning, for prior drift (its samples and the "
                                  "checkpoint's of unrelated prompts from the same noise)")
    p.add_argument("--clip", metavar="DIR", help="with --subject: a Hugging Face CLIP model folder: its image "
                                                 "features for subject fidelity, and prompt fidelity")
    p.add_argument("--drift-prompts", metavar="FILE", help="with --base: the unrelated prompts, one a line (default: "
                                                           "kakusan's 50, kakusan.metrics.subject.DRIFT_PROMPTS)")
    _eval_guidance_args(p)
    _eval_common(p, extractor_required=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("stats", help="write a reference feature-statistics file (with its record)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int)
    p.add_argument("--extractor", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("compare", help="check that two score JSON files were made the same way")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--warn-only", action="store_true", help="warn instead of refusing")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="score samplers x steps x guidance: table, JSON and plot")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samplers", type=_csv(str), default=["ddim", DEFAULT_SAMPLER])
    p.add_argument("--steps", type=_csv(int), default=[5, 10, 20, 50])
    p.add_argument("--guidance", type=_guidance_list, default=[None], help="e.g. 1,2,3 (none: no guidance)")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--out", default="runs/sweep", help="folder for sweep.json and sweep.png")
    p.add_argument("--grids", action="store_true", help="also save a grid of the first 40 samples of each point")
    p.add_argument("--ema", type=_csv(float), metavar="SIGMA_RELS",
                   help="post-hoc EMA widths to score, e.g. 0.02,0.05,0.10,0.15: --checkpoint is then a run trained "
                        "with --posthoc-ema, each width is reconstructed into OUT/ema-srS and swept")
    p.add_argument("--reference", metavar="SAMPLER:STEPS",
                   help="e.g. ddpm:1000: add each point's distance to this sampler's samples from the same noises "
                        "(--distance)")
    p.add_argument("--distance", help="with --reference: lpips:alex | lpips:vgg (torchvision's weights file from "
                                      "the torch hub cache) | lpips:NET:FILE | classifier:FILE (a labelled stand-in "
                                      "in the domain classifier's features). Default: lpips:alex where its weights "
                                      "are on disk, else the stand-in with --extractor's classifier")
    _eval_guidance_args(p)
    _eval_common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("ema", help="post-hoc EMA: list a run's snapshots, reconstruct an EMA of any width from them")
    ema = p.add_subparsers(dest="ema_command", required=True)
    q = ema.add_parser("reconstruct", help="the EMA of width --sigma-rel as a checkpoint (from a run trained with "
                                           "--posthoc-ema)")
    q.add_argument("--run", required=True, help="the run folder (its posthoc-ema/ snapshots and config)")
    q.add_argument("--sigma-rel", type=float, required=True,
                   help="relative width of the EMA, in (0, 0.2887]: its profile's std as a share of training time")
    q.add_argument("--step", type=int, help="the EMA as of this step (default: the newest snapshot's)")
    q.add_argument("--out", help="folder to write (step-*/ + latest; default RUN/posthoc-ema/srS)")
    q.set_defaults(func=cmd_ema_reconstruct)
    q = ema.add_parser("list", help="the snapshots of a run and their profiles")
    q.add_argument("--run", required=True, help="the run folder")
    q.set_defaults(func=cmd_ema_list)

    p = sub.add_parser("lora", help="LoRA files: what layout a file is in; a Stable Diffusion run's adapters in "
                                    "kohya's layout")
    lora = p.add_subparsers(dest="lora_command", required=True)
    q = lora.add_parser("convert", help="write a kakusan SD LoRA file in kohya's layout (lora_unet_* keys with "
                                        "alpha: AUTOMATIC1111, ComfyUI, kohya's scripts). Its own lora.safetensors "
                                        "already has diffusers' / peft's keys")
    q.add_argument("file", help="a lora.safetensors of an SD --lora-rank run")
    q.add_argument("--to", choices=["kohya"], default="kohya")
    q.add_argument("--out", required=True, help="the .safetensors file to write")
    q.set_defaults(func=cmd_lora_convert)
    q = lora.add_parser("info", help="the layout of a LoRA file (kakusan / diffusers / kohya), its layers and rank")
    q.add_argument("file")
    q.set_defaults(func=cmd_lora_info)

    p = sub.add_parser("plot", help="pictures: schedules, forward, embedding, loss, metrics, trajectory, samplers")
    p.add_argument("what", choices=["schedules", "forward", "embedding", "loss", "metrics", "trajectory", "samplers"])
    p.add_argument("--out", help="PNG path (default WHAT.png)")
    p.add_argument("--schedule", default="linear", help="for 'forward'")
    p.add_argument("--dim", type=int, default=128, help="for 'embedding'")
    p.add_argument("--run", action="append", help="for 'loss': a run folder or log.jsonl; for 'metrics': a run "
                                                  "trained with --eval-every (repeat to compare runs on one figure)")
    p.add_argument("--label", action="append", help="for 'metrics': a legend label per --run (default: the folders' "
                                                    "names)")
    p.add_argument("--checkpoint", help="for 'trajectory' and 'samplers'")
    p.add_argument("--configs", type=_csv(str), default=["ddim:10", "unipc-2:10", "ddpm:1000"],
                   help="for 'samplers': rows, SAMPLER[:STEPS] comma-separated (default ddim:10,unipc-2:10,ddpm:1000)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--class", dest="class_label", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("import-dit", help="convert a DiT checkpoint of the paper's released code (.pt state dict) "
                                          "into a kakusan checkpoint")
    p.add_argument("weights", help="e.g. DiT-XL-2-256x256.pt (read without unpickling code)")
    p.add_argument("--out", required=True, help="the run folder to write (sample with --checkpoint OUT)")
    p.add_argument("--autoencoder", help="the diffusers AutoencoderKL folder of its latent space (sd-vae-ft-ema), "
                                         "so that sample decodes")
    p.add_argument("--latent-scale", type=float, default=0.18215, help="the latent scale it was trained with")
    p.add_argument("--num-heads", type=int, help="attention heads (default: the paper's for the model's width)")
    p.add_argument("--class-names", help="a text file with one class name per line")
    p.set_defaults(func=cmd_import_dit)

    p = sub.add_parser("serve", help="a local web page over the pipeline (Gradio; pip install 'kakusan[ui]')")
    p.add_argument("--checkpoint", action="append", help="a checkpoint the page may use (repeat for several; the "
                                                         "page chooses among these only; default runs/demo, "
                                                         "the model make demo trains, and the shipped models)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback prints a warning")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--lora", action="append", help="a LoRA adapter file the page may apply (repeat for several)")
    p.add_argument("--embedding", action="append", help="a textual-inversion embedding file loaded into every text "
                                                        "model served, its word usable in the prompts (repeat)")
    p.add_argument("--max-models", type=int, default=2, help="checkpoints kept loaded at once")
    p.add_argument("--max-n", type=int, default=16, help="images per request")
    p.add_argument("--max-steps", type=int, default=200, help="sampling steps per request")
    p.add_argument("--max-batch", type=int, default=16, help="images per sampler batch")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="size of an uploaded file")
    p.add_argument("--max-upload-pixels", type=int, default=16 * 1024 * 1024,
                   help="width x height of an uploaded image")
    p.add_argument("--queue-size", type=int, default=8, help="requests waiting at once; more are told the "
                                                             "queue is full")
    p.add_argument("--preview-every", type=int, default=0, help="show the predicted x0 every N steps (0: about "
                                                                "ten times per request)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import-sd", help="convert a Stable Diffusion 1.x / 2.x checkpoint (a diffusers pipeline "
                                         "folder or the original single .safetensors file) into a kakusan one")
    p.add_argument("path", help="the SD folder (model_index.json, unet/, ...) or single file")
    p.add_argument("--out", required=True, help="the run folder to write (sample with --checkpoint OUT)")
    _add_sd_args(p)
    p.set_defaults(func=cmd_import_sd)

    sub.add_parser("samplers", help="list the samplers").set_defaults(func=cmd_samplers)
    sub.add_parser("models", help="list the small trained models shipped with kakusan (use a name as --checkpoint)"
                   ).set_defaults(func=cmd_models)
    p = sub.add_parser("export", help="one model file for sampling: a checkpoint's EMA weights and its config, "
                                      "optionally in fp16 / bf16")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, run folder or model file")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="the weights' storage type (default fp32; loading casts back to fp32)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.set_defaults(func=cmd_export)
    sub.add_parser("presets", help="list the model presets (U-Nets and DiTs)").set_defaults(func=cmd_presets)
    for command in sub.choices.values():  # every default in every --help
        _show_defaults(command)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default X)`` to the help of each option whose help does not already say its default (options
    whose unset value means 'off' or 'not given' say nothing)."""
    for action in parser._actions:
        text, value = action.help or "", action.default
        if (not action.option_strings or "default" in text or value is None or value is False
                or value is argparse.SUPPRESS):
            continue
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else ("''" if value == "" else value)
        shown = str(shown).replace("%", "%%")
        action.help = f"{text} (default {shown})" if text else f"default {shown}"


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"kakusan: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    from .errors import KakusanError

    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except KakusanError as e:
        print(f"kakusan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kakusan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
