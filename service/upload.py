"""The image of an /inspect request: taken from a raw or multipart body (which
service.body_gate has read whole, within its limits), then checked and prepared for a
worker off the event loop."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from service import imaging


async def _multipart_file(request: Request) -> bytes:
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise HTTPException(422, f"malformed multipart body: {error.message}") from error
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the multipart body has no file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


async def read_image(request: Request, limit: int) -> bytes:
    """The image bytes from a raw image body or a multipart field `file`."""
    media_type = imaging.media_type(request.headers.get("content-type", ""))
    if media_type == "multipart/form-data":
        data = await _multipart_file(request)
    elif media_type in imaging.MEDIA_TYPES or media_type == imaging.UNNAMED_MEDIA_TYPE:
        data = await request.body()
    else:
        raise HTTPException(
            415,
            f"unsupported Content-Type {media_type or '(none)'}: send the image as "
            f"{', '.join(sorted(imaging.MEDIA_TYPES))} or as the multipart field 'file'",
        )
    if len(data) > limit:
        raise HTTPException(
            413, f"the image is {len(data)} bytes; the limit is {limit} (MAX_IMAGE_BYTES)"
        )
    return data


async def prepare(
    data: bytes, max_pixels: int, side: int, large_uploads: ThreadPoolExecutor, in_process: bool
) -> tuple[bytes, tuple[int, int]]:
    """imaging.prepare off the event loop, large uploads on their own low-priority thread;
    an image it refuses is answered with its 4xx.

    in_process: the worker runs in this process (embedded mode) and decodes the image anyway,
    refusing it with the same 4xx; an image that is not large is then checked here only from
    its header, and decoded once rather than twice.
    """
    try:
        if imaging.pixels(data) > imaging.LARGE_PIXELS:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                large_uploads, imaging.prepare, data, max_pixels, side
            )
        if in_process:
            return data, imaging.size(data, max_pixels)
        return await asyncio.to_thread(imaging.prepare, data, max_pixels, side)
    except imaging.ImageRejected as error:
        raise HTTPException(error.status, error.message) from error
