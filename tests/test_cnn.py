"""Planar CNN baselines: parameter counts derived by hand, shapes on dh grids, a numpy oracle."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from sphere_jax.models import cnn


def dh(L):
    """Spatial size of the dh grid of band-limit L: (2L, 2L - 1)."""
    return (2 * L, 2 * L - 1)


def init_shapes(model, hw, c_in=1):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, c_in), jnp.float32))


def valid(n, k, s):
    return (n - k) // s + 1


def random_variables(model, x_shape, seed=0, scale=1.0):
    """Variables of the right structure filled from numpy (kernels ~ N(0, scale^2 / fan_in),
    biases ~ N(0, (scale/2)^2)). Eager ``model.init`` compiles a PRNG kernel per parameter
    shape (~1 s each on a small CPU), so most tests use this instead."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape, jnp.float32))

    def fill(s):
        if len(s.shape) == 1:
            return jnp.asarray(0.5 * scale * rng.standard_normal(s.shape), jnp.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(scale * rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map(fill, shapes)


# ------------------------------------------------------------------ parameter counts by hand


def seg_count_by_hand(channels, kernels, c_in=1, n_cls=11):
    """Encoder convs + mirrored transposed convs + 1x1 shortcuts on the inner layers, all with
    biases (the reference layout: no shortcut on the first encoder / last decoder layer)."""
    cs = [c_in, *channels]
    n = len(channels)
    enc = sum(k * k * cs[i] * cs[i + 1] + cs[i + 1] for i, k in enumerate(kernels))
    dec = sum(kernels[i] ** 2 * channels[i] * channels[i - 1] + channels[i - 1] for i in range(1, n))
    out = kernels[0] ** 2 * channels[0] * n_cls + n_cls
    enc_skip = sum(channels[i - 1] * channels[i] + channels[i] for i in range(1, n))
    dec_skip = sum(channels[i] * channels[i - 1] + channels[i - 1] for i in range(1, n))
    return enc + dec + out + enc_skip + dec_skip


def test_segmenter_218k_written_out():
    # 1->13 k5, 13->15 k3, 15->22 k9, 22->31 k7, 31->141 k3 and back, 13->11 k5 at the end.
    enc = (25 * 13 + 13) + (9 * 13 * 15 + 15) + (81 * 15 * 22 + 22) + (49 * 22 * 31 + 31) + (9 * 31 * 141 + 141)
    dec = (9 * 141 * 31 + 31) + (49 * 31 * 22 + 22) + (81 * 22 * 15 + 15) + (9 * 15 * 13 + 13) + (25 * 13 * 11 + 11)
    skips = 2 * (13 * 15 + 15 * 22 + 22 * 31 + 31 * 141) + (15 + 22 + 31 + 141) + (13 + 15 + 22 + 31)
    assert enc == 101_789 and dec == 104_909 and skips == 11_446
    assert enc + dec + skips == 218_144


@pytest.mark.parametrize(
    "name, expected",
    [("cnn_218k", 218_144), ("cnn_1m", 1_042_013), ("cnn_5_5m", 5_519_335)],
)
def test_segmenter_reference_counts(name, expected):
    cfg = cnn.SEGMENTERS[name]
    assert cfg.reference_params == expected
    assert seg_count_by_hand(cfg.channels, cfg.kernels) == expected
    model = cnn.make_cnn(name)
    # Reference input 100x100 and our dh grid for L = 50 (100x99): no dense layers, same count.
    for hw in [(100, 100), dh(50)]:
        assert cnn.count_params(init_shapes(model, hw)) == expected


def test_classifier_baseline_counts():
    model = cnn.make_cnn("cnn_cls_68k")
    # Reference 60x60: 60 -> 19 -> 5 per axis.
    assert valid(valid(60, 5, 3), 5, 3) == 5
    by_hand = (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (5 * 5 * 64 * 10 + 10)
    assert by_hand == 68_106
    assert cnn.count_params(init_shapes(model, (60, 60))) == 68_106
    # Our L = 30 grid 60x59: 59 -> 19 -> 5 as well, so the same count.
    assert dh(30) == (60, 59) and valid(valid(59, 5, 3), 5, 3) == 5
    assert cnn.count_params(init_shapes(model, dh(30))) == 68_106
    # At L = 50 (100x99): 100 -> 32 -> 10, 99 -> 32 -> 10, flatten 10*10*64.
    assert cnn.count_params(init_shapes(model, dh(50))) == 832 + 51_264 + 10 * 10 * 64 * 10 + 10


@pytest.mark.parametrize("name, w", [("cnn_cls_250k", 30), ("cnn_cls_500k", 43), ("cnn_cls_1m", 61), ("cnn_cls_4m", 122)])
def test_classifier_family_counts(name, w):
    # channels (w, 2w, 2w, 4w, 4w), kernels 5,3,3,3,3, global average pool, dense 4w -> 10.
    c = [1, w, 2 * w, 2 * w, 4 * w, 4 * w]
    k = [5, 3, 3, 3, 3]
    by_hand = sum(k[i] ** 2 * c[i] * c[i + 1] + c[i + 1] for i in range(5)) + 4 * w * 10 + 10
    assert by_hand == 270 * w * w + 78 * w + 10 == cnn.CLASSIFIERS[name].reference_params
    model = cnn.make_cnn(name)
    for hw in [(60, 60), dh(30), dh(50)]:
        assert cnn.count_params(init_shapes(model, hw)) == by_hand


def test_classifier_sizes_increase():
    counts = [cnn.CLASSIFIERS[n].reference_params for n in cnn.CLASSIFIERS]
    assert len(counts) >= 5 and counts == sorted(counts)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("name", sorted(cnn.SEGMENTERS))
@pytest.mark.parametrize("hw", [dh(50), dh(30), (100, 100), (61, 64)])
def test_segmenter_output_shapes(name, hw):
    model = cnn.make_cnn(name)
    v = init_shapes(model, hw)
    out = jax.eval_shape(model.apply, v, jnp.zeros((3, *hw, 1)), None)
    assert out.shape == (3, *hw, 11) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(cnn.CLASSIFIERS))
def test_classifier_output_shapes(name):
    model = cnn.make_cnn(name)
    v = init_shapes(model, dh(30))
    assert jax.eval_shape(model.apply, v, jnp.zeros((4, *dh(30), 1)), None).shape == (4, 10)


SMALL = cnn.CNNSegmenterConfig(channels=(3, 4, 5), kernels=(3, 2, 3), strides=(2, 3, 1))


@pytest.mark.parametrize("hw", [dh(10), (20, 20), (21, 24), (17, 23)])
def test_small_segmenter_runs_at_odd_sizes(hw):
    model = SMALL.make(num_classes=6)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *hw, 2)), jnp.float32)
    v = random_variables(model, x.shape)
    y = model.apply(v, x, None)
    assert y.shape == (2, *hw, 6) and bool(jnp.all(jnp.isfinite(y)))
    assert model.table_specs() == {}


def test_num_classes_override_and_tables_ignored():
    model = cnn.make_cnn("cnn_218k", num_classes=4)
    assert model.num_classes == 4 and model.table_specs() == {}
    assert cnn.make_cnn("cnn_cls_68k", num_classes=7).num_classes == 7
    small = SMALL.make()
    x = jnp.ones((1, 20, 19, 1))
    v = random_variables(small, x.shape)
    np.testing.assert_array_equal(small.apply(v, x), small.apply(v, x, {"anything": jnp.zeros(3)}))


# ------------------------------------------------------------------ numpy oracle


def np_conv(x, w, b, s):
    k = w.shape[0]
    H, W = valid(x.shape[1], k, s), valid(x.shape[2], k, s)
    out = np.zeros((x.shape[0], H, W, w.shape[-1])) + b
    for dy in range(k):
        for dx in range(k):
            out += x[:, dy:dy + s * (H - 1) + 1:s, dx:dx + s * (W - 1) + 1:s, :] @ w[dy, dx]
    return out


def np_maxpool(x, k, s):
    H, W = valid(x.shape[1], k, s), valid(x.shape[2], k, s)
    out = np.full((x.shape[0], H, W, x.shape[3]), -np.inf)
    for dy in range(k):
        for dx in range(k):
            out = np.maximum(out, x[:, dy:dy + s * (H - 1) + 1:s, dx:dx + s * (W - 1) + 1:s, :])
    return out


def np_conv_transpose(x, w, b, s, size):
    """Scatter form; Flax's (unflipped) kernel tap j lands at output i*s + k-1-j. Rows/columns
    past (in-1)*s + k (the output padding) get only the bias, as in PyTorch."""
    k = w.shape[0]
    out = np.zeros((x.shape[0], *size, w.shape[-1])) + b
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            for dy in range(k):
                for dx in range(k):
                    out[:, i * s + k - 1 - dy, j * s + k - 1 - dx, :] += x[:, i, j, :] @ w[dy, dx]
    return out


def np_nearest(x, size):
    iy = (np.arange(size[0]) * x.shape[1]) // size[0]
    ix = (np.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, iy][:, :, ix]


def np_segmenter(p, x, channels, kernels, strides):
    relu = lambda a: np.maximum(a, 0)
    n = len(channels)
    sizes = [x.shape[1:3]]
    h = x
    for i in range(n):
        y = np_conv(h, p[f"enc_conv_{i}"]["kernel"], p[f"enc_conv_{i}"]["bias"], strides[i])
        if i > 0:
            q = np_maxpool(h, kernels[i], strides[i])
            y = y + np_conv(q, p[f"enc_skip_{i}"]["kernel"], p[f"enc_skip_{i}"]["bias"], 1)
        h = relu(y)
        sizes.append(h.shape[1:3])
    for i in range(n - 1, 0, -1):
        y = np_conv_transpose(h, p[f"dec_conv_{i}"]["kernel"], p[f"dec_conv_{i}"]["bias"], strides[i], sizes[i])
        z = np_conv(h, p[f"dec_skip_{i}"]["kernel"], p[f"dec_skip_{i}"]["bias"], 1)
        h = relu(y + np_nearest(z, sizes[i]))
    return np_conv_transpose(h, p["out_conv"]["kernel"], p["out_conv"]["bias"], strides[0], sizes[0])


@pytest.mark.parametrize("hw", [(20, 19), (17, 21)])
def test_segmenter_matches_numpy_oracle(hw):
    cfg = SMALL
    model = cfg.make(num_classes=3)
    x = np.random.default_rng(2).standard_normal((2, *hw, 2))
    # Random biases too (Flax initialises them to zero), so padded rows and shortcuts show.
    v = random_variables(model, x.shape, seed=3)
    got = np.asarray(model.apply(v, jnp.asarray(x, jnp.float32)))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    want = np_segmenter(p, x, cfg.channels, cfg.kernels, cfg.strides)
    assert got.shape == want.shape == (2, *hw, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_classifier_matches_numpy_oracle():
    model = cnn.make_cnn("cnn_cls_68k")
    x = np.random.default_rng(4).standard_normal((2, 60, 59, 1))
    v = random_variables(model, x.shape, seed=5)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
    h = np.maximum(np_conv(x, p["conv_0"]["kernel"], p["conv_0"]["bias"], 3), 0)
    h = np.maximum(np_conv(h, p["conv_1"]["kernel"], p["conv_1"]["bias"], 3), 0)
    want = h.reshape(2, -1) @ p["out"]["kernel"] + p["out"]["bias"]
    got = np.asarray(model.apply(v, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------ errors, gradients


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="cnn_218k") as e:
        cnn.make_cnn("cnn_nope")
    assert "cnn_cls_68k" in str(e.value) and "cnn_nope" in str(e.value)


def test_bad_inputs_raise():
    model = SMALL.make()
    with pytest.raises(ValueError, match=r"rank 4.*\(20, 19\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((20, 19)))
    m = SMALL.min_input_size()
    # backwards from size 1: 3x3 stride 1 needs 3, 2x2 stride 3 needs (3-1)*3+2, 3x3 stride 2 needs (8-1)*2+3
    assert m == ((3 - 1) * 3 + 2 - 1) * 2 + 3 == 17
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, m, m, 1)))
    with pytest.raises(ValueError, match=r"\(1, 16, 30, 1\) is too small.*>= 17"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 30, 1)))
    with pytest.raises(ValueError, match="too small"):
        cnn.make_cnn("cnn_cls_68k").init(jax.random.key(0), jnp.zeros((1, 16, 60, 1)))
    with pytest.raises(ValueError, match="equal length"):
        cnn.CNNSegmenterConfig(channels=(3, 4), kernels=(3,), strides=(1, 1))


def test_real_init_and_gradients_finite():
    seg = SMALL.make(num_classes=5)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *dh(10), 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (2, *dh(10))))
    v = jax.jit(seg.init)(jax.random.key(0), x)  # the real initialisers, once (compiles the PRNG)
    assert cnn.count_params(v) == seg_count_by_hand(SMALL.channels, SMALL.kernels, n_cls=5)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(v))

    def loss(params):
        logits = seg.apply({"params": params}, x, None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g = jax.jit(jax.grad(loss))(v["params"])
    leaves = jax.tree_util.tree_leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    assert sum(float(jnp.abs(a).sum()) for a in leaves) > 0

    cls = cnn.make_cnn("cnn_cls_250k")
    x = jnp.asarray(rng.standard_normal((2, 30, 29, 1)), jnp.float32)
    vc = random_variables(cls, x.shape)
    gc = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        cls.apply({"params": p}, x), jnp.array([1, 7])).mean()))(vc["params"])
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(gc))
