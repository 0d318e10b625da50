"""Feature distances and anomaly maps against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ScoringConfig
from model.features import min_cosine_distance, min_euclidean_distance
from model.scoring import anomaly_maps, neighbourhood_mean


def _grid(*vectors: tuple[float, ...]) -> torch.Tensor:
    """One sample whose positions (one row) hold the given feature vectors: (1, C, 1, N)."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, len(vectors[0]), 1, -1)


def test_min_euclidean_distance_hand_case() -> None:
    query = _grid((3.0, 0.0), (0.0, 0.0))
    reference = _grid((0.0, 4.0), (3.0, 1.0))
    # (3, 0): 5 to (0, 4), 1 to (3, 1). (0, 0): 4 to (0, 4), sqrt(10) to (3, 1).
    expected = torch.tensor([[[1.0, math.sqrt(10.0)]]])
    torch.testing.assert_close(min_euclidean_distance(query, reference), expected)


def test_min_cosine_distance_hand_case() -> None:
    query = _grid((1.0, 0.0), (0.0, 2.0))
    reference = _grid((0.0, 1.0), (1.0, 1.0))
    # (1, 0): cos 0 to (0, 1), 1/sqrt(2) to (1, 1). (0, 2): cos 1 to (0, 1).
    expected = torch.tensor([[[1.0 - 1.0 / math.sqrt(2.0), 0.0]]])
    torch.testing.assert_close(min_cosine_distance(query, reference), expected)


def test_only_euclidean_sees_a_change_of_magnitude() -> None:
    query = _grid((3.0, 4.0))
    reference = _grid((6.0, 8.0))
    assert float(min_cosine_distance(query, reference)) == pytest.approx(0.0, abs=1e-6)
    assert float(min_euclidean_distance(query, reference)) == pytest.approx(5.0)


def test_chunked_distances_match_brute_force() -> None:
    # 64 x 64 positions against as many: more than one chunk of query positions.
    query, reference = torch.randn(2, 8, 64, 64), torch.randn(2, 8, 64, 64)
    q, r = query.flatten(2).transpose(1, 2), reference.flatten(2).transpose(1, 2)
    euclidean = torch.cdist(q, r).amin(2).view(2, 64, 64)
    cosine = 1 - torch.bmm(
        torch.nn.functional.normalize(q, dim=2), torch.nn.functional.normalize(r, dim=2).mT
    ).amax(2).view(2, 64, 64)
    torch.testing.assert_close(
        min_euclidean_distance(query, reference), euclidean, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(min_cosine_distance(query, reference), cosine, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("distance", "darker_part_scores"), [("cosine", False), ("euclidean", True)]
)
def test_anomaly_maps_use_the_configured_distance(distance: str, darker_part_scores: bool) -> None:
    torch.manual_seed(0)
    rec = {3: torch.rand(1, 4, 8, 8) + 1.0}  # every channel in [1, 2]
    dimmed = rec[3].clone()
    dimmed[..., 2:4, 2:4] *= 0.3  # the same directions, weaker (<= 0.6): a dark spot
    config = ScoringConfig(distance=distance, blur_sigma_at_512=0.0)
    maps = anomaly_maps({3: dimmed}, rec, (3,), (8, 8), config)
    assert maps.shape == (1, 8, 8)
    spot = float(maps[0, 2:4, 2:4].mean())
    assert (spot > 0.1) is darker_part_scores


def test_neighbourhood_mean_averages_each_position_with_its_neighbours_inside_the_map() -> None:
    grid = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    mean = neighbourhood_mean(grid, 3)
    assert float(mean[0, 0, 1, 1]) == pytest.approx(4.0)  # all nine
    assert float(mean[0, 0, 0, 0]) == pytest.approx((0 + 1 + 3 + 4) / 4)  # no padding zeros
    assert float(mean[0, 0, 0, 1]) == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)
    assert neighbourhood_mean(grid, 1) is grid
    with pytest.raises(ValueError, match="must be odd"):
        ScoringConfig(neighbourhood=2)


def test_a_lone_outlying_position_weighs_less_than_a_defect_of_its_neighbourhood() -> None:
    rec = {3: torch.ones(1, 2, 9, 9)}
    lone, patch = rec[3].clone(), rec[3].clone()
    lone[..., 4, 4] = 4.0
    patch[..., 3:6, 3:6] = 2.0
    single = ScoringConfig(distance="euclidean", blur_sigma_at_512=0.0, neighbourhood=1)
    context = single.model_copy(update={"neighbourhood": 3})

    def peak(features: torch.Tensor, config: ScoringConfig) -> float:
        return float(anomaly_maps({3: features}, rec, (3,), (9, 9), config).max())

    # Alone, the lone position is the stronger one; in context the defect region is.
    assert peak(lone, single) > peak(patch, single)
    assert peak(lone, context) < peak(patch, context)


@pytest.mark.parametrize("distance", [min_cosine_distance, min_euclidean_distance])
def test_a_windowed_search_matches_brute_force_within_the_window(distance) -> None:
    torch.manual_seed(0)
    query, reference = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    ys, xs = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    cells = torch.stack([ys.flatten(), xs.flatten()], 1)
    near = (cells[:, None] - cells[None]).abs().amax(2) <= 1  # (N, N): within one cell
    q = query.flatten(2).transpose(1, 2)
    r = reference.flatten(2).transpose(1, 2)
    if distance is min_cosine_distance:
        pairs = (
            1 - torch.nn.functional.normalize(q, dim=2) @ torch.nn.functional.normalize(r, dim=2).mT
        )
    else:
        pairs = torch.cdist(q, r)
    expected = pairs.masked_fill(~near, float("inf")).amin(2).view(2, 6, 7)
    torch.testing.assert_close(distance(query, reference, 1), expected, atol=1e-5, rtol=1e-5)
    # A window covering the whole map is the global search.
    torch.testing.assert_close(
        distance(query, reference, 6), distance(query, reference), atol=1e-4, rtol=1e-4
    )


def test_a_missing_part_that_matches_distant_background_shows_only_in_a_window() -> None:
    rec = torch.zeros(1, 2, 1, 8)
    rec[0, 0] = 1.0  # background everywhere ...
    rec[0, :, 0, 1:4] = torch.tensor([[0.0], [1.0]])  # ... and the part at positions 1 to 3
    query = rec.clone()
    query[0, :, 0, 2] = torch.tensor([1.0, 0.0])  # the input shows background at 2
    assert float(min_euclidean_distance(query, rec)[0, 0, 2]) == pytest.approx(0.0)
    assert float(min_euclidean_distance(query, rec, 1)[0, 0, 2]) == pytest.approx(math.sqrt(2))
