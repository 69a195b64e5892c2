"""Can one Pallas kernel beat XLA at an S2CNN layer boundary? A timing check of `sphere_jax.boundary`.

    python -m experiments.fused_boundary_check [--R=84 --K=83 --R2=70 --Z=2677248] [--repeats=10]
    python -m experiments.fused_boundary_check --interpret --Z=4000     # CPU: values and gradients only

Between two gamma-first S2CNN layers the grid exists only for the bias and the ReLU: per column
``z`` (alpha, batch, channel, beta) the inverse transform's last matmul (n -> gamma), the bias,
the ReLU and the next layer's first matmul (gamma -> n') compute
``out[:, z] = M_f relu(M_i h[:, z] + bias[z])`` with ``h [R, Z]``, ``M_i [K, R]``, ``M_f [R2, K]``
(``results/gpu/README.md``). XLA writes the ``[K, Z]`` grid to memory and reads it back; the
kernel here (Pallas, Triton lowering) keeps it on chip, one block of columns per program, and
its backward (``jax.custom_vjp``) recomputes the ReLU's mask. The defaults are the 204k
segmenter's first SO(3) boundary at batch 32 (``R = 2 * 42``, ``K = 83``, ``R2 = 2 * 35``,
``Z = 83 * 32 * 12 * 84``).

Prints one JSON line per precision: median times of the forward pass and of forward +
backward for XLA and for the kernel, and the kernel's largest relative difference from XLA
(values, ``dh``, ``dbias``). Triton needs power-of-2 arrays: ``M_i`` and ``M_f`` are padded to
powers of 2 with zeros, and ``h`` is read in power-of-2 row blocks with masks. ``--interpret``
runs the kernel in Pallas's interpreter (CPU; slow beyond ~20k columns).
"""
from __future__ import annotations

import functools
import json

import numpy as np
from absl import app, flags

from sphere_jax.benchmark import _median_time
from sphere_jax.boundary import fused_boundary, reference

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program: the tests import this module beside others
    flags.DEFINE_integer("R", 84, "rows of h: 2 x the inverse transform's orders n >= 0 (re/im)")
    flags.DEFINE_integer("K", 83, "grid length along gamma (2L - 1)")
    flags.DEFINE_integer("R2", 70, "rows of the output: 2 x the next layer's orders n' >= 0")
    flags.DEFINE_integer("Z", 83 * 32 * 12 * 84, "columns: alpha x batch x channels x beta")
    flags.DEFINE_integer("block", 64, "columns per program (a power of 2: a [128, block] float32 tile per matmul)")
    flags.DEFINE_integer("repeats", 10, "timed calls after warm-up (median)")
    flags.DEFINE_list("precisions", ["default", "tf32x3"], "dot precisions to try (default: TF32 on a GPU; "
                      "highest: IEEE float32 dots, which may take minutes to compile)")
    flags.DEFINE_integer("hang_s", 0, "if > 0, print every thread's Python stack after this many seconds (a hang's trace)")
    flags.DEFINE_bool("interpret", False, "run the kernel in Pallas's interpreter (CPU check)")


def check(R, K, R2, Z, block, precision, repeats, interpret) -> dict:
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 5)
    mi = jax.random.normal(ks[0], (K, R)) / np.sqrt(R)
    mf = jax.random.normal(ks[1], (R2, K)) / np.sqrt(K)
    h = jax.random.normal(ks[2], (R, Z))
    bias = 0.1 * jax.random.normal(ks[3], (Z,))
    g = jax.random.normal(ks[4], (R2, Z))
    row = dict(R=R, K=K, R2=R2, Z=Z, block=block, precision=precision, interpret=interpret,
               device=jax.devices()[0].device_kind, label="fused-boundary")
    xla = jax.jit(functools.partial(reference, precision=precision))
    mine = jax.jit(functools.partial(fused_boundary, block=block, precision=precision, interpret=interpret))

    def train_like(f):  # forward and backward once, as a training step runs them: (out, dh, dbias)
        def both(h, b):
            out, pull = jax.vjp(lambda h, b: f(mi, mf, h, b), h, b)
            return (out,) + pull(g)
        return jax.jit(both)

    try:
        steps = {"xla": train_like(xla), "fused": train_like(mine)}
        (ref, rh, rb), (out, mh, mb) = steps["xla"](h, bias), steps["fused"](h, bias)
        rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
        row.update(rel_out=rel(out, ref), rel_dh=rel(mh, rh), rel_dbias=rel(mb, rb))
        if repeats:
            for name, f in (("xla", xla), ("fused", mine)):
                row[f"{name}_fwd_s"] = _median_time(lambda: jax.block_until_ready(f(mi, mf, h, bias)), repeats)
                row[f"{name}_fwd_bwd_s"] = _median_time(lambda: jax.block_until_ready(steps[name](h, bias)), repeats)
            row["grid_gb"] = round(4 * K * Z / 1e9, 3)
    except Exception as e:  # a kernel that does not lower is a result too
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return row


def main(_):
    if FLAGS.hang_s > 0:
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(FLAGS.hang_s, exit=False, file=sys.stderr)
    for p in FLAGS.precisions:
        print(json.dumps(check(FLAGS.R, FLAGS.K, FLAGS.R2, FLAGS.Z, FLAGS.block, p,
                               0 if FLAGS.interpret else FLAGS.repeats, FLAGS.interpret)), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
