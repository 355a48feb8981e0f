"""Message transports for the FFM protocol: an abstract seam, an in-memory fake and MQTT (paho-mqtt).

The protocol code depends on :class:`Transport` only; tests plug in :class:`InMemoryTransport`,
deployments :class:`MqttTransport` (built from a broker URL with :meth:`MqttTransport.from_url`).
"""

from __future__ import annotations

from ffm_edge.transport.base import (
    ConnectionListener,
    MessageHandler,
    Presence,
    PresenceLike,
    PresenceMessage,
    Transport,
    validate_topic,
    validate_topic_filter,
)
from ffm_edge.transport.memory import InMemoryBroker, InMemoryTransport
from ffm_edge.transport.mqtt import BrokerAddress, MqttTransport, TlsOptions, parse_broker_url

__all__ = [
    "BrokerAddress",
    "ConnectionListener",
    "InMemoryBroker",
    "InMemoryTransport",
    "MessageHandler",
    "MqttTransport",
    "Presence",
    "PresenceLike",
    "PresenceMessage",
    "TlsOptions",
    "Transport",
    "parse_broker_url",
    "validate_topic",
    "validate_topic_filter",
]
