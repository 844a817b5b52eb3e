"""Image data sets, held in memory as uint8 tensors (N, C, H, W) with optional integer labels.

Readers: MNIST / Fashion-MNIST IDX files (gzipped or not), CIFAR-10 python batches (read with a restricted
unpickler that admits only numpy arrays), any image folder (recursive; class sub-folders become labels), and
scikit-learn's 8x8 handwritten digits, the demo's default that ships with an installed dependency.
A data set is named by a spec string: ``digits``, ``mnist[:DIR]``, ``fashion-mnist[:DIR]``,
``cifar10[:DIR or .tar.gz]``, ``folder:DIR``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def cache_dir() -> Path:
    return Path(os.environ.get("KAKUSAN_CACHE", Path.home() / ".cache" / "kakusan"))


@dataclass
class ImageDataset:
    """images: uint8 (N, C, H, W); labels: int64 (N,) or None; class_names: one per label."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]
    name: str
    skipped: int = 0  # files that could not be read and were left out
    captions: list[str] | None = None  # one per image (captioned data sets)

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {tuple(self.images.shape)} "
                            f"{self.images.dtype}")
        if len(self.images) == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise DataError(f"{self.name}: {len(self.captions)} captions for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def sha256(self) -> str:
        """A content hash of the data as a model sees it (the uint8 images after loading and resizing, the labels,
        the captions): the same for the same data whatever files or archive it came from."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        if self.captions is not None:
            h.update("\n".join(self.captions).encode())
        return h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# --------------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, checking magic number and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file holds {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


MNIST_URLS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def download(url: str, dest: Path, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (atomically), checking the MD5 when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed ({e}); download it by hand into {dest.parent}") from None
    if md5 and hashlib.md5(tmp.read_bytes()).hexdigest() != md5:
        tmp.unlink()
        raise DataError(f"{url}: checksum mismatch (expected md5 {md5})")
    os.replace(tmp, dest)
    return dest


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def load_mnist(root: str | Path | None = None, split: str = "train", kind: str = "mnist",
               download_if_missing: bool = False) -> ImageDataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in ``root``; without one, from the cache folder
    (and for Fashion-MNIST first from Debian's ``dataset-fashion-mnist`` in /usr/share/datasets/fashion-mnist)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    cache = cache_dir() / kind
    if root is not None:
        places = [Path(root).expanduser()]
    else:
        places = ([FASHION_SYSTEM_DIR] if kind == "fashion-mnist" else []) + [cache]
    files = None
    for place in places:
        found = [_find_idx(place, s) for s in stems]
        if None not in found:
            files = found
            break
    if files is None:
        if not download_if_missing:
            where = " or ".join(f"the cache folder {p}" if root is None and p == cache else str(p) for p in places)
            hint = ""
            if kind == "fashion-mnist":
                hint = ("; install Debian's package (apt-get install dataset-fashion-mnist)"
                        if FASHION_SYSTEM_DIR in places else
                        f"; Debian's package (apt-get install dataset-fashion-mnist) puts it in {FASHION_SYSTEM_DIR}")
            raise DataError(f"{kind} {split} files not found in {where} (expected {stems[0]}.gz and "
                            f"{stems[1]}.gz){hint}; pass the folder that holds them ({kind}:DIR), or --download "
                            f"when online")
        base, md5s = MNIST_URLS[kind]
        dest = places[0] if root is not None else cache
        files = [download(base + s + ".gz", dest / (s + ".gz"), md5s[s + ".gz"]) for s in stems]
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{files[0]}: expected images (N, H, W) and labels (N,), got {images.shape}, "
                        f"{labels.shape}")
    names = FASHION_CLASSES if kind == "fashion-mnist" else [str(i) for i in range(10)]
    return ImageDataset(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                        names, f"{kind}-{split}")


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; admit only what they need (numpy arrays), never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    return data, labels


def _extract_once(archive: Path) -> Path:
    """Extract a .tar.gz into the cache (once; keyed by its size and mtime) and return the folder."""
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / "extracted" / f"{archive.name.split('.')[0]}-{key}"
    if not (dest / ".complete").exists():
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot extract ({e})") from None
        if dest.exists():
            import shutil
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        (dest / ".complete").touch()
    return dest


def load_cifar10(root: str | Path | None = None, split: str = "train", download_if_missing: bool = False,
                 limit: int | None = None) -> ImageDataset:
    """CIFAR-10 from python batches (``data_batch_1..5``, ``test_batch``) or an image-folder layout
    (``train/<class>/*.png|jpg``); ``root`` may also be a .tar.gz of either, extracted once into the cache."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser() if root is not None else cache_dir() / "cifar10"
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        root = _extract_once(root)
    if not root.exists() and download_if_missing:
        _extract_once(download(CIFAR_URL, cache_dir() / "cifar-10-python.tar.gz", CIFAR_MD5))
        root = next((cache_dir() / "extracted").glob("cifar-10-python-*"))
    if not root.exists():
        raise DataError(f"CIFAR-10 not found at {root}; pass its folder or archive, or --download when online")
    for sub in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:  # the archive's top folder, if any
        batches = ["data_batch_%d" % i for i in range(1, 6)] if split == "train" else ["test_batch"]
        if all((sub / b).is_file() for b in batches):
            parts = [_read_cifar_batch(sub / b) for b in batches]
            images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
            labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
            if limit:
                images, labels = images[:limit], labels[:limit]
            return ImageDataset(images, labels, CIFAR_CLASSES, f"cifar10-{split}")
        if (sub / split).is_dir():
            ds = load_image_folder(sub / split, image_size=32, channels=3, limit=limit)
            ds.name = f"cifar10-{split}"
            return ds
    raise DataError(f"{root}: no CIFAR-10 python batches and no '{split}/<class>/' image folders found")


# --------------------------------------------------------------------------------------------------------------
# Image folders


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return image_array(im, image_size, channels)


def image_array(im, image_size: int, channels: int) -> np.ndarray:
    """A PIL image as uint8 (C, size, size): transparency composited on white, grey or RGB, centre-cropped to a
    square and resized (bicubic)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # composite on white
        im = Image.alpha_composite(background, im)
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    side = min(w, h)  # centre crop to a square, then resize
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(root: str | Path, image_size: int, channels: int = 3, limit: int | None = None
                      ) -> ImageDataset:
    """Every image under ``root`` (recursive), centre-cropped and resized to ``image_size``. If ``root`` has
    sub-folders with images, each top-level sub-folder is a class. Unreadable files are skipped and counted."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    labelled = bool(class_dirs) and all(len(p.relative_to(root).parts) > 1 for p in files)
    if limit and limit < len(files):  # an evenly spaced subset, so every class is represented
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    index = {c: i for i, c in enumerate(class_dirs)}
    images, kept = _read_images(root, files, image_size, channels)
    labels = torch.tensor([index[files[i].relative_to(root).parts[0]] for i in kept]) if labelled else None
    return ImageDataset(images, labels, class_dirs if labelled else [], f"folder:{root.name}",
                        skipped=len(files) - len(kept))


def _read_images(root: Path, files: list[Path], image_size: int, channels: int) -> tuple[torch.Tensor, list[int]]:
    """The readable ones of ``files`` as uint8 (N, C, H, W) and their indices; unreadable files are skipped with
    one warning naming them; none readable is an error."""
    images, kept, bad = [], [], []
    for i, p in enumerate(files):
        try:
            images.append(load_image(p, image_size, channels))
            kept.append(i)
        except Exception as e:  # PIL raises many types for broken files
            bad.append(f"{p.name} ({type(e).__name__})")
    if bad:
        warnings.warn(f"{root}: skipped {len(bad)} unreadable file(s): {', '.join(bad[:5])}"
                      + (" ..." if len(bad) > 5 else ""), stacklevel=3)
    if not images:
        raise DataError(f"{root}: none of the {len(files)} image files could be read")
    return torch.from_numpy(np.stack(images)), kept


# --------------------------------------------------------------------------------------------------------------
# Captioned image folders (text-to-image)

CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")  # kakusan / emoji layout; Hugging Face imagefolder layout
CAPTION_KEYS = ("text", "caption", "name")
FILE_KEYS = ("file_name", "file")


def load_captioned_folder(root: str | Path, image_size: int, channels: int = 3, limit: int | None = None,
                          caption_key: str | None = None) -> ImageDataset:
    """Images with captions: a folder (or .tar.gz of one) holding ``captions.jsonl`` or ``metadata.jsonl``, one
    JSON object per image naming its file (``file_name`` or ``file``, relative to that folder) and its caption
    (``text``, ``caption`` or ``name``; or ``caption_key``). RGBA images are composited on white. Unreadable
    images are skipped with a warning; a missing file or caption is an error naming the line."""
    root = Path(root).expanduser()
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        root = _extract_once(root)
    if not root.is_dir():
        raise DataError(f"captioned image folder not found: {root}")
    found = [p for name in CAPTION_FILES for p in [root / name, *root.glob(f"*/{name}")] if p.is_file()]
    if not found:
        raise DataError(f"{root}: no {' or '.join(CAPTION_FILES)} (one JSON object per image: file_name + text)")
    meta, base = found[0], found[0].parent
    records = []
    for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}:{i}: not valid JSON ({e.msg})") from None
        file = next((rec[k] for k in FILE_KEYS if k in rec), None)
        keys = (caption_key,) if caption_key else CAPTION_KEYS
        text = next((rec[k] for k in keys if isinstance(rec.get(k), str) and rec[k].strip()), None)
        if file is None or text is None:
            raise DataError(f"{meta}:{i}: needs a file ({'/'.join(FILE_KEYS)}) and a caption "
                            f"({'/'.join(keys)})")
        records.append((base / file, text.strip()))
    if limit and limit < len(records):
        records = [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]
    for path, _ in records:
        if not path.is_file():
            raise DataError(f"{meta}: lists {path.name}, which is not in {path.parent}")
    images, kept = _read_images(root, [path for path, _ in records], image_size, channels)
    return ImageDataset(images, None, [], f"captions:{base.name}", skipped=len(records) - len(kept),
                        captions=[records[i][1] for i in kept])


# --------------------------------------------------------------------------------------------------------------
# The demo's default


def load_digits() -> ImageDataset:
    """scikit-learn's handwritten digits (UCI 'optdigits' test set): 1,797 real 8x8 images with 17 grey levels,
    labels 0-9. It ships inside scikit-learn, so the demo needs no network and no path."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)),
                        [str(i) for i in range(10)], "digits")


DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder", "captions", "emoji")


NEEDS_PATH = ("folder", "captions", "emoji")


def check_spec(spec: str) -> str:
    """The data set name of ``spec``, after checking its form (a known name; a path where one is needed) without
    reading anything: what ``--dry-run`` can say before any data is loaded."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"a data spec is a string such as mnist:/path/to/dir, got {spec!r}")
    name, _, path = spec.partition(":")
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)} (e.g. mnist:/path/to/dir)")
    if name in NEEDS_PATH and not path:
        raise DataError(f"{name} data needs a path: {name}:DIR" + (f" or {name}:ARCHIVE.tar.gz" if name != "folder"
                                                                     else ""))
    return name


def load_dataset(spec: str, split: str = "train", image_size: int | None = None, channels: int | None = None,
                 download_if_missing: bool = False, limit: int | None = None) -> ImageDataset:
    """Load a data set by spec: ``digits``, ``mnist[:DIR]``, ``fashion-mnist[:DIR]``, ``cifar10[:PATH]``,
    ``folder:DIR``, ``captions:PATH`` (a captioned folder or archive), ``emoji:PATH`` (the emoji set's folder or
    .tar.gz, captioned by their names). ``image_size``/``channels`` are needed for folders (default 64 / 3);
    others are resized if they differ."""
    name, _, path = spec.partition(":")
    path = path or None
    if name == "digits":
        ds = load_digits()
    elif name in ("mnist", "fashion-mnist"):
        ds = load_mnist(path, split, name, download_if_missing)
    elif name == "cifar10":
        ds = load_cifar10(path, split, download_if_missing, limit)
    elif name == "folder":
        if not path:
            raise DataError("folder data needs a path: folder:DIR")
        ds = load_image_folder(path, image_size or 64, channels or 3, limit)
    elif name in ("captions", "emoji"):
        if not path:
            raise DataError(f"{name} data needs a path: {name}:DIR or {name}:ARCHIVE.tar.gz")
        ds = load_captioned_folder(path, image_size or 64, channels or 3, limit,
                                   caption_key="name" if name == "emoji" else None)
        ds.name = f"{name}:{Path(path).name.split('.')[0]}"
    else:
        raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)} (e.g. mnist:/path/to/dir)")
    if limit and len(ds) > limit:
        ds.images = ds.images[:limit]
        ds.labels = ds.labels[:limit] if ds.labels is not None else None
        ds.captions = ds.captions[:limit] if ds.captions is not None else None
    if channels and ds.images.shape[1] != channels:
        raise DataError(f"{ds.name} has {ds.images.shape[1]} channel(s); the model expects {channels}")
    if image_size and ds.images.shape[-1] != image_size:
        ds.images = resize_uint8(ds.images, image_size)
    return ds


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 batch (N, C, H, W) to (N, C, size, size)."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
