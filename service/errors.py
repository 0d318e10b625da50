"""Every error answer of the API: JSON {"detail": ..., "request_id": ...}, never a traceback.

The handlers are registered in service.app. The queue's errors are mapped to HTTP here,
once: the /inspect route counts its requests by the status that these handlers answer.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.queue import DeadlineExceeded, QueueError, QueueFull
from service.settings import Settings

BACKEND_DOWN = "the queue backend is unreachable"


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "unknown")


def as_http(error: QueueError, settings: Settings) -> HTTPException:
    """A full queue is 429 with Retry-After, a missed deadline 504, a backend down 503."""
    if isinstance(error, QueueFull):
        return HTTPException(
            429,
            f"the queue of product {error.product!r} is full ({settings.max_queue}, MAX_QUEUE)",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    if isinstance(error, DeadlineExceeded):
        return HTTPException(
            504, f"no answer within {settings.request_timeout_s} s (REQUEST_TIMEOUT_S)"
        )
    return HTTPException(503, BACKEND_DOWN)


def answered_status(error: BaseException, settings: Settings) -> int:
    """The status the handlers below answer an error with."""
    if isinstance(error, QueueError):
        return as_http(error, settings).status_code
    return error.status_code if isinstance(error, HTTPException) else 500


def error_answer(
    status: int, detail: object, rid: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The one shape of an error answer."""
    return JSONResponse({"detail": detail, "request_id": rid}, status_code=status, headers=headers)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_answer(error.status_code, error.detail, request_id(request), error.headers)


async def queue_error(request: Request, error: QueueError) -> JSONResponse:
    return await http_error(request, as_http(error, request.app.state.settings))


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in error.errors()]
    return error_answer(422, errors, request_id(request))


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # The traceback goes to the log (Starlette re-raises after this), never to the client.
    rid = request_id(request)
    detail = "internal error; the request id is in the server log"
    return error_answer(500, detail, rid, {"x-request-id": rid})
