"""Calibration, normalisation and the scoring pieces on hand-made maps with known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.calibrate import fit_threshold, leave_one_out, normalise_map, normalise_score
from model.config import Calibration, ScoringConfig
from model.data import split_holdout
from model.report import ImageScore, near_chance_warning, per_defect
from model.scoring import anomaly_maps, image_scores

# No blur and no reference map unless a test turns them on: values stay hand-computable.
PLAIN = ScoringConfig(distance="euclidean", neighbourhood=1, search_radius=0, blur_sigma_at_512=0.0)


def _constant_maps(levels: list[float], size: int = 16) -> torch.Tensor:
    return torch.tensor(levels).view(-1, 1, 1).expand(-1, size, size).contiguous()


def test_leave_one_out_subtracts_the_mean_of_the_other_maps() -> None:
    maps = torch.randn(5, 8, 8)
    adjusted, reference = leave_one_out(maps)
    for i in range(5):
        others = torch.cat([maps[:i], maps[i + 1 :]]).mean(0)
        torch.testing.assert_close(adjusted[i], maps[i] - others)
    torch.testing.assert_close(reference, maps.mean(0))


def test_calibrate_threshold_is_mean_plus_sigmas_times_the_spread_of_normal_scores() -> None:
    levels = [1.0, 2.0, 3.0, 4.0, 10.0]
    config = PLAIN.model_copy(update={"threshold_sigmas": 2.0})
    calibration = fit_threshold(_constant_maps(levels), config)
    assert calibration.normal_mean == pytest.approx(4.0)
    assert calibration.normal_std == pytest.approx(float(np.std(levels, ddof=1)))
    assert calibration.threshold == pytest.approx(4.0 + 2.0 * np.std(levels, ddof=1))
    assert calibration.num_images == 5


def test_calibrate_map_threshold_is_the_configured_quantile_of_normal_pixels() -> None:
    # 3 maps of 20 x 20 = 1200 pixels, values 0..1199 in some order.
    maps = torch.randperm(1200).float().view(3, 20, 20)
    config = PLAIN.model_copy(update={"map_threshold_quantile": 0.99})
    calibration = fit_threshold(maps, config)
    assert calibration.map_threshold == pytest.approx(np.quantile(np.arange(1200), 0.99))
    assert calibration.map_mean == pytest.approx(599.5)


def test_calibrate_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fit_threshold(torch.zeros(1, 8, 8), PLAIN)


def test_image_score_is_the_mean_of_the_top_k_pixels_scaled_from_512_by_area() -> None:
    # 64 x 64 = 4096 pixels: k = 256 * 4096 / 512^2 = 4.
    config = PLAIN.model_copy(update={"top_k_at_512": 256})
    anomaly_map = torch.zeros(1, 64, 64)
    anomaly_map[0, 0, :6] = torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0, 1.0])
    assert float(image_scores(anomaly_map, config)) == pytest.approx((9 + 7 + 5 + 3) / 4)
    # A 32 x 32 map gives k = 1: the maximum.
    assert float(image_scores(anomaly_map[:, :32, :32], config)) == pytest.approx(9.0)


CALIBRATION = Calibration(
    threshold=5.0, normal_mean=3.0, normal_std=1.0, map_threshold=2.0, map_mean=1.0, num_images=4
)


@pytest.mark.parametrize(
    ("raw", "expected"), [(3.0, 0.0), (4.0, 0.25), (5.0, 0.5), (6.0, 0.75), (7.0, 1.0), (99.0, 1.0)]
)
def test_normalised_score_puts_the_normal_mean_at_0_and_the_threshold_at_half(
    raw: float, expected: float
) -> None:
    assert normalise_score(CALIBRATION, raw) == pytest.approx(expected)


def test_normalised_map_puts_the_map_mean_at_0_and_the_pixel_threshold_at_half() -> None:
    raw = np.array([[0.0, 1.0, 1.5], [2.0, 2.5, 3.0]], dtype=np.float32)
    expected = np.array([[0.0, 0.0, 0.25], [0.5, 0.75, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(normalise_map(CALIBRATION, raw), expected)


def test_a_peak_far_above_the_threshold_is_the_only_saturated_place() -> None:
    # Threshold 2, span 1: the peak at 10 is 8 spans above, so the slope above is 1/8.
    raw = np.array([[1.0, 2.0, 4.0, 6.0, 10.0]], dtype=np.float32)
    expected = np.array([[0.0, 0.5, 0.625, 0.75, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(normalise_map(CALIBRATION, raw), expected)


def test_held_out_images_are_every_nth_and_never_trained_on() -> None:
    paths = [Path(f"{i:03d}.png") for i in range(20)]
    train, held = split_holdout(paths, 4)
    assert held == [paths[i] for i in (3, 7, 11, 15, 19)]
    assert not set(train) & set(held)
    assert sorted(train + held) == paths


def _features(*deviations: tuple[int, float], size: int = 8) -> dict[int, torch.Tensor]:
    """Two layers of (1, 2, size, size) zeros; each deviation sets layer 1's or 2's first
    channel at the centre."""
    maps = {1: torch.zeros(1, 2, size, size), 2: torch.zeros(1, 2, size, size)}
    for layer, value in deviations:
        maps[layer][0, 0, size // 2, size // 2] = value
    return maps


def test_the_map_is_the_sum_of_the_layers_distances() -> None:
    reconstruction = _features()
    size = (8, 8)
    one = anomaly_maps(_features((1, 3.0)), reconstruction, (1, 2), size, PLAIN)
    other = anomaly_maps(_features((2, 4.0)), reconstruction, (1, 2), size, PLAIN)
    both = anomaly_maps(_features((1, 3.0), (2, 4.0)), reconstruction, (1, 2), size, PLAIN)
    assert float(both[0, 4, 4]) == pytest.approx(7.0)
    torch.testing.assert_close(both, one + other)


@pytest.mark.parametrize("size", [64, 128])
def test_the_blur_scales_with_image_size(size: int) -> None:
    config = PLAIN.model_copy(update={"blur_sigma_at_512": 32.0})
    blurred = anomaly_maps(
        _features((1, 1.0), size=size), _features(size=size), (1,), (size, size), config
    )[0]
    # The blurred spike's spread along one axis is the kernel's sigma: 32 * size / 512.
    profile = blurred.sum(0)
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    spread = float(torch.sqrt((profile * offsets**2).sum() / profile.sum()))
    assert spread == pytest.approx(32.0 * size / 512, rel=0.05)


def test_the_pixel_term_is_scaled_to_the_feature_maps_peak() -> None:
    config = PLAIN.model_copy(update={"pixel_weight": 0.5})
    pixel = torch.zeros(1, 1, 8, 8)
    pixel[0, 0, 0, 0] = 4.0
    anomaly_map = anomaly_maps(_features((1, 2.0)), _features(), (1,), (8, 8), config, pixel)[0]
    # Feature peak 2 at the centre; the pixel term 0.5 * (2 / 4) * 4 = 1 at the corner.
    assert float(anomaly_map[4, 4]) == pytest.approx(2.0)
    assert float(anomaly_map[0, 0]) == pytest.approx(1.0)


def _row(defect: str, raw: float, threshold: float = 1.0) -> ImageScore:
    label = int(defect != "good")
    return ImageScore(f"{defect}/x.png", defect, label, raw, raw / 2, raw > threshold, 0)


def test_the_per_defect_table_counts_right_verdicts_and_ranks_each_defect_against_good() -> None:
    rows = [_row("good", 0.5), _row("good", 0.8), _row("good", 1.5)]
    rows += [_row("crack", 2.0), _row("crack", 3.0), _row("scratch", 0.7), _row("scratch", 1.2)]
    table = per_defect(rows)
    assert table["good"] == {
        "count": 3,
        "judged_right": 2 / 3,
        "mean_score": pytest.approx((0.25 + 0.4 + 0.75) / 3),
        "image_auroc": None,
    }
    assert table["crack"]["image_auroc"] == 1.0 and table["crack"]["judged_right"] == 1.0
    # scratch 0.7 beats 0.5 only; 1.2 beats 0.5 and 0.8: (1 + 2) / 6.
    assert table["scratch"]["image_auroc"] == pytest.approx(0.5)
    assert table["scratch"]["judged_right"] == 0.5


def test_a_model_near_chance_is_called_so() -> None:
    assert "near chance" in (near_chance_warning(0.511) or "")
    assert near_chance_warning(0.93) is None
