"""Checking and decoding uploaded images, the same way in the API and in the worker."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

# Image formats a camera sends, as PIL names them, and their media types: the one list of
# them in the service.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
MEDIA_TYPES = frozenset(FORMATS.values())
# "PNG, JPEG, BMP or TIFF", for messages and help.
FORMAT_NAMES = " or ".join([", ".join(list(FORMATS)[:-1]), list(FORMATS)[-1]])
# What a client sends when it does not name the format: the bytes decide.
UNNAMED_MEDIA_TYPE = "application/octet-stream"


def media_type(content_type: str) -> str:
    """A Content-Type header's media type, lower case, without its parameters."""
    return content_type.split(";")[0].strip().lower()


class ImageRejected(Exception):
    """An upload that is not an acceptable image; the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def limit_decoder(max_pixels: int) -> None:
    """Make PIL itself refuse images larger than the service accepts.

    PIL warns above MAX_IMAGE_PIXELS and raises above twice that, when it reads the
    header; decode() refuses anything above max_pixels before decoding a pixel.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    # PIL logs what it finds wrong in a file at ERROR; bad input is the client's, answered
    # with a 4xx, and must not page whoever watches the service's errors.
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    # PIL's warning between one and two times the limit is noise: decode() refuses
    # those images itself, with a message the client sees.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down to at most max_side pixels on its longest side, aspect kept."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


# zlib level 1 for an image the API forwards shrunk: it is decoded once more, right away.
FORWARD_COMPRESS_LEVEL = 1
# Above this many pixels an upload is large: the API decodes one at a time, so that a few
# of them cannot take every core from the workers, and hands the memory back afterwards.
LARGE_PIXELS = 4_000_000
# The lowest priority, below the workers' WORKER_NICE (10): at the same nice value a large
# decode took half a core from inference on a host the API and the workers share.
LARGE_UPLOAD_NICE = 19
# glibc's mallopt parameter, and the size from which the API maps each block on its own.
M_MMAP_THRESHOLD = -3
MAPPED_BLOCK_BYTES = 256 * 1024


def decode(data: bytes, max_pixels: int, max_side: int | None = None) -> Image.Image:
    """Decode a PNG, JPEG, BMP or TIFF fully, checking its size before decoding pixels.

    max_side: the image is wanted at most this large on its longest side, so a JPEG is
    decoded at the smallest of 1/2, 1/4 or 1/8 scale that still covers it (a fraction of
    the work for a large photo). Other formats decode at their full size.
    """
    return _decode(data, max_pixels, max_side)[0]


def _decode(
    data: bytes, max_pixels: int, max_side: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """decode(), and the image's size as sent (a reduced-scale JPEG is smaller)."""
    with _refusals(max_pixels):
        image = _opened(data, max_pixels)
        size = image.size
        if max_side is not None:
            image.draft(None, (max_side, max_side))
        image.load()
    return image, size


def size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header, refused (ImageRejected) where the
    header shows it unacceptable; its pixels are not decoded, so they are not checked."""
    with _refusals(max_pixels):
        return _opened(data, max_pixels).size


def _opened(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected(422, "the request has no image: the body is empty")
    image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            413,
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} (MAX_PIXELS)",
        )
    if width < 1 or height < 1:
        raise ImageRejected(422, "the image has no pixels")
    return image


@contextlib.contextmanager
def _refusals(max_pixels: int) -> Iterator[None]:
    """PIL's errors on a client's file, as the ImageRejected the client is answered with."""
    try:
        yield
    except Image.DecompressionBombError as error:
        # PIL's own message names its internal limit, not the service's setting.
        raise ImageRejected(
            413,
            f"the image is too large to decode safely; the limit is {max_pixels} pixels "
            "(MAX_PIXELS)",
        ) from error
    except UnidentifiedImageError as error:
        raise ImageRejected(
            415, f"the body is not a {FORMAT_NAMES} image (could not identify it)"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(
            422, f"the image could not be decoded (truncated or corrupt?): {error}"
        ) from error


def pixels(data: bytes) -> int:
    """The image's pixel count from its header; 0 where there is none (decode says why)."""
    try:
        width, height = Image.open(io.BytesIO(data), formats=list(FORMATS)).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0
    return width * height


def lower_priority() -> None:
    """Lower the calling thread's CPU priority (on Linux, nice is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, LARGE_UPLOAD_NICE)


def release_memory() -> None:
    """Return the C heap's free pages to the system (glibc only; elsewhere nothing).

    A decoded 6000 px image is a hundred megabytes in blocks below glibc's mmap threshold:
    freed, they stay in the process's arenas and its resident size stays up.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def map_large_blocks() -> None:
    """Have glibc map every block of MAPPED_BLOCK_BYTES or more on its own, so that freeing
    it hands it back to the system at once (glibc only; elsewhere nothing).

    By default glibc raises that threshold to the largest block freed so far: after one
    6000 px upload, the bodies, images and answers of the next ones came from the heap,
    and what they left there kept the API 15 MiB above its idle size. Only for a process
    that runs no model: each of PyTorch's tensors would pay a system call.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES)


def prepare(data: bytes, max_pixels: int, max_side: int) -> tuple[bytes, tuple[int, int]]:
    """Check an upload (ImageRejected if it is not acceptable) and return what to forward to
    a worker, with the image's size as sent: the upload itself, or, when its longest side is
    over max_side, the image shrunk to max_side as a PNG. A large image is then decoded in
    full once, here, and not again on the worker's path, where it would hold up its batch."""
    forwarded, size = _forwarded(data, max_pixels, max_side)
    # Only now are the decoded images freed, and their memory can go back.
    if size[0] * size[1] > LARGE_PIXELS:
        release_memory()
    return forwarded, size


def _forwarded(data: bytes, max_pixels: int, max_side: int) -> tuple[bytes, tuple[int, int]]:
    image, size = _decode(data, max_pixels, max_side)
    if max(image.size) <= max_side and image.size == size:
        return data, size
    buffer = io.BytesIO()
    shrink(image, max_side).save(buffer, format="PNG", compress_level=FORWARD_COMPRESS_LEVEL)
    return buffer.getvalue(), size
