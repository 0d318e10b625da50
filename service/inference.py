"""One batch from jobs to replies: decode the images, inspect them on an inference thread,
record the per-part metrics and render the heatmaps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from model.inspector import InspectionResult, Inspector
from service import heatmap, imaging
from service.metrics import WorkerMetrics
from service.registry import LoadedModel
from service.wire import Delivery, Outcome, Reply

log = logging.getLogger(__name__)


def inspect_guarded(
    inspector: Inspector, images: Sequence[Image.Image]
) -> list[InspectionResult | Exception]:
    """Inspect a batch; if it fails, inspect one by one so one bad image fails alone."""
    try:
        return list(inspector.inspect(images))
    except Exception as error:
        if len(images) == 1:
            log.exception("inspection failed")
            return [error]
        log.warning("a batch of %d failed (%s); retrying one by one", len(images), error)
        return [inspect_guarded(inspector, [image])[0] for image in images]


@dataclass
class _Item:
    """One job of a batch on its way through decoding, inference and rendering."""

    delivery: Delivery
    image: Image.Image | None = None
    size: tuple[int, int] = (0, 0)  # the image as sent, before it was shrunk
    result: InspectionResult | None = None
    reply: Reply | None = None

    def fail(self, status: int, message: str) -> None:
        self.reply = Reply(job_id=self.delivery.job.id, status=status, error=message)


@dataclass
class Batch:
    items: list[_Item]
    picked: float  # perf_counter() when the worker took the batch
    model: LoadedModel | None = None
    inference_s: float = 0.0

    def todo(self) -> list[_Item]:
        """Items without an answer yet."""
        return [item for item in self.items if item.reply is None]

    def answer_order(self) -> list[_Item]:
        """The items, those with the fewest pixels to draw first: a part posted at 6000 px
        (drawn at HEATMAP_MAX_SIDE, about 90 ms) must not hold back its batch's answers."""
        return sorted(self.items, key=lambda item: item.size[0] * item.size[1])

    def reply(self, item: _Item) -> Reply:
        """The item's reply, its heatmap rendered (blocking: call it in a thread)."""
        return _reply(item, self)


class Inference:
    """Runs batches on `lanes` inference threads, one batch per thread: batches of every
    product share them."""

    def __init__(
        self, max_pixels: int, heatmap_max_side: int, metrics: WorkerMetrics, lanes: int
    ) -> None:
        self._max_pixels = max_pixels
        self._heatmap_max_side = heatmap_max_side
        self._metrics = metrics
        self._thread = ThreadPoolExecutor(lanes, thread_name_prefix="glad-inference")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def run(
        self, product: str, model: LoadedModel | None, deliveries: list[Delivery]
    ) -> Batch:
        """Decode and inspect a batch; each item ends with a result or an error reply."""
        batch = Batch([_Item(delivery) for delivery in deliveries], time.perf_counter(), model)
        now = time.time()
        for item in batch.items:
            if item.delivery.job.deadline <= now:
                item.fail(504, "the deadline passed before a worker took the request")
        # Never below the model's own size: it must not see an image smaller than it works at.
        side = self._heatmap_max_side
        if model is not None:
            side = max(side, model.inspector.config.image_size)
        await asyncio.to_thread(self._decode, batch.todo(), side)
        todo = batch.todo()
        if model is None:
            for item in todo:
                item.fail(503, f"product {product} is no longer served by this worker")
        if model is None or not todo:
            return batch
        started = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._thread, inspect_guarded, model.inspector, [i.image for i in todo]
        )
        batch.inference_s = time.perf_counter() - started
        m = self._metrics
        m.inference_duration.labels(product).observe(batch.inference_s)
        m.batch_size.labels(product).observe(len(todo))
        for item, result in zip(todo, results, strict=True):
            if isinstance(result, Exception):
                item.fail(500, "the model failed on this image")
                continue
            item.result = result
            m.inspected.labels(product).inc()
            m.denoise_step.labels(product).observe(result.denoise_step)
            if result.is_anomalous:
                m.anomalous.labels(product).inc()
        return batch

    def _decode(self, items: list[_Item], max_side: int) -> None:
        # The API checked these images; a worker still guards itself against any job.
        for item in items:
            job = item.delivery.job
            sent = (job.image_width, job.image_height)
            # A JPEG may decode at a reduced scale only where the size as sent is known.
            known = None not in sent
            try:
                image = imaging.decode(
                    item.delivery.image, self._max_pixels, max_side if known else None
                )
            except imaging.ImageRejected as error:
                item.fail(error.status, error.message)
                continue
            item.size = sent if known else image.size
            # Shrunk once, here (the API already shrank a large upload): resizing to the
            # model and drawing the heatmap then cost little.
            item.image = imaging.shrink(image, max_side)


def _outcome(
    model: LoadedModel, result: InspectionResult, item: _Item, image: Image.Image, batch: Batch
) -> Outcome:
    """The model's InspectionResult as the worker answers it (the one place it is mapped)."""
    png = heatmap.render(image, result.heatmap, item.delivery.job.heatmap)
    return Outcome(
        model_version=model.inspector.version,
        raw_score=result.raw_score,
        score=result.score,
        threshold=model.inspector.calibration.threshold,
        is_anomalous=result.is_anomalous,
        denoise_step=result.denoise_step,
        image_width=item.size[0],
        image_height=item.size[1],
        model_image_size=model.inspector.config.image_size,
        heatmap=png,
        inference_s=batch.inference_s,
        service_s=time.perf_counter() - batch.picked,
    )


def _reply(item: _Item, batch: Batch) -> Reply:
    """The item's error reply, or its outcome with the heatmap rendered."""
    if item.reply is not None:
        return item.reply
    job = item.delivery.job
    if batch.model is None or item.result is None or item.image is None:
        return Reply(job_id=job.id, status=500, error="the worker has no answer")
    try:
        outcome = _outcome(batch.model, item.result, item, item.image, batch)
    except Exception:
        log.exception("rendering the answer to %s failed", job.request_id)
        return Reply(job_id=job.id, status=500, error="rendering the answer failed")
    return Reply(job_id=job.id, outcome=outcome)
