"""The memory of normal patches: coreset selection, the nearest-patch lookup against brute
force, its embedding, and its map in a trained model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import MemoryConfig
from model.data import from_uint8, load_rgb, load_uint8, to_tensor
from model.inspector import Inspector
from model.memory_bank import (
    MemoryBank,
    bank_size,
    build_memory_bank,
    k_center_greedy,
    patch_vectors,
)
from model.scoring import neighbourhood_mean
from tests.conftest import TINY_PRODUCT
from tests.images import with_defect

BOX = (20, 20, 34, 34)


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


def test_distances_are_the_nearest_patch_by_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    # Far from the origin, so that the centring is what keeps the expansion exact.
    patches = 5 + 3 * torch.randn(700, 24, generator=generator)
    query = 5 + 3 * torch.randn(3, 24, 6, 7, generator=generator)
    got = MemoryBank(patches).distances(query)
    rows = query.permute(0, 2, 3, 1).reshape(-1, 24)
    want = torch.cdist(rows.double(), patches.double()).amin(1).view(3, 6, 7)
    assert got.shape == (3, 6, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_a_patch_in_the_memory_is_at_distance_zero() -> None:
    patches = 5 + torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    query = patches[[3, 17]].T.reshape(1, 8, 1, 2)
    assert float(MemoryBank(patches).distances(query).max()) < 1e-2


def test_the_lookup_in_fp16_stays_within_a_percent_of_fp32() -> None:
    generator = torch.Generator().manual_seed(2)
    patches = 4 + 2 * torch.randn(500, 32, generator=generator)
    query = 4 + 2 * torch.randn(2, 32, 5, 5, generator=generator)
    bank = MemoryBank(patches)
    full = bank.distances(query)
    half = bank.to("cpu", torch.float16).distances(query.half())
    assert float(((half - full).abs() / full).max()) < 1e-2


def test_a_query_of_another_width_is_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        MemoryBank(torch.zeros(4, 8)).distances(torch.zeros(1, 6, 2, 2))


def test_patch_vectors_pool_each_layer_on_its_own_grid_then_stack_on_the_finest() -> None:
    generator = torch.Generator().manual_seed(3)
    fine, coarse = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 6, 4, 4)
    vectors = patch_vectors({1: fine, 2: coarse}, (1, 2), 3)
    assert vectors.shape == (2, 10, 8, 8)
    torch.testing.assert_close(vectors[:, :4], neighbourhood_mean(fine, 3))
    pooled = neighbourhood_mean(coarse, 3)
    upsampled = F.interpolate(pooled, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(vectors[:, 4:], upsampled)


def test_the_bank_keeps_its_share_of_the_training_patches_up_to_the_cap() -> None:
    assert bank_size(1000, MemoryConfig(coreset_ratio=0.1)) == 100
    assert bank_size(1000, MemoryConfig(coreset_ratio=0.1, max_patches=30)) == 30
    assert bank_size(3, MemoryConfig(coreset_ratio=0.1)) == 1
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    bank, summary = build_memory_bank(
        lambda x: x, images, MemoryConfig(coreset_ratio=0.5), batch_size=2
    )
    assert summary["memory_training_patches"] == 5 * 16
    assert len(bank) == summary["memory_patches"] == 40
    assert summary["memory_mib"] == pytest.approx(40 * 3 * 4 / 2**20, abs=0.01)


def test_a_training_image_scores_zero_on_the_memory_map_and_a_defect_on_it_does_not(
    tiny_model_dir: Path, good_images_dir: Path
) -> None:
    pipeline = Inspector.load(tiny_model_dir / TINY_PRODUCT).pipeline
    paths = sorted(good_images_dir.iterdir())[:4]
    images = load_uint8(paths, pipeline.config.image_size)
    # Every patch kept: a copy of a training image finds each of its patches there.
    every = MemoryConfig(coreset_ratio=1.0)
    pipeline.memory, _ = build_memory_bank(pipeline.memory_patches, images, every, 4)
    copy = from_uint8(images[:1])
    damaged = to_tensor([with_defect(load_rgb(paths[0]), BOX)], pipeline.config.image_size)
    x = torch.cat([copy, damaged])
    maps = pipeline.component_maps(x, pipeline.reconstruct(x))["memory"]
    peak = float(maps[1].max())
    assert float(maps[0].max()) < 0.01 * peak
    y, x0 = divmod(int(maps[1].argmax()), maps.shape[-1])
    assert BOX[0] - 8 <= x0 <= BOX[2] + 8 and BOX[1] - 8 <= y <= BOX[3] + 8
