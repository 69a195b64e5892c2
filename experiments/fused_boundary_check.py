"""Can one Pallas kernel beat XLA at an S2CNN layer boundary? A timing check, not a model path.

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

FLAGS = flags.FLAGS


def _define_flags():  # only when run as a program: the tests import this module beside others
    flags.DEFINE_integer("R", 84, "rows of h: 2 x the inverse transform's orders n >= 0 (re/im)")
    flags.DEFINE_integer("K", 83, "grid length along gamma (2L - 1)")
    flags.DEFINE_integer("R2", 70, "rows of the output: 2 x the next layer's orders n' >= 0")
    flags.DEFINE_integer("Z", 83 * 32 * 12 * 84, "columns: alpha x batch x channels x beta")
    flags.DEFINE_integer("block", 64, "columns per program (a power of 2: a [128, block] float32 tile per matmul)")
    flags.DEFINE_integer("repeats", 10, "timed calls after warm-up (median)")
    flags.DEFINE_list("precisions", ["highest", "default"], "dot precisions to try (default: TF32 on a GPU)")
    flags.DEFINE_bool("interpret", False, "run the kernel in Pallas's interpreter (CPU check)")


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def fused_boundary(mi, mf, h, bias, block: int = 256, precision: str = "highest", interpret: bool = False):
    """``M_f relu(M_i h + bias)`` for ``mi [K, R]``, ``mf [R2, K]``, ``h [R, Z]``, ``bias [Z]`` ->
    ``[R2, Z]``, as one Pallas kernel over blocks of ``block`` columns; differentiable in ``h``
    and ``bias`` (``mi`` and ``mf`` are constants: their cotangents are zero)."""
    return _fused(mi, mf, h, bias, block, precision, interpret)


@functools.lru_cache(maxsize=None)
def _kernels():
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    prec = {"highest": lax.Precision.HIGHEST, "default": lax.Precision.DEFAULT}

    def masks(j, rows, Z, B):
        cols = (j * B + jnp.arange(B)) < Z
        return cols, (jnp.arange(rows[0]) < rows[1])[:, None] & cols[None, :]

    def fwd(mi_ref, mf_ref, h_ref, b_ref, o_ref, *, R, R2, Z, B, p):
        j = pl.program_id(0)
        cols, hm = masks(j, (h_ref.shape[0], R), Z, B)
        _, om = masks(j, (o_ref.shape[0], R2), Z, B)
        h = pltriton.load(h_ref, mask=hm, other=0.0)
        b = pltriton.load(b_ref, mask=cols, other=0.0)
        a = pltriton.dot(mi_ref[...], h, precision=prec[p]) + b[None, :]
        pltriton.store(o_ref, pltriton.dot(mf_ref[...], jnp.maximum(a, 0.0), precision=prec[p]), mask=om)

    def bwd(mi_ref, mf_ref, h_ref, b_ref, g_ref, dh_ref, db_ref, *, R, R2, Z, B, p):
        j = pl.program_id(0)
        cols, hm = masks(j, (h_ref.shape[0], R), Z, B)
        _, gm = masks(j, (g_ref.shape[0], R2), Z, B)
        mi = mi_ref[...]
        h = pltriton.load(h_ref, mask=hm, other=0.0)
        b = pltriton.load(b_ref, mask=cols, other=0.0)
        g = pltriton.load(g_ref, mask=gm, other=0.0)
        a = pltriton.dot(mi, h, precision=prec[p]) + b[None, :]
        da = jnp.where(a > 0, pltriton.dot(mf_ref[...], g, trans_a=True, precision=prec[p]), 0.0)
        pltriton.store(dh_ref, pltriton.dot(mi, da, trans_a=True, precision=prec[p]), mask=hm)
        pltriton.store(db_ref, jnp.sum(da, axis=0), mask=cols)

    return pl, pltriton, fwd, bwd


def _padded(mi, mf):
    import jax.numpy as jnp

    (K, R), R2 = mi.shape, mf.shape[0]
    KP, RP, R2P = _pow2(K), _pow2(R), _pow2(R2)
    return (jnp.zeros((KP, RP), mi.dtype).at[:K, :R].set(mi), jnp.zeros((R2P, KP), mf.dtype).at[:R2, :K].set(mf),
            KP, RP, R2P)


def _call(kernel, mi, mf, args, out_shape, row_blocks, block, interpret):
    """One pallas_call over ``ceil(Z / block)`` programs: ``mi``, ``mf`` whole (padded), then
    ``args`` as ``[rows, block]`` column blocks (``rows`` from ``row_blocks``; 0: a ``[block]``
    vector)."""
    pl, pltriton, _, _ = _kernels()
    Z = args[0].shape[-1]
    whole = lambda a: pl.BlockSpec(a.shape, lambda j: (0, 0))  # noqa: E731
    spec = lambda rows: (pl.BlockSpec((block,), lambda j: (j,)) if rows == 0  # noqa: E731
                         else pl.BlockSpec((rows, block), lambda j: (0, j)))
    ins, outs = row_blocks
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(pl.cdiv(Z, block),),
        in_specs=[whole(mi), whole(mf)] + [spec(r) for r in ins],
        out_specs=tuple(spec(r) for r in outs) if isinstance(out_shape, tuple) else spec(outs[0]),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
    )(mi, mf, *args)


@functools.lru_cache(maxsize=None)
def _fused_fn(block: int, precision: str, interpret: bool):
    import jax

    _, _, fwd_k, bwd_k = _kernels()

    @jax.custom_vjp
    def f(mi, mf, h, bias):
        mip, mfp, _, RP, R2P = _padded(mi, mf)
        R2, Z = mf.shape[0], h.shape[1]
        k = functools.partial(fwd_k, R=h.shape[0], R2=R2, Z=Z, B=block, p=precision)
        return _call(k, mip, mfp, (h, bias), jax.ShapeDtypeStruct((R2, Z), h.dtype), ((RP, 0), (R2P,)), block, interpret)

    def f_fwd(mi, mf, h, bias):
        return f(mi, mf, h, bias), (mi, mf, h, bias)

    def f_bwd(res, g):
        import jax.numpy as jnp

        mi, mf, h, bias = res
        mip, mfp, _, RP, R2P = _padded(mi, mf)
        k = functools.partial(bwd_k, R=h.shape[0], R2=mf.shape[0], Z=h.shape[1], B=block, p=precision)
        out = (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(bias.shape, bias.dtype))
        dh, db = _call(k, mip, mfp, (h, bias, g), out, ((RP, 0, R2P), (RP, 0)), block, interpret)
        return jnp.zeros_like(mi), jnp.zeros_like(mf), dh, db

    f.defvjp(f_fwd, f_bwd)
    return f


def _fused(mi, mf, h, bias, block, precision, interpret):
    if precision not in ("highest", "default"):
        raise ValueError(f"precision must be 'highest' or 'default', got {precision!r}")
    if h.ndim != 2 or mi.shape[1] != h.shape[0] or mf.shape[1] != mi.shape[0] or bias.shape != (h.shape[1],):
        raise ValueError(f"need mi [K, R], mf [R2, K], h [R, Z], bias [Z]; got {mi.shape}, {mf.shape}, {h.shape}, {bias.shape}")
    return _fused_fn(int(block), precision, bool(interpret))(mi, mf, h, bias)


def reference(mi, mf, h, bias, precision: str = "highest"):
    """What XLA computes today: two matmuls with the bias and ReLU between them."""
    import jax
    import jax.numpy as jnp

    p = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
    return jnp.matmul(mf, jax.nn.relu(jnp.matmul(mi, h, precision=p) + bias[None, :]), precision=p)


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
    for p in FLAGS.precisions:
        print(json.dumps(check(FLAGS.R, FLAGS.K, FLAGS.R2, FLAGS.Z, FLAGS.block, p,
                               0 if FLAGS.interpret else FLAGS.repeats, FLAGS.interpret)), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
