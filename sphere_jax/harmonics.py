"""Batched S2 and SO(3) harmonic transforms on s2fft's ``"dh"`` grid, channels last.

The transform tables follow s2fft's precompute path exactly (they are pinned against
``s2fft.precompute_transforms.construct`` in the tests) but are built here in numpy from
Wigner d-matrices, which takes about 2 s at ``L = 42`` instead of s2fft's 15-20 s of tracing,
and they are cached per ``(L, N)``. They are plain arrays: build them once, outside ``jit``,
and pass them in (see :func:`build_tables`).

Conventions (s2fft's):

* S2 signal ``f [B, 2L, 2L-1, C]`` (``[batch, theta, phi, channel]``), real.
  Coefficients ``flm [B, L, 2L-1, C]``, ``flm[:, l, L-1+m]``; ``f = sum flm Y_lm`` with
  orthonormal, Condon-Shortley ``Y_lm`` (``scipy.special.sph_harm_y``).
* SO(3) signal ``f [B, 2N-1, 2L, 2L-1, C]`` (``[batch, gamma, beta, alpha, channel]``), real.
  Coefficients ``flmn [B, 2N-1, L, 2L-1, C]``, ``flmn[:, N-1+n, l, L-1+m]``;
  ``f(R) = sum (2l+1)/(8 pi^2) flmn conj(D^l_mn(R))`` with
  ``D^l_mn(alpha, beta, gamma) = exp(-i m alpha) d^l_mn(beta) exp(-i n gamma)``.
* Gamma-first SO(3) signals ``[2N-1, 2L-1, B, C, 2L]`` (``[gamma, alpha, batch, channel, beta]``)
  and their coefficients ``[N, 2L-1, 2, B, C, L]`` (``[n >= 0, L-1+m, re/im, batch, channel, l]``)
  are what S2CNN models carry between their layers with the ``"dft"`` transforms
  (:func:`so3_layout`, :func:`so3_forward_gf`, :func:`so3_inverse_gf`): fewer layout copies.
* Real signals have ``flm[l, -m] = (-1)^m conj(flm[l, m])`` and
  ``flmn[-n, l, -m] = (-1)^(m+n) conj(flmn[n, l, m])``; the "half" forms keep ``n >= 0`` only,
  ``[B, N, L, 2L-1, C]`` indexed ``[:, n, l, L-1+m]``.
"""
from __future__ import annotations

import functools
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax import grids


# ---------------------------------------------------------------------------------------
# Wigner d-matrices (numpy, float64)


@functools.lru_cache(maxsize=64)
def _jy_eig(l: int) -> tuple[np.ndarray, np.ndarray]:
    m = np.arange(-l, l + 1)
    jp = np.diag(np.sqrt(l * (l + 1) - m[:-1] * (m[:-1] + 1.0)), k=-1)  # <m+1|J+|m>
    jy = (jp - jp.T) / 2j
    return np.linalg.eigh(jy)


def wigner_d(L: int, betas) -> np.ndarray:
    """Reduced Wigner matrices ``d^l_mn(beta)`` (Wigner's convention, ``d^1_10 = -sin(b)/sqrt 2``).

    Args:
      L: band-limit; degrees ``l = 0..L-1``.
      betas: ``[nb]`` angles.

    Returns:
      float64 ``[L, 2L-1, 2L-1, nb]`` indexed ``[l, L-1+m, L-1+n, b]``, zero where
      ``|m| > l`` or ``|n| > l``.
    """
    betas = np.atleast_1d(np.asarray(betas, dtype=np.float64))
    out = np.zeros((L, 2 * L - 1, 2 * L - 1, betas.size))
    for l in range(L):
        # d(beta) = Re(V diag(e^{-i beta mu}) V^H) = sum_k Re(P_k) cos(mu_k beta) + Im(P_k) sin(mu_k beta)
        # with P_k = V_k V_k^H: one real matrix product for all betas.
        mu, V = _jy_eig(l)
        n = 2 * l + 1
        P = V.T[:, :, None] * V.conj().T[:, None, :]  # [k, i, j]
        basis = np.concatenate([P.real, P.imag]).reshape(2 * n, n * n)
        trig = np.concatenate([np.cos(np.outer(mu, betas)), np.sin(np.outer(mu, betas))])
        out[l, L - 1 - l : L + l, L - 1 - l : L + l] = (basis.T @ trig).reshape(n, n, -1)
    return out


def sph_harm_real_axis(L: int, betas) -> np.ndarray:
    """``Y_lm(beta, 0)`` for ``m >= 0``: float64 ``[L, L, nb]`` indexed ``[l, m, b]`` (zero for m > l).

    Uses ``Y_lm(beta, 0) = sqrt((2l+1)/(4 pi)) d^l_{m0}(beta)``, which reproduces s2fft and
    ``scipy.special.sph_harm_y`` (pinned by the tests).
    """
    d = wigner_d(L, betas)  # [l, m, n, b]
    l = np.arange(L)[:, None, None]
    return np.sqrt((2 * l + 1) / (4 * np.pi)) * d[:, L - 1 :, L - 1, :]


# ---------------------------------------------------------------------------------------
# Transform tables


@functools.lru_cache(maxsize=None)
def s2_table(L: int, forward: bool) -> np.ndarray:
    """S2 transform table, float32 ``[2L, L, L]`` indexed ``[theta, l, m >= 0]``.

    Inverse: ``Y_lm(theta_t, 0)``; forward: the same times the dh quadrature weight of ``theta_t``.
    """
    Y = sph_harm_real_axis(L, grids.thetas(L)).transpose(2, 0, 1)  # [t, l, m]
    if forward:
        Y = Y * grids.dh_quadrature_weights(L)[:, None, None]
    return Y.astype(np.float32)


@functools.lru_cache(maxsize=None)
def so3_table(L: int, N: int, forward: bool) -> np.ndarray:
    """Wigner transform table, float32 ``[N, 2L, L, 2L-1]`` indexed ``[n >= 0, beta, l, L-1+m]``.

    Inverse: ``(2l+1)/(8 pi^2) d^l_mn(beta_t)``; forward: ``d^l_mn(beta_t)`` times the dh
    quadrature weight of ``beta_t`` and the gamma step ``2 pi / (2N-1)``.
    """
    if N > L:
        raise ValueError(f"azimuthal band-limit N={N} must not exceed L={L}")
    d = wigner_d(L, grids.thetas(L))  # [l, m, n, t]
    k = d[:, :, L - 1 : L - 1 + N, :].transpose(2, 3, 0, 1)  # [n, t, l, m]
    l = np.arange(L)[None, None, :, None]
    if forward:
        w = grids.dh_quadrature_weights(L)[None, :, None, None]
        k = k * w * (2 * np.pi / (2 * N - 1))
    else:
        k = k * (2 * l + 1) / (8 * np.pi**2)
    return np.ascontiguousarray(k, dtype=np.float32)


TRANSFORMS = ("dft", "fft", "s2fft")
# Per platform; "dft" everywhere since the gamma-first layout (:func:`so3_layout`). Measured on an
# H200 (jax 0.11.2, batch-32 training steps, one window, results/gpu/README.md): the 204k
# segmenter at L=50 64.3 ms with "dft" gamma-first against 108.1 ms channels-last; the Cohen
# classifier 0.71 ms and the deep one 4.60 ms (with "fft": 1.06 and 13.0 ms on an H200 the day
# before). GPUs used "fft" before because XLA's GEMM autotuner found no Triton configuration for
# the channels-last "dft" dots of the classifiers ("Failed to get configs ... No candidates could
# be compiled", dots "ntlm,bntmc->bnlmc" and its transposes); the gamma-first dots compile.
DEFAULT_TRANSFORMS = {"cpu": "dft", "gpu": "dft", "cuda": "dft", "rocm": "dft", "tpu": "dft"}


def transforms() -> str:
    """Which implementation the S2 / SO(3) transforms use, read when tables are specified and
    when a function is traced:

    * ``"dft"``: ours; SO(3) azimuthal sums as real DFT matrix products (the default);
    * ``"fft"``: ours; SO(3) azimuthal sums as complex FFTs;
    * ``"s2fft"``: s2fft's own precompute transforms (``s2fft.precompute_transforms``,
      ``method="jax"``, ``"dh"`` sampling, vmapped over batch and channels) with kernels from
      s2fft's constructors.

    Set by the environment variable ``SPHERE_JAX_TRANSFORMS`` (``SPHERE_JAX_SO3_TRANSFORM`` is
    read too, for older scripts); otherwise :data:`DEFAULT_TRANSFORMS` of the default backend.
    Build tables and apply the model under the same setting.
    """
    m = os.environ.get("SPHERE_JAX_TRANSFORMS") or os.environ.get("SPHERE_JAX_SO3_TRANSFORM")
    if m is None:
        return DEFAULT_TRANSFORMS.get(jax.default_backend(), "dft")
    if m not in TRANSFORMS:
        raise ValueError(f"SPHERE_JAX_TRANSFORMS={m!r}; choose one of {TRANSFORMS}")
    return m


def _prefix() -> str:
    return "s2fft_" if transforms() == "s2fft" else ""


def s2_key(L: int, forward: bool) -> str:
    return f"{_prefix()}s2_{'fwd' if forward else 'inv'}_L{L}"


def so3_key(L: int, forward: bool) -> str:
    return f"{_prefix()}so3_{'fwd' if forward else 'inv'}_L{L}"


def _s2fft_s2_kernel(L: int, forward: bool):
    from s2fft.precompute_transforms import construct

    return np.asarray(construct.spin_spherical_kernel_jax(L, 0, reality=True, sampling="dh", forward=forward), np.float32)


def _s2fft_so3_kernel(L: int, forward: bool):
    from s2fft.precompute_transforms import construct

    return np.asarray(construct.wigner_kernel_jax(L, L, reality=True, sampling="dh", forward=forward), np.float32)


def table_specs(kind: str, L: int, forward: bool) -> dict[str, "callable"]:
    """``{key: builder}`` for one transform table; models merge these into their table specs."""
    s2fft = transforms() == "s2fft"
    if kind == "s2":
        build = _s2fft_s2_kernel if s2fft else s2_table
        return {s2_key(L, forward): functools.partial(build, L, forward)}
    if s2fft:
        return {so3_key(L, forward): functools.partial(_s2fft_so3_kernel, L, forward)}
    return {so3_key(L, forward): functools.partial(so3_table, L, L, forward)}


def kernel_d_key(L: int, betas) -> str:
    return f"kd_L{L}_" + "_".join(f"{b:.8f}" for b in np.atleast_1d(betas))


@functools.lru_cache(maxsize=None)
def _kernel_d(L: int, betas: tuple[float, ...]) -> np.ndarray:
    return wigner_d(L, np.asarray(betas)).astype(np.float32)


def kernel_d_spec(L: int, betas) -> dict[str, "callable"]:
    """Spec of the d-matrices ``[L, 2L-1, 2L-1, nb]`` of a filter grid's rings (see :func:`wigner_d`)."""
    betas = tuple(float(b) for b in np.atleast_1d(betas))
    return {kernel_d_key(L, betas): functools.partial(_kernel_d, L, betas)}


def table_shape(key: str) -> tuple[int, ...]:
    """Shape of the table named ``key`` (see :func:`s2_key`, :func:`so3_key`, :func:`kernel_d_key`),
    without building it."""
    parts = key.removeprefix("s2fft_").split("_")
    if parts[0] == "so3gf":
        L, Lb = int(parts[2][1:]), int(parts[3][1:])
        return (Lb, 2 * Lb - 1, 2 * L, Lb) if parts[1] == "fwd" else (Lb, 2 * Lb - 1, Lb, 2 * L)
    if parts[0] == "kd":
        L = int(parts[1][1:])
        return (L, 2 * L - 1, 2 * L - 1, len(parts) - 2)
    L = int(parts[2][1:])
    if parts[0] == "s2":
        return (2 * L, L, L)
    return (L, 2 * L, L, 2 * L - 1)


def build_tables(specs: Mapping[str, "callable"]) -> dict[str, jax.Array]:
    """Build the constant tables a model needs, once, outside ``jit``.

    Args:
      specs: ``{key: builder}`` as returned by ``model.table_specs()``; builders return numpy
        arrays and are cached per band-limit, so equal tables are built once.

    Returns:
      ``{key: device array}`` to pass to ``model.apply(variables, x, tables)``.
    """
    return {key: jnp.asarray(build()) for key, build in sorted(specs.items())}


# ---------------------------------------------------------------------------------------
# Transforms (jit-able; tables are arguments)


def _check_s2(f, L):
    if f.ndim != 4 or f.shape[1:3] != (2 * L, 2 * L - 1):
        raise ValueError(f"S2 signal must be [batch, {2 * L}, {2 * L - 1}, channels] for L={L}, got {f.shape}")


def _check_so3(f, L, N):
    if f.ndim != 5 or f.shape[1:4] != (2 * N - 1, 2 * L, 2 * L - 1):
        raise ValueError(
            f"SO(3) signal must be [batch, {2 * N - 1}, {2 * L}, {2 * L - 1}, channels] for L={L}, N={N}, got {f.shape}"
        )


def _vmap_bc(fn, x):
    """Apply ``fn`` to every ``x[b, ..., c]`` (channels last in and out)."""
    y = jax.vmap(jax.vmap(fn))(jnp.moveaxis(x, -1, 1))
    return jnp.moveaxis(y, 1, -1)


def _band(L: int, L_band: int | None) -> int:
    """The output band-limit of a truncated transform (``L`` when ``L_band`` is None)."""
    Lb = L if L_band is None else int(L_band)
    if not 1 <= Lb <= L:
        raise ValueError(f"band-limit {Lb} must be in 1..{L}")
    return Lb


def s2_forward_half(f: jax.Array, table: jax.Array, L_band: int | None = None) -> jax.Array:
    """Real S2 signal ``[B, 2L, 2L-1, C]`` -> coefficients ``m >= 0``: ``[B, Lb, Lb, C]`` ``[:, l, m]``
    with ``l, m < Lb`` (``Lb = L_band``, default ``L``): the first ``Lb`` degrees only, computed
    without the others."""
    L = table.shape[1]
    _check_s2(f, L)
    Lb = _band(L, L_band)
    if transforms() == "s2fft":
        from s2fft.precompute_transforms import spherical

        fwd = lambda x: spherical.forward(x, L, 0, table, sampling="dh", reality=True, method="jax")
        return _vmap_bc(fwd, f)[:, :Lb, L - 1 : L - 1 + Lb]
    ftm = jnp.fft.rfft(f, axis=2)[:, :, :Lb]  # [B, t, m>=0, C]
    return jnp.einsum("tlm,btmc->blmc", table[:, :Lb, :Lb].astype(ftm.dtype), ftm)


def s2_inverse_half(flm: jax.Array, table: jax.Array) -> jax.Array:
    """Coefficients ``m >= 0`` ``[B, Lb, Lb, C]`` (any ``Lb <= L``; the degrees ``l >= Lb`` are
    zero) -> real S2 signal ``[B, 2L, 2L-1, C]``."""
    L = table.shape[1]
    Lb = flm.shape[1] if flm.ndim == 4 else -1
    if flm.ndim != 4 or flm.shape[2] != Lb or Lb > L:
        raise ValueError(f"S2 half coefficients must be [batch, Lb, Lb, channels] with Lb <= {L}, got {flm.shape}")
    if transforms() == "s2fft":
        from s2fft.precompute_transforms import spherical

        flm = _pad_to(flm, (L, L), (1, 2))
        inv = lambda c: jnp.real(spherical.inverse(c, L, 0, table, sampling="dh", reality=True, method="jax"))
        return _vmap_bc(inv, s2_half_to_full(flm))
    ftm = jnp.einsum("tlm,blmc->btmc", table[:, :Lb, :Lb].astype(flm.dtype), flm)
    return jnp.fft.irfft(ftm, n=2 * L - 1, axis=2, norm="forward")  # m >= Lb: zero


def _pad_to(x: jax.Array, sizes, axes, centre_axes=()) -> jax.Array:
    """Zero-pad ``x`` at the end of ``axes`` (on both sides of ``centre_axes``) to ``sizes``."""
    pad = [(0, 0)] * x.ndim
    for size, ax in zip(sizes, axes):
        extra = size - x.shape[ax]
        pad[ax] = (extra // 2, extra // 2) if ax in centre_axes else (0, extra)
    return jnp.pad(x, pad)


def s2_half_to_full(flm_half: jax.Array) -> jax.Array:
    """``[B, L, L, C]`` (m >= 0) -> ``[B, L, 2L-1, C]`` using the symmetry of real signals."""
    L = flm_half.shape[2]
    sign = (-1.0) ** np.arange(1, L)
    neg = jnp.conj(flm_half[:, :, 1:]) * sign[None, None, :, None]
    return jnp.concatenate([jnp.flip(neg, axis=2), flm_half], axis=2)


def s2_forward(f: jax.Array, table: jax.Array) -> jax.Array:
    """Real S2 signal ``[B, 2L, 2L-1, C]`` -> ``flm [B, L, 2L-1, C]`` (complex)."""
    return s2_half_to_full(s2_forward_half(f, table))


def s2_inverse(flm: jax.Array, table: jax.Array) -> jax.Array:
    """``flm [B, L, 2L-1, C]`` of a real signal -> ``[B, 2L, 2L-1, C]`` (uses ``m >= 0`` only)."""
    L = table.shape[1]
    return s2_inverse_half(flm[:, :, L - 1 :], table)


@functools.lru_cache(maxsize=None)
def _dft_mats(L: int, N: int) -> tuple[np.ndarray, ...]:
    """Real DFT matrices of the dh SO(3) grid: ``cos/sin(m alpha_p)`` ``[2L-1 (m), 2L-1 (p)]`` and
    ``cos/sin(n gamma_k)`` ``[N (n >= 0), 2N-1 (k)]``, float32.

    The SO(3) transforms use these real matrix products instead of complex FFTs along the
    middle axes: measured 1.1x (L=10) to 1.8x (L=42) faster on CPU, and plain matmuls on GPU.
    """
    m = np.arange(-L + 1, L)
    am = np.outer(m, grids.phis(L))
    n = np.arange(N)
    gn = np.outer(n, grids.gammas(N))
    f32 = lambda a: np.asarray(a, np.float32)
    return f32(np.cos(am)), f32(np.sin(am)), f32(np.cos(gn)), f32(np.sin(gn))


def _so3_method() -> str:
    """The SO(3) transforms' implementation (see :func:`transforms`)."""
    return transforms()


def so3_forward_half(f: jax.Array, table: jax.Array, L_band: int | None = None) -> jax.Array:
    """Real SO(3) signal ``[B, 2N-1, 2L, 2L-1, C]`` -> half coefficients ``[B, Nb, Lb, 2Lb-1, C]``:
    ``n < Nb``, ``l < Lb``, ``|m| < Lb`` with ``Lb = L_band`` (default ``L``) and ``Nb = min(N, Lb)``.
    Truncated, the dft and fft paths compute only the coefficients they return (s2fft's: all, then cut)."""
    N, _, L, _ = table.shape
    _check_so3(f, L, N)
    Lb = _band(L, L_band)
    Nb = min(N, Lb)
    ms = slice(L - Lb, L + Lb - 1)  # |m| < Lb
    if _so3_method() == "s2fft":
        from s2fft.precompute_transforms import wigner

        fwd = lambda x: wigner.forward(x, L, N, table, sampling="dh", reality=True, method="jax")
        return _vmap_bc(fwd, f)[:, N - 1 : N - 1 + Nb, :Lb, ms]
    tab = table[:Nb, :, :Lb, ms]
    if _so3_method() == "fft":
        fban = jnp.fft.rfft(f, axis=1)[:, :Nb]  # gamma -> 0 <= n < Nb
        fban = jnp.fft.fftshift(jnp.fft.fft(fban, axis=3), axes=3)[:, :, :, ms]  # alpha -> |m| < Lb
        return jnp.einsum("ntlm,bntmc->bnlmc", tab.astype(fban.dtype), fban)
    am_c, am_s, gn_c, gn_s = (a[s] for a, s in zip(_dft_mats(L, N), (ms, ms, slice(Nb), slice(Nb))))
    # gamma -> n >= 0: sum_k f e^{-i n gamma_k}
    a_re = jnp.einsum("bktpc,nk->bntpc", f, gn_c)
    a_im = -jnp.einsum("bktpc,nk->bntpc", f, gn_s)
    # alpha -> m: sum_p a e^{-i m alpha_p}
    b_re = jnp.einsum("bntpc,mp->bntmc", a_re, am_c) + jnp.einsum("bntpc,mp->bntmc", a_im, am_s)
    b_im = jnp.einsum("bntpc,mp->bntmc", a_im, am_c) - jnp.einsum("bntpc,mp->bntmc", a_re, am_s)
    # beta -> l with the (real) Wigner table
    re = jnp.einsum("ntlm,bntmc->bnlmc", tab, b_re)
    im = jnp.einsum("ntlm,bntmc->bnlmc", tab, b_im)
    return jax.lax.complex(re, im)


def so3_half_to_full(flmn_half: jax.Array) -> jax.Array:
    """``[B, N, L, 2L-1, C]`` (n >= 0) -> ``[B, 2N-1, L, 2L-1, C]`` for a real signal."""
    N, L = flmn_half.shape[1], flmn_half.shape[2]
    sm = (-1.0) ** np.abs(np.arange(-L + 1, L))
    sn = (-1.0) ** np.arange(1, N)
    neg = jnp.conj(jnp.flip(flmn_half[:, 1:], axis=(1, 3)))  # rows n = N-1 .. 1 -> -n
    neg = neg * sm[None, None, None, :, None] * sn[::-1][None, :, None, None, None]
    return jnp.concatenate([neg, flmn_half], axis=1)


def so3_forward(f: jax.Array, table: jax.Array, L_band: int | None = None) -> jax.Array:
    """Real SO(3) signal ``[B, 2N-1, 2L, 2L-1, C]`` -> ``flmn [B, 2N-1, L, 2L-1, C]`` (with
    ``L_band``: ``[B, 2Nb-1, Lb, 2Lb-1, C]``, see :func:`so3_forward_half`)."""
    return so3_half_to_full(so3_forward_half(f, table, L_band))


def so3_inverse_half(flmn_half: jax.Array, table: jax.Array) -> jax.Array:
    """Half coefficients ``[B, Nb, Lb, 2Lb-1, C]`` of a real signal (any ``Nb <= N``, ``Lb <= L``;
    the coefficients outside are zero) -> ``[B, 2N-1, 2L, 2L-1, C]``. On the dft path a band-limited
    input costs only its own coefficients (fft and s2fft zero-pad it first)."""
    N, _, L, _ = table.shape
    if flmn_half.ndim != 5:
        raise ValueError(f"SO(3) half coefficients must be [batch, Nb, Lb, 2 Lb - 1, channels], got {flmn_half.shape}")
    Nb, Lb = flmn_half.shape[1], flmn_half.shape[2]
    if flmn_half.shape[3] != 2 * Lb - 1 or Nb > N or Lb > L:
        raise ValueError(
            f"SO(3) half coefficients must be [batch, Nb <= {N}, Lb <= {L}, 2 Lb - 1, channels], got {flmn_half.shape}"
        )
    ms = slice(L - Lb, L + Lb - 1)
    if _so3_method() in ("s2fft", "fft") and (Nb, Lb) != (N, L):
        flmn_half = _pad_to(flmn_half, (N, L, 2 * L - 1), (1, 2, 3), centre_axes=(3,))
        Nb, Lb, ms = N, L, slice(None)
    if _so3_method() == "s2fft":
        from s2fft.precompute_transforms import wigner

        inv = lambda c: jnp.real(wigner.inverse(c, L, N, table, sampling="dh", reality=True, method="jax"))
        return _vmap_bc(inv, so3_half_to_full(flmn_half))
    if _so3_method() == "fft":
        fnab = jnp.einsum("ntlm,bnlmc->bntmc", table.astype(flmn_half.dtype), flmn_half)
        fnab = jnp.fft.ifft(jnp.fft.ifftshift(fnab, axes=3), axis=3, norm="forward")  # m -> alpha
        return jnp.fft.irfft(fnab, n=2 * N - 1, axis=1, norm="forward")  # n -> gamma
    am_c, am_s, gn_c, gn_s = (a[s] for a, s in zip(_dft_mats(L, N), (ms, ms, slice(Nb), slice(Nb))))
    tab = table[:Nb, :, :Lb, ms]
    w = np.where(np.arange(Nb) == 0, 1.0, 2.0).astype(np.float32)[:, None]  # n and -n together
    re = jnp.einsum("ntlm,bnlmc->bntmc", tab, jnp.real(flmn_half))
    im = jnp.einsum("ntlm,bnlmc->bntmc", tab, jnp.imag(flmn_half))
    # m -> alpha: sum_m x e^{i m alpha_p}
    h_re = jnp.einsum("bntmc,mp->bntpc", re, am_c) - jnp.einsum("bntmc,mp->bntpc", im, am_s)
    h_im = jnp.einsum("bntmc,mp->bntpc", re, am_s) + jnp.einsum("bntmc,mp->bntpc", im, am_c)
    # n >= 0 -> gamma: Re sum_n w_n h e^{i n gamma_k}
    return jnp.einsum("bntpc,nk->bktpc", h_re, w * gn_c) - jnp.einsum("bntpc,nk->bktpc", h_im, w * gn_s)


def so3_inverse(flmn: jax.Array, table: jax.Array) -> jax.Array:
    """``flmn [B, 2N-1, L, 2L-1, C]`` of a real signal -> ``[B, 2N-1, 2L, 2L-1, C]``."""
    N = table.shape[0]
    return so3_inverse_half(flmn[:, N - 1 :], table)


# ---------------------------------------------------------------------------------------
# The gamma-first layout of SO(3) signals (fewer layout copies)

SO3_LAYOUTS = ("channels_last", "gamma_first")


def so3_layout() -> str:
    """How S2CNN models carry SO(3) signals between their layers (S2Conv to SO3ToS2 or the Haar mean):

    * ``"channels_last"``: ``[B, 2N-1, 2L, 2L-1, C]`` (``[batch, gamma, beta, alpha, channel]``),
      the layers' public layout;
    * ``"gamma_first"``: ``[2N-1, 2L-1, B, C, 2L]`` (``[gamma, alpha, batch, channel, beta]``).
      Each transform is then three matrix products that XLA runs without moving the data first:
      the gamma DFT on the leading axis, the alpha DFT batched over the frequencies ``n`` and
      the Wigner contraction over beta batched over ``(n, m)`` (:func:`so3_forward_gf`,
      :func:`so3_inverse_gf`). Used with the ``"dft"`` transforms only.

    Set by the environment variable ``SPHERE_JAX_SO3_LAYOUT``; the default is ``"gamma_first"``
    with the ``"dft"`` transforms and ``"channels_last"`` otherwise. Build tables and apply the
    model under the same setting.
    """
    v = os.environ.get("SPHERE_JAX_SO3_LAYOUT")
    if v is not None and v not in SO3_LAYOUTS:
        raise ValueError(f"SPHERE_JAX_SO3_LAYOUT={v!r}; choose one of {SO3_LAYOUTS}")
    if transforms() != "dft":
        return "channels_last"
    return v or "gamma_first"


GRID_DTYPES = ("float32", "bfloat16")


def grid_dtype() -> jnp.dtype:
    """The dtype in which gamma-first S2CNN layers store their SO(3) grids and the grid-sized
    steps of their transforms (:func:`so3_forward_gf`, :func:`so3_inverse_gf`): ``float32`` (the
    default) or ``bfloat16``, which halves those bytes. The harmonic coefficients, the kernels'
    products, the parameters and every sum's accumulation stay float32; the rounding to
    bfloat16 (8 significant bits) costs equivariance and precision (measured in
    ``results/gpu/README.md``). Set by the environment variable ``SPHERE_JAX_GRID_DTYPE``;
    read when a model is traced. Channels-last layers ignore it."""
    v = os.environ.get("SPHERE_JAX_GRID_DTYPE", "float32")
    if v not in GRID_DTYPES:
        raise ValueError(f"SPHERE_JAX_GRID_DTYPE={v!r}; choose one of {GRID_DTYPES}")
    return jnp.dtype(v)


def coeff_dtype() -> jnp.dtype:
    """The dtype in which gamma-first S2CNN layers store their harmonic coefficients (the
    output of :func:`so3_forward_gf`, the kernels' block products, their cotangents):
    ``float32`` (the default) or ``bfloat16``. The products then take bfloat16 operands (XLA
    accumulates such dots in float32 on GPUs, and computes them in float32 on CPUs); the
    parameters and their gradients stay float32; what is rounded is each stored coefficient,
    to 8 significant bits. With bfloat16 grids (:func:`grid_dtype`) the coefficients' layout
    copies between the Wigner steps and the block products are the largest float32 traffic
    left: about a quarter of the 204k segmenter's step bytes in the H200's program; with this
    setting too, that program moves 0.48 of float32's bytes (``results/gpu/README.md``).
    Set by ``SPHERE_JAX_COEFF_DTYPE``; read when a model is traced. Channels-last layers ignore
    it."""
    v = os.environ.get("SPHERE_JAX_COEFF_DTYPE", "float32")
    if v not in GRID_DTYPES:
        raise ValueError(f"SPHERE_JAX_COEFF_DTYPE={v!r}; choose one of {GRID_DTYPES}")
    return jnp.dtype(v)


BOUNDARIES = ("xla", "pallas")


def boundary() -> str:
    """How gamma-first S2CNN layers pass a grid to the next layer through the bias and ReLU:

    * ``"xla"`` (the default): the layer writes its grid, bias included (:func:`so3_inverse_gf`),
      the model applies the ReLU, and the next layer reads it (:func:`so3_forward_gf`);
    * ``"pallas"``: the layer returns a :class:`PendingGrid` (its inverse transform short of the
      last matmul, and its bias), and the next layer computes ``M_f relu(M_i h + bias)`` in one
      kernel (:func:`sphere_jax.boundary.fused_boundary`): the grid is never written, and the
      backward pass recomputes the ReLU's mask instead of saving the grid. Float32 grids only.
      A GPU path; on a CPU the kernel runs in Pallas's interpreter (tests only).

    Set by ``SPHERE_JAX_BOUNDARY``; the kernel's column block by ``SPHERE_JAX_BOUNDARY_BLOCK``
    (default 64) and its dots' precision by ``SPHERE_JAX_BOUNDARY_PRECISION`` (``default``:
    TF32 on a GPU, as XLA's float32 matmuls; ``tf32x3``; ``highest``). Read when a model is traced.
    """
    v = os.environ.get("SPHERE_JAX_BOUNDARY", "xla")
    if v not in BOUNDARIES:
        raise ValueError(f"SPHERE_JAX_BOUNDARY={v!r}; choose one of {BOUNDARIES}")
    if v == "pallas" and grid_dtype() != jnp.float32:
        raise ValueError("SPHERE_JAX_BOUNDARY=pallas needs float32 grids (SPHERE_JAX_GRID_DTYPE=float32)")
    return v


def boundary_block() -> int:
    """Columns per program of the fused boundary kernel (``SPHERE_JAX_BOUNDARY_BLOCK``, default 64)."""
    v = os.environ.get("SPHERE_JAX_BOUNDARY_BLOCK", "64")
    try:
        b = int(v)
    except ValueError:
        b = 0
    if b < 16 or b & (b - 1):
        raise ValueError(f"SPHERE_JAX_BOUNDARY_BLOCK={v!r}; need a power of 2 >= 16")
    return b


def boundary_precision() -> str:
    """Dot precision of the fused boundary kernel (``SPHERE_JAX_BOUNDARY_PRECISION``, default ``default``)."""
    from sphere_jax.boundary import PRECISIONS

    v = os.environ.get("SPHERE_JAX_BOUNDARY_PRECISION", "default")
    if v not in PRECISIONS:
        raise ValueError(f"SPHERE_JAX_BOUNDARY_PRECISION={v!r}; choose one of {PRECISIONS}")
    return v


@jax.tree_util.register_pytree_node_class
class PendingGrid:
    """A gamma-first SO(3) grid ``[2L-1, 2L-1, B, C, 2L]`` not yet written: ``relu?(M_i h + bias)``
    with ``h [2N, (2L-1) B C 2L]`` from :func:`so3_inverse_gf` (``pending=True``), ``bias [C]``
    and ``M_i = _gamma_inverse_matrix(L, N)``. What gamma-first layers return under
    ``SPHERE_JAX_BOUNDARY=pallas`` (:func:`boundary`): :func:`so3_forward_gf` consumes it without
    the grid, :func:`relu` marks it, :meth:`materialize` writes it. ``shape`` and ``ndim`` are
    the grid's."""

    def __init__(self, h: jax.Array, bias: jax.Array, shape: tuple, relu: bool = False):
        self.h, self.bias, self.shape, self.relu = h, bias, tuple(shape), bool(relu)

    ndim = 5

    @property
    def dtype(self):
        return self.h.dtype

    def tree_flatten(self):
        return (self.h, self.bias), (self.shape, self.relu)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def materialize(self) -> jax.Array:
        """The grid ``[2L-1, 2L-1, B, C, 2L]`` (bias added, ReLU applied if marked)."""
        L = self.shape[4] // 2
        out = _left_matmul(_gamma_inverse_matrix(L, self.h.shape[0] // 2), self.h).reshape(self.shape)
        out = out + self.bias.astype(out.dtype)[:, None]
        return jax.nn.relu(out) if self.relu else out


def relu(x):
    """ReLU of an array or of a :class:`PendingGrid` (marked, applied where it is consumed)."""
    if isinstance(x, PendingGrid):
        if x.relu:
            raise ValueError("this PendingGrid has its ReLU already")
        return PendingGrid(x.h, x.bias, x.shape, relu=True)
    return jax.nn.relu(x)


def to_gamma_first(x: jax.Array) -> jax.Array:
    """``[B, 2N-1, 2L, 2L-1, C]`` -> ``[2N-1, 2L-1, B, C, 2L]``."""
    return jnp.transpose(x, (1, 3, 0, 4, 2))


def from_gamma_first(x: jax.Array) -> jax.Array:
    """``[2N-1, 2L-1, B, C, 2L]`` -> ``[B, 2N-1, 2L, 2L-1, C]``."""
    return jnp.transpose(x, (2, 0, 4, 1, 3))


def so3_gf_key(L: int, forward: bool, L_band: int) -> str:
    return f"so3gf_{'fwd' if forward else 'inv'}_L{L}_b{L_band}"


@functools.lru_cache(maxsize=None)
def so3_table_gf(L: int, forward: bool, L_band: int) -> np.ndarray:
    """Wigner table of :func:`so3_table` (``N = L``) cut to ``n < Lb, l < Lb, |m| < Lb``
    (``Lb = L_band``) and ordered for the gamma-first transforms: forward ``[Lb, 2Lb-1, 2L, Lb]``
    indexed ``[n, Lb-1+m, beta, l]``, inverse ``[Lb, 2Lb-1, Lb, 2L]`` indexed ``[n, Lb-1+m, l, beta]``."""
    Lb = _band(L, L_band)
    t = so3_table(L, L, forward)[:Lb, :, :Lb, L - Lb : L + Lb - 1]  # [n, t, l, m]
    return np.ascontiguousarray(t.transpose(0, 3, 1, 2) if forward else t.transpose(0, 3, 2, 1))


def so3_gf_spec(L: int, forward: bool, L_band: int) -> dict[str, "callable"]:
    """Spec of one gamma-first Wigner table (see :func:`so3_table_gf`)."""
    return {so3_gf_key(L, forward, L_band): functools.partial(so3_table_gf, L, forward, L_band)}


def _batched(m: np.ndarray, n: int, dtype) -> jax.Array:
    """A constant matrix repeated along a new leading axis of size ``n``: a batched operand, so
    that XLA multiplies it into each slice of a ``[n, K, X]`` array in place (measured: without
    the batch axis XLA transposes the big operand first)."""
    return jnp.broadcast_to(jnp.asarray(m, dtype), (n,) + m.shape)


def _left_matmul(m: np.ndarray, x: jax.Array) -> jax.Array:
    """A constant matrix ``m [J, K]`` times ``x [K, ...]`` -> ``[J, ...]``, whose backward pass
    is ``m^T`` times the cotangent. (JAX's own transpose rule computes ``cotangent^T m`` and
    transposes the result: XLA then moves the big operand twice.)"""
    m = np.asarray(m, np.float32)

    @jax.custom_vjp
    def f(x):
        return jnp.tensordot(jnp.asarray(m, x.dtype), x, axes=(1, 0), preferred_element_type=x.dtype)

    def bwd(_, g):
        return (jnp.tensordot(jnp.asarray(m.T, g.dtype), g, axes=(1, 0), preferred_element_type=g.dtype),)

    f.defvjp(lambda x: (f(x), None), bwd)
    return f(x)


def _batched_left_matmul(m: np.ndarray, x: jax.Array) -> jax.Array:
    """A constant matrix ``m [J, K]`` times each slice of ``x [n, K, Z]`` -> ``[n, J, Z]`` (a
    batched dot: :func:`_batched`), whose backward pass is ``m^T`` times each slice of the
    cotangent, again ``[n, K, Z]``. JAX's own transpose rule computes ``cotangent^T m`` per slice,
    ``[n, Z, K]``, and transposes it: on an H200 that transpose took about 1 ms per transform
    at the 204k's first layers (1.65 GB moved; results/gpu/README.md, 2026-11-28 profile)."""
    m = np.asarray(m, np.float32)

    @jax.custom_vjp
    def f(x):
        return jnp.einsum("nxq,nqz->nxz", _batched(m, x.shape[0], x.dtype), x, preferred_element_type=x.dtype)

    def bwd(_, g):
        return (jnp.einsum("nqx,nxz->nqz", _batched(m.T, g.shape[0], g.dtype), g, preferred_element_type=g.dtype),)

    f.defvjp(lambda x: (f(x), None), bwd)
    return f(x)


def so3_forward_gf(x: jax.Array, table: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """Real SO(3) signal, gamma first, ``[2N-1, 2L-1, B, C, 2L]`` (``N = L``) -> half coefficients
    ``[Lb, 2Lb-1, 2, B, C, Lb]`` indexed ``[n >= 0, Lb-1+m, re/im, b, c, l]``: the same numbers as
    :func:`so3_forward_half` with ``L_band=Lb``, for the ``table`` of :func:`so3_table_gf`
    ``(L, True, Lb)``. Three matrix products, none of which moves the data first: gamma -> n on
    the leading axis, alpha -> m batched over n, beta -> l batched over (n, m). The grid-sized
    steps run in ``x``'s dtype (float32 or bfloat16, see :func:`grid_dtype`); the coefficients
    are accumulated in float32 and returned in ``out_dtype`` (see :func:`coeff_dtype`). ``x``
    may be a :class:`PendingGrid`: with its ReLU and ``SPHERE_JAX_BOUNDARY=pallas`` the grid is
    then never written (see :func:`boundary`)."""
    Nb, Mb, T, Lb = table.shape
    L = T // 2
    K = 2 * L - 1
    if x.ndim != 5 or x.shape[:2] != (K, K) or x.shape[4] != T:
        raise ValueError(f"gamma-first SO(3) signal must be [{K}, {K}, batch, channels, {T}], got {x.shape}")
    B, C = x.shape[2:4]
    am_c, am_s, _, _ = _dft_mats(L, L)
    c, s = am_c[L - Lb : L + Lb - 1], am_s[L - Lb : L + Lb - 1]  # [m, p]
    mg = _gamma_forward_matrix(L, Nb)  # [(n, re/im), gamma]: e^{-i n gamma}
    if isinstance(x, PendingGrid) and x.relu and boundary() == "pallas":  # one kernel, no grid in memory
        from sphere_jax import boundary as fb

        bias = jnp.broadcast_to(x.bias.astype(jnp.float32)[None, None, :, None], (K, B, C, T)).reshape(-1)
        a = fb.fused_boundary(jnp.asarray(_gamma_inverse_matrix(L, x.h.shape[0] // 2)), jnp.asarray(mg), x.h, bias,
                              block=boundary_block(), precision=boundary_precision())
        dt = jnp.float32
    else:
        if isinstance(x, PendingGrid):
            x = x.materialize()
        dt = x.dtype
        a = _left_matmul(mg, x)
    a = a.reshape(Nb, 2 * K, B * C * T)  # [n, (re/im, alpha), bct]
    # alpha -> m: (re, im) of sum_p a e^{-i m alpha_p} as one real block [(m, re/im out), (re/im in, alpha)]
    ma = np.stack([np.stack([c, s], 1), np.stack([-s, c], 1)], 1).reshape(2 * Mb, 2 * K)
    y = _batched_left_matmul(ma, a.astype(dt)).reshape(Nb, Mb, 2 * B * C, T)
    out = jnp.einsum("nmzt,nmtl->nmzl", y, table.astype(dt), preferred_element_type=jnp.float32)  # beta -> l
    return out.astype(out_dtype).reshape(Nb, Mb, 2, B, C, Lb)


def so3_inverse_gf(coeffs: jax.Array, table: jax.Array, dtype=jnp.float32, pending: bool = False) -> jax.Array:
    """Half coefficients ``[Lb, 2Lb-1, 2, B, C, Lb]`` (as :func:`so3_forward_gf` returns; the
    coefficients outside are zero) -> real SO(3) signal, gamma first, ``[2L-1, 2L-1, B, C, 2L]``,
    for the ``table`` of :func:`so3_table_gf` ``(L, False, Lb)``. Equals :func:`so3_inverse_half`.
    The grid-sized steps and the result are in ``dtype`` (float32 or bfloat16, see
    :func:`grid_dtype`). With ``pending=True`` it stops before the last step (n -> gamma) and
    returns ``h [2 Lb, (2L-1) B C 2L]`` (rows ``(n >= 0, re/im)``, columns ``(alpha, b, c,
    beta)``), the grid being ``_gamma_inverse_matrix(L, Lb) @ h`` (see :class:`PendingGrid`)."""
    Nb, Mb, Lb, T = table.shape
    L = T // 2
    K = 2 * L - 1
    if coeffs.ndim != 6 or coeffs.shape[:3] != (Nb, Mb, 2) or coeffs.shape[5] != Lb:
        raise ValueError(f"gamma-first SO(3) coefficients must be [{Nb}, {Mb}, 2, batch, channels, {Lb}], got {coeffs.shape}")
    B, C = coeffs.shape[3:5]
    am_c, am_s, gn_c, gn_s = _dft_mats(L, L)
    c, s = am_c[L - Lb : L + Lb - 1].T, am_s[L - Lb : L + Lb - 1].T  # [p, m]
    dt = jnp.dtype(dtype)
    x = coeffs.astype(dt).reshape(Nb, Mb, 2 * B * C, Lb)
    x = jnp.einsum("nmzl,nmlt->nmzt", x, table.astype(dt), preferred_element_type=dt)  # l -> beta
    # m -> alpha: (re, im) of sum_m x e^{i m alpha_p} as one real block [(re/im out, alpha), (m, re/im in)]
    mi = np.stack([np.stack([c, -s], 2), np.stack([s, c], 2)], 0).reshape(2 * K, 2 * Mb)
    x = x.reshape(Nb, 2 * Mb, B * C * T)
    h = _batched_left_matmul(mi, x)  # [n, (re/im, alpha), bct]
    h = h.reshape(2 * Nb, K * B * C * T)
    if pending:
        return h
    return _left_matmul(_gamma_inverse_matrix(L, Nb), h).reshape(K, K, B, C, T)


@functools.lru_cache(maxsize=None)
def _gamma_inverse_matrix(L: int, Nb: int) -> np.ndarray:
    """``[2L-1 (gamma), 2 Nb ((n >= 0, re/im))]`` float32: ``Re sum_n w_n h_n e^{i n gamma}``
    (``w_0 = 1``, ``w_n = 2``), the last step of :func:`so3_inverse_gf`."""
    _, _, gn_c, gn_s = _dft_mats(L, L)
    w = np.where(np.arange(Nb) == 0, 1.0, 2.0)[:, None]
    return np.ascontiguousarray(np.stack([w * gn_c[:Nb], -w * gn_s[:Nb]], axis=1).reshape(2 * Nb, 2 * L - 1).T)


@functools.lru_cache(maxsize=None)
def _gamma_forward_matrix(L: int, Nb: int) -> np.ndarray:
    """``[2 Nb ((n >= 0, re/im)), 2L-1 (gamma)]`` float32: ``e^{-i n gamma}``, the first step of
    :func:`so3_forward_gf`."""
    _, _, gn_c, gn_s = _dft_mats(L, L)
    return np.ascontiguousarray(np.stack([gn_c[:Nb], -gn_s[:Nb]], axis=1).reshape(2 * Nb, 2 * L - 1))


def so3_half_to_full_gf(c: jax.Array, m_nonneg: bool = False) -> jax.Array:
    """Gamma-first half coefficients ``[N, 2L-1, 2, B, C, L]`` (n >= 0) -> ``[2N-1, 2L-1, 2, B, C, L]``
    (``n = -(N-1)..N-1``) for a real signal: ``F[-n, m] = (-1)^(m+n) conj(F[n, -m])``. With
    ``m_nonneg``, only the orders ``m >= 0``: ``[2N-1, L, 2, B, C, L]`` (half the bytes)."""
    N, M = c.shape[0], c.shape[1]
    L = (M + 1) // 2
    ms = np.arange(L) if m_nonneg else np.arange(-L + 1, L)
    sm = (-1.0) ** np.abs(ms)
    sn = (-1.0) ** np.arange(N - 1, 0, -1)  # rows n = N-1 .. 1 -> -n
    conj = np.array([1.0, -1.0])
    sign = jnp.asarray(sn[:, None, None] * sm[None, :, None] * conj[None, None, :], c.dtype)
    if m_nonneg:  # F[n, -m] for m >= 0 are the columns m <= 0, flipped
        c_neg, c_pos = c[1:, :L], c[:, L - 1 :]
    else:
        c_neg, c_pos = c[1:], c
    neg = jnp.flip(c_neg, axis=(0, 1)) * sign[:, :, :, None, None, None]
    return jnp.concatenate([neg, c_pos], axis=0)


def lookup(tables: Mapping[str, jax.Array], key: str) -> jax.Array:
    """Fetch a table by key, with an error that says how to build it."""
    try:
        return tables[key]
    except KeyError:
        raise KeyError(
            f"transform table {key!r} missing; build tables with "
            f"sphere_jax.harmonics.build_tables(model.table_specs())"
        ) from None
