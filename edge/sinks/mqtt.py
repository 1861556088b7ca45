"""MQTT decision publisher (paho-mqtt 2.x): topic `m3dm/<station>/decision`, JSON payload, QoS 1.

The client connects asynchronously and reconnects by itself (paho's network loop thread), so a broker that
is down at start or goes away never blocks the station; while disconnected paho keeps up to
`max_queued` QoS 1 messages and sends them on reconnect (older decisions beyond that are dropped by paho
and counted here as failures through QueuedSink's log).
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlsplit

import paho.mqtt.client as mqtt

from core.errors import ConfigError
from edge.sinks import Decision, to_json

log = logging.getLogger("m3dm.edge.sinks")


class MqttSink:
    name = "mqtt"

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        qos: int = 1,
        client_id: str = "",
        max_queued: int = 1000,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ConfigError(f"mqtt sink: qos must be 0, 1 or 2, got {qos}")
        self.topic, self.qos = topic, qos
        self._last: mqtt.MQTTMessageInfo | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_queued_messages_set(max_queued)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    @classmethod
    def from_uri(cls, uri: str, station_id: str) -> MqttSink:
        parts = urlsplit(uri)
        params = dict(parse_qsl(parts.query))
        unknown = sorted(set(params) - {"topic", "qos", "client_id"})
        if unknown or not parts.hostname:
            raise ConfigError(f"mqtt sink {uri!r}: needs mqtt://HOST[:PORT][?topic=&qos=&client_id=]")
        try:
            qos = int(params.get("qos", 1))
            port = parts.port or 1883
        except ValueError as err:
            raise ConfigError(f"mqtt sink {uri!r}: {err}") from None
        topic = params.get("topic", f"m3dm/{station_id}/decision")
        return cls(parts.hostname, port, topic, qos, params.get("client_id", f"m3dm-{station_id}"))

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        log.info("mqtt sink connected (%s); publishing to %s", reason, self.topic)

    def send(self, decision: Decision) -> None:
        info = self._last = self.client.publish(self.topic, to_json(decision), qos=self.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the last publish complete (bounded) when connected, then disconnect."""
        last = self._last
        if last is not None and self.client.is_connected():
            try:
                last.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as err:  # not queued / disconnected meanwhile
                log.warning("mqtt sink: last decision not confirmed before close: %s", err)
        self.client.disconnect()
        self.client.loop_stop()
