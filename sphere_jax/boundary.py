"""One Pallas kernel for an S2CNN layer boundary: ``M_f relu(M_i h + bias)`` without the grid.

Between two gamma-first S2CNN layers the SO(3) grid exists only for the bias and the ReLU. Per
column ``z`` (alpha, batch, channel, beta) the first layer's inverse transform ends with a
matmul ``n -> gamma`` (``M_i [K, R]``, ``K = 2L - 1`` gammas, ``R = 2N`` rows ``(n >= 0,
re/im)``), and the next layer's forward transform starts with ``gamma -> n'`` (``M_f [R2, K]``):

    out[:, z] = M_f relu(M_i h[:, z] + bias[z])        h [R, Z] -> out [R2, Z]

XLA writes the ``[K, Z]`` grid to memory, reads and writes it for the bias and the ReLU, and
reads it back (and the backward pass does the same with the ReLU's mask). The kernel here keeps
it on chip, one block of ``block`` columns per program, and its backward (``jax.custom_vjp``)
recomputes the mask from ``h``: the grid is neither written nor saved for the backward pass.
Measured on an H200 in ``results/gpu/README.md``; used by the models when
``SPHERE_JAX_BOUNDARY=pallas`` (:func:`sphere_jax.harmonics.boundary`).

Triton needs power-of-2 blocks: ``M_i`` and ``M_f`` are padded with zeros to powers of 2, and
``h`` is read in power-of-2 row blocks with masks. On a CPU the kernel runs in Pallas's
interpreter (slow: tests only) at ``"highest"`` precision.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PRECISIONS = ("default", "tf32x3", "highest")


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def fused_boundary(mi: jax.Array, mf: jax.Array, h: jax.Array, bias: jax.Array, block: int = 64,
                   precision: str = "default", interpret: bool | None = None, num_warps: int | None = None) -> jax.Array:
    """``M_f relu(M_i h + bias)`` for ``mi [K, R]``, ``mf [R2, K]``, ``h [R, Z]``, ``bias [Z]`` ->
    ``[R2, Z]`` float32, as one Pallas kernel over blocks of ``block`` columns (a power of 2).

    Differentiable in ``h`` and ``bias``; ``mi`` and ``mf`` are constants (zero cotangents).
    ``precision``: the kernel's dots, ``"default"`` (TF32 on a GPU, as XLA's float32 matmuls at
    default precision), ``"tf32x3"`` (three TF32 products, close to float32) or ``"highest"``
    (IEEE float32 without tensor cores: slow to compile for big blocks). ``interpret``
    (default: on a CPU) runs Pallas's interpreter, where every precision is float32.
    ``num_warps`` per program: default 4 up to 64 columns, 8 above (a ``[128, block]`` float32
    tile per warp group's registers).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if int(block) != block or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of 2 >= 16, got {block!r}")
    if (h.ndim != 2 or mi.ndim != 2 or mf.ndim != 2 or mi.shape[1] != h.shape[0] or mf.shape[1] != mi.shape[0]
            or bias.shape != (h.shape[1],)):
        raise ValueError(f"need mi [K, R], mf [R2, K], h [R, Z], bias [Z]; got {mi.shape}, {mf.shape}, {h.shape}, {bias.shape}")
    if h.dtype != jnp.float32 or bias.dtype != jnp.float32:
        raise ValueError(f"the fused boundary takes float32 h and bias, got {h.dtype} and {bias.dtype}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if num_warps is None:
        num_warps = 4 if block <= 64 else 8
    return _fused_fn(int(block), precision, bool(interpret), int(num_warps))(mi, mf, h, bias)


def reference(mi, mf, h, bias, precision: str = "highest"):
    """What XLA computes without the kernel: two matmuls with the bias and ReLU between them."""
    p = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
    return jnp.matmul(mf, jax.nn.relu(jnp.matmul(mi, h, precision=p) + bias[None, :]), precision=p)


@functools.lru_cache(maxsize=None)
def _kernels(precision: str, interpret: bool):
    from jax import lax
    from jax.experimental.pallas import triton as pltriton

    if interpret or precision == "highest":
        prec = lax.Precision.HIGHEST
    elif precision == "tf32x3":
        prec = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    else:
        prec = lax.Precision.DEFAULT

    def masks(j, rows, Z, B):
        cols = (j * B + jnp.arange(B)) < Z
        return cols, (jnp.arange(rows[0]) < rows[1])[:, None] & cols[None, :]

    def fwd(mi_ref, mf_ref, h_ref, b_ref, o_ref, *, R, R2, Z, B):
        from jax.experimental import pallas as pl

        j = pl.program_id(0)
        cols, hm = masks(j, (h_ref.shape[0], R), Z, B)
        _, om = masks(j, (o_ref.shape[0], R2), Z, B)
        h = pltriton.load(h_ref, mask=hm, other=0.0)
        b = pltriton.load(b_ref, mask=cols, other=0.0)
        a = pltriton.dot(mi_ref[...], h, precision=prec) + b[None, :]
        pltriton.store(o_ref, pltriton.dot(mf_ref[...], jnp.maximum(a, 0.0), precision=prec), mask=om)

    def bwd(mi_ref, mf_ref, h_ref, b_ref, g_ref, dh_ref, db_ref, *, R, R2, Z, B):
        from jax.experimental import pallas as pl

        j = pl.program_id(0)
        cols, hm = masks(j, (h_ref.shape[0], R), Z, B)
        _, gm = masks(j, (g_ref.shape[0], R2), Z, B)
        mi = mi_ref[...]
        h = pltriton.load(h_ref, mask=hm, other=0.0)
        b = pltriton.load(b_ref, mask=cols, other=0.0)
        g = pltriton.load(g_ref, mask=gm, other=0.0)
        a = pltriton.dot(mi, h, precision=prec) + b[None, :]
        da = jnp.where(a > 0, pltriton.dot(mf_ref[...], g, trans_a=True, precision=prec), 0.0)
        pltriton.store(dh_ref, pltriton.dot(mi, da, trans_a=True, precision=prec), mask=hm)
        pltriton.store(db_ref, jnp.sum(da, axis=0), mask=cols)

    return fwd, bwd


def _padded(mi, mf):
    (K, R), R2 = mi.shape, mf.shape[0]
    KP, RP, R2P = _pow2(K), _pow2(R), _pow2(R2)
    mip = jnp.zeros((KP, RP), jnp.float32).at[:K, :R].set(mi.astype(jnp.float32))
    mfp = jnp.zeros((R2P, KP), jnp.float32).at[:R2, :K].set(mf.astype(jnp.float32))
    return mip, mfp, RP, R2P


def _call(kernel, mi, mf, args, out_shape, row_blocks, block, interpret, num_warps):
    """One pallas_call over ``ceil(Z / block)`` programs: ``mi``, ``mf`` whole (padded), then
    ``args`` as ``[rows, block]`` column blocks (``rows`` from ``row_blocks``; 0: a ``[block]``
    vector)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    Z = args[0].shape[-1]
    whole = lambda a: pl.BlockSpec(a.shape, lambda j: (0, 0))  # noqa: E731
    spec = lambda rows: (pl.BlockSpec((block,), lambda j: (j,)) if rows == 0  # noqa: E731
                         else pl.BlockSpec((rows, block), lambda j: (0, j)))
    ins, outs = row_blocks
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(pl.cdiv(Z, block),),
        in_specs=[whole(mi), whole(mf)] + [spec(r) for r in ins],
        out_specs=tuple(spec(r) for r in outs) if isinstance(out_shape, tuple) else spec(outs[0]),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2), interpret=interpret,
    )(mi, mf, *args)


@functools.lru_cache(maxsize=None)
def _fused_fn(block: int, precision: str, interpret: bool, num_warps: int):
    fwd_k, bwd_k = _kernels(precision, interpret)

    @jax.custom_vjp
    def f(mi, mf, h, bias):
        mip, mfp, RP, R2P = _padded(mi, mf)
        R2, Z = mf.shape[0], h.shape[1]
        k = functools.partial(fwd_k, R=h.shape[0], R2=R2, Z=Z, B=block)
        return _call(k, mip, mfp, (h, bias), jax.ShapeDtypeStruct((R2, Z), h.dtype), ((RP, 0), (R2P,)), block, interpret, num_warps)

    def f_fwd(mi, mf, h, bias):
        return f(mi, mf, h, bias), (mi, mf, h, bias)

    def f_bwd(res, g):
        mi, mf, h, bias = res
        mip, mfp, RP, R2P = _padded(mi, mf)
        k = functools.partial(bwd_k, R=h.shape[0], R2=mf.shape[0], Z=h.shape[1], B=block)
        out = (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(bias.shape, bias.dtype))
        dh, db = _call(k, mip, mfp, (h, bias, g.astype(h.dtype)), out, ((RP, 0, R2P), (RP, 0)), block, interpret, num_warps)
        return jnp.zeros_like(mi), jnp.zeros_like(mf), dh, db

    f.defvjp(f_fwd, f_bwd)
    return f
