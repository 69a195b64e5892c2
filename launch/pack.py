"""Pack a sweep's small files for the trip back from a lent GPU (at most 8 files come back).

    python -m launch.pack --sweep=/tmp/sweep --out=$OUT [--checkpoints=best|state|inflight|none] [--cache=DIR]

Writes ``OUT/sweep_meta.tgz``: every run's ``config.json``, ``metrics.jsonl``, ``run.log``,
``summary.md`` and prediction figures, the sweep's ``sweep.jsonl`` and ``aggregate/``. Then,
with ``--checkpoints``:

* ``best`` -> ``OUT/sweep_best.tgz``: best checkpoints of the small models (S2CNNs first, at
  most 1.1M parameters), while the archive stays under 15 MB (models to ship);
* ``state`` -> ``OUT/sweep_state.tgz``: the S2CNN runs' checkpoints, under 15 MB (a file that
  comes back from a lent GPU may have 16 MB): best and latest of the unfinished runs (to resume
  them in the next window) first, then the best of the finished ones.

* ``inflight`` -> ``OUT/inflight.tgz``: the unfinished S2CNN runs alone, each with its metadata
  (the files of ``sweep_meta.tgz``) and its best and latest checkpoints, under 8 MB: the one
  archive to unpack into a new sweep root to resume them. Small enough to commit (as
  ``results/inflight/inflight.tgz``), since the machine of the next session, and its ignored
  folders such as ``.whl/``, may be new; tracked files go with every device call. A run without
  a checkpoint yet is left out (it starts over anyway), and no ``sweep_meta.tgz`` is written.

And with ``--cache=DIR`` (a JAX persistent compilation cache) -> ``OUT/xla_cache.tgz``: its
newest files, under 15 MB. A lent machine starts bare, so every window would compile each model
again (the 204k segmenter's training step: 43 s on an H200); unpacked into ``.whl/xla`` and
carried, the next window on the same kind of GPU and jax loads those programs instead.

Unpack an archive into the sweep root to continue there (the cache archive into ``.whl/xla``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile

META = ("config.json", "metrics.jsonl", "run.log", "sweep.jsonl", "summary.md", "predictions_R.png",
        "predictions_NR.png")
SHIP_MAX_PARAMS = 1_100_000
SHIP_BUDGET_BYTES = 15e6
INFLIGHT_BUDGET_BYTES = 8e6


def run_dirs(sweep: str) -> list[str]:
    return sorted(d for d, _, files in os.walk(sweep) if "config.json" in files)


def params_of(run_dir: str) -> int | None:
    """The parameter count from the run's ``info`` record, if it has one."""
    path = os.path.join(run_dir, "metrics.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "info" in rec:
            return rec["info"]["params"]
    return None


def _add_meta(tar: tarfile.TarFile, sweep: str, d: str) -> None:
    for f in META:
        if os.path.exists(os.path.join(d, f)):
            tar.add(os.path.join(d, f), arcname=os.path.join(os.path.relpath(d, sweep), f))


def pack_meta(sweep: str, out: str) -> str:
    path = os.path.join(out, "sweep_meta.tgz")
    with tarfile.open(path, "w:gz") as tar:
        for d in [sweep] + run_dirs(sweep):
            _add_meta(tar, sweep, d)
        if os.path.isdir(os.path.join(sweep, "aggregate")):
            tar.add(os.path.join(sweep, "aggregate"), arcname="aggregate")
    return path


def pack_best(sweep: str, out: str) -> str:
    path = os.path.join(out, "sweep_best.tgz")
    runs = sorted(run_dirs(sweep), key=lambda d: ("s2cnn" not in d, params_of(d) or 1e12))
    budget = SHIP_BUDGET_BYTES
    with tarfile.open(path, "w:gz") as tar:
        for d in runs:
            n = params_of(d)
            best = os.path.join(d, "best")
            if not n or n > SHIP_MAX_PARAMS or not os.path.isdir(best) or 12 * n > budget:
                continue
            budget -= 12 * n  # params + Adam moments, float32
            tar.add(best, arcname=os.path.join(os.path.relpath(d, sweep), "best"))
    return path


def finished(run_dir: str) -> bool:
    """Has the run a final test record (``launch.run_grid.final_test``)?"""
    from launch.run_grid import final_test, read_records  # lazy: run_grid imports the library

    return final_test(read_records(run_dir)) is not None


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def pack_state(sweep: str, out: str, budget_bytes: float = SHIP_BUDGET_BYTES, inflight: bool = False) -> str:
    """Unfinished S2CNN runs first, each with its best and latest checkpoints (to resume it),
    then the finished ones with their best checkpoint alone (to evaluate or ship it), while the
    archive's uncompressed size stays within ``budget_bytes``. A run that does not fit is named on
    stderr and left out whole. ``inflight``: the unfinished runs alone, each with its metadata
    too, into ``inflight.tgz``."""
    path = os.path.join(out, "inflight.tgz" if inflight else "sweep_state.tgz")
    runs = [d for d in run_dirs(sweep) if "/s2cnn" in d]
    runs.sort(key=finished)  # False (unfinished) first; stable, so in path order within each
    if inflight:
        runs = [d for d in runs if not finished(d)]
    budget = budget_bytes
    with tarfile.open(path, "w:gz") as tar:
        for d in runs:
            subs = ("best",) if finished(d) else ("best", "checkpoints")
            subs = [s for s in subs if os.path.isdir(os.path.join(d, s))]
            if inflight and not subs:
                continue
            size = sum(_dir_bytes(os.path.join(d, s)) for s in subs)
            if size > budget:
                print(f"pack: {os.path.relpath(d, sweep)} left out of {os.path.basename(path)} "
                      f"({size / 1e6:.1f} MB, {max(budget, 0) / 1e6:.1f} MB left)", file=sys.stderr)
                continue
            budget -= size
            for sub in subs:
                tar.add(os.path.join(d, sub), arcname=os.path.join(os.path.relpath(d, sweep), sub))
            if inflight:
                _add_meta(tar, sweep, d)
    return path


def pack_cache(cache: str, out: str, budget_bytes: float = SHIP_BUDGET_BYTES) -> str | None:
    """``OUT/xla_cache.tgz``: the files of the compilation cache ``cache`` (paths kept relative
    to it), newest first, while their total size stays within ``budget_bytes``; a file that does
    not fit is skipped and smaller, older ones may still go in. ``None`` (nothing written) when
    ``cache`` holds no file. JAX keys each entry by program, compiler options, jax version and
    device, so entries of other GPUs or versions are never used by mistake, only carried."""
    files = [os.path.join(d, f) for d, _, names in os.walk(cache) for f in names]
    if not files:
        return None
    files.sort(key=lambda f: (-os.path.getmtime(f), f))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "xla_cache.tgz")
    budget, skipped = budget_bytes, 0
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            size = os.path.getsize(f)
            if size > budget:
                skipped += 1
                continue
            budget -= size
            tar.add(f, arcname=os.path.relpath(f, cache))
    if skipped:
        print(f"pack: {skipped} of {len(files)} cache files left out of {os.path.basename(path)} "
              f"({budget_bytes / 1e6:.1f} MB budget)", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="sweep root (launch.run_grid --root)")
    p.add_argument("--out", required=True, help="folder for the archives")
    p.add_argument("--checkpoints", choices=("best", "state", "inflight", "none"), default="none")
    p.add_argument("--cache", default="", help="a compilation cache folder to pack into xla_cache.tgz")
    args = p.parse_args(argv)
    if not os.path.isdir(args.sweep):
        print(f"error: no sweep at {args.sweep}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # inflight.tgz carries its runs' metadata itself: it is the one archive to commit
    paths = [] if args.checkpoints == "inflight" else [pack_meta(args.sweep, args.out)]
    if args.checkpoints == "best":
        paths.append(pack_best(args.sweep, args.out))
    elif args.checkpoints == "state":
        paths.append(pack_state(args.sweep, args.out))
    elif args.checkpoints == "inflight":
        paths.append(pack_state(args.sweep, args.out, INFLIGHT_BUDGET_BYTES, inflight=True))
    if args.cache and os.path.isdir(args.cache):
        paths.append(pack_cache(args.cache, args.out))
    for path in filter(None, paths):
        print(os.path.basename(path), os.path.getsize(path) // 1024, "KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
