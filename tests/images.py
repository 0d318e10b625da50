"""Small generated "parts" for tests: a textured disc on a plain background, with defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def part_image(seed: int, size: int = 64) -> Image.Image:
    """A normal part: a striped grey disc, slightly shifted and noisy from seed to seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.36 * size) ** 2
    stripes = 0.5 + 0.5 * np.sin(xx * 2 * np.pi / 6)
    grey = np.where(disc, 120 + 60 * stripes, 40) + rng.normal(0, 4, (size, size))
    rgb = np.stack([grey, grey * 0.95, grey * 0.9], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def with_defect(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The part with a bright blotch painted over box (x0, y0, x1, y1)."""
    damaged = image.copy()
    ImageDraw.Draw(damaged).ellipse(box, fill=(250, 40, 40))
    return damaged


def write_good_folder(folder: Path, count: int, size: int = 64, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        part_image(first_seed + i, size).save(folder / f"{i:03d}.png")
    return folder


def write_mvtec_category(root: Path, size: int = 64) -> Path:
    """An MVTec-layout category: train/good, test/good, test/blotch with ground-truth masks."""
    write_good_folder(root / "train" / "good", 24, size)
    write_good_folder(root / "test" / "good", 4, size, first_seed=500)
    box = (20, 20, 34, 34)
    (root / "test" / "blotch").mkdir(parents=True)
    (root / "ground_truth" / "blotch").mkdir(parents=True)
    for i in range(4):
        with_defect(part_image(600 + i, size), box).save(root / "test" / "blotch" / f"{i:03d}.png")
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        mask.save(root / "ground_truth" / "blotch" / f"{i:03d}_mask.png")
    return root
