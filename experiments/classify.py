"""Train a classifier: python -m experiments.classify --model=s2cnn [--L=30 ...]

``s2cnn`` is Cohen et al.'s S2CNN (``s2cnn_cls``), ``cnn`` its planar baseline (``cnn_cls_68k``).
"""
from absl import app

from experiments import common
from sphere_jax.models import cnn, s2cnn

common.define("classify", "s2cnn", sorted(s2cnn.CLASSIFIERS) + sorted(cnn.CLASSIFIERS), 12)


def main(_):
    common.run("classify")


if __name__ == "__main__":
    app.run(main)
