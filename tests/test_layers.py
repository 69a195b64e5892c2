"""Equivariant core: transforms, each layer against a brute-force quadrature, equivariance."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import s2fft
from s2fft.precompute_transforms import construct
from s2fft.recursions import risbo
from s2fft.utils.rotation import rotate_flms
from scipy.special import sph_harm_y

import oracles as O
from sphere_jax import grids, harmonics as hm, layers


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ------------------------------------------------------------------ transforms


@pytest.mark.parametrize("L", [4, 7])
def test_tables_match_s2fft(L):
    for fwd in (True, False):
        k = np.asarray(construct.spin_spherical_kernel_jax(L, 0, reality=True, sampling="dh", forward=fwd))
        assert np.abs(hm.s2_table(L, fwd) - k).max() < 1e-5 * max(1, np.abs(k).max())
        k = np.asarray(construct.wigner_kernel_jax(L, L, reality=True, sampling="dh", forward=fwd))
        assert np.abs(hm.so3_table(L, L, fwd) - k).max() < 1e-6


def test_wigner_d_convention():
    d = hm.wigner_d(3, [0.7])
    assert d[1, 2 + 1, 2 + 0, 0] == pytest.approx(-np.sin(0.7) / np.sqrt(2), abs=1e-12)
    dl = np.zeros((5, 5))
    for el in range(3):
        dl = risbo.compute_full(dl, 0.7, 3, el)
    np.testing.assert_allclose(d[2, :, :, 0], dl, atol=1e-12)


@pytest.mark.parametrize("L", [5, 12])
def test_s2_round_trip(L):
    flm = O.random_flm(L, 1)
    f = O.eval_s2(flm, L, grids.s2_points(L))
    x = jnp.asarray(np.stack([f, 2 * f], -1)[None], jnp.float32)
    flm2 = hm.s2_forward(x, jnp.asarray(hm.s2_table(L, True)))
    assert rel(flm2[0, ..., 0], flm) < 1e-5
    back = hm.s2_inverse(flm2, jnp.asarray(hm.s2_table(L, False)))
    assert rel(back, x) < 1e-5


@pytest.mark.parametrize("method", ["dft", "fft"])
@pytest.mark.parametrize("L", [5, 10])
def test_so3_round_trip(L, method, monkeypatch):
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", method)
    rng = np.random.default_rng(2)
    flmn = s2fft.utils.signal_generator.generate_flmn(rng, L, L, reality=True)
    x = hm.so3_inverse(jnp.asarray(flmn, jnp.complex64)[None, ..., None], jnp.asarray(hm.so3_table(L, L, False)))
    assert x.shape == (1, 2 * L - 1, 2 * L, 2 * L - 1, 1)
    f2 = hm.so3_forward(x, jnp.asarray(hm.so3_table(L, L, True)))
    assert rel(f2[0, ..., 0], flmn) < 1e-5


def test_s2fft_backend_equals_ours(monkeypatch):
    """SPHERE_JAX_TRANSFORMS=s2fft: s2fft's own precompute transforms and kernels give our
    coefficients and signals (batch and channels vmapped), forward and inverse, S2 and SO(3)."""
    L = 6
    rng = np.random.default_rng(3)
    flm = np.stack([O.random_flm(L, s) for s in range(3)])  # [3, L, 2L-1]
    x = jnp.asarray(np.stack([O.eval_s2(f, L, grids.s2_points(L)) for f in flm], -1)[None], jnp.float32)  # [1, T, P, 3]
    flmn = s2fft.utils.signal_generator.generate_flmn(rng, L, L, reality=True)
    g = jnp.asarray(np.stack([flmn, 0.5 * flmn], -1)[None, :, :, :], jnp.complex64)  # [1, 2N-1, L, 2L-1, 2]
    out = {}
    for method in ("dft", "s2fft"):
        monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", method)
        t = hm.build_tables({**hm.table_specs("s2", L, True), **hm.table_specs("s2", L, False),
                             **hm.table_specs("so3", L, True), **hm.table_specs("so3", L, False)})
        assert set(t) == {hm.s2_key(L, True), hm.s2_key(L, False), hm.so3_key(L, True), hm.so3_key(L, False)}
        c = hm.s2_forward_half(x, t[hm.s2_key(L, True)])
        f3 = hm.so3_inverse(g, t[hm.so3_key(L, False)])
        out[method] = (c, hm.s2_inverse_half(c, t[hm.s2_key(L, False)]), f3, hm.so3_forward_half(f3, t[hm.so3_key(L, True)]))
    assert hm.s2_key(L, True).startswith("s2fft_") and hm.table_shape(hm.so3_key(L, True)) == (L, 2 * L, L, 2 * L - 1)
    for a, b in zip(out["dft"], out["s2fft"]):
        assert a.shape == b.shape and rel(b, a) < 1e-5
    assert rel(out["s2fft"][1], x) < 1e-5  # and the round trip holds


@pytest.mark.parametrize("method", ["dft", "fft", "s2fft"])
def test_band_limited_transforms_equal_the_full_ones_cut_or_padded(method, monkeypatch):
    """A forward transform truncated to degrees < Lb equals the full one sliced; an inverse of
    band-limited coefficients equals the inverse of the same coefficients zero-padded."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", method)
    L, Lb = 6, 4
    rng = np.random.default_rng(5)
    t = hm.build_tables({**hm.table_specs("s2", L, True), **hm.table_specs("s2", L, False),
                         **hm.table_specs("so3", L, True), **hm.table_specs("so3", L, False)})
    s2f, s2i, so3f, so3i = (t[k] for k in (hm.s2_key(L, True), hm.s2_key(L, False), hm.so3_key(L, True), hm.so3_key(L, False)))
    x = jnp.asarray(rng.normal(size=(2, 2 * L, 2 * L - 1, 3)), jnp.float32)
    assert rel(hm.s2_forward_half(x, s2f, Lb), hm.s2_forward_half(x, s2f)[:, :Lb, :Lb]) < 1e-5
    c = hm.s2_forward_half(x, s2f, Lb)
    padded = jnp.pad(c, ((0, 0), (0, L - Lb), (0, L - Lb), (0, 0)))
    assert rel(hm.s2_inverse_half(c, s2i), hm.s2_inverse_half(padded, s2i)) < 1e-5
    f = jnp.asarray(rng.normal(size=(2, 2 * L - 1, 2 * L, 2 * L - 1, 3)), jnp.float32)
    full = hm.so3_forward_half(f, so3f)  # [B, N, L, 2L-1, C]
    cut = hm.so3_forward_half(f, so3f, Lb)
    assert cut.shape == (2, Lb, Lb, 2 * Lb - 1, 3)
    assert rel(cut, full[:, :Lb, :Lb, L - Lb : L + Lb - 1]) < 1e-5
    padded = jnp.pad(cut, ((0, 0), (0, L - Lb), (0, L - Lb), (L - Lb, L - Lb), (0, 0)))
    assert rel(hm.so3_inverse_half(cut, so3i), hm.so3_inverse_half(padded, so3i)) < 1e-5
    assert rel(hm.so3_forward(f, so3f, Lb), hm.so3_forward(f, so3f)[:, L - Lb : L + Lb - 1, :Lb, L - Lb : L + Lb - 1]) < 1e-5
    with pytest.raises(ValueError, match="band-limit 7 must be in 1..6"):
        hm.so3_forward_half(f, so3f, 7)
    with pytest.raises(ValueError, match="half coefficients"):
        hm.so3_inverse_half(cut[:, :, :, :-1], so3i)


def test_transform_shape_errors():
    with pytest.raises(ValueError, match=r"\[batch, 10, 9, channels\]"):
        hm.s2_forward(jnp.zeros((1, 9, 9, 1)), jnp.asarray(hm.s2_table(5, True)))


# ------------------------------------------------------------------ brute-force oracles

L = 5


@pytest.fixture(scope="module")
def s2_signal():
    flm = O.random_flm(L, 0)
    return flm, O.eval_s2(flm, L, grids.s2_points(L))


@pytest.fixture
def dft(monkeypatch):
    """The "dft" transforms, which the gamma-first layers need (set, whatever the default)."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")


def _apply(layer, x, key=0):
    tables = hm.build_tables(layer.table_specs())
    v = jax.jit(layer.init)(jax.random.key(key), x, tables)
    return v, np.asarray(jax.jit(layer.apply)(v, x, tables)), tables


def test_s2conv_equals_quadrature(s2_signal, dft):
    flm, f = s2_signal
    x = jnp.asarray(f[None, ..., None], jnp.float32)
    xp = O.s2_filter_points(*grids.s2_near_identity_grid(0.6))
    Rx = np.einsum("...ij,baj->...bai", O.grid_rotations(L), xp)
    fRx = O.eval_s2(flm, L, Rx)
    for layout in hm.SO3_LAYOUTS:
        layer = layers.S2Conv(features=2, L_in=L, L_out=L, max_beta=0.6, layout=layout)
        v, out, _ = _apply(layer, x)
        if layout == "gamma_first":
            assert out.shape == (2 * L - 1, 2 * L - 1, 1, 2, 2 * L)
            out = np.asarray(hm.from_gamma_first(out))
        w = np.asarray(v["params"]["kernel"])[:, :, 0, :] * np.sqrt(6 / 24)  # [b, a, d]
        ref = np.einsum("...ba,bad->...d", fRx, w)
        assert out.shape == (1, 2 * L - 1, 2 * L, 2 * L - 1, 2)
        assert rel(out[0], ref) < 1e-4, layout


def _apply_in_layout(layer, x, key):
    """``_apply`` with a channels-last SO(3) input, whatever the layer's layout; output channels-last."""
    if layer.layout == "gamma_first":
        v, out, _ = _apply(layer, hm.to_gamma_first(x), key)
        return v, np.asarray(hm.from_gamma_first(out))
    v, out, _ = _apply(layer, x, key)
    return v, out


def _so3_input(flm, Lb):
    """F(R) = sum_i a_i f(R y_i): an exactly band-limited SO(3) signal with a closed form."""
    a = np.random.default_rng(1).normal(size=(3, 8))
    yp = O.s2_filter_points(*grids.s2_near_identity_grid(0.9))

    def F(R):
        return np.einsum("...ba,ba->...", O.eval_s2(flm, Lb, np.einsum("...ij,baj->...bai", R, yp)), a)

    return F


@pytest.mark.parametrize("L_out", [L, L + 2])
def test_so3conv_equals_quadrature(s2_signal, L_out, dft):
    flm, _ = s2_signal
    F = _so3_input(flm, L)
    x = jnp.asarray(F(O.grid_rotations(L))[None, ..., None], jnp.float32)
    Q = O.so3_filter_rotations(*grids.so3_near_identity_grid(0.5))
    FRQ = F(np.einsum("...ij,bagjk->...bagik", O.grid_rotations(L_out), Q))
    for layout in hm.SO3_LAYOUTS:  # the same parameters (same key) in both layouts
        layer = layers.SO3Conv(features=1, L_in=L, L_out=L_out, max_beta=0.5, layout=layout)
        v, out = _apply_in_layout(layer, x, 1)
        w = np.asarray(v["params"]["kernel"])[..., 0, 0] * np.sqrt(6 / 192)
        assert rel(out[0, ..., 0], np.einsum("...bag,bag->...", FRQ, w)) < 1e-4, layout


def test_so3conv_downsampling_exact_for_bandlimited_input(dft):
    Lo = 4
    flm = O.random_flm(Lo, 3)
    flm_pad = np.zeros((L, 2 * L - 1), complex)
    flm_pad[:Lo, L - Lo : L + Lo - 1] = flm
    F = _so3_input(flm_pad, L)
    x = jnp.asarray(F(O.grid_rotations(L))[None, ..., None], jnp.float32)
    Q = O.so3_filter_rotations(*grids.so3_near_identity_grid(0.5))
    FRQ = F(np.einsum("...ij,bagjk->...bagik", O.grid_rotations(Lo), Q))
    for layout in hm.SO3_LAYOUTS:
        layer = layers.SO3Conv(features=1, L_in=L, L_out=Lo, max_beta=0.5, layout=layout)
        v, out = _apply_in_layout(layer, x, 2)
        w = np.asarray(v["params"]["kernel"])[..., 0, 0] * np.sqrt(6 / 192)
        assert rel(out[0, ..., 0], np.einsum("...bag,bag->...", FRQ, w)) < 1e-4, layout


def _wigner_D(l, R_euler):
    """D^l_kn(alpha, beta, gamma) = e^{-ik alpha} d^l_kn(beta) e^{-in gamma}, via s2fft's Risbo recursion."""
    a, b, g = R_euler
    dl = np.zeros((2 * l + 1, 2 * l + 1))
    for el in range(l + 1):
        dl = risbo.compute_full(dl, b, l + 1, el)
    k = np.arange(-l, l + 1)
    return np.exp(-1j * k[:, None] * a) * dl * np.exp(-1j * k[None, :] * g)


def test_so3_to_s2_equals_explicit_wigner_formula(s2_signal, dft):
    """h_lm = sqrt(4pi/(2l+1)) (2l+1)/(8pi^2) sum_{n,k} F_lmn Psi_lkn, Psi_lkn = sum_j w_j conj(D_kn(Q_j))."""
    flm, _ = s2_signal
    F = _so3_input(flm, L)
    Fg = F(O.grid_rotations(L))
    x = jnp.asarray(Fg[None, ..., None], jnp.float32)
    Lo = 6
    v, out, _ = _apply(layers.SO3ToS2(features=1, L_in=L, L_out=Lo, max_beta=0.5), x, 3)
    gf = layers.SO3ToS2(features=1, L_in=L, L_out=Lo, max_beta=0.5, layout="gamma_first")
    _, out_gf, _ = _apply(gf, hm.to_gamma_first(x), 3)  # the same key: the same parameters
    assert out.shape == out_gf.shape == (1, 2 * Lo, 2 * Lo - 1, 1)
    w = np.asarray(v["params"]["kernel"])[..., 0, 0] * np.sqrt(6 / 192)
    betas, alphas, pg = grids.so3_near_identity_grid(0.5)
    # F_lmn by s2fft's own (numpy) Wigner transform, independent of sphere_jax.harmonics
    Flmn = s2fft.wigner.forward(Fg.astype(complex), L, L, sampling="dh", method="numpy")
    h = np.zeros((L, 2 * L - 1), complex)
    for l in range(L):
        Psi = np.zeros((2 * l + 1, 2 * l + 1), complex)
        for ib, b in enumerate(betas):
            for ia, a in enumerate(alphas):
                for ig, g in enumerate(pg):
                    Psi += w[ib, ia, ig] * np.conj(_wigner_D(l, (a, b, g - a)))
        Fl = Flmn[L - 1 - l : L + l, l, L - 1 - l : L + l]  # [n, m]
        hl = np.einsum("nm,kn->m", Fl, Psi)
        h[l, L - 1 - l : L + l] = np.sqrt(4 * np.pi / (2 * l + 1)) * (2 * l + 1) / (8 * np.pi**2) * hl
    ref = O.eval_s2(h, L, grids.s2_points(Lo))  # real part
    assert rel(out[0, ..., 0], ref) < 1e-4
    assert rel(out_gf[0, ..., 0], ref) < 1e-4


def test_so3_integrate_is_the_mean():
    rng = np.random.default_rng(4)
    flmn = s2fft.utils.signal_generator.generate_flmn(rng, L, L, reality=True)
    x = hm.so3_inverse(jnp.asarray(flmn, jnp.complex64)[None, ..., None], jnp.asarray(hm.so3_table(L, L, False)))
    mean = float(layers.so3_integrate(x)[0, 0])
    # f = sum (2l+1)/(8 pi^2) flmn conj(D): its Haar mean is flmn[l=0] / (8 pi^2)
    assert mean == pytest.approx(float(np.real(flmn[L - 1, 0, L - 1])) / (8 * np.pi**2), rel=1e-4, abs=1e-6)
    mean_gf = float(layers.so3_integrate(hm.to_gamma_first(x), "gamma_first")[0, 0])
    assert mean_gf == pytest.approx(mean, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------ equivariance


def _rotate_s2_signal(flm, Lb, Lgrid, rotation):
    return O.eval_s2(np.asarray(rotate_flms(jnp.asarray(flm), Lb, rotation)), Lb, grids.s2_points(Lgrid))


def test_layers_are_equivariant_to_general_rotations(s2_signal):
    """S2Conv -> SO3Conv -> SO3ToS2 (linear): rotating the input rotates the S2 output."""
    flm, f = s2_signal
    rot = (0.7, 1.1, -0.4)
    x = jnp.asarray(f[None, ..., None], jnp.float32)
    xr = jnp.asarray(_rotate_s2_signal(flm, L, L, rot)[None, ..., None], jnp.float32)
    l1 = layers.S2Conv(features=2, L_in=L, L_out=L, max_beta=0.6)
    l2 = layers.SO3Conv(features=2, L_in=L, L_out=L, max_beta=0.5)
    l3 = layers.SO3ToS2(features=1, L_in=L, L_out=L, max_beta=0.5)
    tables = hm.build_tables({**l1.table_specs(), **l2.table_specs(), **l3.table_specs()})
    v1 = l1.init(jax.random.key(0), x, tables)
    y = l1.apply(v1, x, tables)
    v2 = l2.init(jax.random.key(1), y, tables)
    z = l2.apply(v2, y, tables)
    v3 = l3.init(jax.random.key(2), z, tables)

    def net(inp):
        return l3.apply(v3, l2.apply(v2, l1.apply(v1, inp, tables), tables), tables)

    out, out_r = np.asarray(net(x))[0, ..., 0], np.asarray(net(xr))[0, ..., 0]
    # rotate the (band-limited) output in harmonic space and compare
    # biases are zero at init, so the chain is linear
    out_flm = np.asarray(hm.s2_forward(jnp.asarray(out[None, ..., None]), jnp.asarray(hm.s2_table(L, True))))[0, ..., 0]
    expected = _rotate_s2_signal(out_flm, L, L, rot)
    assert rel(out_r, expected) < 1e-4


def test_models_give_the_same_logits_with_s2fft_transforms(monkeypatch):
    from sphere_jax.models import s2cnn

    L = 6
    cfg = s2cnn.S2CNNSegmenterConfig(L_in=L, s2_features=3, s2_bandlimit=5, so3_features=(4,), so3_bandlimits=(6,), L_out=L)
    m = s2cnn.S2CNNSegmenter(cfg)
    x = jax.random.uniform(jax.random.key(0), (2, 2 * L, 2 * L - 1, 1))
    logits = {}
    for method in ("dft", "fft", "s2fft"):
        monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", method)
        tables = hm.build_tables(m.table_specs())
        v = m.init(jax.random.key(1), x, tables)
        logits[method] = m.apply(v, x, tables)
    assert rel(logits["s2fft"], logits["dft"]) < 1e-5
    assert rel(logits["fft"], logits["dft"]) < 1e-5


@pytest.mark.parametrize("Lb", [7, 4])
def test_gamma_first_transforms_equal_the_channels_last_ones(Lb):
    Ls, B, C = 7, 2, 3
    x = jax.random.normal(jax.random.key(0), (B, 2 * Ls - 1, 2 * Ls, 2 * Ls - 1, C))
    ref = hm.so3_forward_half(x, jnp.asarray(hm.so3_table(Ls, Ls, True)), L_band=Lb)  # [B, n, l, m, C]
    g = hm.so3_forward_gf(hm.to_gamma_first(x), jnp.asarray(hm.so3_table_gf(Ls, True, Lb)))
    assert g.shape == (Lb, 2 * Lb - 1, 2, B, C, Lb)
    as_ref = lambda c: jnp.transpose(c[:, :, 0] + 1j * c[:, :, 1], (2, 0, 4, 1, 3))
    assert rel(as_ref(g), ref) < 1e-6
    assert rel(as_ref(hm.so3_half_to_full_gf(g)), hm.so3_half_to_full(ref)) < 1e-6
    assert rel(hm.so3_half_to_full_gf(g, m_nonneg=True), hm.so3_half_to_full_gf(g)[:, Lb - 1 :]) < 1e-6
    back = hm.so3_inverse_gf(g, jnp.asarray(hm.so3_table_gf(Ls, False, Lb)))
    assert back.shape == (2 * Ls - 1, 2 * Ls - 1, B, C, 2 * Ls)
    assert rel(hm.from_gamma_first(back), hm.so3_inverse_half(ref, jnp.asarray(hm.so3_table(Ls, Ls, False)))) < 1e-6
    for fwd in (True, False):
        key = hm.so3_gf_key(Ls, fwd, Lb)
        assert hm.table_shape(key) == hm.so3_table_gf(Ls, fwd, Lb).shape
    with pytest.raises(ValueError, match="gamma-first SO\\(3\\) signal"):
        hm.so3_forward_gf(x, jnp.asarray(hm.so3_table_gf(Ls, True, Lb)))
    with pytest.raises(ValueError, match="gamma-first SO\\(3\\) coefficients"):
        hm.so3_inverse_gf(g[:, :, :1], jnp.asarray(hm.so3_table_gf(Ls, False, Lb)))


def test_bucket_size_changes_no_number(monkeypatch):
    """SPHERE_JAX_SO3_BUCKET (degrees per block of the block products) trades FLOPs for fewer
    slices and concatenations; every block size gives the same SO3Conv (the only layer with
    blocks), values and kernel gradient (bound 1e-5)."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    L_in, L_out, B, C = 7, 6, 2, 3
    x = jax.random.normal(jax.random.key(0), (2 * L_in - 1, 2 * L_in - 1, B, C, 2 * L_in))
    outs = {}
    for kind in ("SO3Conv",):
        m = getattr(layers, kind)(4, L_in, L_out, 0.4, layout="gamma_first")
        tables = hm.build_tables(m.table_specs())
        v = m.init(jax.random.key(1), x, tables)
        for size in ("1", "6", "100"):
            monkeypatch.setenv("SPHERE_JAX_SO3_BUCKET", size)
            out = m.apply(v, x, tables)
            g = jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x, tables))))(v["params"])["kernel"]
            outs[kind, size] = (out, g)
        for size in ("1", "100"):
            assert rel(outs[kind, size][0], outs[kind, "6"][0]) < 1e-5
            assert rel(outs[kind, size][1], outs[kind, "6"][1]) < 1e-5
        monkeypatch.setenv("SPHERE_JAX_SO3_BUCKET", "0")
        with pytest.raises(ValueError, match="SPHERE_JAX_SO3_BUCKET"):
            m.apply(v, x, tables)
        monkeypatch.delenv("SPHERE_JAX_SO3_BUCKET")


def test_so3_coeffs_half_equals_full(monkeypatch):
    """SPHERE_JAX_SO3_COEFFS=half (the SO3Conv's block products on the half coefficients, the
    orders n < 0 as a second product read at -m) gives the same layer as the full coefficients:
    values, kernel, bias and input gradients (measured <= 4.2e-7 relative, bound 1e-5), with
    blocks of 1, 6 and all degrees and with L_in < L_out and L_in > L_out."""
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    B, C = 2, 3
    for L_in, L_out in ((7, 6), (6, 8)):
        x = jax.random.normal(jax.random.key(0), (2 * L_in - 1, 2 * L_in - 1, B, C, 2 * L_in))
        m = layers.SO3Conv(4, L_in, L_out, 0.4, layout="gamma_first")
        tables = hm.build_tables(m.table_specs())
        v = m.init(jax.random.key(1), x, tables)
        v = {"params": {**v["params"], "bias": jax.random.normal(jax.random.key(2), (4,))}}

        def run():
            out = m.apply(v, x, tables)
            g = jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x, tables))), argnums=(0, 1))(v["params"], x)
            return out, g[0]["kernel"], g[0]["bias"], g[1]

        monkeypatch.setenv("SPHERE_JAX_SO3_COEFFS", "full")
        ref = run()
        monkeypatch.setenv("SPHERE_JAX_SO3_COEFFS", "half")
        for size in ("1", "6", "100"):
            monkeypatch.setenv("SPHERE_JAX_SO3_BUCKET", size)
            for a, r in zip(run(), ref):
                assert rel(a, r) < 1e-5, (L_in, L_out, size)
        monkeypatch.delenv("SPHERE_JAX_SO3_BUCKET")
    monkeypatch.setenv("SPHERE_JAX_SO3_COEFFS", "quarter")
    with pytest.raises(ValueError, match="SPHERE_JAX_SO3_COEFFS"):
        m.apply(v, x, tables)


def test_gamma_first_transforms_backward_without_transposes():
    """The gradient of a forward + inverse round trip through the gamma-first transforms: equal to
    the channels-last transforms' gradient (measured 2.2e-7 relative, bound 1e-5), and its jaxpr
    holds no transpose (JAX's rule for the batched alpha DFT transposed its result: 2 here, about
    1 ms each on an H200 at the 204k's sizes)."""
    Ls, Lb, B, C = 8, 6, 2, 3
    x = jax.random.normal(jax.random.key(0), (B, 2 * Ls - 1, 2 * Ls, 2 * Ls - 1, C))
    tf, ti = jnp.asarray(hm.so3_table_gf(Ls, True, Lb)), jnp.asarray(hm.so3_table_gf(Ls, False, Lb))
    t_f, t_i = jnp.asarray(hm.so3_table(Ls, Ls, True)), jnp.asarray(hm.so3_table(Ls, Ls, False))
    w = jax.random.normal(jax.random.key(1), x.shape)
    xg, wg = hm.to_gamma_first(x), hm.to_gamma_first(w)

    def gf(xg):
        return jnp.sum(jnp.sin(hm.so3_inverse_gf(hm.so3_forward_gf(xg, tf), ti)) * wg)

    def cl(x):
        F = hm.so3_forward_half(x, t_f, L_band=Lb)  # [B, n, l, m, C], band-limited
        F = jnp.pad(F, ((0, 0), (0, Ls - Lb), (0, Ls - Lb), (Ls - Lb, Ls - Lb), (0, 0)))
        return jnp.sum(jnp.sin(hm.so3_inverse_half(F, t_i)) * w)

    assert rel(jax.grad(gf)(xg), hm.to_gamma_first(jax.grad(cl)(x))) < 1e-5
    assert "transpose[" not in str(jax.make_jaxpr(jax.grad(gf))(xg))


@pytest.mark.parametrize("kind", ["S2Conv", "SO3Conv", "SO3ToS2"])
@pytest.mark.parametrize("L_in,L_out", [(7, 5), (5, 7), (6, 6)])
def test_layers_gamma_first_equal_channels_last(kind, L_in, L_out, dft):
    """Each layer gives the same numbers on gamma-first SO(3) signals as on channels-last ones
    (S2Conv: its output; SO3ToS2: its input; SO3Conv: both)."""
    B, C, D = 2, 3, 4
    cls = getattr(layers, kind)
    a = cls(D, L_in, L_out, 0.4)
    g = cls(D, L_in, L_out, 0.4, layout="gamma_first")
    s2_in = kind == "S2Conv"
    shape = (B, 2 * L_in, 2 * L_in - 1, C) if s2_in else (B, 2 * L_in - 1, 2 * L_in, 2 * L_in - 1, C)
    x = jax.random.normal(jax.random.key(1), shape)
    v, _, _ = _apply(a, x)
    v = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), v)  # bias too
    ta, tg = hm.build_tables(a.table_specs()), hm.build_tables(g.table_specs())
    ya = a.apply(v, x, ta)
    xg = x if s2_in else hm.to_gamma_first(x)
    yg = g.apply(v, xg, tg)
    if kind == "SO3ToS2":
        assert yg.shape == ya.shape == (B, 2 * L_out, 2 * L_out - 1, D)
    else:
        assert yg.shape == (2 * L_out - 1, 2 * L_out - 1, B, D, 2 * L_out)
        yg = hm.from_gamma_first(yg)
    assert rel(yg, ya) < 1e-5
    if not s2_in:
        with pytest.raises(ValueError, match="gamma first"):
            g.apply(v, x, tg)


def test_so3_layout_setting(monkeypatch):
    monkeypatch.delenv("SPHERE_JAX_SO3_LAYOUT", raising=False)
    # unset: "dft" and gamma-first on every platform, GPUs included (fastest on an H200, and the
    # classifiers compile with it there; results/gpu/README.md)
    monkeypatch.delenv("SPHERE_JAX_TRANSFORMS", raising=False)
    monkeypatch.delenv("SPHERE_JAX_SO3_TRANSFORM", raising=False)
    for backend in ("cpu", "gpu", "cuda", "rocm", "tpu"):
        monkeypatch.setattr(hm.jax, "default_backend", lambda b=backend: b)
        assert (hm.transforms(), hm.so3_layout()) == ("dft", "gamma_first"), backend
    monkeypatch.undo()
    monkeypatch.delenv("SPHERE_JAX_SO3_LAYOUT", raising=False)
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    assert hm.so3_layout() == "gamma_first"
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "channels_last")
    assert hm.so3_layout() == "channels_last"
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "gamma_first")
    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "fft")
    assert hm.so3_layout() == "channels_last"  # the gamma-first path exists for "dft" only
    for layer in (layers.SO3Conv(2, 5, 5, 0.4, layout="gamma_first"), layers.SO3ToS2(2, 5, 5, 0.4, layout="gamma_first")):
        with pytest.raises(ValueError, match="needs the 'dft' transforms"):
            layer.init(jax.random.key(0), jnp.zeros((9, 9, 1, 1, 10)), {})
    with pytest.raises(ValueError, match="needs the 'dft' transforms"):
        layers.S2Conv(2, 5, 5, 0.4, layout="gamma_first").init(jax.random.key(0), jnp.zeros((1, 10, 9, 1)), {})
    with pytest.raises(ValueError, match="layout must be one of"):
        layers.S2Conv(2, 5, 5, 0.4, layout="nchw").init(jax.random.key(0), jnp.zeros((1, 10, 9, 1)), {})
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "nchw")
    with pytest.raises(ValueError, match="SPHERE_JAX_SO3_LAYOUT"):
        hm.so3_layout()


def test_models_are_the_same_function_in_both_layouts(monkeypatch):
    """Logits and parameter gradients of a segmenter and a classifier do not depend on the SO(3)
    layout the model carries between its layers."""
    from sphere_jax.models import s2cnn

    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    L = 6
    seg = s2cnn.S2CNNSegmenter(s2cnn.S2CNNSegmenterConfig(
        L_in=L, s2_features=3, s2_bandlimit=5, so3_features=(4, 3), so3_bandlimits=(4, 5), L_out=L))
    cls = s2cnn.S2CNNClassifier(s2cnn.S2CNNClassifierConfig(
        L_in=L, features=(3, 4, 5), bandlimits=(5, 4, 3), mlp=(), batchnorm=False))
    x = jax.random.uniform(jax.random.key(0), (2, 2 * L, 2 * L - 1, 1))
    for m in (seg, cls):  # gradients of the segmenter only (the classifier adds no SO(3) code)
        out, grads, v = {}, {}, None
        for layout in hm.SO3_LAYOUTS:
            monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", layout)
            tables = hm.build_tables(m.table_specs())
            assert any(k.startswith("so3gf_") for k in tables) == (layout == "gamma_first")
            if v is None:  # one set of parameters (perturbed: the classifier's output layer starts at 0)
                v = jax.jit(m.init)(jax.random.key(1), x, tables)
                v = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), v)
            out[layout] = jax.jit(m.apply)(v, x, tables)
            if m is seg:
                grads[layout] = jax.jit(jax.grad(lambda p, t: jnp.sum(m.apply({"params": p}, x, t) ** 2)))(v["params"], tables)
        assert rel(out["gamma_first"], out["channels_last"]) < 1e-5
        if m is cls:
            continue
        flat = {k: jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for k, t in grads.items()}
        assert float(jnp.max(jnp.abs(flat["channels_last"]))) > 0
        assert rel(flat["gamma_first"], flat["channels_last"]) < 1e-4
