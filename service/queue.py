"""The job queue between the API and the workers: its interface, its errors, and the
in-memory backend of the embedded mode (API and worker in one process).

The Redis backend is service.redis_queue. Which workers serve which products is not the
queue's business but the presence board's (service.presence).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterable

from service.wire import Delivery, Job, Reply

# The Redis consumer group of the workers; the Kubernetes autoscaler reads its lag.
GROUP = "workers"


class QueueError(Exception):
    """Base of the errors the API turns into HTTP answers."""


class QueueUnavailable(QueueError):
    """The backend cannot be reached."""


class QueueFull(QueueError):
    """The product's queue holds max_queue requests already."""

    def __init__(self, product: str) -> None:
        super().__init__(product)
        self.product = product


class DeadlineExceeded(QueueError):
    """No reply came before the job's deadline."""

    def __init__(self, product: str) -> None:
        super().__init__(product)
        self.product = product


class Queue(ABC):
    """The operations the API (submit side) and the workers (consume side) need."""

    # API side.
    @abstractmethod
    async def ping(self) -> None:
        """Raise QueueUnavailable unless the backend answers."""

    @abstractmethod
    async def has_room(self, product: str) -> bool:
        """Whether the product's queue is below its limit now: a cheap check made before
        a request's image is decoded (submit checks again, atomically)."""

    @abstractmethod
    async def submit(self, job: Job, image: bytes) -> Reply:
        """Enqueue a job and wait for its reply until the job's deadline."""

    @abstractmethod
    async def depths(self, products: Iterable[str]) -> dict[str, int]:
        """Requests queued or in flight, for each of the given products."""

    # Worker side.
    @abstractmethod
    async def prepare(self, product: str) -> None:
        """Make the product's queue ready to be consumed."""

    @abstractmethod
    async def read(self, product: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` new jobs, waiting at most block_ms for the first (0 = no wait)."""

    @abstractmethod
    async def pending(self, product: str, consumer: str, count: int) -> list[Delivery]:
        """Jobs handed to this consumer and not answered: after a lost connection, some may
        have been handed out without ever reaching it."""

    @abstractmethod
    async def reclaim(self, product: str, consumer: str, count: int) -> list[Delivery]:
        """Jobs held by consumers whose presence for the product expired (dead or stalled)."""

    @abstractmethod
    async def respond(self, product: str, delivery: Delivery, reply: Reply) -> bool:
        """Write the reply unless the job was answered already, and acknowledge the job;
        False when the answer was a second one and was dropped."""

    @abstractmethod
    async def dead_letter(self, product: str, delivery: Delivery, reply: Reply) -> None:
        """Move a job that keeps failing to the dead-letter stream and answer it."""


class MemoryQueue(Queue):
    """One process: per-product deques, futures for replies, batching the same way."""

    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self._entries: dict[str, deque[Delivery]] = defaultdict(deque)
        self._arrived: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._depth: dict[str, int] = defaultdict(int)
        self._next_id = 0

    async def ping(self) -> None:
        return None

    async def has_room(self, product: str) -> bool:
        return self._depth[product] < self._max_queue

    async def submit(self, job: Job, image: bytes) -> Reply:
        if self._depth[job.product] >= self._max_queue:
            raise QueueFull(job.product)
        self._next_id += 1
        delivery = Delivery(entry_id=str(self._next_id), job=job, image=image, deliveries=1)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[job.id] = future
        self._depth[job.product] += 1
        self._entries[job.product].append(delivery)
        arrived = self._arrived[job.product]
        async with arrived:
            arrived.notify()
        try:
            return await asyncio.wait_for(future, max(job.deadline - time.time(), 0.0))
        except TimeoutError as error:
            with contextlib.suppress(ValueError):
                self._entries[job.product].remove(delivery)
            raise DeadlineExceeded(job.product) from error
        finally:
            self._waiting.pop(job.id, None)
            self._depth[job.product] -= 1

    async def depths(self, products: Iterable[str]) -> dict[str, int]:
        return {name: self._depth[name] for name in products}

    async def prepare(self, product: str) -> None:
        return None

    async def read(self, product: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        entries = self._entries[product]
        if not entries and block_ms > 0:
            arrived = self._arrived[product]
            async with arrived:
                try:
                    await asyncio.wait_for(arrived.wait_for(lambda: bool(entries)), block_ms / 1000)
                except TimeoutError:
                    return []
        return [entries.popleft() for _ in range(min(count, len(entries)))]

    async def pending(self, product: str, consumer: str, count: int) -> list[Delivery]:
        # One process: nothing is handed out that does not arrive.
        return []

    async def reclaim(self, product: str, consumer: str, count: int) -> list[Delivery]:
        # One process: a dead worker means a dead API, so nothing is ever orphaned.
        return []

    async def respond(self, product: str, delivery: Delivery, reply: Reply) -> bool:
        future = self._waiting.get(reply.job_id)
        if future is None or future.done():
            return False
        future.set_result(reply)
        return True

    async def dead_letter(self, product: str, delivery: Delivery, reply: Reply) -> None:
        await self.respond(product, delivery, reply)
