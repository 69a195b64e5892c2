"""Train a classifier: python -m experiments.classify --model=s2cnn_cls [--L=30 ...]"""
from absl import app

from experiments import common
from sphere_jax.models import cnn, s2cnn

common.define("classify", "s2cnn_cls", sorted(s2cnn.CLASSIFIERS) + sorted(cnn.CLASSIFIERS), 12)


def main(_):
    common.run("classify")


if __name__ == "__main__":
    app.run(main)
