"""The fused layer-boundary kernel (Pallas, run in its interpreter on the CPU) equals XLA's two
matmuls with bias and ReLU between them, in values and gradients, on non-power-of-2 shapes and a
partial last block of columns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fused_boundary_check as fb


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_fused_boundary_equals_xla_in_values_and_gradients():
    R, K, R2, Z = 10, 9, 6, 300  # 300 columns: one full block of 256 and a partial one
    ks = jax.random.split(jax.random.key(3), 5)
    mi, mf = jax.random.normal(ks[0], (K, R)), jax.random.normal(ks[1], (R2, K))
    h, bias = jax.random.normal(ks[2], (R, Z)), jax.random.normal(ks[3], (Z,))
    g = jax.random.normal(ks[4], (R2, Z))
    mine = lambda h, b: fb.fused_boundary(mi, mf, h, b, block=256, interpret=True)  # noqa: E731
    ref = lambda h, b: fb.reference(mi, mf, h, b)  # noqa: E731
    out, want = jax.jit(mine)(h, bias), jax.jit(ref)(h, bias)
    assert out.shape == (R2, Z)
    assert rel(out, want) < 1e-5
    no_relu = mf @ (mi @ h + bias[None, :])
    assert rel(no_relu, want) > 0.1  # the ReLU matters here, so the check above can fail
    (dh, db), (wh, wb) = (jax.jit(lambda h, b, f=f: jax.vjp(f, h, b)[1](g))(h, bias) for f in (mine, ref))
    assert rel(dh, wh) < 1e-5 and rel(db, wb) < 1e-5
    assert float(jnp.abs(db[-1])) > 0 or float(jnp.abs(wb[-1])) == 0  # the partial block is computed


def test_fused_boundary_checks_its_shapes():
    with pytest.raises(ValueError, match="need mi"):
        fb.fused_boundary(jnp.zeros((9, 10)), jnp.zeros((6, 9)), jnp.zeros((11, 20)), jnp.zeros((20,)), interpret=True)
    with pytest.raises(ValueError, match="precision"):
        fb.fused_boundary(jnp.zeros((9, 10)), jnp.zeros((6, 9)), jnp.zeros((10, 20)), jnp.zeros((20,)),
                          precision="tf32", interpret=True)
    assert [fb._pow2(n) for n in (1, 16, 17, 84, 128)] == [16, 16, 32, 128, 128]
    assert np.isfinite(fb.check(10, 9, 6, 300, 256, "highest", 0, True)["rel_out"])
