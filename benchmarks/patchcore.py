"""A PatchCore-style peer for the accuracy benchmark, on the product's MobileNetV2 features.

Memory bank of locally pooled mid-level patch features from all the good training images,
thinned by greedy k-center coreset selection (the product's model.memory_bank); a test patch's
anomaly score is its distance to the nearest bank entry, the image's its largest patch score.
It gives GLAD's figures a reference point: PatchCore as anomalib users know it.

    .venv/bin/python -m benchmarks.patchcore --data ../shared/datasets/mpdd_metal_plate
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from model.config import FeatureConfig
from model.data import load_mask, load_rgb, test_items, to_tensor, training_images
from model.features import Features, build_feature_extractor
from model.memory_bank import MemoryBank, k_center_greedy, patch_vectors
from model.metrics import image_metrics, pixel_metrics


class PatchCore:
    """Nearest-neighbour patch scoring against a coreset of good training patches.

    Images come at image_size (which scales the map's blur); `features` defaults to the
    product's ImageNet MobileNetV2 with the requested layers.
    """

    def __init__(
        self,
        image_size: int = 256,
        layers: tuple[int, int] = (6, 10),
        coreset_ratio: float = 0.1,
        max_coreset: int = 10_000,
        projection_dim: int = 128,
        blur_sigma_at_256: float = 4.0,
        seed: int = 0,
        batch_size: int = 16,
        features: Features | None = None,
    ) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.max_coreset = max_coreset
        self.projection_dim = projection_dim
        self.blur_sigma = blur_sigma_at_256 * image_size / 256
        self.seed = seed
        self.batch_size = batch_size
        self.features = (
            features
            if features is not None
            else build_feature_extractor(FeatureConfig(ads_layer=layers[0], score_layers=layers))
        )
        self.bank: MemoryBank | None = None
        self.train_patches = 0

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> patch vectors (B, C, h, w) on the shallow grid:
        the product's memory embedding (each layer 3x3-averaged on its own grid)."""
        return patch_vectors(self.features(images), self.layers, 3)

    @torch.inference_mode()
    def fit(self, images: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Builds the memory bank from good images: one (N, 3, S, S) tensor, or batches of them.

        Passing an iterable of batches lets a large training set stream from disk.
        """
        patches = torch.cat(
            [
                self.embed(batch).permute(0, 2, 3, 1).flatten(0, 2)
                for batch in self._batches(images)
            ],
            dim=0,
        )
        self.train_patches = len(patches)
        count = min(self.max_coreset, max(1, round(self.coreset_ratio * len(patches))))
        keep = k_center_greedy(patches, count, self.seed, self.projection_dim)
        self.bank = MemoryBank(patches[keep].contiguous())

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and anomaly maps (B, S, S) for images (B, 3, S, S) in [-1, 1].

        The image score is the largest patch score, as in PatchCore (without its reweighting);
        the map is the patch scores upsampled to the image and Gaussian-blurred.
        """
        if self.bank is None:
            raise RuntimeError("fit() must run before score()")
        scores, maps = [], []
        for batch in self._batches(images):
            patch_map = self.bank.distances(self.embed(batch)).unsqueeze(1)
            scores.append(patch_map.flatten(1).amax(dim=1))
            full = F.interpolate(
                patch_map, size=batch.shape[-2:], mode="bilinear", align_corners=False
            )
            maps.append(self._blur(full)[:, 0])
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        if self.blur_sigma <= 0:
            return maps
        radius = math.ceil(4 * self.blur_sigma)
        return gaussian_blur(maps, [2 * radius + 1] * 2, [self.blur_sigma] * 2)

    def _batches(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            yield from images.split(self.batch_size)
        else:
            yield from images


def _load_batches(paths: Sequence[Path], size: int, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(paths), batch_size):
        yield to_tensor([load_rgb(p) for p in paths[i : i + batch_size]], size)


def evaluate_patchcore(
    category_dir: Path,
    image_size: int = 256,
    coreset_ratio: float = 0.1,
    seed: int = 0,
    max_coreset: int = 10_000,
    layers: tuple[int, int] = (6, 10),
) -> dict[str, float | int]:
    """Fits on `train/good` of an MVTec-layout category and scores its test split.

    Returns image AUROC, AP and F1-max; pixel AUROC, AP, F1-max and AUPRO when the category
    has ground-truth masks; fit_seconds (image loading included), ms_per_image (scoring only,
    image loading excluded) and the bank's size.
    """
    model = PatchCore(
        image_size=image_size,
        layers=layers,
        coreset_ratio=coreset_ratio,
        max_coreset=max_coreset,
        seed=seed,
    )
    start = time.perf_counter()
    model.fit(_load_batches(training_images(category_dir), image_size, model.batch_size))
    fit_seconds = time.perf_counter() - start

    items = test_items(category_dir)
    scores, maps, masks = [], [], []
    score_seconds = 0.0
    for i in range(0, len(items), model.batch_size):
        chunk = items[i : i + model.batch_size]
        images = to_tensor([load_rgb(item.path) for item in chunk], image_size)
        start = time.perf_counter()
        batch_scores, batch_maps = model.score(images)
        score_seconds += time.perf_counter() - start
        scores.append(batch_scores)
        maps.append(batch_maps)
        masks.extend(load_mask(item.mask, image_size) for item in chunk)

    labels = np.array([item.label for item in items])
    result: dict[str, float | int] = image_metrics(labels, np.concatenate(scores))
    if any(item.mask is not None for item in items):
        result.update(pixel_metrics(np.stack(masks), np.concatenate(maps)))
    result.update(
        fit_seconds=fit_seconds,
        ms_per_image=1000 * score_seconds / len(items),
        train_patches=model.train_patches,
        coreset_size=len(model.bank) if model.bank is not None else 0,
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout category")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--max-coreset", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layers", type=int, nargs=2, default=(6, 10), help="MobileNetV2 blocks, shallow first"
    )
    args = parser.parse_args(argv)
    result = evaluate_patchcore(
        args.data,
        args.image_size,
        args.coreset_ratio,
        args.seed,
        args.max_coreset,
        (args.layers[0], args.layers[1]),
    )
    print(f"PatchCore peer on {args.data.name} at {args.image_size} px, layers {args.layers}")
    print(f"| {'metric':<14} | {'value':>10} |\n|{'-' * 16}|{'-' * 12}|")
    for name, value in result.items():
        cell = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"| {name:<14} | {cell:>10} |")


if __name__ == "__main__":
    main()
