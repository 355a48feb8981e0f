"""Managed brokers: selection, start/stop/restart, errors a person can act on."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from ffm_edge.errors import BrokerError, ConfigError
from ffm_edge.transport import MqttTransport
from ffm_hub import brokers
from ffm_hub.brokers import AmqttBroker, ManagedBroker, MosquittoBroker, free_port, start_managed_broker

pytestmark = pytest.mark.usefixtures("no_thread_leaks")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _round_trip(broker: ManagedBroker) -> None:
    """A client can connect and get a message through."""
    got = threading.Event()
    with MqttTransport.from_url(broker.url, "probe") as client:
        client.subscribe("probe", lambda topic, payload: got.set())
        client.publish("probe", b"x", timeout=5.0)
        assert got.wait(5.0)


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_binary")
def test_auto_prefers_mosquitto(tmp_path: Path) -> None:
    broker = start_managed_broker("auto", workdir=tmp_path)
    try:
        assert isinstance(broker, MosquittoBroker)
        assert broker.kind == "mosquitto"
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        _round_trip(broker)
        assert (tmp_path / "mosquitto.conf").read_text().startswith("# written by ffm_hub")
    finally:
        broker.stop()


def test_auto_falls_back_to_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokers, "find_mosquitto", lambda: None)
    broker = start_managed_broker("auto")
    try:
        assert isinstance(broker, AmqttBroker)
        assert broker.kind == "amqtt"
        _round_trip(broker)
    finally:
        broker.stop()


def test_forced_amqtt() -> None:
    with start_managed_broker("amqtt") as broker:
        assert broker.kind == "amqtt"
        assert broker.running
        _round_trip(broker)
    assert not broker.running


def test_forced_mosquitto_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokers, "find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        start_managed_broker("mosquitto")


def test_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rabbitmq"):
        start_managed_broker("rabbitmq")


def test_stop_frees_the_port(mqtt_broker: ManagedBroker) -> None:
    port = mqtt_broker.port
    assert not _port_is_free(port)
    mqtt_broker.stop()
    assert not mqtt_broker.running
    assert _port_is_free(port)
    mqtt_broker.stop()  # twice is fine


def test_restart_keeps_the_port(mqtt_broker: ManagedBroker) -> None:
    port = mqtt_broker.port
    mqtt_broker.restart()
    assert mqtt_broker.running
    assert mqtt_broker.port == port
    _round_trip(mqtt_broker)


def test_explicit_port(free_tcp_port: int) -> None:
    with AmqttBroker(port=free_tcp_port) as broker:
        assert broker.port == free_tcp_port
        assert broker.url == f"mqtt://127.0.0.1:{free_tcp_port}"


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def test_port_in_use_is_a_broker_error(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        broker: ManagedBroker
        if kind == "mosquitto":
            broker = MosquittoBroker(port=port, workdir=tmp_path, binary=request.getfixturevalue("mosquitto_binary"))
        else:
            broker = AmqttBroker(port=port)
        try:
            with pytest.raises(BrokerError, match=str(port)) as excinfo:
                broker.start()
        finally:
            broker.stop()
        assert "already in use" in str(excinfo.value).lower()
    finally:
        blocker.close()


def test_find_mosquitto_looks_in_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(brokers.shutil, "which", lambda name: None)
    found = brokers.find_mosquitto()
    assert found is None or found in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def test_free_port_is_bindable() -> None:
    assert _port_is_free(free_port())
