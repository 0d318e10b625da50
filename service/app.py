"""The FastAPI application: start-up and shut-down, request ids, error answers."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import imaging, page
from service.body_gate import BodyGate
from service.deps import Services
from service.docs import add_docs
from service.errors import http_error, queue_error, unexpected_error, validation_error
from service.gc_freeze import freeze_long_lived_objects
from service.history import router as history_router
from service.media import MediaStore
from service.metrics import ApiMetrics, RecordMetrics, VerdictMetrics, WorkerMetrics
from service.presence import CachedPresenceBoard, MemoryPresenceBoard, PresenceBoard
from service.queue import MemoryQueue, Queue, QueueError
from service.recorder import Recorder
from service.records import RecordStore
from service.redis_queue import RedisBackend
from service.routes import count_refused_body, router
from service.settings import Settings
from service.verdicts import VerdictPublisher

if TYPE_CHECKING:
    from service.worker import Worker

log = logging.getLogger(__name__)

PACKAGE = "glad-inspect"
# The defective sample part `glad demo` writes beside the demo model.
DEMO_SAMPLE = "demo_images/defect.png"

# Redis connections beyond one per admitted request (the depth gauge, readiness).
API_SPARE_CONNECTIONS = 8
# A client's own X-Request-ID is kept when it looks like an id, not arbitrary text.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

_RAW_BODIES = ", ".join(f"`{media_type}`" for media_type in imaging.FORMATS.values())
DESCRIPTION = f"""
Industrial visual inspection with GLAD (diffusion-based anomaly detection).

Post a part's image to `POST /inspect/{{product}}`, as the raw body ({_RAW_BODIES}) or
as the multipart field `file`. The answer holds the anomaly score (normalised: 0.5 is the
threshold), the verdict and a heatmap.
"""


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if sane) and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def try_it(settings: Settings, products: list[str]) -> str:
    """What to paste to try the service: a curl for the first product, the page and docs."""
    base = f"http://{settings.host}:{settings.port}"
    if not products:
        return f"no product under {settings.model_dir} yet (glad demo or glad train makes one)"
    sample = DEMO_SAMPLE if Path(DEMO_SAMPLE).is_file() else "part.png"
    auth = ' -H "Authorization: Bearer $API_KEY"' if settings.api_key else ""
    return (
        f"ready: {', '.join(products)}. Try it:\n"
        f"  curl -s{auth} -H 'Content-Type: image/png' --data-binary @{sample} "
        f"'{base}/inspect/{products[0]}?heatmap=none'\n"
        f"  operator page {base}/   API docs {base}/docs"
    )


async def _start(worker: Worker) -> asyncio.Task[None]:
    """Run the worker in the background once its models are loaded (or raise why not)."""
    running = asyncio.create_task(worker.run())
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        ready.cancel()
        running.result()
    return running


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the queue and the presence board (and the embedded worker), serve, then shut
    down cleanly."""
    settings: Settings = app.state.settings
    imaging.limit_decoder(settings.max_pixels)
    api_registry = CollectorRegistry()
    registries: tuple[CollectorRegistry, ...] = (api_registry,)
    embedded: tuple[Worker, asyncio.Task[None]] | None = None
    backend: RedisBackend | None = None
    queue: Queue
    presence: PresenceBoard
    if settings.redis_url:
        imaging.map_large_blocks()  # the API alone: no model runs in this process
        backend = RedisBackend.open(
            settings.redis_url,
            settings.key_prefix,
            settings.max_queue,
            settings.request_timeout_s,
            # One per request uvicorn lets in (MAX_CONNECTIONS), and a few for the rest.
            max_connections=settings.max_connections + API_SPARE_CONNECTIONS,
        )
        queue = backend.queue
        presence = CachedPresenceBoard(backend.presence, settings.presence_cache_s)
    else:
        # Imported only here: the worker brings PyTorch, which the API alone never needs.
        from service.worker import Worker

        queue, presence = MemoryQueue(settings.max_queue), MemoryPresenceBoard()
        worker_registry = CollectorRegistry()
        registries += (worker_registry,)
        worker = Worker(settings, queue, presence, WorkerMetrics(worker_registry))
        embedded = (worker, await _start(worker))
        log.info("%s", try_it(settings, sorted(worker.products.models)))
    recording = _recorder(settings, api_registry)
    verdicts = _verdict_publisher(settings, api_registry)
    app.state.services = Services(
        settings,
        queue,
        presence,
        ApiMetrics(api_registry),
        registries,
        recorder=recording[0] if recording else None,
        verdicts=verdicts,
    )
    freeze_long_lived_objects()
    try:
        yield
    finally:
        if verdicts is not None:
            await asyncio.to_thread(verdicts.stop)
        if recording is not None:
            await recording[0].stop(recording[1])
        if embedded is not None:
            worker, running = embedded
            worker.stop()
            await running
        if backend is not None:
            await backend.close()


def _recorder(
    settings: Settings, registry: CollectorRegistry
) -> tuple[Recorder, asyncio.Task[None]] | None:
    """The recorder and its writing task, when the service keeps records. The database is
    not touched here: the recorder migrates it when it first writes, so a database that is
    down does not stop the service from starting."""
    url = settings.record_url
    if url is None:
        log.info("inspections are not recorded (RECORD=0, or Redis mode without DATABASE_URL)")
        return None
    media = MediaStore(
        settings.media_dir,
        settings.keep_images,
        settings.image_max_age_days * 86400,
        int(settings.image_max_mib * 2**20),
    )
    recorder = Recorder(RecordStore(url), media, settings.record_buffer, RecordMetrics(registry))
    return recorder, asyncio.create_task(recorder.run())


def _verdict_publisher(settings: Settings, registry: CollectorRegistry) -> VerdictPublisher | None:
    """The MQTT publisher, connecting in the background, when MQTT_URL is set."""
    if settings.mqtt_url is None:
        return None
    publisher = VerdictPublisher(
        settings.mqtt_url.get_secret_value(),
        settings.mqtt_topic_prefix,
        settings.mqtt_outbox,
        VerdictMetrics(registry),
    )
    publisher.start()
    return publisher


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application; settings default to the environment."""
    app = FastAPI(
        title="glad-inspect",
        description=DESCRIPTION,
        version=version(PACKAGE),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings = settings or Settings()
    app.include_router(router)
    app.include_router(history_router)
    app.include_router(page.router)
    add_docs(app)

    def count_refusal(scope: Scope, status: int) -> None:
        count_refused_body(app.state.services.api_metrics, scope["path"], status)

    # Inside RequestIdMiddleware, so that its refusals carry the request id too.
    app.add_middleware(
        BodyGate,
        max_image_bytes=settings.max_image_bytes,
        timeout_s=settings.body_timeout_s,
        on_refusal=count_refusal,
    )
    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(QueueError, queue_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
    if settings.api_key is None:
        _document_no_auth(app)
    return app


def _document_no_auth(app: FastAPI) -> None:
    """Without API_KEY nothing asks for a key, so the OpenAPI document declares none."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
