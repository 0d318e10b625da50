"""How an upload is checked and what the API forwards to a worker."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
