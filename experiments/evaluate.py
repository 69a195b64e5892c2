"""Evaluate a trained model on test digits.

    python -m experiments.evaluate --workdir=runs/segment        # a run's best checkpoint
    python -m experiments.evaluate --pretrained=s2cnn_cls_mnist --test_rotation=so3 --n_test=2000
    python -m experiments.evaluate --pretrained=s2cnn_cls_mnist_nr --rotation_sensitivity=256
"""
import json
import os
import sys

from absl import app, flags

from experiments import common
from sphere_jax import runner

flags.DEFINE_string("workdir", None, "run directory written by classify / segment")
flags.DEFINE_string("pretrained", None, "a shipped model (sphere_jax.pretrained.names()) instead of --workdir")
flags.DEFINE_enum("test_rotation", None, ["none", "so3"], "test rotation (default: the run's; so3 for --pretrained)")
flags.DEFINE_integer("n_test", None, "number of test digits (0: all; default: the run's, all for --pretrained)")
flags.DEFINE_enum("source", "tfds", list(runner.SOURCES), "--pretrained: where the test digits come from")
flags.DEFINE_string("digits_npz", None, "--source=npz: .npz with test_images/test_labels")
flags.DEFINE_string("digits_dir", None, "directory of idx files to use instead of the installed sources")
flags.DEFINE_string("data_dir", None, "TFDS data directory")
flags.DEFINE_string("out", "runs/evaluate", "--pretrained: folder of the predictions figure")
flags.DEFINE_integer("rotation_sensitivity", 0, "classifiers: instead of scoring, compare the logits of the first N "
                     "test digits canonical and rotated (runner.rotation_sensitivity); 0: off")
common.define_compilation_cache()
common.define_cpu_devices()
FLAGS = flags.FLAGS


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main(_):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax / tfds log every restore and load at INFO
    common.use_compilation_cache()
    if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
        fail("give exactly one of --workdir and --pretrained")
    rot = None if FLAGS.test_rotation is None else FLAGS.test_rotation == "so3"
    if FLAGS.rotation_sensitivity < 0:
        fail(f"--rotation_sensitivity must be >= 0, got {FLAGS.rotation_sensitivity}")
    if FLAGS.rotation_sensitivity:
        if FLAGS.test_rotation is not None or FLAGS.n_test is not None:
            fail("--rotation_sensitivity=N scores the first N test digits both canonical and rotated; "
                 "drop --test_rotation and --n_test")
        return rotation_sensitivity(FLAGS.rotation_sensitivity)
    try:
        if FLAGS.workdir:
            cfg = runner.load_config(FLAGS.workdir)
            common.use_cpu_devices(cfg.model, cfg.batch_size)
            runner.evaluate_workdir(FLAGS.workdir, test_rotate=rot, n_test=FLAGS.n_test)
            print(open(os.path.join(FLAGS.workdir, "summary.md")).read())
            return
        os.makedirs(FLAGS.out, exist_ok=True)
        rec = runner.evaluate_pretrained(
            FLAGS.pretrained, test_rotate=True if rot is None else rot, n_test=FLAGS.n_test or 0, out_dir=FLAGS.out,
            source=FLAGS.source, digits_npz=FLAGS.digits_npz, digits_dir=FLAGS.digits_dir, data_dir=FLAGS.data_dir,
        )
    except runner.RunError as e:
        fail(str(e))
    card = rec.pop("card")
    cfg = runner.RunConfig(model=card["model"], dataset=card["dataset"], L=int(card["L"]), source=FLAGS.source,
                           digits_npz=FLAGS.digits_npz)
    print(runner.summarise(cfg, card["task"], dict(rec, checkpoint=f"pretrained {FLAGS.pretrained}",
                                                  checkpoint_step=card["steps"])))
    print(json.dumps({"pretrained": FLAGS.pretrained, **rec}))


def rotation_sensitivity(n):
    """Print one JSON line: ``runner.rotation_sensitivity`` of the run's best checkpoint or of a
    shipped model, on the first ``n`` test digits."""
    import dataclasses

    try:
        if FLAGS.workdir:
            cfg = dataclasses.replace(runner.load_config(FLAGS.workdir), n_test=n)
            setup = runner.RunSetup.build(cfg)
            variables, which, step = runner.restore_variables(FLAGS.workdir, setup=setup)
            source = {"workdir": FLAGS.workdir, "checkpoint": which, "checkpoint_step": step}
        else:
            setup, variables, _ = runner.pretrained_setup(
                FLAGS.pretrained, n_test=n, source=FLAGS.source, digits_npz=FLAGS.digits_npz,
                digits_dir=FLAGS.digits_dir, data_dir=FLAGS.data_dir)
            source = {"pretrained": FLAGS.pretrained}
        rec = runner.rotation_sensitivity(setup, variables, n)
    except runner.RunError as e:
        fail(str(e))
    print(json.dumps({**source, "model": setup.cfg.model, "rotation_sensitivity": rec}))


if __name__ == "__main__":
    app.run(main)
