"""The transport seam: what the FFM protocol needs from a message bus, and nothing more.

Like httpx's transports, the protocol code talks to an abstract :class:`Transport` so that unit tests run
on :class:`~ffm_edge.transport.memory.InMemoryTransport` while deployments run on
:class:`~ffm_edge.transport.mqtt.MqttTransport`. The contract is deliberately the part of MQTT that every
broker we meet honours (amqtt included): publish with a broker acknowledgement, subscribe with topic
filters, retained messages, a Last Will. Nothing here relies on the broker keeping a session, so
subscriptions are remembered by the transport and made again after every reconnect.

Threading: handlers and connection listeners run on the transport's own thread (paho's network thread,
or the in-memory transport's dispatch thread). They must be quick and must not block: hand real work to
a queue or an executor. While a handler runs, no other message is delivered and (for MQTT) no
acknowledgement is processed. ``publish()`` called from a handler therefore never waits for the broker:
it queues the message and returns.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeAlias, TypeVar

from paho.mqtt.client import topic_matches_sub

from ffm_edge.errors import TransportError

__all__ = [
    "ConnectionListener",
    "MessageHandler",
    "Presence",
    "PresenceLike",
    "PresenceMessage",
    "Transport",
    "validate_topic",
    "validate_topic_filter",
]

log = logging.getLogger("ffm.transport")

MessageHandler: TypeAlias = Callable[[str, bytes], None]
"""``handler(topic, payload)``; runs on the transport's thread, must return quickly."""

ConnectionListener: TypeAlias = Callable[[bool], None]
"""``listener(connected)``; runs on the transport's thread after every connect and disconnect."""


class PresenceMessage(NamedTuple):
    """One presence message: where it goes, what it says, whether the broker keeps it for late readers."""

    topic: str
    payload: bytes
    retain: bool = False


PresenceLike: TypeAlias = "PresenceMessage | tuple[str, bytes] | tuple[str, bytes, bool] | None"


def _as_presence_message(value: PresenceLike, what: str) -> PresenceMessage | None:
    if value is None:
        return None
    try:
        msg = PresenceMessage(*value)
    except TypeError as exc:
        raise TypeError(f"{what} must be (topic, payload, retain), got {value!r}") from exc
    validate_topic(msg.topic)
    if not isinstance(msg.payload, bytes | bytearray):
        raise TypeError(f"{what} payload must be bytes, got {type(msg.payload).__name__}")
    return PresenceMessage(msg.topic, bytes(msg.payload), bool(msg.retain))


@dataclass(frozen=True)
class Presence:
    """Presence configuration of one transport.

    ``will`` is registered with the broker as the Last Will (sent by the broker if the client dies) and
    is also published by :meth:`Transport.close` as the clean "offline" message, because a clean
    disconnect never fires the will. ``online`` is published after every (re)connect, once the
    subscriptions are in place, so whoever sees it knows the client can receive its messages.
    """

    will: PresenceMessage | None = None
    online: PresenceMessage | None = None

    @classmethod
    def of(cls, will: PresenceLike = None, online: PresenceLike = None) -> Presence:
        """Build from plain ``(topic, payload, retain)`` tuples."""
        return cls(_as_presence_message(will, "will"), _as_presence_message(online, "online"))


def validate_topic(topic: str) -> None:
    """Reject topic names MQTT forbids for publishing (empty, wildcards, NUL)."""
    if not isinstance(topic, str) or not topic:
        raise TransportError(f"invalid topic {topic!r}: must be a non-empty string")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TransportError(f"invalid topic {topic!r}: wildcards and NUL are not allowed when publishing")
    if len(topic.encode("utf-8")) > 65535:
        raise TransportError("invalid topic: longer than 65535 bytes")


def validate_topic_filter(topic_filter: str) -> None:
    """Reject topic filters that are not valid MQTT (misplaced ``#`` or ``+``)."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise TransportError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TransportError(f"invalid topic filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise TransportError(f"invalid topic filter {topic_filter!r}: '+' must be a whole level")


def _validate_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise TransportError(f"invalid QoS {qos!r}: must be 0, 1 or 2")


_T = TypeVar("_T", bound="Transport")


@dataclass(frozen=True)
class _Subscription:
    handler: MessageHandler
    qos: int


class Transport(abc.ABC):
    """A connection to a message broker, as the FFM protocol sees it.

    Subclasses implement the network part; this base class keeps the state every transport shares: the
    remembered subscriptions (made again after each reconnect, since no broker is trusted to keep a
    session), the handler dispatch, the connection listeners and the presence configuration.
    """

    def __init__(self, *, will: PresenceLike = None, online: PresenceLike = None) -> None:
        self.presence = Presence.of(will, online)
        self._subs_lock = threading.RLock()
        self._subscriptions: dict[str, _Subscription] = {}
        self._listeners: list[ConnectionListener] = []

    # -- the contract -------------------------------------------------------------------------------

    @abc.abstractmethod
    def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying until ``timeout``; raises TransportError if the broker cannot be reached.

        Once connected, the transport reconnects by itself after any loss of connection. Calling it again
        while connected does nothing; a closed transport cannot be connected again.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect cleanly: publish the offline presence (the will payload) first if configured."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the connection as a crash would: no offline message, so the broker sends the will."""

    @abc.abstractmethod
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish ``payload`` to ``topic``.

        With QoS 1 this returns once the broker acknowledged the message (PUBACK): the broker has it,
        nobody downstream has necessarily seen it. While disconnected it waits for the reconnect. Raises
        TransportError when ``timeout`` passes first; the message may still go out later (at least once),
        so receivers must tolerate duplicates. Called from a handler it queues and returns at once.
        An empty retained payload clears the retained message of that topic.
        """

    @abc.abstractmethod
    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (replacing an earlier handler).

        The subscription is remembered and made again after every reconnect. If connected, this returns
        once the broker confirmed it, so a message published afterwards by anyone is delivered.
        """

    @abc.abstractmethod
    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter``; forget it for future reconnects."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while connected *and* all remembered subscriptions are in place."""

    @abc.abstractmethod
    def wait_connected(self, timeout: float) -> bool:
        """Block until :attr:`connected` (e.g. after a broker restart) or ``timeout``; returns it."""

    # -- shared machinery ---------------------------------------------------------------------------

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True)`` after every (re)connect and ``listener(False)`` after every loss.

        Listeners run on the transport's thread and must be quick.
        """
        with self._subs_lock:
            self._listeners.append(listener)

    def remove_connection_listener(self, listener: ConnectionListener) -> None:
        """Undo :meth:`add_connection_listener` (no error if it was not added)."""
        with self._subs_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @property
    def subscriptions(self) -> dict[str, int]:
        """The remembered topic filters and their QoS (a copy)."""
        with self._subs_lock:
            return {f: s.qos for f, s in self._subscriptions.items()}

    def _remember(self, topic_filter: str, handler: MessageHandler, qos: int) -> None:
        validate_topic_filter(topic_filter)
        _validate_qos(qos)
        with self._subs_lock:
            self._subscriptions[topic_filter] = _Subscription(handler, qos)

    def _forget(self, topic_filter: str) -> bool:
        with self._subs_lock:
            return self._subscriptions.pop(topic_filter, None) is not None

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Hand one received message to every handler whose filter matches; never raise."""
        with self._subs_lock:
            targets = [s.handler for f, s in self._subscriptions.items() if topic_matches_sub(f, topic)]
        for handler in targets:
            try:
                handler(topic, payload)
            except Exception:
                log.exception("message handler %r failed on topic %s", handler, topic)

    def _notify_connection(self, up: bool) -> None:
        with self._subs_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(up)
            except Exception:
                log.exception("connection listener %r failed", listener)

    @staticmethod
    def _check_publish_args(topic: str, payload: bytes, qos: int) -> bytes:
        validate_topic(topic)
        _validate_qos(qos)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        return bytes(payload)

    @staticmethod
    def _deadline(timeout: float) -> float:
        return time.monotonic() + max(0.0, timeout)

    def __enter__(self: _T) -> _T:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
