"""Train a segmenter: python -m experiments.segment --model=s2cnn_204k [--L=12 --steps=300 ...]

Default: a small S2CNN segmenter trained on canonical (NR) MNIST digits at L=12, evaluated on
rotated (R) test digits, a few minutes on CPU. The study's setting: --L=50 on a GPU.
"""
from absl import app

from experiments import common
from sphere_jax.models import cnn, s2cnn

common.define("segment", "s2cnn_204k", sorted(s2cnn.SEGMENTERS) + sorted(cnn.SEGMENTERS), 12)


def main(_):
    common.run("segment")


if __name__ == "__main__":
    app.run(main)
