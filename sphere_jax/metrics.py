"""Classification and segmentation metrics for spherical images.

Classification: :func:`accuracy` on ``logits [B, K]`` and integer ``labels [B]``.

Segmentation: every metric comes from one dataset-level confusion matrix summed over all
test pixels (not a mean of per-image scores). Images are dh (Driscoll-Healy) S2 signals
``[B, 2L, 2L - 1]`` (``[batch, theta, phi]``, see :mod:`sphere_jax.grids`). Two variants:

* plain: every pixel counts 1. The dh grid crowds pixels near the poles, so this
  over-weights polar regions.
* area-weighted: every pixel counts its solid angle (:func:`area_weights`, summing to
  ``4 pi`` per image), so the metrics measure fractions of the sphere's surface.

The confusion matrix is indexed ``cm[target, pred]`` (rows = ground truth, columns =
prediction). Class 0 is the background; ``miou_digits`` leaves it out.

Device-side functions (:func:`logits_to_pred`, :func:`accuracy`, :func:`confusion_matrix`)
are pure ``jax.numpy`` and jit-able. :func:`segmentation_metrics` and
:class:`ConfusionAccumulator` work on the host in float64 numpy.
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax.grids import area_weights as _grid_area_weights

__all__ = [
    "logits_to_pred",
    "accuracy",
    "confusion_matrix",
    "area_weights",
    "segmentation_metrics",
    "ConfusionAccumulator",
    "segmentation_metrics_from_batches",
]


# ---------------------------------------------------------------------------------------
# Device side (jax.numpy, jit-able)


def logits_to_pred(logits: jax.Array) -> jax.Array:
    """Predicted class per element: ``argmax`` over the last axis.

    Args:
      logits: float ``[..., K]`` (scores, logits or probabilities).

    Returns:
      int32 ``[...]``. Ties go to the lowest class index.
    """
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Classification accuracy, the fraction of ``argmax(logits) == labels``.

    Args:
      logits: float ``[B, K]``.
      labels: int ``[B]``, class indices in ``[0, K)``.

    Returns:
      float32 scalar in ``[0, 1]``. Jit-able.
    """
    pred = logits_to_pred(logits)
    return jnp.mean((pred == labels.astype(jnp.int32)).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(
    pred: jax.Array,
    target: jax.Array,
    num_classes: int,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Confusion matrix ``cm[target, pred]`` (rows = ground truth), summed over all elements.

    Args:
      pred: int ``[...]``, predicted classes, e.g. ``[B, 2L, 2L - 1]``.
      target: int, same shape as ``pred``, true classes.
      num_classes: ``K`` (static under jit).
      weights: optional float, broadcastable to ``pred.shape``; each element adds its weight
        instead of 1. For area weighting pass the solid-angle map ``area_weights(L)``
        ``[2L, 2L - 1]``, which broadcasts over the batch.

    Returns:
      float32 ``[K, K]``: ``cm[i, j]`` = (weighted) number of elements of true class ``i``
      predicted as ``j``. Elements whose ``pred`` or ``target`` lies outside ``[0, K)``
      (e.g. an ignore label ``-1``) are left out.

    Counts are float32: exact per call up to ``2**24`` elements in one cell; accumulate
    many batches with :class:`ConfusionAccumulator` (float64 on the host).
    """
    K = int(num_classes)
    pred = jnp.asarray(pred).astype(jnp.int32)
    target = jnp.asarray(target).astype(jnp.int32)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    if weights is None:
        w = jnp.ones(pred.shape, jnp.float32)
    else:
        w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), pred.shape)
    valid = (pred >= 0) & (pred < K) & (target >= 0) & (target < K)
    idx = jnp.where(valid, target * K + pred, 0).reshape(-1)
    w = jnp.where(valid, w, 0.0).reshape(-1)
    cm = jax.ops.segment_sum(w, idx, num_segments=K * K)
    return cm.reshape(K, K)


def area_weights(L: int) -> jax.Array:
    """Per-pixel solid angles of the dh grid, float32 ``[2L, 2L - 1]``, summing to ``4 pi``.

    A float32 copy of :func:`sphere_jax.grids.area_weights` (the dh quadrature weights
    repeated along longitude).
    """
    return jnp.asarray(_grid_area_weights(L), jnp.float32)


# ---------------------------------------------------------------------------------------
# Host side (numpy float64)


def _nanmean(x: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (no warning) when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def segmentation_metrics(cm) -> dict:
    """Segmentation metrics from a confusion matrix ``cm[target, pred]``.

    Args:
      cm: ``[K, K]`` counts or weights (any array type; converted to float64 numpy).

    Returns:
      dict with

      * ``pixel_accuracy``: float, ``trace(cm) / sum(cm)`` (NaN for an empty matrix).
      * ``per_class_iou``: float64 numpy ``[K]``, ``TP / (TP + FP + FN)`` per class;
        NaN for a class absent from both truth and prediction.
      * ``miou``: float, mean of ``per_class_iou`` over all ``K`` classes (background
        included), NaN entries excluded.
      * ``miou_digits``: float, the same mean over classes ``1 .. K-1`` (background
        class 0 excluded).
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square [K, K], got shape {cm.shape}")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp  # predicted as the class, truly another
    fn = cm.sum(axis=1) - tp  # truly the class, predicted as another
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
    total = cm.sum()
    return {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "per_class_iou": iou,
        "miou": _nanmean(iou),
        "miou_digits": _nanmean(iou[1:]),
    }


class ConfusionAccumulator:
    """Dataset-level confusion matrices accumulated over batches (float64, on the host).

    Args:
      num_classes: ``K``.
      weights: optional per-pixel area map broadcastable to each batch's ``pred`` shape,
        typically ``area_weights(L)`` ``[2L, 2L - 1]``. When given, an area-weighted matrix
        is accumulated next to the plain (pixel-count) one.

    Usage::

        acc = ConfusionAccumulator(K, weights=area_weights(L))
        for batch in test_set:
            acc.update(logits_to_pred(model(batch)), batch["mask"])   # [B, 2L, 2L-1] each
        metrics = acc.result()   # pixel_accuracy, miou, ..., area_pixel_accuracy, area_miou, ...
    """

    def __init__(self, num_classes: int, weights=None):
        self.num_classes = int(num_classes)
        self.weights = None if weights is None else jnp.asarray(weights, jnp.float32)
        self.reset()

    def reset(self) -> None:
        """Zero both matrices."""
        K = self.num_classes
        self.cm = np.zeros((K, K), np.float64)
        self.area_cm = None if self.weights is None else np.zeros((K, K), np.float64)

    def update(self, pred, target) -> None:
        """Add one batch: ``pred`` and ``target`` int, same shape (e.g. ``[B, 2L, 2L - 1]``)."""
        K = self.num_classes
        self.cm += np.asarray(confusion_matrix(pred, target, K), np.float64)
        if self.weights is not None:
            self.area_cm += np.asarray(
                confusion_matrix(pred, target, K, self.weights), np.float64
            )

    def result(self) -> dict:
        """Metrics of :func:`segmentation_metrics` on the plain matrix, and, when weights were
        given, the same on the area-weighted matrix with keys prefixed ``area_``."""
        out = segmentation_metrics(self.cm)
        if self.area_cm is not None:
            out.update({f"area_{k}": v for k, v in segmentation_metrics(self.area_cm).items()})
        return out


def segmentation_metrics_from_batches(
    batches: Iterable[tuple], num_classes: int, weights=None
) -> dict:
    """:meth:`ConfusionAccumulator.result` over an iterable of ``(pred, target)`` pairs."""
    acc = ConfusionAccumulator(num_classes, weights)
    for pred, target in batches:
        acc.update(pred, target)
    return acc.result()
