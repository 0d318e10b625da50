"""Verdicts on the plant's bus, against a real MQTT broker (Debian's mosquitto) of the
tests' own: what each answer publishes, a broker restart, the outbox's bound, and a broker
that is down."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.app import create_app
from service.metrics import VerdictMetrics
from service.settings import Settings
from service.verdicts import VerdictPublisher, verdict_payload
from tests.images import part_image
from tests.mqtt_broker import MqttBroker, mosquitto_bin
from tests.service_harness import free_port, metric, png, serving, wait_until

pytestmark = pytest.mark.skipif(
    mosquitto_bin() is None, reason="no mosquitto: apt-get install mosquitto (make mqtt)"
)


@pytest.fixture(scope="module")
def broker() -> Iterator[MqttBroker]:
    server = MqttBroker()
    server.start()
    yield server
    server.remove()


class Subscriber:
    """A persistent session (QoS 1) on `<prefix>/#`: the broker keeps what is published
    for it while it is away, and it reconnects by itself."""

    def __init__(self, broker: MqttBroker, prefix: str) -> None:
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex}", clean_session=False
        )
        self.client.on_connect = lambda client, *_: client.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the test subscriber could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def wait_for(self, done: Callable[[list[tuple[str, dict]]], bool]) -> None:
        def arrived() -> bool:
            with self._lock:
                return done(list(self.messages))

        wait_until(arrived, "the verdicts to arrive")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _row(number: int) -> dict[str, object]:
    return {
        "id": f"{number:032x}",
        "request_id": f"request-{number}",
        "time": datetime(2026, 12, 5, 8, 0, number % 60),
        "product": "widget",
        "model_version": "v1",
        "score": 0.5,
        "raw_score": 1.0,
        "threshold": 2.0,
        "is_anomalous": number % 2 == 1,
        "denoise_step": 300,
        "queue_wait_s": 0.001,
        "inference_s": 0.01,
        "total_s": 0.02,
        "part_id": f"SN-{number}",
        "camera_id": None,
        "line_id": None,
        "image_path": "2026-12-05/widget/x.png",
        "heatmap_path": None,
        "media_expired": False,
    }


def test_every_answer_is_published_on_its_products_verdict_topic(
    broker: MqttBroker, tiny_model_dir: Path, tmp_path: Path
) -> None:
    subscriber = Subscriber(broker, "plant1/hall2")
    settings = Settings(
        model_dir=tiny_model_dir,
        data_dir=tmp_path,
        max_wait_ms=0,
        mqtt_url=broker.url,
        mqtt_topic_prefix="plant1/hall2",
    )
    try:
        with serving(create_app(settings)) as base:
            answer = httpx.post(
                f"{base}/inspect/widget",
                content=png(part_image(3)),
                headers={"Content-Type": "image/png", "X-Part-Id": "SN-0001", "X-Line-Id": "L1"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            verdict = answer.json()
            subscriber.wait_for(lambda messages: len(messages) >= 1)
            topic, payload = subscriber.messages[0]
            assert topic == "plant1/hall2/widget/verdict"
            assert payload["id"] == verdict["inspection_id"]
            assert payload["verdict"] == ("anomalous" if verdict["is_anomalous"] else "normal")
            for field in ("request_id", "product", "model_version", "score", "threshold"):
                assert payload[field] == verdict[field], field
            assert (payload["part_id"], payload["line_id"], payload["camera_id"]) == (
                "SN-0001",
                "L1",
                None,
            )
            assert datetime.fromisoformat(payload["time"]).tzinfo is not None
            assert not {"image_path", "heatmap_path", "media_expired"} & payload.keys()

            # The broker's acknowledgement may reach the publisher after the subscriber.
            def published() -> float:
                return metric(httpx.get(f"{base}/metrics").text, "glad_verdicts_published_total")

            wait_until(lambda: published() == 1, "the broker's acknowledgement", 10)
            metrics = httpx.get(f"{base}/metrics").text
            assert metric(metrics, "glad_mqtt_connected") == 1
            assert metric(metrics, "glad_verdicts_waiting") == 0
    finally:
        subscriber.close()


def test_verdicts_wait_out_a_broker_restart(broker: MqttBroker) -> None:
    subscriber = Subscriber(broker, "restart")
    metrics = VerdictMetrics(CollectorRegistry())
    publisher = VerdictPublisher(broker.url, "restart", 100, metrics)
    publisher.start()
    try:
        for number in range(3):
            publisher.publish("widget", _row(number))
        subscriber.wait_for(lambda messages: len(messages) >= 3)
        wait_until(lambda: publisher.waiting == 0, "the first verdicts' acknowledgements", 10)

        broker.stop()
        for number in range(3, 8):
            publisher.publish("widget", _row(number))
        assert publisher.waiting == 5

        broker.start()
        expected = {f"{number:032x}" for number in range(8)}
        # QoS 1 is at least once: a verdict sent as the broker went may come twice.
        subscriber.wait_for(lambda messages: {m["id"] for _, m in messages} >= expected)
        wait_until(lambda: publisher.waiting == 0, "the acknowledgements after the restart", 10)
        assert metrics.dropped._value.get() == 0
        topics = {topic for topic, _ in subscriber.messages}
        assert topics == {"restart/widget/verdict"}
    finally:
        publisher.stop()
        subscriber.close()


def test_past_the_outbox_verdicts_are_dropped_and_counted() -> None:
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    metrics = VerdictMetrics(CollectorRegistry())
    publisher = VerdictPublisher(nowhere, "glad", 3, metrics)
    publisher.start()
    try:
        for number in range(5):
            publisher.publish("widget", _row(number))
        assert publisher.waiting == 3
        assert metrics.dropped._value.get() == 2
        assert metrics.connected._value.get() == 0
    finally:
        publisher.stop()


def test_a_broker_that_is_down_fails_no_inspection(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model_dir=tiny_model_dir,
        data_dir=tmp_path,
        max_wait_ms=0,
        record=False,
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
    )
    with serving(create_app(settings)) as base:
        for seed in range(3):
            answer = httpx.post(
                f"{base}/inspect/widget",
                content=png(part_image(seed)),
                headers={"Content-Type": "image/png"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
        metrics = httpx.get(f"{base}/metrics").text
        assert metric(metrics, "glad_verdicts_waiting") == 3
        assert metric(metrics, "glad_mqtt_connected") == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mqtt_url", "http://broker:1883"),
        ("mqtt_url", "mqtt://"),
        ("mqtt_url", "mqtt://broker:port"),
        ("mqtt_topic_prefix", "plant/#"),
        ("mqtt_topic_prefix", "plant//hall"),
        ("mqtt_topic_prefix", "/plant"),
    ],
)
def test_a_bad_bus_setting_says_what_to_fix(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})


def test_a_refused_broker_url_does_not_repeat_its_password() -> None:
    with pytest.raises(ValidationError, match="MQTT_URL must look like") as refused:
        Settings(mqtt_url="http://line:hunter2@broker:1883")
    assert "hunter2" not in str(refused.value)


def test_the_verdict_time_is_utc() -> None:
    payload = json.loads(verdict_payload(_row(1)))
    assert datetime.fromisoformat(payload["time"]) == datetime(2026, 12, 5, 8, 0, 1, tzinfo=UTC)
    assert payload["verdict"] == "anomalous"
