"""Cheaper ADS checks against the paper's check, on a trained model and real test images.

For each check variant: how often it decides the same step as the paper's check, the mean
step difference, the feature passes and seconds per image, image AUROC, and the rank
correlation of its scores with the paper check's scores.

    python -m benchmarks.cheap_ads --model models/mpdd --data ../shared/datasets/mpdd_metal_plate
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from model.config import ADSConfig
from model.data import load_rgb, test_items, to_tensor
from model.features import Features
from model.inspector import Inspector
from model.metrics import image_metrics
from model.pipeline import GladPipeline

VARIANTS: dict[str, dict[str, object]] = {
    "paper check": {},
    "every 2 steps": {"check_every": 2},
}


class CountingFeatures(nn.Module):
    """The model's features, counting the images that go through them.

    A module, so that it can stand in for a torch feature extractor inside the model's space.
    """

    def __init__(self, features: Features) -> None:
        super().__init__()
        self.features = features
        self.images = 0

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        self.images += images.shape[0]
        return self.features(images)


def run_variant(
    pipeline: GladPipeline, ads: ADSConfig, images: torch.Tensor, batch_size: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Scores, steps, feature passes per image (scoring's 2 included) and seconds per image."""
    counter = CountingFeatures(pipeline.features)
    pipeline.features = counter
    scores, steps = [], []
    began = time.perf_counter()
    try:
        for start in range(0, len(images), batch_size):
            out = pipeline(images[start : start + batch_size], ads)
            scores.append(out.scores.float().cpu())
            steps.append(out.reconstruction.denoise_steps.cpu())
    finally:
        pipeline.features = counter.features
    seconds = time.perf_counter() - began
    n = len(images)
    return torch.cat(scores).numpy(), torch.cat(steps).numpy(), counter.images / n, seconds / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--delta", type=float, help="this ADS delta, not the folder's")
    args = parser.parse_args()

    pipeline = Inspector.load(args.model, device=args.device, backend="torch").pipeline
    base = pipeline.config
    # The folder's calibrated delta, unless one is given.
    delta = pipeline.ads.delta if args.delta is None else args.delta
    items = test_items(args.data)
    images = to_tensor([load_rgb(item.path) for item in items], base.image_size)
    labels = np.array([item.label for item in items])
    print(
        f"{args.model} on {args.data.name}: {len(items)} test images "
        f"({int(labels.sum())} defective), {base.image_size} px, {base.ads.num_steps} steps "
        f"from {base.ads.start_step}, t_min {base.ads.t_min}, "
        f"delta {args.delta if args.delta is not None else 'as calibrated in the folder'}"
    )
    columns = "| variant | same step | mean abs step diff | decided | feature passes/img "
    print(columns + "| s/img | image AUROC | Spearman vs paper |")
    print("|---|---|---|---|---|---|---|---|")
    reference: tuple[np.ndarray, np.ndarray] | None = None
    for name, variant in VARIANTS.items():
        ads = pipeline.ads.model_copy(update={**variant, "delta": delta})
        scores, steps, passes, seconds = run_variant(pipeline, ads, images, args.batch_size)
        if reference is None:
            reference = (scores, steps)
        same = float(np.mean(steps == reference[1]))
        diff = float(np.mean(np.abs(steps - reference[1])))
        rho = float(spearmanr(scores, reference[0]).statistic)
        auroc = image_metrics(labels, scores)["image_auroc"]
        print(
            f"| {name} | {same:.1%} | {diff:.1f} | {np.mean(steps > 0):.1%} | {passes:.2f} "
            f"| {seconds:.3f} | {auroc:.3f} | {rho:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
