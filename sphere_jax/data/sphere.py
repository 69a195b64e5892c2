"""Digits projected onto the sphere, rotated and labelled on device.

Everything here is a pure JAX function (jit-able, vmapped over the batch) so that any amount
of rotation augmentation costs no disk and no preprocessing.

Projection (SPEC): the unit sphere touches the image plane ``z = 0`` at its south pole (the
sphere is centred at ``(0, 0, 1)``). A grid point ``p`` of the sphere is joined to the
projection centre ``(0, 0, 2 + 1e-3)`` just above the north pole; the line meets the plane at
``t * (p_x, p_y)`` with ``t = c / (c - p_z)`` (``c = 2 + 1e-3``, ``p_z`` in the shifted frame).
The plane square ``[-1.5, 1.5]^2`` spans the 28 x 28 image: column ``j`` has its centre at
``x = -1.5 + 3 (j + 0.5) / 28`` and row ``i`` at ``y = -1.5 + 3 (i + 0.5) / 28``. Only points of
the southern hemisphere (``z < 0`` on the unit sphere) receive values. Sampling is correct
bilinear interpolation of the four surrounding pixels with zero outside the image (the
reference blends pixels ``i - 1`` and ``i + 1`` by mistake; we do not).

Intensities are normalised to ``[0, 1]`` (uint8 / 255), unlike the reference's raw 0..255.

A rotated sample is ``g(x) = f(R^T x)``: the digit, sitting at the south pole, is carried by
``R``. The canonical (NR) sample uses ``R = I``.

Segmentation target (SPEC): ``mask = (rescaled intensity > threshold) * (class + 1)`` with
11 classes, 0 = background; the intensity is rescaled per digit to ``[0, 1]`` by its own min
and max on the grid (the reference rescales to 0..255 and uses 150, i.e. 150/255 here).

Shapes: raw digits ``uint8 [..., 28, 28]``; spherical images ``float32 [..., 2L, 2L - 1]``
(dh grid, ``[theta, phi]``); masks ``int32 [..., 2L, 2L - 1]``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax import grids, rotations

NUM_CLASSES_SEG = 11  # background + 10 digit classes
DEFAULT_THRESHOLD = 150.0 / 255.0
_PROJECTION_CENTRE = 2.0 + 1e-3
_PLANE_HALF_WIDTH = 1.5


def projection_points(L: int) -> jax.Array:
    """Unit vectors of the dh grid at band-limit ``L``, float32 ``[2L, 2L - 1, 3]``."""
    return jnp.asarray(grids.s2_points(L), dtype=jnp.float32)


def _bilinear(image: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """Sample ``image [H, W]`` at continuous pixel coordinates (column ``u``, row ``v``),
    pixel centres at integers, zero outside. ``u, v: [...]`` -> ``[...]``."""
    H, W = image.shape
    u0 = jnp.floor(u)
    v0 = jnp.floor(v)
    fu = u - u0
    fv = v - v0
    u0 = u0.astype(jnp.int32)
    v0 = v0.astype(jnp.int32)

    def tap(vi, ui):
        inside = (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
        val = image[jnp.clip(vi, 0, H - 1), jnp.clip(ui, 0, W - 1)]
        return jnp.where(inside, val, 0.0)

    return (
        tap(v0, u0) * (1 - fu) * (1 - fv)
        + tap(v0, u0 + 1) * fu * (1 - fv)
        + tap(v0 + 1, u0) * (1 - fu) * fv
        + tap(v0 + 1, u0 + 1) * fu * fv
    )


def project_digit(image: jax.Array, rotation: jax.Array, points: jax.Array, scale: float = 1.0) -> jax.Array:
    """Project one digit onto the sphere after rotating it.

    Args:
      image: ``uint8`` or float ``[28, 28]`` (uint8 is divided by 255; floats are used as is).
      rotation: ``[3, 3]`` rotation ``R``; the result is ``f(R^T x)``.
      points: unit vectors of the grid ``[..., 3]`` (see :func:`projection_points`).
      scale: size of the digit on the plane (1: the image spans ``[-1.5, 1.5]^2``, the
        study's projection; 0.5: ``[-0.75, 0.75]^2``, a digit of about half the angular size).

    Returns:
      float32 ``[...]`` intensities in ``[0, 1]`` on the grid.
    """
    img = image.astype(jnp.float32)
    if image.dtype == jnp.uint8:
        img = img / 255.0
    p = jnp.einsum("ji,...j->...i", rotation.astype(jnp.float32), points)  # R^T x
    pz = p[..., 2] + 1.0  # frame of the sphere centred at (0, 0, 1)
    t = _PROJECTION_CENTRE / (_PROJECTION_CENTRE - pz)
    x = t * p[..., 0]
    y = t * p[..., 1]
    n = image.shape[-1]
    half = _PLANE_HALF_WIDTH * scale
    px = n / (2 * half)
    u = (x + half) * px - 0.5
    v = (y + half) * px - 0.5
    val = _bilinear(img, u, v)
    return jnp.where(p[..., 2] < 0, val, 0.0)


def digit_mask(intensity: jax.Array, label: jax.Array, threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
    """Class map of one projected digit: ``label + 1`` where the min-max rescaled intensity
    exceeds ``threshold``, else 0. ``intensity: [...]`` float -> int32 ``[...]``."""
    lo = intensity.min()
    hi = intensity.max()
    rescaled = (intensity - lo) / jnp.maximum(hi - lo, 1e-12)
    return jnp.where(rescaled > threshold, label.astype(jnp.int32) + 1, 0).astype(jnp.int32)


def make_scene(
    images: jax.Array,
    labels: jax.Array,
    rots: jax.Array,
    points: jax.Array,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Compose ``k`` digits into one spherical image and one mask.

    Args:
      images: ``uint8 [k, 28, 28]``; labels: ``int [k]``; rots: ``[k, 3, 3]``.
      points: grid ``[2L, 2L - 1, 3]``.
      scale: digit size (see :func:`project_digit`).

    Overlaps are resolved deterministically: the image is the pixel-wise maximum of the
    digits' intensities, and where several masks claim a pixel the later digit (higher index)
    wins.

    Returns:
      ``(image float32 [2L, 2L - 1], mask int32 [2L, 2L - 1])``.
    """
    def one(carry, xs):
        img_acc, mask_acc = carry
        im, lab, R = xs
        val = project_digit(im, R, points, scale)
        m = digit_mask(val, lab, threshold)
        return (jnp.maximum(img_acc, val), jnp.where(m > 0, m, mask_acc)), None

    shape = points.shape[:-1]
    init = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32))
    (img, mask), _ = jax.lax.scan(one, init, (images, labels, rots))
    return img, mask


@functools.partial(jax.jit, static_argnames=("L", "threshold", "digit_scale"))
def spherical_batch(
    images: jax.Array,
    labels: jax.Array,
    rots: jax.Array,
    L: int,
    threshold: float = DEFAULT_THRESHOLD,
    digit_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Project a batch of (multi-digit) scenes onto the dh grid at band-limit ``L``.

    Args:
      images: ``uint8 [B, k, 28, 28]`` (``k`` digits per scene; ``k = 1`` for single digits).
      labels: ``int [B, k]`` digit classes 0..9.
      rots: ``float [B, k, 3, 3]`` rotation of each digit (see :func:`separated_rotations`).
      L: band-limit; the grid is ``2L x (2L - 1)``.
      digit_scale: digit size (see :func:`project_digit`).

    Returns:
      ``(x float32 [B, 2L, 2L - 1, 1], mask int32 [B, 2L, 2L - 1])``: channels-last images in
      ``[0, 1]`` and class maps (0 = background, class + 1 on digit pixels).
    """
    if images.ndim != 4 or images.shape[-2:] != (28, 28):
        raise ValueError(f"images must be [batch, digits, 28, 28], got {images.shape}")
    if labels.shape != images.shape[:2] or rots.shape != images.shape[:2] + (3, 3):
        raise ValueError(
            f"labels {labels.shape} / rotations {rots.shape} do not match images {images.shape}"
        )
    points = projection_points(L)
    img, mask = jax.vmap(lambda i, l, r: make_scene(i, l, r, points, threshold, digit_scale))(images, labels, rots)
    return img[..., None], mask


# ---------------------------------------------------------------------------------------
# Scenes of several digits: placement with a minimum separation


def digit_centre(rotation: jax.Array) -> jax.Array:
    """Where a rotated digit sits: ``R`` applied to the south pole, ``[..., 3, 3] -> [..., 3]``."""
    return -rotation[..., :, 2]


def digit_radius(scale: float = 1.0, extent: float = 1.06) -> float:
    """Angular radius (radians) of the cap holding a digit's strokes: a point at plane radius
    ``r`` lies ``2 atan(r / 2)`` from the digit's centre; MNIST strokes reach about
    ``r = 1.06`` (56 degrees) at ``scale = 1``, and ``r`` scales with the digit."""
    return float(2 * np.arctan(extent * scale / 2))


CANDIDATES = 256
# Largest possible smallest angle between k points on the sphere (Tammes' problem), degrees.
_TAMMES_DEG = {2: 180.0, 3: 120.0, 4: 109.47, 5: 90.0, 6: 90.0, 7: 77.87, 8: 74.86}


def separated_rotations(key: jax.Array, k: int, min_separation: float, candidates: int = CANDIDATES) -> jax.Array:
    """Haar-random rotations ``[k, 3, 3]`` of ``k`` digits whose centres are pairwise at least
    ``min_separation`` radians apart.

    Draws ``candidates`` independent scenes of ``k`` Haar-random rotations and keeps the first
    whose centres are all far enough apart; if none is, the one whose closest pair is farthest
    apart. So the scene's distribution is rotation invariant, every digit keeps a random
    in-plane orientation, and the bound fails only if all candidates fail: for ``k = 3`` a
    candidate succeeds with probability 0.40 at 60 degrees, 0.21 at 75 and 0.079 at 90
    (Monte Carlo), so all 256 fail with probability < 1e-9 up to 90 degrees.
    ``min_separation = 0`` gives independent Haar rotations.

    Raises ``ValueError`` when no ``k`` points on the sphere can be that far apart.
    """
    if k > 1 and np.degrees(min_separation) > _TAMMES_DEG.get(k, 180.0) + 1e-6:
        raise ValueError(f"{k} digits cannot be {np.degrees(min_separation):.1f} degrees apart "
                         f"(at most {_TAMMES_DEG[k]} degrees)")
    cand = rotations.random_rotations(key, (candidates, k))  # [C, k, 3, 3]
    if min_separation <= 0 or k == 1:
        return cand[0]
    c = digit_centre(cand)  # [C, k, 3]
    cos = jnp.einsum("cid,cjd->cij", c, c)
    closest = jnp.where(jnp.eye(k, dtype=bool)[None], -1.0, cos).max(axis=(1, 2))  # [C]
    ok = closest <= jnp.cos(min_separation)
    idx = jnp.where(jnp.any(ok), jnp.argmax(ok), jnp.argmin(closest))
    return cand[idx]


def scene_overlap(images: jax.Array, labels: jax.Array, rots: jax.Array, L: int,
                  threshold: float = DEFAULT_THRESHOLD, digit_scale: float = 1.0) -> dict:
    """How much of a batch of scenes' digits is hidden by later digits.

    Args as :func:`spherical_batch` (``images uint8 [B, k, 28, 28]``).

    Returns ``{"overwritten": fraction of all digit pixels claimed by a later digit,
    "overwritten_first": the same for the first digit of each scene, "worst_scene": the largest
    per-scene fraction, "min_separation_deg": smallest angle between two centres of a scene}``
    (pixels counted on the grid, unweighted).
    """
    points = projection_points(L)

    def masks(ims, labs, Rs):
        return jax.vmap(lambda im, lab, R: digit_mask(project_digit(im, R, points, digit_scale), lab, threshold) > 0)(
            ims, labs, Rs)

    m = jax.jit(jax.vmap(masks))(images, labels, rots)  # [B, k, H, W]
    later = jnp.flip(jnp.cumsum(jnp.flip(m, 1), 1), 1) - m  # later digits covering each pixel
    hidden = m & (later > 0)
    own = m.sum(axis=(2, 3))
    per_scene = hidden.sum(axis=(1, 2, 3)) / jnp.maximum(own.sum(axis=1), 1)
    c = digit_centre(rots)
    cos = jnp.einsum("bid,bjd->bij", c, c)
    k = rots.shape[1]
    off = ~jnp.eye(k, dtype=bool)
    min_angle = jnp.degrees(jnp.arccos(jnp.clip(jnp.where(off, cos, -1.0).max(axis=(1, 2)), -1, 1))) if k > 1 else None
    return {
        "overwritten": float(hidden.sum() / jnp.maximum(own.sum(), 1)),
        "overwritten_first": float(hidden[:, 0].sum() / jnp.maximum(own[:, 0].sum(), 1)),
        "worst_scene": float(per_scene.max()),
        "min_separation_deg": float(min_angle.min()) if min_angle is not None else None,
    }


def scene_rotations(key: jax.Array, batch: int, digits: int, rotate: bool) -> jax.Array:
    """Rotations ``[batch, digits, 3, 3]`` for scenes of ``digits`` digits.

    With ``rotate`` (mode R) every digit gets an independent Haar-random rotation. Without it
    (mode NR) a single digit stays canonical (identity); for ``digits > 1`` the digits must be
    placed somewhere, so each still gets an independent Haar-random rotation (the scene's
    distribution is then rotation invariant in both modes).
    """
    if digits == 1 and not rotate:
        return rotations.identity_rotations((batch, 1))
    return rotations.random_rotations(key, (batch, digits))


def from_equirectangular(images: jax.Array, L: int) -> jax.Array:
    """Resample equirectangular images onto the dh grid (bring your own spherical images).

    Args:
      images: float ``[B, H, W]`` or ``[B, H, W, C]``; row ``i`` is colatitude
        ``pi (i + 0.5) / H`` (north pole at the top), column ``j`` longitude ``2 pi (j + 0.5) / W``.
      L: band-limit of the target grid.

    Returns:
      float32 ``[B, 2L, 2L - 1, C]`` (``C = 1`` for 3-D input), bilinear in both angles,
      periodic in longitude, clamped at the poles.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be [batch, H, W] or [batch, H, W, C], got {x.shape}")
    H, W = x.shape[1:3]
    v = jnp.asarray(grids.thetas(L), jnp.float32) / np.pi * H - 0.5  # continuous row
    u = jnp.asarray(grids.phis(L), jnp.float32) / (2 * np.pi) * W - 0.5  # continuous column
    v = jnp.clip(v, 0.0, H - 1.0)
    v0 = jnp.clip(jnp.floor(v).astype(jnp.int32), 0, H - 2 if H > 1 else 0)
    fv = (v - v0)[None, :, None, None]
    u0 = jnp.floor(u).astype(jnp.int32)
    fu = (u - u0)[None, None, :, None]
    u0m, u1m = u0 % W, (u0 + 1) % W
    v1 = jnp.minimum(v0 + 1, H - 1)
    rows0, rows1 = x[:, v0], x[:, v1]
    top = rows0[:, :, u0m] * (1 - fu) + rows0[:, :, u1m] * fu
    bot = rows1[:, :, u0m] * (1 - fu) + rows1[:, :, u1m] * fu
    return top * (1 - fv) + bot * fv
