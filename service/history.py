"""The record of inspections over HTTP: what a part's identity may be, the record of an
answer, and the endpoints that list, export and review records."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import FileResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from service.deps import Svc, require_api_key
from service.recorder import Pending, Recorder
from service.records import (
    COLUMNS,
    MAX_IDENTITY_LENGTH,
    PRINTABLE,
    Filters,
    InspectionRow,
    RecordStore,
    ReviewLabel,
    read_time,
    stored_time,
)
from service.schemas import ERRORS, InspectionPage, InspectionRecord, Review, Timings
from service.settings import PRODUCT_PATTERN
from service.wire import Job, Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")

router = APIRouter(tags=["records"], dependencies=[Depends(require_api_key)])

RECORD_ID_PATTERN = r"^[0-9a-f]{32}$"
MAX_PAGE = 500
EXPORT_LIMIT = 100_000


@dataclass(frozen=True)
class PartIdentity:
    part_id: str | None = None
    camera_id: str | None = None
    line_id: str | None = None


def _identity(header: str | None, query: str | None, name: str) -> str | None:
    value = header if header is not None else query
    if value is None:
        return None
    if len(value) > MAX_IDENTITY_LENGTH or not re.fullmatch(PRINTABLE, value):
        raise HTTPException(
            422,
            f"{name} must be 1 to {MAX_IDENTITY_LENGTH} printable characters, without "
            "control characters",
        )
    return value


async def part_identity(
    x_part_id: Annotated[str | None, Header(description="The part's identity.")] = None,
    x_camera_id: Annotated[str | None, Header(description="The camera that took it.")] = None,
    x_line_id: Annotated[str | None, Header(description="The production line.")] = None,
    part_id: Annotated[str | None, Query(description="As X-Part-Id.")] = None,
    camera_id: Annotated[str | None, Query(description="As X-Camera-Id.")] = None,
    line_id: Annotated[str | None, Query(description="As X-Line-Id.")] = None,
) -> PartIdentity:
    """The part's identity from its headers or query parameters (a header wins)."""
    return PartIdentity(
        part_id=_identity(x_part_id, part_id, "X-Part-Id (or part_id)"),
        camera_id=_identity(x_camera_id, camera_id, "X-Camera-Id (or camera_id)"),
        line_id=_identity(x_line_id, line_id, "X-Line-Id (or line_id)"),
    )


Identity = Annotated[PartIdentity, Depends(part_identity)]


def inspection_row(
    job: Job, outcome: Outcome, timings: Timings, identity: PartIdentity
) -> dict[str, object]:
    """The record of an answered inspection, as the table keeps it."""
    return {
        "id": job.id,
        "request_id": job.request_id,
        "time": stored_time(datetime.now(UTC)),
        "product": job.product,
        "model_version": outcome.model_version,
        "score": outcome.score,
        "raw_score": outcome.raw_score,
        "threshold": outcome.threshold,
        "is_anomalous": outcome.is_anomalous,
        "denoise_step": outcome.denoise_step,
        "queue_wait_s": timings.queue_wait_s,
        "inference_s": timings.inference_s,
        "total_s": timings.total_s,
        "part_id": identity.part_id,
        "camera_id": identity.camera_id,
        "line_id": identity.line_id,
        "media_expired": False,
    }


def record_answer(
    recorder: Recorder, row: dict[str, object], outcome: Outcome, image: bytes
) -> None:
    """Hands an answered inspection's record to the recorder (never waits for the database),
    with its image and heatmap where the policy keeps them."""
    kept = recorder.media.wants(outcome.is_anomalous)
    recorder.submit(Pending(row, image if kept else None, outcome.heatmap if kept else None))


async def _store(svc: Svc) -> RecordStore:
    recorder = svc.recorder
    if recorder is None:
        raise HTTPException(
            404,
            "this service keeps no record of inspections: set DATABASE_URL (Redis mode) or "
            "RECORD=1",
        )
    await _database(recorder.ensure_migrated)
    return recorder.store


async def _database(call: Callable[..., T], *args: object) -> T:
    """A store call on a thread; a database that does not answer is a 503."""
    try:
        return await asyncio.to_thread(call, *args)
    except SQLAlchemyError as error:
        log.warning("the inspection database failed a query: %s", error)
        raise HTTPException(
            503, "the inspection database is unavailable; retry later", headers={"Retry-After": "5"}
        ) from error


Store = Annotated[RecordStore, Depends(_store)]
RecordId = Annotated[str, Path(pattern=RECORD_ID_PATTERN, description="The inspection_id.")]


def _record(row: InspectionRow) -> InspectionRecord:
    values = {name: getattr(row, name) for name in COLUMNS}
    values["time"] = read_time(row.time)
    values["reviewed_at"] = read_time(row.reviewed_at) if row.reviewed_at else None
    base = f"/inspections/{row.id}"
    kept = not row.media_expired
    values["image_url"] = f"{base}/image" if row.image_path and kept else None
    values["heatmap_url"] = f"{base}/heatmap" if row.heatmap_path and kept else None
    return InspectionRecord.model_validate(values)


async def filters(
    product: Annotated[str | None, Query(pattern=PRODUCT_PATTERN)] = None,
    verdict: Annotated[str | None, Query(pattern=r"^(anomalous|normal)$")] = None,
    since: Annotated[datetime | None, Query(description="From this time (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Before this time (ISO 8601).")] = None,
    part_id: Annotated[str | None, Query(max_length=MAX_IDENTITY_LENGTH)] = None,
    reviewed: Annotated[bool | None, Query()] = None,
    label: Annotated[ReviewLabel | None, Query()] = None,
) -> Filters:
    """GET /inspections' filters; a time without a zone is UTC."""
    since, until = (
        t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t for t in (since, until)
    )
    if since is not None and until is not None and since >= until:
        raise HTTPException(422, "since must be before until")
    anomalous = None if verdict is None else verdict == "anomalous"
    return Filters(product, anomalous, since, until, part_id, reviewed, label)


Chosen = Annotated[Filters, Depends(filters)]


@router.get("/inspections", response_model=InspectionPage, responses={401: ERRORS[401]})
async def list_inspections(
    store: Store,
    chosen: Chosen,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> InspectionPage:
    """Recorded inspections, newest first, a page at a time."""
    rows, total = await _database(store.query, chosen, limit, offset)
    following = offset + len(rows)
    return InspectionPage(
        items=[_record(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=following if following < total else None,
    )


@router.get(
    "/inspections.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}, 401: ERRORS[401]},
)
async def export_inspections(store: Store, chosen: Chosen) -> Response:
    """The records that match, newest first, as CSV (at most 100,000 rows)."""
    rows, _ = await _database(store.query, chosen, EXPORT_LIMIT, 0)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for row in rows:
        record = _record(row).model_dump(mode="json")
        writer.writerow([_cell(record.get(name, getattr(row, name))) for name in COLUMNS])
    headers = {"Content-Disposition": 'attachment; filename="inspections.csv"'}
    return Response(buffer.getvalue(), media_type="text/csv", headers=headers)


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    # A cell that a spreadsheet would run as a formula is kept as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not _number(text) else text


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _missing(record_id: str) -> HTTPException:
    return HTTPException(
        404,
        f"no recorded inspection {record_id!r} (a record is written a moment after its answer)",
    )


async def _found(store: RecordStore, record_id: str) -> InspectionRow:
    row = await _database(store.get, record_id)
    if row is None:
        raise _missing(record_id)
    return row


@router.get(
    "/inspections/{record_id}",
    response_model=InspectionRecord,
    responses={401: ERRORS[401], 404: ERRORS[404]},
)
async def get_inspection(store: Store, record_id: RecordId) -> InspectionRecord:
    """One recorded inspection, with links to its image and heatmap while they are kept."""
    return _record(await _found(store, record_id))


@router.get(
    "/inspections/{record_id}/{kind}",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, 401: ERRORS[401], 404: ERRORS[404]},
)
async def get_inspection_media(
    svc: Svc,
    store: Store,
    record_id: RecordId,
    kind: Annotated[str, Path(pattern=r"^(image|heatmap)$")],
) -> FileResponse:
    """The part's image or heatmap, while the deployment keeps it."""
    row = await _found(store, record_id)
    relative = row.image_path if kind == "image" else row.heatmap_path
    path = None
    if relative and svc.recorder is not None:
        path = svc.recorder.media.path(relative)
    if path is None:
        why = "has expired" if row.media_expired or relative else "was not kept (KEEP_IMAGES)"
        raise HTTPException(404, f"the {kind} of inspection {record_id} {why}")
    return FileResponse(path)


@router.post(
    "/inspections/{record_id}/review",
    response_model=InspectionRecord,
    responses={401: ERRORS[401], 404: ERRORS[404], 422: ERRORS[422]},
)
async def review_inspection(
    svc: Svc, store: Store, record_id: RecordId, review: Review
) -> InspectionRecord:
    """Marks an inspection as a defect or a false alarm; a later review replaces it."""
    row = await _database(store.review, record_id, review.label, review.note, review.reviewer)
    if row is None:
        raise _missing(record_id)
    if svc.recorder is not None:
        svc.recorder.metrics.reviews.labels(review.label.value).inc()
    return _record(row)
