"""tools/readme_check.py's plan of the README (what `make readme-check` runs, CPU-sized), without running it."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rc():
    spec = importlib.util.spec_from_file_location("readme_check", ROOT / "tools" / "readme_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_check"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    yield module
    del sys.modules["readme_check"]


@pytest.fixture(scope="module")
def planned(rc):
    commands = rc.commands_of(rc.read_blocks(ROOT / "README.md"))
    return [c for cmd in commands for c in rc.plan(cmd, Path("/data-sets"), cuda=False)]


def test_every_readme_command_is_run_or_skipped_with_a_reason(planned):
    assert len(planned) > 30
    for c in planned:
        assert c.run is not None or c.skip, (c.line, c.text, c.note)  # no command without a rule
    ran = [c for c in planned if c.run is not None]
    assert len(ran) > 2 * sum(1 for c in planned if c.skip)
    for c in ran:
        text = c.run if isinstance(c.run, str) else " ".join(c.run)
        assert "/path" not in text and ":/data/" not in text, text  # placeholder paths replaced


def test_sizes_shrink_and_keep_the_order_of_runs(rc, planned):
    def argv(prefix):
        return next(c.run for c in planned if isinstance(c.run, list) and " ".join(c.run).startswith(prefix))

    first = argv("kakusan train --data mnist:/data-sets/mnist --preset unet-mnist --cond class --steps")
    resume = argv("kakusan train --out runs/mnist")
    steps = lambda a: int(a[a.index("--steps") + 1])  # noqa: E731
    assert steps(first) < steps(resume) <= 12  # the resume still trains on
    assert resume == ["kakusan", "train", "--out", "runs/mnist", "--steps", str(steps(resume)), "--resume"]  # as written
    assert "--batch-size" in first and "--limit" in first
    lora = argv("kakusan sample --checkpoint runs/mnist --lora")
    assert f"step-{rc.train_steps(1000):08d}" in " ".join(lora)  # the checkpoint the (resized) LoRA run wrote
    for c in planned:
        if isinstance(c.run, list) and c.run[:2] == ["kakusan", "eval"]:
            assert int(c.run[c.run.index("-n") + 1]) <= 150


def test_unknown_kakusan_commands_run_as_written_and_others_need_a_rule(rc):
    new = rc.Command("kakusan img2img --checkpoint runs/mnist --image in.png --strength 0.5 --steps 50 -n 64", 1, 0,
                     "bash")
    (c,) = rc.plan(new, Path("/d"), cuda=False)
    assert c.run[:2] == ["kakusan", "img2img"] and c.run[c.run.index("--steps") + 1] == "8" and "--image" in c.run
    (c,) = rc.plan(rc.Command("curl https://example.org/weights.pt", 1, 0, "bash"), Path("/d"), cuda=False)
    assert c.run is None and not c.skip and "no rule" in c.note  # reported as a failure
