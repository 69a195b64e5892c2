"""Ship a finished run as a pretrained model: python -m launch.export_pretrained --workdir=RUN --name=NAME.

Writes ``sphere_jax/pretrained_models/NAME/`` (see :mod:`sphere_jax.pretrained`): the variables
of the run's best checkpoint (no optimizer state) and a model card made from the run's
``config.json`` and ``metrics.jsonl``: its final test scores on both test rotations, the epochs
and steps of the best checkpoint, and the commands that train it and reproduce its scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from launch import grid as grid_lib
from sphere_jax import pretrained, runner


def card_of(workdir: str, name: str) -> dict:
    cfg = runner.load_config(workdir)
    recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip().startswith("{")]
    tests, info, train = {}, {}, []
    for r in recs:
        if "test" in r:
            tests["so3" if r["test_rotate"] else "none"] = r
        elif "info" in r:
            info = r["info"]
        elif "train_loss" in r:
            train.append(r)
    own = "so3" if cfg.test_rotate else "none"
    if own not in tests:
        raise runner.RunError(f"{workdir} has no final test record: finish the run first")
    best_step = int(tests[own]["checkpoint_step"])
    spe = info.get("steps_per_epoch")
    task = "classify" if "accuracy" in tests[own]["test"] else "segment"
    flags = [f for f in grid_lib.config_flags(cfg) if not f.startswith(("--source", "--digits_npz"))]
    entry = f"experiments.{task}"
    keep = ("accuracy", "n") if task == "classify" else (
        "pixel_accuracy", "miou", "miou_digits", "area_miou", "area_miou_digits", "n")
    return {
        "name": name, "model": cfg.model, "L": cfg.L, "task": task, "dataset": cfg.dataset,
        "digits_per_image": cfg.digits_per_image, "params": info.get("params"),
        "train_rotation": "so3" if cfg.train_rotate else "none",
        "augmentation": (grid_lib.aug_label(cfg.copies) if cfg.train_rotate else "none"),
        "epochs": round(best_step / spe, 2) if spe else None, "steps": best_step,
        "steps_trained": int(tests[own].get("final_step", train[-1]["step"] if train else best_step)),
        "seed": cfg.seed, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
        "n_train_digits": "all minus hold-out" if cfg.n_train == 0 else cfg.n_train, "n_holdout": cfg.n_holdout,
        "device": info.get("device"),
        **({"input_norm": info["input_norm"]} if "input_norm" in info else {}),  # S2CNNs (runner.fit records it)
        **({"numerics": info["numerics"]} if "numerics" in info else {}),  # how its layers computed (float32 or not)
        "test": {rot: {k: rec["test"][k] for k in keep if k in rec["test"]} for rot, rec in sorted(tests.items())},
        "command": f"python -m {entry} " + " ".join(flags) + " --workdir=runs/" + name,
        "evaluate": f"python -m experiments.evaluate --pretrained={name} --test_rotation=so3 --n_test=0",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.export_pretrained", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--root", default=None, help="folder of the shipped models (default: the package's)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        card = card_of(args.workdir, args.name)
        variables, which, step = runner.restore_variables(args.workdir, which="best")
    except runner.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = pretrained.save(args.name, variables, card, root=args.root)
    print(json.dumps(card, indent=1))
    print(f"wrote {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
