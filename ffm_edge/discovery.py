"""Find the FFM hub on the local network with zeroconf (mDNS / DNS-SD), for edges given no broker URL.

The hub advertises ``_ffm-hub._tcp.local.`` with TXT properties ``fed`` (federation), ``proto`` (wire
protocol version), ``broker`` (the MQTT URL) and ``hub`` (its id); see :mod:`ffm_hub.advertise`.
A discovery answer is a hint, not a credential: anyone on the segment can advertise, so trust comes from
the hub's key and TLS, never from having been found here.

``interfaces`` is passed to zeroconf: the default (every interface) is right for real networks;
``LOOPBACK_INTERFACES`` (``["127.0.0.1"]``) keeps advertisement and discovery on this machine, which is
what tests and sandboxes without multicast routing need.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from ffm_edge.errors import ConfigError, DiscoveryError
from ffm_edge.transport.mqtt import BrokerAddress, parse_broker_url

__all__ = [
    "LOOPBACK_INTERFACES",
    "PROTOCOL",
    "SERVICE_TYPE",
    "HubInfo",
    "Interfaces",
    "discover_hub",
    "hub_info_from_service",
    "open_zeroconf",
]

log = logging.getLogger("ffm.discovery")

SERVICE_TYPE = "_ffm-hub._tcp.local."
PROTOCOL = "1"
LOOPBACK_INTERFACES: list[str] = ["127.0.0.1"]

Interfaces: TypeAlias = "Sequence[str] | InterfaceChoice"
"""zeroconf's interface choice: ``InterfaceChoice.All``, ``InterfaceChoice.Default`` or IP addresses."""

_WILDCARD_HOSTS = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class HubInfo:
    """One hub as advertised; ``broker_url`` is ready for :func:`~ffm_edge.transport.parse_broker_url`."""

    name: str
    federation: str
    broker_url: str
    hub_id: str
    addresses: tuple[str, ...]
    port: int
    protocol: str


def open_zeroconf(interfaces: Interfaces, ip_version: IPVersion | None = None) -> Zeroconf:
    """Open a Zeroconf instance, mapping socket errors to DiscoveryError."""
    choice: InterfaceChoice | list[str | int | tuple[tuple[str, int, int], int]]
    choice = interfaces if isinstance(interfaces, InterfaceChoice) else list(interfaces)
    try:
        return Zeroconf(interfaces=choice, ip_version=ip_version)
    except (OSError, ValueError) as exc:
        raise DiscoveryError(f"cannot open mDNS sockets on {interfaces!r}: {exc}") from exc


def _decode(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value is not None else ""


def hub_info_from_service(info: ServiceInfo) -> HubInfo:
    """Turn a resolved zeroconf record into a HubInfo; ConfigError if its TXT properties are unusable.

    A broker URL advertised with a wildcard host (``0.0.0.0``) is rewritten to the first advertised
    address, since a wildcard is where a broker listens, not where a client connects.
    """
    props = {_decode(k): _decode(v) for k, v in info.properties.items()}
    addresses = tuple(info.parsed_scoped_addresses())
    broker = props.get("broker", "")
    if broker:
        address = parse_broker_url(broker)
    elif addresses and info.port:
        address = BrokerAddress(addresses[0], info.port)
    else:
        raise ConfigError(f"hub {info.name} advertises neither a broker URL nor an address")
    if address.host in _WILDCARD_HOSTS and addresses:
        address = BrokerAddress(addresses[0], address.port, address.tls)
    return HubInfo(
        name=info.name,
        federation=props.get("fed", ""),
        broker_url=address.url,
        hub_id=props.get("hub", ""),
        addresses=addresses,
        port=int(info.port or address.port),
        protocol=props.get("proto", ""),
    )


def discover_hub(
    federation: str | None = None,
    *,
    timeout: float = 5.0,
    interfaces: Interfaces = InterfaceChoice.All,
    ip_version: IPVersion | None = None,
) -> HubInfo:
    """Browse for hubs and return the first that speaks protocol ``1`` (and serves ``federation``, if given).

    Raises DiscoveryError after ``timeout`` seconds, saying which hubs were seen and how to pass the
    broker explicitly instead.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    names: queue.Queue[str] = queue.Queue()
    seen: dict[str, str] = {}

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put(name)

    zc = open_zeroconf(interfaces, ip_version)
    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                name = names.get(timeout=remaining)
            except queue.Empty:
                break
            info = ServiceInfo(SERVICE_TYPE, name)
            wait_ms = int(max(0.05, min(3.0, deadline - time.monotonic())) * 1000)
            if not info.request(zc, timeout=wait_ms):
                seen[name] = "did not answer"
                continue
            try:
                hub = hub_info_from_service(info)
            except ConfigError as exc:
                seen[name] = str(exc)
                continue
            if hub.protocol != PROTOCOL:
                seen[name] = f"speaks protocol {hub.protocol!r}, not {PROTOCOL!r}"
            elif federation is not None and hub.federation != federation:
                seen[name] = f"serves federation {hub.federation!r}"
            else:
                log.info("found hub %s (federation %s) at %s", hub.hub_id, hub.federation, hub.broker_url)
                return hub
    finally:
        browser.cancel()
        zc.close()
    wanted = f" for federation {federation!r}" if federation is not None else ""
    others = "; ".join(f"{n}: {why}" for n, why in seen.items())
    raise DiscoveryError(
        f"no FFM hub{wanted} answered on the local network within {timeout:g} s"
        + (f" (seen: {others})" if others else "")
        + ". Check that the hub runs with discovery enabled on this network segment, or skip discovery "
        "by passing the broker explicitly, e.g. --broker mqtt://HUB_HOST:1883"
    )
