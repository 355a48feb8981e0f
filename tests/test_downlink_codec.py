"""The downlink codec: devices pull global versions in fp16 or int8, the hub keeps fp32.

Promises checked (scripted devices on the in-memory fake, amqtt and Mosquitto; one real EdgeClient on
both real brokers):

- a pull is encoded with ``HubSettings.downlink_codec``, and the manifest says so;
- what a device decodes is the hub's global within the codec's rounding (fp16: relative 2^-11;
  int8: half a quantization step per element), and the frame is about half or a quarter of fp32's;
- the stored version stays fp32 and exact, so aggregation adds deltas to the exact state and a hub that
  restarts (or is killed) resumes the exact state, never a rounded one;
- a state that fp16 cannot hold (|x| > 65504) is served fp32 rather than as inf;
- strategy-filtered pulls and signed frames compose with the codec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from wire_device import FED, Device, start_hub

from ffm_edge.client import EdgeClient
from ffm_edge.data import LabeledData, get_task
from ffm_edge.errors import ConfigError
from ffm_edge.signing import verify_global_frame
from ffm_edge.spec import load_model_spec
from ffm_edge.trainer import TorchTrainer
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport, Transport
from ffm_edge.wire import PullRequest, Receipt, decode_global, decode_update, quantization_step
from ffm_edge.wire.chunking import Completed
from ffm_hub.brokers import ManagedBroker
from ffm_hub.hub import STORED_CODEC, Hub, HubSettings, downlink_codec_for
from ffm_hub.signing import HubSecurity
from ffm_hub.store import SqliteStore

RNG = np.random.default_rng(7)
#: Big enough that headers do not dominate the byte ratios (8,192 + 64 values).
STATE = {
    "lora_A": RNG.normal(0, 0.05, (128, 64)).astype(np.float32),
    "head": RNG.normal(0, 0.5, 64).astype(np.float32),
}
ZERO_DELTA = {k: np.zeros_like(v) for k, v in STATE.items()}


@pytest.fixture(params=["memory", "amqtt", "mosquitto"])
def make_transport(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Transport]:
    """Transports for a hub and its devices: the in-memory fake, or MQTT to a real broker."""
    if request.param == "memory":
        broker = InMemoryBroker()
        return lambda client_id: InMemoryTransport(broker, client_id)
    real: ManagedBroker = request.getfixturevalue(f"{request.param}_broker")
    return lambda client_id: MqttTransport(real.host, real.port, client_id=f"{client_id}-{tmp_path.name}")


def _pull(device: Device, transfer_id: str, strategy: str | None = None) -> bytes:
    device.control(PullRequest(device.id, -1, transfer_id, strategy))
    done = device.next(Completed)
    assert isinstance(done, Completed) and done.transfer_id == transfer_id
    return done.data


def _assert_within_rounding(pulled: dict[str, np.ndarray], exact: dict[str, np.ndarray], codec: str) -> None:
    assert set(pulled) == set(exact)
    for name, value in exact.items():
        error = np.abs(pulled[name].astype(np.float64) - value)
        if codec == "fp16":
            assert np.all(error <= np.abs(value) * 2.0**-11 + 2.0**-24), name
        else:  # int8: at most half a step of the tensor's (or channel's) scale, plus float slack
            assert np.all(error <= quantization_step(value) / 2 * (1 + 1e-6) + 1e-9), name
    assert any(not np.array_equal(pulled[k], v) for k, v in exact.items()), "a lossy codec that changed nothing?"


@pytest.fixture
def hub_on(tmp_path: Path) -> Iterator[Callable[..., tuple[Hub, SqliteStore]]]:
    started: list[tuple[Hub, SqliteStore, Transport]] = []

    def start(transport: Transport, codec: str) -> tuple[Hub, SqliteStore]:
        store = SqliteStore(tmp_path / "store")
        hub = start_hub(transport, store, HubSettings(federation=FED, tau=1, downlink_codec=codec), STATE)
        started.append((hub, store, transport))
        return hub, store

    yield start
    for hub, store, transport in started:
        hub.stop()
        store.close()
        transport.close()


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_devices_pull_the_codec_and_the_hub_keeps_fp32(
    make_transport: Callable[[str], Transport], hub_on: Callable[..., tuple[Hub, SqliteStore]], codec: str
) -> None:
    hub, store = hub_on(make_transport("hub"), codec)
    device = Device(None, "d1", transport=make_transport("d1"))
    try:
        frame = _pull(device, "pull-1")
        meta, pulled = decode_global(frame)
        assert meta.codec == codec and meta.version == 0
        _assert_within_rounding(pulled, STATE, codec)

        stored = store.load_version(0)
        stored_meta, stored_state = decode_global(stored)
        assert stored_meta.codec == STORED_CODEC
        for name, value in STATE.items():
            np.testing.assert_array_equal(stored_state[name], value)
        ratio = len(frame) / len(stored)
        assert ratio < {"fp16": 0.52, "int8": 0.28}[codec], ratio

        # A device trains from what it pulled; its delta lands on the hub's exact fp32 state.
        delta = {k: np.full_like(v, 0.01) for k, v in STATE.items()}
        device.send_update(delta, base=0)
        device.next(Receipt)
        assert hub.wait_for_version(1) and hub.wait_idle()
        _, version_1 = decode_global(store.load_version(1))
        for name, value in STATE.items():
            np.testing.assert_array_equal(version_1[name], value + np.float32(0.01))
        manifest, latest = hub._manifest(), store.latest_version()
        assert latest is not None and manifest.sha256 == latest.sha256  # of the stored fp32 version
        assert manifest.codec == codec and manifest.version == 1
        meta, pulled = decode_global(_pull(device, "pull-2"))
        assert meta.version == 1 and meta.codec == codec
        _assert_within_rounding(pulled, version_1, codec)
    finally:
        device.transport.close()


def test_a_restarted_hub_resumes_the_exact_state_not_the_rounded_one(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    settings = HubSettings(federation=FED, tau=1, downlink_codec="int8")
    store = SqliteStore(tmp_path / "store")
    hub = start_hub(transport, store, settings, STATE)
    device = Device(broker, "d1")
    device.send_update({k: np.full_like(v, 0.25) for k, v in STATE.items()})
    device.next(Receipt)
    assert hub.wait_for_version(1) and hub.wait_idle()
    exact = hub.global_state()
    hub.stop()  # as after a kill -9: nothing but the store survives
    store.close()
    store = SqliteStore(tmp_path / "store")
    hub = start_hub(transport, store, settings, ZERO_DELTA)
    try:
        assert hub.current_version == 1
        for name, value in exact.items():
            np.testing.assert_array_equal(hub.global_state()[name], value)
            np.testing.assert_array_equal(value, STATE[name] + np.float32(0.25))
    finally:
        hub.stop()
        store.close()


def test_codec_choice_falls_back_to_fp32_when_the_codec_cannot_hold_the_state() -> None:
    assert downlink_codec_for(STATE, "fp32") == ("fp32", None)
    assert downlink_codec_for(STATE, "fp16") == ("fp16", None)
    assert downlink_codec_for(STATE, "int8") == ("int8", None)
    big = {**STATE, "embed": np.array([1.0, 70000.0], np.float32)}
    codec, why = downlink_codec_for(big, "fp16")
    assert codec == "fp32" and why is not None and "embed" in why and "65504" in why
    assert downlink_codec_for(big, "int8") == ("int8", None)  # per-tensor scales hold any finite value
    bad = {**STATE, "head": np.array([1.0, np.inf], np.float32)}
    codec, why = downlink_codec_for(bad, "int8")
    assert codec == "fp32" and why is not None and "head" in why


def test_a_version_beyond_fp16_is_served_fp32_not_as_inf(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = InMemoryBroker()
    store = SqliteStore(tmp_path / "store")
    big = {"w": np.array([[1.0, -1e5], [0.5, 3.0]], np.float32)}
    hub = start_hub(InMemoryTransport(broker, "hub"), store, HubSettings(federation=FED, downlink_codec="fp16"), big)
    try:
        meta, pulled = decode_global(_pull(Device(broker, "d1"), "pull-big"))
        assert meta.codec == "fp32"
        np.testing.assert_array_equal(pulled["w"], big["w"])
        assert "beyond fp16's range" in caplog.text
    finally:
        hub.stop()
        store.close()


def test_strategy_pulls_and_signed_frames_use_the_codec(tmp_path: Path) -> None:
    broker = InMemoryBroker()
    store = SqliteStore(tmp_path / "store")
    hub_key = Ed25519PrivateKey.generate()
    union = {**STATE, "prompt": RNG.normal(0, 0.1, (16, 64)).astype(np.float32)}
    hub = start_hub(
        InMemoryTransport(broker, "hub"),
        store,
        HubSettings(federation=FED, downlink_codec="int8"),
        union,
        strategy_tensors={"lora": ["lora_A", "head"], "prompt": ["prompt", "head"]},
        security=HubSecurity(hub_key=hub_key),
    )
    try:
        device = Device(broker, "d1")
        for strategy, names in (("prompt", {"prompt", "head"}), ("lora", {"lora_A", "head"}), (None, set(union))):
            frame = _pull(device, f"pull-{strategy}", strategy)
            verify_global_frame(frame, hub_key.public_key())  # the signature covers the int8 payload
            meta, pulled = decode_global(frame)
            assert meta.codec == "int8" and meta.strategy == (strategy or "lora")
            _assert_within_rounding(pulled, {k: union[k] for k in names}, "int8")
    finally:
        hub.stop()
        store.close()


def test_unknown_downlink_codec_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="downlink_codec must be one of fp32, fp16, int8"):
        HubSettings(downlink_codec="bf16")


# -- a real EdgeClient over a real broker --------------------------------------------------------------
WORDS = [("a wonderful, moving film", 1), ("a dull, lifeless mess", 0), ("superb", 1), ("awful", 0)]


@pytest.mark.slow
def test_edge_client_trains_from_an_int8_pull_and_the_hub_adds_its_delta_exactly(
    tmp_path: Path, mqtt_broker: ManagedBroker
) -> None:
    spec = dataclasses.replace(load_model_spec("minilm-l6-v2"), max_length=16)
    task = get_task("sst2")
    data = LabeledData(task, [(text, None) for text, _ in WORDS * 2], np.array([y for _, y in WORDS * 2]))
    initial = TorchTrainer(spec, task, "lora", seed=0).trainable_state()
    federation = "down-" + tmp_path.name[-8:]
    hub_transport = MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"hub-{tmp_path.name}")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "hub")
    settings = HubSettings(federation=federation, model=spec.name, tau=1, downlink_codec="int8")
    hub = Hub(settings, hub_transport, store, initial_state=lambda: initial)
    hub.start()
    try:
        client = EdgeClient(
            spec,
            data,
            device_id="phone",
            federation=federation,
            transport=MqttTransport(mqtt_broker.host, mqtt_broker.port, client_id=f"phone-{tmp_path.name}"),
            state_dir=tmp_path / "phone",
            batch_size=8,
            heartbeat_interval=0,
        )
        with client:
            result = client.run_round()
            held = client._global  # what the device loaded: the int8 pull, decoded
        assert hub.wait_for_version(1, timeout=60) and hub.wait_idle(30)
        _assert_within_rounding({k: held[k] for k in initial}, initial, "int8")
        _, version_0 = decode_global(store.load_version(0))
        _, version_1 = decode_global(store.load_version(1))
        _, delta = decode_update(store.load_update(result.update_id))
        for name, value in version_1.items():  # the exact fp32 state plus the device's delta
            expected = version_0[name].astype(np.float64) + delta[name]
            np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        assert result.bytes_down < 0.3 * len(store.load_version(0)), (result.bytes_down, len(store.load_version(0)))
    finally:
        hub.stop()
        hub_transport.close()
        store.close()
