"""Pictures a person looks at: heatmap overlays and the evaluation montage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

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
    colour = Image.fromarray(map_levels(normalised, image.size))
    # A grey image given a palette becomes a palette image: PIL colours it in C, three
    # times faster than indexing JET with numpy.
    colour.putpalette(JET.tobytes())
    return Image.blend(image.convert("RGB"), colour.convert("RGB"), OVERLAY_ALPHA)


def feature_pictures(
    inputs: np.ndarray, reconstructions: np.ndarray, size: int
) -> tuple[Image.Image, Image.Image]:
    """Feature maps (C, h, w) of an input and its reconstruction as RGB pictures.

    The three principal components of the input's features become red, green and blue, and
    the reconstruction is drawn on the same axes and scale, so where it differs from the input
    is where the model changed the part.
    """
    x = inputs.reshape(inputs.shape[0], -1).T.astype(np.float64)
    r = reconstructions.reshape(reconstructions.shape[0], -1).T.astype(np.float64)
    mean = x.mean(0)
    _, _, axes = np.linalg.svd(x - mean, full_matrices=False)
    px, pr = (x - mean) @ axes[:3].T, (r - mean) @ axes[:3].T
    low, high = px.min(0), px.max(0)
    span = np.maximum(high - low, 1e-12)
    pictures = []
    for projected in (px, pr):
        levels = np.clip((projected - low) / span, 0.0, 1.0) * 255.0
        grid = levels.round().astype(np.uint8).reshape(*inputs.shape[1:], 3)
        picture = Image.fromarray(grid).resize((size, size), Image.Resampling.NEAREST)
        pictures.append(picture)
    return pictures[0], pictures[1]


def montage(
    rows: Sequence[Sequence[Image.Image]],
    titles: Sequence[str],
    captions: Sequence[str],
    tile: int = 192,
) -> Image.Image:
    """A grid of equally sized tiles, one row per sample: the columns' titles on top, each
    row's caption (its file, score and verdict) above its tiles."""
    width = max(len(r) for r in rows)
    band = 16
    row_height = tile + band
    sheet = Image.new("RGB", (width * tile, band + len(rows) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for x, title in enumerate(titles):
        draw.text((x * tile + 4, 2), title, fill=(0, 0, 0))
    for y, (row, caption) in enumerate(zip(rows, captions, strict=True)):
        top = band + y * row_height
        draw.text((4, top + 2), caption, fill=(0, 0, 0))
        for x, picture in enumerate(row):
            sheet.paste(picture.convert("RGB").resize((tile, tile)), (x * tile, top + band))
    return sheet
