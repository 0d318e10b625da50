"""The HTTP endpoints: inspection, product lines, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service import imaging, metrics
from service.deps import Services, Svc, require_api_key, require_api_key_for_reads
from service.heatmap import HeatmapKind
from service.queue import DeadlineExceeded, QueueFull, QueueUnavailable
from service.schemas import (
    Error,
    Health,
    Heatmap,
    Inspection,
    Product,
    Products,
    Readiness,
    Timings,
)
from service.settings import PRODUCT_PATTERN
from service.wire import Job, Presence, Reply

router = APIRouter()

# Room for multipart boundaries and part headers on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024
# glad_requests_total's product label for requests that name no known product, so a
# client cannot create label values at will.
NO_PRODUCT = "-"
BACKEND_DOWN = "the queue backend is unreachable"

ProductName = Annotated[
    str, Path(pattern=PRODUCT_PATTERN, description="The product line.", examples=["widget"])
]

IMAGE_SCHEMA = {"type": "string", "format": "binary"}
INSPECT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image, as the raw body or as the multipart field `file`.",
        "content": {
            **{media_type: {"schema": IMAGE_SCHEMA} for media_type in sorted(imaging.MEDIA_TYPES)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": IMAGE_SCHEMA},
                    "required": ["file"],
                }
            },
        },
    }
}
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        401: "Missing or wrong API key.",
        404: "Unknown product.",
        413: "Image too large (bytes or pixels).",
        415: "Not a PNG, JPEG, BMP or TIFF image.",
        422: "Malformed request, product name or image.",
        429: "The product's queue is full; retry after Retry-After seconds.",
        503: "Queue backend down or no live worker for the product.",
        504: "No answer before REQUEST_TIMEOUT_S.",
    }.items()
}


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
    elif media_type in imaging.MEDIA_TYPES or media_type == "application/octet-stream":
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


def _answer(job: Job, reply: Reply, as_png: bool, waited_s: float, started: float) -> Response:
    outcome = reply.outcome
    if outcome is None:
        raise HTTPException(reply.status, reply.error or "the worker failed")
    timings = Timings(
        queue_wait_s=max(waited_s - outcome.service_s, 0.0),
        inference_s=outcome.inference_s,
        total_s=time.perf_counter() - started,
    )
    if as_png and outcome.heatmap is not None:
        headers = {
            "X-Glad-Verdict": "anomalous" if outcome.is_anomalous else "normal",
            "X-Glad-Score": f"{outcome.score:.6f}",
            "X-Glad-Raw-Score": f"{outcome.raw_score:.6g}",
            "X-Glad-Threshold": f"{outcome.threshold:.6g}",
            "X-Glad-Denoise-Step": str(outcome.denoise_step),
            "X-Glad-Model-Version": outcome.model_version,
            "Server-Timing": (
                f"queue;dur={timings.queue_wait_s * 1000:.1f}, "
                f"inference;dur={timings.inference_s * 1000:.1f}, "
                f"total;dur={timings.total_s * 1000:.1f}"
            ),
        }
        return Response(outcome.heatmap, media_type="image/png", headers=headers)
    heat = None
    if outcome.heatmap is not None:
        heat = Heatmap(kind=job.heatmap, data=base64.b64encode(outcome.heatmap).decode())
    body = Inspection(
        request_id=job.request_id,
        product=job.product,
        heatmap=heat,
        timings=timings,
        **outcome.verdict(),
    )
    return JSONResponse(body.model_dump(mode="json"))


async def _known_presences(svc: Services, product: str) -> list[Presence]:
    """The presences of the product's live workers; 404 when the product is unknown."""
    try:
        presences = await svc.presence.product(product)
    except QueueUnavailable as error:
        raise HTTPException(503, BACKEND_DOWN) from error
    if presences is None:
        raise HTTPException(404, f"unknown product {product!r}")
    return presences


async def _live_presences(svc: Services, product: str) -> list[Presence]:
    """As _known_presences, and 503 when no worker serving the product is live."""
    presences = await _known_presences(svc, product)
    if not presences:
        raise HTTPException(
            503,
            f"no live worker serves product {product!r} right now",
            headers={"Retry-After": str(svc.settings.retry_after_s)},
        )
    return presences


async def _prepared(svc: Services, data: bytes, side: int) -> tuple[bytes, tuple[int, int]]:
    """imaging.prepare off the event loop; large uploads on their own low-priority thread."""
    args = (data, svc.settings.max_pixels, side)
    if imaging.pixels(data) > imaging.LARGE_PIXELS:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(svc.large_uploads, imaging.prepare, *args)
    return await asyncio.to_thread(imaging.prepare, *args)


@router.post(
    "/inspect/{product}",
    summary="Inspect one part",
    tags=["inspection"],
    response_model=Inspection,
    responses={
        200: {
            "description": "The verdict as JSON, or the heatmap with `Accept: image/png`.",
            "content": {"image/png": {"schema": IMAGE_SCHEMA}},
        },
        **ERRORS,
    },
    openapi_extra=INSPECT_BODY,
    dependencies=[Depends(require_api_key)],
)
async def inspect(
    request: Request,
    product: ProductName,
    svc: Svc,
    heatmap: Annotated[
        HeatmapKind,
        Query(description="overlay: colormap over the image; map: the bare map; none."),
    ] = HeatmapKind.overlay,
) -> Response:
    """Score one image. With `Accept: image/png` the answer is the heatmap PNG itself and
    the verdict comes in X-Glad-* headers."""
    started = time.perf_counter()
    settings, api = svc.settings, svc.api_metrics
    label, status = NO_PRODUCT, 500
    try:
        as_png = "image/png" in request.headers.get("accept", "")
        if as_png and heatmap is HeatmapKind.none:
            raise HTTPException(422, "heatmap=none cannot be answered as image/png")
        presences = await _live_presences(svc, product)
        label = product
        # Before the body is read and decoded: under a flood, refusing costs next to nothing.
        if not await svc.queue.has_room(product):
            raise QueueFull(product)
        data = await read_image(request, settings.max_image_bytes, settings.body_timeout_s)
        # As the worker would shrink it: never below the model's own size.
        side = max(settings.heatmap_max_side, *(p.image_size for p in presences))
        try:
            data, (width, height) = await _prepared(svc, data, side)
        except imaging.ImageRejected as error:
            raise HTTPException(error.status, error.message) from error
        job = Job(
            request_id=request.state.request_id,
            product=product,
            heatmap=heatmap,
            deadline=time.time() + settings.request_timeout_s,
            image_width=width,
            image_height=height,
        )
        enqueued = time.perf_counter()
        try:
            reply = await svc.queue.submit(job, data)
        except DeadlineExceeded as error:
            raise HTTPException(
                504, f"no answer within {settings.request_timeout_s} s (REQUEST_TIMEOUT_S)"
            ) from error
        waited = time.perf_counter() - enqueued
        response = _answer(job, reply, as_png, waited, started)
        if reply.outcome is not None:
            api.queue_wait.labels(product).observe(max(waited - reply.outcome.service_s, 0.0))
        status = response.status_code
        return response
    except QueueFull as error:
        status = 429
        raise HTTPException(
            429,
            f"the queue of product {product!r} is full ({settings.max_queue}, MAX_QUEUE)",
            headers={"Retry-After": str(settings.retry_after_s)},
        ) from error
    except QueueUnavailable as error:
        status = 503
        raise HTTPException(503, BACKEND_DOWN) from error
    except HTTPException as error:
        status = error.status_code
        raise
    finally:
        api.requests.labels(label, str(status)).inc()
        if label != NO_PRODUCT:
            api.request_duration.labels(label).observe(time.perf_counter() - started)


def _product(name: str, presences: list[Presence]) -> Product:
    if not presences:
        return Product(
            name=name,
            live_workers=0,
            model_version=None,
            image_size=None,
            threshold=None,
            preset=None,
        )
    version, _ = Counter(p.version for p in presences).most_common(1)[0]
    served = next(p for p in presences if p.version == version)
    return Product(
        name=name,
        live_workers=len(presences),
        model_version=version,
        image_size=served.image_size,
        threshold=served.threshold,
        preset=served.preset,
    )


@router.get(
    "/products",
    tags=["products"],
    response_model=Products,
    responses={503: ERRORS[503]},
    dependencies=[Depends(require_api_key_for_reads)],
)
async def list_products(svc: Svc) -> Products:
    """Every known product line and the model its live workers serve."""
    try:
        known = await svc.presence.products()
    except QueueUnavailable as error:
        raise HTTPException(503, BACKEND_DOWN) from error
    return Products(products=[_product(name, p) for name, p in sorted(known.items())])


@router.get(
    "/products/{product}",
    tags=["products"],
    response_model=Product,
    responses={404: ERRORS[404], 503: ERRORS[503]},
    dependencies=[Depends(require_api_key_for_reads)],
)
async def get_product(product: ProductName, svc: Svc) -> Product:
    """One product line."""
    return _product(product, await _known_presences(svc, product))


@router.get("/healthz", tags=["health"], response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health()


@router.get(
    "/readyz",
    tags=["health"],
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
async def readyz(svc: Svc) -> JSONResponse:
    """Ready when the queue answers and every known product has a live worker."""
    backend = "redis" if svc.settings.redis_url else "memory"
    try:
        await svc.queue.ping()
        known = await svc.presence.products()
    except QueueUnavailable:
        answer = Readiness(
            ready=False, queue=f"{backend}: unreachable", products={}, detail="queue down"
        )
        return JSONResponse(answer.model_dump(), status_code=503)
    counts = {name: len(presences) for name, presences in sorted(known.items())}
    missing = [name for name, count in counts.items() if not count]
    if missing:
        detail = f"no live worker for {', '.join(missing)}"
    else:
        detail = "ready" if counts else "no product is served yet"
    ready = bool(counts) and not missing
    answer = Readiness(ready=ready, queue=f"{backend}: ok", products=counts, detail=detail)
    return JSONResponse(answer.model_dump(), status_code=200 if answer.ready else 503)


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    dependencies=[Depends(require_api_key_for_reads)],
)
async def metrics_endpoint(svc: Svc) -> Response:
    """Prometheus metrics (the worker's too, in embedded mode)."""
    try:
        depths = await svc.queue.depths(await svc.presence.names())
    except QueueUnavailable:
        depths = {}
    return Response(metrics.render(svc.registries, depths), media_type=CONTENT_TYPE_LATEST)
