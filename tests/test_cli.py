import json
import subprocess
import sys

import pytest
from PIL import Image

from kakusan.cli import main


def kakusan(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kakusan.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kakusan: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_for_every_command(capsys):
    for cmd in ("train", "sample", "demo", "samplers", "presets"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: kakusan " + cmd in capsys.readouterr().out


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--data", "mnist:/x", "--preset", "unet-mnist", "--steps", "7", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["steps"] == 7 and cfg["preset"] == "unet-mnist" and cfg["prediction"] == "v"


def test_lists(capsys):
    assert main(["samplers"]) == 0 and "ddim" in capsys.readouterr().out
    assert main(["presets"]) == 0 and "35.75M" in capsys.readouterr().out


def test_train_then_sample_from_the_checkpoint_alone(tmp_path):
    run = tmp_path / "run"
    r = kakusan("train", "--preset", "unet-tiny", "--cond", "class", "--steps", "4", "--batch-size", "8",
                "--limit", "64", "--sample-every", "100", "--out", run)
    assert r.returncode == 0, r.stderr
    grid = tmp_path / "g.png"
    r = kakusan("sample", "--checkpoint", run, "--steps", "3", "-n", "6", "--class", "7", "--guidance", "2",
                "--out", grid, "--out-dir", tmp_path / "each")
    assert r.returncode == 0, r.stderr
    assert Image.open(grid).size[0] >= 256 and len(list((tmp_path / "each").glob("*.png"))) == 6
    r = kakusan("sample", "--checkpoint", run, "--sampler", "ddpm", "--steps", "2", "-n", "2", "--out", grid)
    assert r.returncode == 0, r.stderr
    _one_line_error(kakusan("sample", "--checkpoint", run, "--class", "12", "--steps", "2"), "out of range")
    r = kakusan("sample", "--checkpoint", run, "--steps", "3", "-n", "4", "--guidance", "3", "--negative-class", "1",
                "--guidance-rescale", "0.7", "--guidance-interval", "0.3,8", "--out", grid)
    assert r.returncode == 0, r.stderr
    _one_line_error(kakusan("sample", "--checkpoint", run, "--guidance", "2", "--negative-class", "12"), "out of range")
    _one_line_error(kakusan("sample", "--checkpoint", run, "--negative-class", "1"), "need --guidance")
    _one_line_error(kakusan("sample", "--checkpoint", run, "--steps", "-3"), "positive")
    uncond = tmp_path / "uncond"
    assert kakusan("train", "--preset", "unet-tiny", "--steps", "2", "--batch-size", "4", "--limit", "16",
                   "--sample-every", "100", "--out", uncond).returncode == 0
    _one_line_error(kakusan("sample", "--checkpoint", uncond, "--guidance", "3"), "unconditional")
    _one_line_error(kakusan("sample", "--checkpoint", uncond, "--class", "1"), "unconditional")
    r = kakusan("train", "--preset", "unet-tiny", "--cond", "class", "--steps", "6", "--batch-size", "8",
                "--limit", "64", "--sample-every", "100", "--out", run, "--resume")
    assert r.returncode == 0 and "resumed at step 4" in r.stderr, r.stderr


def test_bad_inputs_give_one_line_errors(tmp_path):
    _one_line_error(kakusan("train", "--data", f"mnist:{tmp_path}/missing", "--steps", "1"), "not found")
    _one_line_error(kakusan("train", "--preset", "unet-gigantic"), "unknown preset")
    _one_line_error(kakusan("train", "--steps", "0"), "steps")
    _one_line_error(kakusan("sample", "--checkpoint", tmp_path / "nope"), "checkpoint not found")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_text("this is not a checkpoint")
    _one_line_error(kakusan("sample", "--checkpoint", bogus), "not a readable kakusan checkpoint")
    _one_line_error(kakusan("sample", "--checkpoint", bogus, "--sampler", "warp"), "unknown sampler")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG corrupt")
    r = kakusan("train", "--data", f"folder:{folder}", "--image-size", "8", "--steps", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "kakusan: warning: " + f"{folder}: skipped 1 unreadable file(s): broken.png (UnidentifiedImageError)",
        f"kakusan: error: {folder}: none of the 1 image files could be read"]


def test_shipped_run_configs_are_valid(capsys):
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    assert paths
    for path in paths:
        assert main(["train", "--config", str(path), "--dry-run"]) == 0
        cfg = json.loads(capsys.readouterr().out)
        assert cfg == {**cfg, **json.loads(path.read_text())}  # every value of the file survives validation


def _main_one_line_error(capsys, argv, *needles):
    """``main(argv)`` in this process: exit status 2 and one line ``kakusan: error: ...`` (a traceback would raise)."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kakusan: error:"), lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_compare_refuses_files_it_cannot_compare_in_one_line(tmp_path, capsys):
    record = {"extractor": {"name": "classifier", "weights_sha256": "ab" * 32, "resize": "none",
                            "feature_dtype": "float32"},
              "reference": {"data": "digits", "split": "test", "n": 1797}, "samples": {"n": 40}}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"scores": {"fid": 12.5, "kid": {"mean": 0.01, "stderr": 0.002}, "recall": None},
                                "record": record}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"scores": {"fid": 9.0}, "record": {**record, "samples": {"n": 30}}}))
    no_record = tmp_path / "no-record.json"
    no_record.write_text(json.dumps({"scores": {"fid": 1.0}}))
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2, 3]")
    broken = tmp_path / "broken.json"
    broken.write_text('{"scores": {"fid": 1.0}, "record": ')
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")

    assert main(["compare", str(good), str(good)]) == 0
    out = capsys.readouterr().out
    assert "comparable" in out and "fid 12.5" in out and "recall n/a" in out
    _main_one_line_error(capsys, ["compare", good, other], "not comparable", "samples.n: 40 vs 30")
    _main_one_line_error(capsys, ["compare", good, no_record], str(no_record), "no 'record'")
    _main_one_line_error(capsys, ["compare", a_list, good], str(a_list), "no 'record'")
    _main_one_line_error(capsys, ["compare", good, broken], str(broken), "not JSON", "line 1")
    _main_one_line_error(capsys, ["compare", binary, good], str(binary))
    _main_one_line_error(capsys, ["compare", good, tmp_path / "missing.json"], "missing.json", "not found")
    # --warn-only: the differences become a warning, the scores are shown
    with pytest.warns(UserWarning, match="samples.n"):
        assert main(["compare", str(good), str(other), "--warn-only"]) == 0
    assert "NOT comparable (1 differences above)" in capsys.readouterr().out


def test_samplers_listing_says_each_fact_once(capsys):
    from kakusan.samplers import DEFAULT_SAMPLER, SAMPLERS

    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:len(SAMPLERS) + 1]}
    assert list(rows) == list(SAMPLERS)
    assert sum(line.count("default)") for line in lines) == 1 and rows[DEFAULT_SAMPLER].endswith("(default)")
    assert rows["unipc-2"].split()[1] == "3" and "karras, by steps" in rows["unipc-2"]
    assert ("<= 7 steps: sigma~ 0.2..5, rho 7; <= 14 steps: sigma~ 0.1..10, rho 7, gaussian last step; more: "
            "sigma~ t=0..10, rho 7.") in lines[-1]
    assert rows["ddpm"].split()[1] == "-"  # stochastic: no ODE order
    for name, line in rows.items():  # the order is said in its column only
        assert not any(w in line.lower() for w in ("2nd order", "second-order", "order 3")), line
    assert "steps^-p" in "\n".join(lines)  # and what the column means


def test_presets_state_what_each_count_is_for_and_agree_with_the_readme(capsys):
    from pathlib import Path

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("unet-", "dit-", "ddpm-"))}
    assert "2,101,507" in rows["unet-text32"] and "384-wide" in rows["unet-text32"]
    assert "675,129,632" in rows["dit-xl2"] and "1,000 classes + learned sigma" in rows["dit-xl2"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    para = readme[readme.index("Presets (`kakusan presets`"):]
    para = " ".join(para[:para.index("\n\n")].split())
    for name, line in rows.items():  # every preset the README names, with the count the CLI prints for it
        assert f"`{name}`" in para, name
        if name not in ("unet-tiny", "dit-tiny"):  # (the test presets have no figure)
            params, exactly = line.split()[1:3]
            assert params in para or exactly in para, (name, params, exactly)
    assert "384-wide" in para and "1,000 classes" in para  # and the configuration it counts


def _readme_resume_line():
    """The README's resume command, as tokens (its comment dropped)."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("kakusan train") and "--resume" in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def test_the_readme_resume_line_resumes_from_the_run_folder_alone(tmp_path):
    tokens = _readme_resume_line()
    assert tokens[:2] == ["kakusan", "train"] and tokens[tokens.index("--out") + 1] == "runs/mnist"
    # a tiny class-conditional run, nothing like the defaults (digits, unet-digits, unconditional, batch 128)
    r = kakusan("train", "--preset", "unet-tiny", "--cond", "class", "--steps", "3", "--batch-size", "8",
                "--limit", "64", "--lr", "1e-3", "--sample-every", "1000", "--seed", "5", "--out", "runs/mnist",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "runs" / "mnist" / "config.json").read_text())["train"]
    # the README's line verbatim, with a --steps this test can afford
    tokens[tokens.index("--steps") + 1] = "6"
    r = kakusan(*tokens[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "changed: steps 3 -> 6" in r.stderr and "resumed at step 3" in r.stderr, r.stderr
    assert (tmp_path / "runs" / "mnist" / "checkpoints" / "step-00000006" / "model.safetensors").is_file()
    after = json.loads((tmp_path / "runs" / "mnist" / "config.json").read_text())["train"]
    assert after == {**saved, "steps": 6}  # the run's own config, the step count alone changed
    # flags beside --resume that change what the run computes are refused, each named with both values
    tokens[tokens.index("--steps") + 1] = "16"
    r = kakusan(*tokens[1:], "--preset", "unet-digits", "--cond", "class", "--lr", "2e-4", "--batch-size", "8",
                cwd=tmp_path)
    _one_line_error(r, "cannot resume runs/mnist", 'preset: saved "unet-tiny", given "unet-digits"',
                    "lr: saved 0.001, given 0.0002")
    assert "cond: saved" not in r.stderr and "batch_size: saved" not in r.stderr  # those match (not listed as
    # differences; the run-control list names eval_batch_size)
    # --dry-run shows the resumed config and what the rest costs
    r = kakusan(*tokens[1:], "--dry-run", "--estimate-steps", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {**saved, "steps": 16}
    assert "changed: steps 6 -> 16" in r.stderr and "10 steps (from step 6)" in r.stderr, r.stderr
    _one_line_error(kakusan("train", "--out", "runs/none", "--resume", cwd=tmp_path), "nothing to resume")


def test_resume_accepts_moved_data_only_if_it_is_the_same_data(tmp_path, capsys):
    import shutil

    import numpy as np

    from test_data import _write_idx

    def idx(folder, n):
        folder.mkdir()
        rng = np.random.default_rng(0)
        _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
        _write_idx(folder / "train-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))

    idx(tmp_path / "a", 32)
    run = str(tmp_path / "run")
    common = ["--preset", "unet-tiny", "--batch-size", "4", "--sample-every", "1000"]
    assert main(["train", "--data", f"mnist:{tmp_path / 'a'}", *common, "--steps", "2", "--out", run]) == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["train", "--data", f"mnist:{tmp_path / 'b'}", "--out", run, "--steps", "3", "--resume"]) == 0
    assert f'changed: data "mnist:{tmp_path / "a"}" -> "mnist:{tmp_path / "b"}"' in capsys.readouterr().err
    idx(tmp_path / "c", 40)
    _main_one_line_error(capsys, ["train", "--data", f"mnist:{tmp_path / 'c'}", "--out", run, "--steps", "4",
                                  "--resume"], "not the data it was trained on", "size: saved 32, now 40")
    _main_one_line_error(capsys, ["train", "--data", "digits", "--out", run, "--steps", "4", "--resume"],
                         'data: saved "mnist:')
    # --dry-run builds the run on random data: what needs the weights is checked too
    _main_one_line_error(capsys, ["train", "--init-from", run, "--cond", "class", "--dry-run", "--batch-size", "4"],
                         "unconditional", "--cond none")


def test_dry_run_validates_without_data_and_estimates_the_cost(tmp_path, capsys):
    _one_line_error(kakusan("train", "--preset", "nope", "--dry-run"), "unknown preset 'nope'")
    _main_one_line_error(capsys, ["train", "--model", '{"chanels": 8}', "--dry-run"], "chanels")
    _main_one_line_error(capsys, ["train", "--schedule", "wavy", "--dry-run"], "unknown schedule 'wavy'")
    _main_one_line_error(capsys, ["train", "--data", "mnistt:/x", "--dry-run"], "unknown data set 'mnistt'")
    _main_one_line_error(capsys, ["train", "--data", "folder", "--dry-run"], "folder:DIR")
    _main_one_line_error(capsys, ["train", "--device", "tpu9", "--dry-run"], "unknown device")
    _main_one_line_error(capsys, ["train", "--init-from", tmp_path / "nope", "--dry-run"], "checkpoint not found")
    _main_one_line_error(capsys, ["train", "--autoencoder", tmp_path / "ae", "--dry-run"], "autoencoder not found")
    # a data folder that does not exist yet is not read: the spec's form is what --dry-run checks
    assert main(["train", "--data", f"cifar10:{tmp_path}/nowhere", "--preset", "unet-tiny", "--batch-size", "8",
                 "--steps", "1000", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["data"] == f"cifar10:{tmp_path}/nowhere"
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("estimate on this machine (cpu") and "s per step of 8 images" in line, line
    assert "1,000 steps take about" in line
    assert main(["train", "--preset", "unet-tiny", "--dry-run", "--estimate-steps", "0"]) == 0
    assert "estimate" not in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    import argparse

    from kakusan.cli import build_parser
    from kakusan.training.trainer import TrainConfig

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    fields = TrainConfig()
    for name in ("train", "sample", "eval", "train-classifier"):
        for action in commands[name]._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            default = action.default
            if name == "train" and action.dest in TrainConfig.__dataclass_fields__:
                default = getattr(fields, action.dest)
            if default not in (None, False, {}):
                assert action.help and "default" in action.help, (name, action.option_strings, action.help)
    with pytest.raises(SystemExit):
        main(["train-classifier", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 10)" in out and "default 256" in out and "(default 0.2)" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 128)" in out and "(default 0.0002)" in out and "(default 2000)" in out
