"""Recording off the request path: answered inspections wait in a bounded buffer, and one
task writes them (their media to disk, their rows to the database) in batches. A slow or
absent database never holds an answer: records wait, and what would overflow the buffer
is dropped, counted and logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from service.media import MediaStore
from service.metrics import RecordMetrics
from service.records import RecordStore

log = logging.getLogger(__name__)

BATCH = 200
RETRY_S = (0.5, 1.0, 2.0, 5.0)
SWEEP_INTERVAL_S = 60.0
# How long shutting down waits for the buffer to be written.
FLUSH_S = 5.0


@dataclass
class Pending:
    """One answered inspection on its way to the database."""

    row: dict[str, object]
    # The image and heatmap, when the policy keeps them; written to disk before the row.
    image: bytes | None = None
    heatmap: bytes | None = None


class Recorder:
    def __init__(
        self, store: RecordStore, media: MediaStore, capacity: int, metrics: RecordMetrics
    ) -> None:
        self.store = store
        self.media = media
        self.capacity = capacity
        self.metrics = metrics
        self._buffer: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._migrated = False
        self._migrating = threading.Lock()
        self._failing_since: float | None = None
        self._dropped_since_log = 0
        # Removed media files whose records are still to be marked expired.
        self._expired: list[str] = []

    @property
    def waiting(self) -> int:
        return len(self._buffer)

    def submit(self, pending: Pending) -> bool:
        """Queues a record without waiting; False (counted, logged) when the buffer is full."""
        if len(self._buffer) >= self.capacity:
            self.metrics.dropped.inc()
            if self._dropped_since_log == 0:
                log.error(
                    "the record buffer is full (%d records): inspection records are being "
                    "dropped until the database takes them",
                    self.capacity,
                )
            self._dropped_since_log += 1
            return False
        self._buffer.append(pending)
        self.metrics.waiting.set(len(self._buffer))
        self._wake.set()
        return True

    async def run(self) -> None:
        """Writes what waits, until stop(); then writes what it can within FLUSH_S."""
        last_sweep = 0.0
        attempt = 0
        while not self._stopping or self._buffer:
            if not self._buffer and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SWEEP_INTERVAL_S)
                self._wake.clear()
            try:
                await asyncio.to_thread(self.ensure_migrated)
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL_S:
                    await asyncio.to_thread(self._sweep)
                    last_sweep = time.monotonic()
                if self._buffer:
                    await asyncio.to_thread(self._write_batch)
                self._recovered()
                attempt = 0
            except Exception as error:  # noqa: BLE001 (any database error: wait and retry)
                if self._stopping:
                    break
                self._failed(error)
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1
        if self._buffer:
            log.error("shutting down with %d inspection records unwritten", len(self._buffer))

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Stops taking records' time: writes the rest within FLUSH_S, then gives up."""
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, FLUSH_S)
        except TimeoutError:
            log.error("the database did not take the last %d records in time", self.waiting)
        self.store.close()

    def ensure_migrated(self) -> None:
        """Brings the database's schema up to date, once (on a thread: it blocks)."""
        with self._migrating:
            if not self._migrated:
                self.store.migrate()
                self._migrated = True

    def _write_batch(self) -> None:
        batch = [self._buffer[i] for i in range(min(BATCH, len(self._buffer)))]
        for pending in batch:
            self._save_media(pending)
        self.store.write([pending.row for pending in batch])
        for _ in batch:
            self._buffer.popleft()
        self.metrics.written.inc(len(batch))
        self.metrics.waiting.set(len(self._buffer))

    def _save_media(self, pending: Pending) -> None:
        if pending.image is None:
            return
        moment = pending.row["time"]
        assert isinstance(moment, datetime)
        try:
            image, heatmap = self.media.save(
                str(pending.row["id"]),
                str(pending.row["product"]),
                moment.strftime("%Y-%m-%d"),
                pending.image,
                pending.heatmap,
            )
        except OSError as error:
            log.error("could not keep the image of %s: %s", pending.row["id"], error)
        else:
            pending.row.update(image_path=image, heatmap_path=heatmap)
        pending.image = pending.heatmap = None

    def _sweep(self) -> None:
        self._expired.extend(self.media.sweep())
        if self._expired:
            self.store.expire_media(self._expired)
            self._expired.clear()

    def _failed(self, error: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "cannot write inspection records (%s: %s); %d wait, retrying",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                len(self._buffer),
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "writing inspection records again after %.1f s",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        if self._dropped_since_log:
            log.error("%d inspection records were dropped", self._dropped_since_log)
            self._dropped_since_log = 0
