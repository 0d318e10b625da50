"""SharedCalls: concurrent calls with one key share one run."""

from __future__ import annotations

import asyncio

import pytest

from service.shared_calls import SharedCalls


def test_concurrent_calls_share_one_run_and_a_later_call_runs_again() -> None:
    runs = 0

    async def call() -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return runs

    async def scenario() -> tuple[list[int], int, int]:
        shared: SharedCalls[str, int] = SharedCalls()
        burst = await asyncio.gather(*(shared.run("a", call) for _ in range(50)))
        other = await shared.run("b", call)
        later = await shared.run("a", call)
        return burst, other, later

    burst, other, later = asyncio.run(scenario())
    assert burst == [1] * 50
    assert (other, later) == (2, 3)


def test_a_cancelled_caller_leaves_the_others_their_answer() -> None:
    async def call() -> str:
        await asyncio.sleep(0.05)
        return "answer"

    async def scenario() -> str:
        shared: SharedCalls[str, str] = SharedCalls()
        first = asyncio.ensure_future(shared.run("a", call))
        second = asyncio.ensure_future(shared.run("a", call))
        await asyncio.sleep(0.01)
        first.cancel()
        return await second

    assert asyncio.run(scenario()) == "answer"


def test_a_failed_run_fails_every_caller_and_is_not_kept() -> None:
    failures = 0

    async def call() -> int:
        nonlocal failures
        failures += 1
        await asyncio.sleep(0.01)
        raise ConnectionError("down")

    async def scenario() -> list[BaseException | int]:
        shared: SharedCalls[str, int] = SharedCalls()
        burst = await asyncio.gather(
            *(shared.run("a", call) for _ in range(3)), return_exceptions=True
        )
        with pytest.raises(ConnectionError):
            await shared.run("a", call)
        return burst

    burst = asyncio.run(scenario())
    assert all(isinstance(result, ConnectionError) for result in burst)
    assert failures == 2
