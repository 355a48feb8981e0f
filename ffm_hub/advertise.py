"""Advertise the hub on the local network with zeroconf, so edges with no broker URL find it.

The record is ``_ffm-hub._tcp.local.`` with TXT ``fed``, ``proto``, ``broker`` and ``hub``; the edge
side is :func:`ffm_edge.discovery.discover_hub`. Advertising is a convenience: the hub works without it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from types import TracebackType

from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

from ffm_edge.discovery import (
    LOOPBACK_INTERFACES,
    PROTOCOL,
    SERVICE_TYPE,
    Interfaces,
    open_zeroconf,
)
from ffm_edge.errors import ConfigError, TransportError
from ffm_edge.transport.mqtt import parse_broker_url

__all__ = ["LOOPBACK_INTERFACES", "PROTOCOL", "SERVICE_TYPE", "HubAdvertiser", "local_addresses"]

log = logging.getLogger("ffm.discovery")

_WILDCARD_HOSTS = {"0.0.0.0", "::"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses, non-loopback first (loopback only if there is nothing else)."""
    import ifaddr  # a dependency of zeroconf

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                found.append(ip.ip)
    outside = [a for a in found if not _is_loopback(a)]
    return outside or [a for a in found if _is_loopback(a)] or ["127.0.0.1"]


def _label(text: str, limit: int) -> str:
    """A DNS-safe label (letters, digits, '-') of at most ``limit`` characters."""
    return (re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "hub")[:limit]


class HubAdvertiser:
    """Registers the hub's service record on start() and withdraws it on stop(); a context manager.

    ``port`` is the broker's port (the SRV record's port). ``addresses`` are the A records; by default
    the addresses named in ``interfaces`` (when it lists addresses) or this machine's addresses.
    """

    def __init__(
        self,
        federation: str,
        broker_url: str,
        *,
        hub_id: str,
        port: int,
        addresses: list[str] | None = None,
        interfaces: Interfaces = InterfaceChoice.All,
        ip_version: IPVersion | None = None,
    ) -> None:
        if not federation:
            raise ConfigError("HubAdvertiser needs a federation name")
        broker = parse_broker_url(broker_url)
        if not 0 < port < 65536:
            raise ConfigError(f"invalid port {port}")
        self.federation = federation
        self.broker_url = broker.url
        self.hub_id = hub_id
        self.port = port
        self.interfaces = interfaces
        self.ip_version = ip_version
        if addresses is None:
            if not isinstance(interfaces, InterfaceChoice):
                addresses = [str(i) for i in interfaces]
            elif broker.host not in _WILDCARD_HOSTS and _is_ip(broker.host):
                addresses = [broker.host]
            else:
                addresses = local_addresses()
        self.addresses = list(addresses)
        everywhere = isinstance(interfaces, InterfaceChoice) or any(not _is_loopback(str(i)) for i in interfaces)
        if _is_loopback(broker.host) and everywhere:
            log.warning(
                "the broker %s listens on loopback: only edges on this machine can use it "
                "(bind the broker to 0.0.0.0 to serve the network)",
                self.broker_url,
            )
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None

    @property
    def properties(self) -> dict[str, str]:
        """The TXT properties the record carries."""
        return {"fed": self.federation, "proto": PROTOCOL, "broker": self.broker_url, "hub": self.hub_id}

    @property
    def name(self) -> str | None:
        """The registered instance name (zeroconf may have renamed it to stay unique); None if stopped."""
        return self._info.name if self._info is not None else None

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._info is not None

    def start(self) -> None:
        """Register the record; blocks ~2 s while mDNS probes that the name is free."""
        if self._info is not None:
            return
        instance = _label(f"ffm-hub-{self.hub_id}-{self.federation}", 63)
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            port=self.port,
            properties=self.properties,
            server=f"{_label(f'ffm-hub-{self.hub_id}', 50)}.local.",
            parsed_addresses=self.addresses,
        )
        zc = open_zeroconf(self.interfaces, self.ip_version)
        try:
            zc.register_service(info, allow_name_change=True)
        except Exception as exc:
            zc.close()
            raise TransportError(f"cannot advertise the hub with zeroconf: {exc}") from exc
        self._zc, self._info = zc, info
        log.info(
            "advertising hub %s (federation %s, broker %s) as %s on %s",
            self.hub_id,
            self.federation,
            self.broker_url,
            info.name,
            ", ".join(self.addresses),
        )

    def stop(self) -> None:
        """Withdraw the record (a goodbye packet, so browsers forget it at once) and close the sockets."""
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None or info is None:
            return
        try:
            zc.unregister_service(info)
        except Exception as exc:  # the sockets close anyway; browsers expire the record by its TTL
            log.warning("could not withdraw the zeroconf record %s: %s", info.name, exc)
        finally:
            zc.close()

    def __enter__(self) -> HubAdvertiser:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
