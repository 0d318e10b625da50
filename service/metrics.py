"""Every Prometheus metric of the service, and how a scrape is rendered.

The metric objects live on per-process objects built at start-up (not at import), so
tests can build several apps. With PROMETHEUS_MULTIPROC_DIR set (several uvicorn
workers), prometheus_client backs counters and histograms with files in that folder
and a scrape merges them; the queue depth is read from the backend at scrape time,
so it is right whichever process answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class ApiMetrics:
    """What the API records per request."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "glad_requests",
            "Inspection requests answered, by product and HTTP status.",
            ["product", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "glad_request_duration_seconds",
            "Time from receiving an inspection request to answering it.",
            ["product"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "glad_queue_wait_seconds",
            "Time a request spent queued or in transit, not being worked on.",
            ["product"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class RecordMetrics:
    """The record of inspections: written, waiting in the buffer, dropped; reviews."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.written = Counter(
            "glad_records_written", "Inspection records written to the database.", registry=registry
        )
        self.dropped = Counter(
            "glad_records_dropped",
            "Inspection records dropped because the buffer was full (the database was slow or "
            "down for too long).",
            registry=registry,
        )
        self.waiting = Gauge(
            "glad_records_waiting",
            "Inspection records in the buffer, not yet written.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.reviews = Counter(
            "glad_reviews", "Reviews of inspections, by label.", ["label"], registry=registry
        )


class VerdictMetrics:
    """Verdicts published on the plant's MQTT bus."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.published = Counter(
            "glad_verdicts_published",
            "Verdicts the MQTT broker acknowledged.",
            registry=registry,
        )
        self.dropped = Counter(
            "glad_verdicts_dropped",
            "Verdicts dropped because the MQTT outbox was full (the broker was down for too long).",
            registry=registry,
        )
        self.waiting = Gauge(
            "glad_verdicts_waiting",
            "Verdicts in the MQTT outbox, not yet acknowledged by the broker.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connected = Gauge(
            "glad_mqtt_connected",
            "1 while connected to the MQTT broker.",
            registry=registry,
            multiprocess_mode="livemin",
        )


class WorkerMetrics:
    """What a worker records per batch and per part."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.inference_duration = Histogram(
            "glad_inference_duration_seconds",
            "Model inference time per batch.",
            ["product"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "glad_batch_size",
            "Images per inference batch.",
            ["product"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.denoise_step = Histogram(
            "glad_denoise_step",
            "ADS denoising step chosen per part (0 = never flagged).",
            ["product"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.inspected = Counter(
            "glad_inspected_parts",
            "Parts inspected.",
            ["product"],
            registry=registry,
        )
        self.anomalous = Counter(
            "glad_anomalous_parts",
            "Parts found anomalous.",
            ["product"],
            registry=registry,
        )
        self.dead_letter = Counter(
            "glad_dead_letter",
            "Queue entries moved to the dead-letter stream after too many deliveries.",
            ["product"],
            registry=registry,
        )
        self.duplicate_answers = Counter(
            "glad_duplicate_answers",
            "Answers dropped because the job had been answered already (by a worker that took "
            "it over while this one was presumed dead).",
            ["product"],
            registry=registry,
        )
        self.model_info = Gauge(
            "glad_model_info",
            "The model a worker serves for a product (always 1).",
            ["product", "version", "image_size", "preset"],
            registry=registry,
            multiprocess_mode="liveall",
        )


class QueueDepthCollector:
    """glad_queue_depth from a snapshot taken just before the scrape."""

    def __init__(self, depths: Mapping[str, int]) -> None:
        self.depths = depths

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "glad_queue_depth", "Requests queued or in flight, per product.", labels=["product"]
        )
        for product, depth in sorted(self.depths.items()):
            family.add_metric([product], depth)
        yield family


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess folder, when several processes share metrics."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render(registries: Iterable[CollectorRegistry], depths: Mapping[str, int]) -> bytes:
    """The text exposition of the given registries plus the queue depth."""
    scrape = CollectorRegistry()
    scrape.register(QueueDepthCollector(depths))
    parts = [generate_latest(scrape)]
    if multiprocess_dir():
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        parts.append(generate_latest(merged))
    else:
        parts.extend(generate_latest(registry) for registry in registries)
    return b"".join(parts)
