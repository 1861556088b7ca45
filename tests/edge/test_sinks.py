"""Decision sinks: a slow sink never blocks (drops counted); MQTT against a real Mosquitto broker."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from core.errors import ConfigError
from edge.sinks import Decision, QueuedSink, StdoutSink, open_sink


def decision(i: int, verdict: str = "NOK") -> Decision:
    return Decision("st-1", f"f{i:03d}", verdict, 1.5 + i, 1.0, 1000.0 + i, 1000.5 + i, "1.0.0")


class SlowSink:
    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.got: list[Decision] = []

    def send(self, d: Decision) -> None:
        self.release.wait(10)
        self.got.append(d)

    def close(self) -> None:
        pass


def test_slow_sink_never_blocks_and_counts_drops() -> None:
    inner = SlowSink()
    drops: list[str] = []
    sink = QueuedSink(inner, maxsize=4, on_drop=drops.append)
    start = time.monotonic()
    for i in range(20):
        sink.send(decision(i))
    assert time.monotonic() - start < 0.5  # the caller (scoring) never waited for the sink
    inner.release.set()
    sink.close(5.0)
    # one decision was taken by the sink thread, 4 waited in the queue; the rest were dropped and counted
    assert len(inner.got) + sink.dropped == 20 and sink.dropped >= 15
    assert drops == ["sink:slow"] * sink.dropped
    assert [d.frame_id for d in inner.got] == sorted(d.frame_id for d in inner.got)


def test_stdout_sink_writes_one_json_line() -> None:
    lines: list[str] = []
    StdoutSink(lines.append).send(decision(7, "OK"))
    assert len(lines) == 1 and lines[0].endswith("\n")
    payload = json.loads(lines[0])
    assert payload["frame_id"] == "f007" and payload["decision"] == "OK" and payload["image_score"] == 8.5


def test_unknown_sink_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown scheme 'opcua'"):
        open_sink("opcua://plc:4840", "st-1")
    with pytest.raises(ConfigError, match="mqtt sink 'mqtt://host:1883\\?retain=1': needs mqtt://HOST"):
        open_sink("mqtt://host:1883?retain=1", "st-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """A real Mosquitto broker on 127.0.0.1 and a free port, killed after the test."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.fail("mosquitto is not installed (.ci/install installs it from Debian)")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def test_mqtt_sink_publishes_decisions_to_a_real_broker(mosquitto: int) -> None:
    received: list[mqtt.MQTTMessage] = []
    subscribed = threading.Event()
    got_all = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")

    def on_connect(client, userdata, flags, reason, props) -> None:
        client.subscribe("m3dm/st-1/decision", qos=1)

    def on_message(client, userdata, message) -> None:
        received.append(message)
        if len(received) == 3:
            got_all.set()

    sub.on_connect = on_connect
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto)
    sub.loop_start()
    try:
        assert subscribed.wait(10)
        sink = QueuedSink(open_sink(f"mqtt://127.0.0.1:{mosquitto}", "st-1"))
        try:
            for i, verdict in enumerate(("OK", "NOK", "ERROR")):
                sink.send(decision(i, verdict))
            assert got_all.wait(10), f"received {len(received)} of 3"
        finally:
            sink.close(5.0)
    finally:
        sub.disconnect()
        sub.loop_stop()
    payloads = [json.loads(m.payload) for m in received]
    assert [m.topic for m in received] == ["m3dm/st-1/decision"] * 3
    assert [(p["frame_id"], p["decision"]) for p in payloads] == [
        ("f000", "OK"),
        ("f001", "NOK"),
        ("f002", "ERROR"),
    ]
    assert payloads[1]["image_score"] == 2.5 and payloads[1]["station_id"] == "st-1"


def test_mqtt_sink_with_absent_broker_never_blocks() -> None:
    sink = QueuedSink(open_sink(f"mqtt://127.0.0.1:{free_port()}", "st-1"), maxsize=8)
    start = time.monotonic()
    for i in range(50):
        sink.send(decision(i))
    assert time.monotonic() - start < 0.5
    sink.close(2.0)
