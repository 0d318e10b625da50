"""Fusing the reconstruction's map and the memory's: the rule, its per-product constants and
the per-map reference decision, on hand-made maps with known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.calibrate import fit_map_scale, map_scales, takes_reference
from model.config import Calibration, MapCalibration, ScoringConfig
from model.scoring import MapScale, fuse_maps

# No blur: image scores stay hand-computable (k = 1 on these small maps).
PLAIN = ScoringConfig(blur_sigma_at_512=0.0)
ZEROS = torch.zeros(1, 2)


def _maps(reconstruction: list[float], memory: list[float]) -> dict[str, torch.Tensor]:
    return {
        "reconstruction": torch.tensor([reconstruction]),
        "memory": torch.tensor([memory]),
    }


SCALES = {
    "reconstruction": MapScale(ZEROS[0], low=1.0, high=2.0),
    "memory": MapScale(ZEROS[0], low=0.0, high=2.0),
}


def test_the_preset_rule_adds_the_reconstruction_only_past_its_normal_range() -> None:
    # Rescaled: reconstruction (0.5 - 1) / 1 = -0.5 and (4 - 1) / 1 = 3; memory 1 / 2 = 0.5.
    fused = fuse_maps(_maps([0.5, 4.0], [1.0, 1.0]), SCALES, "memory_plus_excess")
    torch.testing.assert_close(fused, torch.tensor([[0.5, 0.5 + 2.0]]))


def test_the_mean_rule_averages_the_rescaled_maps() -> None:
    fused = fuse_maps(_maps([0.5, 4.0], [1.0, 1.0]), SCALES, "mean")
    torch.testing.assert_close(fused, torch.tensor([[(-0.5 + 0.5) / 2, (3.0 + 0.5) / 2]]))


def test_each_map_is_taken_less_its_own_reference_before_it_is_rescaled() -> None:
    scales = {
        "reconstruction": MapScale(torch.tensor([0.0, 2.0]), low=1.0, high=2.0),
        "memory": MapScale(torch.tensor([1.0, 0.0]), low=0.0, high=2.0),
    }
    fused = fuse_maps(_maps([0.5, 4.0], [1.0, 1.0]), scales, "mean")
    # Reconstruction (0.5 - 0 - 1) = -0.5, (4 - 2 - 1) = 1; memory (1 - 1) / 2 = 0, 1 / 2.
    torch.testing.assert_close(fused, torch.tensor([[-0.25, 0.75]]))


def test_swapping_the_two_maps_constants_changes_the_fused_map() -> None:
    maps = _maps([0.5, 4.0], [1.0, 3.0])
    swapped = {"reconstruction": SCALES["memory"], "memory": SCALES["reconstruction"]}
    assert not torch.allclose(
        fuse_maps(maps, SCALES, "memory_plus_excess"),
        fuse_maps(maps, swapped, "memory_plus_excess"),
    )


def test_one_map_is_taken_as_it_is_and_a_calibration_from_before_the_memory_unscaled() -> None:
    reference = torch.tensor([[0.25, 0.5], [1.0, 0.0]])
    calibration = Calibration(
        threshold=1, normal_mean=0, normal_std=1, map_threshold=1, map_mean=0, num_images=2
    )
    scales = map_scales(calibration, {"reconstruction": reference}, size=2)
    maps = {"reconstruction": torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])}
    # Exactly the map less its reference, as such a folder was served before.
    fused = fuse_maps(maps, scales, "memory_plus_excess")
    assert torch.equal(fused, maps["reconstruction"] - reference)


def test_a_calibrated_map_takes_its_reference_only_where_calibration_chose_it() -> None:
    calibration = Calibration(
        maps={
            "reconstruction": MapCalibration(reference=True, low=0.0, high=1.0),
            "memory": MapCalibration(reference=False, low=0.0, high=1.0),
        },
        threshold=1,
        normal_mean=0,
        normal_std=1,
        map_threshold=1,
        map_mean=0,
        num_images=2,
    )
    references = {"reconstruction": torch.ones(2, 2)}
    scales = map_scales(calibration, references, size=2)
    assert torch.equal(scales["reconstruction"].reference, torch.ones(2, 2))
    assert torch.equal(scales["memory"].reference, torch.zeros(2, 2))


def test_a_maps_constants_are_its_normal_pixels_quantiles() -> None:
    # 4 maps of 25 pixels: values 0..99 in some order.
    maps = torch.randperm(100).float().view(4, 5, 5)
    scale, adjusted, reference = fit_map_scale(maps, takes_reference=False)
    assert reference is None and torch.equal(adjusted, maps)
    assert scale.low == pytest.approx(np.quantile(np.arange(100), 0.90))
    assert scale.high == pytest.approx(np.quantile(np.arange(100), 0.995))
    assert not scale.reference


def test_with_its_reference_a_maps_constants_come_from_each_map_less_the_others_mean() -> None:
    # Every map the same structure plus its own level: less the others' mean, only the
    # levels' differences remain.
    structure = torch.arange(16.0).view(4, 4)
    levels = torch.tensor([1.0, 2.0, 3.0, 6.0])
    maps = structure + levels.view(-1, 1, 1)
    scale, adjusted, reference = fit_map_scale(maps, takes_reference=True)
    assert reference is not None
    torch.testing.assert_close(reference, structure + 3.0)
    # Each map minus the mean of the other three: (1-11/3), (2-10/3), (3-3), (6-2).
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0])
    torch.testing.assert_close(adjusted, expected.view(-1, 1, 1).expand(-1, 4, 4))
    assert scale.reference and scale.high > scale.low


def _anomalies(
    normal: torch.Tensor, copies: int, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` of each normal map with a square of `strength` added at a place that moves."""
    maps, masks = [], []
    n, size = normal.shape[0], normal.shape[-1]
    for k in range(copies):
        for j in range(n):
            mask = torch.zeros(size, size, dtype=torch.bool)
            y, x = (3 * j + 5 * k) % (size - 4), (7 * j + 2 * k) % (size - 4)
            mask[y : y + 4, x : x + 4] = True
            maps.append(normal[j] + strength * mask)
            masks.append(mask)
    return torch.stack(maps), torch.stack(masks)


def test_a_map_whose_normals_share_a_hot_spot_takes_its_reference() -> None:
    # Every normal part shows the same bright border (a fixture), above any defect.
    generator = torch.Generator().manual_seed(0)
    normal = 0.1 * torch.randn(8, 24, 24, generator=generator)
    normal[:, :, :3] += 5.0
    anomalous, masks = _anomalies(normal, 4, strength=1.0)
    assert takes_reference(normal, anomalous, masks, PLAIN)


def test_a_map_whose_normals_share_nothing_does_without_its_reference() -> None:
    # Three normals with no common structure: a reference of two of them is only noise.
    generator = torch.Generator().manual_seed(1)
    normal = torch.randn(3, 24, 24, generator=generator)
    anomalous, masks = _anomalies(normal, 4, strength=1.5)
    assert not takes_reference(normal, anomalous, masks, PLAIN)
