"""The edge side: the outbox keeps updates until receipted, and a client finds its hub by zeroconf."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.outbox import Outbox
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport
from ffm_edge.wire import UpdateMeta, encode_update
from ffm_hub.advertise import HubAdvertiser
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

FED = "fed"
STATE = {"lora_A": np.zeros((2, 3), np.float32)}


def tiny_data() -> LabeledData:
    return LabeledData(get_task("sst2"), [("good", None), ("bad", None)], np.array([1, 0]))


def frame_for(update_id: str, value: float, device: str = "phone") -> bytes:
    meta = UpdateMeta(FED, device, update_id, 0, "lora", 4, "fp32", time.time())
    return encode_update(meta, {"lora_A": np.full((2, 3), value, np.float32)})


def test_outbox_put_pending_acknowledge_reject(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "half-written.tmp").write_bytes(b"x")  # left by a crash mid-write
    outbox = Outbox(tmp_path)
    outbox.put("u1", b"one")
    time.sleep(0.01)
    outbox.put("u2", b"two")
    assert not (tmp_path / "half-written.tmp").exists()
    assert [item.update_id for item in Outbox(tmp_path).pending()] == ["u1", "u2"]  # survives a reopen
    outbox.acknowledge("u1")
    outbox.reject("u2", "non_finite", "NaN in lora_A")
    assert outbox.pending() == []
    assert json.loads((tmp_path / "rejected" / "u2.json").read_text())["reason"] == "non_finite"
    with pytest.raises(ConfigError):
        outbox.put("../escape", b"x")


@pytest.fixture()
def memory_hub(tmp_path: Path) -> Iterator[tuple[InMemoryBroker, Hub, SqliteStore]]:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "hub")
    hub = Hub(HubSettings(federation=FED, tau=10), transport, store, initial_state=lambda: STATE)
    hub.start()
    yield broker, hub, store
    hub.stop()
    store.close()


def test_update_left_in_the_outbox_is_sent_after_a_restart(
    tmp_path: Path, memory_hub: tuple[InMemoryBroker, Hub, SqliteStore]
) -> None:
    broker, _hub, store = memory_hub
    # The previous process wrote the update durably, then died before any receipt.
    Outbox(tmp_path / "phone" / "outbox").put("left-behind", frame_for("left-behind", 1.0))
    Outbox(tmp_path / "phone" / "outbox").put("poisoned", frame_for("poisoned", float("nan")))
    client = EdgeClient(
        "minilm-l6-v2",
        tiny_data(),
        device_id="phone",
        federation=FED,
        transport=InMemoryTransport(broker, "phone"),
        state_dir=tmp_path / "phone",
        heartbeat_interval=0,
    )
    with client:
        receipts = client.send_pending()
    assert [r.update_id for r in receipts] == ["left-behind"]
    assert store.get_update("left-behind") is not None
    assert store.get_update("poisoned") is None
    assert client.outbox.pending() == []  # receipted or set aside with its reason, never resent
    assert json.loads((tmp_path / "phone" / "outbox" / "rejected" / "poisoned.json").read_text())["reason"] == (
        "non_finite"
    )


def test_client_finds_the_hub_with_zeroconf(tmp_path: Path, amqtt_broker: ManagedBroker) -> None:
    transport = MqttTransport(amqtt_broker.host, amqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    transport.connect()
    store = SqliteStore(tmp_path / "hub")
    hub = Hub(HubSettings(federation="zc-" + tmp_path.name[-8:]), transport, store, initial_state=lambda: STATE)
    hub.start()
    federation = hub.settings.federation
    advertiser = HubAdvertiser(
        federation, amqtt_broker.url, hub_id="hub", port=amqtt_broker.port, interfaces=["127.0.0.1"]
    )
    advertiser.start()
    try:
        client = EdgeClient(
            "minilm-l6-v2",
            tiny_data(),
            device_id="phone",
            federation=federation,
            broker=None,  # no broker configured: discover it
            state_dir=tmp_path / "phone",
            heartbeat_interval=0,
        )
        with client:
            assert client.latest_manifest(timeout=20).version == 0
    finally:
        advertiser.stop()
        hub.stop()
        transport.close()
        store.close()


def test_stop_ends_a_round_that_waits_for_the_hub(tmp_path: Path) -> None:
    import threading

    from ffm_edge.client import ClientStopped

    broker = InMemoryBroker()  # no hub at all: the round waits for a manifest that never comes
    client = EdgeClient(
        "minilm-l6-v2",
        tiny_data(),
        device_id="phone",
        federation=FED,
        transport=InMemoryTransport(broker, "phone"),
        state_dir=tmp_path / "phone",
        heartbeat_interval=0,
        version_timeout=600,
    )
    with client:
        threading.Timer(0.5, client.stop).start()
        started = time.monotonic()
        with pytest.raises(ClientStopped):
            client.run_round()
        assert time.monotonic() - started < 10
        assert client.run_forever(rounds=3) == []  # already stopped: returns at once


def test_forcing_a_strategy_that_cannot_fit_fails_before_any_weight_loads(tmp_path: Path) -> None:
    from ffm_edge.planner import InsufficientMemoryError

    started = time.monotonic()
    with pytest.raises(InsufficientMemoryError, match="strategy 'full_q8' needs at least"):
        EdgeClient(
            "minilm-l6-v2",
            tiny_data(),
            device_id="phone",
            federation=FED,
            strategy="full_q8",
            memory_budget="64MB",
            state_dir=tmp_path / "phone",
        )
    assert time.monotonic() - started < 30  # the planner decides from the spec alone


def test_auto_strategy_follows_the_budget(tmp_path: Path) -> None:
    def client(budget: str) -> EdgeClient:
        return EdgeClient(
            "minilm-l6-v2",
            tiny_data(),
            device_id="phone",
            federation=FED,
            strategy="auto",
            memory_budget=budget,
            state_dir=tmp_path / "phone",
            heartbeat_interval=0,
        )

    roomy = client("64GB")
    assert roomy.trainer.strategy.name == "full_q8" and roomy.plan is not None
    tight_budget = roomy.plan.candidates[-1].required_bytes + 1  # only the cheapest configuration fits
    tight = client(str(tight_budget))
    assert tight.plan is not None and tight.plan.choice is not None
    assert tight.trainer.strategy.name == tight.plan.choice.strategy == "head"
