"""The image of an /inspect request: read from a raw or multipart body within its limits,
then checked and prepared for a worker off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import imaging

# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024
_LIMIT_NOTE = "the limit for this body is {} bytes (from MAX_IMAGE_BYTES)"


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused as soon as it is known to exceed `limit`, or when it has not
    arrived within timeout_s (a stalled client must not hold its connection)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body is {declared} bytes; {_LIMIT_NOTE.format(limit)}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, f"the body is too long; {_LIMIT_NOTE.format(limit)}")
    except TimeoutError as error:
        raise HTTPException(
            408,
            f"the body did not arrive within {timeout_s:g} s (BODY_TIMEOUT_S)",
            headers={"Connection": "close"},
        ) from error
    except ClientDisconnect as error:
        raise HTTPException(400, "the client disconnected while sending the body") from error
    return bytes(body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    async def chunks() -> AsyncGenerator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=8).parse()
    except MultiPartException as error:
        raise HTTPException(422, f"malformed multipart body: {error.message}") from error
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "the multipart body has no file field named 'file'")
        return await upload.read()
    finally:
        await form.close()


async def read_image(request: Request, limit: int, timeout_s: float) -> bytes:
    """The image bytes from a raw image body or a multipart field `file`."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        body = await _read_body(request, limit + MULTIPART_OVERHEAD, timeout_s)
        data = await _multipart_file(request, body)
    elif media_type in imaging.MEDIA_TYPES or media_type == imaging.UNNAMED_MEDIA_TYPE:
        data = await _read_body(request, limit, timeout_s)
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
