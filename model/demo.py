"""A demo product for trying the service without data: generated parts and a small model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.config import GladConfig

DEFECT_BOX = (20, 20, 34, 34)


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


def with_defect(image: Image.Image, box: tuple[int, int, int, int] = DEFECT_BOX) -> Image.Image:
    """The part with a bright blotch painted over box (x0, y0, x1, y1)."""
    damaged = image.copy()
    ImageDraw.Draw(damaged).ellipse(box, fill=(250, 40, 40))
    return damaged


def write_good_folder(folder: Path, count: int, size: int = 64, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        part_image(first_seed + i, size).save(folder / f"{i:03d}.png")
    return folder


def demo_config(steps: int = 300) -> GladConfig:
    """A model small enough to train on a laptop CPU in well under a minute."""
    return GladConfig(preset="demo", image_size=64).with_overrides(
        diffusion={
            "block_out_channels": (64, 96),
            "attention_levels": (False, True),
            "layers_per_block": 1,
            "norm_num_groups": 16,
        },
        training={
            "steps": steps,
            "batch_size": 8,
            "warmup_steps": 20,
            "learning_rate": 1e-3,
            "checkpoint_every": steps,
            # A demo product has few images: a quarter held out gives the threshold six of
            # 24 to stand on, not three.
            "holdout_every": 4,
        },
        # Adaptive steps on, so the demo service shows each part's denoise step.
        ads={"adaptive": True, "num_steps": 5, "start_step": 250, "t_min": 150},
        features={"ads_layer": 6, "score_layers": (3, 6)},
    )


def write_demo_images(folder: Path) -> tuple[Path, Path]:
    """One good and one defective demo part to send to the service."""
    folder.mkdir(parents=True, exist_ok=True)
    good, defect = folder / "good.png", folder / "defect.png"
    part_image(1000).save(good)
    with_defect(part_image(1001)).save(defect)
    return good, defect
