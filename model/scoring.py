"""The anomaly map and the image score (the pipeline's steps 5 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from model.config import ScoringConfig
from model.features import MIN_DISTANCES


def anomaly_maps(
    input_features: dict[int, torch.Tensor],
    rec_features: dict[int, torch.Tensor],
    layers: tuple[int, ...],
    size: tuple[int, int],
    config: ScoringConfig,
    pixel_difference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel anomaly maps (B, H, W), float32: multi-layer feature distance, blurred.

    At each layer, each input position's distance to the nearest reconstructed position
    (config.distance); the layers' maps are resized to the image and summed.

    pixel_difference: (B, 1, H, W) channel-mean |input - reconstruction|, for the optional
    pixel term (image spaces only).
    """
    batch = input_features[layers[0]].shape[0]
    device = input_features[layers[0]].device
    total = torch.zeros((batch, 1, *size), device=device, dtype=torch.float32)
    distance = MIN_DISTANCES[config.distance]
    for layer in layers:
        f_in, f_rec = (
            neighbourhood_mean(f[layer], config.neighbourhood)
            for f in (input_features, rec_features)
        )
        d = distance(f_in, f_rec, config.search_radius).unsqueeze(1)
        total += F.interpolate(d, size=size, mode="bilinear", align_corners=False)
    if config.pixel_weight > 0 and pixel_difference is not None:
        pixel = pixel_difference.float()
        ratio = total.amax((1, 2, 3), keepdim=True) / pixel.amax((1, 2, 3), keepdim=True).clamp(
            min=1e-6
        )
        total += config.pixel_weight * ratio * pixel
    return blurred(total.squeeze(1), config)


def blurred(maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """Maps (B, H, W) under the Gaussian blur of config (sigma given at 512 px)."""
    sigma = config.blur_sigma_at_512 * maps.shape[-1] / 512
    if sigma <= 0:
        return maps
    kernel = 2 * int(round(3 * sigma)) + 1
    return gaussian_blur(maps.unsqueeze(1), [kernel, kernel], [sigma, sigma]).squeeze(1)


def memory_map(
    distances: torch.Tensor, size: tuple[int, int], config: ScoringConfig
) -> torch.Tensor:
    """The memory's map (B, H, W), float32: each position's distance to its nearest normal
    patch (B, h, w), resized to the image and blurred as the reconstruction's map is."""
    full = F.interpolate(
        distances.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False
    )
    return blurred(full.squeeze(1), config)


@dataclass(frozen=True)
class MapScale:
    """A product's constants for one map (model.calibrate fits them): its reference map
    (H, W), subtracted, then (map - low) / (high - low)."""

    reference: torch.Tensor
    low: float = 0.0
    high: float = 1.0


def fuse_maps(
    maps: dict[str, torch.Tensor], scales: dict[str, MapScale], fusion: str
) -> torch.Tensor:
    """The product's one map (B, H, W) from its maps by name, each first rescaled by its scale.

    One map is taken as it is. Of two, "memory_plus_excess" keeps the memory's map and adds
    the reconstruction's where it passes 1, the top of its normal range; "mean" averages them.
    """
    rescaled = {
        name: (maps[name] - scale.reference - scale.low) / (scale.high - scale.low)
        for name, scale in scales.items()
    }
    if len(rescaled) == 1:
        return next(iter(rescaled.values()))
    reconstruction, memory = rescaled["reconstruction"], rescaled["memory"]
    if fusion == "mean":
        return (reconstruction + memory) / 2
    return memory + (reconstruction - 1).clamp(min=0)


def neighbourhood_mean(features: torch.Tensor, size: int) -> torch.Tensor:
    """Each position's features averaged over its size x size neighbourhood (PatchCore's
    local aggregation); positions past the border are left out, not counted as zeros."""
    if size == 1:
        return features
    return F.avg_pool2d(
        features.float(), size, stride=1, padding=size // 2, count_include_pad=False
    )


def image_scores(maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """Image score: the mean of the top k map values (k scaled from 512 px by area)."""
    pixels = maps[0].numel()
    k = max(1, min(pixels, round(config.top_k_at_512 * pixels / 512**2)))
    return maps.flatten(1).topk(k, dim=1).values.mean(1)
