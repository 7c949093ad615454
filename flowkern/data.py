"""8-bit image data for the `flowkern` command: IDX files, MNIST, synthetic digits, noise.

Every loader returns uint8 tensors of shape (N, C, H, W) (C = 1 for MNIST), which is what a
model built with dequantize=True takes (RealNVP after a reshape to (N, C*H*W)).

Data specs, as `flowkern train --data SPEC` takes them (`load(spec, ...)`):

    mnist             MNIST through torchvision's file layout: ROOT/MNIST/raw/ holds
                      train-images-idx3-ubyte and t10k-images-idx3-ubyte (plain or .gz; ROOT
                      itself is searched too). Train on the 60,000, test on the 10,000.
                      download=True fetches them with torchvision.datasets.MNIST.
    idx:PATH          one IDX image file (plain or .gz): the last `holdout` images are the
                      held-out test split, the rest train (in file order, no shuffle).
    idx:TRAIN,TEST    an explicit pair of IDX image files.
    idx:DIR           a folder holding train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]
                      (MNIST, Fashion-MNIST, KMNIST all ship this way).
    synthetic[:N]     N (default 10,000) MNIST-shaped synthetic digits, split like idx:PATH;
                      generated from a fixed seed, so every run sees the same images.
    noise[:N]         N (default 10,000) images of uniform random pixels (an out-of-distribution
                      set for `flowkern ood`), split like idx:PATH.
    inverted:SPEC     SPEC with every pixel p replaced by 255 - p (another OOD set).

Labels are never needed (the flows are unconditional), so only image files are read.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

# IDX type codes (the third byte of the magic number) and their element types; multi-byte
# elements are big-endian in the file.
_IDX_TYPES = {
    0x08: (torch.uint8, ">u1"),
    0x09: (torch.int8, ">i1"),
    0x0B: (torch.int16, ">i2"),
    0x0C: (torch.int32, ">i4"),
    0x0D: (torch.float32, ">f4"),
    0x0E: (torch.float64, ">f8"),
}
_IDX_CODES = {dtype: code for code, (dtype, _) in _IDX_TYPES.items()}

MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
SYNTHETIC_DEFAULT_N = 10_000
NOISE_DEFAULT_N = 10_000
SYNTHETIC_SEED = 0  # fixed: the synthetic data set is the same in every run and on every rank
DEFAULT_HOLDOUT = 0.1


class MissingDataset(FileNotFoundError):
    """The data a spec names is not on disk (and was not or could not be downloaded).

    str(error) is the whole message for the user: the path looked at and the flags that fix it.
    """


class DataError(ValueError):
    """A data spec or file that cannot be used: bad syntax, not IDX, not 8-bit images, too small."""


# ----------------------------------------------------------------------------------------- IDX


def _open(path: str):
    """A binary file object, gunzipped when the file is gzip (by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: Union[str, os.PathLike]) -> torch.Tensor:
    """The array in an IDX file (LeCun's MNIST format), plain or gzip-compressed.

    Returns a tensor of the file's shape and element type (uint8 for image files).
    Raises FileNotFoundError when the file is missing and DataError when it is not IDX.
    """
    import numpy as np

    path = os.fspath(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype, np_dtype = _IDX_TYPES[data[2]]
    count = math.prod(shape)
    expected = header + count * np.dtype(np_dtype).itemsize
    if len(data) < expected:
        raise DataError(f"{path}: IDX file truncated: header says shape {shape} "
                        f"({expected} bytes) but the file has {len(data)}")
    array = np.frombuffer(data, dtype=np_dtype, count=count, offset=header).reshape(shape)
    # Native byte order and a writable copy: torch.from_numpy needs both.
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True)).to(dtype)


def write_idx(path: Union[str, os.PathLike], array: torch.Tensor) -> None:
    """Write `array` as an IDX file; gzip-compressed when the path ends in .gz.

    Element types: uint8, int8, int16, int32, float32, float64; 1 to 255 dims.
    """
    import numpy as np

    path = os.fspath(path)
    if not isinstance(array, torch.Tensor):
        raise TypeError(f"array must be a torch.Tensor, got {type(array).__name__}")
    if array.dtype not in _IDX_CODES:
        raise TypeError(f"IDX stores uint8, int8, int16, int32, float32 or float64, got {array.dtype}")
    if not 1 <= array.dim() <= 255:
        raise ValueError(f"IDX stores 1 to 255 dims, got shape {tuple(array.shape)}")
    code = _IDX_CODES[array.dtype]
    header = bytes([0, 0, code, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    body = array.detach().cpu().contiguous().numpy().astype(_IDX_TYPES[code][1], copy=False).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


def read_images(path: Union[str, os.PathLike]) -> torch.Tensor:
    """An IDX image file as uint8 (N, C, H, W): 3-D files (N, H, W) get C = 1, 4-D files are
    read as (N, C, H, W)."""
    images = read_idx(path)
    if images.dim() not in (3, 4):
        hint = " (a labels file?)" if images.dim() == 1 else ""
        raise DataError(f"{os.fspath(path)} holds an array of shape {tuple(images.shape)}{hint}; "
                        "expected images (N, H, W) or (N, C, H, W)")
    if images.dtype != torch.uint8:
        raise DataError(f"{os.fspath(path)} holds {images.dtype} values; expected 8-bit pixels (uint8)")
    return images.unsqueeze(1) if images.dim() == 3 else images


# ------------------------------------------------------------------------------- synthetic data

# Seven-segment strokes in a unit box (x right, y down) and the segments of each digit; the
# jitter below makes them look hand-drawn enough to have MNIST's statistics (a dark
# background, thick bright strokes in a 20x20 centre) without shipping any data.
_SEGMENTS = torch.tensor([
    [0, 0, 1, 0], [1, 0, 1, .5], [1, .5, 1, 1], [0, 1, 1, 1], [0, .5, 0, 1], [0, 0, 0, .5], [0, .5, 1, .5],
])  # a, b, c, d, e, f, g: (x0, y0, x1, y1)
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
_DIGIT_MASK = torch.tensor([[s in segs for s in "abcdefg"] for segs in _DIGIT_SEGMENTS])


def synthetic_digits(n: int, seed: int = SYNTHETIC_SEED, size: int = 28,
                     return_labels: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """n MNIST-shaped synthetic digits, uint8 (n, 1, size, size), deterministic in `seed`.

    Each image is a seven-segment digit 0-9 with a random height, width, slant, position,
    stroke width, brightness and per-endpoint jitter, rendered anti-aliased on black.
    With return_labels=True also returns the digits, int64 (n,).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    labels = torch.randint(0, 10, (n,), generator=g)
    scale = size / 28.0
    height, width = uniform(15, 20, n) * scale, uniform(7, 13, n) * scale
    slant = uniform(-0.3, 0.3, n)
    cx, cy = size / 2 - 0.5 + uniform(-2, 2, n) * scale, size / 2 - 0.5 + uniform(-1.5, 1.5, n) * scale
    thickness = uniform(1.4, 2.8, n) * scale
    peak = uniform(220, 255, n)
    ends = _SEGMENTS.expand(n, 7, 4) + uniform(-0.07, 0.07, n, 7, 4)
    # Unit box -> pixels: centre, scale, and shear by the slant (the top leans right).
    x = (ends[..., 0::2] - 0.5) * width[:, None, None]
    y = (ends[..., 1::2] - 0.5) * height[:, None, None]
    x = x - slant[:, None, None] * y + cx[:, None, None]
    y = y + cy[:, None, None]
    (ax, bx), (ay, by) = x.unbind(-1), y.unbind(-1)  # (n, 7) segment ends

    coords = torch.arange(size, dtype=torch.float32)
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    px, py = px.reshape(1, 1, -1), py.reshape(1, 1, -1)
    images = torch.empty(n, size * size, dtype=torch.uint8)
    for lo in range(0, n, 512):  # bounded memory: (chunk, 7, size^2) distances
        sl = slice(lo, min(n, lo + 512))
        sax, say, sbx, sby = (v[sl, :, None] for v in (ax, ay, bx, by))
        dx, dy = sbx - sax, sby - say
        t = (((px - sax) * dx + (py - say) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
        dist = torch.hypot(px - sax - t * dx, py - say - t * dy)
        dist = dist.masked_fill(~_DIGIT_MASK[labels[sl]][..., None], float("inf")).amin(dim=1)
        ink = (thickness[sl, None] / 2 + 0.5 - dist).clamp(0, 1)  # a one-pixel anti-aliased edge
        images[sl] = (ink * peak[sl, None]).round().to(torch.uint8)
    images = images.view(n, 1, size, size)
    return (images, labels) if return_labels else images


def noise_images(n: int, shape: Tuple[int, int, int] = (1, 28, 28), seed: int = 1) -> torch.Tensor:
    """n images of independent uniform pixels in {0, ..., 255}, uint8 (n, *shape)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


# -------------------------------------------------------------------------------------- specs


@dataclass
class ImageData:
    """A data set as two uint8 (N, C, H, W) splits, and the spec and sources it came from."""

    train: torch.Tensor
    test: torch.Tensor
    spec: str
    description: str

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test


def parse_holdout(value: Union[None, str, int, float]) -> Union[int, float]:
    """--holdout: an image count (an int >= 1) or a fraction in (0, 1); None means 10%."""
    if value is None:
        return DEFAULT_HOLDOUT
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise DataError(f"--holdout must be an image count (e.g. 1000) or a fraction (e.g. 0.1), "
                            f"got {text!r}") from None
    if isinstance(value, float) and 0 < value < 1:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise DataError(f"--holdout must be an image count >= 1 or a fraction in (0, 1), got {value!r}")


def holdout_split(images: torch.Tensor, holdout: Union[None, str, int, float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, test): the last `holdout` images (a count, or a fraction of N) are the test split."""
    holdout = parse_holdout(holdout)
    n = images.shape[0]
    count = max(1, round(holdout * n)) if isinstance(holdout, float) else holdout
    if count >= n:
        raise DataError(f"cannot hold out {count} of {n} images: nothing would be left to train on "
                        "(use a smaller --holdout)")
    return images[: n - count], images[n - count:]


def _count(spec: str, text: str, default: int) -> int:
    if not text:
        return default
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 2:
        raise DataError(f"data spec {spec!r}: the image count must be an int >= 2, got {text!r}")
    return n


def _find(folder: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def mnist_folder(root: Union[str, os.PathLike]) -> str:
    """Where torchvision keeps MNIST under `root` (and where --data mnist looks first)."""
    return os.path.join(os.fspath(root), "MNIST", "raw")


def _missing_mnist(root: str, why: str = "") -> MissingDataset:
    raw = mnist_folder(root)
    found = next((p for p in (_find(raw, MNIST_FILES["test"]), _find(root, MNIST_FILES["test"])) if p), None)
    lines = [f"MNIST not found: expected {MNIST_FILES['train']} and {MNIST_FILES['test']} (plain or .gz) "
             f"in {os.path.abspath(raw)} (or in {os.path.abspath(root)}).{(' ' + why) if why else ''}",
             "Fix it with one of:",
             f"  --download                 fetch MNIST into {os.path.abspath(raw)} (needs the network)",
             f"  --root DIR                 the folder that holds MNIST/raw/ (now {root})",
             "  --data idx:IMAGES.gz       any IDX image file (the last --holdout images are the test split)",
             "  --data idx:TRAIN,TEST      an IDX image file pair",
             "  --data synthetic           MNIST-shaped synthetic digits, for smoke runs"]
    if found:
        lines.append(f"(only the test file is there: --data idx:{found} trains on it with a held-out split)")
    return MissingDataset("\n".join(lines))


def _load_mnist(root: Optional[str], download: bool) -> ImageData:
    root = os.fspath(root) if root is not None else "data"
    raw = mnist_folder(root)
    paths = {k: _find(raw, stem) or _find(root, stem) for k, stem in MNIST_FILES.items()}
    if None in paths.values() and download:
        try:
            from torchvision.datasets import MNIST
        except ImportError:
            raise _missing_mnist(root, "--download needs torchvision (pip install 'flowkern[cli]').") from None
        try:
            MNIST(root, train=True, download=True)
        except Exception as e:  # URLError, HTTPError, RuntimeError("Error downloading ..."), ...
            raise _missing_mnist(root, f"The download failed: {type(e).__name__}: {e}") from None
        paths = {k: _find(raw, stem) for k, stem in MNIST_FILES.items()}
    if None in paths.values():
        raise _missing_mnist(root)
    train, test = read_images(paths["train"]), read_images(paths["test"])
    return ImageData(train, test, "mnist", f"MNIST ({paths['train']}, {paths['test']})")


def _resolve(path: str, root: Optional[str]) -> str:
    """An existing path as given, else under --root, else the path as given (reported missing)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path) and root is not None and not os.path.isabs(path):
        candidate = os.path.join(os.fspath(root), path)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(path)


def _missing_file(spec: str, path: str) -> MissingDataset:
    return MissingDataset(
        f"data file not found: {path} (from --data {spec}).\n"
        "Fix it with one of:\n"
        "  --data idx:PATH            an existing IDX image file, plain or .gz (paths are relative to the\n"
        "                             current folder, then to --root)\n"
        "  --data mnist --root DIR    MNIST in DIR/MNIST/raw/ (add --download to fetch it)\n"
        "  --data synthetic           MNIST-shaped synthetic digits, for smoke runs")


def _load_idx(spec: str, rest: str, root: Optional[str], holdout) -> ImageData:
    if not rest:
        raise DataError("data spec 'idx:' needs a path: idx:IMAGES, idx:TRAIN,TEST or idx:DIR")
    parts = rest.split(",")
    if len(parts) > 2 or not all(parts):
        raise DataError(f"data spec {spec!r}: expected idx:IMAGES, idx:TRAIN,TEST or idx:DIR")
    paths = [_resolve(p, root) for p in parts]
    for p in paths:
        if not os.path.exists(p):
            raise _missing_file(spec, p)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        found = {k: _find(folder, stem) for k, stem in MNIST_FILES.items()}
        if None in found.values():
            raise MissingDataset(
                f"{folder} (from --data {spec}) must hold {MNIST_FILES['train']} and {MNIST_FILES['test']} "
                "(plain or .gz); give files instead: --data idx:IMAGES or --data idx:TRAIN,TEST")
        paths = [found["train"], found["test"]]
    if len(paths) == 2:
        train, test = read_images(paths[0]), read_images(paths[1])
        if train.shape[1:] != test.shape[1:]:
            raise DataError(f"data spec {spec!r}: train images are {tuple(train.shape[1:])} but test images "
                            f"are {tuple(test.shape[1:])}")
        return ImageData(train, test, f"idx:{paths[0]},{paths[1]}", f"IDX train {paths[0]}, test {paths[1]}")
    train, test = holdout_split(read_images(paths[0]), holdout)
    return ImageData(train, test, f"idx:{paths[0]}",
                     f"IDX {paths[0]}: first {len(train)} images train, last {len(test)} test")


def load(spec: str, root: Optional[str] = None, download: bool = False,
         holdout: Union[None, str, int, float] = None, shape: Tuple[int, int, int] = (1, 28, 28)) -> ImageData:
    """The data set a spec names (see the module docstring), as uint8 (N, C, H, W) splits.

    root: the folder of --data mnist (default ./data), and a second place to look for
    relative idx: paths. holdout: the test split of single-source specs (idx:PATH, synthetic,
    noise): an image count or a fraction (default 0.1). shape: the (C, H, W) of noise images
    (e.g. the in-distribution data's, for `flowkern ood`). The returned ImageData.spec has
    absolute paths, so a run's config reloads the same data from any working folder.

    Raises MissingDataset (a message naming the path and the flags that fix it) or DataError.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"--data must be a spec such as mnist, idx:PATH or synthetic, got {spec!r}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "mnist" and not rest:
        return _load_mnist(root, download)
    if kind == "idx":
        return _load_idx(spec, rest, root, holdout)
    if kind == "synthetic":
        n = _count(spec, rest, SYNTHETIC_DEFAULT_N)
        train, test = holdout_split(synthetic_digits(n), holdout)
        return ImageData(train, test, spec, f"{n} synthetic digits: {len(train)} train, {len(test)} test")
    if kind in ("noise", "synthetic-noise"):
        n = _count(spec, rest, NOISE_DEFAULT_N)
        train, test = holdout_split(noise_images(n, tuple(shape)), holdout)
        return ImageData(train, test, spec, f"{n} uniform-noise images: {len(train)} train, {len(test)} test")
    if kind == "inverted":
        if not rest:
            raise DataError("data spec 'inverted:' needs a spec to invert, e.g. inverted:synthetic")
        inner = load(rest, root, download, holdout, shape)
        return ImageData(255 - inner.train, 255 - inner.test, f"inverted:{inner.spec}",
                         f"inverted ({inner.description})")
    raise DataError(f"unknown data spec {spec!r}: expected mnist, idx:PATH, idx:TRAIN,TEST, idx:DIR, "
                    "synthetic[:N], noise[:N] or inverted:SPEC")

