import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kakusan.data import (load_cifar10, load_dataset, load_digits, load_image_folder, load_mnist, read_idx,
                          to_model_range, to_uint8)
from kakusan.errors import DataError


def _write_idx(path, arr, gz=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


def test_idx_round_trip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "b", a, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), a)
    i = np.array([1, -2, 70000], dtype=np.int32)
    _write_idx(tmp_path / "c", i, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "c"), i)


def test_idx_bad_magic_truncated_missing(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    a = np.zeros((10, 4, 4), np.uint8)
    _write_idx(tmp_path / "t", a, gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-5])
    with pytest.raises(DataError, match="holds"):
        read_idx(tmp_path / "t")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz")
    (tmp_path / "g.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "g.gz")


def test_mnist_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5], np.uint8))
    ds = load_mnist(tmp_path, "test")
    assert ds.images.shape == (5, 1, 28, 28) and ds.labels.tolist() == [3, 1, 4, 1, 5] and ds.num_classes == 10
    with pytest.raises(DataError, match="not found"):
        load_mnist(tmp_path, "train")
    ds = load_mnist(tmp_path, "test", kind="fashion-mnist")
    assert ds.class_names[9] == "Ankle boot"


def test_real_mnist_from_shared_data(shared_data):
    ds = load_dataset(f"mnist:{shared_data / 'mnist'}", split="test")
    assert ds.images.shape == (10_000, 1, 28, 28)
    train_labels = read_idx(shared_data / "mnist" / "train-labels-idx1-ubyte.gz")
    assert train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_real_cifar10_jpeg_archive(shared_data):
    ds = load_dataset(f"cifar10:{shared_data / 'cifar10-jpeg' / 'cifar10-jpeg.tar.gz'}", split="test", limit=200)
    assert ds.images.shape == (200, 3, 32, 32) and ds.num_classes == 10
    assert len(set(ds.labels.tolist())) == 10  # the subset spans every class


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
    path.write_bytes(pickle.dumps(d))
    return d


def test_cifar10_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_batch(root / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    _cifar_batch(root / "test_batch", 3, 9)
    ds = load_cifar10(tmp_path, "train")  # the archive's top folder is found
    assert ds.images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(ds.images[0].numpy().reshape(-1), batches[0][b"data"][0])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "c"
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_cifar10(root, "train")
    assert not (tmp_path / "pwned").exists()


def test_image_folder_modes_sizes_corrupt_and_labels(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "cats" / "a.png")
    Image.new("L", (16, 16), 128).save(root / "cats" / "b.jpg")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(root / "dogs" / "c.png")  # transparent -> white
    Image.new("P", (300, 200)).save(root / "dogs" / "d.gif")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(root / "dogs" / "tiny.png")  # 1x1
    Image.new("RGB", (6000, 4000), (0, 255, 0)).save(root / "dogs" / "huge.jpg", quality=50)  # 24 megapixels
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dogs" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_image_folder(root, image_size=8, channels=3)
    assert ds.images.shape == (6, 3, 8, 8) and ds.skipped == 1
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1, 1, 1, 1]
    names = sorted(p.name for p in root.rglob("*") if p.suffix in (".png", ".jpg", ".gif") and p.name != "broken.png")
    by_name = dict(zip(names, ds.images))
    assert tuple(by_name["tiny.png"][:, 0, 0].tolist()) == (0, 0, 255)
    assert abs(int(by_name["huge.jpg"][1, 4, 4]) - 255) <= 2
    assert ds.images[2].min() == 255  # transparent composited on white
    assert tuple(ds.images[0, :, 4, 4].tolist()) == (255, 0, 0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path / "empty", 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 image files"):
        load_image_folder(tmp_path / "bad", 8)


def test_digits_and_specs():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.max() == 255 and ds.num_classes == 10
    assert load_dataset("digits", image_size=16).images.shape == (1797, 1, 16, 16)
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("folder")
    with pytest.raises(DataError, match="channel"):
        load_dataset("digits", channels=3)


def test_range_conversions_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u)


def test_missing_fashion_mnist_names_every_place_and_the_debian_package(tmp_path, monkeypatch):
    from kakusan.data import datasets

    assert datasets.FASHION_SYSTEM_DIR == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", tmp_path / "usr-share-datasets" / "fashion-mnist")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path / "usr-share-datasets" / "fashion-mnist") in msg  # the system folder
    assert str(datasets.cache_dir() / "fashion-mnist") in msg  # and the cache folder
    assert "apt-get install dataset-fashion-mnist" in msg and "fashion-mnist:DIR" in msg
    with pytest.raises(DataError) as e:  # a folder given: it, and where the package would put the data
        load_dataset(f"fashion-mnist:{tmp_path / 'elsewhere'}")
    assert str(tmp_path / "elsewhere") in str(e.value) and "dataset-fashion-mnist" in str(e.value)
    # found in the system folder when the package is installed
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    system = tmp_path / "usr-share-datasets" / "fashion-mnist"
    system.mkdir(parents=True)
    _write_idx(system / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(system / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 1], np.uint8))
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.labels.tolist() == [9, 0, 1] and ds.class_names[9] == "Ankle boot"
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):  # its train split is absent
        load_dataset("fashion-mnist")


@pytest.mark.skipif(Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST is installed here")
def test_missing_fashion_mnist_from_the_cli_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kakusan.cli", "train", "--data", "fashion-mnist", "--steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/usr/share/datasets/fashion-mnist" in lines[0], r.stderr
    assert "dataset-fashion-mnist" in lines[0] and "fashion-mnist" in lines[0]
