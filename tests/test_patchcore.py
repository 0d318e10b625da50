"""The PatchCore-style benchmark peer: scoring of painted defects, bank size, evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.patchcore import PatchCore, evaluate_patchcore
from model.config import FeatureConfig
from model.data import to_tensor
from model.features import FeatureExtractor, build_feature_extractor
from tests.images import part_image, with_defect, write_mvtec_category

SIZE = 64
BOX = (20, 20, 34, 34)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return build_feature_extractor(FeatureConfig(ads_layer=6, score_layers=(6, 10)))


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
    assert model.bank is not None and model.bank.patches.shape == (patches // 4, 96)
    capped = PatchCore(image_size=SIZE, coreset_ratio=0.25, max_coreset=10, features=extractor)
    capped.fit(images.split(2))  # batches stream in as well as one tensor
    assert capped.bank is not None and capped.bank.patches.shape == (10, 96)


def test_score_before_fit_is_refused(extractor: FeatureExtractor) -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(image_size=SIZE, features=extractor).score(torch.zeros(1, 3, SIZE, SIZE))


def test_evaluate_patchcore_on_a_generated_category(tmp_path: Path) -> None:
    category = write_mvtec_category(tmp_path / "widget", SIZE)
    result = evaluate_patchcore(category, image_size=SIZE)
    for key in ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "pixel_f1"):
        assert 0.0 <= result[key] <= 1.0
    assert result["image_auroc"] == 1.0
    assert result["aupro"] > 0.5
    assert result["fit_seconds"] > 0 and result["ms_per_image"] > 0
    assert result["coreset_size"] == round(0.1 * 24 * (SIZE // 8) ** 2)
