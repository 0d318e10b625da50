"""Redis mode against the real Redis: API replicas, `glad worker` processes, failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service import products as products_module
from service.app import create_app
from service.metrics import WorkerMetrics
from service.presence import CachedPresenceBoard, MemoryPresenceBoard
from service.products import HEARTBEAT_RETRY_S
from service.queue import GROUP, MemoryQueue, QueueUnavailable
from service.redis_queue import RECLAIM_GUARD_MS, RedisBackend
from service.settings import Settings
from service.wire import Delivery, Job, Presence, Reply
from service.worker import Worker
from tests.service_harness import (
    REDIS_URL,
    ROOT,
    WorkerProcess,
    free_port,
    metric,
    own_redis_command,
    png,
    redis_prefix,
    serving,
)

PNG = {"Content-Type": "image/png"}
MAX_DELIVERIES = 3


def redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(not redis_up(), reason=f"no Redis at {REDIS_URL}")


@dataclass
class Cluster:
    """One API (real socket) and two workers sharing one key prefix."""

    base: str
    prefix: str
    workers: list[WorkerProcess]
    redis: redis.Redis

    def stream(self, product: str = "widget") -> str:
        return f"{self.prefix}:stream:{product}"

    def worker_id(self, worker: WorkerProcess) -> str:
        """The consumer name a worker process announces (it holds the pid)."""
        ids = [w.decode() for w in self.redis.smembers(f"{self.prefix}:workers:widget")]
        return next(i for i in ids if i.split("-")[-2] == str(worker.pid))


def wait_ready(base: str, workers: int, processes: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready = httpx.get(f"{base}/readyz").json()
        if ready["products"].get("widget") == workers:
            return
        for process in processes:
            if process.process.poll() is not None:
                raise RuntimeError(process.log_path.read_text())
        time.sleep(0.2)
    raise TimeoutError("the workers did not announce themselves in time")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("worker-logs")
    with redis_prefix() as prefix:
        env = {
            "REDIS_URL": REDIS_URL,
            "KEY_PREFIX": prefix,
            "MODEL_DIR": str(tiny_model_dir),
            "MAX_BATCH": "4",
            "MAX_WAIT_MS": "50",
            "MAX_DELIVERIES": str(MAX_DELIVERIES),
            "HEARTBEAT_TTL_S": "3",
            "LOG_LEVEL": "warning",
        }
        workers = [WorkerProcess(env, logs / f"worker-{i}.log") for i in range(2)]
        settings = Settings(redis_url=REDIS_URL, key_prefix=prefix, request_timeout_s=60)
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=60)
        try:
            with serving(create_app(settings)) as base:
                wait_ready(base, 2, workers)
                yield Cluster(base, prefix, workers, client)
        finally:
            for worker in workers:
                worker.stop()
            client.close()


async def inspect_many(base: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=90) as client:
        posts = (
            client.post("/inspect/widget?heatmap=none", content=png(seed=i), headers=PNG)
            for i in range(count)
        )
        return list(await asyncio.gather(*posts))


def test_two_workers_share_the_stream_in_batches(cluster: Cluster) -> None:
    answers = asyncio.run(inspect_many(cluster.base, 16))
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers]
    texts = [w.metrics() for w in cluster.workers]
    parts = [metric(t, "glad_inspected_parts_total", product="widget") for t in texts]
    batches = [metric(t, "glad_batch_size_count", product="widget") for t in texts]
    assert sum(parts) == 16
    assert all(p > 0 for p in parts), parts
    assert sum(batches) < 16
    assert cluster.redis.xlen(cluster.stream()) == 0
    api = httpx.get(f"{cluster.base}/metrics").text
    assert metric(api, "glad_requests_total", product="widget", status="200") >= 16
    assert 'glad_queue_depth{product="widget"} 0.0' in api
    products = httpx.get(f"{cluster.base}/products").json()["products"]
    assert products[0]["live_workers"] == 2 and products[0]["image_size"] == 64


def test_workers_run_below_the_api_in_cpu_priority(cluster: Cluster) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    for worker in cluster.workers:
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, ours + 10)  # WORKER_NICE


def test_an_entry_delivered_too_often_goes_to_the_dead_letters(cluster: Cluster) -> None:
    job = Job(
        request_id=uuid.uuid4().hex, product="widget", heatmap="none", deadline=time.time() + 60
    )
    stream = cluster.stream()
    # In one transaction, so no worker's blocked read can take the entry first: a
    # consumer that then vanishes takes it, and it is handed out MAX_DELIVERIES times.
    pipe = cluster.redis.pipeline(transaction=True)
    pipe.xadd(stream, {"job": job.model_dump_json(), "image": png()})
    pipe.xreadgroup(GROUP, "vanished", {stream: ">"}, count=1)
    entry_id, _ = pipe.execute()
    for _ in range(MAX_DELIVERIES - 1):
        cluster.redis.xclaim(stream, GROUP, "vanished", 0, [entry_id])

    popped = cluster.redis.blpop([f"{cluster.prefix}:reply:{job.id}"], timeout=30)
    assert popped is not None, "no worker dead-lettered the entry"
    reply = Reply.model_validate_json(popped[1])
    assert reply.status == 500 and "dead letters" in (reply.error or "")
    dead = cluster.redis.xrange(f"{cluster.prefix}:dead:widget")
    assert [fields[b"entry_id"] for _, fields in dead] == [entry_id]
    assert cluster.redis.xlen(stream) == 0
    counts = [
        metric(w.metrics(), "glad_dead_letter_total", product="widget") for w in cluster.workers
    ]
    assert sum(counts) == 1


def test_a_worker_killed_mid_batch_has_its_requests_answered_by_the_other(
    cluster: Cluster,
) -> None:
    victim, survivor = cluster.workers
    victim_id = cluster.worker_id(victim)
    dead_before = metric(survivor.metrics(), "glad_dead_letter_total", product="widget")

    async def scenario() -> tuple[list[httpx.Response], int]:
        requests = asyncio.ensure_future(inspect_many(cluster.base, 12))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pending = cluster.redis.xpending_range(
                cluster.stream(), GROUP, "-", "+", 100, consumername=victim_id
            )
            if pending:
                # Stopped, it can no longer answer; Redis may still hand it entries.
                os.kill(victim.pid, signal.SIGSTOP)
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        orphans = len(
            cluster.redis.xpending_range(
                cluster.stream(), GROUP, "-", "+", 100, consumername=victim_id
            )
        )
        victim.kill()
        return await requests, orphans

    answers, orphans = asyncio.run(scenario())
    assert orphans > 0, "the worker was not killed in the middle of a batch"
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    assert not cluster.redis.xpending_range(cluster.stream(), GROUP, "-", "+", 100)
    assert metric(survivor.metrics(), "glad_dead_letter_total", product="widget") == dead_before


def test_queue_full_deadline_and_unknown_product(tiny_model_dir: Path) -> None:
    with redis_prefix() as prefix:
        # Past 5 s, redis-py's default socket timeout: waiting for a reply must outlast it.
        settings = Settings(
            redis_url=REDIS_URL, key_prefix=prefix, max_queue=2, request_timeout_s=6
        )
        # A product that a (pretended) worker announces but nobody consumes.
        presence = Presence(
            product="stalled",
            worker="w1",
            version="v",
            image_size=64,
            preset="p",
            threshold=1.0,
            device="cpu",
        )

        async def announce() -> None:
            ours = RedisBackend.open(REDIS_URL, prefix, 2, longest_wait_s=1)
            await ours.presence.announce([presence], ttl_s=30)
            await ours.close()

        asyncio.run(announce())
        with TestClient(create_app(settings)) as client:
            late = client.post("/inspect/stalled", content=png(), headers=PNG)
            assert late.status_code == 504, late.text
            assert "REQUEST_TIMEOUT_S" in late.json()["detail"]
            stream = f"{prefix}:stream:stalled"
            backend = redis.Redis.from_url(REDIS_URL)
            assert backend.xlen(stream) == 0  # the abandoned job was withdrawn
            for _ in range(2):
                backend.xadd(stream, {"job": "{}", "image": b""})
            full = client.post("/inspect/stalled", content=png(), headers=PNG)
            assert full.status_code == 429, full.text
            assert full.headers["retry-after"] == "1"
            assert "MAX_QUEUE" in full.json()["detail"]
            # Refused before the image is decoded: not an image, yet 429, not 415.
            garbage = client.post("/inspect/stalled", content=b"not an image", headers=PNG)
            assert garbage.status_code == 429, garbage.text
            assert client.post("/inspect/gadget", content=png(), headers=PNG).status_code == 404
            text = client.get("/metrics").text
            assert 'glad_queue_depth{product="stalled"} 2.0' in text
            assert metric(text, "glad_requests_total", product="stalled", status="429") == 2
            backend.close()


def test_redis_down_gives_503_and_not_ready() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1", key_prefix="nowhere")
    with TestClient(create_app(settings)) as client:
        answer = client.post("/inspect/widget", content=png(), headers=PNG)
        assert answer.status_code == 503
        assert "unreachable" in answer.json()["detail"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/products").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_several_api_processes_report_their_counts_together(tmp_path: Path) -> None:
    port, metrics_dir, log_path = free_port(), tmp_path / "metrics", tmp_path / "api.log"
    metrics_dir.mkdir()
    base = f"http://127.0.0.1:{port}"

    async def unknown_products(count: int) -> list[int]:
        url, body = "/inspect/gadget", png()
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            posts = (client.post(url, content=body, headers=PNG) for _ in range(count))
            return [answer.status_code for answer in await asyncio.gather(*posts)]

    with redis_prefix() as prefix, log_path.open("wb") as log:
        env = {
            **os.environ,
            "REDIS_URL": REDIS_URL,
            "KEY_PREFIX": prefix,
            "PORT": str(port),
            "LOG_LEVEL": "info",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        command = [sys.executable, "-m", "service.cli", "serve", "--workers", "2"]
        api = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while log_path.read_text().count("Application startup complete") < 2:
                assert api.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            # Until both processes have answered some (the kernel picks who accepts).
            statuses: list[int] = []
            while len(statuses) < 2000 and len(list(metrics_dir.glob("counter_*.db"))) < 2:
                statuses += asyncio.run(unknown_products(20))
            scrapes = [httpx.get(f"{base}/metrics").text for _ in range(6)]
        finally:
            api.terminate()
            api.wait(30)
    assert len(list(metrics_dir.glob("counter_*.db"))) == 2
    assert set(statuses) == {404}
    counts = {metric(text, "glad_requests_total", product="-", status="404") for text in scrapes}
    assert counts == {len(statuses)}


def test_the_api_process_never_loads_pytorch() -> None:
    # The front door with a Redis queue: parse the command line, start, answer requests.
    with redis_prefix() as prefix:
        script = f"""
import sys
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from service.app import create_app
from service.cli import build_parser
from service.settings import Settings
build_parser().parse_args(["serve"])
with TestClient(create_app(Settings(redis_url={REDIS_URL!r}, key_prefix={prefix!r}))) as c:
    assert c.get("/healthz").status_code == 200
    assert c.post("/inspect/gadget", content=b"x", headers={{"Content-Type": "image/png"}})
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "diffusers", "onnxruntime"}}))
"""
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _presence(worker: str, product: str = "widget") -> Presence:
    return Presence(
        product=product,
        worker=worker,
        version="v",
        image_size=64,
        preset="p",
        threshold=1.0,
        device="cpu",
    )


def test_only_the_jobs_of_workers_whose_presence_expired_are_taken_over() -> None:
    async def scenario(prefix: str) -> tuple[list[str], list[str], list[str]]:
        ours = RedisBackend.open(REDIS_URL, prefix, 8, longest_wait_s=1)
        queue = ours.queue
        backend = redis.Redis.from_url(REDIS_URL)
        stream = f"{prefix}:stream:widget"
        await queue.prepare("widget")
        await ours.presence.announce([_presence("slow")], ttl_s=60)  # "dead" never does
        job = Job(request_id="r", product="widget", heatmap="none", deadline=time.time() + 60)
        held = {}
        for consumer in ("dead", "slow"):
            backend.xadd(stream, {"job": job.model_dump_json(), "image": png()})
            held[consumer] = [d.entry_id for d in await queue.read("widget", consumer, 1, 0)]
        # Past the guard that keeps a just-claimed entry from moving on at once.
        await asyncio.sleep(RECLAIM_GUARD_MS / 1000 + 0.2)
        taken = [d.entry_id for d in await queue.reclaim("widget", "me", 8)]
        await ours.close()
        left = backend.xpending_range(stream, GROUP, "-", "+", 10, consumername="slow")
        backend.close()
        return taken, held["dead"], [p["message_id"].decode() for p in left]

    with redis_prefix() as prefix:
        taken, dead, still_slow = asyncio.run(scenario(prefix))
    assert taken == dead
    assert len(still_slow) == 1  # a worker that still beats keeps its job, however slow


def test_a_job_is_answered_once_and_a_second_answer_is_dropped() -> None:
    async def scenario(prefix: str) -> tuple[list[bool], int]:
        ours = RedisBackend.open(REDIS_URL, prefix, 8, longest_wait_s=1)
        queue = ours.queue
        backend = redis.Redis.from_url(REDIS_URL)
        await queue.prepare("widget")
        job = Job(request_id="r", product="widget", heatmap="none", deadline=time.time() + 60)
        backend.xadd(f"{prefix}:stream:widget", {"job": job.model_dump_json(), "image": png()})
        [delivery] = await queue.read("widget", "first", 1, 0)
        answers = [
            await queue.respond("widget", delivery, Reply(job_id=job.id, status=500, error=e))
            for e in ("one", "two")
        ]
        replies = backend.llen(f"{prefix}:reply:{job.id}")
        await ours.close()
        backend.close()
        return answers, replies

    with redis_prefix() as prefix:
        answers, replies = asyncio.run(scenario(prefix))
    assert answers == [True, False]
    assert replies == 1


def _own_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server of this test's own, keeping an append-only file in folder."""
    server = subprocess.Popen(own_redis_command(port, folder), stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.ping():
                return server
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server to start")
def test_a_wait_outlives_a_redis_restart_that_kept_the_job(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}"

    async def scenario() -> Reply:
        server = _own_redis(port, tmp_path)
        try:
            api = RedisBackend.open(url, "restart", 8, longest_wait_s=20)
            await api.queue.prepare("widget")
            job = Job(request_id="r", product="widget", heatmap="none", deadline=time.time() + 20)
            waiting = asyncio.ensure_future(api.queue.submit(job, png()))
            while not redis.Redis(port=port).xlen("restart:stream:widget"):
                await asyncio.sleep(0.01)
            server.kill()  # SIGKILL, this test's own server only
            server.wait()
            await asyncio.sleep(1.0)
            server = _own_redis(port, tmp_path)  # from the append-only file
            worker = RedisBackend.open(url, "restart", 8, longest_wait_s=1)
            [delivery] = await worker.queue.read("widget", "w", 1, 1000)
            answer = Reply(job_id=job.id, status=500, error="x")
            await worker.queue.respond("widget", delivery, answer)
            reply = await waiting
            await api.close()
            await worker.close()
            return reply
        finally:
            server.kill()
            server.wait()

    reply = asyncio.run(scenario())
    assert reply.error == "x"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server to start")
def test_pooled_connections_that_a_redis_restart_closed_are_replaced_not_answered_503(
    tmp_path: Path,
) -> None:
    port = free_port()

    async def scenario() -> list[object]:
        server = _own_redis(port, tmp_path)
        try:
            api = RedisBackend.open(f"redis://127.0.0.1:{port}", "stale", 8, longest_wait_s=5)
            # Sixteen pooled connections, all open when Redis goes away (sixteen products:
            # concurrent checks of one product share one call).
            await asyncio.gather(*(api.queue.has_room(f"widget{i}") for i in range(16)))
            server.kill()  # SIGKILL, this test's own server only
            server.wait()
            server = _own_redis(port, tmp_path)
            answers = await asyncio.gather(
                *(api.queue.has_room(f"widget{i}") for i in range(16)), return_exceptions=True
            )
            await api.close()
            return answers
        finally:
            server.kill()
            server.wait()

    assert asyncio.run(scenario()) == [True] * 16


def test_a_burst_of_arrivals_checks_the_queue_depth_with_one_call() -> None:
    """500 requests arriving at once (stalled uploads, a flood) ask Redis for the depth of
    their product's queue once between them, not once each on a connection each."""

    def xlen_calls(client: redis.Redis) -> int:
        return int(client.info("commandstats").get("cmdstat_xlen", {}).get("calls", 0))

    async def scenario(prefix: str) -> tuple[list[bool], list[bool], int]:
        ours = RedisBackend.open(REDIS_URL, prefix, 2, longest_wait_s=1)
        try:
            await ours.queue.prepare("widget")
            before = xlen_calls(redis.Redis.from_url(REDIS_URL))
            burst = await asyncio.gather(*(ours.queue.has_room("widget") for _ in range(500)))
            calls = xlen_calls(redis.Redis.from_url(REDIS_URL)) - before
            job = Job(request_id="r", product="widget", heatmap="none", deadline=time.time() + 9)
            waiting = [asyncio.ensure_future(ours.queue.submit(job, png())) for _ in range(2)]
            await asyncio.sleep(0.2)
            full = await asyncio.gather(*(ours.queue.has_room("widget") for _ in range(5)))
            for submitted in waiting:
                submitted.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            return burst, full, calls
        finally:
            await ours.close()

    with redis_prefix() as prefix:
        burst, full, calls = asyncio.run(scenario(prefix))
    assert burst == [True] * 500
    assert full == [False] * 5  # the shared answer is a fresh one: the queue is full now
    assert calls <= 5  # another client of the same Redis may call XLEN meanwhile


def test_the_api_reads_a_served_products_presences_once_per_cache_period() -> None:
    """A burst of requests costs one presence read, not one per request; an unserved
    product is read every time, so its first worker is seen at once."""

    class CountedBoard(MemoryPresenceBoard):
        reads = 0

        async def product(self, name: str) -> list[Presence] | None:
            CountedBoard.reads += 1
            await asyncio.sleep(0.05)  # a round trip: the burst's requests overlap it
            return await super().product(name)

    async def scenario() -> list[int]:
        board = CountedBoard()
        cached = CachedPresenceBoard(board, ttl_s=0.5)
        reads = []
        await board.announce([_presence("w1")], ttl_s=60)
        burst = await asyncio.gather(*(cached.product("widget") for _ in range(100)))
        assert all(found == [_presence("w1")] for found in burst)
        reads.append(CountedBoard.reads)
        await cached.product("widget")
        reads.append(CountedBoard.reads)
        await asyncio.sleep(0.6)
        await board.withdraw(_presence("w1"), forget=True)
        assert await cached.product("widget") is None  # kept no longer than ttl_s
        for _ in range(3):
            assert await cached.product("gadget") is None
        await board.announce([_presence("w2", "gadget")], ttl_s=60)
        assert await cached.product("gadget") == [_presence("w2", "gadget")]
        reads.append(CountedBoard.reads)
        return reads

    assert asyncio.run(scenario()) == [1, 1, 6]


def test_a_failed_heartbeat_is_tried_again_within_the_retry_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Soon enough that the presences a restarted Redis restored have not expired."""
    pauses: list[float] = []

    class FlakyPresenceBoard(MemoryPresenceBoard):
        calls = 0

        async def announce(self, presences: object, ttl_s: float) -> None:
            FlakyPresenceBoard.calls += 1
            if FlakyPresenceBoard.calls == 1:
                raise QueueUnavailable("Redis restarting")

    async def recorded(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            raise asyncio.CancelledError

    settings = Settings(model_dir=tmp_path, heartbeat_ttl_s=30.0)
    board = FlakyPresenceBoard()
    worker = Worker(settings, MemoryQueue(8), board, WorkerMetrics(CollectorRegistry()))
    monkeypatch.setattr(products_module.asyncio, "sleep", recorded)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(worker.products.heartbeat())
    assert pauses == [HEARTBEAT_RETRY_S, 10.0]


def test_as_many_requests_as_max_connections_each_get_a_redis_connection() -> None:
    """redis-py's pool stops at 100 by default: the 101st request in flight got a 503."""
    settings = Settings(redis_url=REDIS_URL, key_prefix=f"pool-{uuid.uuid4().hex}")

    async def scenario() -> list[object]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            queue = app.state.services.queue
            answers = await asyncio.gather(
                *(queue.has_room("widget") for _ in range(settings.max_connections)),
                return_exceptions=True,
            )
        return answers

    answers = asyncio.run(scenario())
    assert answers == [True] * settings.max_connections, {repr(a) for a in answers}


def test_a_job_handed_out_but_never_received_is_found_in_the_workers_own_pending() -> None:
    """As when the connection breaks while Redis hands a job out: nobody takes over the jobs
    of a worker that still beats, so the worker itself must look for them."""

    async def scenario(prefix: str) -> tuple[list[str], str | None]:
        api = RedisBackend.open(REDIS_URL, prefix, 8, longest_wait_s=5)
        worker = RedisBackend.open(REDIS_URL, prefix, 8, longest_wait_s=1)
        await worker.queue.prepare("widget")
        job = Job(request_id="r", product="widget", heatmap="none", deadline=time.time() + 10)
        waiting = asyncio.ensure_future(api.queue.submit(job, png()))
        lost: list[Delivery] = []
        while not lost:
            lost = await worker.queue.read("widget", "w1", 1, 200)  # handed out, then "lost"
        found = await worker.queue.pending("widget", "w1", 8)
        answer = Reply(job_id=job.id, status=500, error="x")
        await worker.queue.respond("widget", found[0], answer)
        reply = await waiting
        await api.close()
        await worker.close()
        return [d.job.id for d in found], reply.error

    with redis_prefix() as prefix:
        found, error = asyncio.run(scenario(prefix))
    assert error == "x" and len(found) == 1
