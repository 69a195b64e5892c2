"""Look at the data: one batch of spherical samples written as a PNG (image, mask, globe views).

    python -m experiments.show_data --dataset=fashion_mnist --digits_per_image=1 --rotate=true \\
        --L=30 --num=6 --out=samples.png --seed=0 [--source=synthetic]

``--source=tfds`` (default) reads MNIST / FashionMNIST with ``load_digits`` (see
``python -m sphere_jax.data.digits``); ``--source=synthetic`` needs no dataset.
"""
import sys

from absl import app, flags

from sphere_jax import plotting
from sphere_jax.data import digits, pipeline

flags.DEFINE_enum("dataset", "mnist", list(digits.DATASETS), "Digit dataset (for --source=tfds).")
flags.DEFINE_enum("source", "tfds", ["tfds", "synthetic"], "tfds: load_digits; synthetic: built-in test patterns.")
flags.DEFINE_enum("split", "test", list(digits.SPLITS), "Split to draw the digits from.")
flags.DEFINE_integer("digits_per_image", 1, "Digits per spherical image.", lower_bound=1)
flags.DEFINE_float("min_separation_deg", 90.0, "Several digits: smallest angle between digit centres (0: independent).")
flags.DEFINE_float("digit_scale", 1.0, "Digit size on the sphere (1: the study's projection).")
flags.DEFINE_boolean("rotate", True, "Random rotations (R); false: canonical digits at the south pole (NR).")
flags.DEFINE_integer("L", 30, "Band-limit: dh grid of 2L x (2L - 1).", lower_bound=2)
flags.DEFINE_integer("num", 6, "Number of samples to draw.", lower_bound=1)
flags.DEFINE_string("out", "samples.png", "Output PNG.")
flags.DEFINE_integer("seed", 0, "Seed of digit choice and rotations.")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default: sphere_jax's default).")
flags.DEFINE_string("digits_dir", None, "Directory with the raw idx files.")
flags.DEFINE_boolean("allow_download", False, "Allow downloading the official files.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.source == "synthetic":
        images, labels = pipeline.synthetic_digits(max(256, FLAGS.num * FLAGS.digits_per_image), seed=FLAGS.seed)
        names = None
    else:
        try:
            images, labels = digits.load_digits(FLAGS.dataset, FLAGS.split, FLAGS.data_dir, FLAGS.digits_dir,
                                                FLAGS.allow_download)
        except digits.DigitsSourceError as e:
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            return 1
        names = digits.CLASS_NAMES[FLAGS.dataset]
    try:
        config = pipeline.StreamConfig(L=FLAGS.L, batch_size=FLAGS.num, digits_per_image=FLAGS.digits_per_image,
                                       rotate=FLAGS.rotate, copies=None, min_separation_deg=FLAGS.min_separation_deg,
                                       digit_scale=FLAGS.digit_scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stream = pipeline.DigitStream(images, labels, config, seed=FLAGS.seed)
    x, labels, mask = stream.batch(0)
    plotting.plot_samples(x, mask, FLAGS.out, labels=labels, class_names=names)
    extra = ""
    if FLAGS.digits_per_image > 1:
        from sphere_jax.data import sphere

        imgs = stream.data[0][stream.digits(0)]  # [num, k, 28, 28]
        o = sphere.scene_overlap(imgs, labels, stream.rotations(0), FLAGS.L, digit_scale=FLAGS.digit_scale)
        extra = (f"; {100 * o['overwritten']:.2f} % of digit pixels hidden by a later digit (worst scene "
                 f"{100 * o['worst_scene']:.1f} %), closest centres {o['min_separation_deg']:.1f} degrees apart")
    print(f"wrote {FLAGS.out}: {FLAGS.num} samples, L={FLAGS.L}, digits_per_image={FLAGS.digits_per_image}, "
          f"rotate={FLAGS.rotate}, source={FLAGS.source}{extra}")
    return 0


if __name__ == "__main__":
    app.run(main)
