"""Segmentation metrics from a confusion matrix (pure numpy).

The test pass accumulates one confusion matrix over every valid test pixel (rows = true class,
columns = predicted class), so every metric below is exact over the whole test set rather than an
average of per-batch values.
"""
import numpy as np


def confusion_matrix(labels, predictions, number_classes):
    """Confusion matrix of integer label and prediction arrays of the same shape.

    Pixels whose label is negative (-1 = ignore: padding, or unlabelled pixels of a sparse
    annotation) are left out, so every metric counts annotated pixels only.
    Returns:
      int64 array [number_classes, number_classes], [true, predicted].
    """
    labels = np.asarray(labels).ravel()
    predictions = np.asarray(predictions).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in size")
    valid = labels >= 0
    index = labels[valid].astype(np.int64) * number_classes + predictions[valid].astype(np.int64)
    return np.bincount(index, minlength=number_classes ** 2).reshape(number_classes, number_classes)


def pixel_accuracy(confusion):
    """Fraction of valid pixels classified correctly (0 when there are none)."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else 0.0


def per_class_iou(confusion):
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from labels and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def per_class_dice(confusion):
    """Dice = 2 TP / (2 TP + FP + FN) per class; NaN for a class absent from labels and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def mean_iou(confusion):
    """Mean IoU over the classes present in labels or predictions (NaN if none)."""
    iou = per_class_iou(confusion)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def summarize(confusion):
    """All metrics of one confusion matrix as a flat dict (the columns of test_metrics.csv)."""
    row = {"pixel_accuracy": pixel_accuracy(confusion)}
    for k, value in enumerate(per_class_iou(confusion)):
        row[f"iou_{k}"] = float(value)
    for k, value in enumerate(per_class_dice(confusion)):
        row[f"dice_{k}"] = float(value)
    row["mean_iou"] = mean_iou(confusion)
    return row
