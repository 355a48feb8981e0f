"""An in-process broker and transport: the fake the protocol's unit tests run on.

It behaves like the brokers we deploy on the points the protocol depends on: MQTT topic-filter matching,
retained messages (an empty retained payload clears), the Last Will when a client dies, no session kept
for a client that goes away (its subscriptions are gone until it re-subscribes), and asynchronous
delivery on the receiving transport's own thread, never inside the publisher's call, so that a handler
which publishes cannot dead-lock or re-enter its caller. Tests drive failures with
:meth:`InMemoryTransport.abort`, :meth:`InMemoryBroker.disconnect_all`, :meth:`InMemoryBroker.stop`,
:meth:`InMemoryBroker.start` and :meth:`InMemoryBroker.restart`.

QoS is accepted and ignored: delivery to a connected subscriber is certain in process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from paho.mqtt.client import topic_matches_sub

from ffm_edge.errors import TransportError
from ffm_edge.transport.base import MessageHandler, PresenceLike, Transport

__all__ = ["InMemoryBroker", "InMemoryTransport"]

log = logging.getLogger("ffm.transport")


class _Msg(NamedTuple):
    topic: str
    payload: bytes


class _Conn(NamedTuple):
    up: bool


class _Lost(NamedTuple):
    generation: int


class _Stop(NamedTuple):
    pass


_Event: TypeAlias = "_Msg | _Conn | _Lost | _Stop"


@dataclass
class _Session:
    transport: InMemoryTransport
    filters: dict[str, int] = field(default_factory=dict)


class InMemoryBroker:
    """A broker living in this process; thread-safe; keeps no state for disconnected clients."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._running = True
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, bytes] = {}

    # -- inspection and failure injection for tests ---------------------------------------------------

    @property
    def running(self) -> bool:
        """False between :meth:`stop` and :meth:`start`: connections are refused."""
        return self._running

    @property
    def retained(self) -> dict[str, bytes]:
        """The retained messages by topic (a copy)."""
        with self._lock:
            return dict(self._retained)

    @property
    def clients(self) -> list[str]:
        """Client ids currently connected."""
        with self._lock:
            return sorted(self._sessions)

    def disconnect_all(self, *, publish_wills: bool = False) -> None:
        """Drop every connection, as a network blip would; the clients reconnect by themselves.

        ``publish_wills=True`` makes the broker treat the drop as the clients' fault and send their wills.
        """
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            for session in sessions:
                session.transport._lost()
            if publish_wills:
                for session in sessions:
                    self._send_will(session.transport)

    def stop(self, *, keep_retained: bool = False) -> None:
        """Go down: drop every connection and refuse new ones until :meth:`start`.

        Retained messages are lost unless ``keep_retained`` (like a broker without persistence).
        """
        with self._lock:
            self._running = False
            self.disconnect_all()
            if not keep_retained:
                self._retained.clear()

    def start(self) -> None:
        """Accept connections again after :meth:`stop`."""
        with self._lock:
            self._running = True

    def restart(self, *, keep_retained: bool = False) -> None:
        """Stop and start at once: every client loses its connection and must re-subscribe."""
        self.stop(keep_retained=keep_retained)
        self.start()

    # -- the broker side of InMemoryTransport ----------------------------------------------------------

    def _connect(self, transport: InMemoryTransport) -> None:
        with self._lock:
            if not self._running:
                raise TransportError("connection refused: the in-memory broker is stopped")
            old = self._sessions.get(transport.client_id)
            self._sessions[transport.client_id] = _Session(transport)
            if old is not None and old.transport is not transport:
                log.warning("client id %s connected twice: dropping the older connection", transport.client_id)
                old.transport._lost()

    def _owns_session(self, transport: InMemoryTransport) -> _Session | None:
        session = self._sessions.get(transport.client_id)
        return session if session is not None and session.transport is transport else None

    def _disconnect(self, transport: InMemoryTransport, *, send_will: bool) -> None:
        with self._lock:
            if self._owns_session(transport) is None:
                return
            del self._sessions[transport.client_id]
            if send_will:
                self._send_will(transport)

    def _send_will(self, transport: InMemoryTransport) -> None:
        will = transport.presence.will
        if will is not None:
            self._route(will.topic, will.payload, will.retain)

    def _subscribe(self, transport: InMemoryTransport, topic_filter: str, qos: int) -> bool:
        with self._lock:
            session = self._owns_session(transport)
            if session is None:
                return False
            session.filters[topic_filter] = qos
            for topic, payload in self._retained.items():
                if topic_matches_sub(topic_filter, topic):
                    transport._enqueue_message(topic, payload)
            return True

    def _unsubscribe(self, transport: InMemoryTransport, topic_filter: str) -> None:
        with self._lock:
            session = self._owns_session(transport)
            if session is not None:
                session.filters.pop(topic_filter, None)

    def _publish(self, transport: InMemoryTransport, topic: str, payload: bytes, retain: bool) -> bool:
        with self._lock:
            if self._owns_session(transport) is None:
                return False
            self._route(topic, payload, retain)
            return True

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)
        for session in self._sessions.values():
            if any(topic_matches_sub(f, topic) for f in session.filters):
                session.transport._enqueue_message(topic, payload)


class InMemoryTransport(Transport):
    """A :class:`Transport` attached to an :class:`InMemoryBroker`.

    Messages, connection events and reconnects are all handled on one dispatch thread per transport,
    the counterpart of paho's network thread in :class:`~ffm_edge.transport.mqtt.MqttTransport`.
    """

    def __init__(
        self,
        broker: InMemoryBroker,
        client_id: str,
        *,
        will: PresenceLike = None,
        online: PresenceLike = None,
        reconnect_delay: float = 0.02,
    ) -> None:
        super().__init__(will=will, online=online)
        if not client_id:
            raise TransportError("InMemoryTransport needs a non-empty client_id")
        self.broker = broker
        self.client_id = client_id
        self.reconnect_delay = reconnect_delay
        self._lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._generation = 0
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._started = False
        self._queue: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending_out: list[tuple[str, bytes, bool]] = []

    def __repr__(self) -> str:
        return f"InMemoryTransport({self.client_id!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and not self._closed.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and not self._closed.is_set()

    def _on_own_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # -- connection --------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        deadline = self._deadline(timeout)
        with self._lock:
            if self._closed.is_set():
                raise TransportError(f"transport {self.client_id} is closed")
            if not self._started:
                while not self._establish():
                    if time.monotonic() >= deadline:
                        raise TransportError(
                            f"could not connect {self.client_id} to the in-memory broker within {timeout:g} s"
                        )
                    time.sleep(self.reconnect_delay)
                self._started = True
                self._thread = threading.Thread(target=self._run, name=f"ffm-memory-{self.client_id}", daemon=True)
                self._thread.start()
                self._queue.put(_Conn(True))
                return
        # Started earlier: a reconnect may be in progress on the dispatch thread.
        if not self._ready.wait(max(0.0, deadline - time.monotonic())):
            raise TransportError(f"{self.client_id} is not connected to the in-memory broker")

    def _establish(self) -> bool:
        """Connect, re-subscribe, flush queued messages, announce; False if the broker is unavailable."""
        with self._state_lock:
            generation = self._generation
        try:
            self.broker._connect(self)
        except TransportError:
            return False
        for topic_filter, qos in self.subscriptions.items():
            self.broker._subscribe(self, topic_filter, qos)
        with self._lock:
            pending, self._pending_out = self._pending_out, []
        for topic, payload, retain in pending:
            self.broker._publish(self, topic, payload, retain)
        online = self.presence.online
        if online is not None:
            self.broker._publish(self, online.topic, online.payload, online.retain)
        with self._state_lock:
            if generation != self._generation or self._closed.is_set():
                return False  # lost again while we were setting up
            self._ready.set()
        return True

    def _lost(self) -> None:
        """Called by the broker (under its lock) when it drops this connection."""
        with self._state_lock:
            self._generation += 1
            self._ready.clear()
            generation = self._generation
        self._queue.put(_Lost(generation))

    def _enqueue_message(self, topic: str, payload: bytes) -> None:
        if not self._closed.is_set():
            self._queue.put(_Msg(topic, payload))

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if isinstance(event, _Stop):
                return
            if isinstance(event, _Msg):
                if not self._closed.is_set():
                    self._dispatch(event.topic, event.payload)
            elif isinstance(event, _Conn):
                self._notify_connection(event.up)
            else:
                self._handle_lost(event.generation)

    def _handle_lost(self, generation: int) -> None:
        with self._state_lock:
            stale = generation != self._generation or self._ready.is_set()
        if stale or self._closed.is_set():
            return
        log.info("%s lost its connection to the in-memory broker; reconnecting", self.client_id)
        self._notify_connection(False)
        while not self._closed.is_set():
            if self._establish():
                log.info("%s reconnected to the in-memory broker", self.client_id)
                self._notify_connection(True)
                return
            self._closed.wait(self.reconnect_delay)

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            will = self.presence.will
            if will is not None and self._ready.is_set():
                self.broker._publish(self, will.topic, will.payload, will.retain)
            self._closed.set()
            self._ready.clear()
            self.broker._disconnect(self, send_will=False)
            if self._started:
                self._queue.put(_Conn(False))
        self._stop_thread()

    def abort(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._ready.clear()
            self.broker._disconnect(self, send_will=True)
        self._stop_thread()

    def _stop_thread(self) -> None:
        self._queue.put(_Stop())
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    # -- messages ------------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        data = self._check_publish_args(topic, payload, qos)
        deadline = self._deadline(timeout)
        if self._on_own_thread() and not self._ready.is_set():
            with self._lock:
                self._pending_out.append((topic, data, retain))
            return
        while True:
            if self._closed.is_set():
                raise TransportError(f"cannot publish to {topic}: transport {self.client_id} is closed")
            if self._ready.is_set() and self.broker._publish(self, topic, data, retain):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"cannot publish to {topic}: {self.client_id} not connected within {timeout:g} s")
            self._ready.wait(min(0.05, remaining))

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        self._remember(topic_filter, handler, qos)
        # Harmless when not connected (the broker answers False); needed while a reconnect is half done.
        self.broker._subscribe(self, topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self._forget(topic_filter)
        self.broker._unsubscribe(self, topic_filter)
