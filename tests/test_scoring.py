"""Feature distances and anomaly maps against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ScoringConfig
from model.features import min_cosine_distance, min_euclidean_distance
from model.scoring import anomaly_maps


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


def test_an_unresolved_auto_distance_is_refused() -> None:
    features = {3: torch.rand(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="resolved when a model is trained"):
        anomaly_maps(features, features, (3,), (8, 8), ScoringConfig(distance="auto"))
