"""Signed updates, signed manifests and replay protection (issue 7).

Fast: plain arrays for a model, the in-memory transport for the hub's rules, and one run over a real
Mosquitto broker. Hub-side counts are of messages the hub handled, never of broker PUBACKs.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_device import FED, STATE, Device

from ffm_edge.errors import ConfigError, MalformedError, SignatureError
from ffm_edge.signing import (
    UpdateSignature,
    canonical_update_bytes,
    format_public_key,
    load_private_key,
    load_public_key,
    parse_public_key,
    parse_record_signature,
    parse_update_signature,
    sign_global_frame,
    sign_record,
    sign_update_frame,
    verify_global_frame,
    verify_record,
    verify_update_signature,
    write_keypair,
)
from ffm_edge.transport import InMemoryBroker, InMemoryTransport, MqttTransport
from ffm_edge.wire import (
    GlobalMeta,
    Manifest,
    PullRequest,
    Receipt,
    Rejection,
    Topics,
    UpdateMeta,
    decode_message,
    decode_update,
    encode_global,
    encode_message,
    encode_update,
    unpack_envelope,
)
from ffm_hub.hub import Hub, HubSettings
from ffm_hub.signing import HubSecurity, enroll_device, load_enrolled_keys
from ffm_hub.store import SqliteStore

SHA = "ab" * 32


def _delta(a: float = 1.0) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), a, np.float32), "head": np.zeros(2, np.float32)}


def _frame(device: str, update_id: str | None = None, a: float = 1.0) -> bytes:
    meta = UpdateMeta(FED, device, update_id or uuid.uuid4().hex, 0, "lora", 10, "fp32", time.time())
    return encode_update(meta, _delta(a))


def _update_id(frame: bytes) -> str:
    return decode_update(frame)[0].update_id


# -- the signed bytes and the key files -------------------------------------------------------------------
def test_canonical_update_bytes_are_pinned() -> None:
    got = canonical_update_bytes(
        federation="fed", device="d1", update_id="u1", base_version=3, payload_sha256=SHA, timestamp_ms=1700000000123
    )
    assert got == (b'ffm-update-signature\n[1,"fed","d1","u1",3,"' + SHA.encode() + b'",1700000000123]')


def test_sign_verify_round_trip_and_every_field_is_bound() -> None:
    key = Ed25519PrivateKey.generate()
    frame = sign_update_frame(_frame("d1"), key, now=1000.0)
    meta, _ = decode_update(frame)
    sha = hashlib.sha256(unpack_envelope(frame).payload).hexdigest()
    fields = dict(federation=FED, device="d1", update_id=meta.update_id, base_version=0, payload_sha256=sha)
    assert verify_update_signature(key.public_key(), meta.signature, **fields) == 1_000_000
    for name, other in (("federation", "fed2"), ("device", "d2"), ("update_id", "x"), ("base_version", 1)):
        with pytest.raises(SignatureError):
            verify_update_signature(key.public_key(), meta.signature, **{**fields, name: other})
    with pytest.raises(SignatureError):  # another device's key
        verify_update_signature(Ed25519PrivateKey.generate().public_key(), meta.signature, **fields)


def test_keypair_files(tmp_path: Path) -> None:
    private, public = write_keypair(tmp_path / "keys", "phone-1")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert format_public_key(load_public_key(public)) == format_public_key(key)
    with pytest.raises(ConfigError):
        write_keypair(tmp_path / "keys", "phone-1")  # never replaces a key
    with pytest.raises(ConfigError):
        parse_public_key("ssh-ed25519 AAAA")
    enroll_device(tmp_path / "enrolled", "phone-1", public)
    assert list(load_enrolled_keys(tmp_path / "enrolled")) == ["phone-1"]


def test_unsigned_envelope_still_decodes_and_signing_keeps_the_payload() -> None:
    frame = _frame("d1")
    signed = sign_update_frame(frame, Ed25519PrivateKey.generate())
    assert decode_update(frame)[0].signature is None
    assert unpack_envelope(signed).payload == unpack_envelope(frame).payload
    assert unpack_envelope(signed).protocol_version == unpack_envelope(frame).protocol_version


# -- manifests and global frames --------------------------------------------------------------------------
def _manifest() -> Manifest:
    return Manifest(FED, 2, 1, SHA, 10, "m", "lora", "fp32", 12.5, {"accuracy": 0.75}, 3)


def test_manifest_signature_survives_the_wire_and_forgeries_are_refused() -> None:
    hub_key = Ed25519PrivateKey.generate()
    manifest = _manifest()
    assert "signature" not in encode_message(manifest).decode()  # unsigned manifests are unchanged
    signed = Manifest(**{**manifest.to_dict(), "signature": sign_record("manifest", manifest.to_dict(), hub_key)})
    received = decode_message(encode_message(signed))
    assert isinstance(received, Manifest)
    verify_record("manifest", received.to_dict(), hub_key.public_key())
    forged = Manifest(**{**received.to_dict(), "version": 9})  # a newer version, same signature
    with pytest.raises(SignatureError):
        verify_record("manifest", forged.to_dict(), hub_key.public_key())
    with pytest.raises(SignatureError, match="unsigned"):
        verify_record("manifest", manifest.to_dict(), hub_key.public_key())
    attacker = Ed25519PrivateKey.generate()  # e.g. a rogue hub found by zeroconf
    rogue = Manifest(**{**manifest.to_dict(), "signature": sign_record("manifest", manifest.to_dict(), attacker)})
    with pytest.raises(SignatureError):
        verify_record("manifest", rogue.to_dict(), hub_key.public_key())


def test_global_frame_signature_binds_meta_and_payload() -> None:
    hub_key = Ed25519PrivateKey.generate()
    meta = GlobalMeta(FED, 1, 0, "m", "lora", "fp32", 1.0, 2)
    frame = encode_global(meta, STATE)
    signed = sign_global_frame(frame, hub_key)
    verify_global_frame(signed, hub_key.public_key())
    with pytest.raises(SignatureError, match="unsigned"):
        verify_global_frame(frame, hub_key.public_key())
    tampered_meta = encode_global(GlobalMeta(**{**unpack_envelope(signed).meta, "version": 5}), STATE)
    with pytest.raises(SignatureError):
        verify_global_frame(tampered_meta, hub_key.public_key())
    signature = unpack_envelope(signed).meta["signature"]
    other_payload = encode_global(GlobalMeta(**{**meta.to_dict(), "signature": signature}), {"head": np.zeros(2)})
    with pytest.raises(SignatureError):
        verify_global_frame(other_payload, hub_key.public_key())


# -- the hub's accept path --------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _hub(store_dir: Path, security: HubSecurity | None) -> tuple[InMemoryBroker, Hub, SqliteStore]:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, "hub")
    transport.connect()
    store = SqliteStore(store_dir)
    hub = Hub(HubSettings(federation=FED, tau=100), transport, store, initial_state=lambda: STATE, security=security)
    hub.start()
    return broker, hub, store


@pytest.fixture()
def keys() -> dict[str, Ed25519PrivateKey]:
    return {"d1": Ed25519PrivateKey.generate(), "d2": Ed25519PrivateKey.generate()}


@pytest.fixture()
def secure_hub(tmp_path: Path, keys: dict[str, Ed25519PrivateKey]) -> Iterator[tuple[InMemoryBroker, Hub, _Clock]]:
    clock = _Clock()
    security = HubSecurity(
        require_signatures=True, device_keys={d: k.public_key() for d, k in keys.items()}, clock=clock
    )
    broker, hub, store = _hub(tmp_path / "store", security)
    yield broker, hub, clock
    hub.stop()
    store.close()


def _send(device: Device, frame: bytes) -> Receipt | Rejection:
    device.send_frame(frame, _update_id(frame))
    return device.next((Receipt, Rejection))


def test_hub_rules_with_signatures_required(secure_hub, keys) -> None:
    broker, hub, clock = secure_hub
    d1, d3 = Device(broker, "d1"), Device(broker, "d3")
    signed = sign_update_frame(_frame("d1"), keys["d1"], now=clock.now)
    assert isinstance(_send(d1, signed), Receipt)
    outcomes = {
        "unsigned": _send(d1, _frame("d1")),
        "unknown": _send(d3, sign_update_frame(_frame("d3"), Ed25519PrivateKey.generate(), now=clock.now)),
        "forged": _send(d1, sign_update_frame(_frame("d1"), keys["d2"], now=clock.now)),
        "old": _send(d1, sign_update_frame(_frame("d1"), keys["d1"], now=clock.now - 301)),
        "future": _send(d1, sign_update_frame(_frame("d1"), keys["d1"], now=clock.now + 301)),
    }
    reasons = {name: getattr(result, "reason", "accepted") for name, result in outcomes.items()}
    assert reasons == {
        "unsigned": "bad_signature",
        "unknown": "unknown_device",
        "forged": "bad_signature",
        "old": "stale_timestamp",
        "future": "stale_timestamp",
    }
    within = sign_update_frame(_frame("d1"), keys["d1"], now=clock.now - 299)
    assert isinstance(_send(d1, within), Receipt)
    # A tampered payload under a valid signature: the envelope's sha256 still matches its (new) payload,
    # so only the signature catches it.
    meta, _ = decode_update(signed)
    tampered = encode_update(UpdateMeta(**{**meta.to_dict(), "update_id": "t" * 8}), _delta(5.0))
    assert getattr(_send(d1, tampered), "reason", None) == "bad_signature"
    assert hub.wait_idle()
    assert hub.counters["accepted"] == 2
    assert hub.rejections == {"bad_signature": 3, "unknown_device": 1, "stale_timestamp": 2}


def test_replay_is_refused_after_a_restart_but_an_identical_resend_is_a_duplicate(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    clock = _Clock()

    def security() -> HubSecurity:
        return HubSecurity(require_signatures=True, device_keys={"d1": key.public_key()}, clock=clock)

    broker, hub, store = _hub(tmp_path / "store", security())
    first = sign_update_frame(_frame("d1", "u-1", a=1.0), key, now=clock.now)
    assert isinstance(_send(Device(broker, "d1"), first), Receipt)
    hub.stop()
    store.close()

    clock.now += 3600  # an hour later, after a restart: only the store remembers u-1
    broker, hub, store = _hub(tmp_path / "store", security())
    device = Device(broker, "d1")
    other = sign_update_frame(_frame("d1", "u-1", a=9.0), key, now=clock.now)  # validly signed, new payload
    result = _send(device, other)
    assert isinstance(result, Rejection) and result.reason == "replayed"
    again = _send(device, first)  # the identical update (e.g. QoS-1 redelivery): receipted, not re-queued
    assert isinstance(again, Receipt) and again.duplicate and again.queue_length == 1
    resigned = _send(device, sign_update_frame(first, key, now=clock.now))  # same payload, fresh signature
    assert isinstance(resigned, Receipt) and resigned.duplicate
    assert hub.wait_idle()
    assert hub.rejections == {"replayed": 1} and hub.counters["duplicates"] == 2
    hub.stop()
    store.close()


def test_signatures_off_by_default_keeps_todays_behaviour(tmp_path: Path) -> None:
    broker, hub, store = _hub(tmp_path / "store", None)
    d1 = Device(broker, "d1")
    assert isinstance(_send(d1, _frame("d1")), Receipt)  # unsigned
    assert isinstance(_send(d1, sign_update_frame(_frame("d1"), Ed25519PrivateKey.generate())), Receipt)
    assert hub.wait_idle() and hub.rejections == {}
    hub.stop()
    store.close()


def test_hub_signs_manifests_and_served_frames(tmp_path: Path) -> None:
    hub_key = Ed25519PrivateKey.generate()
    broker, hub, store = _hub(tmp_path / "store", HubSecurity(hub_key=hub_key))
    device = Device(broker, "d1")
    seen: list[bytes] = []
    watcher = InMemoryTransport(broker, "watcher")
    watcher.subscribe(Topics(FED).manifest(), lambda _t, p: seen.append(p))
    watcher.connect()
    device.control(PullRequest("d1", -1, "pull-1", "lora"))
    completed = device.inbox.get(timeout=10)
    verify_global_frame(completed.data, hub_key.public_key())
    assert seen, "the retained manifest reaches a late subscriber"
    manifest = decode_message(seen[-1])
    assert isinstance(manifest, Manifest)
    verify_record("manifest", manifest.to_dict(), hub_key.public_key())
    hub.stop()
    store.close()


# -- fuzzing the new decoders -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=100), st.none(), st.integers()))
def test_signature_parsers_raise_only_malformed(text: object) -> None:
    for parse in (parse_update_signature, parse_record_signature):
        try:
            parse(text)
        except MalformedError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=10**15), st.binary(min_size=64, max_size=64))
def test_update_signature_text_round_trips(timestamp_ms: int, raw: bytes) -> None:
    parsed = parse_update_signature(UpdateSignature(timestamp_ms, raw).encode())
    assert parsed == UpdateSignature(timestamp_ms, raw)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_a_flipped_byte_anywhere_in_a_signed_update_never_verifies(position: int, value: int) -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_update_frame(_frame("d1", "u-fuzz"), key, now=1000.0)
    index = len(signed) - 1 - position  # the payload end of the frame, then its header
    if signed[index] == value:
        return
    mutated = signed[:index] + bytes([value]) + signed[index + 1 :]
    try:
        meta, _ = decode_update(mutated)
        sha = hashlib.sha256(unpack_envelope(mutated).payload).hexdigest()
    except MalformedError:
        return
    except Exception as exc:  # other typed decode errors (hash mismatch, ...) are refusals too
        assert type(exc).__module__ == "ffm_edge.errors"
        return
    with pytest.raises(SignatureError):
        verify_update_signature(
            key.public_key(),
            meta.signature,
            federation=meta.federation,
            device=meta.device,
            update_id=meta.update_id,
            base_version=meta.base_version,
            payload_sha256=sha,
        )


# -- end to end over Mosquitto ----------------------------------------------------------------------------
def test_signed_devices_over_mosquitto(mosquitto_broker, tmp_path: Path) -> None:
    good, enrolled_elsewhere = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    hub_key = Ed25519PrivateKey.generate()
    enrolled = tmp_path / "enrolled"
    enrolled.mkdir()
    (enrolled / "good.pub").write_text(format_public_key(good) + "\n")
    (enrolled / "victim.pub").write_text(format_public_key(enrolled_elsewhere) + "\n")
    security = HubSecurity.from_files(require_signatures=True, enrolled_keys=enrolled)
    security.hub_key = hub_key

    def transport(name: str) -> MqttTransport:
        return MqttTransport(mosquitto_broker.host, mosquitto_broker.port, client_id=f"{name}-{tmp_path.name}")

    hub_transport = transport("hub")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(
        HubSettings(federation=FED, tau=100), hub_transport, store, initial_state=lambda: STATE, security=security
    )
    hub.start()
    devices = [Device(None, name, transport(name)) for name in ("good", "stranger", "victim")]
    try:
        manifests: list[bytes] = []
        watcher = transport("watcher")
        watcher.subscribe(Topics(FED).manifest(), lambda _t, p: manifests.append(p))
        watcher.connect()
        deadline = time.monotonic() + 10
        while not manifests and time.monotonic() < deadline:
            time.sleep(0.05)
        manifest = decode_message(manifests[-1])
        assert isinstance(manifest, Manifest)
        verify_record("manifest", manifest.to_dict(), hub_key.public_key())  # what a device checks
        watcher.close()

        good_dev, stranger, victim = devices
        accepted = _send(good_dev, sign_update_frame(_frame("good"), good))
        unknown = _send(stranger, sign_update_frame(_frame("stranger"), Ed25519PrivateKey.generate()))
        forged = _send(victim, sign_update_frame(_frame("victim"), Ed25519PrivateKey.generate()))
        assert isinstance(accepted, Receipt) and not accepted.duplicate
        assert (getattr(unknown, "reason", None), getattr(forged, "reason", None)) == (
            "unknown_device",
            "bad_signature",
        )
        assert hub.wait_idle()
        assert hub.counters["accepted"] == 1 and len(store.queued()) == 1
        assert hub.rejections == {"unknown_device": 1, "bad_signature": 1}
    finally:
        for device in devices:
            device.transport.close()
        hub.stop()
        hub_transport.close()
        store.close()


def test_edge_clients_sign_and_check_the_hub_over_mosquitto(mosquitto_broker, tmp_path: Path) -> None:
    from ffm_edge.client import EdgeClient
    from ffm_edge.data import LabeledData, get_task
    from ffm_edge.outbox import Outbox

    keys = tmp_path / "keys"
    good_key, good_pub = write_keypair(keys, "good")
    stranger_key, _ = write_keypair(keys, "stranger")
    hub_private, hub_public = write_keypair(keys, "hub")
    enroll_device(tmp_path / "enrolled", "good", good_pub)
    security = HubSecurity.from_files(require_signatures=True, enrolled_keys=tmp_path / "enrolled", hub_key=hub_private)
    hub_transport = MqttTransport(mosquitto_broker.host, mosquitto_broker.port, client_id=f"hub-{tmp_path.name}")
    hub_transport.connect()
    store = SqliteStore(tmp_path / "store")
    hub = Hub(
        HubSettings(federation=FED, tau=100), hub_transport, store, initial_state=lambda: STATE, security=security
    )
    hub.start()
    data = LabeledData(get_task("sst2"), [("good", None), ("bad", None)], np.array([1, 0]))

    def client(name: str, device_key: Path, hub_key: Path | Ed25519PublicKey) -> EdgeClient:
        Outbox(tmp_path / name / "outbox").put(f"u-{name}", _frame(name, f"u-{name}"))
        return EdgeClient(
            "minilm-l6-v2",
            data,
            device_id=name,
            federation=FED,
            broker=f"mqtt://{mosquitto_broker.host}:{mosquitto_broker.port}",
            state_dir=tmp_path / name,
            heartbeat_interval=0,
            receipt_timeout=10,
            device_key=device_key,
            hub_public_key=hub_key,
        )

    rogue_hub = Ed25519PrivateKey.generate().public_key()  # what a device trusting a rogue hub would hold
    try:
        with client("good", good_key, hub_public) as good:
            assert [r.update_id for r in good.send_pending()] == ["u-good"]
            assert good.latest_manifest(timeout=10).signature is not None  # verified before it was kept
        with client("stranger", stranger_key, rogue_hub) as stranger:
            assert stranger.send_pending() == []  # refused: set aside in the outbox with the hub's reason
            rejected = json.loads((tmp_path / "stranger" / "outbox" / "rejected" / "u-stranger.json").read_text())
            assert rejected["reason"] == "unknown_device"
            with pytest.raises(SignatureError, match="does not verify"):  # the real hub's manifest, wrong key
                stranger.latest_manifest(timeout=3)
        assert hub.wait_idle()
        assert hub.counters["accepted"] == 1 and hub.rejections == {"unknown_device": 1}
    finally:
        hub.stop()
        hub_transport.close()
        store.close()
