"""The heatmaps' PNG writer: what it writes decodes to exactly the pixels it was given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.render import map_levels, overlay
from service import heatmap, png


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48), (1, 1, 3), (9, 5, 3), (256, 256, 3)])
def test_a_png_decodes_to_the_pixels_it_was_written_from(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(png.encode(pixels)))
    assert decoded.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)],
)
def test_pixels_png_cannot_hold_as_written_are_refused(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        png.encode(pixels)


@pytest.mark.parametrize("kind", [heatmap.HeatmapKind.overlay, heatmap.HeatmapKind.map])
def test_a_heatmap_is_a_png_at_the_images_size(kind: heatmap.HeatmapKind) -> None:
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    normalised = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    answer = heatmap.render(image, normalised, kind)
    assert answer is not None
    decoded = Image.open(io.BytesIO(answer))
    assert decoded.size == (40, 30)
    if kind is heatmap.HeatmapKind.overlay:
        assert np.array_equal(np.asarray(decoded), np.asarray(overlay(image, normalised)))
    else:
        assert np.array_equal(np.asarray(decoded), map_levels(normalised, image.size))
