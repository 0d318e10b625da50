"""The HTTP endpoints: inspection, product lines, health and metrics."""

from __future__ import annotations

import base64
import time
from types import TracebackType
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from service import metrics, upload
from service.deps import Services, Svc, require_api_key, require_api_key_for_reads
from service.errors import answered_status
from service.heatmap import HeatmapKind
from service.history import Identity, inspection_row, record_answer
from service.metrics import ApiMetrics
from service.queue import QueueFull, QueueUnavailable
from service.schemas import (
    ERRORS,
    INSPECT_BODY,
    INSPECT_RESPONSES,
    Health,
    Heatmap,
    Inspection,
    Product,
    Products,
    Readiness,
    Timings,
)
from service.settings import PRODUCT_PATTERN, Settings
from service.wire import Job, Outcome, Presence

router = APIRouter()

# glad_requests_total's product label for requests that name no known product, so a
# client cannot create label values at will.
NO_PRODUCT = "-"

ProductName = Annotated[
    str, Path(pattern=PRODUCT_PATTERN, description="The product line.", examples=["widget"])
]


class _Counted:
    """Counts one /inspect request in glad_requests_total, by the status it is answered
    with (an error's as the error handlers answer it), and in glad_request_duration_seconds
    once it names a known product."""

    def __init__(self, api: ApiMetrics, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self.started = time.perf_counter()
        self.product = NO_PRODUCT
        self.status = 500

    def __enter__(self) -> _Counted:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None
    ) -> None:
        if error is not None:
            self.status = answered_status(error, self._settings)
        self._api.requests.labels(self.product, str(self.status)).inc()
        if self.product != NO_PRODUCT:
            elapsed = time.perf_counter() - self.started
            self._api.request_duration.labels(self.product).observe(elapsed)


def count_refused_body(api: ApiMetrics, path: str, status: int) -> None:
    """Counts an /inspect request that service.body_gate refused before it was routed (so
    before its product was known)."""
    if path.startswith("/inspect/"):
        api.requests.labels(NO_PRODUCT, str(status)).inc()


async def _known_presences(svc: Services, product: str) -> list[Presence]:
    """The presences of the product's live workers; 404 when the product is unknown."""
    presences = await svc.presence.product(product)
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


def _answer(job: Job, outcome: Outcome, as_png: bool, timings: Timings, recorded: bool) -> Response:
    """The heatmap PNG with the verdict in headers, or the verdict as JSON."""
    if as_png and outcome.heatmap is not None:
        headers = {
            "X-Glad-Verdict": "anomalous" if outcome.is_anomalous else "normal",
            "X-Glad-Score": f"{outcome.score:.6f}",
            "X-Glad-Raw-Score": f"{outcome.raw_score:.6g}",
            "X-Glad-Threshold": f"{outcome.threshold:.6g}",
            "X-Glad-Denoise-Step": str(outcome.denoise_step),
            "X-Glad-Model-Version": outcome.model_version,
            **({"X-Glad-Inspection-Id": job.id} if recorded else {}),
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
        inspection_id=job.id if recorded else None,
        **outcome.verdict(),
    )
    return JSONResponse(body.model_dump(mode="json"))


@router.post(
    "/inspect/{product}",
    summary="Inspect one part",
    tags=["inspection"],
    response_model=Inspection,
    responses=INSPECT_RESPONSES,
    openapi_extra=INSPECT_BODY,
    dependencies=[Depends(require_api_key)],
)
async def inspect(
    request: Request,
    product: ProductName,
    svc: Svc,
    identity: Identity,
    heatmap: Annotated[
        HeatmapKind,
        Query(description="overlay: colormap over the image; map: the bare map; none."),
    ] = HeatmapKind.overlay,
) -> Response:
    """Score one image. With `Accept: image/png` the answer is the heatmap PNG itself and
    the verdict comes in X-Glad-* headers."""
    settings = svc.settings
    with _Counted(svc.api_metrics, settings) as counted:
        as_png = "image/png" in request.headers.get("accept", "")
        if as_png and heatmap is HeatmapKind.none:
            raise HTTPException(422, "heatmap=none cannot be answered as image/png")
        presences = await _live_presences(svc, product)
        counted.product = product
        # Before the image is decoded: under a flood, refusing costs next to nothing.
        if not await svc.queue.has_room(product):
            raise QueueFull(product)
        data = await upload.read_image(request, settings.max_image_bytes)
        # As the worker would shrink it: never below the model's own size.
        side = max(settings.heatmap_max_side, *(p.image_size for p in presences))
        data, (width, height) = await upload.prepare(
            data, settings.max_pixels, side, svc.large_uploads, settings.embedded
        )
        job = Job(
            request_id=request.state.request_id,
            product=product,
            heatmap=heatmap,
            deadline=time.time() + settings.request_timeout_s,
            image_width=width,
            image_height=height,
        )
        enqueued = time.perf_counter()
        reply = await svc.queue.submit(job, data)
        if reply.outcome is None:
            raise HTTPException(reply.status, reply.error or "the worker failed")
        queue_wait_s = max(time.perf_counter() - enqueued - reply.outcome.service_s, 0.0)
        timings = Timings(
            queue_wait_s=queue_wait_s,
            inference_s=reply.outcome.inference_s,
            total_s=time.perf_counter() - counted.started,
        )
        recorded = svc.recorder is not None
        response = _answer(job, reply.outcome, as_png, timings, recorded)
        if svc.recorder is not None or svc.verdicts is not None:
            row = inspection_row(job, reply.outcome, timings, identity)
            # Published first: the recorder's thread adds the media paths to the row.
            if svc.verdicts is not None:
                svc.verdicts.publish(job.product, row)
            if svc.recorder is not None:
                record_answer(svc.recorder, row, reply.outcome, data)
        svc.api_metrics.queue_wait.labels(product).observe(queue_wait_s)
        counted.status = response.status_code
        return response


@router.get(
    "/products",
    tags=["products"],
    response_model=Products,
    responses={503: ERRORS[503]},
    dependencies=[Depends(require_api_key_for_reads)],
)
async def list_products(svc: Svc) -> Products:
    """Every known product line and the model its live workers serve."""
    known = await svc.presence.products()
    return Products(products=[Product.serving(name, p) for name, p in sorted(known.items())])


@router.get(
    "/products/{product}",
    tags=["products"],
    response_model=Product,
    responses={404: ERRORS[404], 503: ERRORS[503]},
    dependencies=[Depends(require_api_key_for_reads)],
)
async def get_product(product: ProductName, svc: Svc) -> Product:
    """One product line."""
    return Product.serving(product, await _known_presences(svc, product))


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
