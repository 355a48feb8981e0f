"""A scripted edge device that speaks the wire protocol directly, for hub tests (in-memory or a real broker)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffm_edge.client import EdgeClient, RoundResult
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, Transport
from ffm_edge.wire import (
    ChunkAssembler,
    Message,
    Topics,
    UpdateMeta,
    decode_message,
    encode_message,
    encode_update,
    split_frame,
)
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import QueuedUpdate, SqliteStore

FED = "fed"
STATE = {"lora_A": np.zeros((2, 3), np.float32), "head": np.ones(2, np.float32)}


def start_hub(
    transport: Transport,
    store: SqliteStore,
    settings: HubSettings,
    initial: Mapping[str, np.ndarray] = STATE,
    **kwargs: Any,
) -> Hub:
    """A started Hub on ``transport`` (connected here) and ``store``, whose version 0 is ``initial``;
    ``kwargs`` go to :class:`Hub` (strategy_tensors, security, ...). The caller stops it."""
    transport.connect()
    hub = Hub(settings, transport, store, initial_state=lambda: initial, **kwargs)
    hub.start()
    return hub


@contextlib.contextmanager
def memory_hub(store_dir: Path, tau: int = 2) -> Iterator[tuple[InMemoryBroker, Hub]]:
    """A hub on STATE over a fresh in-memory broker, its SQLite store in ``store_dir``."""
    broker = InMemoryBroker()
    store = SqliteStore(store_dir)
    hub = start_hub(InMemoryTransport(broker, "hub"), store, HubSettings(federation=FED, tau=tau))
    try:
        yield broker, hub
    finally:
        hub.stop()
        store.close()


class Device:
    """A scripted device speaking the wire protocol directly."""

    def __init__(self, broker: InMemoryBroker | None, device_id: str, transport: Transport | None = None) -> None:
        """On the in-memory ``broker``, or on any ``transport`` given (e.g. MQTT to a real broker)."""
        self.id = device_id
        self.topics = Topics(FED)
        self.inbox: queue.Queue[object] = queue.Queue()
        self.assembler = ChunkAssembler()
        if transport is None:
            assert broker is not None
            transport = InMemoryTransport(broker, device_id)
        self.transport = transport
        self.transport.subscribe(self.topics.downlink_control(device_id), self._on_ctl)
        self.transport.subscribe(self.topics.downlink_global(device_id), self._on_chunk)
        self.transport.connect()

    def _on_ctl(self, _topic: str, payload: bytes) -> None:
        self.inbox.put(decode_message(payload))

    def _on_chunk(self, _topic: str, payload: bytes) -> None:
        done = self.assembler.add(payload)
        if done is not None:
            self.inbox.put(done)

    def send_frame(self, frame: bytes, transfer_id: str, chunk_size: int = 1024) -> None:
        for chunk in split_frame(frame, chunk_size=chunk_size, transfer_id=transfer_id):
            self.transport.publish(self.topics.uplink_update(self.id), chunk)

    def send_update(self, delta: dict[str, np.ndarray], *, n: int = 10, base: int = 0, **overrides: object) -> str:
        fields: dict[str, object] = dict(
            federation=FED, device=self.id, update_id=uuid.uuid4().hex, base_version=base, strategy="lora",
            num_samples=n, codec="fp32", created_at=time.time(),
        )  # fmt: skip
        fields.update(overrides)
        meta = UpdateMeta(**fields)  # type: ignore[arg-type]
        self.send_frame(encode_update(meta, delta), meta.update_id)
        return meta.update_id

    def control(self, message: Message) -> None:
        self.transport.publish(self.topics.uplink_control(self.id), encode_message(message))

    def next(self, kind: type, timeout: float = 10.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, kind):
                return item
        raise AssertionError(f"no {kind.__name__} within {timeout}s")


def stored_update(store: SqliteStore, update_id: str) -> QueuedUpdate:
    """The store's record of an update the caller knows was accepted; fails the test if it is missing."""
    update = store.get_update(update_id)
    assert update is not None, f"update {update_id} is not in the store"
    return update


def run_edges(edges: Sequence[EdgeClient], rounds: int, timeout: float = 600) -> list[list[RoundResult]]:
    """Run every edge for ``rounds`` rounds, each in its own thread (as separate devices would), and
    return each edge's round results; an exception on any edge fails the calling test."""
    results: list[list[RoundResult]] = [[] for _ in edges]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with edges[i]:
                results[i] = edges[i].run_forever(rounds)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(edges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    return results
