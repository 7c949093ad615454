"""flowkern.data: IDX reading and writing, the data specs of the `flowkern` command, synthetic digits."""
from __future__ import annotations

import gzip
import os

import pytest
import torch

from flowkern import data
from flowkern.data import DataError, MissingDataset


def pixels(n, seed=0, shape=(28, 28)):
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 2), (2, 3, 4, 5), (0, 28, 28)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, dtype, shape, gz):
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    data.write_idx(path, x)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    y = data.read_idx(path)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)


def test_idx_matches_torchvision_reader(tmp_path):
    """Our writer produces the bytes torchvision's MNIST reader expects (big-endian, magic)."""
    mnist = pytest.importorskip("torchvision.datasets.mnist")
    x = pixels(5)
    data.write_idx(tmp_path / "img", x)
    assert torch.equal(mnist.read_image_file(str(tmp_path / "img")), x)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    data.write_idx(tmp_path / "lab", labels)
    assert torch.equal(mnist.read_label_file(str(tmp_path / "lab")), labels.long())
    ints = torch.tensor([[1, -2], [300000, -400000]], dtype=torch.int32)
    data.write_idx(tmp_path / "int", ints)
    assert torch.equal(mnist.read_sn3_pascalvincent_tensor(str(tmp_path / "int")), ints)


def test_gzip_detected_by_content_not_name(tmp_path):
    x = pixels(3)
    data.write_idx(tmp_path / "a.gz", x)
    os.rename(tmp_path / "a.gz", tmp_path / "plain-name")
    assert torch.equal(data.read_idx(tmp_path / "plain-name"), x)


def test_read_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "empty")
    data.write_idx(tmp_path / "full", pixels(4))
    raw = (tmp_path / "full").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "cut")
    with gzip.open(tmp_path / "badgz", "wb") as f:
        f.write(raw)
    (tmp_path / "badgz2").write_bytes((tmp_path / "badgz").read_bytes()[:30])
    with pytest.raises(DataError):
        data.read_idx(tmp_path / "badgz2")


def test_write_idx_errors(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        data.write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        data.write_idx(tmp_path / "x", [1, 2, 3])
    with pytest.raises(ValueError, match="dims"):
        data.write_idx(tmp_path / "x", torch.tensor(3, dtype=torch.uint8))


def test_read_images_layout_and_errors(tmp_path):
    data.write_idx(tmp_path / "img", pixels(4, shape=(5, 6)))
    images = data.read_images(tmp_path / "img")
    assert images.shape == (4, 1, 5, 6) and images.dtype == torch.uint8
    data.write_idx(tmp_path / "img4", pixels(4, shape=(3, 5, 6)))
    assert data.read_images(tmp_path / "img4").shape == (4, 3, 5, 6)
    data.write_idx(tmp_path / "labels", torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(DataError, match="labels"):
        data.read_images(tmp_path / "labels")
    data.write_idx(tmp_path / "floats", torch.rand(2, 4, 4))
    with pytest.raises(DataError, match="uint8"):
        data.read_images(tmp_path / "floats")


# ------------------------------------------------------------------------------ synthetic data


def test_synthetic_digits_look_like_mnist():
    x, labels = data.synthetic_digits(500, return_labels=True)
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.uint8
    assert labels.shape == (500,) and set(labels.tolist()) == set(range(10))
    assert torch.equal(x, data.synthetic_digits(500))  # deterministic
    assert not torch.equal(x, data.synthetic_digits(500, seed=1))
    # MNIST's statistics: mostly black, ~10-25% ink, bright strokes, an empty border.
    ink = (x > 0).float().mean().item()
    assert 0.08 < ink < 0.3, ink
    assert x.max() >= 220
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten()])
    assert (border == 0).float().mean() > 0.98
    assert (x.flatten(1) > 0).any(dim=1).all()  # no blank image
    assert data.synthetic_digits(0).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match="n must be"):
        data.synthetic_digits(-1)


def test_noise_images():
    x = data.noise_images(50, (3, 8, 8))
    assert x.shape == (50, 3, 8, 8) and x.dtype == torch.uint8
    assert x.min() < 10 and x.max() > 245
    assert torch.equal(x, data.noise_images(50, (3, 8, 8)))


# ----------------------------------------------------------------------------------- data specs


def test_holdout_split():
    x = pixels(100)
    train, test = data.holdout_split(x, None)
    assert len(train) == 90 and len(test) == 10 and torch.equal(test, x[90:])
    assert [len(t) for t in data.holdout_split(x, 25)] == [75, 25]
    assert [len(t) for t in data.holdout_split(x, "0.3")] == [70, 30]
    assert [len(t) for t in data.holdout_split(x, "7")] == [93, 7]
    assert [len(t) for t in data.holdout_split(x, 0.001)] == [99, 1]  # never an empty test split
    for bad in ["0", "-3", "1.5", "abc", 0, True]:
        with pytest.raises(DataError, match="--holdout"):
            data.holdout_split(x, bad)
    with pytest.raises(DataError, match="nothing would be left"):
        data.holdout_split(x, 100)


def test_load_synthetic_noise_inverted():
    ds = data.load("synthetic:200")
    assert (len(ds.train), len(ds.test)) == (180, 20) and ds.shape == (1, 28, 28)
    assert torch.equal(torch.cat([ds.train, ds.test]), data.synthetic_digits(200))
    assert len(data.load("synthetic").train) == 9000
    inv = data.load("inverted:synthetic:200", holdout=50)
    assert torch.equal(inv.test, 255 - data.synthetic_digits(200)[150:])
    noise = data.load("noise:40", shape=(3, 4, 4))
    assert noise.test.shape == (4, 3, 4, 4)
    assert data.load("synthetic-noise:40").shape == (1, 28, 28)
    for bad in ["", "cifar", "synthetic:x", "synthetic:1", "idx:", "idx:a,b,c", "inverted:", "mnist:extra"]:
        with pytest.raises(DataError):
            data.load(bad)


def write_mnist(folder, n_train=30, n_test=10, gz=True, labels=False):
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    train, test = pixels(n_train, 1), pixels(n_test, 2)
    data.write_idx(os.path.join(folder, "train-images-idx3-ubyte" + ext), train)
    data.write_idx(os.path.join(folder, "t10k-images-idx3-ubyte" + ext), test)
    if labels:
        data.write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + ext), torch.zeros(n_train, dtype=torch.uint8))
        data.write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte" + ext), torch.zeros(n_test, dtype=torch.uint8))
    return train, test


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_torchvision_layout(tmp_path, gz):
    train, test = write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    ds = data.load("mnist", root=str(tmp_path))
    assert torch.equal(ds.train[:, 0], train) and torch.equal(ds.test[:, 0], test)
    # The files directly in ROOT work too.
    write_mnist(tmp_path / "flat", gz=gz)
    assert len(data.load("mnist", root=str(tmp_path / "flat")).train) == 30


def test_load_mnist_agrees_with_torchvision(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    train, test = write_mnist(tmp_path / "MNIST" / "raw", gz=False, labels=True)
    ours = data.load("mnist", root=str(tmp_path))
    theirs = datasets.MNIST(str(tmp_path), train=True, download=False)
    assert torch.equal(theirs.data, ours.train[:, 0])
    assert torch.equal(datasets.MNIST(str(tmp_path), train=False).data, ours.test[:, 0])


def test_missing_mnist_message_names_path_and_flags(tmp_path):
    with pytest.raises(MissingDataset) as info:
        data.load("mnist", root=str(tmp_path / "nowhere"))
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    for flag in ("--download", "--root", "--data idx:", "--data synthetic"):
        assert flag in msg
    # Only the test file there: the message says how to train on it.
    os.makedirs(tmp_path / "t" / "MNIST" / "raw")
    data.write_idx(tmp_path / "t" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", pixels(5))
    with pytest.raises(MissingDataset, match="only the test file"):
        data.load("mnist", root=str(tmp_path / "t"))


def test_load_idx_file_pair_and_folder(tmp_path):
    x = pixels(50)
    data.write_idx(tmp_path / "all.gz", x)
    ds = data.load(f"idx:{tmp_path / 'all.gz'}", holdout=10)
    assert torch.equal(ds.train[:, 0], x[:40]) and torch.equal(ds.test[:, 0], x[40:])
    assert ds.spec == f"idx:{tmp_path / 'all.gz'}"
    pair = data.load(f"idx:{tmp_path / 'all.gz'},{tmp_path / 'all.gz'}")
    assert len(pair.train) == len(pair.test) == 50
    train, test = write_mnist(tmp_path / "fashion")
    folder = data.load(f"idx:{tmp_path / 'fashion'}")
    assert torch.equal(folder.test[:, 0], test)
    # Relative paths: the current folder first, then --root; the spec keeps the absolute path.
    rel = data.load("idx:all.gz", root=str(tmp_path), holdout=5)
    assert rel.spec == f"idx:{tmp_path / 'all.gz'}" and len(rel.test) == 5
    with pytest.raises(MissingDataset, match="not found") as info:
        data.load(f"idx:{tmp_path / 'missing.gz'}")
    assert str(tmp_path / "missing.gz") in str(info.value) and "--data synthetic" in str(info.value)
    with pytest.raises(MissingDataset, match="must hold"):
        data.load(f"idx:{tmp_path}")
    data.write_idx(tmp_path / "small.gz", pixels(5, shape=(14, 14)))
    with pytest.raises(DataError, match="train images are"):
        data.load(f"idx:{tmp_path / 'all.gz'},{tmp_path / 'small.gz'}")
