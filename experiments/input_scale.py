"""How the input scale changes an S2CNN's learning: the same run at several scales, curves side by side.

    python -m experiments.input_scale --model=s2cnn_cls --L=12 --steps=1000 --batch_size=32 \\
        --variants=none1,none255,rms1,rms60 --out=results/input_scale/cls_L12

A variant is ``noneG`` (no normalisation, inputs in [0, 1] times G: ``none255`` is the
reference's 0..255 range) or ``rmsT`` (the model scales each input to area-weighted RMS T; the
library's default is ``rms60``). Everything else is the same: canonical (NR) MNIST training
digits minus a 500-digit hold-out (seed 0), Adam, seed ``--seed``; the hold-out is scored every
``--eval_every`` steps and at the end ``--n_test`` (500) rotated test digits. Writes ``OUT.json`` (curves) and
``OUT.png``.
"""
import dataclasses
import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_string("model", "s2cnn_cls", "an S2CNN of sphere_jax.models.s2cnn")
flags.DEFINE_integer("L", 12, "band-limit")
flags.DEFINE_integer("steps", 1000, "training steps per variant")
flags.DEFINE_integer("batch_size", 32, "batch size")
flags.DEFINE_float("learning_rate", 5e-3, "Adam learning rate")
flags.DEFINE_integer("eval_every", 125, "steps between hold-out scores (and loss windows)")
flags.DEFINE_integer("seed", 0, "seed of initialisation and data order")
flags.DEFINE_list("variants", ["none1", "none255", "rms1", "rms60"], "input scales to compare")
flags.DEFINE_string("out", "runs/input_scale", "output path without extension")
flags.DEFINE_string("digits_npz", None, "read MNIST from this .npz (train_images/train_labels/test_images/"
                    "test_labels, as launch/gpu_window.sh carries it) instead of the installed sources")
flags.DEFINE_integer("n_test", 500, "rotated test digits scored at the end")
flags.DEFINE_bool("initial_only", False, "only print each variant's initial loss and logit spread on one "
                  "batch of training digits (untrained model, seed --seed), no training")
FLAGS = flags.FLAGS


def parse_variant(v: str) -> tuple[str, float, float]:
    """``(input_norm, data gain, target RMS)`` of a variant name."""
    try:
        if v.startswith("rms"):
            return "rms", 1.0, float(v[3:] or 1)
        if v.startswith("none"):
            return "none", float(v[4:] or 1), 1.0
    except ValueError:
        pass
    raise ValueError(f"variant {v!r}: use noneGAIN or rmsTARGET, e.g. none255, rms60")


def variant_model(variant):
    """``(module, inner S2CNN, task)``: ``FLAGS.model`` with the variant's input normalisation,
    wrapped so that it sees the data's range, [0, 1] times the variant's gain."""
    import flax.linen as nn

    from sphere_jax.models import registry

    norm, gain, target = parse_variant(variant)
    base, task = registry.make_model(FLAGS.model, FLAGS.L)
    if not hasattr(base.config, "input_norm"):
        raise ValueError(f"{FLAGS.model} is not an S2CNN")
    model = type(base)(dataclasses.replace(base.config, input_norm=norm, input_rms=target))
    bn = getattr(model.config, "batchnorm", False)

    class Scaled(nn.Module):
        inner: nn.Module
        gain: float

        @nn.compact
        def __call__(self, x, tables, train=False):
            return self.inner(x * self.gain, tables, **({"train": train} if bn else {}))

    return Scaled(model, gain), model, task


def run_variant(variant, images, labels, test):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sphere_jax import harmonics, runner, train
    from sphere_jax.data import pipeline

    m, model, task = variant_model(variant)
    (tri, trl), (hoi, hol) = pipeline.split_holdout(images, labels, 500, seed=0)
    cfg = pipeline.StreamConfig(L=FLAGS.L, batch_size=FLAGS.batch_size, rotate=False)
    stream = pipeline.DigitStream(tri, trl, cfg, seed=FLAGS.seed)
    tables = harmonics.build_tables(model.table_specs())
    v = m.init(jax.random.key(FLAGS.seed), jnp.zeros((1, 2 * FLAGS.L, 2 * FLAGS.L - 1, 1)), tables)
    params, ms = train.split_variables(v)
    state = train.TrainState.create(params, optax.adam(FLAGS.learning_rate), ms)
    step_fn, predict = train.make_train_step(m, task), train.make_predict(m)
    score = (lambda r: r["accuracy"]) if task == "classify" else (lambda r: r["miou"])
    curve, losses, t0 = [], [], time.time()
    for s in range(FLAGS.steps):
        b = stream.batch(s)
        state, loss = step_fn(state, tables, b[0], train.targets(b, task))
        losses.append(loss)
        if s == 0:  # an early line (compile + first step), so that a slow start is not taken for a hang
            jax.block_until_ready(loss)
            print(variant, json.dumps({"first_step_s": round(time.time() - t0, 1)}), flush=True)
        if (s + 1) % FLAGS.eval_every == 0 or s + 1 == FLAGS.steps:
            h = runner.evaluate_params(predict, task, state.variables, tables, hoi, hol, cfg, 1)
            curve.append({"step": s + 1, "loss": float(np.mean(jnp.stack(losses))), "holdout": score(h)})
            losses = []
            print(variant, json.dumps(curve[-1]), flush=True)
    rot = pipeline.StreamConfig(L=FLAGS.L, batch_size=FLAGS.batch_size, rotate=True)
    t = runner.evaluate_params(predict, task, state.variables, tables, test[0][:FLAGS.n_test], test[1][:FLAGS.n_test], rot, 2)
    print(variant, json.dumps({"test_R": t, "n_test": len(test[0][:FLAGS.n_test])}), flush=True)
    return {"variant": variant, "curve": curve, "test_R": t, "seconds": round(time.time() - t0, 1)}


def initial_loss(variant, images, labels) -> dict:
    """Cross-entropy and logit standard deviation of the untrained model on the first batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from sphere_jax import harmonics, train
    from sphere_jax.data import pipeline

    m, model, task = variant_model(variant)
    cfg = pipeline.StreamConfig(L=FLAGS.L, batch_size=FLAGS.batch_size, rotate=False)
    b = pipeline.DigitStream(images, labels, cfg, seed=FLAGS.seed).batch(0)
    x, y = b[0], train.targets(b, task)
    tables = harmonics.build_tables(model.table_specs())
    logits = m.apply(m.init(jax.random.key(FLAGS.seed), x[:1], tables), x, tables)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {"variant": variant, "initial_loss": round(float(ce), 3), "logit_std": round(float(jnp.std(logits)), 3)}


def plot(result, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for r in result["runs"]:
        steps = [c["step"] for c in r["curve"]]
        ax1.plot(steps, [c["loss"] for c in r["curve"]], marker="o", label=r["variant"])
        ax2.plot(steps, [c["holdout"] for c in r["curve"]], marker="o", label=r["variant"])
    for ref, style in zip(result.get("reference", []), ("k--", "k:")):
        if ref.get("windows"):
            ax1.plot([c["step"] for c in ref["windows"]], [c["loss"] for c in ref["windows"]], style, label=ref["label"])
        ax2.plot([c["step"] for c in ref["holdout"]], [c["acc"] for c in ref["holdout"]], style, marker="s",
                 label=ref["label"])
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss (window mean)")
    ax2.set_ylabel("hold-out " + ("accuracy" if result["task"] == "classify" else "mIoU"))
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} at L={result['L']}, batch {result['batch_size']}, Adam {result['learning_rate']}: "
                 f"input scale variants", fontsize=9)
    fig.savefig(path, dpi=110)


def replot(path_json: str) -> str:
    """Redraw ``OUT.png`` from ``OUT.json`` (e.g. after adding reference curves)."""
    result = json.load(open(path_json))
    png = path_json[: -len(".json")] + ".png"
    plot(result, png)
    return png


def main(_):
    from absl import logging

    from sphere_jax.models import registry

    logging.set_verbosity(logging.WARNING)
    try:
        for v in FLAGS.variants:
            parse_variant(v)
        if FLAGS.digits_npz:
            import numpy as np

            with np.load(FLAGS.digits_npz) as z:
                images, labels = z["train_images"], z["train_labels"]
                test = (z["test_images"], z["test_labels"])
        else:
            from sphere_jax.data import digits

            images, labels = digits.load_digits("mnist", "train")
            test = digits.load_digits("mnist", "test")
    except (ValueError, RuntimeError, OSError, KeyError) as e:  # bad variant, missing digits (DigitsSourceError)
        print(f"error: {e}", file=sys.stderr)
        return 1
    _, task = registry.make_model(FLAGS.model, FLAGS.L)
    if FLAGS.initial_only:
        for v in FLAGS.variants:
            print(FLAGS.model, json.dumps(initial_loss(v, images, labels)), flush=True)
        return 0
    result = {"model": FLAGS.model, "task": task, "L": FLAGS.L, "steps": FLAGS.steps, "batch_size": FLAGS.batch_size,
              "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed, "runs": []}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    for v in FLAGS.variants:
        result["runs"].append(run_variant(v, images, labels, test))
        with open(FLAGS.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    plot(result, FLAGS.out + ".png")
    print(f"wrote {FLAGS.out}.json, {FLAGS.out}.png")
    return 0


if __name__ == "__main__":
    app.run(main)
