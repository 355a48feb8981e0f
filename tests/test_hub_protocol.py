"""The hub's protocol on the in-memory transport, with plain arrays for a model (fast, no torch).

Each bad input gets a rejection with its reason and changes nothing; good updates get receipts;
τ triggers FedAvg; pulls, hellos and restarts behave.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from wire_device import FED, Device

from ffm_edge.errors import ConfigError
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_edge.wire import (
    Hello,
    Manifest,
    PullError,
    PullRequest,
    Receipt,
    Rejection,
    UpdateMeta,
    decode_global,
    encode_update,
    pack_envelope,
)
from ffm_edge.wire.codec import FORMAT_VERSION
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.store import SqliteStore

STATE = {"lora_A": np.zeros((2, 3), np.float32), "head": np.ones(2, np.float32)}


@pytest.fixture()
def setup(tmp_path: Path):
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(HubSettings(federation=FED, tau=2, server_lr=1.0), transport, store, initial_state=lambda: STATE)
    hub.start()
    yield broker, hub, store
    hub.stop()
    store.close()


def delta(a: float = 1.0, h: float = 0.0) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), a, np.float32), "head": np.full(2, h, np.float32)}


def test_tau_triggers_sample_weighted_fedavg(setup) -> None:
    broker, hub, store = setup
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    d1.send_update(delta(1.0, 2.0), n=10)
    receipt = d1.next(Receipt)
    assert receipt.queue_length == 1 and not receipt.duplicate and hub.current_version == 0
    d2.send_update(delta(4.0, 0.0), n=30)
    assert d2.next(Receipt).queue_length == 2
    assert hub.wait_idle()
    assert hub.current_version == 1
    _, state = decode_global(store.load_version(1))
    np.testing.assert_allclose(state["lora_A"], np.full((2, 3), (1 * 10 + 4 * 30) / 40))  # 3.25
    np.testing.assert_allclose(state["head"], 1.0 + (2 * 10 + 0 * 30) / 40)  # 1.5
    assert store.queued() == []


def test_duplicate_update_is_receipted_once_and_counted_once(setup) -> None:
    broker, hub, store = setup
    d1 = Device(broker, "d1")
    meta = UpdateMeta(FED, "d1", "dup-1", 0, "lora", 10, "fp32", time.time())
    frame = encode_update(meta, delta())
    d1.send_frame(frame, "dup-1")
    assert d1.next(Receipt).duplicate is False
    d1.send_frame(frame, "dup-1")  # e.g. the edge never saw the receipt and sent again
    again = d1.next(Receipt)
    assert again.duplicate is True and again.queue_length == 1
    assert hub.current_version == 0 and len(store.queued()) == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (delta(float("nan")), {}), "non_finite"),
        (lambda: (delta(float("inf")), {}), "non_finite"),
        (lambda: ({"lora_A": np.zeros((3, 3), np.float32)}, {}), "shape_mismatch"),
        (lambda: ({"other": np.zeros(2, np.float32)}, {}), "unknown_tensors"),
        (lambda: (delta(), {"federation": "elsewhere"}), "wrong_federation"),
        (lambda: (delta(), {"device": "d9"}), "device_mismatch"),
        (lambda: (delta(), {"base_version": 5}), "malformed"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(setup, make, reason: str) -> None:
    broker, hub, store = setup
    d1 = Device(broker, "d1")
    tensors, overrides = make()
    update_id = d1.send_update(tensors, **overrides)
    rejection = d1.next(Rejection)
    assert (rejection.update_id, rejection.reason) == (update_id, reason)
    assert store.queued() == [] and hub.rejections == {reason: 1}


def test_updates_over_the_norm_bound_are_rejected_and_at_the_bound_accepted(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    settings = HubSettings(federation=FED, tau=5, max_update_norm=3.0)
    hub = Hub(settings, transport, store, initial_state=lambda: STATE)
    hub.start()
    try:
        d1 = Device(broker, "d1")
        # ||delta(1, 0)|| = sqrt(6) ~ 2.45 <= 3; ||delta(1, 1)|| = sqrt(8) ~ 2.83; ||delta(1, 2)|| = sqrt(14) ~ 3.74.
        for h in (0.0, 1.0):
            d1.send_update(delta(1.0, h))
            assert d1.next(Receipt).duplicate is False
        over = d1.send_update(delta(1.0, 2.0))
        rejection = d1.next(Rejection)
        assert (rejection.update_id, rejection.reason) == (over, "norm_exceeded")
        assert "3.742" in rejection.detail and "bound 3" in rejection.detail
        assert hub.rejections == {"norm_exceeded": 1} and len(store.queued()) == 2
    finally:
        hub.stop()
        store.close()
    with pytest.raises(ConfigError, match="max_update_norm"):
        HubSettings(federation=FED, max_update_norm=float("nan"))


def test_a_tensor_of_the_wrong_dtype_is_rejected_as_wrong_dtype(setup) -> None:
    broker, hub, store = setup
    d1 = Device(broker, "d1")
    meta = UpdateMeta(FED, "d1", "f64-1", 0, "lora", 10, "fp32", time.time())
    # float64 values in a payload that declares the fp32 codec: safetensors writes it as F64.
    payload = safetensors.numpy.save(
        {"lora_A": np.zeros((2, 3), np.float64), "head": np.ones(2, np.float32)},
        metadata={"ffm_format": FORMAT_VERSION, "ffm_codec": "fp32"},
    )
    d1.send_frame(pack_envelope("update", meta.to_dict(), payload), "f64-1")
    rejection = d1.next(Rejection)
    assert (rejection.update_id, rejection.reason) == ("f64-1", "wrong_dtype")
    assert "lora_A" in rejection.detail and "F64" in rejection.detail
    assert store.queued() == [] and hub.rejections == {"wrong_dtype": 1}


def test_corrupted_and_malformed_frames_are_rejected(setup) -> None:
    broker, hub, store = setup
    d1 = Device(broker, "d1")
    meta = UpdateMeta(FED, "d1", "bad-1", 0, "lora", 10, "fp32", time.time())
    frame = bytearray(encode_update(meta, delta()))
    frame[-1] ^= 0xFF  # flip a payload byte: the envelope's sha256 no longer matches
    d1.send_frame(bytes(frame), "bad-1")
    assert d1.next(Rejection).reason == "hash_mismatch"
    d1.send_frame(b"not a frame at all", "bad-2")
    assert d1.next(Rejection).reason == "malformed"
    d1.transport.publish(d1.topics.uplink_update("d1"), b"\x00garbage")  # not even a chunk: dropped
    assert hub.wait_idle()
    assert store.queued() == [] and hub.counters["accepted"] == 0


def test_hello_gets_the_manifest_and_pull_gets_the_version(setup) -> None:
    broker, _hub, _store = setup
    d1 = Device(broker, "d1")
    d1.control(Hello("d1", None, "lora"))
    manifest = d1.next(Manifest)
    assert manifest.version == 0 and manifest.tensors == 2
    d1.control(PullRequest("d1", -1, "pull-1"))
    done = d1.next(object)
    while not hasattr(done, "transfer_id") or not hasattr(done, "data"):
        done = d1.next(object)
    meta, state = decode_global(done.data)
    assert meta.version == 0 and set(state) == set(STATE)
    d1.control(PullRequest("d1", 7, "pull-2"))
    assert d1.next(PullError).reason == "unknown_version"


def test_restart_resumes_the_queue_and_aggregates(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    store = SqliteStore(tmp_path / "store")
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    hub = Hub(HubSettings(federation=FED, tau=2), transport, store, initial_state=lambda: STATE)
    hub.start()
    d1 = Device(broker, "d1")
    d1.send_update(delta(2.0), n=5)
    d1.next(Receipt)
    hub.stop()
    store.close()
    # A new hub process on the same store: the receipted update is still queued.
    store = SqliteStore(tmp_path / "store")
    hub = Hub(HubSettings(federation=FED, tau=2), transport, store, initial_state=lambda: {})
    hub.start()
    assert hub.current_version == 0 and len(store.queued()) == 1
    d1.send_update(delta(4.0), n=15)
    d1.next(Receipt)
    assert hub.wait_idle()
    assert hub.current_version == 1
    np.testing.assert_allclose(hub.global_state()["lora_A"], (2 * 5 + 4 * 15) / 20)
    hub.stop()
    store.close()


def test_liveness_from_messages_presence_and_timeout(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    settings = HubSettings(federation=FED, tau=5, device_timeout=0.3)
    hub = Hub(settings, transport, store, initial_state=lambda: STATE)
    hub.start()
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    d1.control(Hello("d1", None, "lora"))
    d2.control(Hello("d2", None, "lora"))
    d1.next(Manifest)
    d2.next(Manifest)
    assert hub.wait_idle() and hub.online == {"d1", "d2"}
    d2.transport.publish(d2.topics.presence("d2"), b"offline")  # what a Last Will says
    assert hub.wait_idle() and hub.online == {"d1"}
    deadline = time.monotonic() + 5
    while hub.online and time.monotonic() < deadline:  # d1 says nothing more: timed out
        time.sleep(0.05)
    assert hub.online == set()
    hub.stop()
    store.close()


def test_mixed_strategies_aggregate_per_tensor_and_pull_their_own_tensors(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    union = {"lora_A": np.zeros(3, np.float32), "prompt": np.zeros(4, np.float32), "head": np.zeros(2, np.float32)}
    hub = Hub(
        HubSettings(federation=FED, tau=2),
        transport,
        store,
        initial_state=lambda: union,
        strategy_tensors={"lora": ["lora_A", "head"], "prompt": ["prompt", "head"]},
    )
    hub.start()
    d1, d2 = Device(broker, "d1"), Device(broker, "d2")
    # A LoRA device may not send prompt tensors, and an unknown strategy is refused.
    d1.send_update({"prompt": np.ones(4, np.float32)}, strategy="lora")
    assert d1.next(Rejection).reason == "unknown_tensors"
    d1.send_update({"head": np.ones(2, np.float32)}, strategy="full_q8")
    assert d1.next(Rejection).reason == "unknown_strategy"
    d1.send_update({"lora_A": np.full(3, 2.0, np.float32), "head": np.full(2, 1.0, np.float32)}, n=10)
    d1.next(Receipt)
    d2.send_update(
        {"prompt": np.full(4, 5.0, np.float32), "head": np.full(2, 4.0, np.float32)}, n=30, strategy="prompt"
    )
    d2.next(Receipt)
    assert hub.wait_idle() and hub.current_version == 1
    state = hub.global_state()
    np.testing.assert_allclose(state["lora_A"], 2.0)  # only the LoRA device trained it: its delta, undiluted
    np.testing.assert_allclose(state["prompt"], 5.0)  # only the prompt device
    np.testing.assert_allclose(state["head"], (1.0 * 10 + 4.0 * 30) / 40)  # both, weighted by n_k
    # Each device pulls only what its strategy trains.
    d2.control(PullRequest("d2", -1, "pull-p", "prompt"))
    done = d2.next(object)
    while not hasattr(done, "data"):
        done = d2.next(object)
    meta, pulled = decode_global(done.data)
    assert meta.version == 1 and meta.strategy == "prompt" and set(pulled) == {"prompt", "head"}
    np.testing.assert_allclose(pulled["head"], 3.25)
    hub.stop()
    store.close()


@pytest.fixture(params=["memory", "amqtt", "mosquitto"])
def make_transport(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Transport]:
    """Transports for a hub and its devices: the in-memory fake, or MQTT to a real broker."""
    if request.param == "memory":
        broker = InMemoryBroker()
        return lambda client_id: InMemoryTransport(broker, client_id)
    real: ManagedBroker = request.getfixturevalue(f"{request.param}_broker")
    return lambda client_id: MqttTransport(real.host, real.port, client_id=f"{client_id}-{tmp_path.name}")


def test_stale_updates_are_weighted_down_and_too_stale_ones_rejected(
    tmp_path: Path, make_transport: Callable[[str], Transport]
) -> None:
    transport = make_transport("hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    settings = HubSettings(federation=FED, tau=1, staleness="polynomial", staleness_alpha=0.5, max_staleness=1)
    hub = Hub(settings, transport, store, initial_state=lambda: STATE)
    hub.start()
    d1 = Device(None, "d1", transport=make_transport("d1"))
    for base in (0, 1):  # tau = 1: each update makes a version; the hub is now at version 2
        d1.send_update(delta(0.0), base=base)
        d1.next(Receipt)
    assert hub.wait_idle() and hub.current_version == 2
    d1.send_update(delta(1.0), base=0)  # 2 versions behind: over max_staleness = 1
    rejection = d1.next(Rejection)
    assert rejection.reason == "stale" and "2 behind" in rejection.detail
    hub.stop()
    # Same store, tau = 2: a fresh update (base 2) and one a version behind (base 1) are averaged with
    # weights n * (1 + staleness) ** -0.5: 10 * 1 and 10 * 2 ** -0.5 = 7.0711.
    hub = Hub(HubSettings(federation=FED, tau=2, max_staleness=1), transport, store, initial_state=lambda: STATE)
    hub.start()
    d1.send_update(delta(1.0), n=10, base=2)
    d1.next(Receipt)
    d1.send_update(delta(3.0), n=10, base=1)
    d1.next(Receipt)
    assert hub.wait_idle() and hub.current_version == 3
    expected = (10 * 1.0 + 10 * 2**-0.5 * 3.0) / (10 + 10 * 2**-0.5)  # 1.8284
    np.testing.assert_allclose(hub.global_state()["lora_A"], expected, rtol=1e-6)
    latest = store.latest_version()
    assert latest is not None and latest.metrics["mean_staleness"] == 0.5
    hub.stop()
    d1.transport.close()
    transport.close()
    store.close()


def test_retention_prunes_old_versions_and_late_joiners_get_the_current_one(
    tmp_path: Path, make_transport: Callable[[str], Transport]
) -> None:
    transport = make_transport("hub")
    transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(HubSettings(federation=FED, tau=1, keep_versions=2), transport, store, initial_state=lambda: STATE)
    hub.start()
    d1 = Device(None, "d1", transport=make_transport("d1"))
    for base in range(3):
        d1.send_update(delta(1.0), base=base)
        d1.next(Receipt)
    assert hub.wait_idle() and hub.current_version == 3
    assert [v.version for v in store.versions()] == [2, 3]
    late = Device(None, "late", transport=make_transport("late"))  # joins after a week: hello, then the latest
    late.control(Hello("late", None, "lora"))
    assert late.next(Manifest).version == 3
    late.control(PullRequest("late", 0, "pull-old"))
    assert late.next(PullError).reason == "unknown_version"  # pruned
    hub.stop()
    for device in (d1, late):
        device.transport.close()
    transport.close()
    store.close()
