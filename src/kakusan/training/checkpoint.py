"""Checkpoints: safetensors for every tensor, JSON for everything else; nothing is unpickled on load.

A checkpoint is a folder:
    config.json            the full run config (model, schedule, diffusion, data, training) + format version
    model.safetensors      the trained weights (the config is also in its metadata: the file alone can sample)
    ema.safetensors        the EMA weights (what sampling uses by default)
    optimizer.safetensors  optimizer tensors, flattened as "state.<param index>.<name>"
    state.json             step, optimizer scalars and param groups, RNG states (hex), log position
It is written into a temporary folder, fsynced, and renamed into place; ``latest`` (a text file, replaced
atomically) names the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import CheckpointError

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not all file systems allow it
        pass


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_file_atomic(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """One safetensors file, written beside its final name, fsynced and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _save_tensors(tmp, tensors, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, config: dict, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict, keep: int = 3,
                    keep_every: int = 0, extras: dict | None = None) -> Path:
    """Write checkpoint ``step-XXXXXXXX`` under ``ckpt_root`` atomically; keep the newest ``keep`` and, with
    ``keep_every`` > 0, every checkpoint whose step is a multiple of it. ``extras``: more safetensors files
    written inside it, {file name: (tensors, metadata)}."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    full_config = {"format": FORMAT_VERSION, "kakusan_version": __version__, **config}
    meta = {"kakusan_config": json.dumps(full_config)}
    _write_json(tmp / "config.json", full_config)
    _save_tensors(tmp / "model.safetensors", model.state_dict(), meta)
    _save_tensors(tmp / "ema.safetensors", ema.state_dict(), meta)
    if optimizer is not None:
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        _save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        state = {**state, "optimizer": opt_meta}
    _write_json(tmp / "state.json", {"step": step, **state})
    for name, (tensors, metadata) in (extras or {}).items():
        _save_tensors(tmp / name, tensors, metadata)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    latest_tmp = ckpt_root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        if keep_every > 0 and int(p.name.split("-")[1]) % keep_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
    return final


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The training generator's, the global CPU and (on CUDA) the device's RNG states, as hex for state.json."""
    s = {"generator": generator.get_state().numpy().tobytes().hex(),
         "torch_rng": torch.get_rng_state().numpy().tobytes().hex()}
    if device.type == "cuda":
        s["cuda_rng"] = torch.cuda.get_rng_state(device).numpy().tobytes().hex()
    return s


def restore_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Set the RNG states saved by :func:`rng_state` (the CUDA one only when it was saved and runs on CUDA)."""
    u8 = lambda h: torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8)  # noqa: E731
    generator.set_state(u8(state["generator"]))
    torch.set_rng_state(u8(state["torch_rng"]))
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(u8(state["cuda_rng"]), device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest checkpoint), or a model .safetensors file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        return path
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path  # a checkpoint folder
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / "latest").is_file():
        named = root / (root / "latest").read_text().strip()
        if (named / "model.safetensors").is_file():
            return named
    steps = sorted(p for p in root.glob("step-*") if (p / "model.safetensors").is_file())
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path}: not a kakusan checkpoint (no model.safetensors, no checkpoints/latest)")


def read_config(path: Path) -> dict:
    """The run config of a checkpoint folder or model file, checked for format and version."""
    try:
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("kakusan_config")
            if raw is None:
                raise CheckpointError(f"{path}: a safetensors file without kakusan's config in its metadata")
            config = json.loads(raw)
        else:
            config = json.loads((path / "config.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable kakusan checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path}: not a kakusan checkpoint (config has no model section)")
    fmt = config.get("format")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} (kakusan {config.get('kakusan_version')}) "
                              f"is not the format {FORMAT_VERSION} this kakusan {__version__} reads")
    return config


def load_tensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def load_tagged(path: str | Path, kind: str, what: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a single safetensors file whose metadata says ``kind`` (a classifier, a stats
    file, ...); a missing, unreadable or other-kind file is refused naming ``what`` was expected."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: not a kakusan {what} (kind {meta.get('kind')!r})")
    return tensors, meta


def load_state_dict_into(module: torch.nn.Module, tensors: dict, path: Path) -> None:
    """Load ``tensors`` into ``module`` exactly; a mismatch names the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                if keys]
    if shapes:
        k = shapes[0]
        problems[-1] += f"; {k}: {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} in the model"
    if problems:
        raise CheckpointError(f"{path}: weights do not match the configured model: {'; '.join(problems)}")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the configured model ({first})") from None
