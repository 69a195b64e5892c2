"""Tests of sphere_jax.metrics: accuracy, confusion matrices, IoUs, area weighting."""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
import pytest

try:
    import sphere_jax  # noqa: F401
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sphere_jax import metrics  # noqa: E402
from sphere_jax.metrics import (  # noqa: E402
    ConfusionAccumulator,
    accuracy,
    area_weights,
    confusion_matrix,
    logits_to_pred,
    segmentation_metrics,
    segmentation_metrics_from_batches,
)


def _bincount_cm(pred, target, K, weights=None):
    """numpy reference: cm[target, pred] by bincount."""
    pred, target = np.asarray(pred), np.asarray(target)
    w = None if weights is None else np.broadcast_to(weights, pred.shape).ravel()
    pred, target = pred.ravel(), target.ravel()
    return np.bincount(target * K + pred, weights=w, minlength=K * K).reshape(K, K)


# ---------------------------------------------------------------- classification


def test_logits_to_pred():
    logits = jnp.array([[[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]])
    pred = logits_to_pred(logits)
    assert pred.dtype == jnp.int32 and pred.shape == (1, 2)
    np.testing.assert_array_equal(pred, [[1, 0]])


def test_accuracy_hand_case():
    logits = jnp.array(
        [
            [2.0, 0.0, 0.0],  # pred 0, label 0: right
            [0.0, 1.0, 0.5],  # pred 1, label 2: wrong
            [0.0, 0.0, 3.0],  # pred 2, label 2: right
            [0.0, 5.0, 1.0],  # pred 1, label 1: right
        ]
    )
    labels = jnp.array([0, 2, 2, 1])
    assert float(accuracy(logits, labels)) == pytest.approx(0.75)
    assert float(jax.jit(accuracy)(logits, labels)) == pytest.approx(0.75)
    assert float(accuracy(logits, jnp.array([1, 0, 0, 0]))) == 0.0


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_orientation():
    # one pixel of true class 2 predicted as 0: lands in row 2, column 0.
    cm = confusion_matrix(jnp.array([0]), jnp.array([2]), 3)
    assert cm.dtype == jnp.float32 and cm.shape == (3, 3)
    expected = np.zeros((3, 3))
    expected[2, 0] = 1
    np.testing.assert_array_equal(cm, expected)


@pytest.mark.parametrize("weighted", [False, True])
def test_confusion_matrix_jit_matches_bincount(weighted):
    rng = np.random.default_rng(0)
    K, shape = 5, (3, 8, 7)  # [B, 2L, 2L - 1] with L = 4
    pred = rng.integers(0, K, shape)
    target = rng.integers(0, K, shape)
    w = rng.uniform(0.1, 2.0, shape[1:]) if weighted else None
    f = jax.jit(confusion_matrix, static_argnames="num_classes")
    cm = f(jnp.asarray(pred), jnp.asarray(target), num_classes=K, weights=w)
    ref = _bincount_cm(pred, target, K, w)
    np.testing.assert_allclose(np.asarray(cm), ref, rtol=1e-5)
    if not weighted:
        assert float(cm.sum()) == pred.size


def test_confusion_matrix_drops_out_of_range_labels():
    pred = jnp.array([0, 1, 1, 2, 7])
    target = jnp.array([0, 1, -1, 2, 1])  # -1 (ignore) and pred 7 are left out
    cm = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(cm, np.eye(3))


def test_confusion_matrix_shape_mismatch():
    with pytest.raises(ValueError):
        confusion_matrix(jnp.zeros((2, 3), int), jnp.zeros((3, 2), int), 2)


# ---------------------------------------------------------------- IoU from hand-made matrices


def test_segmentation_metrics_three_classes_by_hand():
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # class 0: TP 5, FP = 2 (column) , FN = 1 (row)  -> 5/8
    # class 1: TP 3, FP = 1,          FN = 3          -> 3/7
    # class 2: TP 4, FP = 1,          FN = 0          -> 4/5
    ious = [5 / 8, 3 / 7, 4 / 5]
    m = segmentation_metrics(cm)
    assert m["pixel_accuracy"] == pytest.approx(12 / 16)
    np.testing.assert_allclose(m["per_class_iou"], ious)
    assert m["miou"] == pytest.approx(sum(ious) / 3)
    assert m["miou_digits"] == pytest.approx((3 / 7 + 4 / 5) / 2)
    assert isinstance(m["miou"], float) and isinstance(m["per_class_iou"], np.ndarray)


def test_iou_invariant_under_transpose():
    # IoU is symmetric in FP/FN, so cm and cm.T give the same IoUs; pixel accuracy too.
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    a, b = segmentation_metrics(cm), segmentation_metrics(cm.T)
    np.testing.assert_allclose(a["per_class_iou"], b["per_class_iou"])


def test_absent_class_is_nan_and_excluded_from_means():
    # class 2 never occurs in truth or prediction.
    cm = np.array(
        [
            [3, 1, 0, 0],
            [0, 2, 0, 1],
            [0, 0, 0, 0],
            [0, 0, 0, 4],
        ]
    )
    # class 0: 3/(3+0+1); class 1: 2/(2+1+1); class 3: 4/(4+1+0)
    m = segmentation_metrics(cm)
    iou = m["per_class_iou"]
    assert np.isnan(iou[2])
    np.testing.assert_allclose(iou[[0, 1, 3]], [3 / 4, 2 / 4, 4 / 5])
    assert m["miou"] == pytest.approx((3 / 4 + 2 / 4 + 4 / 5) / 3)
    assert m["miou_digits"] == pytest.approx((2 / 4 + 4 / 5) / 2)
    assert m["pixel_accuracy"] == pytest.approx(9 / 11)


def test_class_only_predicted_gets_zero_not_nan():
    # class 1 never true but predicted once: IoU 0, and it counts in the means.
    cm = np.array([[3, 1], [0, 0]])
    m = segmentation_metrics(cm)
    np.testing.assert_allclose(m["per_class_iou"], [3 / 4, 0.0])
    assert m["miou"] == pytest.approx(3 / 8)
    assert m["miou_digits"] == 0.0


def test_empty_and_background_only_matrices_give_nan_not_warnings():
    with np.errstate(all="raise"):
        m = segmentation_metrics(np.zeros((3, 3)))
        assert np.isnan(m["pixel_accuracy"]) and np.isnan(m["miou"]) and np.isnan(m["miou_digits"])
        m = segmentation_metrics(np.diag([7.0, 0.0, 0.0]))
        assert m["miou"] == 1.0 and np.isnan(m["miou_digits"])


def test_non_square_matrix_rejected():
    with pytest.raises(ValueError):
        segmentation_metrics(np.zeros((2, 3)))


def test_all_correct_gives_one_everywhere():
    L, K, B = 4, 11, 3
    rng = np.random.default_rng(1)
    target = rng.integers(0, K, (B, 2 * L, 2 * L - 1))
    target.reshape(-1)[:K] = np.arange(K)  # every class present
    acc = ConfusionAccumulator(K, weights=area_weights(L))
    acc.update(jnp.asarray(target), jnp.asarray(target))
    m = acc.result()
    for prefix in ("", "area_"):
        assert m[prefix + "pixel_accuracy"] == pytest.approx(1.0)
        np.testing.assert_allclose(m[prefix + "per_class_iou"], np.ones(K), rtol=1e-6)
        assert m[prefix + "miou"] == pytest.approx(1.0)
        assert m[prefix + "miou_digits"] == pytest.approx(1.0)
    # classification: one-hot logits of the labels
    labels = jnp.asarray(target[:, 0, 0])
    assert float(accuracy(jax.nn.one_hot(labels, K), labels)) == 1.0


# ---------------------------------------------------------------- area weighting


def test_area_weighting_on_hand_made_weight_map():
    # 2 x 3 image, bottom row weighs 3 times the top row.
    w = jnp.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    target = jnp.array([[[0, 0, 0], [1, 1, 1]]])
    pred = jnp.array([[[0, 0, 1], [1, 1, 1]]])  # one error, in the light top row
    np.testing.assert_array_equal(confusion_matrix(pred, target, 2), [[2, 1], [0, 3]])
    np.testing.assert_array_equal(confusion_matrix(pred, target, 2, w), [[2, 1], [0, 9]])

    acc = ConfusionAccumulator(2, weights=w)
    acc.update(pred, target)
    m = acc.result()
    assert m["pixel_accuracy"] == pytest.approx(5 / 6)
    assert m["area_pixel_accuracy"] == pytest.approx(11 / 12)  # error weighs less
    np.testing.assert_allclose(m["per_class_iou"], [2 / 3, 3 / 4])
    np.testing.assert_allclose(m["area_per_class_iou"], [2 / 3, 9 / 10])
    assert m["area_miou"] == pytest.approx((2 / 3 + 9 / 10) / 2)
    assert m["area_miou_digits"] == pytest.approx(9 / 10)

    # the weight map broadcasts over the batch: two copies double the matrix, same metrics
    acc2 = ConfusionAccumulator(2, weights=w)
    acc2.update(jnp.concatenate([pred, pred]), jnp.concatenate([target, target]))
    np.testing.assert_allclose(acc2.area_cm, 2 * acc.area_cm)
    assert acc2.result()["area_miou"] == pytest.approx(m["area_miou"])


def test_area_weights_of_dh_grid():
    L = 5
    w = area_weights(L)
    assert w.shape == (2 * L, 2 * L - 1) and w.dtype == jnp.float32
    assert float(w.sum()) == pytest.approx(4 * math.pi, rel=1e-5)
    assert bool(jnp.all(w > 0))
    # polar rows are smaller than equatorial ones
    assert float(w[0, 0]) < float(w[L, 0])
    # per-image weighted total is the sphere's area
    B = 2
    z = jnp.zeros((B, 2 * L, 2 * L - 1), jnp.int32)
    assert float(confusion_matrix(z, z, 3, w).sum()) == pytest.approx(B * 4 * math.pi, rel=1e-5)


def test_polar_errors_cost_less_area_than_pixels():
    L, K = 4, 3
    target = np.ones((1, 2 * L, 2 * L - 1), np.int64)
    pred = target.copy()
    pred[0, 0, :] = 2  # whole north-polar row wrong
    m = segmentation_metrics_from_batches(
        [(jnp.asarray(pred), jnp.asarray(target))], K, weights=area_weights(L)
    )
    assert m["area_pixel_accuracy"] > m["pixel_accuracy"]
    assert m["pixel_accuracy"] == pytest.approx(1 - 1 / (2 * L))
    wrong = float(area_weights(L)[0].sum())
    assert m["area_pixel_accuracy"] == pytest.approx(1 - wrong / (4 * math.pi), rel=1e-5)


# ---------------------------------------------------------------- accumulation


def test_accumulator_sums_batches_like_one_big_batch():
    rng = np.random.default_rng(2)
    K, L = 4, 3
    shape = (5, 2 * L, 2 * L - 1)
    pred, target = rng.integers(0, K, shape), rng.integers(0, K, shape)
    w = area_weights(L)
    acc = ConfusionAccumulator(K, weights=w)
    for i in range(0, 5, 2):
        acc.update(jnp.asarray(pred[i : i + 2]), jnp.asarray(target[i : i + 2]))
    np.testing.assert_allclose(acc.cm, _bincount_cm(pred, target, K))
    np.testing.assert_allclose(acc.area_cm, _bincount_cm(pred, target, K, np.asarray(w)), rtol=1e-5)
    assert acc.cm.dtype == np.float64
    m = acc.result()
    ref = segmentation_metrics(_bincount_cm(pred, target, K))
    np.testing.assert_allclose(m["per_class_iou"], ref["per_class_iou"])
    acc.reset()
    assert acc.cm.sum() == 0 and acc.area_cm.sum() == 0


def test_accumulator_without_weights_has_no_area_keys():
    acc = ConfusionAccumulator(3)
    acc.update(jnp.array([0, 1, 2]), jnp.array([0, 1, 1]))
    m = acc.result()
    assert set(m) == {"pixel_accuracy", "per_class_iou", "miou", "miou_digits"}
    assert acc.area_cm is None


def test_public_api():
    for name in metrics.__all__:
        assert hasattr(metrics, name)
