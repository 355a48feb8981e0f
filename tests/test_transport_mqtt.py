"""MqttTransport against the real brokers (``mqtt_broker`` runs each test on amqtt and on Mosquitto),
plus a scripted fake broker where a real one cannot be made to misbehave on cue (a late PUBACK).

What amqtt 0.12 does, measured here: it *does* publish the will when a client's socket closes without
DISCONNECT (crash, kill -9), but never for a client that goes silent with its socket open (see
``test_amqtt_limitation_no_will_for_silent_client``). Mosquitto 2.0.11 handles both, the silent case
only after ~6 s whatever the keep-alive (its keep-alive check is coarse), so that case is not timed here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ffm_edge.errors import ConfigError, TransportError
from ffm_edge.transport import BrokerAddress, MqttTransport, parse_broker_url
from ffm_hub.brokers import AmqttBroker, ManagedBroker, free_port

if TYPE_CHECKING:
    from conftest import Inbox

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

FAST = {"reconnect_min_delay": 0.05, "reconnect_max_delay": 0.2}
MakeClient = Callable[..., MqttTransport]


@pytest.fixture
def clients(mqtt_broker: ManagedBroker) -> Iterator[MakeClient]:
    """Factory of connected transports on the broker under test (fast reconnects), closed afterwards."""
    made: list[MqttTransport] = []

    def make(client_id: str, *, connect: bool = True, **kwargs: object) -> MqttTransport:
        options: dict[str, object] = {**FAST, **kwargs}
        transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id, **options)  # type: ignore[arg-type]
        made.append(transport)
        if connect:
            transport.connect(timeout=5.0)
        return transport

    yield make
    for transport in made:
        transport.close()


# -- against the real brokers ----------------------------------------------------------------------------


def test_one_megabyte_binary_round_trip(clients: MakeClient, inbox: type[Inbox]) -> None:
    box = inbox()
    clients("sub").subscribe("ffm/v1/fed/up/dev1", box)
    payload = os.urandom(1 << 20)
    clients("pub").publish("ffm/v1/fed/up/dev1", payload, timeout=10.0)
    [(topic, received)] = box.wait_for(1)
    assert topic == "ffm/v1/fed/up/dev1"
    assert received == payload


def test_retained_message_reaches_late_subscriber(clients: MakeClient, inbox: type[Inbox]) -> None:
    """Once a QoS 1 publish returned, the broker holds the message: a subscriber arriving next sees it."""
    pub = clients("pub")
    pub.publish("ffm/v1/fed/manifest", b"version 7", retain=True)
    late = inbox()
    clients("late").subscribe("ffm/v1/fed/manifest", late)
    assert late.wait_for(1) == [("ffm/v1/fed/manifest", b"version 7")]

    pub.publish("ffm/v1/fed/manifest", b"", retain=True)  # clears
    later = inbox()
    clients("later").subscribe("ffm/v1/fed/#", later)
    time.sleep(0.2)
    assert later.messages == []


def test_online_presence_and_will_on_abrupt_disconnect(clients: MakeClient, inbox: type[Inbox]) -> None:
    """Both brokers send the will when the socket closes without DISCONNECT (amqtt included)."""
    watcher = inbox()
    clients("watcher").subscribe("ffm/v1/fed/presence/+", watcher)
    presence = "ffm/v1/fed/presence/dev1"
    dev = clients("dev1", will=(presence, b"offline", False), online=(presence, b"online", False))
    watcher.wait_for_payload(presence, b"online")
    dev.abort()
    watcher.wait_for_payload(presence, b"offline")
    assert not dev.connected


def test_will_when_process_is_killed(mqtt_broker: ManagedBroker, clients: MakeClient, inbox: type[Inbox]) -> None:
    """kill -9 of a client process: the kernel closes its socket and the broker sends the will."""
    watcher = inbox()
    clients("watcher").subscribe("presence/#", watcher)
    script = (
        "import sys, time, paho.mqtt.client as m\n"
        "from paho.mqtt.enums import CallbackAPIVersion as V\n"
        "c = m.Client(V.VERSION2, client_id='victim')\n"
        "c.will_set('presence/victim', b'dead', qos=1)\n"
        f"c.connect({mqtt_broker.host!r}, {mqtt_broker.port}, 30)\n"
        "c.loop_start(); c.publish('presence/victim', b'alive', qos=1).wait_for_publish(5)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        watcher.wait_for_payload("presence/victim", b"alive", timeout=10.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5.0)
        watcher.wait_for_payload("presence/victim", b"dead")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_close_publishes_offline_presence(clients: MakeClient, inbox: type[Inbox]) -> None:
    presence = "ffm/v1/fed/presence/dev2"
    dev = clients("dev2", will=(presence, b"offline", True), online=(presence, b"online", True))
    dev.close()
    late = inbox()
    clients("late").subscribe(presence, late)
    assert late.wait_for(1) == [(presence, b"offline")]
    with pytest.raises(TransportError, match="closed"):
        dev.publish(presence, b"x")


def test_restart_reconnects_and_resubscribes(
    mqtt_broker: ManagedBroker, clients: MakeClient, inbox: type[Inbox]
) -> None:
    box = inbox()
    events: list[bool] = []
    sub = clients("sub", connect=False)
    sub.add_connection_listener(events.append)
    sub.subscribe("jobs/#", box)
    sub.connect(timeout=5.0)
    pub = clients("pub")

    mqtt_broker.restart()
    assert sub.wait_connected(5.0), "the subscriber did not reconnect by itself"
    pub.publish("jobs/1", b"after restart", timeout=5.0)
    box.wait_for_payload("jobs/1", b"after restart")
    assert events[0] is True and False in events and events[-1] is True


def test_publish_waits_for_broker_restart(mqtt_broker: ManagedBroker, clients: MakeClient, inbox: type[Inbox]) -> None:
    box = inbox()
    sub = clients("sub")
    sub.subscribe("t", box)
    pub = clients("pub")
    mqtt_broker.stop()
    start = time.monotonic()
    # Either the client already knows the broker is gone, or it is mid-reconnect and gets no PUBACK:
    # both fail fast with a TransportError, never a silent success.
    with pytest.raises(TransportError, match=r"not connected|no acknowledgement"):
        pub.publish("t", b"lost", timeout=0.3)
    assert time.monotonic() - start < 2.0

    def restart() -> None:
        mqtt_broker.start()

    timer = threading.Timer(0.3, restart)
    timer.start()
    try:
        # The subscriber must be back before the message goes out: no broker keeps it for us.
        assert sub.wait_connected(5.0)
        pub.publish("t", b"after the outage", timeout=5.0)
        box.wait_for_payload("t", b"after the outage")
    finally:
        timer.join()


def test_handler_may_publish_and_subscribe(clients: MakeClient, inbox: type[Inbox]) -> None:
    """Handlers run on paho's network thread; publish()/subscribe() from there must not dead-lock."""
    echo, box = clients("echo"), inbox()

    def reply(topic: str, payload: bytes) -> None:
        echo.publish("reply", payload + b"!")
        echo.subscribe("more", box)

    echo.subscribe("ask", reply)
    asker = clients("asker")
    asker.subscribe("reply", box)
    asker.publish("ask", b"hi")
    box.wait_for_payload("reply", b"hi!")
    assert threading.get_ident() not in box.threads


def test_connection_listener_sees_connect(clients: MakeClient) -> None:
    seen = threading.Event()
    t = clients("listener", connect=False)

    def listener(up: bool) -> None:
        if up:
            seen.set()

    t.add_connection_listener(listener)
    t.connect(timeout=5.0)
    assert seen.wait(2.0)
    assert t.connected


def test_amqtt_limitation_no_will_for_silent_client(amqtt_broker: AmqttBroker, inbox: type[Inbox]) -> None:
    """LIMITATION of amqtt 0.12 (documented, not relied on): a client that stops talking but keeps its
    socket open is never timed out, so its will is never sent. If this starts failing, amqtt fixed it."""
    watcher, box = MqttTransport(amqtt_broker.host, amqtt_broker.port, "watcher"), inbox()
    watcher.subscribe("presence/#", box)
    watcher.connect(timeout=5.0)
    silent = paho.Client(CallbackAPIVersion.VERSION2, client_id="silent")
    silent.will_set("presence/silent", b"dead", qos=1)
    try:
        silent.connect(amqtt_broker.host, amqtt_broker.port, keepalive=1)
        silent.loop(timeout=1.0)  # read the CONNACK, then never again: no PINGREQ from now on
        time.sleep(2.5)  # > 1.5 x keep-alive, when MQTT says the broker must drop the client
        assert box.messages == []
    finally:
        sock = silent.socket()
        if isinstance(sock, socket.socket):
            sock.close()
        watcher.close()


# -- connection errors and configuration -----------------------------------------------------------------


def test_connect_refused_raises_transport_error() -> None:
    port = free_port()
    transport = MqttTransport("127.0.0.1", port, "nobody", reconnect_min_delay=0.05)
    start = time.monotonic()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        transport.connect(timeout=0.3)
    assert time.monotonic() - start < 2.0
    transport.close()


def test_unresolvable_host_raises_transport_error() -> None:
    transport = MqttTransport("no-such-host.invalid", 1883, "nobody")
    with pytest.raises(TransportError, match="resolve"):
        transport.connect(timeout=2.0)
    transport.close()


def test_publish_before_connect_raises() -> None:
    transport = MqttTransport("127.0.0.1", 1883, "idle")
    with pytest.raises(TransportError, match="connect"):
        transport.publish("t", b"x", timeout=0.1)
    transport.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.lan:1884", BrokerAddress("broker.lan", 1884)),
        ("tcp://10.0.0.5:1883", BrokerAddress("10.0.0.5", 1883)),
        ("mqtt://hub", BrokerAddress("hub", 1883)),
        ("127.0.0.1:2883", BrokerAddress("127.0.0.1", 2883)),
        ("localhost", BrokerAddress("localhost", 1883)),
        ("mqtt://[::1]:1885", BrokerAddress("::1", 1885)),
        ("mqtts://secure.lan", BrokerAddress("secure.lan", 8883, tls=True)),
    ],
)
def test_parse_broker_url(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected
    assert parse_broker_url(expected.url) == expected


@pytest.mark.parametrize(
    "url", ["", "http://hub:80", "mqtt://:1883", "mqtt://hub:notaport", "mqtt://hub:70000", "mqtt://hub/path"]
)
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_broker_url(url)


def test_mqtts_url_turns_tls_on() -> None:
    transport = MqttTransport.from_url("mqtts://secure.lan", "c")
    assert transport.tls is not None and transport.url == "mqtts://secure.lan:8883"
    assert MqttTransport.from_url("mqtt://plain.lan", "c").tls is None


# -- a scripted broker: the PUBACK arrives when the test says so --------------------------------------------


class _ScriptedBroker:
    """Just enough MQTT 3.1.1 server for one client: CONNACK at once, PUBACK after ``puback_delay``
    seconds (never if None). Real brokers acknowledge too fast to observe that publish() waits."""

    def __init__(self, puback_delay: float | None, connack: bool = True) -> None:
        self.puback_delay = puback_delay
        self.connack = connack
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.puback_sent_at: float | None = None
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _read_packet(self, conn: socket.socket) -> tuple[int, bytes]:
        header = conn.recv(1)
        if not header:
            raise EOFError
        length, shift = 0, 0
        while True:
            byte = conn.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise EOFError
            body += chunk
        return header[0], body

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        self._conns.append(conn)
        try:
            while True:
                kind, body = self._read_packet(conn)
                if kind >> 4 == 1 and self.connack:  # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind >> 4 == 3 and (kind >> 1) & 3 == 1:  # PUBLISH, QoS 1
                    topic_len = int.from_bytes(body[:2], "big")
                    mid = body[2 + topic_len : 4 + topic_len]
                    if self.puback_delay is not None:
                        time.sleep(self.puback_delay)
                        self.puback_sent_at = time.monotonic()
                        conn.sendall(b"\x40\x02" + mid)
                elif kind >> 4 == 12:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind >> 4 == 14:  # DISCONNECT
                    return
        except (EOFError, OSError, IndexError):
            return

    def close(self) -> None:
        self.server.close()
        for conn in self._conns:
            conn.close()
        self._thread.join(timeout=5.0)


@pytest.fixture
def scripted() -> Iterator[Callable[..., _ScriptedBroker]]:
    made: list[_ScriptedBroker] = []

    def make(puback_delay: float | None, connack: bool = True) -> _ScriptedBroker:
        made.append(_ScriptedBroker(puback_delay, connack))
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def test_qos1_publish_returns_only_after_puback(scripted: Callable[..., _ScriptedBroker]) -> None:
    broker = scripted(0.4)
    t = MqttTransport("127.0.0.1", broker.port, "c")
    t.connect(timeout=5.0)
    try:
        t.publish("up", b"chunk", qos=1, timeout=5.0)
        returned_at = time.monotonic()
        assert broker.puback_sent_at is not None and returned_at >= broker.puback_sent_at
    finally:
        t.close()


def test_qos1_publish_times_out_without_puback(scripted: Callable[..., _ScriptedBroker]) -> None:
    broker = scripted(None)
    t = MqttTransport("127.0.0.1", broker.port, "c")
    t.connect(timeout=5.0)
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no acknowledgement"):
            t.publish("up", b"chunk", qos=1, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 2.0
    finally:
        t.close()  # must not hang on the unacknowledged message


def test_connect_times_out_without_connack(scripted: Callable[..., _ScriptedBroker]) -> None:
    """A peer that accepts TCP but never answers CONNECT: connect() gives up cleanly (no thread left)."""
    broker = scripted(None, connack=False)
    t = MqttTransport("127.0.0.1", broker.port, "c")
    with pytest.raises(TransportError, match="handshake"):
        t.connect(timeout=0.3)
    t.close()
