"""Train a segmenter: python -m experiments.segment --model=s2cnn [--L=12 --steps=800 ...]

Default: the study's S2CNN segmenter (``s2cnn`` = ``s2cnn_204k``) with every band-limit scaled
to L=12, trained on canonical (NR) MNIST digits and evaluated on rotated (R) test digits, a few
minutes on CPU. The study's setting: --L=50 on a GPU. ``--model=cnn`` is CNN-5.5M.
"""
from absl import app

from experiments import common
from sphere_jax.models import cnn, s2cnn

common.define("segment", "s2cnn", sorted(s2cnn.SEGMENTERS) + sorted(cnn.SEGMENTERS), 12)


def main(_):
    common.run("segment")


if __name__ == "__main__":
    app.run(main)
