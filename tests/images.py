"""Small generated parts for tests, laid out as the model's data readers expect."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from model.demo import DEFECT_BOX, part_image, with_defect, write_good_folder

__all__ = ["part_image", "with_defect", "write_good_folder", "write_mvtec_category"]


def write_mvtec_category(root: Path, size: int = 64) -> Path:
    """An MVTec-layout category: train/good, test/good, test/blotch with ground-truth masks."""
    write_good_folder(root / "train" / "good", 24, size)
    write_good_folder(root / "test" / "good", 4, size, first_seed=500)
    (root / "test" / "blotch").mkdir(parents=True)
    (root / "ground_truth" / "blotch").mkdir(parents=True)
    for i in range(4):
        with_defect(part_image(600 + i, size)).save(root / "test" / "blotch" / f"{i:03d}.png")
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse(DEFECT_BOX, fill=255)
        mask.save(root / "ground_truth" / "blotch" / f"{i:03d}_mask.png")
    return root
