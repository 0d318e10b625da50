"""The Redis backend: the job queue on Redis Streams, and the client it shares with the
presence board (service.presence), so both use one connection pool.

One stream per product, read by the consumer group `workers` (at-least-once delivery);
one reply list per request, which the waiting API replica pops; a marker per answered
job, so each is answered once; one dead-letter stream per product.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.presence import RedisPresenceBoard
from service.queue import GROUP, DeadlineExceeded, Queue, QueueFull, QueueUnavailable
from service.shared_calls import SharedCalls
from service.wire import Delivery, Job, Reply

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
# redis-py's own default: a worker needs a few connections per product, not more.
DEFAULT_REDIS_CONNECTIONS = 100

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

Entry = tuple[bytes, dict[bytes, bytes]]


def connect(url: str, longest_wait_s: float, max_connections: int) -> aioredis.Redis:
    """The client and connection pool of one process.

    Blocking reads wait up to longest_wait_s; only a socket silent for longer than that
    (plus a margin) means the connection is dead. A command on a pooled connection that
    Redis closed (it restarted) is tried again on a fresh one: from_url sets no retry, and
    every stale connection would otherwise answer one 503.
    """
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=longest_wait_s + SOCKET_MARGIN_S,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        # Each request in flight holds a connection while it waits for its reply.
        max_connections=max_connections,
        # Made once: left to redis-py, every new pooled connection read the package's
        # metadata from disk again, about 1 ms of the API's CPU each in a burst of requests.
        driver_info=DriverInfo(),
    )


class RedisReplies:
    """The reply lists: the API waits on its job's, a worker answers each job once, and a
    job that keeps failing goes to the dead letters with its answer."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._respond = client.register_script(_RESPOND)

    def _reply(self, job_id: str) -> str:
        return f"{self._prefix}:reply:{job_id}"

    def _answered(self, job_id: str) -> str:
        return f"{self._prefix}:answered:{job_id}"

    def _dead(self, product: str) -> str:
        return f"{self._prefix}:dead:{product}"

    async def wait(self, job: Job) -> bytes | None:
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

    async def answer(self, stream: str, entry_id: str, reply: Reply, client: Any = None) -> Any:
        """The _RESPOND script for one entry: 1 when this was the first answer. With a
        pipeline as `client`, it is queued there instead."""
        return await self._respond(
            keys=[stream, self._reply(reply.job_id), self._answered(reply.job_id)],
            args=[GROUP, entry_id, reply.model_dump_json(), REPLY_TTL_S, ANSWERED_TTL_S],
            client=client,
        )

    async def bury(
        self,
        stream: str,
        product: str,
        entry_id: str,
        fields: dict[bytes, bytes],
        reply: Reply | None,
    ) -> None:
        """Move an entry to the dead-letter stream, answering its request if it has one."""
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
                await self.answer(stream, entry_id, reply, client=pipe)
            await pipe.execute()


class RedisQueue(Queue):
    """Redis Streams: at-least-once delivery, reclaiming, dead letters, reply lists."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, max_queue: int, presence: RedisPresenceBoard
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._max_queue = max_queue
        # Whose entries may be taken over: consumers whose presence expired.
        self._presence = presence
        self._replies = RedisReplies(client, prefix)
        self._submit = client.register_script(_SUBMIT)
        self._depths: SharedCalls[str, int] = SharedCalls()

    def _stream(self, product: str) -> str:
        return f"{self._prefix}:stream:{product}"

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def has_room(self, product: str) -> bool:
        # Concurrent checks share one XLEN: a burst of arrivals needs no connection each.
        stream = self._stream(product)
        try:
            depth = await self._depths.run(stream, lambda: self._redis.xlen(stream))
            return depth < self._max_queue
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
        popped = await self._replies.wait(job)
        if popped is None:
            # Nobody waits any more: spare the workers a job whose answer is lost.
            with contextlib.suppress(RedisError):
                await self._redis.xdel(stream, entry)
            raise DeadlineExceeded(job.product)
        return Reply.model_validate_json(popped)

    async def depths(self, products: Iterable[str]) -> dict[str, int]:
        names = list(products)
        try:
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
        self, product: str, entries: list[Entry], counts: dict[str, int]
    ) -> list[Delivery]:
        """Parse stream entries; an entry that cannot be parsed is dead-lettered at once."""
        deliveries = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            try:
                job = Job.model_validate_json(fields[b"job"])
                image = fields[b"image"]
            except (KeyError, ValidationError):
                await self._replies.bury(self._stream(product), product, entry_id, fields, None)
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
        """Take over the entries of consumers whose presence expired: dead or stalled
        workers, however long their batches take while they live."""
        stream = self._stream(product)
        holders = await self._redis.xinfo_consumers(stream, GROUP)
        names = [_text(h["name"]) for h in holders if _text(h["name"]) != consumer]
        if not names:
            return []
        alive = await self._presence.alive(product, names)
        pending = {_text(h["name"]): int(h["pending"]) for h in holders}
        entries: list[Entry] = []
        for name, present in zip(names, alive, strict=True):
            if present:
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
        stream = self._stream(product)
        return bool(await self._replies.answer(stream, delivery.entry_id, reply))

    async def dead_letter(self, product: str, delivery: Delivery, reply: Reply) -> None:
        fields = {b"job": delivery.job.model_dump_json().encode(), b"image": delivery.image}
        await self._replies.bury(self._stream(product), product, delivery.entry_id, fields, reply)


@dataclass(frozen=True)
class RedisBackend:
    """The queue and the presence board of one process, on one Redis client."""

    client: aioredis.Redis
    queue: RedisQueue
    presence: RedisPresenceBoard

    @classmethod
    def open(
        cls,
        url: str,
        prefix: str,
        max_queue: int,
        longest_wait_s: float,
        max_connections: int = DEFAULT_REDIS_CONNECTIONS,
    ) -> RedisBackend:
        client = connect(url, longest_wait_s, max_connections)
        presence = RedisPresenceBoard(client, prefix)
        return cls(client, RedisQueue(client, prefix, max_queue, presence), presence)

    async def close(self) -> None:
        """Release the connections."""
        await self.client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
