"""The fused layer-boundary kernel (Pallas, run in its interpreter on the CPU) equals XLA's two
matmuls with bias and ReLU between them, in values and gradients, on non-power-of-2 shapes and a
partial last block of columns; and S2CNN models built with it (``SPHERE_JAX_BOUNDARY=pallas``)
equal the same models without it, in outputs and in every parameter's gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fused_boundary_check as fbc
from sphere_jax import boundary as fb, harmonics as hm, rotations
from sphere_jax.data import sphere
from sphere_jax.models import s2cnn


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


def test_fused_boundary_checks_its_arguments(monkeypatch):
    z = jnp.zeros
    with pytest.raises(ValueError, match="need mi"):
        fb.fused_boundary(z((9, 10)), z((6, 9)), z((11, 20)), z((20,)), interpret=True)
    with pytest.raises(ValueError, match="precision"):
        fb.fused_boundary(z((9, 10)), z((6, 9)), z((10, 20)), z((20,)), precision="tf32", interpret=True)
    with pytest.raises(ValueError, match="block"):
        fb.fused_boundary(z((9, 10)), z((6, 9)), z((10, 20)), z((20,)), block=48, interpret=True)
    with pytest.raises(ValueError, match="float32"):
        fb.fused_boundary(z((9, 10)), z((6, 9)), z((10, 20), jnp.bfloat16), z((20,)), interpret=True)
    assert [fb._pow2(n) for n in (1, 16, 17, 84, 128)] == [16, 16, 32, 128, 128]
    assert np.isfinite(fbc.check(10, 9, 6, 300, 256, "default", 0, True)["rel_out"])
    for var, bad, match in (("SPHERE_JAX_BOUNDARY", "triton", "SPHERE_JAX_BOUNDARY"),
                            ("SPHERE_JAX_BOUNDARY_BLOCK", "100", "power of 2"),
                            ("SPHERE_JAX_BOUNDARY_PRECISION", "fp8", "PRECISION")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(ValueError, match=match):
            {"SPHERE_JAX_BOUNDARY": hm.boundary, "SPHERE_JAX_BOUNDARY_BLOCK": hm.boundary_block,
             "SPHERE_JAX_BOUNDARY_PRECISION": hm.boundary_precision}[var]()
        monkeypatch.delenv(var)
    monkeypatch.setenv("SPHERE_JAX_BOUNDARY", "pallas")
    monkeypatch.setenv("SPHERE_JAX_GRID_DTYPE", "bfloat16")
    with pytest.raises(ValueError, match="float32 grids"):
        hm.boundary()


def _digits(L, B=2):
    img = np.zeros((B, 1, 28, 28), np.uint8)
    img[:, 0, 6:22, 12:15] = 255
    img[1, 0, 6:9, 9:19] = 200
    rots = np.stack([rotations.euler_to_matrix(0.0, 2.0 + 0.3 * i, 0.5 * i) for i in range(B)])[:, None]
    return sphere.spherical_batch(jnp.asarray(img), jnp.ones((B, 1), jnp.int32), jnp.asarray(rots), L=L)[0]


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_models_with_the_fused_boundary_equal_the_plain_ones(monkeypatch, kind):
    """Every boundary between two SO(3) layers goes through the kernel (3 in the segmenter, with
    band-limits changing across them; 2 in the classifier, whose last grid is written for the
    Haar mean). Measured: outputs 1e-7 apart, gradients 1e-7 - 1e-6 (float32 sums in another
    order), against bounds of 1e-5 and 1e-4."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "gamma_first")
    if kind == "segmenter":
        L = 6
        m = s2cnn.S2CNNSegmenter(s2cnn.S2CNNSegmenterConfig(
            L_in=L, s2_features=3, s2_bandlimit=5, so3_features=(4, 3), so3_bandlimits=(4, 5), L_out=L))
        loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    else:
        L = 8
        m = s2cnn.S2CNNClassifier(s2cnn.S2CNNClassifierConfig(
            L_in=L, features=(3, 4, 5), bandlimits=(6, 5, 4), num_classes=10))
        loss = lambda y: jnp.sum(jnp.sin(y))  # noqa: E731
    tables = hm.build_tables(m.table_specs())
    x = _digits(L)
    v = m.init(jax.random.key(1), x, tables)
    out, grads = {}, {}
    for b in hm.BOUNDARIES:
        monkeypatch.setenv("SPHERE_JAX_BOUNDARY", b)
        out[b] = jax.jit(m.apply)(v, x, tables)
        grads[b] = jax.jit(jax.grad(lambda p: loss(m.apply({"params": p}, x, tables))))(v["params"])
    assert rel(out["pallas"], out["xla"]) < 1e-5
    errs = jax.tree.leaves(jax.tree.map(rel, grads["pallas"], grads["xla"]))
    assert len(errs) == len(jax.tree.leaves(v["params"])) and max(errs) < 1e-4, errs
    # the kernel is really on the path: its jaxpr holds pallas_call, the plain one does not
    jaxprs = {}
    for b in hm.BOUNDARIES:
        monkeypatch.setenv("SPHERE_JAX_BOUNDARY", b)
        jaxprs[b] = str(jax.make_jaxpr(jax.grad(lambda p: loss(m.apply({"params": p}, x, tables))))(v["params"]))
    assert "pallas_call" in jaxprs["pallas"] and "pallas_call" not in jaxprs["xla"]


def test_fused_boundary_under_vmap_like_grouped_runs(monkeypatch):
    """Runs that train together (``runner.fit_members``) vmap the model over their parameters:
    the kernel's batching and its custom gradient hold there too (measured 3.4e-7 from XLA's
    gradients, bound 1e-4)."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "gamma_first")
    L = 6
    m = s2cnn.S2CNNSegmenter(s2cnn.S2CNNSegmenterConfig(
        L_in=L, s2_features=3, s2_bandlimit=5, so3_features=(4, 3), so3_bandlimits=(4, 5), L_out=L))
    tables = hm.build_tables(m.table_specs())
    x = _digits(L)
    members = jax.vmap(lambda k: m.init(k, x, tables))(jax.random.split(jax.random.key(1), 2))
    grads = {}
    for b in hm.BOUNDARIES:
        monkeypatch.setenv("SPHERE_JAX_BOUNDARY", b)
        grads[b] = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x, tables))))))(members)
    errs = jax.tree.leaves(jax.tree.map(rel, grads["pallas"], grads["xla"]))
    assert max(errs) < 1e-4, errs
    assert float(jnp.max(jnp.abs(grads["xla"]["params"]["so3_conv_0"]["kernel"][1]))) > 0
