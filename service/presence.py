"""Which workers serve which products: presences that workers announce and that expire.

The API learns the products and their live workers from here, so it needs no MODEL_DIR;
a worker whose presence expired (dead or stalled) has its queued jobs taken over.
`MemoryPresenceBoard` serves the embedded mode, `RedisPresenceBoard` Redis mode, on the
client the Redis queue uses (service.redis_queue.RedisBackend); the API reads the latter
through `CachedPresenceBoard`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.queue import QueueUnavailable
from service.shared_calls import SharedCalls
from service.wire import Presence


class PresenceBoard(ABC):
    """Workers announce what they serve; the API reads who serves what."""

    @abstractmethod
    async def products(self) -> dict[str, list[Presence]]:
        """Every known product with the presences of its live workers (maybe none)."""

    @abstractmethod
    async def product(self, name: str) -> list[Presence] | None:
        """The live presences for one product; None when the product is unknown."""

    @abstractmethod
    async def names(self) -> list[str]:
        """Every known product, served now or not: cheaper than products()."""

    @abstractmethod
    async def announce(self, presences: Iterable[Presence], ttl_s: float) -> None:
        """Announce live products; each presence expires after ttl_s."""

    @abstractmethod
    async def withdraw(self, presence: Presence, forget: bool) -> None:
        """Withdraw a presence; with forget, drop the product unless another worker serves it."""


class MemoryPresenceBoard(PresenceBoard):
    """One process: presences and their expiry times in a dict."""

    def __init__(self) -> None:
        self._presences: dict[str, dict[str, tuple[Presence, float]]] = {}

    def _live(self, name: str) -> list[Presence]:
        now = time.monotonic()
        return [p for p, expiry in self._presences[name].values() if expiry > now]

    async def products(self) -> dict[str, list[Presence]]:
        return {name: self._live(name) for name in self._presences}

    async def product(self, name: str) -> list[Presence] | None:
        return self._live(name) if name in self._presences else None

    async def names(self) -> list[str]:
        return list(self._presences)

    async def announce(self, presences: Iterable[Presence], ttl_s: float) -> None:
        expiry = time.monotonic() + ttl_s
        for presence in presences:
            self._presences.setdefault(presence.product, {})[presence.worker] = (presence, expiry)

    async def withdraw(self, presence: Presence, forget: bool) -> None:
        workers = self._presences.get(presence.product, {})
        workers.pop(presence.worker, None)
        if forget and not workers:
            self._presences.pop(presence.product, None)


class RedisPresenceBoard(PresenceBoard):
    """One expiring key per worker and product, a set of worker ids per product (pruned as
    keys expire) and the set of known products."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix

    def _key(self, product: str, worker: str) -> str:
        return f"{self._prefix}:worker:{product}:{worker}"

    def _workers(self, product: str) -> str:
        return f"{self._prefix}:workers:{product}"

    @property
    def _known(self) -> str:
        return f"{self._prefix}:products"

    async def alive(self, product: str, workers: list[str]) -> list[bool]:
        """Whether each worker's presence for the product has not expired."""
        found = await self._redis.mget([self._key(product, worker) for worker in workers])
        return [value is not None for value in found]

    async def _live(self, names: list[str]) -> dict[str, list[Presence]]:
        """Live presences per product; ids whose key expired are pruned."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self._workers(name))
            members = await pipe.execute()
        live: dict[str, list[Presence]] = {}
        for name, workers in zip(names, members, strict=True):
            ids = sorted(w.decode() for w in workers)
            raw = await self._redis.mget([self._key(name, w) for w in ids]) if ids else []
            gone = [w for w, value in zip(ids, raw, strict=True) if value is None]
            if gone:
                await self._redis.srem(self._workers(name), *gone)
            live[name] = [Presence.model_validate_json(value) for value in raw if value]
        return live

    async def products(self) -> dict[str, list[Presence]]:
        try:
            return await self._live(await self.names())
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def product(self, name: str) -> list[Presence] | None:
        try:
            if not await self._redis.sismember(self._known, name):
                return None
            return (await self._live([name]))[name]
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def names(self) -> list[str]:
        try:
            return sorted(n.decode() for n in await self._redis.smembers(self._known))
        except RedisError as error:
            raise QueueUnavailable(str(error)) from error

    async def announce(self, presences: Iterable[Presence], ttl_s: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for presence in presences:
                pipe.set(
                    self._key(presence.product, presence.worker),
                    presence.model_dump_json(),
                    px=max(math.ceil(ttl_s * 1000), 1),
                )
                pipe.sadd(self._workers(presence.product), presence.worker)
                pipe.sadd(self._known, presence.product)
            await pipe.execute()

    async def withdraw(self, presence: Presence, forget: bool) -> None:
        await self._redis.delete(self._key(presence.product, presence.worker))
        await self._redis.srem(self._workers(presence.product), presence.worker)
        if forget and not (await self._live([presence.product]))[presence.product]:
            await self._redis.srem(self._known, presence.product)


class CachedPresenceBoard(PresenceBoard):
    """Another board, with each served product's live presences kept for ttl_s.

    /inspect reads a product's presences before anything else: from Redis that is three
    round trips per request, which a burst of requests (or of stalled uploads) pays
    hundreds of times over. Only products with a live worker are kept, so an unknown or
    unserved product is looked up every time and seen as soon as it is announced; a
    withdrawn one is still served from here for at most ttl_s. Concurrent misses share
    one read.
    """

    def __init__(self, board: PresenceBoard, ttl_s: float) -> None:
        self._board = board
        self._ttl_s = ttl_s
        self._kept: dict[str, tuple[float, list[Presence]]] = {}
        self._reads: SharedCalls[str, list[Presence] | None] = SharedCalls()

    async def product(self, name: str) -> list[Presence] | None:
        kept = self._kept.get(name)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        return await self._reads.run(name, lambda: self._read(name))

    async def _read(self, name: str) -> list[Presence] | None:
        presences = await self._board.product(name)
        if presences:
            self._kept[name] = (time.monotonic() + self._ttl_s, presences)
        else:
            self._kept.pop(name, None)
        return presences

    async def products(self) -> dict[str, list[Presence]]:
        return await self._board.products()

    async def names(self) -> list[str]:
        return await self._board.names()

    async def announce(self, presences: Iterable[Presence], ttl_s: float) -> None:
        await self._board.announce(presences, ttl_s)

    async def withdraw(self, presence: Presence, forget: bool) -> None:
        await self._board.withdraw(presence, forget)
