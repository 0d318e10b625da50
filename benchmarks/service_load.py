"""Load test for a running glad-inspect service on this machine.

N concurrent clients post the same part image for T seconds; prints throughput,
latency percentiles, errors and the mean batch size the workers formed (from the
Prometheus metrics before and after the run).

    python benchmarks/service_load.py --url http://127.0.0.1:8000 --product widget \\
        --clients 8 --seconds 20
    # Redis mode: batch sizes live on the workers' metrics port
    python benchmarks/service_load.py --worker-metrics http://127.0.0.1:9100/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS = 256
MAX_SECONDS = 600


def part_png(size: int) -> bytes:
    """A synthetic grey part with a little noise, as PNG."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.36 * size) ** 2
    grey = np.where(disc, 150.0, 40.0) + rng.normal(0, 4, (size, size))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def batch_totals(texts: list[str], product: str) -> tuple[float, float]:
    """(sum, count) of glad_batch_size for the product over several metric pages."""
    total = count = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("product") != product:
                    continue
                if sample.name == "glad_batch_size_sum":
                    total += sample.value
                elif sample.name == "glad_batch_size_count":
                    count += sample.value
    return total, count


async def scrape(client: httpx.AsyncClient, urls: list[str]) -> list[str]:
    return [(await client.get(url)).text for url in urls]


@dataclass(frozen=True)
class LoadResult:
    seconds: float
    ok: int
    statuses: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) - self.ok

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


async def measure(
    url: str,
    body: bytes,
    clients: int,
    seconds: float,
    metric_urls: list[str],
    product: str,
    headers: dict[str, str],
    timeout: float = 60.0,
) -> LoadResult:
    """`clients` concurrent clients posting `body` to `url` for `seconds`."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        before = batch_totals(await scrape(client, metric_urls), product)
        stop_at = time.perf_counter() + seconds

        async def one_client() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    answer = await client.post(url, content=body, headers=headers)
                    status = str(answer.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if status == "200":
                    latencies.append(time.perf_counter() - started)
                statuses[status] += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
        after = batch_totals(await scrape(client, metric_urls), product)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else float("nan")
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p95, p99 = (cuts[i - 1] * 1000 for i in (50, 95, 99))
    else:
        p50 = p95 = p99 = float("nan")
    ok = statuses.get("200", 0)
    return LoadResult(elapsed, ok, dict(statuses), p50, p95, p99, mean_batch)


async def run(args: argparse.Namespace) -> int:
    body = Path(args.image).read_bytes() if args.image else part_png(args.size)
    headers = {"Content-Type": "image/png"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    url = f"{args.url}/inspect/{args.product}?heatmap={args.heatmap}"
    metric_urls = args.worker_metrics or [f"{args.url}/metrics"]
    r = await measure(
        url, body, args.clients, args.seconds, metric_urls, args.product, headers, args.timeout
    )
    others = dict(Counter(r.statuses) - Counter({"200": r.ok}))
    rows = [
        ("clients", f"{args.clients}"),
        ("duration_s", f"{r.seconds:.1f}"),
        ("requests_ok", f"{r.ok}"),
        ("errors", f"{r.errors} {others or ''}".strip()),
        ("throughput_rps", f"{r.throughput:.2f}"),
        ("latency_p50_ms", f"{r.p50_ms:.0f}"),
        ("latency_p95_ms", f"{r.p95_ms:.0f}"),
        ("latency_p99_ms", f"{r.p99_ms:.0f}"),
        ("mean_batch_size", f"{r.mean_batch:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if r.errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (loopback)")
    parser.add_argument("--product", default="widget")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--image", help="PNG to send (default: a synthetic part)")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic part")
    parser.add_argument("--heatmap", choices=["overlay", "map", "none"], default="overlay")
    parser.add_argument("--api-key")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument(
        "--worker-metrics",
        action="append",
        help="a worker's metrics URL (Redis mode; repeat per worker); default: URL/metrics",
    )
    args = parser.parse_args()
    hosts = [urlsplit(u).hostname for u in [args.url, *(args.worker_metrics or [])]]
    if any(host not in LOOPBACK for host in hosts):
        parser.error("only a service on this machine (loopback) may be load-tested")
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds 0..{MAX_SECONDS}")
    args.url = args.url.rstrip("/")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
