"""Reading product images: MVTec-layout categories or plain folders of good images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in a folder, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def training_images(data: Path) -> list[Path]:
    """Good images to train on: `train/good` of an MVTec category, or a plain folder."""
    if not data.is_dir():
        raise FileNotFoundError(f"no data folder at {data}")
    folder = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    paths = image_files(folder)
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
        for path in image_files(defect_dir):
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
    return from_uint8(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def from_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (0..255) -> [-1, 1], the range every model part works in."""
    return images.to(dtype) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 pixels, rounded."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_uint8(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Images as uint8 (N, 3, S, S), resized to the model's size."""
    # uint8 keeps a few thousand 256 px images in memory at a quarter of float32's size.
    return to_uint8(to_tensor([load_rgb(p) for p in paths], size))


def load_mask(path: Path | None, size: int) -> np.ndarray:
    """A ground-truth mask resized to size x size, as bool; all False when there is none."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 127
