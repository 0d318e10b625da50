"""The whole service path beside the model alone, measured in one run: images/s and latency
of N clients through the API, the queue, a worker and the heatmaps, then
Inspector.inspect's images/s at the batch size the worker formed (one call at a time, and
as the worker runs it: INFERENCE_LANES calls at once), and the CPU cost per image of the
steps around the model.

Embedded mode is one `glad serve`; Redis mode is a redis-server of its own, one API and one
worker. Both record every answer, as the service does by default (an SQLite file in the
scratch folder); `embedded-unrecorded` is embedded mode with RECORD=0, what recording costs.
The service and the model alone run one after the other, never together.

    python -m benchmarks.service_throughput                    # CPU, the demo model
    python -m benchmarks.service_throughput --device cuda --models MODEL_DIR --product P

Writes benchmarks/results/service-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks.faults import PRODUCT, Stack, demo_models
from benchmarks.service_load import LoadResult, measure
from benchmarks.tables import write_table
from model.demo import part_image
from model.inspector import Inspector
from service import imaging
from service.heatmap import HeatmapKind, render
from service.registry import cpu_inference_threads
from service.settings import Settings
from tests.service_harness import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Embedded mode with RECORD=0: what recording every answer costs, beside "embedded".
UNRECORDED = "embedded-unrecorded"
DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass
class Row:
    device: str
    mode: str
    batch: int  # MAX_BATCH; the inspector runs at the mean batch the worker formed
    clients: int
    rounds: int
    service_images_per_s: float
    inspector_images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    errors: int
    ratio: float  # service over inspector
    # The inspector as the worker runs it: `lanes` batches at once (INFERENCE_LANES), on
    # the CPU each with the worker's PyTorch threads (service.registry.cpu_inference_threads);
    # the service over that.
    lanes: int = 1
    inspector_lanes_images_per_s: float | None = None
    ratio_lanes: float | None = None
    # CPU the load generator (in this process, on the same cores) spent per image answered.
    clients_cpu_ms_per_image: float | None = None


def real_part_png(size: int) -> bytes:
    """A real part at `size` px where the datasets are here, else a generated one."""
    found = sorted(DATASETS.glob("*/test/good/*.png"))
    image = Image.open(found[0]).convert("RGB") if found else part_image(0, size)
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def _wait(url: str, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {limit_s} s")


class ModelAlone:
    """The product's Inspector in this process, without the service: Inspector.inspect's
    images/s one call at a time (PyTorch's default threads) and as the worker runs it
    (INFERENCE_LANES calls at once, on the CPU each with the worker's threads)."""

    def __init__(self, folder: Path, device: str) -> None:
        self.inspector = Inspector.load(folder, device)
        self.lanes = Settings(device=device).lanes
        self.threads = cpu_inference_threads(self.lanes) if device == "cpu" else None
        self.image = Image.open(io.BytesIO(real_part_png(256))).convert("RGB")

    def rates(self, batch: int, seconds: float) -> tuple[float, float | None]:
        alone = self._images_per_s(batch, seconds, 1, None)
        if self.lanes == 1 and self.threads is None:
            return alone, None
        return alone, self._images_per_s(batch, seconds, self.lanes, self.threads)

    def _images_per_s(self, batch: int, seconds: float, lanes: int, threads: int | None) -> float:
        default_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            if lanes == 1:
                return self._lane(batch, seconds)
            with ThreadPoolExecutor(lanes) as pool:
                return sum(pool.map(lambda _: self._lane(batch, seconds), range(lanes)))
        finally:
            torch.set_num_threads(default_threads)

    def _lane(self, batch: int, seconds: float) -> float:
        images = [self.image] * batch
        self.inspector.inspect(images)  # warm-up
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            self.inspector.inspect(images)
            done += batch
        return done / (time.perf_counter() - began)


@dataclass
class Round:
    """One load period and the model alone measured right after it, the service idle."""

    load: LoadResult
    clients_cpu_ms: float
    alone: float
    in_lanes: float | None


def _rounds(
    base: str, metric_urls: list[str], args: argparse.Namespace, body: bytes, model: ModelAlone
) -> list[Round]:
    """Load and model alone in turn: on a shared host the cores' speed drifts over a minute,
    so each ratio is of figures taken seconds apart, and the row gives their medians."""
    url = f"{base}/inspect/{args.product}?heatmap={args.heatmap}"
    headers = {"Content-Type": "image/png"}
    asyncio.run(measure(url, body, args.clients, 3.0, metric_urls, args.product, headers))
    rounds = []
    for _ in range(args.rounds):
        run = measure(url, body, args.clients, args.seconds, metric_urls, args.product, headers)
        # The clients share this machine's cores with the service: what they took is told.
        cpu_before = time.process_time()
        load = asyncio.run(run)
        clients_cpu_ms = (time.process_time() - cpu_before) * 1000 / max(load.ok, 1)
        batch = max(1, round(load.mean_batch)) if load.mean_batch == load.mean_batch else 1
        alone, in_lanes = model.rates(batch, args.model_seconds)
        rounds.append(Round(load, clients_cpu_ms, alone, in_lanes))
    return rounds


def embedded(args: argparse.Namespace, env: dict[str, str], body: bytes, model: ModelAlone):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env={**env, "PORT": str(port)}
    )
    try:
        _wait(f"{base}/readyz")
        return _rounds(base, [f"{base}/metrics"], args, body, model)
    finally:
        server.terminate()
        server.wait(30)


def redis_mode(
    args: argparse.Namespace, env: dict[str, str], body: bytes, scratch: Path, model: ModelAlone
):
    stack = Stack(scratch, Path(env["MODEL_DIR"]), args.product)
    stack.env.update(env)
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker()
        stack.wait_workers(1)
        worker_metrics = [f"http://127.0.0.1:{port}/metrics" for _, port in stack.workers]
        return _rounds(stack.base, worker_metrics, args, body, model)
    finally:
        stack.stop()


def row(args: argparse.Namespace, mode: str, rounds: list[Round], lanes: int) -> Row:
    """The medians over the rounds; each ratio the median of the rounds' ratios."""
    median = statistics.median
    loads = [r.load for r in rounds]
    # Rounds that measured the model in the worker's lanes as well (all of them, or none).
    laned = [(r.load.throughput, r.in_lanes) for r in rounds if r.in_lanes is not None]
    return Row(
        device=args.device,
        mode=mode,
        batch=args.batch,
        clients=args.clients,
        rounds=len(rounds),
        service_images_per_s=median([load.throughput for load in loads]),
        inspector_images_per_s=median([r.alone for r in rounds]),
        p50_ms=median([load.p50_ms for load in loads]),
        p95_ms=median([load.p95_ms for load in loads]),
        p99_ms=median([load.p99_ms for load in loads]),
        mean_batch=statistics.fmean(load.mean_batch for load in loads),
        errors=sum(load.errors for load in loads),
        ratio=median([r.load.throughput / r.alone for r in rounds]),
        lanes=lanes,
        inspector_lanes_images_per_s=median([rate for _, rate in laned]) if laned else None,
        ratio_lanes=median([service / rate for service, rate in laned]) if laned else None,
        clients_cpu_ms_per_image=median([r.clients_cpu_ms for r in rounds]),
    )


def _median_ms(step: Callable[[], object], repeats: int = 100) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def cpu_costs(body: bytes, max_pixels: int = 40_000_000) -> dict[str, float]:
    """Median ms per image of the steps around the model, on this CPU, one thread."""
    image = imaging.decode(body, max_pixels)
    # The map comes at the model's size (the demo's 64 px) and is drawn at the image's.
    normalised = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    overlay = render(image, normalised, HeatmapKind.overlay) or b""
    return {
        "API, Redis mode: check and decode the upload (imaging.prepare)": _median_ms(
            lambda: imaging.prepare(body, max_pixels, 1024)
        ),
        "API, embedded: read the header (imaging.size)": _median_ms(
            lambda: imaging.size(body, max_pixels)
        ),
        "worker: decode (imaging.decode)": _median_ms(lambda: imaging.decode(body, max_pixels)),
        "worker: overlay heatmap PNG (heatmap.render)": _median_ms(
            lambda: render(image, normalised, HeatmapKind.overlay)
        ),
        "worker: bare map PNG": _median_ms(lambda: render(image, normalised, HeatmapKind.map)),
        "API: base64 of the overlay into JSON": _median_ms(
            lambda: json.dumps({"data": base64.b64encode(overlay).decode()})
        ),
    }


def markdown(rows: list[Row], costs: dict[str, float], size: int) -> str:
    head = (
        "| device | mode | MAX_BATCH | clients | service img/s | inspector img/s | ratio | "
        "inspector img/s, worker's lanes | ratio | p50 ms | p95 ms | p99 ms | mean batch | "
        "errors | clients' CPU ms/img |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lanes = r.inspector_lanes_images_per_s
        cells = [r.device, r.mode, r.batch, r.clients, f"{r.service_images_per_s:.1f}"]
        cells += [f"{r.inspector_images_per_s:.1f}", f"{r.ratio:.2f}"]
        cells += (
            ["-", "-"] if lanes is None else [f"{lanes:.1f} ({r.lanes})", f"{r.ratio_lanes:.2f}"]
        )
        cells += [f"{r.p50_ms:.0f}"]
        cells += [f"{r.p95_ms:.0f}", f"{r.p99_ms:.0f}", f"{r.mean_batch:.2f}", r.errors]
        cells += [
            "-" if r.clients_cpu_ms_per_image is None else f"{r.clients_cpu_ms_per_image:.1f}"
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    rounds = {r.rounds for r in rows}
    lines += [
        "",
        f"Medians of {'/'.join(map(str, sorted(rounds)))} rounds, each a load period followed "
        "by the model alone at the batch the worker formed, the service idle; each ratio is "
        "the median of the rounds' ratios. The number in brackets is INFERENCE_LANES.",
    ]
    lines += ["", f"| CPU cost per {size} px image | median ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in costs.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a MODEL_DIR (default: train the demo)")
    parser.add_argument("--product", default=PRODUCT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--modes", nargs="+", choices=["embedded", UNRECORDED, "redis"], default=None
    )
    parser.add_argument("--batch", type=int, default=8, help="MAX_BATCH")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="load, then model alone, each")
    parser.add_argument("--seconds", type=float, default=10.0, help="of load per round")
    parser.add_argument("--model-seconds", type=float, default=5.0, help="per model figure")
    parser.add_argument("--size", type=int, default=256, help="side of the images posted")
    parser.add_argument("--heatmap", choices=["overlay", "map", "none"], default="overlay")
    parser.add_argument("--out", type=Path, help="table path, no suffix")
    args = parser.parse_args()
    modes = args.modes or ["embedded", UNRECORDED, "redis"]
    out = args.out or RESULTS / f"service-{args.device.split(':')[0]}"
    body = real_part_png(args.size)
    with tempfile.TemporaryDirectory(prefix="glad-throughput-") as folder:
        scratch = Path(folder)
        models = args.models or demo_models(scratch)
        env = {
            **os.environ,
            "MODEL_DIR": str(models),
            # Every answer recorded, as the service does by default, into the scratch folder
            # (in Redis mode too: its one API writes the same kind of SQLite file).
            "DATA_DIR": str(scratch / "data"),
            "DATABASE_URL": f"sqlite:///{scratch / 'data' / 'inspections.db'}",
            "DEVICE": args.device,
            "MAX_BATCH": str(args.batch),
            "MAX_QUEUE": str(max(64, 4 * args.clients)),
            "LOG_LEVEL": "warning",
        }
        env.pop("REDIS_URL", None)
        model = ModelAlone(models / args.product, args.device)
        rows = []
        for mode in modes:
            if mode == "embedded":
                rounds = embedded(args, env, body, model)
            elif mode == UNRECORDED:
                rounds = embedded(args, {**env, "RECORD": "0"}, body, model)
            else:
                rounds = redis_mode(args, env, body, scratch, model)
            rows.append(row(args, mode, rounds, model.lanes))
    costs = cpu_costs(body)
    payload = {"rows": [asdict(r) for r in rows], "cpu_costs_ms": costs, "image_px": args.size}
    table = markdown(rows, costs, args.size)
    write_table(out, payload, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
