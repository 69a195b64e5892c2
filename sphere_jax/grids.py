"""Sampling grids on S2 and SO(3), quadrature weights and near-identity kernel grids.

Conventions (shared by the whole library):

* ``L`` is the band-limit (the reference's bandwidth ``b``); ``N`` is the azimuthal
  band-limit on SO(3) (``N = L`` for full SO(3) signals).
* The default (and the only one the layers use) sampling is s2fft's ``"dh"``
  (Driscoll-Healy): ``2L`` colatitudes ``theta_t = pi (2t + 1) / (4L)`` and ``2L - 1``
  longitudes ``phi_p = 2 pi p / (2L - 1)``. ``"mw"`` grids can be produced here too, but
  s2fft's ``mw`` transforms lose 10-40 % accuracy in float32, so the layers refuse them.
* An S2 signal is ``[..., theta, phi]``, shape ``(2L, 2L - 1)``.
* An SO(3) signal is ``[..., gamma, beta, alpha]``, shape ``(2N - 1, 2L, 2L - 1)``,
  with ``gamma_k = 2 pi k / (2N - 1)``, ``beta`` = the dh colatitudes and ``alpha`` = the
  dh longitudes; the sample ``[k, t, p]`` is the rotation ``R(alpha_p, beta_t, gamma_k)``
  in intrinsic ZYZ Euler angles (see :mod:`sphere_jax.rotations`).
"""
from __future__ import annotations

import functools

import numpy as np

SAMPLINGS = ("dh", "mw")


def _check(L: int, sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    if int(L) != L or L < 1:
        raise ValueError(f"band-limit L must be a positive integer, got {L!r}")


def s2_shape(L: int, sampling: str = "dh") -> tuple[int, int]:
    """Shape ``(n_theta, n_phi)`` of an S2 signal: ``(2L, 2L - 1)`` for dh, ``(L, 2L - 1)`` for mw."""
    _check(L, sampling)
    return (2 * L if sampling == "dh" else L, 2 * L - 1)


def so3_shape(L: int, N: int | None = None, sampling: str = "dh") -> tuple[int, int, int]:
    """Shape ``(n_gamma, n_beta, n_alpha)`` of an SO(3) signal: ``(2N - 1, 2L, 2L - 1)`` for dh."""
    N = L if N is None else N
    return (2 * N - 1,) + s2_shape(L, sampling)


@functools.lru_cache(maxsize=None)
def thetas(L: int, sampling: str = "dh") -> np.ndarray:
    """Colatitudes, float64 ``[n_theta]``: dh ``pi (2t+1) / (4L)``, mw ``pi (2t+1) / (2L-1)``."""
    _check(L, sampling)
    if sampling == "dh":
        t = np.arange(2 * L)
        return np.pi * (2 * t + 1) / (4 * L)
    t = np.arange(L)
    return np.pi * (2 * t + 1) / (2 * L - 1)


@functools.lru_cache(maxsize=None)
def phis(L: int, sampling: str = "dh") -> np.ndarray:
    """Longitudes, float64 ``[2L - 1]``: ``2 pi p / (2L - 1)``."""
    _check(L, sampling)
    return 2 * np.pi * np.arange(2 * L - 1) / (2 * L - 1)


@functools.lru_cache(maxsize=None)
def gammas(N: int) -> np.ndarray:
    """Third Euler angles of the SO(3) grid, float64 ``[2N - 1]``: ``2 pi k / (2N - 1)``."""
    return 2 * np.pi * np.arange(2 * N - 1) / (2 * N - 1)


def s2_points(L: int, sampling: str = "dh") -> np.ndarray:
    """Unit vectors of the S2 grid, float64 ``[n_theta, n_phi, 3]`` (x, y, z)."""
    th = thetas(L, sampling)[:, None]
    ph = phis(L, sampling)[None, :]
    return np.stack(
        [np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th) * np.ones_like(ph)], axis=-1
    )


@functools.lru_cache(maxsize=None)
def dh_quadrature_weights(L: int) -> np.ndarray:
    """Driscoll-Healy quadrature weights per colatitude, float64 ``[2L]``.

    ``sum_t w_t sum_p f(theta_t, phi_p)`` integrates a band-limited ``f`` over the sphere
    exactly (the weights include the ``2 pi / (2L - 1)`` longitude step), so
    ``w.sum() * (2L - 1) == 4 pi``.
    """
    th = thetas(L, "dh")
    k = np.arange(L)
    # Fejer's first rule on the half-shifted colatitudes (Driscoll & Healy 1994), for
    # int_0^pi g(theta) sin(theta) d theta; then the longitude step 2 pi / (2L - 1).
    series = np.sin(np.outer(th, 2 * k + 1)) / (2 * k + 1)
    w = (2.0 / L) * np.sin(th) * series.sum(axis=1)
    return w * 2 * np.pi / (2 * L - 1)


def area_weights(L: int) -> np.ndarray:
    """Per-pixel area weights of the dh grid, float64 ``[2L, 2L - 1]``, summing to ``4 pi``."""
    return np.repeat(dh_quadrature_weights(L)[:, None], 2 * L - 1, axis=1)


# ---------------------------------------------------------------------------------------
# Near-identity kernel grids (the filters' support, as in the S2CNN reference).


def s2_near_identity_grid(
    max_beta: float, n_alpha: int = 8, n_beta: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Filter points on S2 around the north pole: rings x azimuths.

    Returns ``(betas [n_beta], alphas [n_alpha])``, float64: ``betas = max_beta * (1..n_beta) /
    n_beta`` and ``alphas = 2 pi a / n_alpha``. The filter point ``(b, a)`` is the unit vector
    of colatitude ``betas[b]`` and longitude ``alphas[a]``; there are ``n_beta * n_alpha`` of them.
    """
    if not (0 < max_beta <= np.pi):
        raise ValueError(f"max_beta must lie in (0, pi], got {max_beta}")
    betas = max_beta * np.arange(1, n_beta + 1) / n_beta
    alphas = 2 * np.pi * np.arange(n_alpha) / n_alpha
    return betas, alphas


def so3_near_identity_grid(
    max_beta: float,
    n_alpha: int = 8,
    n_beta: int = 3,
    n_gamma: int | None = None,
    max_gamma: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filter rotations near the identity of SO(3): rings x azimuths x gammas.

    Returns ``(betas [n_beta], alphas [n_alpha], pre_gammas [n_gamma])``, float64. The filter
    rotation ``(b, a, c)`` is ``R(alpha=alphas[a], beta=betas[b], gamma=pre_gammas[c] - alphas[a])``
    (ZYZ), so that for small ``beta`` it is close to a rotation by ``pre_gammas[c]`` about z.

    ``max_gamma=None`` (ours): ``pre_gammas = 2 pi c / n_gamma`` covers the circle once, so every
    one of the ``n_beta * n_alpha * n_gamma`` rotations is distinct. ``max_gamma=g`` (the
    reference's ``so3_near_identity_grid``): ``pre_gammas = linspace(-g, g, n_gamma)`` with both
    end points; for ``g = 2 pi`` the first and last gamma are the same rotation, which the
    reference keeps (and counts in its parameters).
    """
    n_gamma = n_alpha if n_gamma is None else n_gamma
    betas, alphas = s2_near_identity_grid(max_beta, n_alpha, n_beta)
    if max_gamma is None:
        pre_gammas = 2 * np.pi * np.arange(n_gamma) / n_gamma
    else:
        pre_gammas = np.linspace(-max_gamma, max_gamma, n_gamma, endpoint=True)
    return betas, alphas, pre_gammas
