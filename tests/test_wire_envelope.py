"""Envelope framing and typed metadata: round trips and typed rejection of every kind of bad frame."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from ffm_edge.errors import (
    DecodeError,
    HashMismatchError,
    MalformedError,
    OversizedError,
    ProtocolVersionError,
    TruncatedError,
)
from ffm_edge.wire import (
    CODECS,
    MAGIC,
    PROTOCOL_VERSION,
    Envelope,
    GlobalMeta,
    UpdateMeta,
    WireLimits,
    decode_global,
    decode_update,
    encode_global,
    encode_tensors,
    encode_update,
    pack_envelope,
    unpack_envelope,
)

UPDATE = UpdateMeta(
    federation="fed-1",
    device="phone.42",
    update_id="u-0001",
    base_version=3,
    strategy="lora",
    num_samples=128,
    codec="int8",
    created_at=1_700_000_000.5,
    metrics={"loss": 0.25, "accuracy": 0.9},
)
GLOBAL = GlobalMeta(
    federation="fed-1",
    version=4,
    parent=3,
    model="sentence-transformers/all-MiniLM-L6-v2",
    strategy="lora",
    codec="fp16",
    created_at=1_700_000_100.0,
    num_updates=5,
    metrics={"eval_loss": 0.5},
)
TENSORS = {"lora_A": np.arange(12.0).reshape(3, 4) / 7, "head.bias": np.array([0.5, -1.0])}


def _frame(header: Any, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION) -> bytes:
    """A frame with an arbitrary header (dict → JSON, bytes as they are)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return magic + struct.pack(">HI", version, len(raw)) + raw + payload


def _header(payload: bytes, **overrides: Any) -> dict[str, Any]:
    header = {
        "kind": "update",
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "meta": {},
    }
    header.update(overrides)
    return header


def test_pack_unpack_round_trip() -> None:
    frame = pack_envelope("global", {"a": 1, "b": [1, 2]}, b"payload bytes")
    assert frame.startswith(MAGIC)
    envelope = unpack_envelope(frame, expected_kind="global")
    assert envelope == Envelope(kind="global", meta={"a": 1, "b": [1, 2]}, payload=b"payload bytes")
    assert envelope.protocol_version == PROTOCOL_VERSION


def test_empty_payload_round_trips() -> None:
    assert unpack_envelope(pack_envelope("update", {}, b"")).payload == b""


def test_header_records_size_and_sha256() -> None:
    payload = b"x" * 100
    frame = pack_envelope("update", {"k": "v"}, payload)
    (header_len,) = struct.unpack(">I", frame[6:10])
    header = json.loads(frame[10 : 10 + header_len])
    assert header == _header(payload, meta={"k": "v"})


@pytest.mark.parametrize("codec", CODECS)
def test_update_round_trip(codec: str) -> None:
    meta = replace(UPDATE, codec=codec)
    decoded_meta, tensors = decode_update(encode_update(meta, TENSORS))
    assert decoded_meta == meta
    assert sorted(tensors) == sorted(TENSORS)
    for name, value in TENSORS.items():
        np.testing.assert_allclose(tensors[name], value, atol=0.05)


def test_global_round_trip() -> None:
    meta, tensors = decode_global(encode_global(GLOBAL, TENSORS))
    assert meta == GLOBAL
    np.testing.assert_allclose(tensors["lora_A"], TENSORS["lora_A"], rtol=1e-3)


def test_decoders_check_the_kind() -> None:
    with pytest.raises(MalformedError, match="kind"):
        decode_global(encode_update(UPDATE, TENSORS))
    with pytest.raises(MalformedError, match="kind"):
        decode_update(encode_global(GLOBAL, TENSORS))
    with pytest.raises(MalformedError, match="kind"):
        unpack_envelope(_frame(_header(b"", kind="weights")))


def test_meta_codec_must_match_payload_codec() -> None:
    frame = pack_envelope("update", UPDATE.to_dict(), encode_tensors(TENSORS, "fp16"))
    with pytest.raises(MalformedError, match="codec"):
        decode_update(frame)


def test_invalid_meta_inside_a_valid_frame_is_malformed() -> None:
    frame = pack_envelope("update", {**UPDATE.to_dict(), "num_samples": 0}, encode_tensors(TENSORS, "int8"))
    unpack_envelope(frame)  # the frame itself is fine
    with pytest.raises(MalformedError, match="num_samples"):
        decode_update(frame)


def test_bad_magic() -> None:
    frame = pack_envelope("update", {}, b"abc")
    with pytest.raises(MalformedError, match="magic"):
        unpack_envelope(b"FFMC" + frame[4:])


def test_wrong_protocol_version_names_both_versions() -> None:
    frame = _frame(_header(b"abc"), b"abc", version=2)
    with pytest.raises(ProtocolVersionError) as info:
        unpack_envelope(frame)
    assert "2" in str(info.value) and str(PROTOCOL_VERSION) in str(info.value)


def test_every_truncation_is_a_truncated_error() -> None:
    frame = encode_update(UPDATE, {"w": np.ones(3)})
    for length in range(len(frame)):
        with pytest.raises(TruncatedError):
            unpack_envelope(frame[:length])


def test_every_truncation_of_update_fails_with_a_decode_error() -> None:
    frame = encode_update(UPDATE, {"w": np.ones(3)})
    for length in range(len(frame)):
        with pytest.raises(DecodeError):
            decode_update(frame[:length])


def test_oversized_frame() -> None:
    frame = pack_envelope("update", {}, b"x" * 1000)
    limits = WireLimits(max_frame_bytes=len(frame) - 1)
    with pytest.raises(OversizedError):
        unpack_envelope(frame, limits=limits)
    assert unpack_envelope(frame, limits=WireLimits(max_frame_bytes=len(frame))).payload == b"x" * 1000


def test_oversized_header_is_refused_before_reading_it() -> None:
    declared = MAGIC + struct.pack(">HI", PROTOCOL_VERSION, 64 * 1024 + 1)
    with pytest.raises(OversizedError):
        unpack_envelope(declared)
    frame = pack_envelope("update", {"k": "v" * 200}, b"")
    with pytest.raises(OversizedError):
        unpack_envelope(frame, limits=WireLimits(max_header_bytes=100))


def test_pack_refuses_unknown_kind_and_oversized_header() -> None:
    with pytest.raises(ValueError, match="kind"):
        pack_envelope("weights", {}, b"")
    with pytest.raises(ValueError, match="header"):
        pack_envelope("update", {"k": "v" * 200}, b"", limits=WireLimits(max_header_bytes=100))


def test_flipped_payload_byte_is_a_hash_mismatch() -> None:
    frame = bytearray(encode_update(UPDATE, TENSORS))
    frame[-5] ^= 0x01
    with pytest.raises(HashMismatchError):
        unpack_envelope(bytes(frame))
    with pytest.raises(HashMismatchError):
        decode_update(bytes(frame))


def test_payload_longer_than_declared_is_malformed() -> None:
    frame = pack_envelope("update", {}, b"abc")
    with pytest.raises(MalformedError):
        unpack_envelope(frame + b"d")


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe{}",
        b'{"kind": NaN}',
        b"[" * 10_000 + b"]" * 10_000,
        b'{"kind": "update", "kind": "update", "payload_size": 0, "meta": {}, "payload_sha256": "'
        + hashlib.sha256(b"").hexdigest().encode()
        + b'"}',
    ],
)
def test_bad_header_json_is_malformed(header: bytes) -> None:
    with pytest.raises(MalformedError):
        unpack_envelope(_frame(header))


@pytest.mark.parametrize(
    "overrides",
    [
        {"payload_size": True},
        {"payload_size": "3"},
        {"payload_size": -1},
        {"payload_sha256": "ABC"},
        {"payload_sha256": hashlib.sha256(b"abc").hexdigest().upper()},
        {"meta": [1]},
        {"kind": 1},
        {"extra": 1},
    ],
)
def test_bad_header_fields_are_malformed(overrides: dict[str, Any]) -> None:
    with pytest.raises(MalformedError):
        unpack_envelope(_frame(_header(b"abc", **overrides), b"abc"))


def test_missing_header_field_is_malformed() -> None:
    header = _header(b"abc")
    del header["payload_sha256"]
    with pytest.raises(MalformedError, match="payload_sha256"):
        unpack_envelope(_frame(header, b"abc"))


def test_declared_payload_larger_than_body_is_truncated() -> None:
    with pytest.raises(TruncatedError):
        unpack_envelope(_frame(_header(b"abcdef"), b"abc"))


def test_meta_to_dict_from_dict_round_trip() -> None:
    assert UpdateMeta.from_dict(UPDATE.to_dict()) == UPDATE
    assert GlobalMeta.from_dict(GLOBAL.to_dict()) == GLOBAL
    signed = replace(UPDATE, signature="ed25519:abcdef")
    assert UpdateMeta.from_dict(signed.to_dict()).signature == "ed25519:abcdef"
    root = replace(GLOBAL, version=0, parent=None)
    assert GlobalMeta.from_dict(json.loads(json.dumps(root.to_dict()))) == root


def test_optional_fields_may_be_omitted_and_int_times_become_floats() -> None:
    data = UPDATE.to_dict()
    del data["metrics"], data["signature"]
    data["created_at"] = 1_700_000_000
    meta = UpdateMeta.from_dict(data)
    assert meta.metrics == {} and meta.signature is None
    assert isinstance(meta.created_at, float) and meta.created_at == 1_700_000_000.0


def test_metrics_are_copied() -> None:
    metrics = {"loss": 1.0}
    meta = replace(UPDATE, metrics=metrics)
    metrics["loss"] = 2.0
    assert meta.metrics == {"loss": 1.0}


BAD_IDS = ["", "a/b", "+", "#", "-lead", ".lead", "a" * 65, "sp ace", "é", "$SYS", None, 7]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("key", ["federation", "device", "update_id", "strategy"])
def test_update_meta_rejects_bad_ids(key: str, bad: Any) -> None:
    with pytest.raises(MalformedError):
        UpdateMeta.from_dict({**UPDATE.to_dict(), key: bad})


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("base_version", True),
        ("base_version", -1),
        ("base_version", 1.0),
        ("base_version", "1"),
        ("num_samples", 0),
        ("num_samples", False),
        ("num_samples", True),
        ("codec", "bf16"),
        ("created_at", True),
        ("created_at", "now"),
        ("created_at", float("nan")),
        ("created_at", float("inf")),
        ("created_at", -1.0),
        ("created_at", 10**400),
        ("metrics", {"loss": True}),
        ("metrics", {"loss": float("nan")}),
        ("metrics", {"loss": "0.1"}),
        ("metrics", {"": 1.0}),
        ("metrics", [1.0]),
        ("metrics", {f"m{i}": 1.0 for i in range(300)}),
        ("signature", ""),
        ("signature", 5),
        ("signature", "x" * 5000),
    ],
)
def test_update_meta_rejects_bad_types_and_ranges(key: str, bad: Any) -> None:
    with pytest.raises(MalformedError, match=key if key != "metrics" else "metrics"):
        UpdateMeta.from_dict({**UPDATE.to_dict(), key: bad})


def test_meta_rejects_unknown_and_missing_fields() -> None:
    with pytest.raises(MalformedError, match="unknown"):
        UpdateMeta.from_dict({**UPDATE.to_dict(), "extra": 1})
    data = UPDATE.to_dict()
    del data["device"]
    with pytest.raises(MalformedError, match="device"):
        UpdateMeta.from_dict(data)
    with pytest.raises(MalformedError):
        GlobalMeta.from_dict([("version", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("version", -1),
        ("version", True),
        ("parent", 4),
        ("parent", 5),
        ("parent", True),
        ("parent", -1),
        ("model", ""),
        ("model", "a\nb"),
        ("model", "m" * 300),
        ("num_updates", -1),
        ("num_updates", False),
        ("federation", "a/b"),
    ],
)
def test_global_meta_rejects_bad_fields(key: str, bad: Any) -> None:
    with pytest.raises(MalformedError):
        GlobalMeta.from_dict({**GLOBAL.to_dict(), key: bad})


def test_direct_construction_validates_too() -> None:
    with pytest.raises(MalformedError):
        replace(UPDATE, num_samples=True)
    with pytest.raises(MalformedError):
        replace(GLOBAL, parent=GLOBAL.version)
