"""Evaluate a run's best checkpoint: python -m experiments.evaluate --workdir=runs/segment"""
import sys

from absl import app, flags

from sphere_jax import runner

flags.DEFINE_string("workdir", None, "run directory written by classify / segment", required=True)
flags.DEFINE_enum("test_rotation", None, ["none", "so3"], "override the run's test rotation")
flags.DEFINE_integer("n_test", None, "override the number of test digits (0: all)")
FLAGS = flags.FLAGS


def main(_):
    rot = None if FLAGS.test_rotation is None else FLAGS.test_rotation == "so3"
    try:
        runner.evaluate_workdir(FLAGS.workdir, test_rotate=rot, n_test=FLAGS.n_test)
    except runner.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(open(f"{FLAGS.workdir}/summary.md").read())


if __name__ == "__main__":
    app.run(main)
