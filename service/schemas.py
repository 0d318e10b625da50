"""The JSON the API answers with, as typed models (they also make the OpenAPI docs)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from service import imaging
from service.heatmap import HeatmapKind
from service.records import (
    MAX_IDENTITY_LENGTH,
    MAX_NOTE_LENGTH,
    MAX_REVIEWER_LENGTH,
    PRINTABLE,
    ReviewLabel,
)
from service.wire import Presence, Verdict


class Timings(BaseModel):
    queue_wait_s: float = Field(description="Queued or in transit, not being worked on.")
    inference_s: float = Field(description="The model's time for the whole batch.")
    total_s: float = Field(description="From receiving the request to answering it.")


class Heatmap(BaseModel):
    kind: HeatmapKind
    media_type: str = "image/png"
    data: str = Field(description="The PNG, base64-encoded.")


class Addressed(BaseModel):
    """Which request and product line an answer is for."""

    request_id: str
    product: str


# Addressed after Verdict: pydantic orders fields from the last base, so the answer still
# begins with request_id and product.
class Inspection(Verdict, Addressed):
    """The verdict on one part."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "4f1c2b7e9a0d4c3f8e6b5a4d3c2b1a09",
                    "product": "widget",
                    "model_version": "3fa85f6457c1",
                    "raw_score": 1.87,
                    "score": 0.73,
                    "threshold": 1.42,
                    "is_anomalous": True,
                    "denoise_step": 240,
                    "image_width": 1024,
                    "image_height": 768,
                    "model_image_size": 256,
                    "heatmap": {"kind": "overlay", "media_type": "image/png", "data": "iVBO..."},
                    "timings": {"queue_wait_s": 0.012, "inference_s": 0.21, "total_s": 0.26},
                    "inspection_id": "9b2e4c1d7f3a4e5b8c6d0a1f2e3d4c5b",
                }
            ]
        }
    )

    heatmap: Heatmap | None
    inspection_id: str | None = Field(
        None,
        description="The record of this inspection (GET /inspections/{id}); null when the "
        "service keeps no record.",
    )
    timings: Timings


class Product(BaseModel):
    """A product line and the model its workers serve."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "widget",
                    "live_workers": 2,
                    "model_version": "3fa85f6457c1",
                    "image_size": 256,
                    "threshold": 1.42,
                    "preset": "compact",
                    "memory_patches": 10000,
                }
            ]
        }
    )

    name: str
    live_workers: int = Field(description="Workers that announced this product recently.")
    model_version: str | None = Field(description="What most live workers serve; null if none.")
    image_size: int | None
    threshold: float | None = Field(description="Raw-score threshold; null if no live worker.")
    preset: str | None
    memory_patches: int | None = Field(
        None,
        description=(
            "Patches in the model's memory of normal patches, whose map is fused with the "
            "reconstruction's; null: the reconstruction's map alone (a model trained before "
            "the memory: `glad calibrate` adds one), or no live worker."
        ),
    )

    @classmethod
    def serving(cls, name: str, presences: list[Presence]) -> Product:
        """The product line as its live workers announce it: the model most of them serve."""
        if not presences:
            return cls(
                name=name,
                live_workers=0,
                model_version=None,
                image_size=None,
                threshold=None,
                preset=None,
            )
        version, _ = Counter(p.version for p in presences).most_common(1)[0]
        served = next(p for p in presences if p.version == version)
        return cls(
            name=name,
            live_workers=len(presences),
            model_version=version,
            image_size=served.image_size,
            threshold=served.threshold,
            preset=served.preset,
            memory_patches=served.memory_patches,
        )


class Products(BaseModel):
    products: list[Product]


class Review(BaseModel):
    """An operator's judgement of one inspection."""

    model_config = ConfigDict(extra="forbid")

    label: ReviewLabel = Field(description="defect: the part is defective; false_alarm: it is not.")
    reviewer: str = Field(
        min_length=1,
        max_length=MAX_REVIEWER_LENGTH,
        pattern=PRINTABLE,
        description="Who reviewed it.",
    )
    note: str = Field("", max_length=MAX_NOTE_LENGTH, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")


class InspectionRecord(BaseModel):
    """One answered inspection as it was recorded, with its review."""

    id: str
    request_id: str
    time: datetime
    product: str
    model_version: str
    score: float
    raw_score: float
    threshold: float
    is_anomalous: bool
    denoise_step: int
    queue_wait_s: float
    inference_s: float
    total_s: float
    part_id: str | None = Field(max_length=MAX_IDENTITY_LENGTH)
    camera_id: str | None
    line_id: str | None
    image_url: str | None = Field(description="The part's image, while it is kept.")
    heatmap_url: str | None = Field(description="Its heatmap, while it is kept.")
    media_expired: bool = Field(description="The image and heatmap were kept, then removed.")
    review_label: ReviewLabel | None
    review_note: str | None
    reviewed_by: str | None
    reviewed_at: datetime | None


class InspectionPage(BaseModel):
    items: list[InspectionRecord] = Field(description="Newest first.")
    total: int = Field(description="Records that match the filters.")
    limit: int
    offset: int
    next_offset: int | None = Field(description="The next page's offset; null on the last.")


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    queue: str = Field(description="'memory' or 'redis', and whether it answers.")
    products: dict[str, int] = Field(description="Live workers per known product.")
    detail: str


class Error(BaseModel):
    detail: str | list[dict[str, object]]
    request_id: str


# The OpenAPI document's request body and error answers of the endpoints.
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
        415: f"Not a {imaging.FORMAT_NAMES} image.",
        422: "Malformed request, product name or image.",
        429: "The product's queue is full; retry after Retry-After seconds.",
        503: "Queue backend down or no live worker for the product.",
        504: "No answer before REQUEST_TIMEOUT_S.",
    }.items()
}
INSPECT_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The verdict as JSON, or the heatmap with `Accept: image/png`.",
        "content": {"image/png": {"schema": IMAGE_SCHEMA}},
    },
    **ERRORS,
}
