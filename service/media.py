"""Inspected images and their heatmaps on disk, by date and product, kept as the
deployment's policy says and removed past their age or the folder's size cap."""

from __future__ import annotations

import os
import time
from enum import StrEnum
from pathlib import Path

# The extension of each format service.imaging accepts, by the bytes it starts with.
SIGNATURES = {
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpg",
    b"BM": "bmp",
    b"II*\x00": "tif",
    b"MM\x00*": "tif",
}


def extension(image: bytes) -> str:
    """The file extension an accepted image's bytes call for."""
    return next((ext for sig, ext in SIGNATURES.items() if image.startswith(sig)), "img")


class KeepImages(StrEnum):
    """Which inspections keep their image and heatmap."""

    none = "none"
    anomalous = "anomalous"
    all = "all"


class MediaStore:
    """Files under root: <YYYY-MM-DD>/<product>/<record id>.<ext> and <id>-heatmap.png."""

    def __init__(self, root: Path, keep: KeepImages, max_age_s: float, max_bytes: int) -> None:
        self.root = root
        self.keep = keep
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes

    def wants(self, anomalous: bool) -> bool:
        return self.keep is KeepImages.all or (self.keep is KeepImages.anomalous and anomalous)

    def save(
        self, record_id: str, product: str, day: str, image: bytes, heatmap: bytes | None
    ) -> tuple[str, str | None]:
        """Writes the image (and the heatmap, if any); returns their paths under root."""
        folder = Path(day) / product
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        image_path = folder / f"{record_id}.{extension(image)}"
        _write(self.root / image_path, image)
        heatmap_path = None
        if heatmap is not None:
            heatmap_path = folder / f"{record_id}-heatmap.png"
            _write(self.root / heatmap_path, heatmap)
        return image_path.as_posix(), heatmap_path.as_posix() if heatmap_path else None

    def path(self, relative: str) -> Path | None:
        """The file of a stored path, if it is still there (and inside root)."""
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root.resolve()) or not candidate.is_file():
            return None
        return candidate

    def sweep(self, now: float | None = None) -> list[str]:
        """Removes files past the age limit, then the oldest until the folder is under its
        size cap; returns the removed paths under root."""
        now = time.time() if now is None else now
        files = []
        for path in self.root.rglob("*"):
            if path.is_file():
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        removed = []
        for modified, size, path in files:
            if now - modified <= self.max_age_s and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path.relative_to(self.root).as_posix())
        _remove_empty_folders(self.root)
        return removed


def _write(path: Path, data: bytes) -> None:
    # Written beside, then renamed: a reader never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
