"""The worker: batches each product's queue through its Inspector and answers every job.

One loop per product reads up to MAX_BATCH jobs, waiting at most MAX_WAIT_MS after the
first one for more, runs the batch in the inference thread (PyTorch blocks), and
renders and sends the replies while the next batch is collected. The same code runs
over the in-memory queue (embedded mode) and over Redis (`glad worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from model.inspector import InspectionResult, Inspector
from service import heatmap, imaging
from service.metrics import WorkerMetrics
from service.presence import PresenceBoard
from service.queue import Queue
from service.registry import LoadedModel, Registry
from service.settings import Settings
from service.wire import Delivery, Outcome, Presence, Reply

log = logging.getLogger(__name__)

# Waiting for a first job blocks at most this long, so stopping and reclaiming are
# noticed soon.
POLL_MS = 1000
# A failed loop iteration (backend restarting, say) waits this long before retrying.
RETRY_PAUSE_S = 1.0


def new_worker_id() -> str:
    """Unique per process and readable in Redis: host, pid and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


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
class _Batch:
    items: list[_Item]
    picked: float  # perf_counter() when the worker took the batch
    model: LoadedModel | None = None
    inference_s: float = 0.0

    def todo(self) -> list[_Item]:
        """Items without an answer yet."""
        return [item for item in self.items if item.reply is None]


class Worker:
    """Serves every product folder under MODEL_DIR from one queue until stopped."""

    def __init__(
        self, settings: Settings, queue: Queue, presence: PresenceBoard, metrics: WorkerMetrics
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.presence = presence
        self.metrics = metrics
        self.id = new_worker_id()
        self.registry = Registry(
            settings.model_dir, settings.device, settings.max_batch if settings.compiled else None
        )
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._info: dict[str, tuple[str, str, str, str]] = {}
        # One inference thread: batches of different products take turns on the device.
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="glad-inference")
        # Orphans are looked for a few times per presence lifetime: a dead worker's
        # jobs are taken over within about HEARTBEAT_TTL_S of its last heartbeat.
        self._reclaim_every_s = settings.heartbeat_ttl_s / 3
        self._poll_ms = min(POLL_MS, int(self._reclaim_every_s * 1000))

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Load the models, serve them and watch MODEL_DIR until stop() is called."""
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._reload()
            self.ready.set()
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.settings.reload_interval_s)
                if self._stopping.is_set():
                    break
                try:
                    await self._reload()
                except Exception:
                    # The models already loaded keep serving; the next poll tries again.
                    log.exception("reloading %s failed", self.settings.model_dir)
        finally:
            self._stopping.set()
            heartbeat.cancel()
            await asyncio.gather(*self._loops.values(), return_exceptions=True)
            for presence in self._presences():
                with contextlib.suppress(Exception):
                    await self.presence.withdraw(presence, forget=False)
            self._inference.shutdown(wait=False, cancel_futures=True)

    def _presences(self) -> list[Presence]:
        return [
            Presence(
                product=product,
                worker=self.id,
                version=model.inspector.version,
                image_size=model.inspector.config.image_size,
                preset=model.inspector.config.preset,
                threshold=model.inspector.calibration.threshold,
                device=self.settings.device,
            )
            for product, model in self.registry.models.items()
        ]

    async def _heartbeat(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        while True:
            try:
                await self.presence.announce(self._presences(), ttl)
                pause = ttl / 3
            except Exception as error:
                log.warning("cannot announce products: %s", error)
                # Soon again: a Redis that restarts from its append-only file holds this
                # worker's last presences, which expire before a full pause is over.
                pause = min(ttl / 3, RETRY_PAUSE_S)
            await asyncio.sleep(pause)

    async def _reload(self) -> None:
        """Pick up new, changed and removed folders without stopping the others."""
        m = self.metrics
        before = {presence.product: presence for presence in self._presences()}
        models = await asyncio.to_thread(self.registry.refresh)
        for product, presence in before.items():
            if product not in models:
                m.model_info.remove(*self._info.pop(product))
                await self.presence.withdraw(presence, forget=True)
        for product, model in models.items():
            config = model.inspector.config
            info = (product, model.inspector.version, str(config.image_size), config.preset)
            if self._info.get(product) != info:
                if product in self._info:
                    m.model_info.remove(*self._info[product])
                else:
                    # Counters start at 0, so rates and alerts see the product at once.
                    for counter in (m.inspected, m.anomalous, m.dead_letter, m.duplicate_answers):
                        counter.labels(product)
                m.model_info.labels(*info).set(1)
                self._info[product] = info
            loop = self._loops.get(product)
            if loop is None or loop.done():
                await self.queue.prepare(product)
                self._loops[product] = asyncio.create_task(self._serve(product))
        # Announce now, so a new product is live before the next heartbeat.
        await self.presence.announce(self._presences(), self.settings.heartbeat_ttl_s)

    def _serving(self, product: str) -> bool:
        return not self._stopping.is_set() and product in self.registry.models

    async def _serve(self, product: str) -> None:
        """The batching loop of one product."""
        finishing: asyncio.Task[None] | None = None
        next_reclaim = 0.0
        connection_lost = False
        while self._serving(product):
            try:
                batch: list[Delivery] = []
                if connection_lost:
                    # Jobs handed out as the connection broke may never have arrived, and
                    # nobody takes over the jobs of a worker that still beats.
                    if finishing is not None:
                        await finishing
                        finishing = None
                    batch = await self.queue.pending(product, self.id, self.settings.max_batch)
                    connection_lost = False
                elif time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self._reclaim_every_s
                    batch = await self._reclaim(product)
                batch = await self._collect(product, batch)
                if not batch:
                    continue
                items = await self._infer(product, batch)
                previous, finishing = finishing, None
                if previous is not None:
                    await previous
                finishing = asyncio.create_task(self._finish(product, items))
            except Exception:
                log.exception("product %s: batch loop failed; retrying", product)
                connection_lost = True
                await asyncio.sleep(RETRY_PAUSE_S)
        if finishing is not None:
            await finishing

    async def _reclaim(self, product: str) -> list[Delivery]:
        """Jobs a dead worker left; those handed out too often go to the dead letters."""
        s = self.settings
        batch = []
        for delivery in await self.queue.reclaim(product, self.id, s.max_batch):
            if delivery.deliveries <= s.max_deliveries:
                log.warning("product %s: reclaimed %s", product, delivery.entry_id)
                batch.append(delivery)
                continue
            message = (
                f"the request was handed to workers {delivery.deliveries} times without an "
                f"answer (MAX_DELIVERIES is {s.max_deliveries}); it went to the dead letters"
            )
            log.error("product %s: dead-lettering %s", product, delivery.entry_id)
            reply = Reply(job_id=delivery.job.id, status=500, error=message)
            await self.queue.dead_letter(product, delivery, reply)
            self.metrics.dead_letter.labels(product).inc()
        return batch

    async def _collect(self, product: str, batch: list[Delivery]) -> list[Delivery]:
        """Fill the batch: wait for a first job, then at most MAX_WAIT_MS for more."""
        s = self.settings
        if not batch:
            batch = await self.queue.read(product, self.id, s.max_batch, self._poll_ms)
        window_end = time.monotonic() + s.max_wait_ms / 1000
        while batch and len(batch) < s.max_batch:
            left_ms = int((window_end - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            batch += await self.queue.read(product, self.id, s.max_batch - len(batch), left_ms)
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
                    item.delivery.image, self.settings.max_pixels, max_side if known else None
                )
            except imaging.ImageRejected as error:
                item.fail(error.status, error.message)
                continue
            item.size = sent if known else image.size
            # Shrunk once, here (the API already shrank a large upload): resizing to the
            # model and drawing the heatmap then cost little.
            item.image = imaging.shrink(image, max_side)

    async def _infer(self, product: str, deliveries: list[Delivery]) -> _Batch:
        """Decode and inspect a batch; each item ends with a result or an error reply."""
        batch = _Batch([_Item(delivery) for delivery in deliveries], time.perf_counter())
        now = time.time()
        for item in batch.items:
            if item.delivery.job.deadline <= now:
                item.fail(504, "the deadline passed before a worker took the request")
        batch.model = self.registry.models.get(product)
        # Never below the model's own size: it must not see an image smaller than it works at.
        side = self.settings.heatmap_max_side
        if batch.model is not None:
            side = max(side, batch.model.inspector.config.image_size)
        await asyncio.to_thread(self._decode, batch.todo(), side)
        todo = batch.todo()
        if batch.model is None:
            for item in todo:
                item.fail(503, f"product {product} is no longer served by this worker")
        if batch.model is None or not todo:
            return batch
        started = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._inference, inspect_guarded, batch.model.inspector, [i.image for i in todo]
        )
        batch.inference_s = time.perf_counter() - started
        self.metrics.inference_duration.labels(product).observe(batch.inference_s)
        self.metrics.batch_size.labels(product).observe(len(todo))
        for item, result in zip(todo, results, strict=True):
            if isinstance(result, Exception):
                item.fail(500, "the model failed on this image")
                continue
            item.result = result
            self.metrics.inspected.labels(product).inc()
            self.metrics.denoise_step.labels(product).observe(result.denoise_step)
            if result.is_anomalous:
                self.metrics.anomalous.labels(product).inc()
        return batch

    async def _finish(self, product: str, batch: _Batch) -> None:
        """Render the heatmaps, then answer every job of the batch."""
        replies = await asyncio.to_thread(_replies, batch)
        for item, reply in zip(batch.items, replies, strict=True):
            first = await self._respond(product, item.delivery, reply)
            if first is False:
                # Taken over while this worker was presumed dead, and answered by another.
                log.warning(
                    "product %s: %s was answered already; this answer is dropped",
                    product,
                    item.delivery.job.request_id,
                )
                self.metrics.duplicate_answers.labels(product).inc()

    async def _respond(self, product: str, delivery: Delivery, reply: Reply) -> bool | None:
        """Answer one job, trying again until its deadline while the queue is unreachable:
        this worker still holds the job, so nobody else would answer it. None: not sent."""
        while True:
            try:
                return await self.queue.respond(product, delivery, reply)
            except Exception as error:
                if time.time() >= delivery.job.deadline or self._stopping.is_set():
                    log.warning(
                        "product %s: cannot answer %s: %s", product, delivery.job.request_id, error
                    )
                    return None
                await asyncio.sleep(RETRY_PAUSE_S)


def _outcome(
    model: LoadedModel, result: InspectionResult, item: _Item, image: Image.Image, batch: _Batch
) -> Outcome:
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


def _reply(item: _Item, batch: _Batch) -> Reply:
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


def _replies(batch: _Batch) -> list[Reply]:
    return [_reply(item, batch) for item in batch.items]
