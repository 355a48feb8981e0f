"""zeroconf discovery on loopback: the hub advertises, the edge finds it (or says how to do without)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from zeroconf import ServiceInfo

from ffm_edge.discovery import LOOPBACK_INTERFACES, SERVICE_TYPE, discover_hub, hub_info_from_service
from ffm_edge.errors import ConfigError, DiscoveryError
from ffm_hub.advertise import HubAdvertiser

pytestmark = pytest.mark.usefixtures("no_thread_leaks")


@pytest.fixture
def two_hubs() -> Iterator[tuple[str, str]]:
    """Two hubs of two fresh federations advertised on loopback (registered in parallel: mDNS probing
    takes ~1.7 s per record)."""
    fed_a, fed_b = f"fed-a-{uuid.uuid4().hex[:6]}", f"fed-b-{uuid.uuid4().hex[:6]}"
    advertisers = [
        HubAdvertiser(fed_a, "mqtt://127.0.0.1:18831", hub_id="hub-a", port=18831, interfaces=LOOPBACK_INTERFACES),
        HubAdvertiser(fed_b, "mqtt://127.0.0.1:18832", hub_id="hub-b", port=18832, interfaces=LOOPBACK_INTERFACES),
    ]
    threads = [threading.Thread(target=a.start) for a in advertisers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10.0)
    try:
        assert all(a.running for a in advertisers)
        yield fed_a, fed_b
    finally:
        for a in advertisers:
            a.stop()


def test_discover_on_loopback_and_filter_by_federation(two_hubs: tuple[str, str]) -> None:
    fed_a, fed_b = two_hubs
    hub = discover_hub(fed_a, timeout=5.0, interfaces=LOOPBACK_INTERFACES)
    assert (hub.federation, hub.hub_id, hub.protocol) == (fed_a, "hub-a", "1")
    assert hub.broker_url == "mqtt://127.0.0.1:18831"
    assert hub.port == 18831
    assert "127.0.0.1" in hub.addresses
    assert hub.name.endswith(SERVICE_TYPE)

    other = discover_hub(fed_b, timeout=5.0, interfaces=LOOPBACK_INTERFACES)
    assert (other.federation, other.hub_id, other.broker_url) == (fed_b, "hub-b", "mqtt://127.0.0.1:18832")

    # The error names the hubs it saw; 3 s lets a loaded machine see them (0.5 s failed once in CI with
    # two experiment jobs on the 2 cores: nothing was seen in time).
    with pytest.raises(DiscoveryError, match="serves federation"):
        discover_hub(f"fed-none-{uuid.uuid4().hex[:6]}", timeout=3.0, interfaces=LOOPBACK_INTERFACES)


def test_timeout_raises_discovery_error_with_hint() -> None:
    start = time.monotonic()
    with pytest.raises(DiscoveryError, match="--broker mqtt://") as excinfo:
        discover_hub(f"nobody-{uuid.uuid4().hex[:6]}", timeout=0.3, interfaces=LOOPBACK_INTERFACES)
    assert time.monotonic() - start < 2.0
    assert "nobody-" in str(excinfo.value)


def _service(properties: dict[str, str], addresses: list[str], port: int = 1883) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"test.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server="test.local.",
        addresses=[socket.inet_aton(a) for a in addresses],
    )


def test_wildcard_broker_host_is_replaced_by_the_advertised_address() -> None:
    info = _service({"fed": "f", "proto": "1", "broker": "mqtt://0.0.0.0:1884", "hub": "h"}, ["192.0.2.7"], 1884)
    hub = hub_info_from_service(info)
    assert hub.broker_url == "mqtt://192.0.2.7:1884"
    assert hub.addresses == ("192.0.2.7",)


def test_missing_broker_url_falls_back_to_address_and_port() -> None:
    hub = hub_info_from_service(_service({"fed": "f", "proto": "1", "hub": "h"}, ["192.0.2.8"], 1999))
    assert hub.broker_url == "mqtt://192.0.2.8:1999"


def test_bad_broker_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        hub_info_from_service(_service({"fed": "f", "proto": "1", "broker": "http://x"}, ["192.0.2.9"]))


def test_advertiser_validates_its_arguments() -> None:
    with pytest.raises(ConfigError):
        HubAdvertiser("", "mqtt://127.0.0.1:1883", hub_id="h", port=1883)
    with pytest.raises(ConfigError):
        HubAdvertiser("fed", "ftp://127.0.0.1", hub_id="h", port=1883)
    advertiser = HubAdvertiser("fed", "mqtt://127.0.0.1:1883", hub_id="h", port=1883, interfaces=LOOPBACK_INTERFACES)
    assert advertiser.properties == {"fed": "fed", "proto": "1", "broker": "mqtt://127.0.0.1:1883", "hub": "h"}
    assert advertiser.addresses == ["127.0.0.1"]
    advertiser.stop()  # never started: nothing to do
