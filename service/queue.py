"""The request queue between the API and the workers: one interface, two backends.

`MemoryQueue` serves the embedded mode (API and worker in one process). `RedisQueue`
serves any number of API replicas and workers on any number of hosts: one stream per
product read by the consumer group `workers`, one reply list per request that the
waiting API replica pops, and expiring advertisement keys through which workers tell
the API which products they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.wire import Delivery, Job, Presence, Reply

GROUP = "workers"
# A reply nobody popped (its API replica gave up or died) is dropped after this long.
REPLY_TTL_S = 60
# How long Redis remembers that a job was answered, so that a second answer (from a worker
# that was presumed dead and resumed) is dropped: far longer than any deadline.
ANSWERED_TTL_S = 3600
# An entry taken over this recently is not taken over again by a second worker at once.
RECLAIM_GUARD_MS = 1000
# How much longer than its longest blocking command a Redis socket may stay silent.
SOCKET_MARGIN_S = 5.0
# How often an API replica tries again to reach Redis while it waits for a reply.
RECONNECT_PAUSE_S = 0.25
# The dead-letter stream keeps about this many entries per product.
DEAD_LETTER_MAXLEN = 10_000


class QueueError(Exception):
    """Base of the errors the API turns into HTTP answers."""


class QueueUnavailable(QueueError):
    """The backend cannot be reached."""


class QueueFull(QueueError):
    """The product's queue holds max_queue requests already."""


class DeadlineExceeded(QueueError):
    """No reply came before the job's deadline."""


class Queue(ABC):
    """The operations the API (submit side) and the workers (consume side) need."""

    # API side.
    @abstractmethod
    async def ping(self) -> None:
        """Raise QueueUnavailable unless the backend answers."""

    @abstractmethod
    async def products(self) -> dict[str, list[Presence]]:
        """Every known product with the advertisements of its live workers (maybe none)."""

    @abstractmethod
    async def product(self, name: str) -> list[Presence] | None:
        """The live advertisements for one product; None when the product is unknown."""

    @abstractmethod
    async def has_room(self, product: str) -> bool:
        """Whether the product's queue is below its limit now: a cheap check made before
        a request's body is read and decoded (submit checks again, atomically)."""

    @abstractmethod
    async def submit(self, job: Job, image: bytes) -> Reply:
        """Enqueue a job and wait for its reply until the job's deadline."""

    @abstractmethod
    async def depths(self) -> dict[str, int]:
        """Requests queued or in flight, per known product."""

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
        """Jobs held by consumers that no longer advertise the product (dead or stalled)."""

    @abstractmethod
    async def respond(self, product: str, delivery: Delivery, reply: Reply) -> bool:
        """Write the reply unless the job was answered already, and acknowledge the job;
        False when the answer was a second one and was dropped."""

    @abstractmethod
    async def dead_letter(self, product: str, delivery: Delivery, reply: Reply) -> None:
        """Move a job that keeps failing to the dead-letter stream and answer it."""

    @abstractmethod
    async def advertise(self, ads: Iterable[Presence], ttl_s: float) -> None:
        """Announce live products; each advertisement expires after ttl_s."""

    @abstractmethod
    async def withdraw(self, ad: Presence, forget: bool) -> None:
        """Stop advertising; with forget, drop the product unless another worker serves it."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


class MemoryQueue(Queue):
    """One process: per-product deques, futures for replies, batching the same way."""

    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self._entries: dict[str, deque[Delivery]] = defaultdict(deque)
        self._arrived: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._depth: dict[str, int] = defaultdict(int)
        self._ads: dict[str, dict[str, tuple[Presence, float]]] = {}
        self._next_id = 0

    async def ping(self) -> None:
        return None

    def _live(self, name: str) -> list[Presence]:
        now = time.monotonic()
        return [ad for ad, expiry in self._ads[name].values() if expiry > now]

    async def products(self) -> dict[str, list[Presence]]:
        return {name: self._live(name) for name in self._ads}

    async def product(self, name: str) -> list[Presence] | None:
        return self._live(name) if name in self._ads else None

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

    async def depths(self) -> dict[str, int]:
        return {name: self._depth[name] for name in self._ads}

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

    async def advertise(self, ads: Iterable[Presence], ttl_s: float) -> None:
        expiry = time.monotonic() + ttl_s
        for ad in ads:
            self._ads.setdefault(ad.product, {})[ad.worker] = (ad, expiry)

    async def withdraw(self, ad: Presence, forget: bool) -> None:
        workers = self._ads.get(ad.product, {})
        workers.pop(ad.worker, None)
        if forget and not workers:
            self._ads.pop(ad.product, None)

    async def close(self) -> None:
        return None


# Enqueue only below the limit, atomically, so concurrent API replicas cannot overshoot.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2], 'image', ARGV[3])
"""

# Answer a job once: the first answer is pushed, a later one only acknowledges the entry.
# KEYS: stream, reply list, answered marker. ARGV: group, entry id, reply, TTLs.
_RESPOND = """
local first = redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[5]))
if first then
  redis.call('LPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if first then return 1 end
return 0
"""


# redis-py's own default: a worker needs a few connections per product, not more.
DEFAULT_REDIS_CONNECTIONS = 100


class RedisQueue(Queue):
    """Redis Streams: at-least-once delivery, reclaiming, dead letters, reply lists."""

    def __init__(
        self,
        url: str,
        prefix: str,
        max_queue: int,
        longest_wait_s: float,
        max_connections: int = DEFAULT_REDIS_CONNECTIONS,
    ) -> None:
        # Blocking reads wait up to longest_wait_s; only a socket silent for longer than
        # that (plus a margin) means the connection is dead. A command on a pooled
        # connection that Redis closed (it restarted) is tried again on a fresh one: from_url
        # sets no retry, and every stale connection would otherwise answer one 503.
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2,
            socket_timeout=longest_wait_s + SOCKET_MARGIN_S,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            # Each request in flight holds a connection while it waits for its reply.
            max_connections=max_connections,
        )
        self._prefix = prefix
        self._max_queue = max_queue
        self._submit = self._redis.register_script(_SUBMIT)
        self._respond = self._redis.register_script(_RESPOND)

    def _stream(self, product: str) -> str:
        return f"{self._prefix}:stream:{product}"

    def _dead(self, product: str) -> str:
        return f"{self._prefix}:dead:{product}"

    def _reply(self, job_id: str) -> str:
        return f"{self._prefix}:reply:{job_id}"

    def _answered(self, job_id: str) -> str:
        return f"{self._prefix}:answered:{job_id}"

    def _ad_key(self, product: str, worker: str) -> str:
        return f"{self._prefix}:worker:{product}:{worker}"

    def _workers(self, product: str) -> str:
        return f"{self._prefix}:workers:{product}"

    @property
    def _known(self) -> str:
        return f"{self._prefix}:products"

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def _live(self, names: list[str]) -> dict[str, list[Presence]]:
        """Live advertisements per product; ids whose key expired are pruned."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self._workers(name))
            members = await pipe.execute()
        live: dict[str, list[Presence]] = {}
        for name, workers in zip(names, members, strict=True):
            ids = sorted(w.decode() for w in workers)
            raw = await self._redis.mget([self._ad_key(name, w) for w in ids]) if ids else []
            gone = [w for w, value in zip(ids, raw, strict=True) if value is None]
            if gone:
                await self._redis.srem(self._workers(name), *gone)
            live[name] = [Presence.model_validate_json(value) for value in raw if value]
        return live

    async def products(self) -> dict[str, list[Presence]]:
        try:
            names = sorted(n.decode() for n in await self._redis.smembers(self._known))
            return await self._live(names)
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def product(self, name: str) -> list[Presence] | None:
        try:
            if not await self._redis.sismember(self._known, name):
                return None
            return (await self._live([name]))[name]
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def has_room(self, product: str) -> bool:
        try:
            return await self._redis.xlen(self._stream(product)) < self._max_queue
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def submit(self, job: Job, image: bytes) -> Reply:
        stream = self._stream(job.product)
        try:
            entry = await self._submit(
                keys=[stream], args=[self._max_queue, job.model_dump_json(), image]
            )
            if entry is None:
                raise QueueFull(job.product)
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error
        popped = await self._wait_reply(job)
        if popped is None:
            # Nobody waits any more: spare the workers a job whose answer is lost.
            with contextlib.suppress(RedisError):
                await self._redis.xdel(stream, entry)
            raise DeadlineExceeded(job.product)
        return Reply.model_validate_json(popped)

    async def _wait_reply(self, job: Job) -> bytes | None:
        """The reply, or None at the deadline. Once the job is enqueued, a lost connection
        is waited out until the deadline: a Redis that restarts from its append-only file
        still holds the job, and a worker answers it."""
        while (left := job.deadline - time.time()) > 0:
            try:
                popped = await self._redis.blpop([self._reply(job.id)], max(left, 0.01))
            except (RedisConnectionError, RedisTimeoutError):
                await asyncio.sleep(min(RECONNECT_PAUSE_S, max(left, 0.0)))
                continue
            return None if popped is None else popped[1]
        return None

    async def depths(self) -> dict[str, int]:
        try:
            names = sorted(n.decode() for n in await self._redis.smembers(self._known))
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.xlen(self._stream(name))
                lengths = await pipe.execute()
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error
        return dict(zip(names, lengths, strict=True))

    async def prepare(self, product: str) -> None:
        try:
            # From id 0: entries enqueued before any worker existed are served too.
            await self._redis.xgroup_create(self._stream(product), GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def _deliveries(
        self, product: str, entries: list[tuple[bytes, dict[bytes, bytes]]], counts: dict[str, int]
    ) -> list[Delivery]:
        """Parse stream entries; an entry that cannot be parsed is dead-lettered at once."""
        deliveries = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            try:
                job = Job.model_validate_json(fields[b"job"])
                image = fields[b"image"]
            except (KeyError, ValidationError):
                await self._bury(product, entry_id, fields, None)
                continue
            count = counts.get(entry_id, 1)
            deliveries.append(Delivery(entry_id=entry_id, job=job, image=image, deliveries=count))
        return deliveries

    async def read(self, product: str, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        stream = self._stream(product)
        answer = await self._redis.xreadgroup(
            GROUP, consumer, {stream: ">"}, count=count, block=block_ms if block_ms > 0 else None
        )
        entries = [entry for _, stream_entries in answer or [] for entry in stream_entries]
        return await self._deliveries(product, entries, {})

    async def pending(self, product: str, consumer: str, count: int) -> list[Delivery]:
        # From id 0: the consumer's own pending entries, not new ones.
        answer = await self._redis.xreadgroup(
            GROUP, consumer, {self._stream(product): "0"}, count=count
        )
        entries = [entry for _, stream_entries in answer or [] for entry in stream_entries]
        # An entry deleted meanwhile (its waiter gave up) comes back without fields.
        return await self._deliveries(product, [e for e in entries if e[1]], {})

    async def reclaim(self, product: str, consumer: str, count: int) -> list[Delivery]:
        """Take over the entries of consumers whose advertisement expired: dead or stalled
        workers, however long their batches take while they live."""
        stream = self._stream(product)
        holders = await self._redis.xinfo_consumers(stream, GROUP)
        names = [_text(h["name"]) for h in holders if _text(h["name"]) != consumer]
        if not names:
            return []
        alive = await self._redis.mget([self._ad_key(product, name) for name in names])
        pending = {_text(h["name"]): int(h["pending"]) for h in holders}
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        for name, ad in zip(names, alive, strict=True):
            if ad is not None:
                continue
            if pending[name] == 0:
                # A consumer gone for good, with nothing left: forget it.
                await self._redis.xgroup_delconsumer(stream, GROUP, name)
                continue
            held = await self._redis.xpending_range(
                stream, GROUP, "-", "+", count - len(entries), consumername=name
            )
            ids = [p["message_id"] for p in held]
            if ids:
                entries += await self._redis.xclaim(stream, GROUP, consumer, RECLAIM_GUARD_MS, ids)
            if len(entries) >= count:
                break
        entries = [(raw_id, fields) for raw_id, fields in entries if fields]
        if not entries:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for raw_id, _ in entries:
                pipe.xpending_range(stream, GROUP, min=raw_id, max=raw_id, count=1)
            counts_found = await pipe.execute()
        counts = {p["message_id"].decode(): int(p["times_delivered"]) for [p] in counts_found if p}
        return await self._deliveries(product, entries, counts)

    async def respond(self, product: str, delivery: Delivery, reply: Reply) -> bool:
        return bool(await self._answer_once(product, delivery.entry_id, reply))

    async def _answer_once(
        self, product: str, entry_id: str, reply: Reply, client: Any = None
    ) -> Any:
        """The _RESPOND script for one entry: 1 when this was the first answer. With a
        pipeline as `client`, it is queued there instead."""
        return await self._respond(
            keys=[self._stream(product), self._reply(reply.job_id), self._answered(reply.job_id)],
            args=[GROUP, entry_id, reply.model_dump_json(), REPLY_TTL_S, ANSWERED_TTL_S],
            client=client,
        )

    async def _bury(
        self, product: str, entry_id: str, fields: dict[bytes, bytes], reply: Reply | None
    ) -> None:
        """Move an entry to the dead-letter stream, answering its request if it has one."""
        stream = self._stream(product)
        reason = reply.error if reply and reply.error else "malformed entry"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self._dead(product),
                {**fields, b"reason": reason.encode(), b"entry_id": entry_id.encode()},
                maxlen=DEAD_LETTER_MAXLEN,
            )
            if reply is None:
                pipe.xack(stream, GROUP, entry_id)
                pipe.xdel(stream, entry_id)
            else:
                await self._answer_once(product, entry_id, reply, client=pipe)
            await pipe.execute()

    async def dead_letter(self, product: str, delivery: Delivery, reply: Reply) -> None:
        fields = {b"job": delivery.job.model_dump_json().encode(), b"image": delivery.image}
        await self._bury(product, delivery.entry_id, fields, reply)

    async def advertise(self, ads: Iterable[Presence], ttl_s: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for ad in ads:
                pipe.set(
                    self._ad_key(ad.product, ad.worker),
                    ad.model_dump_json(),
                    px=max(math.ceil(ttl_s * 1000), 1),
                )
                pipe.sadd(self._workers(ad.product), ad.worker)
                pipe.sadd(self._known, ad.product)
            await pipe.execute()

    async def withdraw(self, ad: Presence, forget: bool) -> None:
        await self._redis.delete(self._ad_key(ad.product, ad.worker))
        await self._redis.srem(self._workers(ad.product), ad.worker)
        if forget and not (await self._live([ad.product]))[ad.product]:
            await self._redis.srem(self._known, ad.product)

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
