"""Concurrent calls that share one run: a burst of requests asking the same question of
Redis at once sends it once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Key = TypeVar("Key")
Value = TypeVar("Value")


class SharedCalls(Generic[Key, Value]):
    """`run(key, call)` awaits the run of `call` already under way for `key`, or starts one."""

    def __init__(self) -> None:
        self._running: dict[Key, asyncio.Future[Value]] = {}

    async def run(self, key: Key, call: Callable[[], Awaitable[Value]]) -> Value:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(call())
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        # Shielded: one waiting caller that is cancelled does not cancel the others' run.
        return await asyncio.shield(running)
