import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("KAKUSAN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    """The first 200 of scikit-learn's 8x8 digits (the training tests' data)."""
    from kakusan.data import load_digits

    ds = load_digits()
    ds.images, ds.labels = ds.images[:200], ds.labels[:200]
    return ds


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


torch.set_num_threads(min(2, os.cpu_count() or 1))


def assert_resume_exact(tmp_path: Path, dataset, steps: int, files=("model.safetensors", "ema.safetensors",
                                                                 "optimizer.safetensors"), **cfg) -> Path:
    """Train ``steps`` straight (``tmp_path/full``), and ``steps // 2`` then ``--resume`` to ``steps``
    (``tmp_path/cut``): each of ``files`` of the last checkpoints is bitwise the same. ``dataset``: the loaded
    data, or None to read ``cfg``'s ``data``. Returns the straight run's last checkpoint."""
    from safetensors.torch import load_file

    from kakusan.training import Trainer, TrainConfig

    full = Trainer(TrainConfig(out=str(tmp_path / "full"), steps=steps, **cfg), dataset).fit()
    Trainer(TrainConfig(out=str(tmp_path / "cut"), steps=steps // 2, **cfg), dataset).fit()
    tr = Trainer(TrainConfig(out=str(tmp_path / "cut"), steps=steps, **cfg), dataset)
    tr.resume()
    assert tr.step == steps // 2
    resumed = tr.fit()
    for f in files:
        a, b = load_file(full / f), load_file(resumed / f)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    return full


def save_tiny_autoencoder_kl(folder: Path, channels: int):
    """A small diffusers AutoencoderKL (factor 2, 4 latent channels, seeded), saved as a local folder; returns it."""
    import warnings

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, norm_num_groups=8,
                                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                                  block_out_channels=(8, 16), layers_per_block=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae.save_pretrained(folder)
    return vae


def names_fields(message: str, fields) -> bool:
    """Whether a refusal's message names each of ``fields`` as a whole word (as the config spells it, or with
    spaces or dashes: ``image_size`` / ``image size``, ``init_from`` / ``--init-from``; ``steps`` is not found in
    ``warmup_steps``)."""
    import re

    return all(re.search(rf"(?<![A-Za-z0-9_]){f.replace('_', '[_ -]')}(?![A-Za-z0-9_])", message, re.IGNORECASE)
               for f in fields)


def check_built_and_refusals(model, cfg, cond, config_cls, kw: dict, breaks, refused: set) -> None:
    """The property tests' check of one drawn configuration: the built (randomised) ``model`` maps a batch of 2 to a
    finite, non-zero output of the right shape, ``cfg`` survives a checkpoint record's JSON round trip, and each
    single-field break (override, fields) of ``kw`` is refused by ``config_cls`` with a message naming its fields
    (the indices of the refused breaks are added to ``refused``)."""
    import json

    from kakusan.errors import ConfigError
    from kakusan.models import model_config_from_dict, model_record

    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 999.0]), cond)
    assert out.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert model_config_from_dict(json.loads(json.dumps(model_record(cfg)))) == cfg
    for i, (override, fields) in enumerate(breaks):
        with pytest.raises(ConfigError) as e:
            config_cls(**{**kw, **override})
        assert names_fields(str(e.value), fields), (override, str(e.value))
        refused.add(i)
