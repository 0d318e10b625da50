"""Anomaly-detection metrics: image-level and pixel-level AUROC, AP, F1-max, and AUPRO."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

# Regions are 8-connected within one image and never join across images: only the middle
# plane of the 3-D structuring element is set.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

# Enough thresholds that discretisation moves AUPRO by ~1e-4 on a 100-image 256x256 test set,
# few enough that bucketing millions of pixels stays fast.
_DEFAULT_THRESHOLDS = 3000


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over every threshold of the precision-recall curve (label 1 = anomalous)."""
    labels = _binary(np.asarray(labels), "labels")
    _check_both_classes(labels, "labels")
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    # The curve's last point is (precision=1, recall=0); points with both 0 have F1 = 0.
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, average precision and F1-max of per-image anomaly scores (label 1 = anomalous)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of equal length, got {labels.shape} and {scores.shape}"
        )
    y = _binary(labels, "labels")
    _check_finite(scores, "scores")
    _check_both_classes(y, "labels")
    return {
        "image_auroc": float(roc_auc_score(y, scores)),
        "image_ap": float(average_precision_score(y, scores)),
        "image_f1": f1_max(y, scores),
    }


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO of anomaly maps against ground-truth masks (N, H, W)."""
    mask, score = _prepare_pixels(masks, maps)
    # AUPRO first: it checks fpr_limit before the slower scikit-learn passes run.
    pro = _aupro(mask, score, fpr_limit, _DEFAULT_THRESHOLDS)
    flat_mask = mask.ravel()
    flat_score = score.ravel()
    return {
        "pixel_auroc": float(roc_auc_score(flat_mask, flat_score)),
        "pixel_ap": float(average_precision_score(flat_mask, flat_score)),
        "pixel_f1": f1_max(flat_mask, flat_score),
        "aupro": pro,
    }


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int = _DEFAULT_THRESHOLDS,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Thresholds are taken from the normal pixels' scores (at most ``num_thresholds`` of them,
    spread evenly in FPR over [0, fpr_limit]); when the normal pixels in that range have no
    more distinct scores than that, the result equals the exact curve's area.
    """
    mask, score = _prepare_pixels(masks, maps)
    return _aupro(mask, score, fpr_limit, num_thresholds)


def _aupro(mask: np.ndarray, score: np.ndarray, fpr_limit: float, num_thresholds: int) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be at least 1, got {num_thresholds}")

    normal = np.sort(score[~mask])
    n = normal.size
    # Rank r (from the top) picks a threshold with FPR >= r/n. The last rank puts one curve point
    # beyond fpr_limit (the +1 absorbs rounding in fpr_limit * n), so the end can be interpolated.
    last_rank = min(n, int(np.ceil(fpr_limit * n)) + 1)
    ranks = np.unique(np.round(np.linspace(1, last_rank, num_thresholds)).astype(np.int64))
    thresholds = np.unique(normal[n - ranks])

    # Normal pixels at or above (and strictly above) each threshold, from the sorted scores.
    fpr_ge = (n - np.searchsorted(normal, thresholds, side="left")) / n
    fpr_gt = (n - np.searchsorted(normal, thresholds, side="right")) / n

    # PRO is a mean over regions of per-region fractions, i.e. a sum over anomalous pixels of
    # 1 / (region size * region count): one weighted histogram over threshold buckets replaces
    # a (region, threshold) table.
    regions, num_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)
    region_of = regions[mask]
    sizes = np.bincount(region_of)
    weights = 1.0 / (sizes[region_of] * num_regions)
    anomalous = score[mask]
    pro_ge = _weight_above(thresholds, anomalous, weights, side="right")
    pro_gt = _weight_above(thresholds, anomalous, weights, side="left")

    # Walking thresholds downwards, each one contributes the point just above it and the point
    # at it. The "just above" points carry the vertical jumps made by anomalous pixels scored
    # between two thresholds; ties with normal pixels give the usual diagonal step.
    fpr = np.column_stack([fpr_gt, fpr_ge])[::-1].ravel()
    pro = np.column_stack([pro_gt, pro_ge])[::-1].ravel()

    # fpr[0] == 0 < fpr_limit and fpr[-1] >= fpr_limit, so both indices exist.
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))
    x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area = np.trapezoid(pro[:end], fpr[:end]) + (fpr_limit - x0) * (y0 + y_limit) / 2
    return float(area / fpr_limit)


def _weight_above(
    thresholds: np.ndarray, values: np.ndarray, weights: np.ndarray, side: Literal["left", "right"]
) -> np.ndarray:
    """Sum of weights of values >= each threshold (side="right") or > it (side="left")."""
    # bucket = how many thresholds the value is >= (side="right") or > (side="left"), so it
    # counts towards threshold k exactly when bucket > k.
    bucket = np.searchsorted(thresholds, values, side=side)
    hist = np.bincount(bucket, weights=weights, minlength=thresholds.size + 1)
    return np.cumsum(hist[::-1])[::-1][1:]


def _prepare_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check masks and maps and return them as bool and float32 arrays of shape (N, H, W)."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must both have shape (N, H, W), got {masks.shape} and {maps.shape}"
        )
    mask = _binary(masks, "masks")
    # float32 halves the memory of a full test set's maps (millions of pixels).
    score = maps.astype(np.float32, copy=False)
    _check_finite(score, "maps")
    _check_both_classes(mask, "masks")
    return mask, score


def _binary(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype == bool:
        return values
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1, got values {np.unique(values)[:5]}")
    return values.astype(bool)


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or infinite values")


def _check_both_classes(y: np.ndarray, name: str) -> None:
    positives = int(np.count_nonzero(y))
    if positives == 0 or positives == y.size:
        kind = "anomalous" if positives == 0 else "normal"
        raise ValueError(f"{name} contain no {kind} entries; the metric needs both classes")
