"""The small trained models shipped with kakusan, resolvable by name.

``kakusan sample --checkpoint mnist --class 3`` and ``Pipeline.load("emoji")`` read a model from
``kakusan/shipped/``: one safetensors file per model (EMA weights, written by ``kakusan export``, with the run's
config in its metadata like any kakusan model file) and ``index.json``, the list of them with how each was made
(the training command, the data set's content hash, the run's steps and minutes) and how it scored (the
evaluation's full provenance record). ``kakusan models`` prints the list.

A name is looked up only when no file or folder of that name exists: ``--checkpoint mnist`` next to a run folder
called ``mnist`` reads the folder (say ``./mnist`` to be explicit either way).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError
from .metrics.provenance import file_sha256

SHIPPED_DIR = Path(__file__).parent / "shipped"
INDEX = SHIPPED_DIR / "index.json"


@lru_cache(maxsize=1)
def _index() -> tuple[dict, ...]:
    if not INDEX.is_file():
        return ()
    try:
        models = json.loads(INDEX.read_text())["models"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{INDEX}: the list of shipped models is unreadable ({type(e).__name__}: {e})") from None
    return tuple(models)


def shipped_models() -> list[dict]:
    """Each shipped model's entry of index.json (name, file, sha256, bytes, title, example, train, data, scores)."""
    return [dict(m) for m in _index()]


def names() -> list[str]:
    return [m["name"] for m in _index()]


def entry(name: str) -> dict | None:
    return next((dict(m) for m in _index() if m["name"] == name), None)


def shipped_file(name: str, check: bool = True) -> Path:
    """The file of shipped model ``name``, its sha256 checked against the list (``check``): a damaged or replaced
    file is refused rather than sampled from."""
    e = entry(name)
    if e is None:
        raise CheckpointError(f"no shipped model named {name!r} (shipped: {', '.join(names()) or 'none'})")
    path = SHIPPED_DIR / e["file"]
    if not path.is_file():
        raise CheckpointError(f"shipped model {name!r}: its file {path} is missing from this installation")
    if check:
        h = file_sha256(path)
        if h != e["sha256"]:
            raise CheckpointError(f"shipped model {name!r}: {path} has sha256 {h[:12]}, the list says "
                                  f"{e['sha256'][:12]} (damaged or replaced; reinstall kakusan)")
    return path


def plain_name(text: str) -> bool:
    """Whether ``text`` could name a shipped model (no folder in it)."""
    return "/" not in text and "\\" not in text


def locate(checkpoint):
    """``checkpoint`` unchanged when it is a path that exists (or anything but a plain name); the shipped model's
    file when it names one; otherwise unchanged, so that the caller's own 'not found' error speaks."""
    if not isinstance(checkpoint, (str, Path)):
        return checkpoint
    text = str(checkpoint)
    if Path(text).expanduser().exists() or not plain_name(text):
        return checkpoint
    if text in names():
        return shipped_file(text)
    return checkpoint
