"""The front door for request bodies: each body is read whole before the app sees its
request, and refused when it is too long (413) or has not arrived within BODY_TIMEOUT_S
(408, and the connection closed).

As behind a buffering proxy, routing, authentication and the queue are reached only by
requests whose body is complete: a stalled upload costs the API a connection and a timer,
not a routed request that waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import imaging
from service.errors import error_answer

# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024

OnRefusal = Callable[[Scope, int], None]


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


def _body_limit(headers: Headers, max_image_bytes: int) -> int:
    """The most bytes a body may hold: the image, plus room for multipart's own lines."""
    multipart = imaging.media_type(headers.get("content-type", "")) == "multipart/form-data"
    return max_image_bytes + (MULTIPART_OVERHEAD if multipart else 0)


class BodyGate:
    """Reads every HTTP request's body within its limits, then hands the request on with
    the body ready. on_refusal(scope, status) is told of each 408 and 413 it answers."""

    def __init__(
        self, app: ASGIApp, max_image_bytes: int, timeout_s: float, on_refusal: OnRefusal
    ) -> None:
        self.app = app
        self.max_image_bytes = max_image_bytes
        self.timeout_s = timeout_s
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except _Refused as refused:
            self.on_refusal(scope, refused.status)
            rid = scope.get("state", {}).get("request_id", "unknown")
            # The rest of the body may still come: the connection cannot carry another request.
            answer = error_answer(refused.status, refused.detail, rid, {"Connection": "close"})
            await answer(scope, receive, send)
            return
        if body is None:  # the client left, or uvicorn refused the request itself
            return
        await self.app(scope, _replaying(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body; None when the client disconnected before it was complete."""
        headers = Headers(scope=scope)
        limit = _body_limit(headers, self.max_image_bytes)
        note = f"the limit for this body is {limit} bytes (from MAX_IMAGE_BYTES)"
        declared = headers.get("content-length", "")
        # Before the first receive: that is what sends a client's `100 Continue`.
        if declared.isdigit() and int(declared) > limit:
            raise _Refused(413, f"the body is {declared} bytes; {note}")
        # Joined once at the end: growing one buffer would copy it over and over, and the
        # memory a 6000 px upload left behind would be twice its size.
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(413, f"the body is too long; {note}")
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError as error:
            raise _Refused(
                408, f"the body did not arrive within {self.timeout_s:g} s (BODY_TIMEOUT_S)"
            ) from error


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then whatever the client sends next
    (its disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
