"""How an upload is checked and what the API forwards to a worker."""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from model.demo import part_image
from service import imaging

MAX_PIXELS = 40_000_000


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_an_image_within_the_side_is_forwarded_as_sent() -> None:
    data = _encoded(part_image(1, 256), "PNG")
    forwarded, size = imaging.prepare(data, MAX_PIXELS, 1024)
    assert forwarded is data and size == (256, 256)


def test_a_large_image_is_forwarded_shrunk_with_its_size_as_sent() -> None:
    large = part_image(2, 300).resize((3000, 2000))
    for fmt in ("PNG", "JPEG"):
        forwarded, size = imaging.prepare(_encoded(large, fmt), MAX_PIXELS, 1024)
        assert size == (3000, 2000)
        shrunk = Image.open(io.BytesIO(forwarded))
        assert shrunk.format == "PNG" and shrunk.size == (1024, 683)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    data = _encoded(part_image(3, 300).resize((4800, 3200)), "JPEG")
    assert imaging.decode(data, MAX_PIXELS).size == (4800, 3200)
    # 1/2 is the smallest scale whose both sides still cover 1024 (3200 // 1024 = 3).
    assert imaging.decode(data, MAX_PIXELS, 1024).size == (2400, 1600)
    # A PNG has no reduced-scale decoding.
    png = _encoded(part_image(3, 300).resize((2400, 1600)), "PNG")
    assert imaging.decode(png, MAX_PIXELS, 1024).size == (2400, 1600)


def test_large_uploads_decode_on_a_thread_of_lower_priority() -> None:
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    with ThreadPoolExecutor(1, initializer=imaging.lower_priority) as pool:
        lowered = pool.submit(nice).result()
    assert lowered == min(19, nice() + imaging.LARGE_UPLOAD_NICE)


# Frees 64 blocks of 1 MiB with a block of 100 kB kept after each (so that they are holes
# in the heap, not its top), then prints how many MiB the process still holds of the 70.
_HOLES = """
import sys
from service import imaging

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "mapped":
    imaging.map_large_blocks()
x = b"x" * (1 << 20)
del x  # unless the threshold was set, glibc raises it to this block's size now
before = rss_mib()
blocks, pins = [], []
for _ in range(64):
    blocks.append(b"x" * (1 << 20))
    pins.append(b"y" * 100_000)
del blocks
print(rss_mib() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_the_api_hands_freed_large_blocks_back_to_the_system() -> None:
    def kept_mib(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, check=True
        )
        return float(done.stdout)

    assert kept_mib("default") > 48  # glibc's own threshold: the holes stay resident
    assert kept_mib("mapped") < 16  # the pins alone
