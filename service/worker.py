"""The worker: batches each product's queue through its Inspector and answers every job.

One loop per product reads up to MAX_BATCH jobs, waiting at most MAX_WAIT_MS after the
first one for more, and runs the batch (service.inference) in one of INFERENCE_LANES
lanes while it collects the next; each reply is sent as soon as its heatmap is drawn. The
same code runs over the in-memory queue (embedded mode) and over Redis (`glad worker`).
Which products it serves, and their presence, is service.products' business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from service.inference import Batch, Inference
from service.metrics import WorkerMetrics
from service.presence import PresenceBoard
from service.products import ServedProducts
from service.queue import Queue
from service.settings import Settings
from service.wire import Delivery, Reply

log = logging.getLogger(__name__)

# Waiting for a first job blocks at most this long, so stopping and reclaiming are
# noticed soon.
POLL_MS = 1000
# A failed loop iteration (backend restarting, say) waits this long before retrying.
RETRY_PAUSE_S = 1.0


def new_worker_id() -> str:
    """Unique per process and readable in Redis: host, pid and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Serves every product folder under MODEL_DIR from one queue until stopped."""

    def __init__(
        self, settings: Settings, queue: Queue, presence: PresenceBoard, metrics: WorkerMetrics
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.id = new_worker_id()
        self.products = ServedProducts(settings, presence, metrics, self.id)
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._inference = Inference(
            settings.max_pixels, settings.heatmap_max_side, metrics, settings.lanes
        )
        # Batches running at once, over every product (INFERENCE_LANES).
        self._lanes = asyncio.Semaphore(settings.lanes)
        # Products whose batches may have lost jobs (the queue failed): their own pending
        # jobs are read again before new ones.
        self._lost: set[str] = set()
        # Batches in a lane now.
        self._inspecting = 0
        # Orphans are looked for a few times per presence lifetime: a dead worker's
        # jobs are taken over within about HEARTBEAT_TTL_S of its last heartbeat.
        self._reclaim_every_s = settings.heartbeat_ttl_s / 3
        self._poll_ms = min(POLL_MS, int(self._reclaim_every_s * 1000))

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Load the models, serve them and watch MODEL_DIR until stop() is called."""
        heartbeat = asyncio.create_task(self.products.heartbeat())
        try:
            await self.products.reload(self._start_loop)
            self.ready.set()
            await self.products.watch(self._stopping, self._start_loop)
        finally:
            self._stopping.set()
            heartbeat.cancel()
            await asyncio.gather(*self._loops.values(), return_exceptions=True)
            await self.products.withdraw_all()
            self._inference.close()

    async def _start_loop(self, product: str) -> None:
        """Start the product's batch loop, unless it runs."""
        loop = self._loops.get(product)
        if loop is None or loop.done():
            await self.queue.prepare(product)
            self._loops[product] = asyncio.create_task(self._serve(product))

    def _serving(self, product: str) -> bool:
        return not self._stopping.is_set() and product in self.products.models

    async def _serve(self, product: str) -> None:
        """The batching loop of one product: once a lane is free it collects a batch, which
        runs in that lane while the next one is collected."""
        running: set[asyncio.Task[None]] = set()
        next_reclaim = 0.0
        while self._serving(product):
            # Waits for a free lane without holding it: a loop whose queue is empty must not
            # keep another product's batch out. Jobs that arrive meanwhile fill the batch.
            await self._lanes.acquire()
            self._lanes.release()
            try:
                batch: list[Delivery] = []
                if product in self._lost:
                    # Jobs handed out as the connection broke may never have arrived, and
                    # nobody takes over the jobs of a worker that still beats. Those still
                    # running are this worker's pending jobs too: they finish first.
                    await asyncio.gather(*running, return_exceptions=True)
                    batch = await self.queue.pending(product, self.id, self.settings.max_batch)
                    self._lost.discard(product)
                elif time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self._reclaim_every_s
                    batch = await self._reclaim(product)
                batch = await self._collect(product, batch)
            except Exception:
                log.exception("product %s: batch loop failed; retrying", product)
                self._lost.add(product)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            if batch:
                await self._lanes.acquire()
                task = asyncio.create_task(self._run(product, batch))
                running.add(task)
                task.add_done_callback(running.discard)
        await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, product: str, batch: list[Delivery]) -> None:
        """Inspect a batch in the lane the loop took for it, then answer it outside the
        lane. The batches being answered at once are bounded by MAX_QUEUE."""
        try:
            self._inspecting += 1
            try:
                done = await self._inference.run(product, self.products.models.get(product), batch)
            finally:
                self._inspecting -= 1
                self._lanes.release()
            await self._finish(product, done)
        except Exception:
            log.exception("product %s: a batch failed; its jobs are read again", product)
            self._lost.add(product)

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
        """Fill the batch: wait for a first job, then MAX_WAIT_MS for more, and longer while
        another batch is being inspected: beside it this one would only share the device,
        and a part-filled batch costs more per image."""
        s = self.settings
        if not batch:
            batch = await self.queue.read(product, self.id, s.max_batch, self._poll_ms)
        window_end = time.monotonic() + s.max_wait_ms / 1000
        while batch and len(batch) < s.max_batch:
            left_ms = int((window_end - time.monotonic()) * 1000)
            if left_ms <= 0:
                if not self._inspecting:
                    break
                left_ms = max(s.max_wait_ms, 1)
            batch += await self.queue.read(product, self.id, s.max_batch - len(batch), left_ms)
        return batch

    async def _finish(self, product: str, batch: Batch) -> None:
        """Answer every job of the batch, each as soon as its heatmap is rendered."""
        for item in batch.answer_order():
            reply = await asyncio.to_thread(batch.reply, item)
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
