"""Reading product images: MVTec-layout categories or plain folders of good images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def training_images(data: Path) -> list[Path]:
    """Good images to train on: `train/good` of an MVTec category, or a plain folder."""
    if not data.is_dir():
        raise FileNotFoundError(f"no data folder at {data}")
    folder = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    paths = _images_in(folder)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def split_holdout(paths: Sequence[Path], every: int) -> tuple[list[Path], list[Path]]:
    """Every n-th image (by sorted name) is held out for calibration; the rest train."""
    held = [p for i, p in enumerate(paths) if i % every == every - 1]
    return [p for p in paths if p not in set(held)], held


@dataclass(frozen=True)
class TestItem:
    path: Path
    label: int  # 1 = defective
    defect: str
    mask: Path | None


def test_items(data: Path) -> list[TestItem]:
    """The test split of an MVTec-layout category, with ground-truth masks where present."""
    test = data / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{data} has no test/ folder (MVTec layout expected)")
    items: list[TestItem] = []
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in _images_in(defect_dir):
            mask = data / "ground_truth" / defect / f"{path.stem}_mask.png"
            items.append(
                TestItem(path, int(defect != "good"), defect, mask if mask.is_file() else None)
            )
    if not items:
        raise ValueError(f"no test images under {test}")
    return items


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images of any mode and size -> (B, 3, size, size) float32 in [-1, 1]."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        for im in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def load_mask(path: Path | None, size: int) -> np.ndarray:
    """A ground-truth mask resized to size x size, as bool; all False when there is none."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 127
