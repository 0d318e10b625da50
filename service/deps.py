"""What the routes share (built by the lifespan handler), as FastAPI dependencies."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException

from service import imaging
from service.metrics import ApiMetrics
from service.presence import PresenceBoard
from service.queue import Queue
from service.recorder import Recorder
from service.settings import Settings
from service.verdicts import VerdictPublisher

bearer = HTTPBearer(auto_error=False, description="Needed when the service has an API_KEY.")


@dataclass(frozen=True)
class Services:
    settings: Settings
    queue: Queue
    presence: PresenceBoard
    api_metrics: ApiMetrics
    # Rendered by /metrics: the API's, plus the worker's in embedded mode.
    registries: tuple[CollectorRegistry, ...]
    # Where answered inspections are recorded; None: they are not.
    recorder: Recorder | None = None
    # Where verdicts are published on the plant's bus; None: they are not.
    verdicts: VerdictPublisher | None = None
    # Large uploads (service.imaging.LARGE_PIXELS) are decoded on one thread of their own,
    # one at a time and at a low CPU priority: they yield the cores to the workers.
    large_uploads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "large-upload", imaging.lower_priority)
    )


async def services(request: Request) -> Services:
    # async: FastAPI runs a plain function dependency on a worker thread, a thread hop
    # for every request.
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


async def require_api_key(
    svc: Svc, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """With API_KEY set, /inspect needs `Authorization: Bearer <API_KEY>`."""
    _check_key(svc.settings, credentials)


async def require_api_key_for_reads(
    svc: Svc, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """With API_KEY set and API_KEY_READS on, /products and /metrics need the key too: they
    tell thresholds, model versions and traffic."""
    if svc.settings.api_key_reads:
        _check_key(svc.settings, credentials)


def _check_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    key = settings.api_key.get_secret_value() if settings.api_key else ""
    if not key:
        return
    given = credentials.credentials if credentials else ""
    # Constant time, so the key cannot be guessed byte by byte from response times.
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise HTTPException(
            401,
            "missing or wrong API key: send the header Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
