"""Verdicts on the plant's message bus: each answered inspection's record, without its
images, published over MQTT with QoS 1 to `<prefix>/<product>/verdict` for the line
controller, andon lights and the MES.

Publishing never waits on the broker: paho's network thread sends, and the messages it has
not had acknowledged wait in its outbox (bounded), are sent again after a reconnect, and
past the bound are dropped, counted and logged. A broker that is down costs nothing but
the verdicts it misses past the outbox."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from service.metrics import VerdictMetrics
from service.records import read_time

log = logging.getLogger(__name__)

PORTS = {"mqtt": 1883, "mqtts": 8883}
KEEPALIVE_S = 30
RECONNECT_S = (1, 30)
# How long stopping waits for the outbox to be acknowledged.
FLUSH_S = 5.0
# The record's fields that describe media on this host, not the verdict.
MEDIA_FIELDS = ("image_path", "heatmap_path", "media_expired")


def verdict_topic(prefix: str, product: str) -> str:
    return f"{prefix}/{product}/verdict"


def verdict_payload(row: Mapping[str, object]) -> bytes:
    """The record of an answer as JSON, without its media; times in ISO 8601, UTC."""
    payload: dict[str, object] = {}
    for name, value in row.items():
        if name in MEDIA_FIELDS:
            continue
        if isinstance(value, datetime):
            value = read_time(value).isoformat()
        payload[name] = value
    payload["verdict"] = "anomalous" if row["is_anomalous"] else "normal"
    return json.dumps(payload, separators=(",", ":")).encode()


class VerdictPublisher:
    """One MQTT connection that publishes verdicts; start() once, stop() at shutdown.

    url: mqtt://[user:password@]host[:port] or mqtts:// (TLS), as Settings checks it."""

    def __init__(self, url: str, prefix: str, outbox: int, metrics: VerdictMetrics) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or PORTS[parts.scheme]
        self.prefix = prefix
        self.metrics = metrics
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"glad-{socket.gethostname()}-{os.getpid()}",
        )
        if parts.username:
            self._client.username_pw_set(
                unquote(parts.username), unquote(parts.password) if parts.password else None
            )
        if parts.scheme == "mqtts":
            self._client.tls_set()
        self._client.max_queued_messages_set(outbox)
        self._client.reconnect_delay_set(*RECONNECT_S)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._lock = threading.Lock()
        self._unacknowledged = 0
        self._dropped_since_log = 0
        self._unreachable_logged = False

    @property
    def waiting(self) -> int:
        """Verdicts published but not yet acknowledged by the broker."""
        return self._unacknowledged

    def start(self) -> None:
        """Connects in the background: a broker that is down is tried again, never waited on."""
        self._client.connect_async(self.host, self.port, KEEPALIVE_S)
        self._client.loop_start()

    def publish(self, product: str, row: Mapping[str, object]) -> None:
        """Hands one verdict to the outbox; never blocks on the network, never raises."""
        # Counted before it is handed over: the broker may acknowledge it at once.
        self._count_waiting(+1)
        try:
            info = self._client.publish(
                verdict_topic(self.prefix, product), verdict_payload(row), qos=1
            )
        except Exception:  # noqa: BLE001 (a verdict lost, never the inspection's answer)
            log.exception("could not publish the verdict of %s", row.get("id"))
            self._dropped()
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self._dropped()

    def _dropped(self) -> None:
        self._count_waiting(-1)
        self.metrics.dropped.inc()
        with self._lock:
            first = self._dropped_since_log == 0
            self._dropped_since_log += 1
        if first:
            log.error(
                "verdicts are being dropped: the MQTT outbox is full (%d) until the broker at "
                "%s:%d takes them",
                self._client.max_queued_messages,
                *self._at,
            )

    def stop(self) -> None:
        """Waits up to FLUSH_S for the outbox to be acknowledged, then disconnects."""
        deadline = time.monotonic() + FLUSH_S
        while self._unacknowledged and self._client.is_connected():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if self._unacknowledged:
            log.error("shutting down with %d verdicts not published", self._unacknowledged)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("the MQTT broker at %s:%d refused the connection: %s", *self._at, reason)
            return
        self.metrics.connected.set(1)
        self._unreachable_logged = False
        log.info("publishing verdicts to the MQTT broker at %s:%d", *self._at)
        with self._lock:
            dropped, self._dropped_since_log = self._dropped_since_log, 0
        if dropped:
            log.error("%d verdicts were dropped", dropped)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # Once per outage: paho tries again every RECONNECT_S.
        if not self._unreachable_logged:
            self._unreachable_logged = True
            log.error("cannot reach the MQTT broker at %s:%d; verdicts wait, retrying", *self._at)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        self.metrics.connected.set(0)
        if reason.is_failure:
            log.error(
                "lost the MQTT broker at %s:%d (%s); %d verdicts wait, reconnecting",
                *self._at,
                reason,
                self._unacknowledged,
            )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        self._count_waiting(-1)
        self.metrics.published.inc()

    def _count_waiting(self, change: int) -> None:
        with self._lock:
            self._unacknowledged += change
            self.metrics.waiting.set(self._unacknowledged)

    @property
    def _at(self) -> tuple[str, int]:
        return self.host, self.port
