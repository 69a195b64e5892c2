"""S2CNN models: parameter counts of the study, shapes, equivariance/invariance, gradients."""
import dataclasses

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


def _reference_count(features, grid_sizes, head):
    """The reference's count: a conv with a grid of ``g`` points has ``g C_in C_out + C_out``
    parameters (``kernel [C_in, C_out, g]`` and one bias per output channel); ``head`` lists the
    widths of the layers after the Haar integration (BatchNorm1d: 2 per feature; Linear: in*out+out)."""
    n = sum(g * a * b + b for g, a, b in zip(grid_sizes, features[:-1], features[1:]))
    for kind, a, b in head:
        n += 2 * a if kind == "bn" else a * b + b
    return n


def test_classifier_counts_follow_the_reference():
    # S2ConvNet_original: s2cnn's default grids, S2 3 x 8 = 24 points, SO(3) 3 x 8 x 8 = 192
    m = s2cnn.make_s2cnn("s2cnn_cls")
    expected = _reference_count([1, 20, 40], [24, 192], [("linear", 40, 10)])
    assert expected == 154_550  # counted on the reference code
    assert s2cnn.count_params(s2cnn.param_shapes(m)) == expected
    # S2ConvNet_deep: every grid 1 ring x 6 azimuths (x 6 pre-gammas), BatchNorm + MLP head
    deep = s2cnn.make_s2cnn("s2cnn_cls_deep")
    f = [1, 8, 16, 16, 24, 24, 32, 64]
    head = [("bn", 64, 0), ("linear", 64, 64), ("bn", 64, 0), ("linear", 64, 32), ("bn", 32, 0), ("linear", 32, 10)]
    expected = _reference_count(f, [6] + [36] * 6, head)
    assert expected == 156_882
    assert s2cnn.count_params(s2cnn.param_shapes(deep)) == expected
    # the project's earlier deep variant: 3 rings x 8 azimuths (x 8 gammas), dense 64 -> 10
    rings = s2cnn.make_s2cnn("s2cnn_cls_deep_rings")
    assert s2cnn.count_params(s2cnn.param_shapes(rings)) == _reference_count(f, [24] + [192] * 6, [("linear", 64, 10)])


def test_reference_grids_keep_the_duplicate_gamma():
    from sphere_jax import grids

    betas, alphas, pg = grids.so3_near_identity_grid(np.pi / 8, 8, 3, 8, max_gamma=2 * np.pi)
    np.testing.assert_allclose(betas, np.pi / 8 * np.array([1, 2, 3]) / 3)
    np.testing.assert_allclose(pg, np.linspace(-2 * np.pi, 2 * np.pi, 8))
    assert len(np.unique(np.round(np.mod(pg, 2 * np.pi), 9) % np.round(2 * np.pi, 9))) == 7  # 0 twice
    _, _, ours = grids.so3_near_identity_grid(np.pi / 8, 8, 3, 8)
    np.testing.assert_allclose(ours, 2 * np.pi * np.arange(8) / 8)


def test_batchnorm_head_trains_and_evaluates_differently():
    """The deep classifier's BatchNorm statistics: batch statistics while training (and updated
    running averages), running averages when evaluating."""
    L = 6
    cfg = s2cnn.S2CNNClassifierConfig(L_in=L, features=(4, 6), bandlimits=(4, 3), mlp=(5,), batchnorm=True)
    m = s2cnn.S2CNNClassifier(cfg)
    tables = hm.build_tables(m.table_specs())
    x = jax.random.uniform(jax.random.key(1), (8, 2 * L, 2 * L - 1, 1))
    v = m.init(jax.random.key(0), x, tables)
    assert set(v) == {"params", "batch_stats"}
    y_train, upd = m.apply(v, x, tables, train=True, mutable=["batch_stats"])
    y_eval = m.apply(v, x, tables)
    assert float(jnp.abs(y_train - y_eval).max()) > 1e-3
    # PyTorch's momentum 0.1: running = 0.9 running + 0.1 batch mean, from 0: after one update
    # 0.1 b, after two (same batch) 0.19 b
    assert float(jnp.abs(v["batch_stats"]["bn_0"]["mean"]).max()) == 0.0
    mean1 = np.asarray(upd["batch_stats"]["bn_0"]["mean"])
    _, upd2 = m.apply({"params": v["params"], **upd}, x, tables, train=True, mutable=["batch_stats"])
    mean2 = np.asarray(upd2["batch_stats"]["bn_0"]["mean"])
    assert np.abs(mean1).max() > 1e-4
    np.testing.assert_allclose(mean2, 1.9 * mean1, rtol=1e-4, atol=1e-7)


def test_input_normalisation_makes_the_scale_irrelevant():
    """``input_norm="rms"``: the same logits for a digit in [0, 1] and the same digit x 255."""
    L = 10
    m = s2cnn.make_s2cnn("s2cnn_cls", L_in=L)
    tables = hm.build_tables(m.table_specs())
    x = _digit_batch(L, rotations.euler_to_matrix(0.3, 2.0, 1.0))
    v = m.init(jax.random.key(0), x, tables)
    y1, y255 = m.apply(v, x, tables), m.apply(v, 255.0 * x, tables)
    np.testing.assert_allclose(np.asarray(y255), np.asarray(y1), rtol=1e-4, atol=1e-5)
    # the normalised signal has unit area-weighted RMS
    from sphere_jax import grids, layers

    xn = np.asarray(layers.rms_normalize(255.0 * x))[0, :, :, 0]
    w = grids.area_weights(L)
    assert abs(np.sqrt((w * xn**2).sum() / w.sum()) - 1.0) < 1e-5
    assert float(jnp.abs(layers.rms_normalize(jnp.zeros_like(x))).max()) == 0.0


def test_segmenters_take_their_inputs_as_they_are():
    """Segmenters: no input normalisation (at RMS 60 their untrained logits saturate, and the 204k
    segmenter learned far more slowly at L=50: results/input_scale/seg_L50.json); classifiers: RMS 60."""
    assert {c.input_norm for c in s2cnn.SEGMENTERS.values()} == {"none"}
    assert {c.input_norm for c in s2cnn.CLASSIFIERS.values()} == {"rms"}
    L = 10
    m = s2cnn.make_s2cnn("s2cnn_204k", L_in=L)
    tables = hm.build_tables(m.table_specs())
    x = _digit_batch(L, np.eye(3))
    assert 0.5 < float(x.max()) <= 1.0  # the pipeline's [0, 1] digits
    v = m.init(jax.random.key(0), x, tables)
    std = float(jnp.std(m.apply(v, x, tables)))
    m60 = s2cnn.S2CNNSegmenter(dataclasses.replace(m.config, input_norm="rms"))
    std60 = float(jnp.std(m60.apply(v, x, tables)))
    # measured here, inits 1-2: 0.06-0.19 against 18-57 (at L=12 on real digits, results/segmentation/
    # README.md: logit std 0.18 against 42.7, initial loss 2.34 against 64)
    assert std < 1.0 and std60 > 10 * std, (std, std60)


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


def _small_gamma_first_segmenter(monkeypatch, L=7):
    """A two-SO3Conv segmenter at band-limit ``L`` with gamma-first layers, its tables, a digit
    input and its initial variables: ``(model, tables, x, variables)``."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "gamma_first")
    cfg = s2cnn.S2CNNSegmenterConfig(
        L_in=L, s2_features=4, s2_bandlimit=L, so3_features=(5, 4), so3_bandlimits=(L, L), L_out=L
    )
    m = s2cnn.S2CNNSegmenter(cfg)
    tables = hm.build_tables(m.table_specs())
    x = _digit_batch(L, rotations.euler_to_matrix(0.0, 2.4, 0.0))
    return m, tables, x, m.init(jax.random.key(0), x, tables)


def _logits_shift_error_grads(m, v, x, tables):
    """Under the current environment: the logits, their z-shift (3 longitude steps) equivariance
    error relative to the largest logit, and the parameters' gradients of ``sum(logits^2)``."""
    apply = jax.jit(m.apply)
    y = apply(v, x, tables)
    y_shift = apply(v, jnp.roll(x, 3, axis=2), tables)
    err = float(jnp.abs(y_shift - jnp.roll(y, 3, axis=2)).max() / jnp.abs(y).max())
    g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, tables) ** 2)))(v["params"])
    return y, err, jax.tree.leaves(g)


def test_bfloat16_grids_cost_equivariance_but_stay_close(monkeypatch):
    """SPHERE_JAX_GRID_DTYPE=bfloat16 (gamma-first layers only): the same segmenter rounds its
    SO(3) grids to 8 significant bits. Measured at L=7, inits 0-3, inputs as they are and at RMS
    60: z-shift equivariance error 5.5e-3 - 8.8e-3 (float32: 3e-7 - 5e-7), logits 6.8e-3 - 1.2e-2
    from float32's (relative to the largest), every parameter's gradient 6.9e-3 - 1.9e-2 from
    float32's (relative to its own largest). The biases' gradients, which sum a whole grid, were
    0.2-0.26 off while that sum ran in bfloat16; it runs in float32 now."""
    m, tables, x, v = _small_gamma_first_segmenter(monkeypatch)
    out, grads = {}, {}
    for dt in hm.GRID_DTYPES:
        monkeypatch.setenv("SPHERE_JAX_GRID_DTYPE", dt)
        y, err, grads[dt] = _logits_shift_error_grads(m, v, x, tables)
        assert y.dtype == jnp.float32  # the segmenter's output (an S2 signal) stays float32
        out[dt] = (y, err)
        assert all(a.dtype == jnp.float32 for a in grads[dt])
    (y32, err32), (y16, err16) = out["float32"], out["bfloat16"]
    assert err32 < 1e-5
    assert 1e-4 < err16 < 0.03
    rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert 1e-4 < rel(y16, y32) < 0.04
    leaf_errors = [rel(a, b) for a, b in zip(grads["bfloat16"], grads["float32"])]
    assert len(leaf_errors) == 8 and max(leaf_errors) < 0.05, leaf_errors
    monkeypatch.setenv("SPHERE_JAX_GRID_DTYPE", "float16")
    with pytest.raises(ValueError, match="SPHERE_JAX_GRID_DTYPE"):
        m.apply(v, x, tables)


def test_bfloat16_coefficients_stay_close(monkeypatch):
    """SPHERE_JAX_COEFF_DTYPE=bfloat16 also stores the harmonic coefficients (the Wigner step's
    output, the block products and their cotangents) in bfloat16. Measured at L=7, inits 0-2,
    blocks full and half, against float32 everywhere: with bfloat16 grids too, logits 7.4e-3 -
    1.1e-2 apart (bfloat16 grids alone: 8.0e-3 - 8.8e-3), z-shift equivariance error 7.2e-3 -
    1.1e-2, each parameter's gradient within 1.6e-2 of float32's; with float32 grids, logits
    3.7e-3 - 6.7e-3, gradients within 2.6e-2. Parameters, gradients and outputs stay float32."""
    m, tables, x, v = _small_gamma_first_segmenter(monkeypatch)
    rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
    out, grads = {}, {}
    for grid, coeff in [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]:
        monkeypatch.setenv("SPHERE_JAX_GRID_DTYPE", grid)
        monkeypatch.setenv("SPHERE_JAX_COEFF_DTYPE", coeff)
        y, err, grads[grid, coeff] = _logits_shift_error_grads(m, v, x, tables)
        assert y.dtype == jnp.float32
        out[grid, coeff] = (y, err)
        assert all(a.dtype == jnp.float32 for a in grads[grid, coeff])
    y32 = out["float32", "float32"][0]
    for key in [("bfloat16", "bfloat16"), ("float32", "bfloat16")]:
        y, err = out[key]
        assert 1e-4 < rel(y, y32) < 0.04, key
        assert err < 0.03, key
        assert rel(y, out[key[0], "float32"][0]) > 1e-5, key  # the knob changed the program
        leaf_errors = [rel(a, b) for a, b in zip(grads[key], grads["float32", "float32"])]
        assert len(leaf_errors) == 8 and max(leaf_errors) < 0.06, (key, leaf_errors)
    # the transform's own output: float32 coefficients rounded to 8 significant bits
    L = 7
    xs = hm.to_gamma_first(jax.random.normal(jax.random.key(1), (2, 2 * L - 1, 2 * L, 2 * L - 1, 3)))
    table = jnp.asarray(hm.so3_table_gf(L, True, L))
    c32, c16 = hm.so3_forward_gf(xs, table), hm.so3_forward_gf(xs, table, jnp.bfloat16)
    assert c32.dtype == jnp.float32 and c16.dtype == jnp.bfloat16
    assert 1e-4 < rel(c16.astype(jnp.float32), c32) < 2.0**-8
    monkeypatch.setenv("SPHERE_JAX_COEFF_DTYPE", "float16")
    with pytest.raises(ValueError, match="SPHERE_JAX_COEFF_DTYPE"):
        m.apply(v, x, tables)


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
    import dataclasses

    L = 10
    m = s2cnn.make_s2cnn("s2cnn_cls", L_in=L)
    # unit input scale keeps sin(logits) smooth enough for central differences with eps = 1e-2
    m = s2cnn.S2CNNClassifier(dataclasses.replace(m.config, input_rms=1.0))
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
