"""S2CNN models: parameter counts of the study, shapes, equivariance/invariance, gradients."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sphere_jax import harmonics as hm, rotations
from sphere_jax.data import sphere
from sphere_jax.models import s2cnn


def test_segmenter_204k_has_204073_parameters():
    m = s2cnn.make_s2cnn("s2cnn_204k")
    assert s2cnn.count_params(s2cnn.param_shapes(m)) == 204_073
    # and by the SPEC's formula: 24*1*11+11, then 192*Cin*Cout+Cout per SO(3)-input layer
    ch = [11, 12, 13, 14, 13, 12, 11, 11]
    expected = 24 * 1 * 11 + 11 + sum(192 * a * b + b for a, b in zip(ch[:-1], ch[1:]))
    assert expected == 204_073


def test_classifier_counts_follow_the_formula():
    m = s2cnn.make_s2cnn("s2cnn_cls")
    # Cohen 2018 grids: S2 1 ring x 6 azimuths, SO(3) 1 x 6 x 6; dense 40 -> 10
    assert s2cnn.count_params(s2cnn.param_shapes(m)) == 6 * 20 + 20 + 36 * 20 * 40 + 40 + 40 * 10 + 10
    deep = s2cnn.make_s2cnn("s2cnn_cls_deep")
    f = [1, 8, 16, 16, 24, 24, 32, 64]
    expected = 24 * f[0] * f[1] + f[1] + sum(192 * a * b + b for a, b in zip(f[1:-1], f[2:])) + 64 * 10 + 10
    assert s2cnn.count_params(s2cnn.param_shapes(deep)) == expected


def test_unknown_model_and_bad_input():
    with pytest.raises(ValueError, match="unknown S2CNN"):
        s2cnn.make_s2cnn("s2cnn_nope")
    m = s2cnn.make_s2cnn("s2cnn_cls", L_in=12)
    tables = hm.build_tables(m.table_specs())
    with pytest.raises(ValueError, match=r"\[batch, 24, 23, 1\]"):
        m.init(jax.random.key(0), jnp.zeros((1, 20, 19, 1)), tables)
    with pytest.raises(ValueError, match="below the first layer"):
        s2cnn.make_s2cnn("s2cnn_cls", L_in=8)


def _digit_batch(L, rot):
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:15] = 255
    img[6:9, 9:19] = 200
    images = jnp.asarray(img)[None, None]
    return sphere.spherical_batch(images, jnp.array([[1]]), jnp.asarray(rot)[None, None], L=L)[0]


def test_segmenter_is_equivariant_to_grid_z_rotations():
    """A z-rotation by whole longitude steps shifts every layer's grid exactly when all
    band-limits are equal, so the whole ReLU network is exactly equivariant to it."""
    L = 7
    cfg = s2cnn.S2CNNSegmenterConfig(
        L_in=L, s2_features=4, s2_bandlimit=L, so3_features=(5, 4), so3_bandlimits=(L, L), L_out=L
    )
    m = s2cnn.S2CNNSegmenter(cfg)
    tables = hm.build_tables(m.table_specs())
    tilt = rotations.euler_to_matrix(0.0, 2.4, 0.0)  # put the digit off the pole
    x = _digit_batch(L, tilt)
    v = m.init(jax.random.key(0), x, tables)
    y = m.apply(v, x, tables)
    k = 3
    x_shift = jnp.roll(x, k, axis=2)
    y_shift = m.apply(v, x_shift, tables)
    err = float(jnp.abs(y_shift - jnp.roll(y, k, axis=2)).max() / jnp.abs(y).max())
    assert err < 1e-4


def test_classifier_is_nearly_invariant_to_general_rotations():
    """With ReLUs the invariance is approximate (aliasing); measured below 0.1 relative at L=12."""
    L = 12
    m = s2cnn.make_s2cnn("s2cnn_cls", L_in=L)
    tables = hm.build_tables(m.table_specs())
    R = rotations.euler_to_matrix(0.3, 2.0, 1.0)
    x = _digit_batch(L, R)
    A = rotations.euler_to_matrix(1.1, 0.8, -0.5)
    xr = _digit_batch(L, A @ R)
    v = m.init(jax.random.key(0), x, tables)
    y, yr = m.apply(v, x, tables), m.apply(v, xr, tables)
    rel = float(jnp.abs(y - yr).max() / jnp.abs(y).max())
    assert rel < 0.1
    # and a different digit position gives a clearly different output only through the rotation:
    # the same input, unrotated, gives exactly the same logits
    assert float(jnp.abs(m.apply(v, x, tables) - y).max()) == 0.0


def test_gradients_match_finite_differences():
    L = 10
    m = s2cnn.make_s2cnn("s2cnn_cls", L_in=L)
    tables = hm.build_tables(m.table_specs())
    x = jax.random.uniform(jax.random.key(1), (2, 2 * L, 2 * L - 1, 1))
    v = m.init(jax.random.key(0), x, tables)

    def loss(p):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x, tables)))

    g = jax.grad(loss)(v["params"])
    w = v["params"]["so3_conv_0"]["kernel"]
    d = jax.random.normal(jax.random.key(2), w.shape)
    eps = 1e-2
    p_plus = jax.tree_util.tree_map(lambda a: a, v["params"])
    p_plus["so3_conv_0"]["kernel"] = w + eps * d
    p_minus = jax.tree_util.tree_map(lambda a: a, v["params"])
    p_minus["so3_conv_0"]["kernel"] = w - eps * d
    fd = (loss(p_plus) - loss(p_minus)) / (2 * eps)
    an = jnp.sum(g["so3_conv_0"]["kernel"] * d)
    assert float(abs(fd - an) / abs(an)) < 2e-2
