"""Checking and decoding uploaded images, the same way in the API and in the worker."""

from __future__ import annotations

import io
import logging
import warnings

from PIL import Image, UnidentifiedImageError

# Image formats a camera sends, as PIL names them, and their media types.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "BMP": "image/bmp", "TIFF": "image/tiff"}
MEDIA_TYPES = frozenset(FORMATS.values())


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


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode a PNG, JPEG, BMP or TIFF fully, checking its size before decoding pixels."""
    if not data:
        raise ImageRejected(422, "the request has no image: the body is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(
                413,
                f"the image is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels} (MAX_PIXELS)",
            )
        image.load()
    except Image.DecompressionBombError as error:
        # PIL's own message names its internal limit, not the service's setting.
        raise ImageRejected(
            413,
            f"the image is too large to decode safely; the limit is {max_pixels} pixels "
            "(MAX_PIXELS)",
        ) from error
    except UnidentifiedImageError as error:
        raise ImageRejected(
            415, "the body is not a PNG, JPEG, BMP or TIFF image (could not identify it)"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejected(
            422, f"the image could not be decoded (truncated or corrupt?): {error}"
        ) from error
    if width < 1 or height < 1:
        raise ImageRejected(422, "the image has no pixels")
    return image
