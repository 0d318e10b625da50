"""The anomaly map and the image score (the pipeline's steps 5 and 6)."""

from __future__ import annotations

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
    sigma = config.blur_sigma_at_512 * size[-1] / 512
    if sigma > 0:
        kernel = 2 * int(round(3 * sigma)) + 1
        total = gaussian_blur(total, [kernel, kernel], [sigma, sigma])
    return total.squeeze(1)


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
