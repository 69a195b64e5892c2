"""Pictures of spherical samples: equirectangular image, class mask and orthographic globe views.

Only matplotlib's object API is used (a :class:`~matplotlib.figure.Figure` drawn by the Agg
canvas): nothing here imports ``matplotlib.pyplot``, selects a backend or touches rcParams, so
plotting leaves no global state behind and works without a display.

Conventions (see :mod:`sphere_jax.grids`): a spherical image is a dh-grid array
``[2L, 2L - 1]`` indexed ``[theta, phi]`` (colatitude ``theta_t = pi (2t + 1) / (4L)``, longitude
``phi_p = 2 pi p / (2L - 1)``); masks are ``int [2L, 2L - 1]`` with 0 = background and
``class + 1`` on digit pixels (11 classes).

The globe is an orthographic view of the sphere from outside, along a view direction ``v``
(the point of the sphere at the centre of the picture). The picture's right and down axes are
``Q (1, 0, 0)`` and ``Q (0, 1, 0)`` where ``Q`` is the smallest rotation taking the south pole
to ``v``; seen from the south pole, a canonical (NR) digit therefore appears exactly as on its
28 x 28 image (row down, column right), not mirrored.
"""
from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle

SOUTH_POLE = np.array([0.0, 0.0, -1.0])
NUM_MASK_CLASSES = 11


def _save(fig, path) -> None:
    """Write ``fig`` as a PNG at ``path``, creating its folder."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(os.fspath(path), dpi=100)


def mask_colormap() -> tuple[ListedColormap, BoundaryNorm]:
    """Colormap and norm for 11-class masks: 0 (background) black, classes 1..10 the ten
    ``tab10`` colours (class ``c + 1`` = digit ``c``)."""
    colors = [(0.0, 0.0, 0.0, 1.0)] + [matplotlib.colormaps["tab10"](i) for i in range(10)]
    cmap = ListedColormap(colors, name="mask11")
    return cmap, BoundaryNorm(np.arange(NUM_MASK_CLASSES + 1) - 0.5, NUM_MASK_CLASSES)


def _band_limit(shape: tuple[int, ...]) -> int:
    if len(shape) != 2 or shape[0] % 2 or shape[1] != shape[0] - 1:
        raise ValueError(f"expected a dh grid [2L, 2L - 1], got {tuple(shape)}")
    return shape[0] // 2


def _grid_points(L: int) -> np.ndarray:
    """Unit vectors of the dh grid, float64 ``[2L, 2L - 1, 3]``."""
    th = np.pi * (2 * np.arange(2 * L) + 1) / (4 * L)
    ph = 2 * np.pi * np.arange(2 * L - 1) / (2 * L - 1)
    th, ph = np.meshgrid(th, ph, indexing="ij")
    return np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], axis=-1)


def centroid_direction(image: np.ndarray) -> np.ndarray:
    """Direction of the intensity centroid of a spherical image.

    Args:
      image: float ``[2L, 2L - 1]`` (non-negative intensities on the dh grid).

    Returns:
      float64 ``[3]``: the normalised area-weighted mean of ``f(x) x``; the south pole when the
      image is empty or its mass has no preferred direction (several digits around the sphere).
    """
    f = np.clip(np.asarray(image, np.float64), 0, None)
    L = _band_limit(f.shape)
    th = np.pi * (2 * np.arange(2 * L) + 1) / (4 * L)
    w = (f * np.sin(th)[:, None])[..., None]  # sin(theta): area element of the equiangular grid
    m = (w * _grid_points(L)).sum(axis=(0, 1))
    norm = np.linalg.norm(m)
    if w.sum() <= 0 or norm < 1e-3 * w.sum():
        return SOUTH_POLE.copy()
    return m / norm


def view_frame(view) -> np.ndarray:
    """Orthonormal frame ``[3, 3]`` of a globe picture: rows (right, down, v).

    ``right`` and ``down`` are ``Q e_x`` and ``Q e_y`` for the smallest rotation ``Q`` taking the
    south pole ``(0, 0, -1)`` to the unit view direction ``v`` (``right x down = -v``: the viewer
    is outside the sphere, looking at ``v``).
    """
    v = np.asarray(view, np.float64)
    v = v / np.linalg.norm(v)
    u = np.cross(SOUTH_POLE, v)
    s, c = np.linalg.norm(u), float(np.dot(SOUTH_POLE, v))
    if s < 1e-12:
        Q = np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])  # antipode: half-turn about x
    else:
        K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
        Q = np.eye(3) + K + K @ K * ((1 - c) / s**2)
    return np.stack([Q[:, 0], Q[:, 1], v])


def render_globe(image: np.ndarray, view=None, size: int = 128) -> np.ndarray:
    """Orthographic picture of a spherical image seen from outside along ``view``.

    Each pixel of a ``size x size`` canvas covering ``[-1, 1]^2`` is the point
    ``a right + b down + sqrt(1 - a^2 - b^2) v`` of the visible hemisphere (see
    :func:`view_frame`), converted to ``(theta, phi)`` and sampled at the nearest dh grid point.

    Args:
      image: ``[2L, 2L - 1]`` values on the dh grid (intensities, or an integer mask).
      view: unit-ish vector ``[3]`` the picture is centred on; default the image's centroid
        (:func:`centroid_direction`).
      size: canvas side in pixels.

    Returns:
      float64 ``[size, size]``: sampled values inside the disc, NaN outside.
    """
    f = np.asarray(image)
    L = _band_limit(f.shape)
    right, down, v = view_frame(centroid_direction(f) if view is None else view)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    b, a = np.meshgrid(c, c, indexing="ij")  # b: down (rows), a: right (columns)
    r2 = a**2 + b**2
    inside = r2 <= 1
    h = np.sqrt(np.clip(1 - r2, 0, None))
    p = a[..., None] * right + b[..., None] * down + h[..., None] * v
    theta = np.arccos(np.clip(p[..., 2], -1, 1))
    phi = np.mod(np.arctan2(p[..., 1], p[..., 0]), 2 * np.pi)
    t = np.clip(np.rint(theta * 2 * L / np.pi - 0.5), 0, 2 * L - 1).astype(int)
    q = np.rint(phi * (2 * L - 1) / (2 * np.pi)).astype(int) % (2 * L - 1)
    return np.where(inside, f[t, q].astype(np.float64), np.nan)


def _label_text(labels, i, class_names=None) -> str:
    lab = np.atleast_1d(np.asarray(labels)[i]).ravel()
    names = [str(int(x)) if class_names is None or class_names[int(x)] == str(int(x))
             else f"{int(x)} {class_names[int(x)]}" for x in lab]
    return ("label " if len(names) == 1 else "labels ") + ", ".join(names)


def plot_samples(images, masks, path, labels=None, view=None, globe_mask: bool = True, globe_size: int = 160,
                 class_names=None):
    """Write a PNG with one row per sample: image, mask, globe of the image (and of the mask).

    Args:
      images: float ``[B, 2L, 2L - 1]`` or ``[B, 2L, 2L - 1, 1]`` spherical images (dh grid,
        intensities in [0, 1]); shown equirectangular (theta down, phi right), grey scale.
      masks: int ``[B, 2L, 2L - 1]`` class maps, 0 = background (black), digit ``c`` as class
        ``c + 1`` in the 11-colour map of :func:`mask_colormap`.
      path: output file (PNG).
      labels: optional int ``[B]`` or ``[B, k]`` digit labels, written in the row titles.
      view: globe view direction ``[3]`` for every sample; default each sample's centroid
        (:func:`centroid_direction`; the south pole when there is none).
      globe_mask: also draw the mask on the globe (same view) to check its alignment.
      globe_size: side of the globe pictures in pixels.
      class_names: optional 10 names shown next to the labels.

    Returns:
      ``path``.
    """
    images = np.asarray(images, np.float64)
    masks = np.asarray(masks)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or masks.shape != images.shape:
        raise ValueError(f"images [B, 2L, 2L-1(, 1)] and masks [B, 2L, 2L-1] expected, got {images.shape} and {masks.shape}")
    L = _band_limit(images.shape[1:])
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} samples")
    cmap_mask, norm_mask = mask_colormap()
    cmap_grey = matplotlib.colormaps["gray"].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    cmap_globe_mask = cmap_mask.with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    vmax = max(1.0, float(images.max()))
    ncols = 4 if globe_mask else 3
    B = len(images)
    fig = Figure(figsize=(3.2 * ncols, 2.9 * B + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.array(fig.subplots(B, ncols, squeeze=False))
    extent = (0.0, 360.0, 180.0, 0.0)  # phi right, theta down (north pole at the top)
    for i in range(B):
        d = centroid_direction(images[i]) if view is None else np.asarray(view, float) / np.linalg.norm(view)
        th, ph = np.degrees(np.arccos(np.clip(d[2], -1, 1))), np.degrees(np.mod(np.arctan2(d[1], d[0]), 2 * np.pi))
        ax = axes[i, 0]
        ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=vmax, extent=extent, interpolation="nearest", aspect="auto")
        ax.set_ylabel((_label_text(labels, i, class_names) + "\n" if labels is not None else "") + "theta (deg)")
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.set_yticks([0, 90, 180])
        ax.set_title("image", fontsize=9)
        ax = axes[i, 1]
        ax.imshow(masks[i], cmap=cmap_mask, norm=norm_mask, extent=extent, interpolation="nearest", aspect="auto")
        present = [int(c) - 1 for c in np.unique(masks[i]) if c > 0]
        ax.set_title("mask: digits " + (", ".join(map(str, present)) or "none"), fontsize=9)
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.set_yticks([0, 90, 180])
        globes = [(render_globe(images[i], d, globe_size), dict(cmap=cmap_grey, vmin=0.0, vmax=vmax), "globe")]
        if globe_mask:
            globes.append((render_globe(masks[i], d, globe_size), dict(cmap=cmap_globe_mask, norm=norm_mask), "globe mask"))
        for j, (pic, kw, name) in enumerate(globes):
            ax = axes[i, 2 + j]
            ax.imshow(np.ma.masked_invalid(pic), extent=(-1, 1, 1, -1), interpolation="nearest", **kw)
            ax.add_patch(Circle((0, 0), 1.0, fill=False, lw=0.8, color="0.5"))
            ax.set_title(f"{name}, view theta={th:.0f} phi={ph:.0f}", fontsize=9)
            ax.set_xlim(-1.02, 1.02)
            ax.set_ylim(1.02, -1.02)
            ax.set_aspect("equal")
            ax.axis("off")
    fig.suptitle(f"{B} spherical samples, dh grid L={L} ({2 * L} x {2 * L - 1})", fontsize=10)
    _save(fig, path)
    return path


def plot_predictions(images, targets, preds, path, title: str = ""):
    """Write a PNG with one row per sample: image, target mask, predicted mask (equirectangular).

    Args:
      images: float ``[B, 2L, 2L - 1]`` or ``[B, 2L, 2L - 1, 1]``; targets, preds: int ``[B, 2L, 2L - 1]``.
      path: output PNG. title: figure title.
    """
    images = np.asarray(images, np.float64)
    if images.ndim == 4:
        images = images[..., 0]
    targets, preds = np.asarray(targets), np.asarray(preds)
    if not (images.shape == targets.shape == preds.shape):
        raise ValueError(f"shapes differ: images {images.shape}, targets {targets.shape}, preds {preds.shape}")
    cmap_mask, norm_mask = mask_colormap()
    B = len(images)
    fig = Figure(figsize=(9.6, 2.6 * B + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.array(fig.subplots(B, 3, squeeze=False))
    extent = (0.0, 360.0, 180.0, 0.0)
    for i in range(B):
        axes[i, 0].imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0, extent=extent, aspect="auto", interpolation="nearest")
        axes[i, 1].imshow(targets[i], cmap=cmap_mask, norm=norm_mask, extent=extent, aspect="auto", interpolation="nearest")
        axes[i, 2].imshow(preds[i], cmap=cmap_mask, norm=norm_mask, extent=extent, aspect="auto", interpolation="nearest")
        acc = float((targets[i] == preds[i]).mean())
        for j, name in enumerate(("image", "target", f"prediction (pixel acc {acc:.2f})")):
            axes[i, j].set_title(name, fontsize=9)
            axes[i, j].set_xticks([0, 180, 360])
            axes[i, j].set_yticks([0, 90, 180])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return path
