"""Rotation-equivariant layers on s2fft transforms (Flax linen).

Every layer is an exact quadrature of its defining integral (up to the band-limit):

* :class:`S2Conv` (S2 -> SO(3)):  ``out(R) = sum_j w_j f(R x_j) + bias`` for filter points
  ``x_j`` on rings around the north pole (:func:`sphere_jax.grids.s2_near_identity_grid`).
* :class:`SO3Conv` (SO(3) -> SO(3)): ``out(R) = sum_j w_j F(R Q_j) + bias`` for filter
  rotations ``Q_j`` near the identity (:func:`sphere_jax.grids.so3_near_identity_grid`).
* :class:`SO3ToS2` (SO(3) -> S2, the study's layer): the SO(3) correlation's coefficients
  ``H_lmk = sum_n F_lmn Psi_lkn``, summed over the kernel's index ``k``, give S2 coefficients
  ``h_lm = sqrt(4 pi / (2l+1)) (2l+1)/(8 pi^2) sum_k H_lmk``; the real part of ``h`` is returned.
  Summing over the second index of each block commutes with the rotation acting on the first,
  so the layer is equivariant (and so is its real part).
* :func:`so3_integrate` (SO(3) -> invariant): Haar mean over the grid.

The spectral filter is never stored: weights live on the near-identity grid (real, drawn
U(-1, 1) as in the reference, times ``sqrt(6 / (|grid| C_in))``) and are mapped to Wigner space each call with the d-matrices of
the grid's rings (an FFT over the grid's azimuths and gammas, then a small contraction over
rings), which costs far less than the reference's dense (grid x lmn) matrix product.

Weight scale: because each layer here is the exact quadrature ``sum_j w_j f(R x_j)``, the
He-style factor ``sqrt(6 / fan_in)`` keeps activations at unit scale through ReLU stacks
(checked: input std 0.29 -> output std 0.32 through the 8-layer segmenter). The reference's
``1/sqrt(|grid| C_in b_out^4 / b_in^2)`` (S2) and ``b_out^3 / b_in^3`` (SO(3)) factors
compensate the normalisation of its own FFTs, which ours do not have; with them our
8-layer network's output would shrink ~1000x at init.

Shapes (channels last): S2 signals ``[B, 2L, 2L-1, C]``, SO(3) signals
``[B, 2L-1, 2L, 2L-1, C]`` (``[batch, gamma, beta, alpha, channel]``, N = L). With
``layout="gamma_first"`` the layers' SO(3) signals (S2Conv's output, SO3Conv's input and output,
SO3ToS2's input) are ``[2L-1, 2L-1, B, C, 2L]`` (``[gamma, alpha, batch, channel, beta]``) instead: fewer layout copies; the S2CNN models
use it with the ``"dft"`` transforms, see :func:`sphere_jax.harmonics.so3_layout`. Every
``__call__`` takes the model's ``tables`` (see :func:`sphere_jax.harmonics.build_tables`).
"""
from __future__ import annotations

import os
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax import grids, harmonics as hm

# l-buckets for the SO(3) block products: blocks of nearby degrees are padded to the largest
# in the bucket, so the products cost ~1.3x the triangular minimum in a handful of einsums.
_BUCKET = 6


def bucket_size() -> int:
    """Degrees per block of the SO(3) layers' block products (:data:`_BUCKET`, 6, by default).
    Larger blocks cost more FLOPs (one block for all degrees: about 3x the triangular minimum)
    but fewer slices, pads and concatenations, which a GPU profile of the 204k segmenter put at
    about 10 ms of its 64 ms step (results/gpu/README.md). Set by ``SPHERE_JAX_SO3_BUCKET`` (a
    positive integer); read when a model is traced. The numbers do not depend on it."""
    v = os.environ.get("SPHERE_JAX_SO3_BUCKET", str(_BUCKET))
    try:
        b = int(v)
    except ValueError:
        b = 0
    if b < 1:
        raise ValueError(f"SPHERE_JAX_SO3_BUCKET={v!r}; need a positive integer")
    return b


_SO3_COEFFS = ("full", "half")


def so3_coeffs() -> str:
    """How the gamma-first SO3Convs' block products read their input coefficients
    (``SPHERE_JAX_SO3_COEFFS``; read when a model is traced; the numbers do not depend on it):

    - ``"full"``: build the coefficients of all orders ``n`` from the half ones (a concatenation
      of flipped copies, :func:`sphere_jax.harmonics.so3_half_to_full_gf`), then one product
      per degree block;
    - ``"half"``: read the half coefficients ``n >= 0`` as they are; the orders ``n < 0`` are a
      second product over the same array, read at ``-m`` afterwards (see
      :meth:`SO3Conv._half_block`). Same FLOPs, no concatenation: on an H200 that concatenation
      and its backward took about 3 ms of the 204k segmenter's 64 ms step."""
    v = os.environ.get("SPHERE_JAX_SO3_COEFFS", "full")
    if v not in _SO3_COEFFS:
        raise ValueError(f"SPHERE_JAX_SO3_COEFFS={v!r}; expected one of {_SO3_COEFFS}")
    return v


def numerics() -> dict:
    """The settings, read from the environment when a model is traced, that choose how the S2CNN
    layers compute (not what: every one gives the same numbers up to rounding): ``transforms``,
    ``so3_layout``, ``grid_dtype``, ``coeff_dtype``, ``boundary``
    (:mod:`sphere_jax.harmonics`), ``so3_bucket`` and ``so3_coeffs`` (this module). Runs record
    them, since the bfloat16 settings round what a model learns from."""
    return {"transforms": hm.transforms(), "so3_layout": hm.so3_layout(), "grid_dtype": str(hm.grid_dtype()),
            "coeff_dtype": str(hm.coeff_dtype()), "boundary": hm.boundary(), "so3_bucket": bucket_size(),
            "so3_coeffs": so3_coeffs()}


def _uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


def _pad_centre(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Pad (or crop) a centred ``2l-1``-long m/n axis to ``size`` symmetrically."""
    cur = x.shape[axis]
    if cur == size:
        return x
    if cur > size:
        start = (cur - size) // 2
        return jax.lax.slice_in_dim(x, start, start + size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = ((size - cur) // 2, (size - cur) // 2)
    return jnp.pad(x, pad)


def _grid_out(coeffs: jax.Array, L_out: int, Lc: int, tables, b: jax.Array):
    """Half coefficients ``[Lc, 2Lc-1, 2, B, C, Lc]`` -> the gamma-first output grid plus bias,
    ``[2L-1, 2L-1, B, C, 2L]`` (``L = L_out``), or under ``SPHERE_JAX_BOUNDARY=pallas`` the same
    grid as a :class:`sphere_jax.harmonics.PendingGrid` that the next layer consumes unwritten.

    The bias goes in through the coefficient ``n = m = l = 0`` (real part), whose basis function
    is the constant ``1 / (8 pi^2)``: the grid comes out of the inverse transform with the bias
    in it, and the bias gradient is a slice of the coefficients' gradient. Adding it to the grid
    instead costs a pass over the grid, and its gradient a reduction over the whole grid: on an
    H200 the ReLU's backward and that reduction ran as one fusion at 1.4 TB/s, 7.1 ms of the
    204k's 64 ms step (``results/gpu/README.md``). It also keeps the bias in float32 with
    bfloat16 grids."""
    table = hm.lookup(tables, hm.so3_gf_key(L_out, False, Lc))
    if hm.boundary() == "pallas":
        B, C = coeffs.shape[3:5]
        K = 2 * L_out - 1
        return hm.PendingGrid(hm.so3_inverse_gf(coeffs, table, jnp.float32, pending=True), b, (K, K, B, C, 2 * L_out))
    return hm.so3_inverse_gf(_add_constant_coefficient(coeffs, b), table, hm.grid_dtype())


@jax.custom_vjp
def _add_constant_coefficient(coeffs: jax.Array, b: jax.Array) -> jax.Array:
    """``coeffs [N, 2M-1, 2, B, C, L]`` (half, gamma first) plus ``8 pi^2 b`` at ``n = m = l = 0``
    (real part), for every batch element: the coefficients of the signal plus the constant ``b``
    per channel. An elementwise add that XLA fuses with whatever writes ``coeffs`` (an indexed
    update made two extra copies of the coefficients), and whose ``b`` gradient is a slice."""
    N, M, _, _, C, L = coeffs.shape
    onehot = np.zeros((N, M, 2, 1, 1, L), np.float32)
    onehot[0, (M - 1) // 2, 0, 0, 0, 0] = 8 * np.pi**2
    return coeffs + jnp.asarray(onehot, coeffs.dtype) * b.astype(coeffs.dtype)[:, None]


def _add_constant_fwd(coeffs, b):
    return _add_constant_coefficient(coeffs, b), b


def _add_constant_bwd(b, g):
    M = g.shape[1]
    return g, (8 * np.pi**2 * jnp.sum(g[0, (M - 1) // 2, 0, :, :, 0], axis=0, dtype=jnp.float32)).astype(b.dtype)


_add_constant_coefficient.defvjp(_add_constant_fwd, _add_constant_bwd)


def _pad_end(x: jax.Array, axis: int, size: int) -> jax.Array:
    cur = x.shape[axis]
    if cur >= size:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - cur)
    return jnp.pad(x, pad)


def _buckets(Lc: int) -> list[tuple[int, int]]:
    edges = list(range(0, Lc, bucket_size())) + [Lc]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _check_layout(name, layout):
    if layout not in hm.SO3_LAYOUTS:
        raise ValueError(f"{name} layout must be one of {hm.SO3_LAYOUTS}, got {layout!r}")
    if layout == "gamma_first" and hm.transforms() != "dft":
        raise ValueError(f"{name}(layout='gamma_first') needs the 'dft' transforms, not {hm.transforms()!r}")


def _complex_as_real(a: jax.Array) -> jax.Array:
    """A complex factor ``a`` as the real ``[2, 2, ...]`` block that multiplies (re, im)-stacked
    operands: ``out[s] = sum_r x[r] A[r, s]`` gives the (re, im) of ``x a``."""
    ar, ai = jnp.real(a), jnp.imag(a)
    return jnp.stack([jnp.stack([ar, ai]), jnp.stack([-ai, ar])])


def _half_orders_as_real(psi: jax.Array, axis: int) -> jax.Array:
    """A complex kernel whose ``axis`` holds the orders ``n = -(N-1)..N-1`` -> the real
    ``[2 (re/im of F), 2, 2 (re/im out), ...]`` (``...``: ``psi``'s axes, ``axis`` now
    ``n = 0..N-1``) that multiplies the half coefficients ``F[n >= 0]`` for all orders at once:
    index 0 of the second axis is ``psi[n]``; index 1 is ``(-1)^n psi[-n]`` (zero at ``n = 0``)
    applied to ``conj(F)``, which a real signal's ``F[-n, m] = (-1)^(m+n) conj(F[n, -m])`` turns
    into the orders ``n < 0``, read at ``-m`` (the caller's flip and ``(-1)^m``)."""
    N = (psi.shape[axis] + 1) // 2
    sn = ((-1.0) ** np.arange(N)).astype(np.float32)
    sn[0] = 0.0  # n = 0 is in the first sum only
    shape = [1] * psi.ndim
    shape[axis] = N
    pos = jax.lax.slice_in_dim(psi, N - 1, 2 * N - 1, axis=axis)  # psi[n], n >= 0
    neg = jnp.flip(jax.lax.slice_in_dim(psi, 0, N, axis=axis), axis) * sn.reshape(shape)  # (-1)^n psi[-n]
    conj = np.array([1.0, -1.0], np.float32).reshape((2,) + (1,) * (psi.ndim + 1))  # conj(F): negate its im row
    return jnp.stack([_complex_as_real(pos), conj * _complex_as_real(neg)], axis=1)


def _check_bandlimits(name, L_in, L_out):
    for v in (L_in, L_out):
        if int(v) != v or v < 2:
            raise ValueError(f"{name}: band-limits must be integers >= 2, got L_in={L_in}, L_out={L_out}")


class S2Conv(nn.Module):
    """S2 -> SO(3) correlation with a filter on rings around the north pole.

    Attributes:
      features: output channels.
      L_in, L_out: band-limits of input and output (output can be smaller or larger).
      max_beta: radius of the filter (radians).
      n_alpha, n_beta: azimuths per ring and number of rings (grid of ``n_beta * n_alpha``).

    Input ``[B, 2 L_in, 2 L_in - 1, C_in]``; output ``[B, 2 L_out - 1, 2 L_out, 2 L_out - 1, features]``,
    or with ``layout="gamma_first"`` (``"dft"`` transforms only) ``[2 L_out - 1, 2 L_out - 1, B,
    features, 2 L_out]`` (see :func:`sphere_jax.harmonics.so3_layout`).
    Parameters: ``kernel [n_beta, n_alpha, C_in, features]`` and ``bias [features]``.
    """

    features: int
    L_in: int
    L_out: int
    max_beta: float
    n_alpha: int = 8
    n_beta: int = 3
    layout: str = "channels_last"

    def _grid(self):
        return grids.s2_near_identity_grid(self.max_beta, self.n_alpha, self.n_beta)

    def table_specs(self) -> dict:
        if self.layout == "gamma_first":
            out = hm.so3_gf_spec(self.L_out, False, min(self.L_in, self.L_out))
        else:
            out = hm.table_specs("so3", self.L_out, False)
        return {**hm.table_specs("s2", self.L_in, True), **out}

    @nn.compact
    def __call__(self, x: jax.Array, tables: Mapping[str, jax.Array]) -> jax.Array:
        _check_bandlimits("S2Conv", self.L_in, self.L_out)
        _check_layout("S2Conv", self.layout)
        if x.ndim != 4 or x.shape[1:3] != (2 * self.L_in, 2 * self.L_in - 1):
            raise ValueError(
                f"S2Conv expects [batch, {2 * self.L_in}, {2 * self.L_in - 1}, channels] (L_in={self.L_in}), got {x.shape}"
            )
        c_in = x.shape[-1]
        betas, alphas = self._grid()
        w = self.param("kernel", _uniform, (self.n_beta, self.n_alpha, c_in, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        w = w * np.sqrt(6.0 / (betas.size * alphas.size * c_in))

        Lc = min(self.L_in, self.L_out)
        flm = hm.s2_forward_half(x, hm.lookup(tables, hm.s2_key(self.L_in, True)))[:, :Lc, :Lc]
        flm = hm.s2_half_to_full(flm)  # [B, l, m, C_in], m = -(Lc-1)..Lc-1
        # psi[l, n, c, d] = sum_j w_j conj(Y_ln(x_j)), n >= 0
        Y = hm.sph_harm_real_axis(Lc, betas).astype(np.float32)  # [l, n, b]
        phase = np.exp(-1j * np.outer(np.arange(Lc), alphas)).astype(np.complex64)  # [n, a]
        wn = jnp.einsum("na,bacd->nbcd", phase, w.astype(jnp.complex64))
        psi = jnp.einsum("lnb,nbcd->lncd", Y, wn)
        norm = (8 * np.pi**2 / (2 * np.arange(Lc) + 1)).astype(np.float32)
        psi = jnp.conj(psi) * norm[:, None, None, None]
        if self.layout == "gamma_first":
            # real (re, im)-stacked product straight into the gamma-first coefficient order
            f2 = jnp.stack([jnp.real(flm), jnp.imag(flm)])  # [re/im, B, l, m, C]
            g = jnp.einsum("rblmc,rslncd->nmsbdl", f2, _complex_as_real(psi))  # [n, m, re/im, B, D, l]
            return _grid_out(g.astype(hm.coeff_dtype()), self.L_out, Lc, tables, b)
        g = jnp.einsum("blmc,lncd->bnlmd", flm, psi)
        g = _pad_end(_pad_end(g, 1, self.L_out), 2, self.L_out)
        g = _pad_centre(g, 3, 2 * self.L_out - 1)
        out = hm.so3_inverse_half(g, hm.lookup(tables, hm.so3_key(self.L_out, False)))
        return out + b


def _so3_kernel_G(w: jax.Array, Lc: int, alphas, pre_gammas, k_range) -> jax.Array:
    """``G[k, n, b, c, d] = sum_{a, g} w[b, a, g, c, d] e^{i (k - n) alpha_a} e^{i n gamma_g}``.

    With filter rotations ``Q = (alpha_a, beta_b, gamma_g - alpha_a)``,
    ``conj(D^l_kn(Q)) = e^{i(k-n) alpha_a} d^l_kn(beta_b) e^{i n gamma_g}``, so
    ``Psi_lkn = sum_j w_j conj(D^l_kn(Q_j)) = sum_b d^l_kn(beta_b) G[k, n, b]``.
    ``k`` runs over ``k_range``, ``n`` over ``-(Lc-1)..Lc-1``.
    """
    n = np.arange(-Lc + 1, Lc)
    k = np.asarray(k_range)
    pg = np.exp(1j * np.outer(n, pre_gammas)).astype(np.complex64)  # [n, g]
    pa = np.exp(1j * (k[:, None, None] - n[None, :, None]) * alphas[None, None, :]).astype(np.complex64)  # [k, n, a]
    wg = jnp.einsum("ng,bagcd->nbacd", pg, w.astype(jnp.complex64))
    return jnp.einsum("kna,nbacd->knbcd", pa, wg)


class _SO3Filter(nn.Module):
    """Shared parameters of the SO(3)-input layers (kernel on a near-identity SO(3) grid)."""

    features: int
    L_in: int
    L_out: int
    max_beta: float
    n_alpha: int = 8
    n_beta: int = 3
    n_gamma: int = 8
    max_gamma: float | None = None

    def _grid(self):
        return grids.so3_near_identity_grid(self.max_beta, self.n_alpha, self.n_beta, self.n_gamma, self.max_gamma)

    def _params(self, c_in):
        betas, alphas, pre_gammas = self._grid()
        w = self.param("kernel", _uniform, (self.n_beta, self.n_alpha, self.n_gamma, c_in, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        w = w * np.sqrt(6.0 / (betas.size * alphas.size * pre_gammas.size * c_in))
        return w, b

    def _input_coeffs(self, x, tables):
        _check_bandlimits(type(self).__name__, self.L_in, self.L_out)
        L = self.L_in
        if x.ndim != 5 or x.shape[1:4] != (2 * L - 1, 2 * L, 2 * L - 1):
            raise ValueError(
                f"{type(self).__name__} expects [batch, {2 * L - 1}, {2 * L}, {2 * L - 1}, channels] "
                f"(L_in={L}), got {x.shape}"
            )
        Lc = min(self.L_in, self.L_out)
        F = hm.so3_forward(x, hm.lookup(tables, hm.so3_key(L, True)))  # [B, n, l, m, C]
        F = F[:, L - Lc : L + Lc - 1, :Lc, L - Lc : L + Lc - 1]
        return F, Lc

    def _input_coeffs_gf(self, x, tables, full: bool = True):
        """Gamma-first input ``[2L-1, 2L-1, B, C, 2L]`` -> coefficients ``[2Lc-1 (n), 2Lc-1 (m),
        2 (re/im), B, C, Lc (l)]`` truncated to ``Lc = min(L_in, L_out)`` (computed band-limited);
        with ``full=False`` the half ``n >= 0`` only, ``[Lc, 2Lc-1, 2, B, C, Lc]``; in the
        dtype of :func:`sphere_jax.harmonics.coeff_dtype`."""
        name = type(self).__name__
        _check_bandlimits(name, self.L_in, self.L_out)
        L = self.L_in
        if x.ndim != 5 or x.shape[:2] != (2 * L - 1, 2 * L - 1) or x.shape[4] != 2 * L:
            raise ValueError(
                f"{name} (gamma first) expects [{2 * L - 1}, {2 * L - 1}, batch, channels, {2 * L}] (L_in={L}), got {x.shape}"
            )
        Lc = min(self.L_in, self.L_out)
        F = hm.so3_forward_gf(x, hm.lookup(tables, hm.so3_gf_key(L, True, Lc)), hm.coeff_dtype())
        return (hm.so3_half_to_full_gf(F) if full else F), Lc

    def _specs(self, out_kind: str) -> dict:
        """Tables: SO(3) forward at ``L_in``, the output transform, the rings' d-matrices."""
        return {
            **hm.table_specs("so3", self.L_in, True),
            **hm.table_specs(out_kind, self.L_out, False),
            **hm.kernel_d_spec(min(self.L_in, self.L_out), self._grid()[0]),
        }

    def _kernel(self, c_in, Lc, tables, k_range):
        """Bias, the rings' d-matrices ``[l, k, n, b]`` and the kernel's ``G [k, n, b, C_in, C_out]``."""
        w, b = self._params(c_in)
        betas, alphas, pre_gammas = self._grid()
        dk = hm.lookup(tables, hm.kernel_d_key(Lc, betas))
        return b, dk, _so3_kernel_G(w, Lc, alphas, pre_gammas, k_range)

    def _prepare(self, x, tables, k_range):
        """Input coefficients ``F [B, n, l, m, C_in]`` (truncated to ``Lc``) and :meth:`_kernel`."""
        F, Lc = self._input_coeffs(x, tables)
        b, dk, G = self._kernel(x.shape[-1], Lc, tables, k_range(Lc))
        return F, Lc, b, dk, G


class SO3Conv(_SO3Filter):
    """SO(3) -> SO(3) group correlation ``out(R) = sum_j w_j F(R Q_j) + bias``.

    Input ``[B, 2 L_in - 1, 2 L_in, 2 L_in - 1, C_in]``; output
    ``[B, 2 L_out - 1, 2 L_out, 2 L_out - 1, features]``. With ``layout="gamma_first"`` (``"dft"``
    transforms only) input and output are ``[2L - 1, B, C, 2L, 2L - 1]`` instead (see
    :func:`sphere_jax.harmonics.so3_layout`): the same numbers with fewer layout copies.
    Parameters: ``kernel [n_beta, n_alpha, n_gamma, C_in, features]`` and ``bias [features]``.
    """

    layout: str = "channels_last"

    def table_specs(self) -> dict:
        if self.layout == "gamma_first":
            Lc = min(self.L_in, self.L_out)
            return {
                **hm.so3_gf_spec(self.L_in, True, Lc),
                **hm.so3_gf_spec(self.L_out, False, Lc),
                **hm.kernel_d_spec(Lc, self._grid()[0]),
            }
        return self._specs("so3")

    @nn.compact
    def __call__(self, x: jax.Array, tables: Mapping[str, jax.Array]) -> jax.Array:
        _check_layout("SO3Conv", self.layout)
        if self.layout == "gamma_first":
            return self._call_gamma_first(x, tables)
        F, Lc, b, dk, G = self._prepare(x, tables, lambda Lc: np.arange(Lc))  # G: k >= 0
        blocks = []
        for l0, l1 in _buckets(Lc):
            s = slice(Lc - l1, Lc + l1 - 1)  # |n|, |m| < l1
            d_b = dk[l0:l1, Lc - 1 : Lc - 1 + l1, s]  # [l, k, n, b]
            psi = jnp.einsum("lknb,knbcd->lkncd", d_b, G[:l1, s])
            Hb = jnp.einsum("bnlmc,lkncd->bklmd", F[:, s, l0:l1, s], psi)  # H[k, l, m]
            Hb = _pad_centre(_pad_end(Hb, 1, Lc), 3, 2 * Lc - 1)
            blocks.append(Hb)
        H = jnp.concatenate(blocks, axis=2)  # [B, k, l, m, D]
        H = _pad_end(_pad_end(H, 1, self.L_out), 2, self.L_out)
        H = _pad_centre(H, 3, 2 * self.L_out - 1)
        out = hm.so3_inverse_half(H, hm.lookup(tables, hm.so3_key(self.L_out, False)))
        return out + b

    def _call_gamma_first(self, x, tables):
        """The same layer on gamma-first signals ``[2L-1, 2L-1, B, C, 2L]``: band-limited
        transforms (only the degrees ``< min(L_in, L_out)`` that the layer keeps) and the block
        products on real (re, im)-stacked operands."""
        half = so3_coeffs() == "half"
        # [n, m, re/im, B, C, l], |m| < Lc, and |n| < Lc (full) or 0 <= n < Lc (half)
        F, Lc = self._input_coeffs_gf(x, tables, full=not half)
        b, dk, G = self._kernel(x.shape[3], Lc, tables, np.arange(Lc))  # G: k >= 0
        buckets = _buckets(Lc)
        # split the degrees first: the gradient then concatenates the buckets' pieces instead of
        # adding one zero-padded copy of F per bucket
        pieces = jnp.split(F, [l0 for l0, _ in buckets[1:]], axis=5)
        blocks = []
        for (l0, l1), Fb in zip(buckets, pieces):
            s = slice(Lc - l1, Lc + l1 - 1)  # |n|, |m| < l1
            psi = jnp.einsum("lknb,knbcd->lkncd", dk[l0:l1, Lc - 1 : Lc - 1 + l1, s], G[:l1, s])
            if half:
                Hb = self._half_block(Fb[:l1, s], psi, l1)
            else:
                psi2 = _complex_as_real(psi).astype(F.dtype)  # [re/im of F, re/im of H, l, k, n, c, d]
                Hb = jnp.einsum("nmrbcl,rslkncd->kmsbdl", Fb[s, s], psi2, preferred_element_type=F.dtype)
            blocks.append(_pad_centre(_pad_end(Hb, 0, Lc), 1, 2 * Lc - 1))
        H = jnp.concatenate(blocks, axis=5)  # [k, m, re/im, B, D, l]
        return _grid_out(H, self.L_out, Lc, tables, b)

    @staticmethod
    def _half_block(F: jax.Array, psi: jax.Array, l1: int) -> jax.Array:
        """One degree block's ``H[k, m, l] = sum_n F[n, m, l] psi[l, k, n]`` over all orders
        ``|n| < l1``, from the half coefficients ``F [l1 (n >= 0), 2 l1 - 1 (m), 2, B, C, l]`` and
        the complex ``psi [l, l1 (k >= 0), 2 l1 - 1 (n), C, D]`` -> ``[l1 (k), 2 l1 - 1 (m), 2
        (re/im), B, D, l]``, as the full product gives it.

        A real signal has ``F[-n, m] = (-1)^(m+n) conj(F[n, -m])``, so the orders ``n < 0`` add
        ``(-1)^m sum_{n >= 1} conj(F[n, -m]) (-1)^n psi[-n]``. Both sums read the half
        coefficients as they are, in one product against the two stacked kernels, and the
        second is read at ``-m`` afterwards (a flip of its output along ``m``). The FLOPs are
        those of the full product (``2 l1`` orders against ``2 l1 - 1``)."""
        A = _half_orders_as_real(psi, axis=2).astype(F.dtype)  # [re/im in, 2, re/im out, l, k, n >= 0, c, d]
        o = jnp.einsum("nmrbcl,rwslkncd->wkmsbdl", F, A, preferred_element_type=F.dtype)  # [2, k, m, re/im, B, D, l]
        sm = jnp.asarray((-1.0) ** np.abs(np.arange(-l1 + 1, l1)), F.dtype)[:, None, None, None, None]
        return o[0] + sm * jnp.flip(o[1], axis=1)


class SO3ToS2(_SO3Filter):
    """SO(3) -> S2 layer of the study (block products, sum over the kernel index, inverse S2).

    Input ``[B, 2 L_in - 1, 2 L_in, 2 L_in - 1, C_in]``, or with ``layout="gamma_first"``
    (``"dft"`` transforms only) ``[2 L_in - 1, 2 L_in - 1, B, C_in, 2 L_in]``; output
    ``[B, 2 L_out, 2 L_out - 1, features]``. Parameters as :class:`SO3Conv`.
    """

    layout: str = "channels_last"

    def table_specs(self) -> dict:
        if self.layout == "gamma_first":
            Lc = min(self.L_in, self.L_out)
            return {
                **hm.so3_gf_spec(self.L_in, True, Lc),
                **hm.table_specs("s2", self.L_out, False),
                **hm.kernel_d_spec(Lc, self._grid()[0]),
            }
        return self._specs("s2")

    @nn.compact
    def __call__(self, x: jax.Array, tables: Mapping[str, jax.Array]) -> jax.Array:
        _check_layout("SO3ToS2", self.layout)
        gf = self.layout == "gamma_first"
        k_all = np.arange(-min(self.L_in, self.L_out) + 1, min(self.L_in, self.L_out))  # G: all k
        if gf:
            F, Lc = self._input_coeffs_gf(x, tables, full=False)  # [n >= 0, m, re/im, B, C, l]
            b, dk, G = self._kernel(x.shape[3], Lc, tables, k_all)
        else:
            F, Lc, b, dk, G = self._prepare(x, tables, lambda Lc: k_all)
        kappa = jnp.einsum("lknb,knbcd->lncd", dk, G)  # sum_k Psi_lkn
        # real part of the output <=> kappa_ln -> (kappa_ln + (-1)^n conj(kappa_l,-n)) / 2
        sign = ((-1.0) ** np.abs(np.arange(-Lc + 1, Lc))).astype(np.float32)
        kappa = 0.5 * (kappa + sign[None, :, None, None] * jnp.conj(jnp.flip(kappa, axis=1)))
        l = np.arange(Lc)
        norm = (np.sqrt(4 * np.pi / (2 * l + 1)) * (2 * l + 1) / (8 * np.pi**2)).astype(np.float32)
        kappa = kappa * norm[:, None, None, None]
        if gf:  # (re, im)-stacked product; the band-limited inverse needs no padding
            h = self._half_product(F, kappa, Lc)
            out = hm.s2_inverse_half(jax.lax.complex(h[0], h[1]), hm.lookup(tables, hm.s2_key(self.L_out, False)))
            return out + b
        h = jnp.einsum("bnlmc,lncd->blmd", F[:, :, :, Lc - 1 :], kappa)
        h = _pad_end(_pad_end(h, 1, self.L_out), 2, self.L_out)  # [B, l, m >= 0, D]
        out = hm.s2_inverse_half(h, hm.lookup(tables, hm.s2_key(self.L_out, False)))
        return out + b

    @staticmethod
    def _half_product(F: jax.Array, kappa: jax.Array, Lc: int) -> jax.Array:
        """``h[l, m] = sum_n F[n, m, l] kappa[l, n]`` over all ``n`` for ``m >= 0``, from the half
        coefficients ``F [Lc (n >= 0), 2Lc-1 (m), 2, B, C, Lc]`` and ``kappa [l, 2Lc-1 (n), C, D]``
        (complex) -> ``[2 (re/im), B, Lc (l), Lc (m >= 0), D]``.

        A real signal has ``F[-n, m] = (-1)^(m+n) conj(F[n, -m])``, so the orders ``n < 0`` add
        ``(-1)^m sum_{n >= 1} conj(F[n, -m]) (-1)^n kappa[-n]``: both sums run over the half
        coefficients as they are, all ``m``, in one product, and the second is read at ``-m``
        afterwards (a flip of the small output). Building the full coefficients instead (a
        concatenation of flipped copies) took 2.9 ms of the 204k's 64 ms H200 step at 565 GB/s.
        The product costs twice the FLOPs of the full one; it is the layer's smallest part."""
        A = _half_orders_as_real(kappa, axis=1).astype(F.dtype)  # [re/im in, 2, re/im out, l, n >= 0, C, D]
        o = jnp.einsum("nmrbcl,rwslncd->wsblmd", F, A, preferred_element_type=jnp.float32)  # [2, re/im, B, l, m, D]
        sm = ((-1.0) ** np.arange(Lc)).astype(np.float32)[:, None]
        return o[0, :, :, :, Lc - 1 :] + sm * o[1, :, :, :, Lc - 1 :: -1]


def rms_normalize(x: jax.Array, target: float = 1.0, eps: float = 1e-6) -> jax.Array:
    """Scale each sample to root-mean-square ``target`` over the sphere (area-weighted, all channels).

    ``[B, 2L, 2L-1, C] -> [B, 2L, 2L-1, C]``. The factor is a rotation-invariant scalar per
    sample, so equivariance is kept, and the network sees signals of one scale whatever the
    data's range (``[0, 1]`` here, ``0..255`` in the reference). An all-zero sample stays zero.
    """
    L = x.shape[1] // 2
    w = grids.dh_quadrature_weights(L).astype(np.float32)
    w = w / (w.sum() * x.shape[2] * x.shape[3])
    ms = jnp.einsum("btpc,t->b", x * x, w)
    return x * (target * jax.lax.rsqrt(ms + eps * eps))[:, None, None, None]


def so3_integrate(x: jax.Array, layout: str = "channels_last") -> jax.Array:
    """Haar mean over SO(3): ``[B, 2N-1, 2L, 2L-1, C]`` (or, ``layout="gamma_first"``,
    ``[2N-1, 2L-1, B, C, 2L]``) -> ``[B, C]`` (rotation invariant)."""
    gf = layout == "gamma_first"
    if isinstance(x, hm.PendingGrid):
        x = x.materialize()
    K, P, T = (x.shape[0], x.shape[1], x.shape[4]) if gf else (x.shape[1], x.shape[3], x.shape[2])
    w = grids.dh_quadrature_weights(T // 2).astype(np.float32)
    w = w / (w.sum() * P * K)
    return jnp.einsum("kpbct,t->bc" if gf else "bktpc,t->bc", x, w)
