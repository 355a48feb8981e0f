"""Shared fixtures: real MQTT brokers (Mosquitto subprocess, in-process amqtt), the in-memory broker,
free ports and a thread-leak check.

Mosquitto tests are skipped where the binary is missing, unless ``FFM_REQUIRE_MOSQUITTO=1`` (CI sets it)
turns the missing binary into a failure, so CI can never silently stop testing the real broker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ffm_edge.transport.memory import InMemoryBroker
from ffm_hub.brokers import AmqttBroker, ManagedBroker, MosquittoBroker, find_mosquitto, free_port

__all__ = ["Inbox", "free_port", "require_mosquitto"]


class Inbox:
    """A message handler that records what it receives, and on which thread, and lets a test wait."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.threads: set[int] = set()
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self.threads.add(threading.get_ident())
            self._cond.notify_all()

    @property
    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _ in self.messages]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Wait until at least ``count`` messages arrived; fail the test on timeout."""
        return self.wait_until(lambda msgs: len(msgs) >= count, timeout, f"{count} message(s)")

    def wait_for_payload(self, topic: str, payload: bytes, timeout: float = 5.0) -> None:
        """Wait until ``payload`` arrived on ``topic``."""
        self.wait_until(lambda msgs: (topic, payload) in msgs, timeout, f"{payload!r} on {topic}")

    def wait_until(
        self,
        predicate: Callable[[list[tuple[str, bytes]]], bool],
        timeout: float = 5.0,
        what: str = "condition",
    ) -> list[tuple[str, bytes]]:
        """Wait until ``predicate(messages)`` holds; fail the test on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                pytest.fail(f"timed out after {timeout} s waiting for {what}; got {self.messages!r:.300}")
            return list(self.messages)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()


def require_mosquitto() -> str:
    """The mosquitto binary; skips the test if missing (fails instead when FFM_REQUIRE_MOSQUITTO=1)."""
    binary = find_mosquitto()
    if binary is None:
        message = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get("FFM_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"{message}, and FFM_REQUIRE_MOSQUITTO=1 requires it")
        pytest.skip(message)
    return binary


@pytest.fixture
def inbox() -> type[Inbox]:
    """The :class:`Inbox` class: ``box = inbox()`` makes a recording message handler."""
    return Inbox


@pytest.fixture
def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_port("127.0.0.1")


@pytest.fixture
def mosquitto_binary() -> str:
    """Path of the mosquitto binary (skip, or fail under FFM_REQUIRE_MOSQUITTO=1, when missing)."""
    return require_mosquitto()


@pytest.fixture
def mosquitto_broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A started Mosquitto on a free loopback port, its config and log under ``tmp_path``."""
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", binary=mosquitto_binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[AmqttBroker]:
    """A started in-process amqtt broker on a free loopback port."""
    broker = AmqttBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(
    params=[
        pytest.param("amqtt", id="amqtt"),
        pytest.param("mosquitto", id="mosquitto", marks=pytest.mark.mosquitto),
    ]
)
def mqtt_broker(request: pytest.FixtureRequest) -> ManagedBroker:
    """Each real broker in turn (the test runs once per broker); ``.kind`` says which."""
    broker: ManagedBroker = request.getfixturevalue(f"{request.param}_broker")
    return broker


@pytest.fixture
def memory_broker() -> InMemoryBroker:
    """A fresh in-memory broker for InMemoryTransport tests."""
    return InMemoryBroker()


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail the test if threads it started are still alive shortly after it ends.

    Use it with ``pytestmark = pytest.mark.usefixtures("no_thread_leaks")``; list it before other
    fixtures that start threads so that their teardown runs first.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    leaked: list[threading.Thread] = []
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads leaked by the test: {[t.name for t in leaked]}")


@pytest.fixture(scope="session", autouse=True)
def isolated_ffm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Quantized checkpoints and capability checks cached by the tests go to a temporary folder."""
    import os

    previous = os.environ.get("FFM_CACHE_DIR")
    folder = tmp_path_factory.mktemp("ffm-cache")
    os.environ["FFM_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FFM_CACHE_DIR", None)
    else:
        os.environ["FFM_CACHE_DIR"] = previous
