"""Copy the finished runs of a sweep into a results tree, without their checkpoints.

    python -m launch.collect --sweep=/tmp/sweep --into=results/classification/runs [--replace] [--dry_run]

A sweep's runs live under ``SWEEP/<task>/...`` (``launch.run_grid``; ``launch.pack`` archives,
unpacked). For every run there with a final test record, ``config.json``, ``metrics.jsonl``,
``summary.md`` and its prediction figures are copied to the same relative path under INTO, which
``python -m launch.aggregate --root=INTO`` then reads. Not copied:

* unfinished runs (no final test record): they resume in the sweep, not here;
* runs outside ``SWEEP/classify`` and ``SWEEP/segment``, such as ``SWEEP/extra`` (grid runs
  retrained with other settings by ``launch/gpu_window_seg.sh``): under INTO they would count as
  more seeds of the grid's rows;
* a run that INTO already has finished, unless ``--replace``.

Prints one line per run: ``copied``, ``replaced`` (INTO had the run, unfinished, or finished
and ``--replace``), ``kept`` (already finished in INTO) or ``unfinished``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from launch.pack import finished, run_dirs

FILES = ("config.json", "metrics.jsonl", "summary.md", "predictions_R.png", "predictions_NR.png")
TASK_DIRS = ("classify", "segment")


def collect(sweep: str, into: str, replace: bool = False, dry_run: bool = False) -> list[tuple[str, str]]:
    """``[(relative run path, what happened)]`` for every run under ``sweep``'s task folders."""
    out = []
    for d in run_dirs(sweep):
        rel = os.path.relpath(d, sweep)
        if rel.split(os.sep)[0] not in TASK_DIRS:
            continue
        if not finished(d):
            out.append((rel, "unfinished"))
            continue
        dest = os.path.join(into, rel)
        existed = os.path.isdir(dest)
        if existed and finished(dest) and not replace:
            out.append((rel, "kept"))
            continue
        if not dry_run:
            os.makedirs(dest, exist_ok=True)
            for f in FILES:
                src = os.path.join(d, f)
                if os.path.exists(src):
                    shutil.copy2(src, os.path.join(dest, f))
                elif os.path.exists(os.path.join(dest, f)):
                    os.remove(os.path.join(dest, f))  # a file of the replaced run that this one lacks
        out.append((rel, "replaced" if existed else "copied"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="sweep root (launch.run_grid --root, or an unpacked archive)")
    p.add_argument("--into", required=True, help="results tree, e.g. results/classification/runs")
    p.add_argument("--replace", action="store_true", help="replace runs that INTO already has finished")
    p.add_argument("--dry_run", action="store_true", help="print what would be done, copy nothing")
    args = p.parse_args(argv)
    if not os.path.isdir(args.sweep):
        print(f"error: no sweep at {args.sweep}", file=sys.stderr)
        return 2
    rows = collect(args.sweep, args.into, args.replace, args.dry_run)
    for rel, what in rows:
        print(f"{what:10s} {rel}")
    if not rows:
        print(f"no runs under {args.sweep}/{{{','.join(TASK_DIRS)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
