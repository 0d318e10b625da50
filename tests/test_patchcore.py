"""The PatchCore-style benchmark peer: coreset selection, scoring of painted defects, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.patchcore import PatchCore, evaluate_patchcore, k_center_greedy
from model.config import FeatureConfig
from model.data import to_tensor
from model.features import FeatureExtractor, build_feature_extractor
from tests.images import part_image, with_defect, write_mvtec_category

SIZE = 64
BOX = (20, 20, 34, 34)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return build_feature_extractor(FeatureConfig(ads_layer=6, score_layers=(6, 10)))


def _plain_greedy(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Textbook k-center greedy, one full distance pass per step, seeded like the real one."""
    generator = torch.Generator().manual_seed(seed)
    selected = [int(torch.randint(len(x), (1,), generator=generator))]
    nearest = torch.full((len(x),), math.inf)
    while len(selected) < count:
        nearest = torch.minimum(nearest, (x - x[selected[-1]]).pow(2).sum(dim=1))
        nearest[selected] = -math.inf
        selected.append(int(nearest.argmax()))
    return torch.tensor(selected)


def _covering_radius(x: torch.Tensor, subset: torch.Tensor) -> float:
    """Largest distance from any row of x to its nearest row among x[subset]."""
    return float(torch.cdist(x, x[subset]).amin(dim=1).max())


def _clusters(sizes: list[int], dim: int = 8, spread: float = 0.1) -> torch.Tensor:
    """Tight, well separated clusters of very different sizes."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(len(sizes), dim, generator=generator) * 10
    members = [torch.randn(n, dim, generator=generator) for n in sizes]
    return torch.cat([c + spread * m for c, m in zip(centers, members, strict=True)])


def test_painted_defect_scores_higher_and_map_peaks_on_it(extractor: FeatureExtractor) -> None:
    model = PatchCore(image_size=SIZE, features=extractor)
    model.fit(to_tensor([part_image(seed, SIZE) for seed in range(16)], SIZE))

    clean_scores, clean_maps = model.score(
        to_tensor([part_image(500 + i, SIZE) for i in range(4)], SIZE)
    )
    defect_scores, defect_maps = model.score(
        to_tensor([with_defect(part_image(600 + i, SIZE), BOX) for i in range(4)], SIZE)
    )

    assert clean_maps.shape == defect_maps.shape == (4, SIZE, SIZE)
    assert defect_scores.min() > clean_scores.max()
    x0, y0, x1, y1 = BOX
    for anomaly_map in defect_maps:
        y, x = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert x0 <= x <= x1 and y0 <= y <= y1


def test_bank_size_follows_ratio_and_cap(extractor: FeatureExtractor) -> None:
    images = to_tensor([part_image(seed, SIZE) for seed in range(4)], SIZE)
    patches = 4 * (SIZE // 8) ** 2
    model = PatchCore(image_size=SIZE, coreset_ratio=0.25, features=extractor)
    model.fit(images)
    assert model.train_patches == patches
    assert model.bank.shape == (patches // 4, 96)
    capped = PatchCore(image_size=SIZE, coreset_ratio=0.25, max_coreset=10, features=extractor)
    capped.fit(images.split(2))  # batches stream in as well as one tensor
    assert capped.bank.shape == (10, 96)


def test_score_before_fit_is_refused(extractor: FeatureExtractor) -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(image_size=SIZE, features=extractor).score(torch.zeros(1, 3, SIZE, SIZE))


def test_coreset_is_deterministic_and_picks_the_requested_count() -> None:
    # Wider than the projection, so the seeded random projection is exercised too.
    x = torch.randn(2000, 200, generator=torch.Generator().manual_seed(1))
    first = k_center_greedy(x, 150, seed=3)
    assert first.shape == (150,)
    assert len(set(first.tolist())) == 150
    assert torch.equal(first, k_center_greedy(x, 150, seed=3))
    assert not torch.equal(first, k_center_greedy(x, 150, seed=4))
    with pytest.raises(ValueError):
        k_center_greedy(x, 2001)


@pytest.mark.parametrize("candidates", [1, 16, 4096])
def test_lazy_selection_equals_plain_greedy(candidates: int) -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 12, generator=generator) * torch.rand(3000, 1, generator=generator)
    chosen = k_center_greedy(x, 200, seed=5, candidates=candidates)
    assert torch.equal(chosen, _plain_greedy(x, 200, seed=5))


def test_k_center_covers_no_worse_than_random_subsets() -> None:
    sizes = [800, 400, 200, 100, 50, 20, 10, 5, 3, 2]
    x = _clusters(sizes)
    chosen = k_center_greedy(x, len(sizes), seed=0)
    greedy_radius = _covering_radius(x, chosen)
    generator = torch.Generator().manual_seed(0)
    random_radii = [
        _covering_radius(x, torch.randperm(len(x), generator=generator)[: len(sizes)])
        for _ in range(20)
    ]
    assert greedy_radius <= min(random_radii)
    # One pick per cluster: the radius stays within a cluster's own extent.
    assert greedy_radius < 2.0


def test_evaluate_patchcore_on_a_generated_category(tmp_path: Path) -> None:
    category = write_mvtec_category(tmp_path / "widget", SIZE)
    result = evaluate_patchcore(category, image_size=SIZE)
    for key in ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pixel_f1"):
        assert 0.0 <= result[key] <= 1.0
    assert result["image_auroc"] == 1.0
    assert result["aupro"] > 0.5
    assert result["fit_seconds"] > 0 and result["ms_per_image"] > 0
    assert result["coreset_size"] == round(0.1 * 24 * (SIZE // 8) ** 2)
