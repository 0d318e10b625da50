"""Heatmap PNGs for the API: the colormap overlay on the input, or the bare map."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from PIL import Image

from model.render import map_levels, overlay
from service import png


class HeatmapKind(StrEnum):
    """What heatmap a client asks for."""

    overlay = "overlay"  # colormap over the input image, at the input's size
    map = "map"  # the bare normalised map as 8-bit grey, at the input's size
    none = "none"


def render(image: Image.Image, normalised: np.ndarray, kind: HeatmapKind) -> bytes | None:
    """The PNG of `kind` for a [0, 1] anomaly map (0.5 = pixel threshold), or None."""
    if kind is HeatmapKind.none:
        return None
    if kind is HeatmapKind.map:
        return png.encode(map_levels(normalised, image.size))
    return png.encode(np.asarray(overlay(image, normalised)))
