"""PNG files of 8-bit pixel arrays, written for speed: the heatmaps a worker answers with.

PIL chooses a filter per row by trying all five, and compresses with zlib. Here every row
takes the Up filter (the row above subtracted, in one numpy operation), and ISA-L's deflate
compresses it at its level 1, 4x faster than zlib's level 1. On 12 real parts' 256 px
overlays: 1.2 ms against PIL's 8.0 (level 1, run-length strategy), files 16 % larger. The
stream is standard zlib: any PNG reader decodes it.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types by channel count: greyscale and truecolour.
COLOUR_TYPES = {1: 0, 3: 2}
UP_FILTER = 2
ISAL_LEVEL = 1  # of 0 to 3


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode(pixels: np.ndarray) -> bytes:
    """The PNG of a uint8 array, (height, width) grey or (height, width, 3) RGB."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D uint8 array, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if channels not in COLOUR_TYPES or height < 1 or width < 1:
        raise ValueError(f"expected grey or RGB pixels, got shape {pixels.shape}")
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = UP_FILTER
    filtered[0, 1:] = rows[0]
    # uint8 arithmetic wraps modulo 256, as the filter is defined.
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    data = isal_zlib.compress(filtered.tobytes(), ISAL_LEVEL)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[channels], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
