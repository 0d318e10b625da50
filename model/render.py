"""Pictures a person looks at: heatmap overlays and the evaluation montage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# How much of the colormap shows over the part in an overlay.
OVERLAY_ALPHA = 0.45


def _jet() -> np.ndarray:
    """A 256-entry blue-cyan-yellow-red lookup table (the classic 'jet' ramp)."""
    v = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * v - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return (np.stack(channels, axis=1) * 255.0).round().astype(np.uint8)


JET = _jet()


def map_levels(normalised: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] map resized to (width, height) as uint8 levels."""
    resized = Image.fromarray(normalised.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return (np.clip(np.asarray(resized), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def overlay(image: Image.Image, normalised: np.ndarray) -> Image.Image:
    """The colormapped [0, 1] map (0.5 = pixel threshold) blended over the image, at its size."""
    colour = Image.fromarray(JET[map_levels(normalised, image.size)])
    return Image.blend(image.convert("RGB"), colour, OVERLAY_ALPHA)


def montage(rows: Sequence[Sequence[Image.Image]], tile: int = 192) -> Image.Image:
    """A grid of equally sized tiles, one row per sample."""
    width = max(len(r) for r in rows)
    sheet = Image.new("RGB", (width * tile, len(rows) * tile), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, picture in enumerate(row):
            sheet.paste(picture.convert("RGB").resize((tile, tile)), (x * tile, y * tile))
    return sheet
