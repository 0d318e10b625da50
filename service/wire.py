"""The records that travel between the API and the workers, and the verdict both answer.

`Verdict` is defined once: the worker's `Outcome` and the API's `schemas.Inspection` both
build on it, so a field added to the verdict reaches the answer without being copied.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field

from service.heatmap import HeatmapKind


class Wire(BaseModel):
    """Frozen, with bytes as base64 in JSON: what goes through a queue or Redis."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")


class Verdict(BaseModel):
    """The model's verdict on one part, as the API answers it."""

    model_version: str = Field(description="Short content hash of the model's weights.")
    raw_score: float = Field(description="The model's anomaly score, in its own units.")
    score: float = Field(description="The score normalised to [0, 1]; 0.5 is the threshold.")
    threshold: float = Field(description="The raw score above which a part is anomalous.")
    is_anomalous: bool
    denoise_step: int = Field(description="The adaptive denoising step chosen; 0 = none.")
    image_width: int = Field(description="Width of the image sent.")
    image_height: int = Field(description="Height of the image sent.")
    model_image_size: int = Field(description="The side, in pixels, the model works at.")

    def verdict(self) -> dict[str, object]:
        """The verdict's own fields, to build another record that carries it."""
        return self.model_dump(include=set(Verdict.model_fields))


class Job(Wire):
    """One inspection request as it travels to a worker."""

    # Names the reply: made here, never taken from the client, so two requests that
    # carry the same X-Request-ID cannot receive each other's answers.
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    request_id: str
    product: str
    heatmap: HeatmapKind
    # Wall-clock time (time.time()) after which nobody waits for the answer.
    deadline: float
    # The image's size as the client sent it: the API forwards a large image shrunk
    # (service.imaging.prepare). None: the image travels as sent.
    image_width: int | None = None
    image_height: int | None = None


class Outcome(Verdict, Wire):
    """A worker's answer to a job that was inspected: the verdict, the heatmap, timings."""

    heatmap: bytes | None
    inference_s: float
    # From the worker taking the batch to writing this reply: the rest was waiting.
    service_s: float


class Reply(Wire):
    """What goes back to the API: an outcome, or an HTTP status and message."""

    job_id: str
    status: int = 200
    error: str | None = None
    outcome: Outcome | None = None


class Delivery(Wire):
    """A job handed to a worker, with the image and how often it was handed out."""

    entry_id: str
    job: Job
    image: bytes
    deliveries: int


class Presence(Wire):
    """A worker's word that it serves a product with a given model; it expires."""

    product: str
    worker: str
    version: str
    image_size: int
    preset: str
    threshold: float
    device: str
    # Patches in the model's memory of normal patches; None: its reconstruction's map alone
    # (a model trained before the memory, or the paper preset). Absent from older workers.
    memory_patches: int | None = None
