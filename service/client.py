"""A Python client for the inspection API, sync and asyncio.

    with InspectionClient("http://127.0.0.1:8000", api_key=...) as client:
        result = client.inspect("demo", "part.png")
        print(result.is_anomalous, result.score)

An image may be a path, the encoded bytes of a PNG, JPEG, BMP or TIFF, a PIL image or a
uint8 numpy array (H x W or H x W x 3). A full queue (429) or a service without a live
worker (503) is retried, after the answer's Retry-After where it gives one, until the
call's deadline; any other refusal raises InspectionError at once. One connection pool per
client: keep a client for many calls.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service import imaging
from service.schemas import Inspection

Picture = str | Path | bytes | Image.Image | np.ndarray

RETRIED = (429, 503)
FIRST_BACKOFF_S = 0.1
LONGEST_BACKOFF_S = 5.0
# Magic bytes of the formats the API takes (service.imaging.FORMATS).
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class InspectionError(Exception):
    """The service refused or could not answer; status 0 when it could not be reached."""

    def __init__(self, status: int, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.request_id = request_id


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str


def encode(image: Picture) -> Body:
    """The request body for an image in any of the accepted forms."""
    if isinstance(image, str | Path):
        return encode(Path(image).read_bytes())
    if isinstance(image, bytes):
        kind = next((f for sig, f in _SIGNATURES.items() if image.startswith(sig)), None)
        # An unknown format is sent as it is: the service says what it accepts.
        return Body(image, imaging.FORMATS[kind] if kind else imaging.UNNAMED_MEDIA_TYPE)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError("a numpy image must be uint8, H x W or H x W x 3")
        return encode(Image.fromarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return Body(buffer.getvalue(), "image/png")


def heatmap_png(result: Inspection) -> bytes | None:
    """The answer's heatmap as PNG bytes, if it holds one."""
    return None if result.heatmap is None else base64.b64decode(result.heatmap.data)


def retry_wait_s(response: httpx.Response, attempt: int) -> float:
    """How long to wait before attempt + 1: the answer's Retry-After, else a doubling backoff."""
    given = response.headers.get("retry-after", "")
    if given.isdigit():
        return float(given)
    return min(FIRST_BACKOFF_S * 2**attempt, LONGEST_BACKOFF_S)


def _error(response: httpx.Response) -> InspectionError:
    try:
        body = response.json()
        detail = body.get("detail", response.text)
        request_id = body.get("request_id")
    except ValueError:
        detail, request_id = response.text, None
    return InspectionError(response.status_code, str(detail), request_id)


class _Call:
    """One inspection's request and what decides whether to try it again."""

    def __init__(self, client: _ClientBase, product: str, image: Picture, heatmap: str) -> None:
        body = encode(image)
        self.url = f"/inspect/{product}"
        self.content = body.data
        self.params = {"heatmap": heatmap}
        # One id for every attempt, so the server's log ties them together.
        self.headers = {
            "Content-Type": body.content_type,
            "X-Request-ID": uuid.uuid4().hex,
            **client.auth,
        }
        self.ends = time.monotonic() + client.deadline_s
        self.attempt = 0

    def left_s(self) -> float:
        return self.ends - time.monotonic()

    def request(self) -> dict[str, Any]:
        """The POST's arguments for the next attempt, its timeout what the deadline leaves."""
        return {
            "content": self.content,
            "params": self.params,
            "headers": self.headers,
            "timeout": max(self.left_s(), 0.001),
        }

    def outcome(self, response: httpx.Response) -> Inspection | float:
        """The result, or how long to wait before the next attempt; raises when done."""
        if response.status_code == 200:
            return Inspection.model_validate_json(response.content)
        error = _error(response)
        return self._wait_or_raise(error, retry_wait_s(response, self.attempt), response)

    def unreachable(self, error: httpx.TransportError) -> float:
        wait = min(FIRST_BACKOFF_S * 2**self.attempt, LONGEST_BACKOFF_S)
        return self._wait_or_raise(
            InspectionError(0, f"could not reach the service: {error}"), wait
        )

    def _wait_or_raise(
        self, error: InspectionError, wait_s: float, response: httpx.Response | None = None
    ) -> float:
        retried = response is None or response.status_code in RETRIED
        if not retried or wait_s >= self.left_s():
            raise error
        self.attempt += 1
        return wait_s


class _ClientBase:
    def __init__(self, api_key: str | None, deadline_s: float) -> None:
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s = deadline_s


class InspectionClient(_ClientBase):
    """The blocking client. deadline_s bounds each call, its retries included."""

    def __init__(self, base_url: str, api_key: str | None = None, deadline_s: float = 30.0):
        super().__init__(api_key, deadline_s)
        self.http = httpx.Client(base_url=base_url, timeout=deadline_s)

    def inspect(self, product: str, image: Picture, heatmap: str = "none") -> Inspection:
        call = _Call(self, product, image, heatmap)
        while True:
            try:
                response = self.http.post(call.url, **call.request())
            except httpx.TransportError as error:
                time.sleep(call.unreachable(error))
                continue
            outcome = call.outcome(response)
            if isinstance(outcome, Inspection):
                return outcome
            time.sleep(outcome)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> InspectionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInspectionClient(_ClientBase):
    """The asyncio client: many inspections in flight over one connection pool."""

    def __init__(self, base_url: str, api_key: str | None = None, deadline_s: float = 30.0):
        super().__init__(api_key, deadline_s)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=deadline_s)

    async def inspect(self, product: str, image: Picture, heatmap: str = "none") -> Inspection:
        call = _Call(self, product, image, heatmap)
        while True:
            try:
                response = await self.http.post(call.url, **call.request())
            except httpx.TransportError as error:
                await asyncio.sleep(call.unreachable(error))
                continue
            outcome = call.outcome(response)
            if isinstance(outcome, Inspection):
                return outcome
            await asyncio.sleep(outcome)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncInspectionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
