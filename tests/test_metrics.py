"""Tests of the anomaly-detection metrics against hand-computed values and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from model.metrics import aupro, f1_max, image_metrics, pixel_metrics

# Four samples, two anomalous. Sorted by score: 0.8 (A), 0.4 (N), 0.35 (A), 0.1 (N).
# AUROC: of the 4 (anomalous, normal) pairs only (0.35, 0.4) is misordered -> 3/4.
# AP: recall steps to 1/2 at precision 1 (0.8), then to 1 at precision 2/3 (0.35)
#     -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
# F1 per threshold: 0.8 -> P=1, R=1/2, F1=2/3; 0.4 -> P=1/2, R=1/2, F1=1/2;
#     0.35 -> P=2/3, R=1, F1=4/5; 0.1 -> P=1/2, R=1, F1=2/3. Max 4/5.
HAND_LABELS = np.array([0, 0, 1, 1])
HAND_SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_image_metrics_hand_case() -> None:
    result = image_metrics(HAND_LABELS, HAND_SCORES)
    assert result == pytest.approx({"image_auroc": 0.75, "image_ap": 5 / 6, "image_f1": 0.8})


def test_f1_max_hand_case() -> None:
    assert f1_max(HAND_LABELS.astype(bool), HAND_SCORES) == pytest.approx(0.8)


def test_pixel_metrics_hand_case() -> None:
    # The same four values as one 2x2 image; the anomalous bottom row is one region.
    # AUPRO: normals score 0.1 and 0.4. Above 0.4 only the 0.8 pixel is found: (FPR 0, PRO 1/2);
    # at 0.4: (FPR 1/2, PRO 1/2). PRO is 1/2 all the way to FPR 0.3, so AUPRO = 1/2.
    masks = HAND_LABELS.reshape(1, 2, 2)
    maps = HAND_SCORES.reshape(1, 2, 2)
    result = pixel_metrics(masks, maps)
    expected = {"pixel_auroc": 0.75, "pixel_ap": 5 / 6, "pixel_f1": 0.8, "aupro": 0.5}
    assert result == pytest.approx(expected)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 3x5 image: region A is pixel (0, 0); region B is the 2x2 block at rows 1-2, cols 3-4."""
    masks = np.zeros((1, 3, 5), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1:3, 3:5] = True
    maps = np.zeros((1, 3, 5))
    # Ten normal pixels scored 0.95, 0.9, 0.8, ..., 0.1: every normal pixel is 1/10 of FPR.
    maps[0][~masks[0]] = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    maps[0, 0, 0] = 1.0
    maps[0, 1:3, 3:5] = [[0.97, 0.8], [0.75, 0.0]]
    return masks, maps


def test_aupro_two_regions_hand_case() -> None:
    # Curve (FPR, PRO) as the threshold falls:
    #   above 0.95: A found (1), B has 0.97 (1/4)          -> (0.0, (1 + 1/4) / 2 = 0.625)
    #   0.95, 0.9:  only normals join                      -> (0.1, 0.625), (0.2, 0.625)
    #   0.8:        a normal and B's 0.8 join together     -> (0.3, (1 + 2/4) / 2 = 0.75)
    # fpr_limit 0.25: PRO at 0.25 interpolates to 0.6875. Area = 0.2 * 0.625
    #   + 0.05 * (0.625 + 0.6875) / 2 = 0.1578125, divided by 0.25 -> 0.63125.
    # fpr_limit 0.3: area = 0.125 + 0.1 * (0.625 + 0.75) / 2 = 0.19375, / 0.3 -> 0.6458333.
    masks, maps = _two_region_case()
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.63125)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.19375 / 0.3)


def test_aupro_regions_are_8_connected_within_an_image() -> None:
    # Pixels (0, 0), (0, 1) and (1, 2) touch only diagonally at (0, 1)-(1, 2): one region of 3.
    # Only (0, 0) beats the normals (all 0.5), so PRO is 1/3 up to FPR 1 (4-connectivity would
    # give two regions and PRO (1/2 + 0) / 2 = 1/4).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, :2] = True
    masks[0, 1, 2] = True
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 / 3)


def test_aupro_regions_do_not_join_across_images() -> None:
    # Image 0: region {(0, 0)} scored 1. Image 1: region {(0, 0), (0, 1)} scored 0. Separate
    # regions give PRO (1 + 0) / 2 = 1/2; merged through the image axis they would give 1/3.
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :] = True
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


def _random_case(seed: int, continuous: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), dtype=bool)
    for image in masks:
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, 16, size=2)
            height, width = rng.integers(1, 6, size=2)
            image[top : top + height, left : left + width] = True
    maps = rng.random(masks.shape) + 0.3 * masks
    if not continuous:
        # Two decimals make many ties between normal and anomalous pixels.
        maps = np.round(maps, 2)
    return masks, maps


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Every distinct score as a threshold, one region at a time: slow but plainly right."""
    region_scores = []
    for mask, score in zip(masks, maps, strict=True):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        region_scores += [score[labeled == k] for k in range(1, count + 1)]
    normal_scores = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal_scores >= threshold))
        pros.append(np.mean([np.mean(scores >= threshold) for scores in region_scores]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs, fprs[1:], pros, pros[1:], strict=False):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_reference_with_all_thresholds(seed: int, fpr_limit: float) -> None:
    masks, maps = _random_case(seed, continuous=False)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference_with_few_thresholds(fpr_limit: float) -> None:
    masks, maps = _random_case(2, continuous=True)
    expected = _reference_aupro(masks, maps, fpr_limit)
    got = aupro(masks, maps, fpr_limit=fpr_limit, num_thresholds=50)
    assert got == pytest.approx(expected, abs=1e-2)


def test_perfect_separation_gives_one() -> None:
    masks, _ = _random_case(3, continuous=True)
    maps = masks * 0.5 + 0.25
    labels = np.array([0, 1, 0, 1])
    assert image_metrics(labels, labels * 0.5 + 0.25) == pytest.approx(
        {"image_auroc": 1.0, "image_ap": 1.0, "image_f1": 1.0}
    )
    # AUPRO sums per-pixel weights 1 / (size * regions), so it reaches 1 only up to rounding.
    expected = {"pixel_auroc": 1.0, "pixel_ap": 1.0, "pixel_f1": 1.0, "aupro": 1.0}
    assert pixel_metrics(masks, maps) == pytest.approx(expected)


def test_inverted_maps_give_low_values() -> None:
    masks, _ = _random_case(4, continuous=True)
    maps = np.where(masks, 0.0, 1.0) + np.random.default_rng(4).random(masks.shape) * 0.1
    result = pixel_metrics(masks, maps)
    assert result["pixel_auroc"] == 0.0
    assert result["aupro"] == 0.0
    assert result["pixel_ap"] < 0.2
    # F1-max falls back to flagging every pixel: precision = anomalous fraction, recall 1.
    fraction = masks.mean()
    assert result["pixel_f1"] == pytest.approx(2 * fraction / (fraction + 1))
    inverted = image_metrics(HAND_LABELS, -HAND_SCORES)
    assert inverted["image_auroc"] == pytest.approx(0.25)


def test_aupro_on_a_full_test_set_matches_the_analytic_curve() -> None:
    # Normal pixels ~ U(0, 1), defect pixels ~ U(0.5, 1.5): at FPR f the threshold is 1 - f
    # and every region's overlap is 0.5 + f, so the area up to 0.3, over 0.3, is 0.65.
    rng = np.random.default_rng(5)
    masks = np.zeros((100, 256, 256), dtype=bool)
    masks[:, 100:140, 60:90] = True
    masks[::2, 10:20, 200:250] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    assert aupro(masks, maps) == pytest.approx(0.65, abs=2e-3)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        (np.zeros(4), np.arange(4.0), "no anomalous"),
        (np.ones(4), np.arange(4.0), "no normal"),
        (np.array([0, 1, 1]), np.arange(4.0), "equal length"),
        (np.array([0, 2, 1, 0]), np.arange(4.0), "boolean or 0/1"),
        (np.array([0, 1, 1, 0]), np.array([0.0, np.nan, 1.0, 2.0]), "NaN"),
    ],
)
def test_image_metrics_rejects_degenerate_input(
    labels: np.ndarray, scores: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        image_metrics(labels, scores)


def test_f1_max_rejects_a_single_class() -> None:
    with pytest.raises(ValueError, match="no anomalous"):
        f1_max(np.zeros(4, dtype=bool), np.arange(4.0))


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "no anomalous"),
        (np.ones((2, 4, 4)), np.zeros((2, 4, 4)), "no normal"),
        (np.eye(4)[None], np.zeros((1, 4, 5)), "shape"),
        (np.eye(4), np.zeros((4, 4)), "shape"),
        (np.eye(4)[None] * 255, np.zeros((1, 4, 4)), "boolean or 0/1"),
    ],
)
def test_pixel_metrics_and_aupro_reject_degenerate_input(
    masks: np.ndarray, maps: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pixel_metrics(masks, maps)
    with pytest.raises(ValueError, match=message):
        aupro(masks, maps)


@pytest.mark.parametrize(("fpr_limit", "num_thresholds"), [(0.0, 100), (1.5, 100), (0.3, 0)])
def test_aupro_rejects_bad_parameters(fpr_limit: float, num_thresholds: int) -> None:
    masks, maps = _two_region_case()
    with pytest.raises(ValueError, match="fpr_limit|num_thresholds"):
        aupro(masks, maps, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
