"""Fault scenarios against a real service on this machine, loopback only, bounded in count
and time: one table of what was sent, answered, lost and done twice.

Starts its own redis-server (on a free port, append-only file in a scratch folder: the only
Redis it kills), an API (`glad serve`) and two workers (`glad worker`) on the demo model
(`glad demo`, trained here unless --models names a MODEL_DIR holding `demo`), then runs:

- kill-one: SIGKILL one of two workers under load
- kill-both: SIGKILL both, start one again 5 s later
- pause-12s: SIGSTOP one worker for 12 s (past HEARTBEAT_TTL_S), then SIGCONT
- redis-restart: SIGKILL Redis under load, start it again 5 s later from its AOF
- database-restart: stop the records' PostgreSQL (Debian's, a server of its own) under
  load, start it again 5 s later; inspections answered, and records of them written
- flood: far more clients than MAX_QUEUE; the 429s' latency, timed by a client in a process
  of its own (benchmarks.probe): 64 clients in one event loop time mostly themselves
- stalled-bodies: connections that declare 100 kB and send 100 bytes, beside normal clients
- large-images: 8 6000 x 6000 PNGs at once beside 7 normal clients; the processes' memory
  afterwards
- soak: five minutes of normal clients with bursts of stalled uploads; memory over time

    python -m benchmarks.faults            # writes benchmarks/results/faults.{json,md}

Settings are the service's defaults except MAX_QUEUE (16, so that a flood fills it). With
database-restart among the scenarios, the API records every answer in that PostgreSQL
(DATABASE_URL), as docker-compose.yml deploys it, for every scenario of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import column, create_engine, func, select, table

from benchmarks.tables import write_table
from model.demo import part_image, with_defect
from service.settings import Settings
from tests.postgres_server import PostgresServer, postgres_bin
from tests.service_harness import free_port, metric, own_redis_command

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "faults"
PRODUCT = "demo"
MAX_QUEUE = 16
REQUEST_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = Settings.model_fields["body_timeout_s"].default  # left at the default
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 15  # past the service's own deadline: a miss is lost


def demo_models(scratch: Path) -> Path:
    """A MODEL_DIR under scratch holding the demo product, trained now (`glad demo`)."""
    models = scratch / "models"
    demo = [sys.executable, "-m", "service.cli", "demo", "--out", str(models / PRODUCT)]
    demo += ["--images", str(scratch / "images"), "--quiet"]
    subprocess.run(demo, cwd=ROOT, check=True)
    return models


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Row:
    scenario: str
    sent: int = 0
    ok: int = 0
    lost: int = 0  # no HTTP answer before the client gave up
    duplicates: int = 0  # second answers the queue dropped (glad_duplicate_answers_total)
    ran_unanswered: int = 0  # parts inspected beyond the 200s: work done for nobody
    statuses: dict[str, int] = field(default_factory=dict)
    p99_s: float | None = None  # of the requests the scenario is about
    recovery_s: float | None = None
    note: str = ""


class Stack:
    """redis-server, one API and two workers, as subprocesses of this one."""

    def __init__(
        self,
        scratch: Path,
        models: Path,
        product: str = PRODUCT,
        database: PostgresServer | None = None,
    ) -> None:
        self.scratch = scratch
        self.database = database
        self.product = product
        self.redis_port, self.api_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}",
            "KEY_PREFIX": "faults",
            "MODEL_DIR": str(models),
            "DATA_DIR": str(scratch / "data"),
            "MAX_QUEUE": str(MAX_QUEUE),
            "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            "LOG_LEVEL": "warning",
            "PORT": str(self.api_port),
        }
        if database is not None:
            self.env["DATABASE_URL"] = database.url
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.workers: list[tuple[subprocess.Popen, int]] = []

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            own_redis_command(self.redis_port, self.scratch), stdout=subprocess.DEVNULL
        )
        self._wait(lambda: _redis_up(self.redis_port), "redis-server")

    def start_api(self) -> None:
        log = (self.scratch / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._wait(lambda: _get(f"{self.base}/healthz") == 200, "the API")

    def start_worker(self) -> None:
        port = free_port()
        log = (self.scratch / f"worker-{len(self.workers)}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT,
            env={**self.env, "WORKER_METRICS_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append((process, port))

    def live_workers(self) -> int:
        try:
            ready = httpx.get(f"{self.base}/readyz", timeout=5).json()
            return ready["products"].get(self.product, 0)
        except (httpx.HTTPError, ValueError, KeyError):
            return 0

    def wait_workers(self, count: int) -> None:
        self._wait(lambda: self.live_workers() == count, f"{count} live workers", 300)

    def worker_totals(self, name: str) -> float:
        total = 0.0
        for process, port in self.workers:
            if process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                    total += metric(text, name, product=PRODUCT)
        return total

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of the API and of each running worker."""
        processes = {"API": self.api} | {f"worker {i}": p for i, (p, _) in enumerate(self.workers)}
        return {
            name: rss_mib(process.pid)
            for name, process in processes.items()
            if process is not None and process.poll() is None
        }

    def stop(self) -> None:
        for process in [p for p, _ in self.workers] + [self.api, self.redis]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()

    @staticmethod
    def _wait(ready, what: str, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up within {limit_s} s")
            time.sleep(0.2)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _redis_up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


@dataclass
class Answer:
    status: int  # 0 = lost
    seconds: float
    inspection_id: str | None = None  # where the service recorded it


async def load(
    base: str, count: int, clients: int, body: bytes, stop: asyncio.Event | None = None
) -> list[Answer]:
    """`count` requests (or, given `stop`, requests until it is set) from `clients`
    concurrent clients, each waiting for its answer."""
    answers: list[Answer] = []
    todo: Iterator[int] = iter(range(count))
    if stop is not None:
        todo = itertools.takewhile(lambda _: not stop.is_set(), itertools.count())

    async def client(http: httpx.AsyncClient) -> None:
        for _ in todo:
            began = time.perf_counter()
            try:
                response = await http.post(
                    f"/inspect/{PRODUCT}?heatmap=none",
                    content=body,
                    headers={"Content-Type": "image/png"},
                )
                status = response.status_code
                recorded = response.json().get("inspection_id") if status == 200 else None
            except httpx.HTTPError:
                status, recorded = 0, None
            answers.append(Answer(status, time.perf_counter() - began, recorded))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT_S, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return answers


def p99_of(answers: list[Answer]) -> float:
    return p99([a.seconds for a in answers]) or 0.0


def p99(values: list[float]) -> float | None:
    return float(np.percentile(values, 99)) if values else None


def tally(row: Row, answers: list[Answer], stack: Stack, before: tuple[float, float]) -> Row:
    row.sent = len(answers)
    row.statuses = dict(sorted(Counter(str(a.status) for a in answers if a.status).items()))
    row.ok = sum(a.status == 200 for a in answers)
    row.lost = sum(a.status == 0 for a in answers)
    inspected, duplicates = before
    row.duplicates = int(stack.worker_totals("glad_duplicate_answers_total") - duplicates)
    row.ran_unanswered = max(
        0, int(stack.worker_totals("glad_inspected_parts_total") - inspected) - row.ok
    )
    return row


def snapshot(stack: Stack) -> tuple[float, float]:
    return (
        stack.worker_totals("glad_inspected_parts_total"),
        stack.worker_totals("glad_duplicate_answers_total"),
    )


async def with_action(stack: Stack, body: bytes, action) -> list[Answer]:
    """Requests from 8 clients from 2 s before `action` (run in a thread) to 3 s after it:
    the load spans the fault however fast the service answers."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(load(stack.base, 0, 8, body, stop))
    await asyncio.sleep(2.0)
    await asyncio.to_thread(action)
    await asyncio.sleep(3.0)
    stop.set()
    return await task


def disrupted(stack: Stack, body: bytes, name: str, action) -> Row:
    """Requests around `action` (see with_action); p99 over all requests."""
    before = snapshot(stack)
    answers = asyncio.run(with_action(stack, body, action))
    time.sleep(3)  # a resumed worker finishes its batch and answers, too late
    row = tally(Row(name), answers, stack, before)
    row.p99_s = p99([a.seconds for a in answers])
    row.note = "p99 over all requests"
    return row


def kill_one(stack: Stack, body: bytes) -> Row:
    row = disrupted(stack, body, "kill-one", stack.workers[-1][0].kill)
    row.note += "; ran_unanswered misses the killed worker's counters"
    stack.start_worker()
    stack.wait_workers(2)
    return row


def kill_both(stack: Stack, body: bytes) -> Row:
    def kill_then_restart() -> None:
        for process, _ in stack.workers:
            if process.poll() is None:
                process.kill()
        time.sleep(5)
        stack.start_worker()

    row = disrupted(stack, body, "kill-both, one back after 5 s", kill_then_restart)
    row.note += "; ran_unanswered misses the killed workers' counters"
    stack.start_worker()
    stack.wait_workers(2)
    return row


def pause(stack: Stack, body: bytes) -> Row:
    paused = stack.workers[-1][0]

    def stop_and_continue() -> None:
        paused.send_signal(signal.SIGSTOP)
        time.sleep(12)
        paused.send_signal(signal.SIGCONT)

    return disrupted(stack, body, "pause-12s", stop_and_continue)


def redis_restart(stack: Stack, body: bytes) -> Row:
    before = snapshot(stack)
    recovery: list[float] = []
    probed: list[Answer] = []  # the request that found the service back

    def kill_restart_and_probe() -> None:
        assert stack.redis is not None
        stack.redis.kill()
        stack.redis.wait()
        time.sleep(5)
        stack.start_redis()
        restarted = time.monotonic()
        # Recovery: from Redis answering again to the first 200 of a request sent after it.
        while time.monotonic() - restarted < 60:
            began = time.perf_counter()
            try:
                response = httpx.post(
                    f"{stack.base}/inspect/{PRODUCT}?heatmap=none",
                    content=body,
                    headers={"Content-Type": "image/png"},
                    timeout=CLIENT_TIMEOUT_S,
                )
                if response.status_code == 200:
                    recovery.append(time.monotonic() - restarted)
                    probed.append(Answer(200, time.perf_counter() - began))
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    answers = asyncio.run(with_action(stack, body, kill_restart_and_probe))
    stack.wait_workers(2)
    time.sleep(2)
    row = tally(Row("redis-restart after 5 s"), answers + probed, stack, before)
    row.p99_s = p99([a.seconds for a in answers])
    row.recovery_s = recovery[0] if recovery else None
    row.note = "p99 over all requests; recovery: restart to the first new 200"
    return row


def database_restart(stack: Stack, body: bytes) -> Row:
    """PostgreSQL stopped under load and started 5 s later: every inspection is answered,
    and every answer's record is written once the database is back."""
    database = stack.database
    assert database is not None  # main starts one for this scenario
    before = snapshot(stack)
    waiting: list[float] = []
    drained: list[float] = []

    def stop_watch_and_start() -> None:
        database.stop()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            waiting.append(api_gauge(stack, "glad_records_waiting"))
            time.sleep(0.5)
        database.start()
        # Recovery, under the same load: from the database back to the buffer written.
        restarted = time.monotonic()
        Stack._wait(lambda: api_gauge(stack, "glad_records_waiting") == 0, "the records", 120)
        drained.append(time.monotonic() - restarted)

    dropped = api_gauge(stack, "glad_records_dropped_total")
    answers = asyncio.run(with_action(stack, body, stop_watch_and_start))
    Stack._wait(lambda: api_gauge(stack, "glad_records_waiting") == 0, "the records", 120)
    row = tally(Row("database-restart after 5 s"), answers, stack, before)
    row.p99_s = p99([a.seconds for a in answers])
    ids = [a.inspection_id for a in answers if a.inspection_id is not None]
    written = recorded(database.url, ids)
    row.recovery_s = drained[0]
    row.note = (
        f"records of the {len(ids)} answers: {written} written, {len(ids) - written} lost, "
        f"{api_gauge(stack, 'glad_records_dropped_total') - dropped:.0f} dropped past the "
        f"buffer; at most {np.nanmax(waiting):.0f} waited while the database was down; "
        "p99 over all requests; recovery: the database back to the buffer written"
    )
    return row


def api_gauge(stack: Stack, name: str) -> float:
    """A sample of the API's /metrics; NaN while the API does not answer."""
    try:
        return metric(httpx.get(f"{stack.base}/metrics", timeout=5).text, name)
    except httpx.HTTPError:
        return float("nan")


def recorded(url: str, ids: list[str]) -> int:
    """How many of these inspections the database holds."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                select(func.count())
                .select_from(table("inspections", column("id")))
                .where(column("id").in_(ids))
            )
            return int(found.scalar_one())
    finally:
        engine.dispose()


def start_probe(stack: Stack, body: bytes, count: int) -> subprocess.Popen:
    """benchmarks.probe in its own process: one request at a time, timed there."""
    image = stack.scratch / "probe.png"
    image.write_bytes(body)
    url = f"{stack.base}/inspect/{PRODUCT}?heatmap=none"
    command = [sys.executable, "-m", "benchmarks.probe", url, str(image), "--count", str(count)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def probe_answers(probe: subprocess.Popen) -> list[Answer]:
    out, _ = probe.communicate(timeout=300)
    return [Answer(a["status"], a["seconds"]) for a in json.loads(out)]


def flood(stack: Stack, body: bytes) -> Row:
    before = snapshot(stack)
    probe = start_probe(stack, body, 150)

    async def until_the_probe_is_done() -> list[Answer]:
        stop = asyncio.Event()
        flooding = asyncio.ensure_future(load(stack.base, 0, 64, body, stop))
        await asyncio.to_thread(probe.wait)
        stop.set()
        return await flooding

    answers = asyncio.run(until_the_probe_is_done())
    probed = probe_answers(probe)
    row = tally(Row("flood, 64 clients, MAX_QUEUE 16"), answers + probed, stack, before)
    refused = [a.seconds for a in probed if a.status == 429]
    row.p99_s = p99(refused)
    crowd = p99([a.seconds for a in answers if a.status == 429]) or 0.0
    row.note = (
        f"p99 of the 429 answers to a client in its own process ({len(refused)} of its "
        f"{len(probed)} requests); the 64 flood clients, sharing one event loop in the load "
        f"generator, measured {crowd:.2f} s for theirs"
    )
    return row


def _open_stalled(host: str, port: int, count: int) -> list[tuple[socket.socket, float]]:
    """Connections that declare a 100 kB body and send 100 bytes; each with its open time."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=60)
        sock.sendall(
            f"POST /inspect/{PRODUCT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
            + b"\0" * 100
        )
        opened.append((sock, time.monotonic()))
    return opened


def _watch_closes(
    opened: list[tuple[socket.socket, float]], limit_s: float
) -> tuple[list[float], Counter[str]]:
    """Read every connection until the server closes it: each one's seconds from its opening
    to its close, and the status it was answered (or "open" when still open at limit_s)."""
    selector = selectors.DefaultSelector()
    heads: dict[socket.socket, bytes] = {}
    for sock, began in opened:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, began)
        heads[sock] = b""
    lifetimes: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + limit_s
    while heads and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                heads[sock] += chunk
                continue
            lifetimes.append(time.monotonic() - key.data)
            statuses[heads.pop(sock)[9:12].decode() or "closed"] += 1
            selector.unregister(sock)
            sock.close()
    statuses["open"] += len(heads)
    for sock in heads:
        sock.close()
    return lifetimes, statuses


def _stalled_connections(port: int, count: int, limit_s: float) -> tuple[list[float], Counter[str]]:
    """_open_stalled then _watch_closes; run in a process of its own, as a slow client is on
    a host of its own, so that its work does not hold up the normal clients' event loop."""
    return _watch_closes(_open_stalled("127.0.0.1", port, count), limit_s)


async def _timed_load(base: str, body: bytes, seconds: float) -> list[Answer]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await load(base, 0, 4, body, stop)


def stalled_bodies(stack: Stack, body: bytes, count: int = 500, rounds: int = 3) -> Row:
    """Normal clients for as long as the stalled connections live (their arrival and their
    408s), against the same clients alone for as long just before; in `rounds` rounds, as
    this host's speed drifts. The row's p99 is the median round's."""
    span_s = BODY_TIMEOUT_S + 4

    async def beside(
        slow: ProcessPoolExecutor,
    ) -> tuple[list[Answer], tuple[list[float], Counter[str]]]:
        normal = asyncio.ensure_future(_timed_load(stack.base, body, span_s))
        watched = asyncio.get_running_loop().run_in_executor(
            slow, _stalled_connections, stack.api_port, count, BODY_TIMEOUT_S + 30
        )
        return await normal, await watched

    before = snapshot(stack)
    answers: list[Answer] = []
    lifetimes: list[float] = []
    statuses: Counter[str] = Counter()
    seen: list[tuple[float, float, int, int]] = []  # p99 beside, alone; their answers
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as slow:
        slow.submit(time.monotonic).result()  # started and imported before the load begins
        for _ in range(rounds):
            alone = asyncio.run(_timed_load(stack.base, body, span_s))
            round_answers, (round_lifetimes, round_statuses) = asyncio.run(beside(slow))
            answers += alone + round_answers
            lifetimes += round_lifetimes
            statuses += round_statuses
            seen.append((p99_of(round_answers), p99_of(alone), len(round_answers), len(alone)))
    # Sent, ok and the rest count the clients' requests alone too.
    row = tally(Row(f"stalled bodies ({count}) beside 4 clients"), answers, stack, before)
    beside_p99, alone_p99, _, _ = sorted(seen, key=lambda r: r[0] / r[1])[len(seen) // 2]
    middle = beside_p99 / alone_p99
    row.p99_s = beside_p99
    row.recovery_s = max(lifetimes, default=None)
    rounds_note = "; ".join(f"{b:.2f} vs {a:.2f} s, {n} vs {m} answers" for b, a, n, m in seen)
    row.note = (
        f"stalled connections answered {dict(statuses)} ({rounds} rounds of {count}), each "
        f"closed {min(lifetimes, default=0):.1f} to {max(lifetimes, default=0):.1f} s after "
        f"it opened (BODY_TIMEOUT_S {BODY_TIMEOUT_S:g}); p99 of the normal clients over "
        f"{span_s:g} s beside them against alone just before, per round: {rounds_note}; "
        f"median ratio {middle:.2f}"
    )
    return row


def large_images(stack: Stack, body: bytes, count: int = 8, clients: int = 7) -> Row:
    """`count` 6000 x 6000 PNGs posted at once, beside `clients` normal clients that run
    until the last is answered; against the same clients alone for as long."""
    big = Image.new("RGB", (6000, 6000), (90, 90, 90))
    big.paste(part_image(3, 600).resize((6000, 6000), Image.Resampling.NEAREST))
    large = png(big)

    async def post_large(http: httpx.AsyncClient) -> Answer:
        began = time.perf_counter()
        response = await http.post(
            f"/inspect/{PRODUCT}", content=large, headers={"Content-Type": "image/png"}
        )
        return Answer(response.status_code, time.perf_counter() - began)

    async def beside() -> tuple[list[Answer], list[Answer], float]:
        stop = asyncio.Event()
        normal = asyncio.ensure_future(load(stack.base, 0, clients, body, stop))
        began = time.perf_counter()
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(
            base_url=stack.base, timeout=CLIENT_TIMEOUT_S, limits=limits
        ) as http:
            bigs = await asyncio.gather(*(post_large(http) for _ in range(count)))
        span_s = time.perf_counter() - began
        stop.set()
        return await normal, list(bigs), span_s

    async def alone_for(seconds: float) -> list[Answer]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        return await load(stack.base, 0, clients, body, stop)

    idle = stack.memory_mib()
    before = snapshot(stack)
    normal, bigs, span_s = asyncio.run(beside())
    time.sleep(5)
    after = stack.memory_mib()
    alone = asyncio.run(alone_for(span_s))
    # Sent, ok and the rest count the clients' requests alone too.
    row = tally(
        Row(f"large images ({count} x 6000 px at once) beside {clients} clients"),
        normal + bigs + alone,
        stack,
        before,
    )
    row.p99_s = p99_of(normal)
    row.note = (
        f"p99 of the normal clients ({len(normal)} answers in {span_s:.0f} s); alone after "
        f"it for as long {p99_of(alone):.2f} s ({len(alone)}); {len(large) // 1000} kB PNGs, "
        f"their p50 {np.median([a.seconds for a in bigs]):.1f} s; RSS idle -> 5 s after: "
        + ", ".join(f"{name} {idle[name]:.0f} -> {after[name]:.0f} MiB" for name in idle)
    )
    return row


def soak(stack: Stack, body: bytes, seconds: float = 300.0, every_s: float = 30.0) -> Row:
    """Four clients for `seconds`, with 100 stalled uploads every `every_s`; each process's
    memory sampled every tenth of that, to see whether it keeps growing."""
    samples: list[tuple[float, dict[str, float]]] = []

    async def run(slow: ProcessPoolExecutor) -> tuple[list[Answer], list[Counter[str]]]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.call_later(seconds, stop.set)
        normal = asyncio.ensure_future(load(stack.base, 0, 4, body, stop))
        began = time.monotonic()
        bursts = []
        while not stop.is_set():
            bursts.append(
                loop.run_in_executor(
                    slow, _stalled_connections, stack.api_port, 100, BODY_TIMEOUT_S + 30
                )
            )
            for _ in range(3):
                samples.append((time.monotonic() - began, stack.memory_mib()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every_s / 3)
        closed = [statuses for _, statuses in await asyncio.gather(*bursts)]
        samples.append((time.monotonic() - began, stack.memory_mib()))
        return await normal, closed

    before = snapshot(stack)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as slow:
        slow.submit(time.monotonic).result()
        answers, closed = asyncio.run(run(slow))
    row = tally(
        Row(f"soak {seconds / 60:g} min, 100 stalled every {every_s:g} s"), answers, stack, before
    )
    row.p99_s = p99_of(answers)

    def at(moment_s: float) -> dict[str, float]:
        return min(samples, key=lambda sample: abs(sample[0] - moment_s))[1]

    warm, middle, end = at(60.0), at(seconds / 2), samples[-1][1]
    memory = ", ".join(
        f"{name} {warm[name]:.0f} -> {middle[name]:.0f} -> {end[name]:.0f} MiB"
        for name in end
        if name in warm and name in middle
    )
    row.note = (
        f"RSS at 1 min -> half-time -> end: {memory}; stalled uploads answered "
        f"{dict(sum(closed, Counter()))}; p99 of the normal clients"
    )
    return row


def markdown(rows: list[Row]) -> str:
    head = (
        "| scenario | sent | ok | lost | duplicates | ran unanswered | statuses | p99 s | "
        "recovery s | note |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        cells = [
            r.scenario,
            r.sent,
            r.ok,
            r.lost,
            r.duplicates,
            r.ran_unanswered,
            " ".join(f"{k}:{v}" for k, v in r.statuses.items()),
            "-" if r.p99_s is None else f"{r.p99_s:.2f}",
            "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
            r.note,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


SCENARIOS = {
    "kill-one": kill_one,
    "kill-both": kill_both,
    "pause": pause,
    "redis-restart": redis_restart,
    "database-restart": database_restart,
    "flood": flood,
    "stalled": stalled_bodies,
    "large": large_images,
    "soak": soak,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a MODEL_DIR holding the demo product")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="some scenarios")
    parser.add_argument("--out", type=Path, default=RESULTS, help="table path, no suffix")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("faults: needs redis-server on PATH", file=sys.stderr)
        return 2
    chosen = args.only or list(SCENARIOS)
    database: PostgresServer | None = None
    if "database-restart" in chosen:
        if postgres_bin() is None:
            print("faults: database-restart needs PostgreSQL (make postgres)", file=sys.stderr)
            return 2
        database = PostgresServer()
    with tempfile.TemporaryDirectory(prefix="glad-faults-") as folder:
        scratch = Path(folder)
        models = args.models or demo_models(scratch)
        stack = Stack(scratch, models, database=database)
        rows: list[Row] = []
        try:
            if database is not None:
                database.start()
            stack.start_redis()
            stack.start_api()
            for _ in range(2):
                stack.start_worker()
            stack.wait_workers(2)
            body = png(with_defect(part_image(7)))
            for name in chosen:
                rows.append(SCENARIOS[name](stack, body))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            stack.stop()
            if database is not None:
                database.stop()
                database.remove()
    table = markdown(rows)
    write_table(args.out, {"rows": [r.__dict__ for r in rows]}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
