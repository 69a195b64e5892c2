"""Rotations of the sphere: Haar-random SO(3) samples, ZYZ Euler angles, rotating points.

Convention: ``R(alpha, beta, gamma) = Rz(alpha) @ Ry(beta) @ Rz(gamma)`` (intrinsic ZYZ, the
convention of s2fft's Wigner grid and of
``scipy.spatial.transform.Rotation.from_euler("ZYZ", [alpha, beta, gamma])``). Rotation
matrices are ``[..., 3, 3]`` and act on column vectors; points are ``[..., 3]`` (x, y, z).
Rotating a signal ``f`` on the sphere by ``R`` gives ``(R f)(x) = f(R^T x)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _rz(a: jax.Array) -> jax.Array:
    c, s = jnp.cos(a), jnp.sin(a)
    z, o = jnp.zeros_like(a), jnp.ones_like(a)
    return jnp.stack([jnp.stack([c, -s, z], -1), jnp.stack([s, c, z], -1), jnp.stack([z, z, o], -1)], -2)


def _ry(b: jax.Array) -> jax.Array:
    c, s = jnp.cos(b), jnp.sin(b)
    z, o = jnp.zeros_like(b), jnp.ones_like(b)
    return jnp.stack([jnp.stack([c, z, s], -1), jnp.stack([z, o, z], -1), jnp.stack([-s, z, c], -1)], -2)


def euler_to_matrix(alpha, beta, gamma) -> jax.Array:
    """ZYZ Euler angles ``[...]`` each -> rotation matrices ``[..., 3, 3]``."""
    alpha, beta, gamma = (jnp.asarray(a, dtype=jnp.result_type(float)) for a in (alpha, beta, gamma))
    return _rz(alpha) @ _ry(beta) @ _rz(gamma)


def matrix_to_euler(R: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotation matrices ``[..., 3, 3]`` -> ZYZ angles ``(alpha, beta, gamma)``, each ``[...]``.

    ``beta`` is in ``[0, pi]``; at the poles (``beta`` = 0 or pi) ``gamma`` is set to 0.
    """
    R = jnp.asarray(R)
    beta = jnp.arccos(jnp.clip(R[..., 2, 2], -1.0, 1.0))
    sb = jnp.sin(beta)
    regular = sb > 1e-6
    alpha_r = jnp.arctan2(R[..., 1, 2], R[..., 0, 2])
    gamma_r = jnp.arctan2(R[..., 2, 1], -R[..., 2, 0])
    # Degenerate: R = Rz(alpha + gamma) (beta = 0) or Rz(alpha - gamma) Ry(pi) (beta = pi).
    alpha_d = jnp.where(R[..., 2, 2] > 0, jnp.arctan2(R[..., 1, 0], R[..., 0, 0]), jnp.arctan2(-R[..., 1, 0], -R[..., 0, 0]))
    alpha = jnp.where(regular, alpha_r, alpha_d)
    gamma = jnp.where(regular, gamma_r, 0.0)
    return alpha, beta, gamma


def random_rotations(key: jax.Array, shape: tuple[int, ...] | int = ()) -> jax.Array:
    """Haar-uniform random rotations ``[*shape, 3, 3]`` (from normalised Gaussian quaternions)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    q = jax.random.normal(key, shape + (4,))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)


def identity_rotations(shape: tuple[int, ...] | int = ()) -> jax.Array:
    """Identity matrices ``[*shape, 3, 3]``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return jnp.broadcast_to(jnp.eye(3), shape + (3, 3))


def rotate_points(R: jax.Array, points: jax.Array) -> jax.Array:
    """Apply rotations ``[..., 3, 3]`` to points ``[..., P, 3]`` -> ``[..., P, 3]``."""
    return jnp.einsum("...ij,...pj->...pi", R, points)


def spherical_to_cartesian(theta, phi) -> jax.Array:
    """Colatitude / longitude ``[...]`` -> unit vectors ``[..., 3]``."""
    st = jnp.sin(theta)
    return jnp.stack([st * jnp.cos(phi), st * jnp.sin(phi), jnp.cos(theta)], axis=-1)


def cartesian_to_spherical(xyz: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unit vectors ``[..., 3]`` -> (colatitude in ``[0, pi]``, longitude in ``[0, 2 pi)``)."""
    theta = jnp.arccos(jnp.clip(xyz[..., 2], -1.0, 1.0))
    phi = jnp.mod(jnp.arctan2(xyz[..., 1], xyz[..., 0]), 2 * jnp.pi)
    return theta, phi
