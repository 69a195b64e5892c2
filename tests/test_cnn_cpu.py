"""The CNNs' CPU convolutions (sphere_jax.models.conv_cpu) against the lax / Flax formulations:
values and every gradient (dx, dw, db) for each kernel size and stride the models use, max-pool
with ties, nearest resize, and whole models (same parameters, logits and gradients)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sphere_jax.models import cnn
from sphere_jax.models import conv_cpu as fc

TOL = 1e-5
# (kernel, stride) of cnn.py's SEGMENTERS (enc/dec) and CLASSIFIERS, plus the 1x1 shortcuts.
PAIRS = sorted({(5, 1), (3, 1), (9, 1), (7, 1), (3, 2), (5, 2), (7, 2),   # segmenters
                (5, 3), (3, 1), (3, 2), (5, 2),                          # classifiers
                (1, 1)})


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _sizes(k, s):
    # input sizes such that every output_padding e in [0, s) occurs (H and W differ by one, so
    # they also differ in parity)
    base = k + 2 * s
    return [(base + d, base + d + 1) for d in range(s)]


def _ref_conv(x, w, b, s):
    return lax.conv_general_dilated(x, w, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST) + b


def _ref_convT(x, w, b, s, out_hw):
    # exactly cnn.CNNSegmenter's decoder layer
    k = w.shape[0]
    extra = [out_hw[a] - k - (x.shape[1 + a] - 1) * s for a in (0, 1)]
    m = nn.ConvTranspose(w.shape[-1], (k, k), strides=(s, s),
                         padding=((k - 1, k - 1 + extra[0]), (k - 1, k - 1 + extra[1])),
                         precision=lax.Precision.HIGHEST)
    return m.apply({"params": {"kernel": w, "bias": b}}, x)


def _rand(rng, shape, relu=False):
    a = rng.normal(size=shape).astype(np.float32)
    if relu:
        a = np.maximum(a, 0)
    return jnp.asarray(a)


def _modes(pairs, classifiers=False):
    """Every kernel in each formulation ("conv": XLA convolutions / space-to-depth, "patches": one
    matmul of the patches, "taps": k*k tap matmuls); strided pairs also with a 1-sample batch
    loop in the tap weight gradient (the fori_loop path); stride-1 pairs also as products of
    rfft2 spectra ("fft"; "valid_fft": compiled as the segmenters' programs). The per-shape
    choice ("auto") is exercised by the whole-model tests. "valid": the "conv" formulation
    compiled as the CNN segmenters' programs are (``conv_cpu.jit``: no YNNPACK, unpadded
    convolutions); with ``classifiers``, also "valid_dots", as the classifiers' programs are
    (YNNPACK's dots and reductions, unpadded convolutions)."""
    extra = ("valid_dots",) if classifiers else ()
    modes = lambda k, s: ("auto",) if k == 1 else (
        ("conv", "valid", *extra, "patches") + (("taps", "chunk1") if s > 1 else ("fft", "valid_fft")))
    return [(k, s, m) for k, s in pairs for m in modes(k, s)]


@pytest.fixture
def chunked(monkeypatch):
    def set_mode(mode):
        if mode == "chunk1":
            monkeypatch.setattr(fc, "FORMULATION", "conv")
            monkeypatch.setattr(fc, "WGRAD_CHUNK_ELEMS", 1)
        elif mode == "valid_fft":
            monkeypatch.setattr(fc, "FORMULATION", "fft")
        elif mode != "auto":
            monkeypatch.setattr(fc, "FORMULATION", "conv" if mode.startswith("valid") else mode)
        if mode == "valid_dots":
            return lambda fn: fc.jit(fn, fc.YNN_DOTS_AND_REDUCES)
        return fc.jit if mode in ("valid", "valid_fft") else jax.jit
    return set_mode


@pytest.mark.parametrize("k,s", [(3, 2), (5, 2), (3, 3), (5, 3), (2, 3)])
def test_strided_forward_by_input_phases(k, s):
    """``_fwd_phases`` (s*s stride-1 convolutions, one per input phase) equals lax's strided
    convolution, also where a phase's kernel is 1x1 (a matmul) or empty (k < s)."""
    rng = np.random.default_rng(k * 10 + s)
    x, w = _rand(rng, (2, 17, 14, 5)), _rand(rng, (k, k, 5, 6))
    ref = lax.conv_general_dilated(x, w, (s, s), "VALID", dimension_numbers=fc._DN, precision=lax.Precision.HIGHEST)
    Ho, Wo = ref.shape[1:3]
    out = jax.jit(lambda x, w: fc._fwd_phases(x, w, s, Ho, Wo))(x, w)
    assert out.shape == ref.shape
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 1e-5


def test_a_program_keeps_the_formulation_it_was_made_under(monkeypatch):
    """``conv_cpu.jit`` programs trace under the formulation of the moment they were made, also
    when JAX traces them again for new kinds of arguments. They used to read the global then: a
    benchmark that set it, made and called a program, and set it back, timed later calls (a
    retrace on the device arrays the first step returned) under the restored value."""
    rng = np.random.default_rng(0)
    w = _rand(rng, (9, 9, 3, 4))  # stride 1, k = 9: rfft2 under "fft", none under "conv"
    monkeypatch.setattr(fc, "FORMULATION", "fft")
    f = fc.jit(lambda x, w: fc.conv2d(x, w, None, 1))
    x2 = _rand(rng, (2, 30, 29, 3))
    y2 = f(x2, w)
    monkeypatch.setattr(fc, "FORMULATION", "conv")
    g = fc.jit(lambda x, w: fc.conv2d(x, w, None, 1))
    x3 = jax.device_put(_rand(rng, (3, 30, 29, 3)))  # another batch: f traces again, now
    assert "fft" in f.lower(x3, w).as_text()
    assert "fft" not in g.lower(x3, w).as_text()
    ref = lax.conv_general_dilated(x3, w, (1, 1), "VALID", dimension_numbers=fc._DN, precision=lax.Precision.HIGHEST)
    for out, r in ((f(x3, w), ref), (g(x3, w), ref), (y2, lax.conv_general_dilated(
            x2, w, (1, 1), "VALID", dimension_numbers=fc._DN, precision=lax.Precision.HIGHEST))):
        assert float(jnp.max(jnp.abs(out - r)) / jnp.max(jnp.abs(r))) < 1e-5


def test_plan_picks_by_shape(monkeypatch):
    """The measured choices (conv_cpu._plan) for layers of the study's CNNs, and the override."""
    p = fc._plan
    assert p(191, 1100, 18, 18, 2, 3) == {"fwd": "patches", "adj": "patches", "wgrad": "taps"}   # CNN-5.5M
    assert p(16, 85, 43, 43, 2, 7) == {"fwd": "conv", "adj": "conv", "wgrad": "taps"}            # CNN-5.5M
    assert p(1, 61, 28, 28, 2, 5) == {"fwd": "patches", "adj": "conv", "wgrad": "patches"}       # cls first layer
    assert p(244, 244, 8, 8, 1, 3) == {"fwd": "conv", "adj": "patches", "wgrad": "conv"}         # cls last layer
    assert p(122, 122, 12, 12, 2, 3) == {"fwd": "phase", "adj": "patches", "wgrad": "taps"}      # cls k=3, s=2
    # with padded convolutions (a jaxlib without the YNNPACK option), taps on small outputs
    assert p(244, 244, 8, 8, 1, 3, valid=False) == {"fwd": "conv", "adj": "patches", "wgrad": "taps"}
    assert p(122, 122, 12, 12, 2, 3, valid=False) == {"fwd": "taps", "adj": "patches", "wgrad": "taps"}
    assert p(141, 191, 37, 37, 1, 3) == {"fwd": "conv", "adj": "conv", "wgrad": "conv"}          # CNN-5.5M
    assert p(13, 16, 92, 91, 1, 5) == {"fwd": "conv", "adj": "conv", "wgrad": "conv"}            # CNN-1M, narrow k=5
    assert p(96, 163, 38, 38, 1, 5) == {"fwd": "conv", "adj": "fft", "wgrad": "fft"}             # CNN-1M, wide k=5
    assert p(22, 31, 80, 79, 1, 7) == {"fwd": "conv", "adj": "fft", "wgrad": "fft"}              # CNN-218k
    assert p(15, 22, 86, 85, 1, 9) == {"fwd": "fft", "adj": "fft", "wgrad": "fft"}               # CNN-218k
    assert p(15, 22, 12, 11, 1, 9)["fwd"] == "conv"                                             # small image
    monkeypatch.setattr(fc, "FORMULATION", "conv")
    assert p(191, 1100, 18, 18, 2, 3) == {"fwd": "conv", "adj": "conv", "wgrad": "taps"}
    assert p(244, 244, 8, 8, 1, 3) == {"fwd": "conv", "adj": "conv", "wgrad": "conv"}
    assert p(15, 22, 86, 85, 1, 9) == {"fwd": "conv", "adj": "conv", "wgrad": "conv"}
    monkeypatch.setattr(fc, "FORMULATION", "no_fft")
    assert p(15, 22, 86, 85, 1, 9) == {"fwd": "conv", "adj": "conv", "wgrad": "conv"}
    assert p(244, 244, 8, 8, 1, 3) == {"fwd": "conv", "adj": "patches", "wgrad": "conv"}
    monkeypatch.setattr(fc, "FORMULATION", "fft")
    assert p(13, 15, 96, 95, 1, 3) == {"fwd": "fft", "adj": "fft", "wgrad": "fft"}
    assert p(191, 1100, 18, 18, 2, 3) == {"fwd": "conv", "adj": "conv", "wgrad": "taps"}
    monkeypatch.setattr(fc, "FORMULATION", "fast")
    with pytest.raises(ValueError, match="FORMULATION 'fast'"):
        p(1, 1, 1, 1, 1, 1)


@pytest.mark.parametrize("k,s,mode", _modes(PAIRS, classifiers=True))
def test_conv2d_forward_and_grads(k, s, mode, chunked):
    jit = chunked(mode)
    rng = np.random.default_rng(k * 10 + s)
    for H, W in _sizes(k, s):
        x = _rand(rng, (2, H, W, 3))
        w = _rand(rng, (k, k, 3, 4))
        b = _rand(rng, (4,))
        y0 = _ref_conv(x, w, b, s)
        ct = _rand(rng, y0.shape)
        y1 = jit(lambda x, w, b: fc.conv2d(x, w, b, s))(x, w, b)
        assert y1.shape == y0.shape
        e = rel(y1, y0); assert e < TOL
        loss0 = lambda x, w, b: jnp.sum(_ref_conv(x, w, b, s) * ct)
        loss1 = lambda x, w, b: jnp.sum(fc.conv2d(x, w, b, s) * ct)
        g0 = jax.grad(loss0, argnums=(0, 1, 2))(x, w, b)
        g1 = jit(jax.grad(loss1, argnums=(0, 1, 2)))(x, w, b)
        for name, a, r in zip(("dx", "dw", "db"), g1, g0):
            e = rel(a, r); assert e < TOL, (k, s, H, W, name, e)


@pytest.mark.parametrize("k,s,mode", _modes([p for p in PAIRS if p[0] > 1]))
def test_conv_transpose2d_forward_and_grads(k, s, mode, chunked):
    jit = chunked(mode)
    rng = np.random.default_rng(100 + k * 10 + s)
    for H, W in _sizes(k, s):
        h, w_ = (H - k) // s + 1, (W - k) // s + 1  # encoder output size -> decoder input size
        x = _rand(rng, (2, h, w_, 4))
        w = _rand(rng, (k, k, 4, 3))
        b = _rand(rng, (3,))
        y0 = _ref_convT(x, w, b, s, (H, W))
        assert y0.shape == (2, H, W, 3)
        ct = _rand(rng, y0.shape)
        y1 = jit(lambda x, w, b: fc.conv_transpose2d(x, w, b, s, (H, W)))(x, w, b)
        e = rel(y1, y0); assert e < TOL
        loss0 = lambda x, w, b: jnp.sum(_ref_convT(x, w, b, s, (H, W)) * ct)
        loss1 = lambda x, w, b: jnp.sum(fc.conv_transpose2d(x, w, b, s, (H, W)) * ct)
        g0 = jax.grad(loss0, argnums=(0, 1, 2))(x, w, b)
        g1 = jit(jax.grad(loss1, argnums=(0, 1, 2)))(x, w, b)
        for name, a, r in zip(("dx", "dw", "db"), g1, g0):
            e = rel(a, r); assert e < TOL, (k, s, H, W, name, e)


@pytest.mark.parametrize("k,s", [p for p in PAIRS if p[0] > 1])
def test_max_pool_forward_and_grad_with_ties(k, s):
    rng = np.random.default_rng(200 + k * 10 + s)
    for H, W in _sizes(k, s):
        x = _rand(rng, (2, H, W, 3), relu=True)  # ReLU output: many tied zeros
        x = x.at[:, :, : W // 2].set(jnp.round(x[:, :, : W // 2]))  # and tied positive values
        ref = lambda x: nn.max_pool(x, (k, k), strides=(s, s), padding="VALID")
        y0 = ref(x)
        ct = _rand(rng, y0.shape)
        y1 = fc.max_pool_valid(x, k, s)
        e = rel(y1, y0); assert e < TOL
        g0 = jax.grad(lambda x: jnp.sum(ref(x) * ct))(x)
        g1 = jax.jit(jax.grad(lambda x: jnp.sum(fc.max_pool_valid(x, k, s) * ct)))(x)
        e = rel(g1, g0); assert e < TOL, (k, s, H, W, e)


def test_nearest_resize():
    from sphere_jax.models.cnn import _nearest_resize

    rng = np.random.default_rng(3)
    for (h, w), (H, W) in [((39, 39), (80, 79)), ((5, 7), (11, 15)), ((4, 4), (4, 9))]:
        z = _rand(rng, (2, h, w, 3))
        ct = _rand(rng, (2, H, W, 3))
        e = rel(fc.nearest_resize(z, (H, W)), _nearest_resize(z, (H, W)))
        assert e < TOL
        g0 = jax.grad(lambda z: jnp.sum(_nearest_resize(z, (H, W)) * ct))(z)
        g1 = jax.grad(lambda z: jnp.sum(fc.nearest_resize(z, (H, W)) * ct))(z)
        e = rel(g1, g0); assert e < TOL


# every layer kind (1M, 5.5M: same layers); the segmenter also with every stride-1 kernel by rfft2
@pytest.mark.parametrize("name,form", [("cnn_218k", "auto"), ("cnn_218k", "fft"), ("cnn_cls_68k", "auto"),
                                       ("cnn_cls_250k", "auto"), ("cnn_cls_250k", "valid")])
def test_cpu_model_matches_lax_model(name, form, monkeypatch):
    """conv_impl="cpu" and "lax": same parameter tree and initial values; same logits and
    parameter gradients.

    Compared in float64: in float32 a pre-activation within round-off of 0 (seen: 1.3e-7) can
    flip a ReLU between the two (equally exact) formulations and change a gradient by %.
    """
    # "valid": the plan of conv_cpu.jit programs (unpadded convolutions: the strided layer's
    # forward by input phases, the small weight gradients as convolutions)
    monkeypatch.setattr(fc, "FORMULATION", "auto" if form == "valid" else form)
    fast_jit = (lambda f: fc.jit(f, fc.YNN_DOTS_AND_REDUCES)) if form == "valid" else jax.jit
    seg = name in cnn.SEGMENTERS
    cfg = (cnn.SEGMENTERS if seg else cnn.CLASSIFIERS)[name]
    m = cfg.min_input_size()
    hw = (m + 3, m + 2)  # small but odd-sized input: exercises output_padding
    rng = np.random.default_rng(4)
    x = _rand(rng, (2, *hw, 1))
    plain = dataclasses.replace(cnn.make_cnn(name), conv_impl="lax")
    fast = dataclasses.replace(cnn.make_cnn(name), conv_impl="cpu")
    p0 = plain.init(jax.random.PRNGKey(0), x)
    p1 = fast.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(p0) == jax.tree_util.tree_structure(p1)
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    # non-zero biases so that bias paths are tested
    noise = [rng.normal(size=a.shape) for a in jax.tree_util.tree_leaves(p0)]
    with jax.enable_x64(True):
        params = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(p0),
            [jnp.asarray(np.asarray(a, np.float64) + 0.01 * n) for a, n in zip(jax.tree_util.tree_leaves(p0), noise)])
        x64 = jnp.asarray(np.asarray(x, np.float64))
        y0 = jax.jit(plain.apply)(params, x64)
        y1 = fast_jit(fast.apply)(params, x64)
        assert y1.dtype == jnp.float64
        e = rel(y1, y0); assert e < TOL
        ct = jnp.asarray(rng.normal(size=y0.shape))
        g0 = jax.jit(jax.grad(lambda p: jnp.sum(plain.apply(p, x64) * ct)))(params)
        g1 = fast_jit(jax.grad(lambda p: jnp.sum(fast.apply(p, x64) * ct)))(params)
        flat0 = jax.tree_util.tree_leaves_with_path(g0)
        flat1 = jax.tree_util.tree_leaves(g1)
        for (path, a), b in zip(flat0, flat1):
            e = rel(b, a)
            assert e < TOL, (name, jax.tree_util.keystr(path), e)


def test_auto_picks_the_cpu_path_on_cpu_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("SPHERE_JAX_CNN_CONV", raising=False)
    assert cnn.resolve_conv_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "lax")
    assert cnn.resolve_conv_impl("lax") == "lax"
    monkeypatch.setenv("SPHERE_JAX_CNN_CONV", "lax")
    assert cnn.resolve_conv_impl("auto") == "lax" and cnn.resolve_conv_impl("cpu") == "cpu"
    monkeypatch.setenv("SPHERE_JAX_CNN_CONV", "fast")
    with pytest.raises(ValueError, match="unknown CNN convolution implementation 'fast'"):
        cnn.resolve_conv_impl("auto")


def _step_programs(name, L, x, y):
    """The training step of ``name`` compiled by plain jax.jit and by train.make_train_step."""
    import optax

    from sphere_jax import train
    from sphere_jax.models import registry

    model, task = registry.make_model(name, L_in=L)
    params, model_state = train.split_variables(model.init(jax.random.key(0), x, None))
    state = train.TrainState.create(params, optax.adam(1e-3), model_state)
    plain = jax.jit(train._train_step(model, task)).lower(state, None, x, y).compile()
    ours = train.make_train_step(model, task).lower(state, None, x, y).compile()
    predict = train.make_predict(model).lower({"params": params}, None, x).compile()
    l0 = float(plain(jax.tree_util.tree_map(jnp.copy, state), None, x, y)[1])
    l1 = float(ours(jax.tree_util.tree_map(jnp.copy, state), None, x, y)[1])
    return model, plain.as_text(), ours.as_text(), predict.as_text(), l0, l1


def _padded_convs(text):
    """Convolutions padded on the right only (conv_cpu's padding against YNNPACK: pad=0_0x0_k)."""
    return sum("pad=0_0x0_" in line for line in text.splitlines() if " convolution(" in line)


def test_cnn_programs_compile_without_ynn_convolutions():
    """The CNNs' programs on the CPU path (train.jit_for -> conv_cpu.jit) compile without
    YNNPACK's convolutions and with unpadded stride-1 convolutions: the segmenters without any
    YNNPACK fusion, the classifiers with YNNPACK's dots and reductions. Plain jax.jit of the same
    step has YNNPACK fusions (jaxlib 0.10.2) and the padding (window pad 0_0x0_k). Same loss
    (bound 1e-5 relative; measured 1e-6 at band-limit 50). S2CNNs and the lax path keep jax.jit."""
    from sphere_jax.models import registry

    assert cnn.cpu_ynn_fusions(registry.make_model("s2cnn_cls", L_in=12)[0]) is None
    rng = np.random.default_rng(7)
    x = _rand(rng, (2, 24, 23, 1))
    y = jnp.asarray(rng.integers(0, 11, (2, 24, 23)), jnp.int32)
    model, plain, ours, predict, l0, l1 = _step_programs("cnn_218k", 12, x, y)
    assert cnn.cpu_ynn_fusions(model) == fc.YNN_NONE
    assert cnn.cpu_ynn_fusions(dataclasses.replace(model, conv_impl="lax")) is None
    assert "ynn_fusion" in plain and _padded_convs(plain) >= 4
    assert "ynn_fusion" not in ours and _padded_convs(ours) == 0
    assert "ynn_fusion" not in predict and _padded_convs(predict) == 0
    assert abs(l1 - l0) < 1e-5 * abs(l0)

    x = _rand(rng, (4, 60, 59, 1))
    y = jnp.asarray(rng.integers(0, 10, (4,)), jnp.int32)
    model, plain, ours, predict, l0, l1 = _step_programs("cnn_cls_250k", 30, x, y)
    assert cnn.cpu_ynn_fusions(model) == fc.YNN_DOTS_AND_REDUCES
    assert _padded_convs(plain) >= 2
    assert "ynn_fusion" in ours and _padded_convs(ours) == 0 and _padded_convs(predict) == 0
    assert abs(l1 - l0) < 1e-5 * abs(l0)
