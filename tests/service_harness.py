"""What the service tests share: a real uvicorn server, worker processes, Redis clean-up."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import uvicorn
from fastapi import FastAPI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.images import part_image

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_redis_command(port: int, folder: Path) -> list[str]:
    """A loopback redis-server that keeps an append-only file in folder, synced at every
    write: for tests and benchmarks that kill and restart their own Redis."""
    return [
        "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
        *("--dir", str(folder)),
    ]


def png(image: Image.Image | None = None, seed: int = 0) -> bytes:
    """A small part image as PNG bytes."""
    buffer = io.BytesIO()
    (image or part_image(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(done: Callable[[], bool], what: str, limit_s: float = 30) -> None:
    """Polls done() every 50 ms; fails the test naming `what` after limit_s."""
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, f"waited {limit_s} s in vain for {what}"
        time.sleep(0.05)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run the app on a real loopback socket in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own for one test module; its keys are deleted afterwards."""
    prefix = f"glad-test-{uuid.uuid4().hex[:10]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


class WorkerProcess:
    """`glad worker` as a subprocess, with its own metrics port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT,
            env={**os.environ, **env, "WORKER_METRICS_PORT": str(self.metrics_port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
