"""Run every command of the README's code blocks in a CPU-sized form and fail when one fails.

    make readme-check                      # installs .venv if needed, then runs this
    python tools/readme_check.py --list    # what would run, what is skipped and why, nothing run
    python tools/readme_check.py --only sample --keep

Each ```bash block's lines run in order, in one temporary folder (so `runs/mnist` made by one line is there for
the next), through the installed `kakusan` entry point, with a fresh cache (KAKUSAN_CACHE); each ```python block
runs in a folder of its own. What changes on the way, all in this file:

- the README's placeholder data paths (`mnist:/path/to/mnist`, `cifar10:/path/...`, `/data/...`) become the real
  data sets in ../shared/data (or --data DIR); Fashion-MNIST is Debian's /usr/share/datasets/fashion-mnist;
- sizes shrink (SIZES): training steps map to a few steps (monotonically, so a resume still goes further and
  `step-00001000` paths follow), batches, data (--limit), samples (-n), sampling steps and epochs are capped;
- pseudo-syntax (`samplers | presets`, `[--steps N]`, `...`) is expanded (RULES);
- what cannot run here is skipped with its reason (RULES): a GPU, 8 processes, downloads, release weights.

A kakusan command no rule knows runs as it is written, after the generic substitutions, so a new README line is
checked from the day it appears; a command that is not kakusan's and has no rule fails ("no rule"), so that it
gets one. Exit status 1 when any command fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TIMEOUT_S = 900  # one command


# ---- sizes ------------------------------------------------------------------------------------------------------

def train_steps(v: int) -> int:
    """Training steps, CPU-sized: monotone (a resume to more steps still trains on) and a few at most."""
    return max(2, min(12, v // 5000))


# per subcommand: flags capped at a value ("cap"), set to a value ("set"), added when absent ("add")
SIZES = {
    "train": {"add": {"--batch-size": "16", "--limit": "512", "--steps": "2", "--eval-n": "150", "--eval-steps": "4"},
              "cap": {"--batch-size": 16, "--eval-n": 150, "--eval-steps": 4}},
    "train-autoencoder": {"add": {"--batch-size": "8", "--limit": "256", "--eval-limit": "64", "--steps": "2"},
                          "cap": {"--batch-size": 8}},
    "train-classifier": {"add": {"--epochs": "1", "--limit": "2048"}, "cap": {"--epochs": 1}},
    "sample": {"add": {"-n": "10"}, "cap": {"-n": 10, "--steps": 8}},
    # FID needs more samples than feature dimensions (the domain classifier's 128)
    "eval": {"add": {"--ref-limit": "500"}, "cap": {"-n": 150, "--steps": 8}},
    "sweep": {"add": {"--ref-limit": "500", "-n": "150"}, "cap": {"-n": 150}, "set": {"--steps": "4"}},
    "stats": {"add": {"--limit": "500"}},
    "demo": {"cap": {"--steps": 40}},
    "plot": {"cap": {"--steps": 8}},
    "invert": {"cap": {"--steps": 8}},
    "samplers": {}, "presets": {}, "compare": {}, "import-dit": {}, "models": {}, "export": {},
}
TRAINING = ("train", "train-autoencoder")  # their --steps go through train_steps
GENERIC = {"cap": {"-n": 10, "--steps": 8}}  # a kakusan subcommand SIZES does not know yet
# the sample grids a training run draws (one at its end): a few sampler steps, through a --config file given to the
# train commands that have none (only the keys the installed TrainConfig has)
GRID_CONFIG = {"sample_steps": 2}


# ---- rules -------------------------------------------------------------------------------------------------------

@dataclass
class Rule:
    pattern: str  # a regex searched in the command (its comment included, whitespace collapsed)
    skip: str | None = None  # skip, with this reason
    expand: list[str] | None = None  # run these instead (regex groups as {1}, {2})
    replace: tuple[str, str] | None = None  # text substitution before the generic ones
    extra: dict[str, str] = field(default_factory=dict)  # flags to set on this command (benchmarks)
    needs_cuda: bool = False
    needs_fashion: bool = False


RULES = [
    Rule(r"^make test\b", skip="the test suite itself: `make test`, run by CI"),
    Rule(r"^make demo\b", skip="installs and trains ~2 min; `kakusan demo --steps N` below runs the same code"),
    Rule(r"^make readme-check\b", skip="this script"),
    Rule(r"^make install\b", skip="makes .venv: this script runs in it (make readme-check installs first)"),
    Rule(r"^\.venv/bin/kakusan ", replace=(".venv/bin/kakusan ", "kakusan ")),
    Rule(r"^make serve\b|^kakusan serve\b", skip="a server that runs until stopped; tests/test_serve.py and "
                                                 "tests/test_serve_browser.py start one and use it"),
    Rule(r"^kakusan demo \[--steps N\]", expand=["kakusan demo --steps 40"]),
    Rule(r"^kakusan samplers \| presets \| models", expand=["kakusan samplers", "kakusan presets", "kakusan models"]),
    Rule(r"^kakusan plot schedules \| forward \| embedding \| loss --run (\S+) \| trajectory --checkpoint (\S+)",
         expand=["kakusan plot schedules", "kakusan plot forward", "kakusan plot embedding",
                 "kakusan plot loss --run {1}", "kakusan plot trajectory --checkpoint {2} --steps 8"]),
    Rule(r"^kakusan sweep .* \.\.\. ", replace=("...", "--extractor classifier:cls/mnist.safetensors "
                                                       "--ref mnist:/path/to/mnist")),
    Rule(r"^kakusan sweep .*--reference ddpm:1000", replace=("ddpm:1000", "ddpm:8")),
    Rule(r"^kakusan import-dit ", skip="needs the DiT paper's released weights (DiT-XL-2-256x256.pt) and "
                                       "Stable Diffusion's sd-vae-ft-ema: downloads (tests/test_dit.py checks the "
                                       "formats with small models)"),
    Rule(r"--checkpoint runs/dit-xl2\b", skip="samples the imported DiT-XL/2 (import-dit is skipped)"),
    Rule(r"~/models/", skip="needs real Stable Diffusion 1.5 / 2.1 weights (downloads); tests/test_sd.py checks "
                            "both layouts with small SD-shaped models"),
    Rule(r"--checkpoint runs/sd15\b", skip="samples the imported SD 1.5 (import-sd is skipped)"),
    Rule(r"runs/sd15-style/", skip="converts the SD 1.5 LoRA run's adapters (that run needs real SD weights); "
                                   "tests/test_sd.py converts a small one"),
    Rule(r"photos/my-cat|runs/my-cat-", skip="needs pictures of your subject; tests/test_personalization.py trains "
                                            "textual inversion and DreamBooth on small images"),
    Rule(r"^python benchmarks/sd_sampling\.py", extra={"--tiny": "", "--device": "cpu", "--repeats": "1"}),
    Rule(r"\bfashion-mnist\b", needs_fashion=True),
    Rule(r"^torchrun ", skip="8 processes and a global batch of 1024 on GPUs; tests/test_distributed.py runs "
                             "2 CPU processes against 1"),
    Rule(r"^pip install\b", skip="installs packages (network); `make install` / `make bench` do it"),
    Rule(r"^python benchmarks/.*# on a GPU", needs_cuda=True),
    Rule(r"^python benchmarks/train_throughput\.py", extra={"--batch-size": "4", "--steps": "2", "--warmup": "1"}),
    Rule(r"^python benchmarks/sampling_throughput\.py",
         extra={"--batch-size": "4", "--calls": "2", "--warmup": "1", "--steps": "2"}),
    Rule(r"^python benchmarks/sampler_accuracy\.py", extra={"--quick": "", "--starts": "64"}),
    Rule(r"^python benchmarks/sampler_grid_oracle\.py",
         extra={"--select": "32", "--test": "32", "--nfe": "10", "--schedules": "linear", "--evals": "3"}),
]


# ---- the README ---------------------------------------------------------------------------------------------------

@dataclass
class Command:
    text: str  # as the README has it (continuations joined)
    line: int  # README line number
    block: int
    lang: str  # bash | python
    run: list[str] | str | None = None  # argv (bash) or source (python); None when skipped
    skip: str | None = None
    note: str = ""


def read_blocks(readme: Path) -> list[tuple[int, int, str, list[tuple[int, str]]]]:
    """(block index, first line, language, [(line number, line)]) of each fenced code block."""
    blocks, inside, lang, lines, start = [], False, "", [], 0
    for i, line in enumerate(readme.read_text().splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and not inside:
            inside, lang, lines, start = True, fence.group(1) or "text", [], i
        elif line.startswith("```") and inside:
            blocks.append((len(blocks), start, lang, lines))
            inside = False
        elif inside:
            lines.append((i, line))
    return blocks


def commands_of(blocks) -> list[Command]:
    out = []
    for index, start, lang, lines in blocks:
        if lang in ("bash", "sh", "shell", "console"):
            pending, first = "", 0
            for number, line in lines:
                stripped = line.strip()
                if not pending and (not stripped or stripped.startswith("#")):
                    continue
                first = first or number
                if stripped.endswith("\\"):
                    pending += stripped[:-1] + " "
                    continue
                out.append(Command(" ".join((pending + stripped).split()), first, index, "bash"))
                pending, first = "", 0
        elif lang == "python":
            out.append(Command("\n".join(line for _, line in lines), start + 1, index, "python"))
    return out


# ---- substitutions --------------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"^(/path|/data|DIR$|PATH$)")


def data_path(kind: str, data: Path) -> str | None:
    return {"mnist": str(data / "mnist"), "cifar10": str(data / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"),
            "emoji": str(data / "emoji-google-64.tar.gz"),
            "fashion-mnist": str(FASHION) if FASHION.is_dir() else None}.get(kind)


def substitute_data(token: str, data: Path) -> str:
    kind, sep, path = token.partition(":")
    if sep and PLACEHOLDER.match(path):
        real = data_path(kind, data)
        if real is None:
            raise LookupError(f"no data here for {token!r} (add it to data_path in tools/readme_check.py)")
        return f"{kind}:{real}"
    return token


def set_flag(argv: list[str], flag: str, value: str | None) -> None:
    """Set ``flag`` to ``value`` (None: a switch without a value), adding it when absent."""
    if flag in argv:
        i = argv.index(flag)
        if value is not None:
            argv[i + 1] = value
    else:
        argv += [flag] if value is None else [flag, value]


def resize(argv: list[str], grid_config: str | None = None) -> list[str]:
    """The CPU-sized form of a kakusan command (argv[0] == 'kakusan')."""
    argv = list(argv)
    sub = argv[1] if len(argv) > 1 else ""
    if sub == "train" and grid_config and "--config" not in argv and "--resume" not in argv:
        argv += ["--config", grid_config]
    sizes = SIZES.get(sub, GENERIC)
    resume = "--resume" in argv
    if sub in TRAINING and "--steps" in argv:
        i = argv.index("--steps")
        argv[i + 1] = str(train_steps(int(argv[i + 1])))
    for flag, cap in sizes.get("cap", {}).items():
        if flag in argv and not (sub in TRAINING and flag == "--steps"):
            i = argv.index(flag)
            try:
                argv[i + 1] = str(min(int(argv[i + 1]), cap))
            except ValueError:
                pass
    for flag, value in sizes.get("set", {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    # a sample from a noise file or a PNG's record takes its count from there
    counted = sub == "sample" and ("--noise" in argv or "--from-png" in argv)
    for flag, value in sizes.get("add", {}).items():
        if counted and flag == "-n":
            continue
        if flag not in argv and not (resume and flag != "--steps"):  # a resume takes its run's sizes
            argv += [flag, value]
    if sub == "plot" and "--configs" in argv:  # SAMPLER:STEPS items, steps capped
        i = argv.index("--configs")
        argv[i + 1] = re.sub(r":(\d+)", lambda m: f":{min(int(m.group(1)), 8)}", argv[i + 1])
    # checkpoint paths name the step a training run ended at: follow train_steps
    return [re.sub(r"step-(\d{8})", lambda m: f"step-{train_steps(int(m.group(1))):08d}", a) for a in argv]


def resize_python(source: str, data: Path, grid: dict | None = None) -> str:
    def train(m):
        return (f"steps={train_steps(int(m.group(1)))}, batch_size=16, limit=512"
                + "".join(f", {k}={v!r}" for k, v in (grid or {}).items()))

    source = re.sub(r"\bsteps=(\d{4,})", train, source)  # training-sized step counts
    source = re.sub(r"\bsteps=(\d{1,3})\b", lambda m: f"steps={min(int(m.group(1)), 8)}", source)
    return re.sub(r'"((?:mnist|cifar10|emoji):(?:/path|/data)[^"]*)"',
                  lambda m: '"' + substitute_data(m.group(1), data) + '"', source)


def plan(cmd: Command, data: Path, cuda: bool, grid_config: str | None = None, grid: dict | None = None
         ) -> list[Command]:
    """The command(s) to run for one README command, or the command marked skipped."""
    text = cmd.text
    if cmd.lang == "python":
        try:
            cmd.run = resize_python(text, data, grid)
        except LookupError as e:
            cmd.skip = str(e)
        return [cmd]
    texts, extra = [text], {}
    for rule in RULES:
        m = re.search(rule.pattern, text)
        if not m:
            continue
        if rule.skip:
            cmd.skip = rule.skip
            return [cmd]
        if rule.needs_cuda and not cuda:
            cmd.skip = "needs a CUDA GPU"
            return [cmd]
        if rule.needs_fashion and not FASHION.is_dir():
            cmd.skip = f"Fashion-MNIST is not installed here ({FASHION}: apt-get install dataset-fashion-mnist)"
            return [cmd]
        if rule.expand:
            texts = [t.format(None, *m.groups()) for t in rule.expand]
        if rule.replace:
            texts = [t.replace(*rule.replace) for t in texts]
        extra.update(rule.extra)
    out = []
    for t in texts:
        argv = shlex.split(t, comments=True)
        c = Command(t, cmd.line, cmd.block, "bash")
        try:
            argv = [substitute_data(a, data) for a in argv]
        except LookupError as e:
            c.skip = str(e)
            out.append(c)
            continue
        if argv[0] == "kakusan":
            if len(argv) > 1 and argv[1] not in SIZES:
                c.note = "no size rule for this subcommand: generic caps"
            argv = resize(argv, grid_config)
        elif argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].startswith("benchmarks/"):
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
            for flag, value in extra.items():
                set_flag(argv, flag, value or None)
            set_flag(argv, "--json", str(Path("benchmark-results") / (Path(argv[1]).stem + ".json")))
        else:
            c.skip = None
            c.run = None
            c.note = "no rule for this command: add one to RULES in tools/readme_check.py"
            out.append(c)
            continue
        c.run = argv
        out.append(c)
    return out


# ---- running --------------------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--data", default=os.environ.get("KAKUSAN_DATA", str(ROOT.parent / "shared" / "data")),
                   help="the data sets (mnist/, cifar10-jpeg/, emoji-google-64.tar.gz; default ../shared/data)")
    p.add_argument("--list", action="store_true", help="print the plan, run nothing")
    p.add_argument("--only", help="run only commands whose text contains this (the others are skipped)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--workdir", help="run in this folder instead of a temporary one")
    args = p.parse_args()

    data = Path(args.data).resolve()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    kakusan = shutil.which("kakusan", path=env["PATH"])
    if not args.list:
        if kakusan is None:
            print("readme-check: the `kakusan` entry point is not installed (make install)", file=sys.stderr)
            return 2
        if not (data / "mnist").is_dir():
            print(f"readme-check: no data sets at {data} (pass --data DIR)", file=sys.stderr)
            return 2
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    grid_config = None
    try:
        from kakusan.training.trainer import TrainConfig

        grid = {k: v for k, v in GRID_CONFIG.items() if k in TrainConfig.__dataclass_fields__}
        grid_config = "readme-check-grids.json" if grid else None
    except ImportError:
        grid = {}
    planned = [c for cmd in commands_of(read_blocks(Path(args.readme))) for c in plan(cmd, data, cuda, grid_config, grid)]
    if args.only:
        for c in planned:
            if args.only not in c.text and c.skip is None:
                c.skip, c.run = f"not selected (--only {args.only})", None

    if args.list:
        work = Path(args.workdir or "<a temporary folder>")
    else:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="kakusan-readme-"))
        work.mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(exist_ok=True)
    env["KAKUSAN_CACHE"] = str(work / "cache")
    if grid_config and not args.list:
        import json

        (work / grid_config).write_text(json.dumps(grid))
    print(f"README commands in {work} (kakusan: {kakusan}, data: {data})", flush=True)
    results, t_all = [], time.perf_counter()
    for i, c in enumerate(planned):
        shown = c.text if len(c.text) < 110 else c.text[:107] + "..."
        if c.skip:
            results.append(("skipped", c, 0.0))
            print(f"[{i + 1:2}/{len(planned)}] skip  {shown}\n        ({c.skip})", flush=True)
            continue
        if c.run is None:
            results.append(("failed", c, 0.0))
            print(f"[{i + 1:2}/{len(planned)}] FAIL  {shown}\n        ({c.note})", flush=True)
            continue
        runnable = " ".join(map(shlex.quote, c.run)) if isinstance(c.run, list) else "<python block>"
        if args.list:
            print(f"[{i + 1:2}/{len(planned)}] run   {runnable}" + (f"  [{c.note}]" if c.note else ""))
            continue
        cwd = work if c.lang == "bash" else work / f"python-{c.block}"
        cwd.mkdir(exist_ok=True)
        argv = c.run if isinstance(c.run, list) else [sys.executable, "-c", c.run]
        if argv[0] == "kakusan":
            argv = [kakusan, *argv[1:]]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = -1, str(e.stdout or ""), f"timed out after {TIMEOUT_S} s"
        dt = time.perf_counter() - t0
        log = work / "logs" / f"{i + 1:02d}.txt"
        log.write_text(f"$ {runnable}\n(README line {c.line})\n--- stdout\n{out}\n--- stderr\n{err}\n")
        status = "ok" if rc == 0 else "failed"
        results.append((status, c, dt))
        print(f"[{i + 1:2}/{len(planned)}] {'ok  ' if rc == 0 else 'FAIL'}  {dt:6.1f} s  {runnable}", flush=True)
        if rc != 0:
            tail = [line for line in err.splitlines() if line.strip()][-5:]
            print("        " + "\n        ".join(tail) + f"\n        (exit {rc}; log {log})", flush=True)
    if args.list:
        return 0
    counts = {s: sum(1 for r in results if r[0] == s) for s in ("ok", "skipped", "failed")}
    print(f"\n{counts['ok']} passed, {counts['skipped']} skipped, {counts['failed']} failed "
          f"in {time.perf_counter() - t_all:.0f} s (README line: command)")
    for status, c, _ in results:
        if status != "ok":
            print(f"  {status:<7} line {c.line}: {c.text[:100]}" + (f"\n           {c.skip}" if c.skip else ""))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
