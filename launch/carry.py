"""Make ``.whl/``, what a bare GPU host needs: python -m launch.carry [--out=.whl] [--no_wheel].

The lent GPU machines start bare and reach no network: they have jax, flax, optax and orbax
but neither s2fft nor TFDS. This writes

* ``OUT/s2fft-<version>-...whl``: the installed s2fft's wheel for CPython 3.12 on x86-64 Linux
  (``pip download``; the GPU image's Python), installed there with ``pip install --no-index``;
* ``OUT/data/{mnist,fashion_mnist}.npz``: ``train_images`` uint8 ``[60000, 28, 28]``,
  ``train_labels`` int32 ``[60000]``, ``test_images`` uint8 ``[10000, 28, 28]``, ``test_labels``
  int32 ``[10000]`` in the order of the official files, read with
  :func:`sphere_jax.data.digits.load_digits` (offline sources: ``scripts/install_digit_sources.sh``),
  for ``--source=npz --digits_npz=OUT/data/{dataset}.npz``.

About 41 MB in all; name ``.whl`` in a device call's ``carry``. After a window of
``launch/gpu_window_seg.sh``, unpack its ``xla_cache.tgz`` into ``.whl/xla`` (at most 15 MB:
the compiled programs of the runs, loaded by the next window on the same kind of GPU); this
module leaves that folder alone.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import numpy as np

DATASETS = ("mnist", "fashion_mnist")
# the lent H100 / H200 images (results/gpu/README.md): CPython 3.12, manylinux x86-64
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def write_npz(dataset: str, path: str, load=None) -> dict:
    """Write ``dataset``'s two splits to ``path`` (see the module docstring); returns the shapes."""
    if load is None:
        from sphere_jax.data.digits import load_digits as load
    (tri, trl), (tei, tel) = load(dataset, "train"), load(dataset, "test")
    arrays = dict(train_images=np.asarray(tri, np.uint8), train_labels=np.asarray(trl, np.int32),
                  test_images=np.asarray(tei, np.uint8), test_labels=np.asarray(tel, np.int32))
    for split in ("train", "test"):
        im, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if im.ndim != 3 or im.shape[1:] != (28, 28) or lab.shape != im.shape[:1]:
            raise ValueError(f"{dataset} {split}: images {im.shape} and labels {lab.shape} are not [n, 28, 28] / [n]")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # never a half-written file under the final name
    return {k: list(v.shape) for k, v in arrays.items()}


def download_wheel(out: str, version: str | None = None) -> int:
    """``pip download`` s2fft (the installed version unless ``version``) for the GPU image into
    ``out``, after removing s2fft wheels of other versions there; returns pip's exit status."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("s2fft")
    for old in glob.glob(os.path.join(out, "s2fft-*.whl")):  # one version only: two stop the install there
        if not os.path.basename(old).startswith(f"s2fft-{version}-"):
            os.remove(old)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", out, f"s2fft=={version}"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    return subprocess.call(cmd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.carry", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".whl")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of " + ", ".join(DATASETS))
    p.add_argument("--no_wheel", action="store_true", help="only the digits")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    datasets = [d for d in args.datasets.split(",") if d]
    bad = sorted(set(datasets) - set(DATASETS))
    if bad:
        print(f"error: unknown datasets {bad}; choose from {DATASETS}", file=sys.stderr)
        return 2
    if not args.no_wheel:
        from importlib.metadata import PackageNotFoundError

        try:
            rc = download_wheel(args.out)
        except PackageNotFoundError:
            print("error: s2fft is not installed here (pip install -e .), so its version is unknown", file=sys.stderr)
            return 1
        if rc != 0:
            print("error: pip download of s2fft failed (a package index must be reachable)", file=sys.stderr)
            return 1
    from sphere_jax.data.digits import DigitsSourceError

    for d in datasets:
        path = os.path.join(args.out, "data", f"{d}.npz")
        try:
            shapes = write_npz(d, path)
        except (DigitsSourceError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
