"""InMemoryBroker / InMemoryTransport: the fake must behave like the real brokers where the protocol cares."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from ffm_edge.errors import TransportError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, Transport

if TYPE_CHECKING:
    from conftest import Inbox

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

MakeClient = Callable[..., InMemoryTransport]


@pytest.fixture
def clients(memory_broker: InMemoryBroker) -> Iterator[MakeClient]:
    """Factory of connected transports, all closed after the test."""
    made: list[InMemoryTransport] = []

    def make(client_id: str, **kwargs: object) -> InMemoryTransport:
        transport = InMemoryTransport(memory_broker, client_id, **kwargs)  # type: ignore[arg-type]
        transport.connect(timeout=2.0)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


def test_wildcard_routing(clients: MakeClient, inbox: type[Inbox]) -> None:
    sub, pub = clients("sub"), clients("pub")
    plus, hash_, exact = inbox(), inbox(), inbox()
    sub.subscribe("ffm/v1/+/up", plus)
    sub.subscribe("ffm/v1/fed/#", hash_)
    sub.subscribe("ffm/v1/fed/down/dev1", exact)
    for topic in ("ffm/v1/fed/up", "ffm/v1/other/up", "ffm/v1/fed/down/dev1", "ffm/v1/fed/down/dev2", "x/y"):
        pub.publish(topic, topic.encode())
    hash_.wait_for(3)
    plus.wait_for(2)
    exact.wait_for(1)
    time.sleep(0.05)  # nothing else may trickle in
    assert sorted(plus.topics) == ["ffm/v1/fed/up", "ffm/v1/other/up"]
    assert sorted(hash_.topics) == ["ffm/v1/fed/down/dev1", "ffm/v1/fed/down/dev2", "ffm/v1/fed/up"]
    assert exact.messages == [("ffm/v1/fed/down/dev1", b"ffm/v1/fed/down/dev1")]


def test_unsubscribe_stops_delivery(clients: MakeClient, inbox: type[Inbox]) -> None:
    sub, pub = clients("sub"), clients("pub")
    box = inbox()
    sub.subscribe("t/#", box)
    pub.publish("t/1", b"1")
    box.wait_for(1)
    sub.unsubscribe("t/#")
    pub.publish("t/2", b"2")
    time.sleep(0.05)
    assert box.messages == [("t/1", b"1")]


def test_retained_message_and_clear(memory_broker: InMemoryBroker, clients: MakeClient, inbox: type[Inbox]) -> None:
    pub = clients("pub")
    pub.publish("fed/manifest", b"v1", retain=True)
    pub.publish("fed/manifest", b"v2", retain=True)
    late = inbox()
    clients("late").subscribe("fed/+", late)
    assert late.wait_for(1) == [("fed/manifest", b"v2")]
    assert memory_broker.retained == {"fed/manifest": b"v2"}

    pub.publish("fed/manifest", b"", retain=True)  # an empty retained payload clears
    late.wait_for(2)  # ... and still reaches current subscribers, like MQTT
    assert memory_broker.retained == {}
    later = inbox()
    clients("later").subscribe("fed/#", later)
    time.sleep(0.05)
    assert later.messages == []


def test_online_on_connect_will_on_abort(clients: MakeClient, inbox: type[Inbox]) -> None:
    watcher = inbox()
    clients("watcher").subscribe("presence/#", watcher)
    dev = clients("dev", will=("presence/dev", b"offline", True), online=("presence/dev", b"online", True))
    watcher.wait_for_payload("presence/dev", b"online")
    dev.abort()
    watcher.wait_for_payload("presence/dev", b"offline")
    assert not dev.connected


def test_close_publishes_offline_presence(
    memory_broker: InMemoryBroker, clients: MakeClient, inbox: type[Inbox]
) -> None:
    watcher = inbox()
    clients("watcher").subscribe("presence/#", watcher)
    dev = clients("dev", will=("presence/dev", b"offline", True), online=("presence/dev", b"online", True))
    dev.close()
    watcher.wait_for_payload("presence/dev", b"offline")
    assert memory_broker.retained["presence/dev"] == b"offline"
    with pytest.raises(TransportError, match="closed"):
        dev.publish("x", b"y")


def test_resubscribe_after_restart(memory_broker: InMemoryBroker, clients: MakeClient, inbox: type[Inbox]) -> None:
    box = inbox()
    events: list[bool] = []
    changed = threading.Condition()

    def listener(up: bool) -> None:
        with changed:
            events.append(up)
            changed.notify_all()

    sub = InMemoryTransport(memory_broker, "sub")
    sub.add_connection_listener(listener)
    sub.subscribe("jobs/#", box)
    sub.connect(timeout=2.0)
    try:
        pub = clients("pub")
        with changed:
            assert changed.wait_for(lambda: events == [True], 2.0)
        memory_broker.restart()
        with changed:
            assert changed.wait_for(lambda: events == [True, False, True], 2.0), events
        assert "sub" in memory_broker.clients
        pub.publish("jobs/1", b"after restart", timeout=2.0)
        box.wait_for_payload("jobs/1", b"after restart")
    finally:
        sub.close()


def test_disconnect_all_can_send_wills(memory_broker: InMemoryBroker, clients: MakeClient) -> None:
    clients("dev", will=("presence/dev", b"gone", True))
    memory_broker.disconnect_all(publish_wills=True)
    # The watcher was dropped too and the broker keeps no session, so only the retained copy remains.
    assert memory_broker.retained == {"presence/dev": b"gone"}


def test_handler_runs_on_transport_thread_and_may_publish(clients: MakeClient, inbox: type[Inbox]) -> None:
    """Delivery is asynchronous: never on the publisher's thread, so a handler may publish (no re-entrancy)."""
    echo, box = clients("echo"), inbox()

    def reply(topic: str, payload: bytes) -> None:
        echo.publish("reply", payload + b"!")

    echo.subscribe("ask", reply)
    asker = clients("asker")
    asker.subscribe("reply", box)
    asker.publish("ask", b"hi")
    box.wait_for_payload("reply", b"hi!")
    assert threading.get_ident() not in box.threads


def test_publish_waits_for_reconnect_or_times_out(
    memory_broker: InMemoryBroker, clients: MakeClient, inbox: type[Inbox]
) -> None:
    box = inbox()
    pub = clients("pub")
    # Subscribed on the publisher itself: it re-subscribes before it flushes what it queued, so the
    # message cannot race a second client's reconnect (the broker keeps nothing for absent clients).
    pub.subscribe("t", box)
    memory_broker.stop()
    start = time.monotonic()
    with pytest.raises(TransportError, match="not connected"):
        pub.publish("t", b"lost", timeout=0.2)
    assert time.monotonic() - start < 1.0

    threading.Timer(0.2, memory_broker.start).start()
    pub.publish("t", b"queued", timeout=3.0)
    box.wait_for_payload("t", b"queued")


def test_connect_fails_when_broker_down(memory_broker: InMemoryBroker) -> None:
    memory_broker.stop()
    transport = InMemoryTransport(memory_broker, "c")
    with pytest.raises(TransportError, match="could not connect"):
        transport.connect(timeout=0.1)
    transport.close()


def test_invalid_topics_are_rejected(clients: MakeClient) -> None:
    t = clients("t")
    with pytest.raises(TransportError, match="wildcards"):
        t.publish("a/#", b"x")
    with pytest.raises(TransportError, match="filter"):
        t.subscribe("a/#/b", lambda topic, payload: None)
    with pytest.raises(TransportError, match="QoS"):
        t.publish("a", b"x", qos=3)


def test_context_manager_connects_and_closes(memory_broker: InMemoryBroker) -> None:
    with InMemoryTransport(memory_broker, "ctx") as transport:
        assert isinstance(transport, Transport)
        assert transport.connected
        assert memory_broker.clients == ["ctx"]
    assert not transport.connected
    assert memory_broker.clients == []


def test_failing_handler_does_not_stop_delivery(clients: MakeClient, inbox: type[Inbox]) -> None:
    sub, pub, box = clients("sub"), clients("pub"), inbox()

    def broken(topic: str, payload: bytes) -> None:
        raise RuntimeError("boom")

    sub.subscribe("a", broken)
    sub.subscribe("b", box)
    pub.publish("a", b"1")
    pub.publish("b", b"2")
    box.wait_for_payload("b", b"2")
