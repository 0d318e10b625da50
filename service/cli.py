"""The `glad` command: the model commands, plus `serve` (the API) and `worker`.

Only the commands that run models import PyTorch: `glad serve` with REDIS_URL set is the API
alone and never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server

from model.cli import add_model_commands
from service import imaging
from service.app import PACKAGE, create_app
from service.client import InspectionClient, InspectionError, heatmap_png
from service.media import MediaStore
from service.metrics import WorkerMetrics, multiprocess_dir
from service.records import RecordStore, ReviewLabel
from service.redis_queue import RedisBackend
from service.review_export import export_reviewed
from service.settings import Settings

log = logging.getLogger("glad")

# How long uvicorn gives each API process to start before it kills it (its default, 5 s,
# is too short on a busy machine).
API_PROCESS_START_S = 60


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _serve_processes(settings: Settings) -> None:
    """Several uvicorn processes; each builds its own app from the environment."""
    with contextlib.ExitStack() as stack:
        if not multiprocess_dir():
            # Counters of all API processes are merged from files in this folder.
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="glad-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.api_workers,
            log_level=settings.log_level,
            limit_concurrency=settings.max_connections,
            timeout_worker_healthcheck=API_PROCESS_START_S,
        )


def run_serve(args: argparse.Namespace) -> int:
    # Flags override the environment; children of a multi-worker uvicorn read it too.
    for name in ("host", "port", "api_workers"):
        value = getattr(args, name)
        if value is not None:
            os.environ[name.upper()] = str(value)
    settings = Settings()
    _configure_logging(settings)
    if settings.embedded and settings.api_workers > 1:
        print(
            "glad serve: several API workers need a shared queue; set REDIS_URL "
            "(embedded mode runs one process)",
            file=sys.stderr,
        )
        return 2
    if settings.api_workers > 1:
        _serve_processes(settings)
        return 0
    mode = f"Redis at {settings.redis_url}" if settings.redis_url else "embedded (no Redis)"
    log.info("serving on http://%s:%d, queue: %s", settings.host, settings.port, mode)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        limit_concurrency=settings.max_connections,
    )
    return 0


async def _work(settings: Settings, redis_url: str) -> None:
    from service.worker import POLL_MS, Worker  # brings PyTorch

    registry = CollectorRegistry()
    server, _ = start_http_server(settings.worker_metrics_port, registry=registry)
    log.info("worker metrics on port %d", server.server_port)
    longest_wait_s = max(POLL_MS, settings.max_wait_ms) / 1000
    backend = RedisBackend.open(redis_url, settings.key_prefix, settings.max_queue, longest_wait_s)
    worker = Worker(settings, backend.queue, backend.presence, WorkerMetrics(registry))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await backend.close()
        server.shutdown()


def run_worker(args: argparse.Namespace) -> int:
    settings = Settings()
    _configure_logging(settings)
    if not settings.redis_url:
        print(
            "glad worker: set REDIS_URL (glad serve alone runs an embedded worker)", file=sys.stderr
        )
        return 2
    imaging.limit_decoder(settings.max_pixels)
    # Before PyTorch starts its threads, so that they all inherit it.
    os.nice(settings.worker_nice)
    log.info(
        "worker serving %s on %s from %s", settings.model_dir, settings.device, settings.redis_url
    )
    asyncio.run(_work(settings, settings.redis_url))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Send each file to the service; one line per file, exit 2 if any was not answered."""
    api_key = os.environ.get("API_KEY") if args.api_key is None else args.api_key
    heatmap = "overlay" if args.heatmaps else "none"
    if args.heatmaps:
        args.heatmaps.mkdir(parents=True, exist_ok=True)
    failures = 0
    with InspectionClient(args.url, api_key, args.deadline) as client:
        for path in args.files:
            try:
                result = client.inspect(args.product, path, heatmap)
            except (InspectionError, OSError, ValueError) as error:
                print(f"{path}: error: {error}", file=sys.stderr)
                failures += 1
                continue
            if args.json:
                print(json.dumps({"file": str(path), **result.model_dump(exclude={"heatmap"})}))
            else:
                verdict = "ANOMALOUS" if result.is_anomalous else "normal"
                print(
                    f"{path}: {verdict}  score {result.score:.3f} (threshold 0.5; raw "
                    f"{result.raw_score:.4f} against {result.threshold:.4f})  denoise step "
                    f"{result.denoise_step}  {result.timings.total_s * 1000:.0f} ms"
                )
            png = heatmap_png(result)
            if args.heatmaps and png is not None:
                (args.heatmaps / f"{path.stem}.heatmap.png").write_bytes(png)
    return 2 if failures else 0


def run_review_export(args: argparse.Namespace) -> int:
    settings = Settings()
    store = RecordStore(settings.database)
    media = MediaStore(settings.media_dir, settings.keep_images, 0, 0)
    try:
        store.migrate()
        done = export_reviewed(store, media, args.product, ReviewLabel(args.label), args.out)
    finally:
        store.close()
    print(
        f"glad review export: {done.written} {args.label} images of {args.product} in "
        f"{args.out}; {done.without_image} reviewed without a kept image"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glad",
        description="GLAD visual inspection: train and evaluate models, serve them.",
        epilog="Service settings come from the environment; see the README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version(PACKAGE)}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_model_commands(commands)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP API (with REDIS_URL unset: also an embedded worker)",
        description=(
            "Run the inspection API. Without REDIS_URL it also loads every product under "
            "MODEL_DIR and serves it from an in-memory queue in this one process; with "
            "REDIS_URL it is the API alone and `glad worker` processes do the inference."
        ),
    )
    serve.add_argument("--host", help="listen address (HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (PORT, default 8000)")
    serve.add_argument(
        "--workers", dest="api_workers", type=int, help="API processes (API_WORKERS; needs Redis)"
    )
    serve.set_defaults(handler=run_serve)

    worker = commands.add_parser(
        "worker",
        help="run an inference worker on the Redis queue (needs REDIS_URL)",
        description=(
            "Load every product folder under MODEL_DIR on DEVICE and answer the requests "
            "queued in Redis at REDIS_URL, in batches. Run one per GPU, on any host."
        ),
    )
    worker.set_defaults(handler=run_worker)

    inspect = commands.add_parser(
        "inspect",
        help="send images to a running service and print the verdicts",
        description="Inspect image files through the service's API, one after another, "
        "retrying a full queue or a missing worker until --deadline.",
    )
    inspect.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    inspect.add_argument("product", help="the product line, e.g. demo")
    inspect.add_argument("files", nargs="+", type=Path, help=f"{imaging.FORMAT_NAMES} files")
    inspect.add_argument("--api-key", help="the service's API key (default: $API_KEY)")
    inspect.add_argument(
        "--deadline", type=float, default=30.0, help="seconds per image, retries included"
    )
    inspect.add_argument("--heatmaps", type=Path, help="write each heatmap overlay here")
    inspect.add_argument("--json", action="store_true", help="one JSON line per image")
    inspect.set_defaults(handler=run_inspect)

    review = commands.add_parser(
        "review", help="operators' reviews of recorded inspections"
    ).add_subparsers(dest="review_command", required=True)
    export = review.add_parser(
        "export",
        help="write reviewed parts' images for training or evaluation",
        description="False alarms go to OUT as good images (glad train --extra-good OUT); "
        "confirmed defects to OUT/test/defect/ (the MVTec test layout). Reads the records "
        "where the service keeps them: DATABASE_URL, or the SQLite file under DATA_DIR.",
    )
    export.add_argument("--product", required=True, help="the product line")
    export.add_argument("--label", required=True, choices=[label.value for label in ReviewLabel])
    export.add_argument("--out", type=Path, required=True, help="the folder to write")
    export.set_defaults(handler=run_review_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before PyTorch loads: how long its OpenMP threads (GNU OpenMP) spin waiting for work
    # before they sleep. Measured on 2 cores: spinning without a bound (the default) took
    # the cores from other work (the demo trained in 71 s beside two busy processes, 25 s
    # not spinning), and not spinning at all cut inference nearly in half on an idle
    # machine (the demo model at batch 8: 40 images/s, 74 spinning). 10,000 spins kept
    # both: 71 images/s idle, 29 s beside the busy processes.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
