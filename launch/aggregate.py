"""Tables and figures of a sweep: python -m launch.aggregate --root=DIR [--benchmark=benchmark.json] [--out=DIR/aggregate].

Reads every run below ``--root`` (each directory with a ``config.json``; its ``metrics.jsonl``
must hold a final ``"test"`` record of the run's test rotation, else the run is listed as
unfinished) and writes to ``--out``:

* ``results.md``: per (task, dataset, digits per image, L) a table with one row per
  model and train -> test mode, one column per augmentation level (1, 2, 4, ..., fresh),
  cells = test accuracy in % (classification) or test mIoU over the 11 classes (segmentation),
  the mean over seeds (``mean ± std (n)`` when there are several); then every run's metrics;
* ``results.json``: one object per (run, test rotation) in the study's format (see
  :func:`study_rows`); ``summary.json``: the tables' numbers and every run's details;
* ``score_vs_aug_<group>.png``: the score against augmentation, one curve per model trained on
  rotated digits, runs trained on canonical digits (the S2CNN) as horizontal reference lines;
* ``tradeoff_<group>.png``: best score of each model against its training-step time and
  inference latency, from ``--benchmark`` (``python -m experiments.benchmark``'s JSON; several
  files comma-separated), else
  against the seconds per training step measured in the runs themselves.

No jax needed: only json, numpy and matplotlib (Agg).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np

from launch.labels import aug_label, aug_sort_key

METRIC = {"classify": ("accuracy", "test accuracy (%)", 100.0), "segment": ("miou", "test mIoU (11 classes)", 1.0)}


# --------------------------------------------------------------------------- collect


def _records(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def collect(root: str) -> tuple[list[dict], list[str]]:
    """``(finished runs, unfinished workdirs)``; a finished run is a flat dict of its config,
    derived labels (task, train, test, aug), the test metrics and timings."""
    runs, unfinished = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "best", "aggregate", "slurm"))
        if "config.json" not in filenames:
            continue
        try:
            cfg = json.load(open(os.path.join(dirpath, "config.json")))
        except (OSError, json.JSONDecodeError):
            unfinished.append(os.path.relpath(dirpath, root))
            continue
        recs = _records(os.path.join(dirpath, "metrics.jsonl"))
        tests = {}  # test rotation -> its last test record
        for rec in recs:
            if "test" in rec:
                tests[bool(rec.get("test_rotate", cfg.get("test_rotate")))] = rec
        if bool(cfg.get("test_rotate")) not in tests:
            unfinished.append(os.path.relpath(dirpath, root))
            continue
        info = {}
        for rec in recs:
            if "info" in rec:
                info = rec["info"]
        train_recs = [r for r in recs if "train_loss" in r]
        last = train_recs[-1] if train_recs else {}
        steps = last.get("step")
        # runs trained together (--seeds, --augmentations) share their wall time: a run's cost per step is its share
        together = len((info.get("members") or {}).get("seeds", [None]))
        # the run's own test rotation first, then the other one (a run evaluates both at the end)
        for rot in sorted(tests, key=lambda r: r != bool(cfg.get("test_rotate"))):
            test = tests[rot]
            m = test["test"]
            task = "classify" if "accuracy" in m else "segment"
            row = dict(cfg)
            row.update(
                workdir=os.path.relpath(dirpath, root), task=task,
                train="R" if cfg.get("train_rotate") else "NR", test="R" if rot else "NR",
                own_test=rot == bool(cfg.get("test_rotate")),
                aug=aug_label(cfg.get("copies")) if cfg.get("train_rotate") else "1",
                metrics=m, score=float(m[METRIC[task][0]]), steps_done=steps,
                epochs=last.get("epochs"), train_seconds=last.get("seconds"),
                step_seconds=(last["seconds"] / steps / together) if steps and last.get("seconds") is not None else None,
                trained_with=together,
                checkpoint_step=test.get("checkpoint_step"), stopped_early=test.get("stopped_early"),
                params=info.get("params"), device=info.get("device"),
                finished="final_step" in test,  # else an interim evaluation of a run cut before its end
            )
            runs.append(row)
    runs.sort(key=lambda r: (r["workdir"], not r["own_test"]))
    return runs, sorted(unfinished)


def study_rows(runs: list[dict]) -> list[dict]:
    """One object per (run, test rotation), in the study's format: ``dataset, digits_per_image,
    model, params, train_rotation, test_rotation`` ("none" / "so3"), ``augmentation`` (copies as
    an integer, or "fresh"), ``seed, epochs, steps`` (steps trained; ``best_step``: the evaluated
    checkpoint), ``n_test, device, train_seconds`` (wall time; ``trained_with`` > 1: shared by that
    many runs trained together in one program) and the scores: ``test_accuracy``
    (classification) or ``test_miou, test_miou_digits, test_pixel_accuracy`` and their
    area-weighted variants (segmentation)."""
    out = []
    for r in runs:
        m = r["metrics"]
        aug = r["aug"]
        row = {
            "dataset": r["dataset"], "digits_per_image": int(r["digits_per_image"]), "model": r["model"],
            "params": r.get("params"), "L": int(r["L"]),
            "train_rotation": "so3" if r["train"] == "R" else "none", "test_rotation": "so3" if r["test"] == "R" else "none",
            "augmentation": aug if aug == "fresh" else int(aug), "seed": int(r["seed"]),
            "epochs": r.get("epochs"), "steps": r.get("steps_done"), "best_step": r.get("checkpoint_step"),
            "stopped_early": r.get("stopped_early"), "finished": r.get("finished", True), "n_test": m.get("n"),
            "device": r.get("device"),
            "train_seconds": r.get("train_seconds"), "trained_with": r.get("trained_with", 1), "workdir": r["workdir"],
        }
        if r["task"] == "classify":
            row["test_accuracy"] = m["accuracy"]
        else:
            row.update(test_miou=m["miou"], test_miou_digits=m["miou_digits"], test_pixel_accuracy=m["pixel_accuracy"],
                       test_area_miou=m.get("area_miou"), test_area_miou_digits=m.get("area_miou_digits"))
        out.append(row)
    return out


# --------------------------------------------------------------------------- tables


def _size_hint(model: str) -> float:
    """Parameters suggested by a name (cnn_218k -> 218e3, cnn_5_5m -> 5.5e6); 0 if none."""
    m = re.search(r"(\d+(?:_\d+)?)([km])$", model)
    if not m:
        return 0.0
    return float(m.group(1).replace("_", ".")) * (1e3 if m.group(2) == "k" else 1e6)


def row_key(r: dict) -> tuple:
    return (r["model"], r["train"], r["test"])


def row_sort(key: tuple) -> tuple:
    model, train, test = key
    return (not model.startswith("s2cnn"), _size_hint(model), model, train != "NR", test)


def group_key(r: dict) -> tuple:
    return (r["task"], r["dataset"], int(r["digits_per_image"]), int(r["L"]))


def group_title(g: tuple) -> str:
    task, dataset, digits, L = g
    what = "classification" if task == "classify" else "segmentation"
    return f"{what}, {dataset}, {digits} digit{'s' if digits > 1 else ''} per image, L={L}"


def group_slug(g: tuple) -> str:
    task, dataset, digits, L = g
    return f"{task}_{dataset}_d{digits}_L{L}"


def tables(runs: list[dict]) -> dict:
    """``{group: {"columns": [aug...], "rows": {(model, train, test): {aug: [scores...]}},
    "interim": {((model, train, test), aug), ...}}}``; ``interim``: cells with a run cut before its end."""
    out: dict = {}
    for r in runs:
        g = out.setdefault(group_key(r), {"columns": set(), "rows": defaultdict(lambda: defaultdict(list)),
                                          "interim": set()})
        g["columns"].add(r["aug"])
        g["rows"][row_key(r)][r["aug"]].append(r["score"])
        if not r.get("finished", True):
            g["interim"].add((row_key(r), r["aug"]))
    for g in out.values():
        g["columns"] = sorted(g["columns"], key=aug_sort_key)
        g["rows"] = {k: dict(g["rows"][k]) for k in sorted(g["rows"], key=row_sort)}
    return out


def cell(task: str, scores: list[float] | None) -> str:
    if not scores:
        return "-"
    scale = METRIC[task][2]
    digits = 2 if task == "classify" else 4
    mean = float(np.mean(scores)) * scale
    if len(scores) == 1:
        return f"{mean:.{digits}f}"
    std = float(np.std(scores, ddof=1)) * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(scores)})"


def markdown(runs: list[dict], unfinished: list[str] = ()) -> str:
    lines = []
    for g, t in sorted(tables(runs).items()):
        task = g[0]
        lines += [f"## {group_title(g)}", "",
                  f"{METRIC[task][1]}; rows: model (train -> test rotation), columns: rotated copies per training digit "
                  "(fresh: a new rotation at every draw; NR training has none)", ""]
        cols = t["columns"]
        lines.append("| model | " + " | ".join(f"aug {c}" for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for key, cells in t["rows"].items():
            model, train, test = key
            shown = [cell(task, cells.get(c)) + (" *" if (key, c) in t["interim"] else "") for c in cols]
            lines.append(f"| {model} ({train} -> {test}) | " + " | ".join(shown) + " |")
        if t["interim"]:
            lines += ["", "\\* interim: a run cut before its end (early stopping or the step budget), scored at its "
                          "best checkpoint so far; not converged"]
        lines.append("")
    if runs:
        lines += ["## Every run", "", "| run | test digits | score | metrics | steps | device | train s | s/step |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            m = r["metrics"]
            if r["task"] == "classify":
                detail = f"accuracy {100 * m['accuracy']:.2f} % (n={m.get('n')})"
            else:
                detail = (f"pixel acc {100 * m['pixel_accuracy']:.2f} %, mIoU {m['miou']:.4f}, mIoU digits "
                          f"{m['miou_digits']:.4f}, area mIoU {m.get('area_miou', float('nan')):.4f} (n={m.get('n')})")
            sps = f"{r['step_seconds']:.3f}" if r["step_seconds"] else "-"
            if r.get("trained_with", 1) > 1:  # its wall time, shared; s/step: its share
                sps += f" (1 of {r['trained_with']})"
            cut = "" if r.get("finished", True) else " (interim: cut before its end)"
            test = "rotated (R)" if r["test"] == "R" else "canonical (NR)"
            lines.append(f"| {r['workdir']}{cut} | {test} | {cell(r['task'], [r['score']])} | {detail} | {r['steps_done']} | "
                         f"{r.get('device') or '-'} | {r['train_seconds']} | {sps} |")
        lines.append("")
    if unfinished:
        lines += ["## Unfinished (no final test record)", ""] + [f"- {u}" for u in unfinished] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(t: dict) -> dict:
    """One colour per model of a group, the same in every figure of the group."""
    models = list(dict.fromkeys(k[0] for k in t["rows"]))
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(models)}


def plot_score_vs_aug(g: tuple, t: dict, path: str, test: str = "R") -> str:
    """Score on ``test``-rotated digits against augmentation: one curve per model trained on
    rotated digits (mean over seeds, error bars = std); the S2CNNs (any training) as horizontal
    bands (mean +- std over seeds), other models trained on canonical digits as dashed lines."""
    task = g[0]
    scale = METRIC[task][2]
    cols = t["columns"]
    x = np.arange(len(cols))
    fig = _figure((7.0, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    colors = _colors(t)
    styles = iter(["--", "-.", ":", (0, (5, 1))] * 4)
    for (model, train, tst), cells in t["rows"].items():
        if tst != test:
            continue
        label = f"{model} ({train}->{tst})"
        vals = [s for c in cells.values() for s in c]
        if model.startswith("s2cnn"):
            # a band per S2CNN row (each augmentation level of it pooled), hatched for R training
            mean, std = np.mean(vals) * scale, (np.std(vals, ddof=1) * scale if len(vals) > 1 else 0.0)
            ls = next(styles)
            spread = f" ± {std:.2f}" if len(vals) > 1 else ""  # no spread from one seed
            ax.axhline(mean, ls=ls, lw=1.5, color=colors[model], label=f"{label}: {mean:.2f}{spread} (n={len(vals)})")
            ax.axhspan(mean - std, mean + std, color=colors[model], alpha=0.15 if train == "NR" else 0.3,
                       hatch=None if train == "NR" else "//")
            continue
        if train == "NR":
            ax.axhline(np.mean(vals) * scale, ls=next(styles), lw=1.5, color=colors[model], label=label)
            continue
        xs = [i for i, c in zip(x, cols) if c in cells]
        ys = [np.mean(cells[c]) * scale for c in cols if c in cells]
        err = [np.std(cells[c], ddof=1) * scale if len(cells[c]) > 1 else 0.0 for c in cols if c in cells]
        ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, label=label, color=colors[model])
    ax.set_xticks(x)
    ax.set_xticklabels(cols)
    ax.set_xlabel("augmentation: rotated copies per training digit")
    ax.set_ylabel(METRIC[task][1] + f", {'rotated' if test == 'R' else 'canonical'} test digits")
    ax.set_title(group_title(g), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)
    return path


def load_benchmark(paths) -> dict:
    """``{model: row}`` of one or more benchmark.json files (a path, a comma-separated string of
    paths, or a list; rows with errors dropped; a model's first row wins, except that a row with
    a training step beats one without)."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    rows = [r for p in paths for r in json.load(open(p))]
    out: dict = {}
    for r in rows:
        if "error" in r:
            continue
        have = out.get(r["model"])
        if have is None or ("train_step_s" in r and "train_step_s" not in have):
            out[r["model"]] = r
    return out


def _latency(row: dict, batch: int) -> tuple[float | None, str | None]:
    inf = row.get("infer_s", {})
    if str(batch) in inf:
        return inf[str(batch)], str(batch)
    if inf:
        b = min(inf, key=lambda k: abs(int(k) - batch))
        return inf[b], b
    return None, None


def timing_device(runs: list[dict], g: tuple) -> str | None:
    """The device that ran most of group ``g``'s timed runs. Step times from different machines
    (a CPU run beside GPU runs) do not belong on one axis, so the run-timed trade-off figure
    uses this device's runs only."""
    counts: dict = {}
    for r in runs:
        if group_key(r) == g and r.get("step_seconds"):
            counts[r.get("device")] = counts.get(r.get("device"), 0) + 1
    return max(sorted(counts, key=str), key=counts.get) if counts else None


def plot_tradeoff(g: tuple, t: dict, runs: list[dict], path: str, bench: dict | None = None, batch: int = 1,
                  test_rotation: str = "R") -> str | None:
    """Best score of each model on ``test_rotation`` digits (over augmentation levels and training
    rotations) against time: training step and inference latency from the benchmark, or seconds
    per training step measured in the runs."""
    task = g[0]
    scale = METRIC[task][2]
    best: dict = {}
    for (model, train, test), cells in t["rows"].items():
        if test != test_rotation:
            continue
        s = max(np.mean(v) for v in cells.values()) * scale
        best[model] = max(best.get(model, -math.inf), s)
    if bench:
        panels = []
        for title, getter in (
            ("training step (s)", lambda r: (r.get("train_step_s"), f"batch {r.get('train_batch')}")),
            ("inference latency (s)", lambda r: _latency(r, batch)),
        ):
            pts = []
            for model, s in best.items():
                if model in bench:
                    v, b = getter(bench[model])
                    if v:
                        b = b if str(b).startswith("batch") else f"batch {b}"
                        pts.append((model, v, s, f"{model}\n{b}, L={bench[model].get('L')}"))
            panels.append((title, pts))
        source = f"benchmark on {next(iter(bench.values())).get('device', '?')}"
    else:
        device = timing_device(runs, g)
        pts = []
        for model, s in best.items():
            secs = [r["step_seconds"] for r in runs if group_key(r) == g and r["model"] == model and r["step_seconds"]
                    and r.get("device") == device]
            if secs:
                pts.append((model, float(np.median(secs)), s, model))
        panels = [("training seconds per step, measured in the runs (incl. evaluation)", pts)]
        source = f"the sweep's own timings on {device or 'an unnamed device'}"
    if not any(p for _, p in panels):
        return None
    from matplotlib import ticker

    colors = _colors(t)
    fig = _figure((5.2 * len(panels), 4.2))
    for i, (title, pts) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for model, xv, yv, label in pts:
            ax.scatter([xv], [yv], s=80 if model.startswith("s2cnn") else 50, marker="*" if model.startswith("s2cnn") else "o",
                       color=colors[model])
            ax.annotate(label, (xv, yv), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.15)
        short = ticker.FuncFormatter(lambda v, _: f"{v:.2g}")
        lo, hi = ax.get_xlim()
        ax.xaxis.set_major_formatter(short)
        # label minor ticks only when the axis spans less than a decade (else they collide)
        ax.xaxis.set_minor_formatter(short if hi / lo < 10 else ticker.NullFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(title)
        ax.set_ylabel(f"best {METRIC[task][1]}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{group_title(g)}, {'rotated' if test_rotation == 'R' else 'canonical'} test digits:\n"
                 f"best score vs time ({source})", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- entry point


def aggregate(root: str, out: str | None = None, benchmark: str | None = None, latency_batch: int = 1,
              figures: bool = True) -> dict:
    """Write results.md / results.json (and figures) for the sweep below ``root``; returns a summary."""
    out = out or os.path.join(root, "aggregate")
    os.makedirs(out, exist_ok=True)
    runs, unfinished = collect(root)
    text = markdown(runs, unfinished)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    tabs = tables(runs)
    bench = load_benchmark(benchmark) if benchmark else None
    files = []
    if figures:
        for g, t in sorted(tabs.items()):
            files.append(plot_score_vs_aug(g, t, os.path.join(out, f"score_vs_aug_{group_slug(g)}.png")))
            p = plot_tradeoff(g, t, runs, os.path.join(out, f"tradeoff_{group_slug(g)}.png"), bench, latency_batch)
            if p:
                files.append(p)
    summary = {
        "runs": [{k: v for k, v in r.items()} for r in runs],
        "unfinished": unfinished,
        "tables": [
            {"group": dict(zip(("task", "dataset", "digits_per_image", "L"), g)), "columns": t["columns"],
             "rows": [{"model": k[0], "train": k[1], "test": k[2], "cells": {c: float(np.mean(v)) for c, v in cells.items()},
                       "n": {c: len(v) for c, v in cells.items()}} for k, cells in t["rows"].items()]}
            for g, t in sorted(tabs.items())
        ],
        "figures": files,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(study_rows(runs), f, indent=1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.aggregate", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="sweep root (run workdirs below it)")
    p.add_argument("--out", default=None, help="output directory (default ROOT/aggregate)")
    p.add_argument("--benchmark", default=None, help="benchmark.json (comma-separated: several) for the trade-off figure")
    p.add_argument("--latency_batch", type=int, default=1, help="batch size of the latency axis")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    s = aggregate(args.root, args.out, args.benchmark, args.latency_batch)
    print(open(os.path.join(args.out or os.path.join(args.root, "aggregate"), "results.md")).read())
    print(f"{len(s['runs'])} finished runs, {len(s['unfinished'])} unfinished; figures: {s['figures']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
